/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-format.h"
#include "cleanup.h"
#include "corrupt.h"
#include "header.h"
#include "log.h"
#include "refcount.h"
#include "writeback.h"

uint64_t refcount_block_get (const void *block, uint32_t order, uint64_t i)
{
  const uint8_t *b = block;

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

void refcount_block_put (void *block, uint32_t order, uint64_t i, uint64_t v)
{
  uint8_t *b = block;
  unsigned shift, width;

  assert (order >= 6 || v < (1ull << (1u << order)));
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

bool refcount_covered (const struct meta *m, uint64_t cluster)
{
  return (cluster >> m->lay.rb_bits) < m->reftable.size;
}

int refcount_block_offset (struct meta *m, uint64_t idx, uint64_t *offset)
{
  uint64_t e = table_get (&m->reftable, idx);

  *offset = e & REFT_OFFSET_MASK;
  /* Reserved bits are corruption even without an offset: a block is
   * only ever added where the entry is exactly zero.
   */
  if (e & ~REFT_OFFSET_MASK || *offset & (m->lay.cluster_size - 1)) {
    *offset = 0;
    return corrupt_error (&m->lay, "refcount table entry %" PRIu64 " (0x%" PRIx64
                          ") is not a valid cluster offset", idx, e);
  }
  if (*offset == 0)
    return 0;
  return corrupt_check_range (&m->lay, *offset, m->lay.cluster_size, META_REFBLOCK,
                              "refcount table entry", UINT64_MAX);
}

static uint64_t index_in_block (const struct meta *m, uint64_t cluster)
{
  return cluster & ((1ull << m->lay.rb_bits) - 1);
}

int refcount_get (struct meta *m, uint64_t cluster, uint64_t *value)
{
  struct cache_entry *e;
  uint64_t off;
  int r;

  assert (mutex_held (&m->lock));
  *value = 0;
  if (!refcount_covered (m, cluster))
    return 0;
  if ((r = refcount_block_offset (m, cluster >> m->lay.rb_bits, &off)) < 0 || off == 0)
    return r;
  if ((r = cache_get (&m->cache, META_REFBLOCK, off, &e)) < 0)
    return r;
  *value = refcount_block_get (e->buf, m->lay.refcount_order, index_in_block (m, cluster));
  cache_put (&m->cache, e);
  return 0;
}

int refcount_set (struct meta *m, uint64_t cluster, uint64_t value)
{
  struct cache_entry *e;
  uint64_t off = 0;
  int r;

  assert (mutex_held (&m->lock));
  if (refcount_covered (m, cluster) &&
      (r = refcount_block_offset (m, cluster >> m->lay.rb_bits, &off)) < 0)
    return r;
  if (off == 0)
    return corrupt_error (&m->lay, "no refcount block covers host offset 0x%" PRIx64,
                          cluster << m->lay.cluster_bits);
  if (value > m->lay.refcount_max)
    return corrupt_error (&m->lay, "the refcount of host offset 0x%" PRIx64
                          " would overflow %u bits", cluster << m->lay.cluster_bits,
                          1u << m->lay.refcount_order);
  if ((r = cache_get (&m->cache, META_REFBLOCK, off, &e)) < 0)
    return r;
  refcount_block_put (e->buf, m->lay.refcount_order, index_in_block (m, cluster), value);
  cache_mark_dirty (&m->cache, e);
  cache_put (&m->cache, e);
  return 0;
}

int refcount_add_block (struct meta *m, uint64_t idx, uint64_t where)
{
  struct cache_entry *e;
  int r;

  assert (mutex_held (&m->lock));
  assert (table_get (&m->reftable, idx) == 0);
  if ((r = cache_get_new (&m->cache, META_REFBLOCK, where, &e)) < 0)
    return r;
  cache_put (&m->cache, e);
  if ((r = overlap_add (&m->lay.meta, where >> m->lay.cluster_bits, META_REFBLOCK)) < 0)
    return r;
  /* The block is dirty in the cache: write-back puts it on disk before
   * the table sector naming it.
   */
  table_set (&m->reftable, idx, where);
  return 0;
}

/* Growth, as QEMU's qcow2_refcount_area does it.  The new table and the
 * refcount blocks needed to count it go into an area of free clusters at
 * the end of the file, and the area counts itself: its new blocks hold the
 * counts of their own clusters and of the table.  Nothing is taken from
 * the allocator, so growth never recurses into itself, and the in-memory
 * table stays the old one until the header names the new one:
 *
 *   new blocks and the area's counts in old blocks -> sync
 *     -> new table -> sync -> header (one sector) -> sync -> switch
 *
 * A crash before the header write leaves the old table in charge and the
 * area leaked; after it, the new table, which holds every old entry.
 */
struct area {
  uint64_t start;             /* first cluster */
  uint64_t nblocks;           /* new refcount blocks, at start */
  uint64_t table_clusters;    /* then the table */
};

static bool block_missing (const struct meta *m, uint64_t idx)
{
  return idx >= m->reftable.size || m->reftable.entries[idx] == 0;
}

static uint64_t missing_blocks (const struct meta *m, uint64_t start, uint64_t n)
{
  uint64_t idx, count = 0;

  for (idx = start >> m->lay.rb_bits; idx <= (start + n - 1) >> m->lay.rb_bits; idx++)
    count += block_missing (m, idx);
  return count;
}

/* An area of free clusters from the end of the file that holds its blocks
 * and the table, and the blocks that cover all of it.
 */
static int find_area (struct meta *m, uint64_t table_clusters, struct area *a)
{
  uint64_t nblocks = 0, more, c, rc;
  int r;

  a->start = layout_clusters (&m->lay, m->lay.file_end);
  for (;;) {
    uint64_t n = nblocks + table_clusters;
    /* Clusters past the end of the file are free, unless a leak says
     * otherwise: never count over a non-zero count.
     */
    for (c = a->start; c < a->start + n; c++) {
      if ((r = refcount_get (m, c, &rc)) < 0)
        return r;
      if (rc)
        break;
    }
    if (c < a->start + n) {
      a->start = c + 1;
      continue;
    }
    more = missing_blocks (m, a->start, n);
    if (more == nblocks)
      break;
    nblocks = more;
  }
  a->nblocks = nblocks;
  a->table_clusters = table_clusters;
  if (a->start + nblocks + table_clusters <= host_limit (&m->hf) >> m->lay.cluster_bits)
    return 0;
  log_error ("%s: the device is full: a larger refcount table at host offset 0x%"
             PRIx64 " would end past its %" PRIu64 " bytes; extend the volume (lvextend)",
             m->lay.name, a->start << m->lay.cluster_bits, host_device_size (&m->hf));
  return -ENOSPC;
}

/* Builds the new table and blocks in memory; counts the area in old blocks
 * through the cache (those changes are undone on failure).
 */
static int fill_area (struct meta *m, const struct area *a, uint64_t *entries,
                      uint64_t size, uint8_t *blocks)
{
  uint64_t cs = m->lay.cluster_size, n = a->nblocks + a->table_clusters, k = 0, c, idx;
  int r;

  memcpy (entries, m->reftable.entries, m->reftable.size * sizeof *entries);
  for (idx = a->start >> m->lay.rb_bits; idx <= (a->start + n - 1) >> m->lay.rb_bits; idx++)
    if (block_missing (m, idx)) {
      assert (idx < size && k < a->nblocks);
      entries[idx] = (a->start + k++) << m->lay.cluster_bits;
    }
  assert (k == a->nblocks);
  for (c = a->start; c < a->start + n; c++) {
    idx = c >> m->lay.rb_bits;
    if (block_missing (m, idx)) {
      uint64_t b = (entries[idx] >> m->lay.cluster_bits) - a->start;
      refcount_block_put (blocks + b * cs, m->lay.refcount_order, index_in_block (m, c), 1);
    }
    else if ((r = refcount_set (m, c, 1)) < 0)
      return r;
  }
  return 0;
}

static void unfill_area (struct meta *m, const struct area *a)
{
  uint64_t c;

  for (c = a->start; c < a->start + a->nblocks + a->table_clusters; c++)
    if (!block_missing (m, c >> m->lay.rb_bits))
      refcount_set (m, c, 0);
}

static int write_area (struct meta *m, const struct area *a, struct mem_table *t,
                       const uint8_t *blocks)
{
  uint64_t cs = m->lay.cluster_size, k;
  uint64_t table_off = (a->start + a->nblocks) << m->lay.cluster_bits;
  int r = 0;

  /* A cached table of a cluster freed long ago must not shadow a block. */
  for (k = 0; k < a->nblocks; k++)
    cache_drop (&m->cache, (a->start + k) << m->lay.cluster_bits);
  if (a->nblocks)
    r = host_pwrite (&m->hf, blocks, a->nblocks * cs, a->start << m->lay.cluster_bits);
  if (r < 0)
    log_error ("%s: cannot write new refcount blocks at 0x%" PRIx64 ": %s",
               m->lay.name, a->start << m->lay.cluster_bits, strerror (-r));
  if (r == 0)
    r = writeback_refcounts (m);
  if (r == 0)
    r = table_write_whole (t, table_off, a->table_clusters);
  if (r == 0)
    r = host_sync (&m->hf);
  return r;
}

/* The header names the new table; if that cannot be confirmed either way,
 * nothing may change the refcounts any more (DESIGN.md, "Invariants").
 */
static int switch_header (struct meta *m, uint64_t offset, uint64_t clusters)
{
  bool unsure;
  int r = header_switch_table (&m->hf, &m->lay, HEADER_REFTABLE, offset,
                               m->lay.reftable_offset, (uint32_t) clusters, &unsure);

  if (unsure)
    __atomic_store_n (&m->failed, true, __ATOMIC_RELEASE);
  return r;
}

int refcount_grow_table (struct meta *m, uint64_t idx, uint64_t *old_offset,
                         uint64_t *old_clusters)
{
  struct layout *lay = &m->lay;
  uint64_t per_cluster = lay->cluster_size / 8, k;
  uint64_t end_idx = (lay->file_end >> lay->cluster_bits) >> lay->rb_bits;
  uint64_t want = (idx > end_idx ? idx : end_idx) * 2 + 2;
  uint64_t table_clusters, size;
  struct mem_table grown;
  struct area a;
  int r;

  assert (mutex_held (&m->lock));
  for (;;) {
    table_clusters = (want + per_cluster - 1) / per_cluster;
    if ((table_clusters << lay->cluster_bits) > QCOW2_MAX_REFTABLE_BYTES) {
      log_error ("%s: the refcount table would exceed %u MiB; the image cannot grow further",
                 lay->name, QCOW2_MAX_REFTABLE_BYTES >> 20);
      return -ENOSPC;
    }
    if ((r = find_area (m, table_clusters, &a)) < 0)
      return r;
    /* The area itself must fall inside the new table. */
    uint64_t last = (a.start + a.nblocks + a.table_clusters - 1) >> lay->rb_bits;
    if (last < table_clusters * per_cluster && idx < table_clusters * per_cluster)
      break;
    want = (last > idx ? last : idx) * 2 + 2;
  }
  size = table_clusters * per_cluster;

  uint64_t *entries = calloc (size, sizeof *entries);
  CLEANUP_FREE uint8_t *blocks = calloc (a.nblocks ? a.nblocks : 1, lay->cluster_size);
  if (!entries || !blocks) {
    free (entries);
    return -ENOMEM;
  }
  if ((r = fill_area (m, &a, entries, size, blocks)) < 0)
    goto undo;
  /* Everything that can fail for lack of memory happens before the switch. */
  if ((r = table_init_entries (&grown, &m->hf, lay, "refcount table", entries, size)) < 0)
    goto undo;
  entries = NULL;
  for (k = 0; k < a.nblocks && r == 0; k++)
    r = overlap_add (&lay->meta, a.start + k, META_REFBLOCK);
  if (r == 0)
    r = write_area (m, &a, &grown, blocks);
  if (r == 0)
    r = switch_header (m, (a.start + a.nblocks) << lay->cluster_bits, a.table_clusters);
  if (r < 0 && m->failed) {
    /* Unsure which table the disk names.  As it is, both are consistent
     * (the area is counted in the blocks they share, and only the new one
     * names the new blocks), and nothing changes from here on.
     */
    table_free (&grown);
    return r;
  }
  if (r < 0) {
    for (k = 0; k < a.nblocks; k++)
      overlap_del (&lay->meta, a.start + k);
    table_free (&grown);
    goto undo;
  }

  *old_offset = lay->reftable_offset;
  *old_clusters = lay->reftable_clusters;
  table_free (&m->reftable);
  m->reftable = grown;
  lay->reftable_offset = (a.start + a.nblocks) << lay->cluster_bits;
  lay->reftable_clusters = a.table_clusters;
  uint64_t end = (a.start + a.nblocks + a.table_clusters) << lay->cluster_bits;
  if (end > lay->file_end)
    lay->file_end = end;
  log_debug ("%s: refcount table moved to 0x%" PRIx64 " (%" PRIu64 " clusters, %"
             PRIu64 " new refcount blocks)", lay->name, lay->reftable_offset,
             a.table_clusters, a.nblocks);
  return 0;

undo:
  free (entries);
  unfill_area (m, &a);
  log_error ("%s: growing the refcount table failed: %s", lay->name, strerror (-r));
  return r;
}

int refcount_move_table (struct meta *m, uint64_t where)
{
  struct layout *lay = &m->lay;
  uint64_t old = lay->reftable_offset;
  int r;

  assert (mutex_held (&m->lock));
  /* Every block, and the counts of the new place, before the table. */
  if ((r = writeback_refcounts (m)) < 0 ||
      (r = table_write_whole (&m->reftable, where, lay->reftable_clusters)) < 0 ||
      (r = host_sync (&m->hf)) < 0 ||
      (r = switch_header (m, where, lay->reftable_clusters)) < 0)
    return r;
  lay->reftable_offset = where;
  log_debug ("%s: refcount table moved from 0x%" PRIx64 " to 0x%" PRIx64,
             lay->name, old, where);
  return 0;
}

/* Works on bytes, so that mostly-empty blocks cost a memory scan rather
 * than one lookup per count; only non-zero bytes are decoded.
 */
int refcount_block_scan (struct meta *m, uint64_t idx, uint64_t self,
                         uint64_t *last, uint64_t *used, bool *only_self)
{
  uint64_t n = 0, next = 0;
  uint64_t bits = 1u << m->lay.refcount_order, first = idx << m->lay.rb_bits;
  uint64_t off, b, i;
  struct cache_entry *e;
  const uint8_t *buf;
  int r;

  *last = UINT64_MAX;
  *only_self = true;
  if ((r = refcount_block_offset (m, idx, &off)) < 0)
    return r;
  assert (off != 0);
  if ((r = cache_get (&m->cache, META_REFBLOCK, off, &e)) < 0)
    return r;
  buf = e->buf;
  for (b = 0; b < m->lay.cluster_size; b++) {
    if (!buf[b])
      continue;
    /* The counts that share (or span) byte b, each decoded once: a wide
     * count spans several bytes.
     */
    uint64_t lo = b * 8 / bits, hi = ((b + 1) * 8 + bits - 1) / bits;
    for (i = lo > next ? lo : next; i < hi; i++) {
      uint64_t v = refcount_block_get (buf, m->lay.refcount_order, i);
      if (!v)
        continue;
      n++;
      *last = first + i;
      if (first + i != self || v != 1)
        *only_self = false;
    }
    if (hi > next)
      next = hi;
  }
  cache_put (&m->cache, e);
  if (used)
    *used = n;
  return 0;
}
