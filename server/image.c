/* SPDX-License-Identifier: BSD-3-Clause */
/* The image API (include/qcow2reclaim.h): opening and closing an image,
 * and the entry points of every operation.  Options that cross operations
 * are applied here: read-only, detect-zeroes, FUA, and when deferred frees
 * pile up between flushes.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-format.h"
#include "qcow2reclaim.h"
#include "backing.h"
#include "bitmap.h"
#include "check.h"
#include "cleanup.h"
#include "commit.h"
#include "compact.h"
#include "punch.h"
#include "copied.h"
#include "corrupt.h"
#include "cow.h"
#include "crypto.h"
#include "discard.h"
#include "engine.h"
#include "extents.h"
#include "header.h"
#include "hostlock.h"
#include "l2.h"
#include "log.h"
#include "map.h"
#include "read.h"
#include "request.h"
#include "shrink.h"
#include "snapshot.h"

#define HEADER_READ_MAX (2u << 20)   /* the largest cluster holds the header */

static int image_open (const struct q2_options *o, int depth,
                       const struct backing_chain *above, struct q2_image **imgp);

/* After a header switch that could not be confirmed (meta.failed). */
static int refuse_changes (struct q2_image *img)
{
  return writeback_refused (&img->m);
}

void q2_set_logger (q2_log_fn fn)
{
  log_set_fn (fn);
}

/* A qcow2 backing file is an image of its own, opened read-only. */
static int backing_qcow2_open (const char *path, int depth, bool force_share,
                               const struct backing_chain *chain, void **handle)
{
  struct q2_options o = { .file = path, .readonly = true, .force_share = force_share,
                          .cache_size = Q2_DEFAULT_CACHE_SIZE / 4 };
  struct q2_image *img;
  int r = image_open (&o, depth, chain, &img);

  *handle = img;
  return r;
}

static void backing_qcow2_close (void *h)
{
  q2_close (h);
}

static uint64_t backing_qcow2_size (void *h)
{
  return q2_virtual_size (h);
}

static int backing_qcow2_read (void *h, void *buf, uint64_t len, uint64_t off)
{
  return read_range (h, buf, len, off);
}

static int backing_qcow2_status (void *h, uint64_t off, uint64_t len, uint32_t *type,
                                 uint64_t *run)
{
  return extents_status (h, off, len, type, run);
}

static int backing_qcow2_map (void *h, uint64_t off, uint64_t len, int depth,
                              struct q2_map_entry *e)
{
  return map_status (h, off, len, depth, e);
}

static const struct backing_ops backing_qcow2 = {
  .open = backing_qcow2_open,
  .close = backing_qcow2_close,
  .size = backing_qcow2_size,
  .read = backing_qcow2_read,
  .block_status = backing_qcow2_status,
  .map_status = backing_qcow2_map,
};

static int read_header (struct q2_image *img)
{
  struct layout *lay = &img->m.lay;
  struct header_extras ex;
  uint64_t size, n;
  int r;

  if ((r = host_size (&img->m.hf, &size)) < 0)
    return r;
  lay->file_end = size;
  n = size < HEADER_READ_MAX ? size : HEADER_READ_MAX;
  CLEANUP_FREE uint8_t *buf = calloc (1, n > HDR_V3_MIN_LENGTH ? n : HDR_V3_MIN_LENGTH);
  if (!buf)
    return -ENOMEM;
  if ((r = host_pread (&img->m.hf, buf, n, 0)) < 0) {
    log_error ("%s: cannot read the header: %s", lay->name, strerror (-r));
    return r;
  }
  /* A repair is what takes the corrupt and dirty marks away. */
  if ((r = header_parse (lay, buf, n, size, img->readonly || img->repair, &ex)) < 0)
    return r;
  if (ex.backing_offset && ex.backing_len) {
    if (!(img->backing_name = strndup ((char *) buf + ex.backing_offset, ex.backing_len)))
      return -ENOMEM;
    snprintf (img->backing_format, sizeof img->backing_format, "%s", ex.backing_format);
  }
  if (lay->data_file && ex.data_file_offset &&
      !(img->data_name = strndup ((char *) buf + ex.data_file_offset, ex.data_file_len)))
    return -ENOMEM;
  return 0;
}

/* Which clusters hold active L2 tables and refcount blocks; bad offsets
 * are left for the request that meets them to report.
 */
static int build_overlap (struct q2_image *img)
{
  struct meta *m = &img->m;
  uint64_t i, off;
  int r;

  for (i = 0; i < m->reftable.size; i++)
    if ((off = table_get (&m->reftable, i) & REFT_OFFSET_MASK) &&
        (r = overlap_add (&m->lay.meta, off >> m->lay.cluster_bits, META_REFBLOCK)) < 0)
      return r;
  for (i = 0; i < m->l1.size; i++)
    if ((off = table_get (&m->l1, i) & L1E_OFFSET_MASK) &&
        overlap_kind (&m->lay.meta, off >> m->lay.cluster_bits) == META_DATA &&
        (r = overlap_add (&m->lay.meta, off >> m->lay.cluster_bits, META_L2)) < 0)
      return r;
  return 0;
}

/* A relative name in the header is relative to the image's folder, as in
 * QEMU; data-file=PATH replaces it.
 */
static int data_file_path (const struct q2_image *img, const char *override,
                           const char *name, char **path)
{
  const char *image = img->m.lay.name, *slash = strrchr (image, '/');

  if (override)
    *path = strdup (override);
  else if (!name) {
    log_error ("%s: the image keeps its data in an external data file but does not "
               "name it; give it with data-file=PATH", image);
    return -EINVAL;
  }
  else if (name[0] == '/' || !slash)
    *path = strdup (name);
  else if (asprintf (path, "%.*s/%s", (int) (slash - image), image, name) < 0)
    *path = NULL;
  return *path ? 0 : -ENOMEM;
}

/* The data file is opened and locked like the image itself. */
static int open_data_file (struct q2_image *img, const struct q2_options *o,
                           const char *name)
{
  CLEANUP_FREE char *path = NULL;
  int r;

  img->data = &img->m.hf;
  if (!img->m.lay.data_file) {
    if (!o->data_file)
      return 0;
    log_error ("%s: data-file=%s was given, but the image has no external data file",
               img->m.lay.name, o->data_file);
    return -EINVAL;
  }
  if ((r = data_file_path (img, o->data_file, name, &path)) < 0)
    return r;
  if ((r = host_open (&img->data_hf, path, o->readonly)) < 0) {
    log_error ("%s: cannot open its external data file %s: %s", img->m.lay.name, path,
               strerror (-r));
    return r;
  }
  img->data = &img->data_hf;
  img->m.data = &img->data_hf;
  return o->force_share ? 0 : hostlock_take (&img->data_hf, !o->readonly);
}

/* A LUKS-encrypted image is unlocked with the passphrase given, or opened
 * for its metadata only.  Its backing file would need a key of its own
 * (QEMU takes one per image), and an external data file another place
 * for the tweaks: both are refused rather than half served.
 */
static int open_crypto (struct q2_image *img, const struct q2_options *o,
                        const struct backing_chain *above)
{
  const struct layout *lay = &img->m.lay;

  if (lay->crypt_method != CRYPT_LUKS)
    return 0;
  if (above) {
    log_error ("%s: the backing file %s is encrypted; encrypted backing files are not "
               "supported", above->name, lay->name);
    return -ENOTSUP;
  }
  if (img->backing_name || lay->data_file) {
    log_error ("%s: the image is encrypted and has %s; that is not supported (convert "
               "it to a standalone encrypted image with qemu-img convert)", lay->name,
               img->backing_name ? "a backing file" : "an external data file");
    return -ENOTSUP;
  }
  if (o->passphrase)
    return crypto_open (&img->crypto, &img->m.hf, lay->name, lay->crypto_offset,
                        lay->crypto_length, o->passphrase, o->passphrase_len);
  if (o->metadata_only)
    return 0;
  log_error ("%s: the image is encrypted (LUKS); give its passphrase with "
             "passphrase=SECRET, passphrase=+FILE, passphrase=- or passphrase=-FD",
             lay->name);
  return -EACCES;
}

/* An encrypted image opened for its metadata only has no key for data. */
static int refuse_without_key (const struct q2_image *img, const char *what)
{
  if (img->m.lay.crypt_method != CRYPT_LUKS || img->crypto)
    return 0;
  log_error ("%s: cannot %s: the image is encrypted and was opened without its "
             "passphrase", img->m.lay.name, what);
  return -EACCES;
}

/* backing=none refuses images that need a backing file; backing=FILE
 * replaces the one the header names, and an image that names none has
 * nothing to replace: FILE showing through its unallocated clusters,
 * where they read zeros, would be a mistake taken for data.
 */
static int open_backing (struct q2_image *img, const struct backing_chain *chain,
                         const char *override, const char *name, const char *fmt,
                         int depth, bool force_share)
{
  if (override && strcmp (override, "none") == 0) {
    if (!name)
      return 0;
    log_error ("%s: the image has a backing file (%s), and backing=none refuses to "
               "follow it", img->m.lay.name, name);
    return -EINVAL;
  }
  if (override && !name) {
    log_error ("%s: the image has no backing file, so backing=%s has none to "
               "replace", img->m.lay.name, override);
    return -EINVAL;
  }
  if (override)
    return backing_open (&backing_qcow2, chain, override, NULL, depth, force_share,
                         &img->backing);
  if (!name)
    return 0;
  return backing_open (&backing_qcow2, chain, name, fmt[0] ? fmt : NULL, depth,
                       force_share, &img->backing);
}

/* A device is as long as the volume: the image ends after its last
 * cluster in use, and that end is what the layers below take for the
 * file's length from now on.
 */
static int device_end (struct q2_image *img)
{
  struct meta *m = &img->m;
  uint64_t end;
  int r;

  LOCK_FOR_SCOPE (&m->lock);
  if ((r = shrink_used_end (img, &end)) < 0)
    return r;
  m->lay.file_end = end;
  host_set_end (&m->hf, end);
  return 0;
}

/* The dirty bit: QEMU with lazy refcounts stopped before writing its
 * refcounts back, so they may be short of the references.  QEMU rebuilds
 * them when it opens such an image for writing, and so do we, with the
 * repair of qcow2reclaim check -r all; what it cannot mend keeps the image
 * refused.
 */
static int rebuild_refcounts (struct q2_image *img)
{
  const char *name = img->m.lay.name;
  struct q2_repair_result res;
  struct timespec t0, t1;
  int r;

  clock_gettime (CLOCK_MONOTONIC, &t0);
  img->repair = true;
  r = q2_repair (img, Q2_REPAIR_ALL, &res, NULL, NULL);
  img->repair = false;
  if (r < 0)
    return r;
  clock_gettime (CLOCK_MONOTONIC, &t1);
  if (res.after.corruptions) {
    log_error ("%s: the image has the dirty bit set (lazy refcounts were not written "
               "back) and %" PRIu64 " errors are left after rebuilding its refcounts; "
               "run qemu-img check -r all, or serve it with readonly=true", name,
               res.after.corruptions);
    check_free (&res.after);
    return -EINVAL;
  }
  check_free (&res.after);
  log_notice ("%s: the image had the dirty bit set (lazy refcounts not written back): "
              "its refcounts were rebuilt in %.2f s (%" PRIu64 " counts raised, %" PRIu64
              " lowered), and the bit is cleared", name,
              (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9,
              res.corruptions_fixed, res.leaks_fixed);
  return 0;
}

/* Persistent bitmaps: kept current where they can be, marked in use on
 * disk before anything changes guest data; where they cannot, the
 * autoclear bit goes, as before.  A repair changes no guest data: it
 * keeps them as they are.
 */
static int open_bitmaps (struct q2_image *img)
{
  struct meta *m = &img->m;
  bool writes = !img->readonly && !img->repair, cannot;
  int r;

  if ((r = bitmap_open (m, writes, &img->bitmaps, &cannot)) < 0)
    return r;
  if (!writes)
    return 0;
  if ((r = header_clear_autoclear (&m->hf, &m->lay, !cannot)) < 0)
    return r;
  return bitmap_mark_in_use (img->bitmaps, m);
}

static int image_open (const struct q2_options *o, int depth,
                       const struct backing_chain *above, struct q2_image **imgp)
{
  struct backing_chain link = { .above = above };
  struct q2_image *img;
  struct meta *m;
  struct stat st;
  int r;

  *imgp = NULL;
  if (o->force_share && !o->readonly) {
    log_error ("%s: force-share goes with read-only only: writing without the "
               "image lock could collide with another program", o->file);
    return -EINVAL;
  }
  if (!(img = calloc (1, sizeof *img)))
    return -ENOMEM;
  m = &img->m;
  mutex_init (&m->lock);
  rangelock_init (&img->guest_lock);
  alloc_init (&img->alloc, m);
  img->readonly = o->readonly;
  img->repair = o->repair && !o->readonly;
  img->discard = o->discard;
  img->detect_zeroes = o->detect_zeroes;
  img->notify = o->worker_notify;
  img->notify_opaque = o->worker_opaque;
  if ((r = host_open (&m->hf, o->file, o->readonly)) < 0) {
    if (above)
      log_error ("%s: cannot open its backing file %s: %s", above->name, o->file,
                 strerror (-r));
    else
      log_error ("%s: cannot open the image: %s", o->file, strerror (-r));
    goto fail;
  }
  m->lay.name = m->hf.name;
  if ((!o->force_share && (r = hostlock_take (&m->hf, !o->readonly)) < 0) ||
      (r = read_header (img)) < 0 ||
      (r = open_crypto (img, o, above)) < 0 ||
      (r = open_data_file (img, o, img->data_name)) < 0 ||
      (r = table_load (&m->l1, &m->hf, &m->lay, "L1 table", m->lay.l1_offset,
                       m->lay.l1_entries)) < 0 ||
      (r = table_load (&m->reftable, &m->hf, &m->lay, "refcount table",
                       m->lay.reftable_offset, layout_reftable_entries (&m->lay))) < 0 ||
      (r = build_overlap (img)) < 0 ||
      (r = copied_new (&img->copied)) < 0 ||
      (r = compact_new (&img->compact, o->compact == Q2_COMPACT_AUTO && !img->repair &&
                        (img->crypto || m->lay.crypt_method != CRYPT_LUKS),
                        o->compact_rate,
                        o->worker_notify, o->worker_opaque)) < 0)
    goto fail;
  r = cache_init (&m->cache, &m->hf, &m->lay, &m->lock,
                  o->cache_size ? o->cache_size : Q2_DEFAULT_CACHE_SIZE,
                  m->lay.cluster_size);
  if (r < 0)
    goto fail;
  writeback_init (m);
  /* Counts a crash or damage left short would put a device's end below
   * clusters in use: such an image keeps the device's size until its
   * counts are rebuilt.
   */
  if (host_is_device (&m->hf) && !(m->lay.incompat & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)) &&
      (r = device_end (img)) < 0)
    goto fail;
  if ((r = host_stat (&m->hf, &st)) < 0)
    goto fail;
  link.dev = st.st_dev;
  link.ino = st.st_ino;
  link.name = m->lay.name;
  if ((r = open_backing (img, &link, o->backing, img->backing_name, img->backing_format,
                         depth, o->force_share)) < 0)
    goto fail;
  /* The raw file could not read as the guest disk where the backing file
   * shows through; QEMU refuses the pair too.
   */
  if (m->lay.data_raw && img->backing) {
    log_error ("%s: the image has a raw external data file (data_file_raw) and a "
               "backing file, which cannot go together", m->lay.name);
    r = -EINVAL;
    goto fail;
  }
  if (!img->readonly && !img->repair && (m->lay.incompat & INCOMPAT_DIRTY)) {
    if ((r = rebuild_refcounts (img)) < 0 ||
        (host_is_device (&m->hf) && (r = device_end (img)) < 0))
      goto fail;
  }
  if ((r = open_bitmaps (img)) < 0)
    goto fail;
  *imgp = img;
  return 0;
fail:
  q2_close (img);
  return r;
}

int q2_open (const struct q2_options *o, struct q2_image **imgp)
{
  return image_open (o, 0, NULL, imgp);
}

int q2_after_fork (struct q2_image *img)
{
  int r;

  if (img->readonly)
    return 0;
  host_start_ring (&img->m.hf);
  if ((r = punch_start (img)) < 0)
    return r;
  return compact_start (img);
}

int q2_close (struct q2_image *img)
{
  struct meta *m;
  bool synced;
  int r = 0;

  if (!img)
    return 0;
  m = &img->m;
  compact_stop (img);
  punch_stop (img);
  punch_drain (img);
  if (!img->readonly && m->cache.buckets && !m->failed) {
    mutex_lock (&m->lock);
    r = commit_run (img, &synced);
    mutex_unlock (&m->lock);
    /* Data written since the last flush, with nothing else to write back. */
    if (r == 0 && !synced)
      r = writeback_sync (m);
    /* Only with every bit on disk may the bitmaps say they are whole. */
    if (r == 0)
      r = bitmap_close (img->bitmaps, m);
  }
  backing_close (img->backing);
  bitmap_free (img->bitmaps);
  crypto_free (img->crypto);
  cache_free (&m->cache);
  overlap_free (&m->lay.meta);
  table_free (&m->l1);
  table_free (&m->reftable);
  alloc_free (&img->alloc);
  copied_free (img->copied);
  compact_free (img->compact);
  host_close (&img->data_hf);
  host_close (&m->hf);
  free (img->backing_name);
  free (img->data_name);
  rangelock_destroy (&img->guest_lock);
  mutex_destroy (&m->lock);
  free (img);
  return r;
}

uint64_t q2_virtual_size (const struct q2_image *img)
{
  return img->m.lay.virtual_size;
}

uint32_t q2_cluster_size (const struct q2_image *img)
{
  return (uint32_t) img->m.lay.cluster_size;
}

bool q2_encrypted (const struct q2_image *img)
{
  return img->m.lay.crypt_method == CRYPT_LUKS;
}

bool q2_readonly (const struct q2_image *img)
{
  return img->readonly;
}

const char *q2_file_name (const struct q2_image *img)
{
  return img->m.lay.name;
}

int q2_file_size (struct q2_image *img, uint64_t *size)
{
  return host_size (&img->m.hf, size);
}

uint32_t q2_format_version (const struct q2_image *img)
{
  return img->m.lay.version;
}

uint32_t q2_snapshot_count (const struct q2_image *img)
{
  return img->m.lay.nb_snapshots;
}

int q2_read (struct q2_image *img, void *buf, uint64_t count, uint64_t offset)
{
  int r = refuse_without_key (img, "read guest data");

  return r < 0 ? r : read_range (img, buf, count, offset);
}

/* Copy-on-write asked for the deferred frees it left: the first two steps
 * of the commit sequence, so the clusters it freed can be reused.
 */
static int apply_pending (struct q2_image *img)
{
  LOCK_FOR_SCOPE (&img->m.lock);
  return commit_frees (img);
}

static bool is_zero (const void *buf, uint64_t count)
{
  const unsigned char *p = buf;

  /* Compare the buffer with itself shifted by one byte after checking the
   * first: all equal and the first is zero means all zero.
   */
  return count == 0 || (p[0] == 0 && memcmp (p, p + 1, count - 1) == 0);
}

int q2_write (struct q2_image *img, const void *buf, uint64_t count,
              uint64_t offset, unsigned flags)
{
  struct rangelock_held h;
  bool apply_frees;
  int r;

  if (img->readonly || img->repair)
    return -EROFS;
  l2_prefetch (img, offset);
  if ((r = request_check (img, count, offset)) < 0 || (r = refuse_changes (img)) < 0 ||
      (r = refuse_without_key (img, "write guest data")) < 0)
    return r;
  if (img->detect_zeroes && is_zero (buf, count)) {
    r = q2_zero (img, count, offset, (flags & Q2_FUA) |
                 (img->detect_zeroes == Q2_DETECT_ZEROES_UNMAP ? Q2_MAY_TRIM : 0));
    return r < 0 ? r : 0;
  }
  bitmap_set (img->bitmaps, offset, count);
  request_lock (img, &h, count, offset, true);
  r = cow_write (img, buf, count, offset, &apply_frees);
  if (r == 0 && apply_frees && !(flags & Q2_FUA))
    r = apply_pending (img);
  request_unlock (img, &h);
  /* Outside the range lock: the flush drains the deferred punches, whose
   * look at their cluster takes that cluster's range lock.
   */
  if (r == 0 && (flags & Q2_FUA))
    r = q2_flush (img);
  return r;
}

int q2_zero (struct q2_image *img, uint64_t count, uint64_t offset, unsigned flags)
{
  bool kept, apply_frees;
  int r = img->readonly ? 0 : refuse_changes (img);

  if (img->repair)
    return -EROFS;
  if (r == 0)
    r = refuse_without_key (img, "zero guest data");
  if (r < 0)
    return r;
  if (!img->readonly)
    bitmap_set (img->bitmaps, offset, count);
  r = discard_zero (img, count, offset, flags & ~Q2_FUA, &kept, &apply_frees);

  if (r == 0 && (flags & Q2_FUA))
    r = q2_flush (img);
  else if (r == 0 && apply_frees)
    r = apply_pending (img);
  return r < 0 ? r : kept;
}

int q2_discard (struct q2_image *img, uint64_t count, uint64_t offset, unsigned flags)
{
  bool kept;
  int r = img->readonly ? 0 : refuse_changes (img);

  if (img->repair)
    return -EROFS;
  if (r == 0)
    r = refuse_without_key (img, "discard guest data");
  if (r < 0)
    return r;
  if (!img->readonly)
    bitmap_set (img->bitmaps, offset, count);
  r = discard_range (img, count, offset, &kept);

  if (r == 0 && (flags & Q2_FUA))
    r = q2_flush (img);
  return r < 0 ? r : kept;
}

int q2_flush (struct q2_image *img)
{
  bool synced = false;
  int r;

  if (img->readonly)
    return 0;
  if ((r = refuse_changes (img)) < 0)
    return r;
  /* What the guest trimmed before the flush is gone after it. */
  punch_drain (img);
  mutex_lock (&img->m.lock);
  r = commit_flush (img, &synced);
  mutex_unlock (&img->m.lock);
  /* What is left (data, and L2 tables whose counts and data are already
   * on disk) needs no ordering: sync outside the lock so lookups go on.
   */
  if (r == 0 && !synced)
    r = writeback_sync (&img->m);
  return r;
}

int q2_extents (struct q2_image *img, uint64_t count, uint64_t offset,
                bool req_one, q2_extent_fn fn, void *opaque)
{
  return extents_walk (img, count, offset, req_one, fn, opaque);
}

int q2_map (struct q2_image *img, q2_map_fn fn, void *opaque)
{
  return map_walk (img, fn, opaque);
}

int q2_check (struct q2_image *img, struct q2_check *res, q2_progress_fn progress,
              void *opaque)
{
  return check_image (img, res, progress, opaque);
}

void q2_check_free (struct q2_check *res)
{
  check_free (res);
}

int q2_repair (struct q2_image *img, enum q2_repair_mode mode,
               struct q2_repair_result *res, q2_progress_fn progress, void *opaque)
{
  struct layout *lay = &img->m.lay;
  bool synced;
  int r;

  memset (res, 0, sizeof *res);
  if (!img->repair) {
    log_error ("%s: a repair needs the image opened for it", lay->name);
    return -EINVAL;
  }
  if ((r = refuse_changes (img)) < 0)
    return r;
  if ((r = check_repair (img, mode, &res->leaks_fixed, &res->corruptions_fixed,
                         progress, opaque)) < 0) {
    /* Counts may be half mended (leaks below lowered, low counts above not
     * yet raised): the commit of the close would cut clusters still in
     * use.  Nothing more is written; the image stays as marked.
     */
    img->m.failed = true;
    return r;
  }
  /* What the commit sequence does after any change: empty refcount blocks
   * go, and the free end of the file is cut.
   */
  mutex_lock (&img->m.lock);
  r = commit_run (img, &synced);
  mutex_unlock (&img->m.lock);
  if (r == 0)
    r = check_image (img, &res->after, NULL, NULL);
  /* Only with every count right on disk may the marks go. */
  if (r == 0 && res->after.corruptions == 0)
    r = header_clear_incompat (&img->m.hf, lay, INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
  if (r < 0)
    check_free (&res->after);
  return r;
}

void q2_header_info (const struct q2_image *img, struct q2_header_info *h)
{
  const struct layout *lay = &img->m.lay;

  memset (h, 0, sizeof *h);
  h->version = lay->version;
  h->refcount_bits = 1u << lay->refcount_order;
  h->compression = lay->compression_type == COMPRESSION_ZSTD ? "zstd" : "zlib";
  h->lazy_refcounts = !!(lay->compat & COMPAT_LAZY_REFCOUNTS);
  h->corrupt = !!(lay->incompat & INCOMPAT_CORRUPT);
  h->dirty = !!(lay->incompat & INCOMPAT_DIRTY);
  h->extended_l2 = lay->extl2;
  h->bitmaps = !!(lay->autoclear & AUTOCLEAR_BITMAPS);
  h->backing_file = img->backing_name;
  h->backing_format = img->backing_format[0] ? img->backing_format : NULL;
  h->backing_path = img->backing ? backing_path (img->backing) : NULL;
  h->encryption = lay->crypt_method == CRYPT_LUKS ? "luks" : NULL;
  h->write_refusal = header_write_refusal (lay);
  h->data_file = lay->data_file ? (img->data_name ? img->data_name : "") : NULL;
  h->data_file_raw = lay->data_raw;
  h->data_path = lay->data_file ? img->data_hf.name : NULL;
}

void q2_bitmaps_free (struct q2_bitmap *list, uint32_t n)
{
  uint32_t i;

  for (i = 0; list && i < n; i++)
    free (list[i].name);
  free (list);
}

/* What the directory said at open; the in-use flag as it is on disk now. */
int q2_bitmaps (struct q2_image *img, struct q2_bitmap **list, uint32_t *n)
{
  const struct bitmap_entry *e = bitmap_entries (img->bitmaps, n);
  struct q2_bitmap *l;
  uint32_t i;

  *list = NULL;
  if (!*n)
    return 0;
  if (!(l = calloc (*n, sizeof *l)))
    return -ENOMEM;
  for (i = 0; i < *n; i++) {
    if (!(l[i].name = strdup (e[i].name))) {
      q2_bitmaps_free (l, *n);
      return -ENOMEM;
    }
    l[i].granularity = e[i].granularity_bits < 64 ? 1ull << e[i].granularity_bits : 0;
    l[i].in_use = bitmap_in_use (img->bitmaps, i);
    l[i].auto_flag = !!(e[i].flags & BME_FLAG_AUTO);
  }
  *list = l;
  return 0;
}

void q2_snapshots_free (struct q2_snapshot *list, uint32_t n)
{
  uint32_t i;

  for (i = 0; list && i < n; i++) {
    free (list[i].id);
    free (list[i].name);
  }
  free (list);
}

int q2_snapshots (struct q2_image *img, struct q2_snapshot **list)
{
  const struct layout *lay = &img->m.lay;
  uint64_t off = lay->snapshots_offset;
  struct snapshot_entry e;
  struct q2_snapshot *l;
  uint32_t i;
  int r = 0;

  *list = NULL;
  if (!lay->nb_snapshots)
    return 0;
  if (!(l = calloc (lay->nb_snapshots, sizeof *l)))
    return -ENOMEM;
  LOCK_FOR_SCOPE (&img->m.lock);
  for (i = 0; i < lay->nb_snapshots && r == 0; i++, off += e.length) {
    if (off >= lay->file_end) {
      r = corrupt_error (lay, "snapshot %u of the snapshot table at 0x%" PRIx64
                         " is past the end of the file", i, lay->snapshots_offset);
      break;
    }
    if ((r = snapshot_entry_read (img, off, &e)) < 0 ||
        (r = snapshot_entry_names (img, off, &e, &l[i].id, &l[i].name)) < 0)
      break;
    l[i].vm_state_size = e.vm_state_size;
    l[i].date_sec = e.date_sec;
    l[i].date_nsec = e.date_nsec;
    l[i].vm_clock_nsec = e.vm_clock_nsec;
    l[i].has_icount = e.has_icount;
    l[i].icount = e.icount;
  }
  if (r < 0) {
    q2_snapshots_free (l, lay->nb_snapshots);
    return r;
  }
  *list = l;
  return 0;
}

int q2_compact (struct q2_image *img, bool dry_run, q2_progress_fn progress,
                void *opaque, struct q2_compact_result *res)
{
  int r;

  if ((img->readonly || img->repair) && !dry_run)
    return -EROFS;
  if (!img->readonly && (r = refuse_changes (img)) < 0)
    return r;
  /* A move re-encrypts the cluster for its new place. */
  if (!dry_run && (r = refuse_without_key (img, "compact (moving data needs the key)")) < 0)
    return r;
  return compact_run (img, dry_run, progress, opaque, res);
}

/* LVM's default extent is 4 MiB: a volume reduced to less than a whole
 * number of them is rounded up by lvreduce anyway.
 */
#define LVM_EXTENT (UINT64_C (4) << 20)

/* The image's end as the allocator knows it can pass the last byte
 * written (a cluster written in part): the volume keeps both.
 */
static void device_stats (struct q2_image *img, struct q2_stats *s)
{
  uint64_t end = s->file_length > img->m.lay.file_end ? s->file_length : img->m.lay.file_end;

  if (!host_is_device (&img->m.hf))
    return;
  s->device_size = host_device_size (&img->m.hf);
  s->lvreduce_size = (end + LVM_EXTENT - 1) / LVM_EXTENT * LVM_EXTENT;
}

void q2_get_stats (struct q2_image *img, struct q2_stats *s)
{
  struct stat st;

  memset (s, 0, sizeof *s);
  if (host_stat (&img->m.hf, &st) == 0)
    s->host_allocated = (uint64_t) st.st_blocks * 512;
  if (host_size (&img->m.hf, &s->file_length) < 0)
    s->file_length = 0;
  LOCK_FOR_SCOPE (&img->m.lock);
  compact_stats (img, s);
  s->bytes_punched = host_bytes_released (&img->m.hf);
  s->clusters_freed = img->alloc.clusters_freed;
  s->l2_tables_freed = img->l2_tables_freed;
  s->refblocks_freed = img->alloc.refblocks_freed;
  s->truncations = img->truncations;
  s->bytes_truncated = img->bytes_truncated;
  s->bytes_given_back = host_bytes_given_back (&img->m.hf);
  s->bytes_trimmed = __atomic_load_n (&img->trims.asked, __ATOMIC_RELAXED);
  s->not_freed_snapshot = __atomic_load_n (&img->trims.snapshot, __ATOMIC_RELAXED);
  s->not_freed_backing = __atomic_load_n (&img->trims.backing, __ATOMIC_RELAXED);
  s->not_freed_small = __atomic_load_n (&img->trims.small, __ATOMIC_RELAXED);
  s->not_freed_already_free = __atomic_load_n (&img->trims.already_free, __ATOMIC_RELAXED);
  s->not_freed_compressed = __atomic_load_n (&img->trims.compressed, __ATOMIC_RELAXED);
  s->not_freed_encrypted = __atomic_load_n (&img->trims.encrypted, __ATOMIC_RELAXED);
  if (shrink_used_end (img, &s->image_end_offset) < 0)
    s->image_end_offset = 0;
  device_stats (img, s);
}
