/* SPDX-License-Identifier: BSD-3-Clause */
/* The data of a write reaches the host before the L2 entries that map it
 * change, and those only in memory: write-back puts them on disk after the
 * refcounts of the new clusters (writeback.h).  A crash in between leaves
 * the old mapping, and the new clusters leaked.
 */
#include <config.h>

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-format.h"
#include "backing.h"
#include "cleanup.h"
#include "cluster.h"
#include "compress.h"
#include "cow.h"
#include "crypto.h"
#include "engine.h"
#include "l2.h"
#include "request.h"

/* Deferred frees a writer leaves before it asks for them to be applied. */
#define PENDING_APPLY_THRESHOLD 4096

/* The old contents of cluster k of the run m, for what a write leaves. */
static int old_cluster (struct q2_image *img, const struct mapping *m, uint64_t k,
                        uint64_t guest, void *out)
{
  const struct layout *lay = &img->m.lay;
  int r;

  switch (m->kind) {
  case MAP_UNALLOC:
    if (img->backing)
      return backing_read (img->backing, out, lay->cluster_size, guest);
    /* fall through */
  case MAP_ZERO_PLAIN:
  case MAP_ZERO_ALLOC:
    memset (out, 0, lay->cluster_size);
    return 0;
  case MAP_NORMAL: {
    uint64_t host = (m->entry & L2E_OFFSET_MASK) + (k << lay->cluster_bits);
    r = crypto_pread (img->crypto, img->data, out, lay->cluster_size, host);
    return r < 0 ? request_io_error (img, "read", host, guest, r) : 0;
  }
  case MAP_COMPRESSED:
    return compress_read (&img->m.hf, lay, m->entry, guest, out);
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
 * Not in an encrypted image, where a hole does not decrypt to zeros.
 */
static int write_partial (struct q2_image *img, const struct mapping *m, uint64_t k,
                          uint64_t guest, uint64_t target, const char *data,
                          uint64_t in, uint64_t len, char *cbuf)
{
  uint64_t cs = img->m.lay.cluster_size;
  int r;

  if (reads_zero (img, m) && !img->crypto && host_can_punch (img->data) &&
      host_punch (img->data, target, cs) == 0) {
    r = host_pwrite (img->data, data, len, target + in);
    return r < 0 ? request_io_error (img, "write", target + in, guest + in, r) : 0;
  }
  if ((r = old_cluster (img, m, k, guest, cbuf)) < 0)
    return r;
  memcpy (cbuf + in, data, len);
  r = crypto_pwrite (img->crypto, img->data, cbuf, cs, target);
  return r < 0 ? request_io_error (img, "write", target, guest, r) : 0;
}

/* Writes len bytes at offset into the fresh clusters at target. */
static int fill_clusters (struct q2_image *img, const struct mapping *m, const char *buf,
                          uint64_t offset, uint64_t len, uint64_t target)
{
  const struct layout *lay = &img->m.lay;
  uint64_t cs = lay->cluster_size, in = layout_in_cluster (lay, offset);
  uint64_t start = offset - in, end = in + len;
  uint64_t n = (end + cs - 1) >> lay->cluster_bits, first = 0, last = n;
  CLEANUP_FREE char *cbuf = NULL;
  int r = 0;

  if ((in || end % cs) && !(cbuf = malloc (cs)))
    return -ENOMEM;
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
    r = crypto_pwrite (img->crypto, img->data, buf + first * cs - in, (last - first) * cs,
                       host);
    if (r < 0)
      request_io_error (img, "write", host, start + first * cs, r);
  }
  return r;
}

/* Points the n guest clusters from offset at the clusters from target. */
static int link_clusters (struct q2_image *img, uint64_t offset, uint64_t n,
                          uint64_t target, bool reuse)
{
  const struct layout *lay = &img->m.lay;
  uint64_t i, start = offset - layout_in_cluster (lay, offset);
  struct cache_entry *e;
  int r = 0;

  for (i = 0; i < n && r == 0; i++) {
    uint64_t guest = start + (i << lay->cluster_bits);
    if ((r = l2_get_writable (img, guest, &e)) < 0)
      break;
    uint64_t old = l2_entry_get (e, layout_l2_index (lay, guest));
    l2_entry_set (img, e, layout_l2_index (lay, guest),
                  (target + (i << lay->cluster_bits)) | QCOW_OFLAG_COPIED);
    l2_put (img, e);
    if (!reuse)
      r = cluster_unref_later (img, old, false);
  }
  return r;
}

/* A write to clusters that are not ours alone: new clusters, then link. */
static int write_new (struct q2_image *img, const struct mapping *m, const char *buf,
                      uint64_t offset, uint64_t *lenp, bool *apply_frees)
{
  const struct layout *lay = &img->m.lay;
  uint64_t in = layout_in_cluster (lay, offset), len = *lenp;
  uint64_t n = (in + len + lay->cluster_size - 1) >> lay->cluster_bits, target, got, i;
  bool reuse = (m->kind == MAP_ZERO_ALLOC && m->copied) || lay->data_file;
  int r = 0;

  mutex_lock (&img->m.lock);
  if (lay->data_file) {
    /* A data file's clusters are fixed at their guest offsets. */
    target = offset - in;
    got = n;
  }
  else if (reuse) {
    target = m->entry & L2E_OFFSET_MASK;
    got = 1;
  }
  else
    r = alloc_clusters (&img->alloc, n, &target, &got);
  mutex_unlock (&img->m.lock);
  if (r < 0)
    return r;
  if (got < n)
    len = (got << lay->cluster_bits) - in;

  r = fill_clusters (img, m, buf, offset, len, target);

  mutex_lock (&img->m.lock);
  if (r == 0)
    r = link_clusters (img, offset, got, target, reuse);
  else if (!reuse)
    for (i = 0; i < got; i++)
      alloc_release (&img->alloc, target + (i << lay->cluster_bits), META_DATA, NULL);
  if (alloc_pending (&img->alloc) > PENDING_APPLY_THRESHOLD)
    *apply_frees = true;
  mutex_unlock (&img->m.lock);
  *lenp = len;
  return r;
}

int cow_write (struct q2_image *img, const void *buf, uint64_t count, uint64_t offset,
               bool *apply_frees)
{
  struct mapping m;
  bool dummy;
  uint64_t len;
  int r = 0;

  if (!apply_frees)
    apply_frees = &dummy;
  *apply_frees = false;
  while (count > 0 && r == 0) {
    if ((r = cluster_map_locked (img, offset, count, &m)) < 0)
      break;
    len = m.bytes;
    if (m.kind == MAP_NORMAL && (m.copied || img->m.lay.data_file)) {
      r = crypto_pwrite (img->crypto, img->data, buf, len, m.host);
      if (r < 0)
        request_io_error (img, "write", m.host, offset, r);
    }
    else
      r = write_new (img, &m, buf, offset, &len, apply_frees);
    buf = (const char *) buf + len;
    offset += len;
    count -= len;
  }
  return r;
}
