/* SPDX-License-Identifier: BSD-3-Clause */
/* The stats files (statsfile.h).
 *
 * Design.  Each file is replaced whole (written, then renamed), so readers
 * never see half of one.  Open, flush, close and the end of a compaction
 * pass write it at once; trims, zeroes and compaction windows (fstrim
 * sends thousands of trims) at most ten times a second, and an update the
 * limit held back is marked pending.  One writer thread serves every
 * attached file: it sleeps until the earliest pending file's tenth of a
 * second is over and writes it then, so no file stays behind its image's
 * last request, whether there is one image (file=) or many (dir=).
 *
 * dir= opens and closes images while the server runs, so the thread's
 * list changes under it: an image joins the list when it is open
 * (statsfile_attach) and leaves it, after a last write, before it is
 * closed (statsfile_detach).  Both happen under the lock, and the thread
 * reads an image's counters only under it, so it never sees a closed
 * image.  A write that fails is said once, and so is the first that works
 * again, not at every trim.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/stat.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "statsfile.h"

#define INTERVAL_NS 100000000L

struct statsfile {
  char *path;
  struct q2_image *img;       /* NULL while not attached */
  struct timespec last;       /* when the file was last written */
  bool pending;               /* an update the limit held back */
  bool failing;               /* the last write failed, and said so */
  struct statsfile *next;     /* in attached */
};

/* lock guards the list of attached files, every field of every state but
 * path (set at statsfile_new, then read only), and the thread's flags.
 * Files are written under it, so that an image cannot be detached and
 * closed halfway through a write of its counters.
 */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond;   /* a file became pending, or stop */
static struct statsfile *attached;
static bool running;          /* the thread is there to signal */
static bool stop;
static pthread_t thread;

void statsfile_format (struct q2_image *img, char *buf, size_t len)
{
  struct q2_stats s;

  q2_get_stats (img, &s);
  snprintf (buf, len,
            "bytes_punched=%" PRIu64 "\nclusters_freed=%" PRIu64
            "\nl2_tables_freed=%" PRIu64 "\nrefcount_blocks_freed=%" PRIu64
            "\ntruncations=%" PRIu64 "\nbytes_truncated=%" PRIu64
            "\nclusters_moved=%" PRIu64 "\nbytes_moved=%" PRIu64
            "\nfree_bytes_punched=%" PRIu64 "\npinned_bytes=%" PRIu64
            "\nfile_length=%" PRIu64 "\nhost_allocated=%" PRIu64
            "\ntarget_length=%" PRIu64 "\nbytes_given_back=%" PRIu64
            "\nimage_end_offset=%" PRIu64 "\nbytes_trimmed=%" PRIu64
            "\nnot_freed_snapshot=%" PRIu64 "\nnot_freed_backing=%" PRIu64
            "\nnot_freed_small=%" PRIu64 "\nnot_freed_already_free=%" PRIu64
            "\nnot_freed_compressed=%" PRIu64 "\nnot_freed_encrypted=%" PRIu64 "\n",
            s.bytes_punched, s.clusters_freed, s.l2_tables_freed,
            s.refblocks_freed, s.truncations, s.bytes_truncated,
            s.clusters_moved, s.bytes_moved, s.free_bytes_punched, s.pinned_bytes,
            s.file_length, s.host_allocated, s.target_length, s.bytes_given_back,
            s.image_end_offset, s.bytes_trimmed, s.not_freed_snapshot,
            s.not_freed_backing, s.not_freed_small, s.not_freed_already_free,
            s.not_freed_compressed, s.not_freed_encrypted);
  /* An image on a block device: the size lvreduce may take the volume
   * down to once the server has stopped.
   */
  if (s.device_size) {
    size_t n = strlen (buf);
    snprintf (buf + n, len - n, "device_size=%" PRIu64 "\nlvreduce_size=%" PRIu64 "\n",
              s.device_size, s.lvreduce_size);
  }
}

/* The folder is resolved now, as file= is: nbdkit changes to / when it
 * forks into the background.  FILE itself may not exist yet.
 */
char *statsfile_resolve (const char *value)
{
  const char *slash = strrchr (value, '/'), *base = slash ? slash + 1 : value;
  char *dir, *folder, *path = NULL;
  struct stat st;

  if (!*base) {
    nbdkit_error ("statsfile=%s: names a folder; give the name of a file in it", value);
    return NULL;
  }
  if (!(dir = slash ? strndup (value, slash == value ? 1 : slash - value) : strdup (".")))
    return NULL;
  if (!(folder = realpath (dir, NULL)))
    nbdkit_error ("statsfile=%s: the folder %s: %m", value, dir);
  else if (stat (folder, &st) == -1 || !S_ISDIR (st.st_mode))
    nbdkit_error ("statsfile=%s: %s is not a folder", value, dir);
  else if (asprintf (&path, "%s/%s", strcmp (folder, "/") ? folder : "", base) == -1)
    path = NULL;
  else if (stat (path, &st) == 0 && S_ISDIR (st.st_mode)) {
    nbdkit_error ("statsfile=%s: is a folder; give the name of a file in it", value);
    free (path);
    path = NULL;
  }
  free (dir);
  free (folder);
  return path;
}

/* statsfile=DIR with dir=: made absolute the same way, but DIR may be
 * missing (exports.c creates it): its parent is resolved.
 */
char *statsfile_resolve_folder (const char *value)
{
  char *v = strdup (value), *slash, *parent, *path = NULL;
  const char *base;
  size_t n;

  if (!v)
    return NULL;
  for (n = strlen (v); n > 1 && v[n - 1] == '/'; n--)
    v[n - 1] = '\0';
  slash = strrchr (v, '/');
  base = slash ? slash + 1 : v;
  if (slash)
    *slash = '\0';
  if (!*base)                   /* "/" */
    path = strdup ("/");
  else if (!(parent = realpath (slash ? (*v ? v : "/") : ".", NULL)))
    nbdkit_error ("statsfile=%s: the folder it goes in: %m", value);
  else {
    if (asprintf (&path, "%s/%s", strcmp (parent, "/") ? parent : "", base) == -1)
      path = NULL;
    free (parent);
  }
  free (v);
  return path;
}

struct statsfile *statsfile_new (const char *path)
{
  struct statsfile *s = calloc (1, sizeof *s);

  if (!s || !(s->path = strdup (path))) {
    nbdkit_error ("statsfile=%s: out of memory", path);
    free (s);
    return NULL;
  }
  return s;
}

void statsfile_free (struct statsfile *s)
{
  if (!s)
    return;
  free (s->path);
  free (s);
}

static int64_t ns_between (const struct timespec *a, const struct timespec *b)
{
  return (b->tv_sec - a->tv_sec) * 1000000000L + b->tv_nsec - a->tv_nsec;
}

static int write_file (struct statsfile *s)
{
  char buf[2048], tmp[4096];
  FILE *f;
  int err = 0;

  statsfile_format (s->img, buf, sizeof buf);
  snprintf (tmp, sizeof tmp, "%s.tmp", s->path);
  if ((f = fopen (tmp, "we")) == NULL)
    return -errno;
  if (fputs (buf, f) == EOF)
    err = errno;
  if (fclose (f) == EOF && !err)
    err = errno;
  if (!err && rename (tmp, s->path) == -1)
    err = errno;
  if (err)
    unlink (tmp);
  return -err;
}

/* Said once when writes start failing (a full disk, a folder gone), and
 * once when they work again.
 */
static void write_locked (struct statsfile *s)
{
  int r = write_file (s);

  clock_gettime (CLOCK_MONOTONIC, &s->last);
  s->pending = false;
  if (r < 0 && !s->failing)
    nbdkit_error ("statsfile=%s: cannot write it: %s; the counters there are "
                  "out of date until it can be written again", s->path, strerror (-r));
  else if (r == 0 && s->failing)
    nbdkit_error ("notice: statsfile=%s: written again", s->path);
  s->failing = r < 0;
}

int statsfile_attach (struct statsfile *s, struct q2_image *img, bool required)
{
  int r;

  pthread_mutex_lock (&lock);
  s->img = img;
  if (required && (r = write_file (s)) < 0) {
    s->img = NULL;
    pthread_mutex_unlock (&lock);
    nbdkit_error ("statsfile=%s: cannot write it: %s", s->path, strerror (-r));
    return -1;
  }
  if (required)
    clock_gettime (CLOCK_MONOTONIC, &s->last);
  else
    write_locked (s);
  s->next = attached;
  attached = s;
  pthread_mutex_unlock (&lock);
  return 0;
}

void statsfile_detach (struct statsfile *s)
{
  struct statsfile **pp;

  pthread_mutex_lock (&lock);
  if (s->img) {
    write_locked (s);
    for (pp = &attached; *pp != s; pp = &(*pp)->next)
      ;
    *pp = s->next;
    s->next = NULL;
    s->img = NULL;
  }
  pthread_mutex_unlock (&lock);
}

void statsfile_update (struct statsfile *s, bool always)
{
  struct timespec now;

  if (!s)
    return;
  clock_gettime (CLOCK_MONOTONIC, &now);
  pthread_mutex_lock (&lock);
  if (!s->img)
    ;                           /* detached: its image is closing */
  else if (always || ns_between (&s->last, &now) >= INTERVAL_NS)
    write_locked (s);
  else if (!s->pending) {
    s->pending = true;
    if (running)
      pthread_cond_signal (&cond);
  }
  pthread_mutex_unlock (&lock);
}

/* Under lock: writes the pending files whose tenth of a second is over,
 * and says when the earliest of the others is due (false: none pending).
 */
static bool write_due (struct timespec *next)
{
  struct timespec now, due;
  struct statsfile *s;
  bool any = false;

  clock_gettime (CLOCK_MONOTONIC, &now);
  for (s = attached; s; s = s->next) {
    if (!s->pending)
      continue;
    due = s->last;
    due.tv_nsec += INTERVAL_NS;
    if (due.tv_nsec >= 1000000000L) {
      due.tv_sec++;
      due.tv_nsec -= 1000000000L;
    }
    if (ns_between (&now, &due) <= 0)
      write_locked (s);
    else if (!any || ns_between (&due, next) > 0) {
      *next = due;
      any = true;
    }
  }
  return any;
}

static void *writer (void *arg)
{
  struct timespec next;

  pthread_mutex_lock (&lock);
  while (!stop) {
    if (write_due (&next))
      pthread_cond_timedwait (&cond, &lock, &next);
    else
      pthread_cond_wait (&cond, &lock);
  }
  pthread_mutex_unlock (&lock);
  return NULL;
}

/* running is set first, so that an update held back from now on signals
 * the thread.
 */
int statsfile_start (void)
{
  pthread_condattr_t attr;
  int r;

  pthread_condattr_init (&attr);
  pthread_condattr_setclock (&attr, CLOCK_MONOTONIC);
  pthread_cond_init (&cond, &attr);
  pthread_condattr_destroy (&attr);
  pthread_mutex_lock (&lock);
  running = true;
  pthread_mutex_unlock (&lock);
  if ((r = pthread_create (&thread, NULL, writer, NULL)) != 0) {
    nbdkit_error ("statsfile=: cannot start the thread that writes the stats "
                  "files: %s", strerror (r));
    pthread_mutex_lock (&lock);
    running = false;
    pthread_mutex_unlock (&lock);
    pthread_cond_destroy (&cond);
    return -1;
  }
  return 0;
}

/* Compaction may still ask for a write meanwhile: running false under the
 * lock keeps it from signalling a condition that is gone.
 */
void statsfile_stop (void)
{
  bool was_running;

  pthread_mutex_lock (&lock);
  was_running = running;
  stop = true;
  running = false;
  if (was_running)
    pthread_cond_signal (&cond);
  pthread_mutex_unlock (&lock);
  if (!was_running)
    return;
  pthread_join (thread, NULL);
  pthread_cond_destroy (&cond);
}
