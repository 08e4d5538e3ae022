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
    uint64_t old = l2_entry_get (img, e, layout_l2_index (lay, guest));
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

/* Extended L2 entries: the old contents of subcluster s of the cluster
 * m maps at guest g (not compressed).
 */
static int old_sub (struct q2_image *img, const struct mapping *m, uint64_t g, unsigned s,
                    char *out)
{
  const struct layout *lay = &img->m.lay;
  uint64_t scs = layout_sc_size (lay), guest = g + ((uint64_t) s << layout_sc_bits (lay)), host;
  int r;

  if (!((m->bitmap >> 32 >> s) & 1) && ((m->bitmap >> s) & 1)) {
    host = (m->entry & L2E_OFFSET_MASK) + ((uint64_t) s << layout_sc_bits (lay));
    r = crypto_pread (img->crypto, img->data, out, scs, host);
    return r < 0 ? request_io_error (img, "read", host, guest, r) : 0;
  }
  if (!((m->bitmap >> 32 >> s) & 1) && img->backing)
    return backing_read (img->backing, out, scs, guest);
  memset (out, 0, scs);
  return 0;
}

/* The subclusters s0 to s1 of the cluster at guest g, with len bytes of
 * the write at in on top of their old contents, into span.
 */
static int fill_span (struct q2_image *img, const struct mapping *m, uint64_t g,
                      unsigned s0, unsigned s1, const char *buf, uint64_t in, uint64_t len,
                      char *span)
{
  const struct layout *lay = &img->m.lay;
  uint64_t scs = layout_sc_size (lay), base = (uint64_t) s0 << layout_sc_bits (lay);
  int r = 0;

  if (m->entry & QCOW_OFLAG_COMPRESSED)
    r = compress_read (&img->m.hf, lay, m->entry, g, span);
  else {
    if (in & (scs - 1))
      r = old_sub (img, m, g, s0, span);
    if (r == 0 && (in + len) & (scs - 1) && (s1 > s0 || !(in & (scs - 1))))
      r = old_sub (img, m, g, s1, span + ((uint64_t) (s1 - s0) << layout_sc_bits (lay)));
  }
  if (r == 0)
    memcpy (span + (in - base), buf, len);
  return r;
}

/* What a new cluster replacing a shared one needs of it: the allocated
 * subclusters the write leaves, copied.
 */
static int copy_allocated (struct q2_image *img, const struct mapping *m, uint64_t g,
                           uint64_t keep, uint64_t target, char *sub)
{
  const struct layout *lay = &img->m.lay;
  uint64_t scs = layout_sc_size (lay), from = m->entry & L2E_OFFSET_MASK, o;
  unsigned s;
  int r;

  for (s = 0; s < L2_SUBCLUSTERS; s++) {
    if (!((keep >> s) & 1))
      continue;
    o = (uint64_t) s << layout_sc_bits (lay);
    if ((r = crypto_pread (img->crypto, img->data, sub, scs, from + o)) < 0)
      return request_io_error (img, "read", from + o, g + o, r);
    if ((r = crypto_pwrite (img->crypto, img->data, sub, scs, target + o)) < 0)
      return request_io_error (img, "write", target + o, g + o, r);
  }
  return 0;
}

/* The bitmap after subclusters span were written: allocated, not zero.
 * A compressed cluster was rewritten whole.
 */
static uint64_t written_bitmap (const struct mapping *m, uint64_t span)
{
  if (m->entry & QCOW_OFLAG_COMPRESSED)
    return L2_BITMAP_ALLOC;
  return (m->bitmap | span) & ~(span << 32);
}

/* A raw data file reads as the disk: the first write into a cluster with
 * nothing allocated leaves zeros in the subclusters it does not touch
 * (s0 to s1 it does), which read zeros through their bits, whatever was
 * written into the raw file behind the image's back.
 */
static int raw_zero_rest (struct q2_image *img, uint64_t g, unsigned s0, unsigned s1)
{
  const struct layout *lay = &img->m.lay;
  uint64_t a = (uint64_t) s0 << layout_sc_bits (lay);
  uint64_t b = (uint64_t) (s1 + 1) << layout_sc_bits (lay);
  uint64_t part[2][2] = { { 0, a }, { b, lay->cluster_size } };
  int i, r;

  for (i = 0; i < 2; i++) {
    uint64_t off = g + part[i][0], len = part[i][1] - part[i][0];
    if (len == 0 || (host_can_punch (img->data) && host_punch (img->data, off, len) == 0))
      continue;
    if ((r = host_zero (img->data, off, len)) < 0)
      return request_io_error (img, "zero", off, off, r);
  }
  return 0;
}

/* Extended L2 entries: a write into one cluster that cannot go in place
 * as it is.  Only the subclusters it touches are written (their untouched
 * parts from the old contents) and become allocated; the others keep what
 * they were, so no backing data is copied into them.  The cluster is ours
 * alone: written in place; else a new one, which gets a copy of what the
 * old one had allocated (a compressed one is rewritten whole).
 */
static int write_sub (struct q2_image *img, const struct mapping *m, const char *buf,
                      uint64_t offset, uint64_t len, bool *apply_frees)
{
  const struct layout *lay = &img->m.lay;
  uint64_t in = layout_in_cluster (lay, offset), g = offset - in, target, got, span;
  bool compressed = !!(m->entry & QCOW_OFLAG_COMPRESSED);
  bool has_host = !compressed && cluster_has_host (img, m->entry);
  /* A data file's clusters are ours alone, fixed at their guest offsets. */
  bool in_place = has_host && (m->copied || lay->data_file);
  bool fresh = !in_place && !lay->data_file;
  unsigned s0 = compressed ? 0 : in >> layout_sc_bits (lay);
  unsigned s1 = compressed ? L2_SUBCLUSTERS - 1 : (in + len - 1) >> layout_sc_bits (lay);
  uint64_t bytes = (uint64_t) (s1 - s0 + 1) << layout_sc_bits (lay);
  CLEANUP_FREE char *sbuf = malloc (bytes);
  struct cache_entry *e;
  int r = 0;

  if (!sbuf)
    return -ENOMEM;
  span = (s1 == 31 ? ~0u : (1u << (s1 + 1)) - 1) & ~((1u << s0) - 1);
  mutex_lock (&img->m.lock);
  if (in_place)
    target = m->entry & L2E_OFFSET_MASK;
  else if (lay->data_file)
    target = g;
  else if ((r = alloc_clusters (&img->alloc, 1, &target, &got)) == 0 && got < 1)
    r = -ENOSPC;
  mutex_unlock (&img->m.lock);
  if (r < 0)
    return r;

  if (lay->data_raw && !(m->bitmap & L2_BITMAP_ALLOC))
    r = raw_zero_rest (img, target, s0, s1);
  if (r == 0)
    r = fill_span (img, m, g, s0, s1, buf, in, len, sbuf);
  if (r == 0 && (r = crypto_pwrite (img->crypto, img->data, sbuf, bytes,
                                  target + ((uint64_t) s0 << layout_sc_bits (lay)))) < 0)
    request_io_error (img, "write", target + ((uint64_t) s0 << layout_sc_bits (lay)),
                      g + ((uint64_t) s0 << layout_sc_bits (lay)), r);
  if (r == 0 && fresh && has_host)
    r = copy_allocated (img, m, g, m->bitmap & L2_BITMAP_ALLOC & ~span, target, sbuf);

  mutex_lock (&img->m.lock);
  if (r == 0 && (r = l2_get_writable (img, g, &e)) == 0) {
    l2_entry_set (img, e, layout_l2_index (lay, g), target | QCOW_OFLAG_COPIED);
    l2_bitmap_set (img, e, layout_l2_index (lay, g), written_bitmap (m, span));
    l2_put (img, e);
    if (!in_place)
      r = cluster_unref_later (img, m->entry, false);
  }
  else if (fresh)
    alloc_release (&img->alloc, target, META_DATA, NULL);
  if (alloc_pending (&img->alloc) > PENDING_APPLY_THRESHOLD)
    *apply_frees = true;
  mutex_unlock (&img->m.lock);
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
    else if (img->m.lay.extl2) {
      uint64_t rest = img->m.lay.cluster_size - layout_in_cluster (&img->m.lay, offset);
      len = count < rest ? count : rest;
      r = write_sub (img, &m, buf, offset, len, apply_frees);
    }
    else
      r = write_new (img, &m, buf, offset, &len, apply_frees);
    buf = (const char *) buf + len;
    offset += len;
    count -= len;
  }
  return r;
}
