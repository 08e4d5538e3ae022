#include <config.h>

#include <errno.h>
#include <string.h>

#include "image.h"
#include "refcount.h"
#include "alloc.h"
#include "header.h"
#include "reclaim.h"
#include "flush.h"
#include "l1.h"
#include "log.h"

/* Counts narrower than a byte are packed from the least significant bit;
 * wider ones are big-endian, as QEMU stores them.
 */
static uint64_t rb_read (const uint8_t *b, uint32_t order, uint64_t i)
{
  switch (order) {
  case 0: return (b[i / 8] >> (i % 8)) & 1;
  case 1: return (b[i / 4] >> (2 * (i % 4))) & 3;
  case 2: return (b[i / 2] >> (4 * (i % 2))) & 0xf;
  case 3: return b[i];
  case 4: return be16_get (b + 2 * i);
  case 5: return be32_get (b + 4 * i);
  default: return be64_get (b + 8 * i);
  }
}

static void rb_write (uint8_t *b, uint32_t order, uint64_t i, uint64_t v)
{
  unsigned shift, width;

  switch (order) {
  case 0: case 1: case 2:
    width = 1u << order;
    shift = (unsigned) (i % (8 / width)) * width;
    b[i * width / 8] = (uint8_t) ((b[i * width / 8] & ~(((1u << width) - 1) << shift)) |
                                  (v << shift));
    return;
  case 3: b[i] = (uint8_t) v; return;
  case 4: b[2 * i] = (uint8_t) (v >> 8); b[2 * i + 1] = (uint8_t) v; return;
  case 5: be32_put (b + 4 * i, (uint32_t) v); return;
  default: be64_put (b + 8 * i, v); return;
  }
}

static int block_offset (struct q2_image *img, uint64_t cluster, uint64_t *offset)
{
  uint64_t idx = cluster >> img->rb_bits;
  uint64_t e;
  int r;

  *offset = 0;
  if (idx >= img->reftable.size)
    return 0;
  e = img->reftable.entries[idx];
  *offset = e & REFT_OFFSET_MASK;
  if (*offset == 0)
    return 0;
  if (e & ~REFT_OFFSET_MASK || *offset & (img->cluster_size - 1))
    return q2_corrupt (img, "refcount table entry %" PRIu64 " (0x%" PRIx64
                       ") is not a valid cluster offset", idx, e);
  r = check_host_range (img, *offset, img->cluster_size, META_REFBLOCK,
                        "refcount table entry", UINT64_MAX);
  return r;
}

int refcount_get (struct q2_image *img, uint64_t cluster, uint64_t *value)
{
  struct cache_entry *e;
  uint64_t off;
  int r;

  *value = 0;
  if ((r = block_offset (img, cluster, &off)) < 0 || off == 0)
    return r;
  if ((r = cache_get (img, CACHE_REFBLOCK, off, &e)) < 0)
    return r;
  *value = rb_read (e->buf, img->refcount_order,
                    cluster & ((1ull << img->rb_bits) - 1));
  cache_put (e);
  return 0;
}

int refcount_set (struct q2_image *img, uint64_t cluster, uint64_t value)
{
  struct cache_entry *e;
  uint64_t off;
  int r;

  if ((r = block_offset (img, cluster, &off)) < 0)
    return r;
  if (off == 0)
    return q2_corrupt (img, "no refcount block covers host offset 0x%" PRIx64,
                       cluster << img->cluster_bits);
  if (value > img->refcount_max)
    return q2_corrupt (img, "the refcount of host offset 0x%" PRIx64
                       " would overflow %u bits", cluster << img->cluster_bits,
                       1u << img->refcount_order);
  if ((r = cache_get (img, CACHE_REFBLOCK, off, &e)) < 0)
    return r;
  rb_write (e->buf, img->refcount_order, cluster & ((1ull << img->rb_bits) - 1), value);
  cache_mark_dirty (&img->cache, e);
  cache_put (e);
  return 0;
}

/* A new refcount block takes the lowest free cluster.  If that cluster is
 * covered by the new block itself, the block records its own reference.
 */
static int create_block (struct q2_image *img, uint64_t idx)
{
  struct cache_entry *e;
  uint64_t where, self;
  int r;

  r = alloc_find_free (img, 1, &where);
  if (r < 0)
    return r;
  self = where >> img->cluster_bits;
  if ((self >> img->rb_bits) != idx) {
    /* Its count lives in another block, which may need creating first. */
    r = refcount_ensure_block (img, self);
    if (r != 0)
      return r < 0 ? r : 1;
  }
  r = cache_get_new (img, CACHE_REFBLOCK, where, &e);
  if (r < 0)
    return r;
  table_set (&img->reftable, idx, where);
  cache_put (e);
  if ((r = overlap_add (&img->meta, self, META_REFBLOCK)) < 0)
    return r;
  alloc_note_end (img, where + img->cluster_size);
  return refcount_set (img, self, 1);
}

/* The new table is allocated with the in-memory table already enlarged, so
 * any blocks it needs are created by the normal path; then blocks, table and
 * header go to disk in that order, each synced, and the old table is freed.
 */
static int grow_table (struct q2_image *img, uint64_t idx)
{
  uint64_t per_cluster = img->cluster_size / 8;
  uint64_t end_idx = (img->file_end >> img->cluster_bits) >> img->rb_bits;
  uint64_t want = (idx > end_idx ? idx : end_idx) * 2 + 2;
  uint64_t old_offset = img->reftable.offset, old_clusters = img->reftable_clusters;
  uint64_t old_size = img->reftable.size;
  uint64_t new_clusters, where = 0, i;
  int r;

  if (img->growing_reftable)
    return q2_corrupt (img, "the refcount table cannot cover its own growth");
  new_clusters = (want + per_cluster - 1) / per_cluster;
  if ((new_clusters << img->cluster_bits) > QCOW2_MAX_REFTABLE_BYTES) {
    q2_error ("%s: the refcount table would exceed %u MiB; the image cannot grow further",
              img->name, QCOW2_MAX_REFTABLE_BYTES >> 20);
    return -ENOSPC;
  }
  img->growing_reftable = true;
  r = table_resize (&img->reftable, new_clusters * per_cluster);
  if (r == 0)
    r = alloc_contiguous (img, new_clusters, &where);
  if (r == 0)
    r = flush_refcount_blocks (img);
  if (r == 0) {
    img->reftable.offset = where;
    img->reftable.disk_size = img->reftable.size;
    for (i = 0; i < img->reftable.size; i += TABLE_SECTOR_ENTRIES)
      img->reftable.dirty[i / TABLE_SECTOR_ENTRIES] = 1;
    r = table_write_dirty (img, &img->reftable, "refcount table");
  }
  if (r == 0)
    r = host_sync (&img->hf);
  if (r == 0)
    r = header_write_reftable (img, where, (uint32_t) new_clusters);
  if (r == 0)
    r = host_sync (&img->hf);
  img->growing_reftable = false;
  if (r < 0) {
    /* The old table stays in charge; what was allocated meanwhile leaks. */
    q2_error ("%s: growing the refcount table failed: %s", img->name, strerror (-r));
    img->reftable.offset = old_offset;
    img->reftable.disk_size = old_size;
    table_resize (&img->reftable, old_size);
    return r;
  }
  img->reftable_clusters = new_clusters;
  q2_debug ("%s: refcount table moved to 0x%" PRIx64 " (%" PRIu64 " clusters)",
            img->name, where, new_clusters);
  /* The header no longer points at the old table, so it can go at once. */
  for (i = 0; i < old_clusters; i++)
    if ((r = alloc_release (img, old_offset + (i << img->cluster_bits), META_NONE)) < 0)
      return r;
  reclaim_punch (img, old_offset, old_clusters << img->cluster_bits);
  return 1;
}

int refcount_ensure_block (struct q2_image *img, uint64_t cluster)
{
  uint64_t idx = cluster >> img->rb_bits;
  uint64_t off;
  int changed = 0, r;

  if (idx >= img->reftable.size) {
    if ((r = grow_table (img, idx)) < 0)
      return r;
    changed = 1;
  }
  if ((r = block_offset (img, cluster, &off)) < 0)
    return r;
  if (off != 0)
    return changed;
  r = create_block (img, idx);
  return r < 0 ? r : 1;
}

/* Works on bytes, so that mostly-empty blocks cost a memory scan rather
 * than one lookup per count; only non-zero bytes are decoded.
 */
int refcount_block_scan (struct q2_image *img, uint64_t idx, uint64_t self,
                         uint64_t *last, bool *only_self)
{
  uint64_t per_byte_bits = 1u << img->refcount_order, first = idx << img->rb_bits;
  uint64_t off = img->reftable.entries[idx] & REFT_OFFSET_MASK, b, i;
  struct cache_entry *e;
  const uint8_t *buf;
  int r;

  *last = UINT64_MAX;
  *only_self = true;
  if ((r = cache_get (img, CACHE_REFBLOCK, off, &e)) < 0)
    return r;
  buf = e->buf;
  for (b = 0; b < img->cluster_size; b++) {
    if (!buf[b])
      continue;
    /* The counts that share (or span) byte b. */
    uint64_t lo = b * 8 / per_byte_bits, hi = ((b + 1) * 8 + per_byte_bits - 1) / per_byte_bits;
    for (i = lo; i < hi; i++) {
      uint64_t v = rb_read (buf, img->refcount_order, i);
      if (!v)
        continue;
      *last = first + i;
      if (first + i != self || v != 1)
        *only_self = false;
    }
  }
  cache_put (e);
  return 0;
}
