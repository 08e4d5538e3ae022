/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit glue for the qcow2reclaim engine: parameters, callbacks, errno.
 * No qcow2 knowledge lives here.
 */
#include <config.h>

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "qcow2reclaim.h"
#include "cmdline.h"
#include "exports.h"
#include "statsfile.h"

static char *file;
static char *dir;
static bool readonly;
static char *backing;
static char *data_file;
static size_t cache_size;
static enum q2_discard_mode discard = Q2_DISCARD_PUNCH;
static char *statsfile;
static enum q2_detect_zeroes detect_zeroes = Q2_DETECT_ZEROES_OFF;
static enum q2_compact_mode compact = Q2_COMPACT_AUTO;
static uint64_t compact_rate;
/* The passphrase of encrypted images: with file=, wiped once the image is
 * open; with dir=, kept for the images still to open, wiped at unload.
 */
static char *passphrase;

/* file=: one image for all connections: one metadata cache, so
 * multi-conn is safe, and its stats file.  dir= opens one per image
 * (exports.h), each with its own stats file.
 */
static struct q2_image *image;
static struct statsfile *stats;

/* Per connection: its image, and whether it was told that snapshots keep
 * discarded space.
 * Open handles are listed because nbdkit skips .close for connections still
 * open when it is told to quit, and leaves them to .unload.
 */
struct handle {
  struct handle *prev, *next;
  struct q2_image *img;
  struct export *ex;          /* dir=: the image's export; NULL with file= */
  bool snapshot_notice_given;
};
static pthread_mutex_t handles_lock = PTHREAD_MUTEX_INITIALIZER;
static struct handle *handles;
static void q2r_close (void *h);

/* nbdkit 1.32 has no notice level: nbdkit_debug is only written with -v,
 * and stderr is /dev/null once nbdkit forks into the background.  What
 * reaches nbdkit's log wherever it goes (stderr, syslog, the journal) is
 * nbdkit_error, so notices go through it, marked as notices.
 */
static void notice (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));
static void notice (const char *fmt, ...)
{
  char msg[4096];
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  nbdkit_error ("notice: %s", msg);
}

static void logger (int level, const char *msg)
{
  if (level == 0)
    nbdkit_error ("%s", msg);
  else if (level == 1)
    notice ("%s", msg);
  else
    nbdkit_debug ("%s", msg);
}

static void wipe_passphrase (void)
{
  if (passphrase) {
    explicit_bzero (passphrase, strlen (passphrase));
    free (passphrase);
    passphrase = NULL;
  }
}

/* glibc raises its mmap threshold to the size of any mmapped block that
 * is freed, and with it the free memory each thread's arena keeps at its
 * top before giving any back (twice the threshold).  Opening a large image
 * frees buffers of a few MiB, after which the request buffers nbdkit's
 * worker threads grow stay resident when the threads end: 4 MiB an arena
 * after 1 MiB requests, with up to 8 arenas a core.  Fixed thresholds stop
 * that: an arena gives back a free top past 128 KiB.  The mmap threshold
 * is fixed high, at glibc's own ceiling for the dynamic one, because a
 * mapping makes a worse request buffer: its data starts 16 bytes past a
 * page, and the kernel's copies into it from the page cache ran at half
 * the speed (seqread 1 MiB: 800-980 MiB/s against 1270-1440).
 */
#define MMAP_THRESHOLD (32 << 20)
#define TRIM_THRESHOLD (128 << 10)

static void q2r_load (void)
{
  q2_set_logger (logger);
#if defined M_MMAP_THRESHOLD && defined M_TRIM_THRESHOLD
  if (mallopt (M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 ||
      mallopt (M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1)
    nbdkit_debug ("mallopt failed: freed memory may stay resident");
#endif
}

/* The totals line: the stats file's lines on one. */
static void log_totals (struct q2_image *img)
{
  char buf[2048], *p;

  statsfile_format (img, buf, sizeof buf);
  for (p = buf; (p = strchr (p, '\n')) != NULL; )
    *p = p[1] ? ' ' : '\0';
  notice ("%s: reclaim totals: %s", q2_file_name (img), buf);
}

/* dir=: an image's last connection ended; its stats file had its last
 * write.
 */
static void retire_export (struct export *e)
{
  log_totals (e->img);
}

/* The final write-back may free more, so the totals are taken after it.
 * With dir=, closing the handles left closes their images.
 */
static void q2r_unload (void)
{
  statsfile_stop ();
  if (image) {
    if (!q2_readonly (image))
      q2_flush (image);
    if (stats)
      statsfile_detach (stats);
    log_totals (image);
    if (q2_close (image) < 0)
      nbdkit_error ("%s: metadata could not be written back on exit", file);
    image = NULL;
  }
  while (handles)
    q2r_close (handles);
  exports_free ();
  statsfile_free (stats);
  free (file);
  free (dir);
  free (backing);
  free (data_file);
  free (statsfile);
  wipe_passphrase ();
}

/* Sizes as nbdkit users write them: 65536, 64K, 64M, 64MiB, 1G, 1GiB
 * (powers of 1024; nbdkit 1.32's own parser refuses MiB).
 */
static int parse_size (const char *key, const char *value, uint64_t *out)
{
  static const char units[] = "KMGTPE";
  const char *u;
  char *end;
  uint64_t n, scale = 1;
  size_t k;

  errno = 0;
  n = strtoull (value, &end, 10);
  if (!isdigit ((unsigned char) value[0]) || errno)
    goto bad;
  if (*end) {
    if (!(u = strchr (units, toupper ((unsigned char) *end))))
      goto bad;
    for (k = 0; k <= (size_t) (u - units); k++)
      scale *= 1024;
    end++;
    if (end[0] == 'i' && end[1] == 'B')
      end += 2;
  }
  if (*end)
    goto bad;
  if (n > INT64_MAX / scale) {
    nbdkit_error ("%s=%s: too large", key, value);
    return -1;
  }
  *out = n * scale;
  return 0;
bad:
  nbdkit_error ("%s=%s: not a size (write bytes, or a number with K, M, G or T: "
                "64M, 64MiB, 1G)", key, value);
  return -1;
}

/* The words nbdkit takes for booleans, with the parameter named. */
static int parse_bool (const char *key, const char *value, bool *out)
{
  static const char *const yes[] = { "1", "true", "t", "yes", "y", "on", NULL };
  static const char *const no[] = { "0", "false", "f", "no", "n", "off", NULL };
  size_t i;

  for (i = 0; yes[i]; i++)
    if (strcasecmp (value, yes[i]) == 0) {
      *out = true;
      return 0;
    }
  for (i = 0; no[i]; i++)
    if (strcasecmp (value, no[i]) == 0) {
      *out = false;
      return 0;
    }
  nbdkit_error ("%s=%s: expected true or false", key, value);
  return -1;
}

/* file= and backing= name files that must exist; resolved now, because
 * nbdkit changes to / when it forks.
 */
static char *resolve_file (const char *key, const char *value)
{
  char *path = realpath (value, NULL);

  if (!path)
    nbdkit_error ("%s=%s: %m", key, value);
  return path;
}

/* A parameter given twice is a mistake (two images, two cache sizes),
 * not a choice of the last one: it is refused.
 */
static const char *const parameters[] = {
  "file", "dir", "readonly", "backing", "cache-size", "discard", "detect-zeroes",
  "compact", "compact-rate", "statsfile", "data-file", "passphrase",
};
static bool given[sizeof parameters / sizeof *parameters];

static int given_once (const char *key, const char *value)
{
  size_t i;

  for (i = 0; i < sizeof parameters / sizeof *parameters; i++)
    if (strcmp (key, parameters[i]) == 0) {
      if (given[i]) {
        nbdkit_error ("%s=%s: %s= is given twice; give it once", key, value, key);
        return -1;
      }
      given[i] = true;
    }
  return 0;
}

static int q2r_config (const char *key, const char *value)
{
  uint64_t n;

  if (given_once (key, value) < 0)
    return -1;
  if (strcmp (key, "file") == 0) {
    free (file);
    if (!(file = resolve_file (key, value)))
      return -1;
  }
  else if (strcmp (key, "dir") == 0) {
    free (dir);
    if (!(dir = resolve_file (key, value)))
      return -1;
  }
  else if (strcmp (key, "readonly") == 0) {
    if (parse_bool (key, value, &readonly) < 0)
      return -1;
  }
  else if (strcmp (key, "backing") == 0) {
    free (backing);
    if (strcmp (value, "none") == 0)
      backing = strdup (value);
    else
      backing = resolve_file (key, value);
    if (!backing)
      return -1;
  }
  else if (strcmp (key, "data-file") == 0) {
    free (data_file);
    if (!(data_file = resolve_file (key, value)))
      return -1;
  }
  else if (strcmp (key, "passphrase") == 0) {
    /* SECRET, +FILE, - (asks on the terminal) or -FD, as nbdkit reads them. */
    if (nbdkit_read_password (value, &passphrase) == -1)
      return -1;
  }
  else if (strcmp (key, "cache-size") == 0) {
    if (parse_size (key, value, &n) < 0)
      return -1;
    if (n > SIZE_MAX) {
      nbdkit_error ("%s=%s: too large", key, value);
      return -1;
    }
    cache_size = n;
  }
  else if (strcmp (key, "detect-zeroes") == 0) {
    if (strcmp (value, "unmap") == 0)
      detect_zeroes = Q2_DETECT_ZEROES_UNMAP;
    else if (strcmp (value, "on") == 0 || strcmp (value, "off") == 0)
      detect_zeroes = value[1] == 'n' ? Q2_DETECT_ZEROES_ON : Q2_DETECT_ZEROES_OFF;
    else {
      nbdkit_error ("detect-zeroes=%s: expected off, on or unmap", value);
      return -1;
    }
  }
  else if (strcmp (key, "compact") == 0) {
    if (strcmp (value, "auto") == 0)
      compact = Q2_COMPACT_AUTO;
    else if (strcmp (value, "off") == 0)
      compact = Q2_COMPACT_OFF;
    else {
      nbdkit_error ("compact=%s: expected auto or off", value);
      return -1;
    }
  }
  else if (strcmp (key, "compact-rate") == 0) {
    if (parse_size (key, value, &n) < 0)
      return -1;
    if (n < 65536) {
      nbdkit_error ("compact-rate=%s: at least 64K (bytes moved a second)", value);
      return -1;
    }
    compact_rate = n;
  }
  else if (strcmp (key, "statsfile") == 0) {
    free (statsfile);
    if (!(statsfile = strdup (value))) {
      nbdkit_error ("strdup: %m");
      return -1;
    }
  }
  else if (strcmp (key, "discard") == 0) {
    if (strcmp (value, "punch") == 0)
      discard = Q2_DISCARD_PUNCH;
    else if (strcmp (value, "keep") == 0)
      discard = Q2_DISCARD_KEEP;
    else if (strcmp (value, "ignore") == 0)
      discard = Q2_DISCARD_IGNORE;
    else {
      nbdkit_error ("discard=%s: expected punch, keep or ignore", value);
      return -1;
    }
  }
  else {
    nbdkit_error ("unknown parameter '%s' (see nbdkit qcow2reclaim --help)", key);
    return -1;
  }
  return 0;
}

/* statsfile= is a file, or with dir= a folder: resolved once both are
 * known, still before nbdkit forks and changes to /.
 */
static int resolve_statsfile (void)
{
  char *path;

  if (!statsfile)
    return 0;
  if (dir)
    path = statsfile_resolve_folder (statsfile);
  else
    path = statsfile_resolve (statsfile);
  if (!path)
    return -1;
  free (statsfile);
  statsfile = path;
  return 0;
}

static int q2r_config_complete (void)
{
  if (file && dir) {
    nbdkit_error ("file= and dir= cannot be given together: file= serves one "
                  "image, dir= every image in a folder");
    return -1;
  }
  if (!file && !dir) {
    nbdkit_error ("you must give the image with file=IMAGE.qcow2, or a folder of "
                  "images with dir=DIR");
    return -1;
  }
  if (dir && backing && strcmp (backing, "none") != 0) {
    nbdkit_error ("backing=%s cannot be used with dir=: it would be the backing "
                  "file of every image in the folder (only backing=none is "
                  "allowed there)", backing);
    return -1;
  }
  if (dir && data_file) {
    nbdkit_error ("data-file=%s cannot be used with dir=: each image names its "
                  "own external data file", data_file);
    return -1;
  }
  return resolve_statsfile ();
}

#define q2r_config_help \
  "file=<IMAGE>          The qcow2 image to serve (this or dir= is required).\n" \
  "dir=<DIR>             Serve the images in DIR, chosen by export name:\n" \
  "                      each is opened on its first connection and closed\n" \
  "                      when its last one ends.\n" \
  "readonly=true|false   Serve read-only (default false; nbdkit -r does the\n" \
  "                      same); also allows images marked corrupt or dirty\n" \
  "                      to be read.\n" \
  "backing=<FILE>|none   Use FILE as the backing file instead of the one the\n" \
  "                      image names (which it must name); none refuses images\n" \
  "                      with a backing file.\n" \
  "data-file=<FILE>      Use FILE as the external data file instead of the one\n" \
  "                      the image names.\n" \
  "passphrase=<SECRET>|+<FILE>|-|-<FD>\n" \
  "                      The passphrase of a LUKS-encrypted image: given, read\n" \
  "                      from FILE or from file descriptor FD, or asked for on\n" \
  "                      the terminal (-).\n" \
  "cache-size=<SIZE>     Bytes of L2 tables and refcount blocks kept in memory\n" \
  "                      (default 32M: 256 GiB of disk at 64 KiB clusters stays\n" \
  "                      cached; larger disks work, re-reading tables).\n" \
  "discard=punch|keep|ignore\n" \
  "                      What TRIM does (default punch: free the clusters and\n" \
  "                      punch holes in the host file; keep: zero flag, keep\n" \
  "                      the clusters, punch the host range; ignore: do nothing).\n" \
  "detect-zeroes=off|on|unmap\n" \
  "                      Turn writes of all-zero data into write-zeroes (on),\n" \
  "                      or into write-zeroes that free the space (unmap).\n" \
  "compact=auto|off      Move clusters from the end of the file into free ones\n" \
  "                      below and cut the file, in the background, when it is\n" \
  "                      more than 10% + 1 MiB longer than its data (default auto).\n" \
  "compact-rate=<SIZE>   Bytes a second compaction may move (default 64M).\n" \
  "                      Sizes: bytes, or with K, M, G, T: 64M, 64MiB, 1G.\n" \
  "statsfile=<FILE>      Keep reclaim counters in FILE (written at open and\n" \
  "                      after each flush, trim, zero and compaction pass;\n" \
  "                      also logged when nbdkit exits).  Its folder must exist.\n" \
  "                      With dir=, FILE is a folder holding NAME.stats for\n" \
  "                      each image (created if its parent exists)."

/* Compaction moves and cuts, and deferred punches give space back, with
 * no request to write the stats file: the workers say so, a window or a
 * batch at a time (rate-limited like trims) and when a pass is over
 * (always).
 */
static void worked (void *opaque, bool pass_end)
{
  struct export *e = opaque;

  statsfile_update (e ? e->stats : stats, pass_end);
}

/* An image this process may read but not write is served read-only with
 * one more word: said here, where the words are known.
 */
static int check_writable (void)
{
  int err = exports_write_refusal (file);

  if (!err)
    return 0;
  nbdkit_error ("file=%s: cannot open it for writing: %s; to serve it "
                "read-only, add readonly=true (or run nbdkit -r)", file, strerror (err));
  return -1;
}

/* Opened before nbdkit forks so that a refusal stops nbdkit with a
 * message before it serves anything.  The stats file is written now too,
 * so it exists from the start and one that cannot be written is refused
 * at once.  dir= checks its folders now and opens its images as their
 * connections come.
 */
static int open_file (struct q2_options *o)
{
  int r;

  if (!o->readonly && check_writable () < 0)
    return -1;
  if (statsfile && !(stats = statsfile_new (statsfile)))
    return -1;
  r = q2_open (o, &image);
  wipe_passphrase ();
  if (r < 0)
    return -1;
  if (stats && statsfile_attach (stats, image, true) < 0) {
    q2_close (image);
    image = NULL;
    return -1;
  }
  return 0;
}

static int q2r_get_ready (void)
{
  struct q2_options o = {
    .file = file, .readonly = readonly || cmdline_readonly (), .backing = backing,
    .data_file = data_file,
    .cache_size = cache_size, .discard = discard, .detect_zeroes = detect_zeroes,
    .compact = compact, .compact_rate = compact_rate,
    .worker_notify = worked,
    .passphrase = passphrase, .passphrase_len = passphrase ? strlen (passphrase) : 0,
  };

  if (dir)
    return exports_init (dir, statsfile, &o, retire_export);
  return open_file (&o);
}

static int q2r_after_fork (void)
{
  /* The writer thread first: the compaction worker may ask it for a write. */
  if (statsfile && statsfile_start () < 0)
    return -1;
  return image && q2_after_fork (image) < 0 ? -1 : 0;
}

static int q2r_list_exports (int readonly, int is_tls, struct nbdkit_exports *list)
{
  return dir ? exports_list (list) : nbdkit_use_default_export (list);
}

static void *q2r_open (int ro)
{
  struct handle *h = calloc (1, sizeof *h);

  if (!h) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  h->img = image;
  if (dir) {
    if (!(h->ex = exports_get (nbdkit_export_name ()))) {
      nbdkit_set_error (errno);
      free (h);
      return NULL;
    }
    h->img = h->ex->img;
  }
  /* nbdkit keeps clients from writing either way; this only means the
   * command line was read wrong, and the image holds the writer's lock.
   */
  if (ro && !q2_readonly (h->img))
    nbdkit_debug ("%s: nbdkit -r was not seen on its command line; the image "
                  "is open for writing", q2_file_name (h->img));
  pthread_mutex_lock (&handles_lock);
  h->next = handles;
  if (handles)
    handles->prev = h;
  handles = h;
  pthread_mutex_unlock (&handles_lock);
  return h;
}

static void q2r_close (void *hv)
{
  struct handle *h = hv;

  pthread_mutex_lock (&handles_lock);
  if (h->prev)
    h->prev->next = h->next;
  else
    handles = h->next;
  if (h->next)
    h->next->prev = h->prev;
  pthread_mutex_unlock (&handles_lock);
  if (h->ex)
    exports_put (h->ex);
  free (h);
}

static struct q2_image *img_of (void *h)
{
  return ((struct handle *) h)->img;
}

static int64_t q2r_get_size (void *h)
{
  return q2_virtual_size (img_of (h));
}

static int q2r_block_size (void *h, uint32_t *minimum, uint32_t *preferred,
                           uint32_t *maximum)
{
  uint32_t cs = q2_cluster_size (img_of (h));

  /* An encrypted image's sectors are 512 bytes: a smaller write reads,
   * decrypts and rewrites its sector.
   */
  *minimum = q2_encrypted (img_of (h)) ? 512 : 1;
  *preferred = cs < 4096 ? 4096 : cs;
  *maximum = 0xffffffff;
  return 0;
}

static int q2r_can_write (void *h)
{
  return !q2_readonly (img_of (h));
}

static int q2r_can_flush (void *h) { return 1; }
static int q2r_can_fua (void *h) { return NBDKIT_FUA_NATIVE; }
static int q2r_can_multi_conn (void *h) { return 1; }
static int q2r_can_extents (void *h) { return 1; }
static int q2r_can_zero (void *h) { return 1; }
static int q2r_can_trim (void *h) { return 1; }
static int q2r_can_fast_zero (void *h) { return 1; }

/* The engine returns -errno; nbdkit wants -1 with errno set. */
static int ret (int r)
{
  if (r >= 0)
    return 0;
  nbdkit_set_error (-r);
  return -1;
}

static unsigned flags_of (uint32_t f)
{
  return (f & NBDKIT_FLAG_FUA ? Q2_FUA : 0) |
    (f & NBDKIT_FLAG_MAY_TRIM ? Q2_MAY_TRIM : 0) |
    (f & NBDKIT_FLAG_FAST_ZERO ? Q2_FAST_ZERO : 0);
}

static int q2r_pread (void *h, void *buf, uint32_t count, uint64_t offset,
                      uint32_t flags)
{
  return ret (q2_read (img_of (h), buf, count, offset));
}

static int q2r_pwrite (void *h, const void *buf, uint32_t count, uint64_t offset,
                       uint32_t flags)
{
  return ret (q2_write (img_of (h), buf, count, offset, flags_of (flags)));
}

static void handle_stats (struct handle *h, bool always)
{
  statsfile_update (h->ex ? h->ex->stats : stats, always);
}

static int q2r_flush (void *h, uint32_t flags)
{
  int r = q2_flush (img_of (h));

  handle_stats (h, true);
  return ret (r);
}

/* Said once per connection, so a guest's fstrim does not flood the log. */
static int reclaimed (struct handle *h, int r)
{
  if (r == 1 && !h->snapshot_notice_given) {
    h->snapshot_notice_given = true;
    notice ("%s: internal snapshots share some of the discarded clusters; their "
            "space stays allocated until the snapshots are deleted",
            q2_file_name (h->img));
  }
  handle_stats (h, false);
  return ret (r);
}

static int q2r_zero (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  return reclaimed (h, q2_zero (img_of (h), count, offset, flags_of (flags)));
}

static int q2r_trim (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  return reclaimed (h, q2_discard (img_of (h), count, offset, flags_of (flags)));
}

static int add_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t type)
{
  return nbdkit_add_extent (opaque, offset, length,
                            (type & Q2_EXTENT_HOLE ? NBDKIT_EXTENT_HOLE : 0) |
                            (type & Q2_EXTENT_ZERO ? NBDKIT_EXTENT_ZERO : 0));
}

static int q2r_extents (void *h, uint32_t count, uint64_t offset, uint32_t flags,
                        struct nbdkit_extents *extents)
{
  int r = q2_extents (img_of (h), count, offset, flags & NBDKIT_FLAG_REQ_ONE,
                      add_extent, extents);
  return r > 0 ? -1 : ret (r);
}

static void q2r_dump_plugin (void)
{
  printf ("qcow2reclaim_version=%s\n", PACKAGE_VERSION);
#ifdef HAVE_LIBURING
  printf ("qcow2reclaim_io_uring=yes\n");
#else
  printf ("qcow2reclaim_io_uring=no\n");
#endif
  printf ("qcow2reclaim_compression=deflate,zstd\n");
  printf ("qcow2reclaim_encryption=luks\n");
}

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

static struct nbdkit_plugin plugin = {
  .name              = "qcow2reclaim",
  .longname          = "qcow2reclaim: qcow2 images that give discarded space back",
  .version           = PACKAGE_VERSION,
  .load              = q2r_load,
  .unload            = q2r_unload,
  .config            = q2r_config,
  .config_complete   = q2r_config_complete,
  .config_help       = q2r_config_help,
  .magic_config_key  = "file",
  .get_ready         = q2r_get_ready,
  .after_fork        = q2r_after_fork,
  .list_exports      = q2r_list_exports,
  .open              = q2r_open,
  .close             = q2r_close,
  .get_size          = q2r_get_size,
  .block_size        = q2r_block_size,
  .can_write         = q2r_can_write,
  .can_flush         = q2r_can_flush,
  .can_fua           = q2r_can_fua,
  .can_multi_conn    = q2r_can_multi_conn,
  .can_extents       = q2r_can_extents,
  .can_zero          = q2r_can_zero,
  .can_trim          = q2r_can_trim,
  .can_fast_zero     = q2r_can_fast_zero,
  .pread             = q2r_pread,
  .pwrite            = q2r_pwrite,
  .flush             = q2r_flush,
  .zero              = q2r_zero,
  .trim              = q2r_trim,
  .extents           = q2r_extents,
  .dump_plugin       = q2r_dump_plugin,
  .errno_is_preserved = 0,
};

NBDKIT_REGISTER_PLUGIN (plugin)
