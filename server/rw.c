/* Guest reads and writes: in-place where the cluster is ours alone, new
 * clusters (filled from the old contents) everywhere else.
 */
#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "image.h"
#include "alloc.h"
#include "backing.h"
#include "cluster.h"
#include "compress.h"
#include "flush.h"
#include "l2.h"
#include "log.h"
#include "rw.h"

/* Past this many deferred frees, write back early so they can apply. */
#define PENDING_FLUSH_THRESHOLD 4096

int check_request (struct q2_image *img, uint64_t count, uint64_t offset)
{
  if (offset > img->virtual_size || count > img->virtual_size - offset) {
    q2_error ("%s: request at 0x%" PRIx64 " for %" PRIu64 " bytes is beyond the "
              "virtual size %" PRIu64, img->name, offset, count, img->virtual_size);
    return -EINVAL;
  }
  return 0;
}

void lock_guest (struct q2_image *img, struct range_held *h, uint64_t count,
                        uint64_t offset, bool exclusive)
{
  uint64_t last = count ? offset + count - 1 : offset;
  range_lock (&img->guest_lock, h, offset >> img->cluster_bits,
              last >> img->cluster_bits, exclusive);
}

static int host_io_error (struct q2_image *img, const char *what, uint64_t host,
                          uint64_t guest, int r)
{
  q2_error ("%s: cannot %s host offset 0x%" PRIx64 " (guest offset 0x%" PRIx64 "): %s",
            img->name, what, host, guest, strerror (-r));
  return r;
}

static int read_run (struct q2_image *img, const struct mapping *m, char *buf,
                     uint64_t offset)
{
  uint64_t in = offset_in_cluster (img, offset);
  char *cbuf;
  int r = 0;

  switch (m->kind) {
  case MAP_UNALLOC:
    if (img->backing)
      return backing_read (img->backing, buf, m->bytes, offset);
    /* fall through */
  case MAP_ZERO_PLAIN:
  case MAP_ZERO_ALLOC:
    memset (buf, 0, m->bytes);
    return 0;
  case MAP_NORMAL:
    r = host_pread (&img->hf, buf, m->bytes, m->host);
    return r < 0 ? host_io_error (img, "read", m->host, offset, r) : 0;
  case MAP_COMPRESSED:
    if (!(cbuf = malloc (img->cluster_size)))
      return -ENOMEM;
    r = compressed_read_cluster (img, m->entry, offset - in, cbuf);
    if (r == 0)
      memcpy (buf, cbuf + in, m->bytes);
    free (cbuf);
    return r;
  }
  return -EIO;
}

int q2_read (struct q2_image *img, void *buf, uint64_t count, uint64_t offset)
{
  struct range_held h;
  struct mapping m;
  int r;

  if ((r = check_request (img, count, offset)) < 0)
    return r;
  lock_guest (img, &h, count, offset, false);
  while (count > 0 && r == 0) {
    if ((r = map_get_locked (img, offset, count, &m)) < 0)
      break;
    r = read_run (img, &m, buf, offset);
    buf = (char *) buf + m.bytes;
    offset += m.bytes;
    count -= m.bytes;
  }
  range_unlock (&img->guest_lock, &h);
  return r;
}

/* The old contents of cluster k of the run m, for what a write leaves. */
static int old_cluster (struct q2_image *img, const struct mapping *m, uint64_t k,
                        uint64_t guest, void *out)
{
  int r;

  switch (m->kind) {
  case MAP_UNALLOC:
    if (img->backing)
      return backing_read (img->backing, out, img->cluster_size, guest);
    /* fall through */
  case MAP_ZERO_PLAIN:
  case MAP_ZERO_ALLOC:
    memset (out, 0, img->cluster_size);
    return 0;
  case MAP_NORMAL: {
    uint64_t host = (m->entry & L2E_OFFSET_MASK) + (k << img->cluster_bits);
    r = host_pread (&img->hf, out, img->cluster_size, host);
    return r < 0 ? host_io_error (img, "read", host, guest, r) : 0;
  }
  case MAP_COMPRESSED:
    return compressed_read_cluster (img, m->entry, guest, out);
  }
  return -EIO;
}

static bool reads_zero (const struct q2_image *img, const struct mapping *m)
{
  return m->kind == MAP_ZERO_PLAIN || m->kind == MAP_ZERO_ALLOC ||
    (m->kind == MAP_UNALLOC && !img->backing);
}

/* One partially written cluster: old contents with the new bytes on top.
 * Where the old contents are zeros, the rest of the cluster becomes a hole
 * rather than written zeros, as QEMU does: less I/O and less host space.
 */
static int write_partial (struct q2_image *img, const struct mapping *m, uint64_t k,
                          uint64_t guest, uint64_t target, const char *data,
                          uint64_t in, uint64_t len, char *cbuf)
{
  int r;

  if (reads_zero (img, m) && !img->punch_unsupported &&
      host_punch (&img->hf, target, img->cluster_size) == 0) {
    r = host_pwrite (&img->hf, data, len, target + in);
    return r < 0 ? host_io_error (img, "write", target + in, guest + in, r) : 0;
  }
  r = old_cluster (img, m, k, guest, cbuf);

  if (r < 0)
    return r;
  memcpy (cbuf + in, data, len);
  r = host_pwrite (&img->hf, cbuf, img->cluster_size, target);
  return r < 0 ? host_io_error (img, "write", target, guest, r) : 0;
}

/* Writes len bytes at offset into n fresh clusters at target. */
static int fill_clusters (struct q2_image *img, const struct mapping *m, const char *buf,
                          uint64_t offset, uint64_t len, uint64_t target)
{
  uint64_t cs = img->cluster_size, in = offset_in_cluster (img, offset);
  uint64_t start = offset - in, end = in + len;
  uint64_t n = (end + cs - 1) >> img->cluster_bits, first = 0, last = n;
  char *cbuf = NULL;
  int r = 0;

  if (in || end % cs) {
    if (!(cbuf = malloc (cs)))
      return -ENOMEM;
  }
  if (in || (n == 1 && end < cs)) {
    uint64_t l = (n == 1 ? end : cs) - in;
    r = write_partial (img, m, 0, start, target, buf, in, l, cbuf);
    first = 1;
  }
  if (r == 0 && end % cs && n > first) {
    r = write_partial (img, m, n - 1, start + (n - 1) * cs, target + (n - 1) * cs,
                       buf + (n - 1) * cs - in, 0, end % cs, cbuf);
    last = n - 1;
  }
  if (r == 0 && last > first) {
    uint64_t host = target + first * cs;
    r = host_pwrite (&img->hf, buf + first * cs - in, (last - first) * cs, host);
    if (r < 0)
      host_io_error (img, "write", host, start + first * cs, r);
  }
  free (cbuf);
  return r;
}

int free_old_entry (struct q2_image *img, uint64_t entry, bool punched)
{
  uint64_t off, len, c;
  int r = 0;

  if (entry & QCOW_OFLAG_COMPRESSED) {
    compressed_extent (img, entry, &off, &len);
    for (c = off & ~(img->cluster_size - 1); c < off + len && r == 0; c += img->cluster_size)
      r = alloc_free_later (img, c, META_NONE, punched);
    return r;
  }
  off = entry & L2E_OFFSET_MASK;
  return off ? alloc_free_later (img, off, META_NONE, punched) : 0;
}

static int link_clusters (struct q2_image *img, uint64_t offset, uint64_t n,
                          uint64_t target, bool reuse)
{
  uint64_t i, start = offset - offset_in_cluster (img, offset);
  struct cache_entry *e;
  bool synced;
  int r = 0;

  for (i = 0; i < n && r == 0; i++) {
    uint64_t guest = start + (i << img->cluster_bits);
    if ((r = l2_table_get_writable (img, guest, &e)) < 0)
      break;
    uint64_t old = l2_entry_get (e, l2_index (img, guest));
    l2_entry_set (img, e, l2_index (img, guest),
                  (target + (i << img->cluster_bits)) | QCOW_OFLAG_COPIED);
    cache_put (e);
    if (!reuse)
      r = free_old_entry (img, old, false);
  }
  if (r == 0 && img->pending.n > PENDING_FLUSH_THRESHOLD)
    r = flush_metadata (img, &synced);
  return r;
}

/* A write to clusters that are not ours alone: new clusters, then link. */
static int write_new (struct q2_image *img, const struct mapping *m, const char *buf,
                      uint64_t offset, uint64_t *lenp)
{
  uint64_t in = offset_in_cluster (img, offset), len = *lenp;
  uint64_t n = (in + len + img->cluster_size - 1) >> img->cluster_bits, target, got, i;
  bool reuse = m->kind == MAP_ZERO_ALLOC && m->copied;
  int r = 0;

  pthread_mutex_lock (&img->meta_lock);
  if (reuse) {
    target = m->entry & L2E_OFFSET_MASK;
    got = 1;
  }
  else
    r = alloc_clusters (img, n, &target, &got);
  pthread_mutex_unlock (&img->meta_lock);
  if (r < 0)
    return r;
  if (got < n)
    len = (got << img->cluster_bits) - in;

  r = fill_clusters (img, m, buf, offset, len, target);

  pthread_mutex_lock (&img->meta_lock);
  if (r == 0)
    r = link_clusters (img, offset, got, target, reuse);
  else if (!reuse)
    for (i = 0; i < got; i++)
      alloc_release (img, target + (i << img->cluster_bits), META_NONE);
  pthread_mutex_unlock (&img->meta_lock);
  *lenp = len;
  return r;
}

int write_locked (struct q2_image *img, const void *buf, uint64_t count, uint64_t offset)
{
  struct mapping m;
  uint64_t len;
  int r = 0;

  while (count > 0 && r == 0) {
    if ((r = map_get_locked (img, offset, count, &m)) < 0)
      break;
    len = m.bytes;
    if (m.kind == MAP_NORMAL && m.copied) {
      r = host_pwrite (&img->hf, buf, len, m.host);
      if (r < 0)
        host_io_error (img, "write", m.host, offset, r);
    }
    else
      r = write_new (img, &m, buf, offset, &len);
    buf = (const char *) buf + len;
    offset += len;
    count -= len;
  }
  return r;
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
  struct range_held h;
  int r;

  if (img->readonly)
    return -EROFS;
  if ((r = check_request (img, count, offset)) < 0)
    return r;
  if (img->detect_zeroes && is_zero (buf, count)) {
    r = q2_zero (img, count, offset, (flags & Q2_FUA) |
                 (img->detect_zeroes == Q2_DETECT_ZEROES_UNMAP ? Q2_MAY_TRIM : 0));
    return r < 0 ? r : 0;
  }
  lock_guest (img, &h, count, offset, true);
  r = write_locked (img, buf, count, offset);
  if (r == 0 && (flags & Q2_FUA))
    r = q2_flush (img);
  range_unlock (&img->guest_lock, &h);
  return r;
}

int q2_flush (struct q2_image *img)
{
  bool synced = false;
  int r;

  if (img->readonly)
    return 0;
  pthread_mutex_lock (&img->meta_lock);
  r = flush_metadata (img, &synced);
  pthread_mutex_unlock (&img->meta_lock);
  /* Data alone needs no lock: sync outside it so lookups go on. */
  if (r == 0 && !synced && (r = host_sync_if_needed (&img->hf)) < 0)
    q2_error ("%s: cannot sync the image file: %s", img->name, strerror (-r));
  return r;
}
