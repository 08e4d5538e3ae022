/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "qcow2-format.h"
#include "corrupt.h"
#include "engine.h"
#include "header.h"
#include "l2.h"

/* A table's note (cache_entry.note, DESIGN.md "Concurrency"): whether
 * the table is one run, each entry naming the cluster after the one
 * before from one host offset on, COPIED and nothing else set (what
 * qemu-img convert and preallocation leave).  A random request's entry is
 * a cache miss the prefetch cannot hide, and in such a table it is
 * computed instead.  The buffer stays the truth: every change through
 * l2_entry_set or l2_bitmap_set ends the run, and the cache zeroes the
 * note whenever it fills the buffer anew.  The whole table must be one
 * run, even past the end of the disk, so the note holds whichever L1
 * entry names the table.
 *
 * Until the table is looked at, the note counts lookups in units of
 * RUN_LOOK (below the lowest bit of a cluster offset), and the look comes
 * on the RUN_LOOKS_FIRST'th: when the cache is far smaller than the
 * tables and every random request reads one, a look at each table as it
 * was read (8,192 entries with 64 KiB clusters) cost a quarter of the
 * IOPS.
 */
#define RUN_NONE 1              /* looked at: not one run */
#define RUN_FROM 2              /* | the host offset of the first entry's cluster */
#define RUN_LOOK 4
#define RUN_LOOKS_FIRST 16

static uint64_t entry_in_buf (const struct layout *lay, const struct cache_entry *e,
                              uint64_t index)
{
  return be64_get ((const uint8_t *) e->buf + index * layout_l2_entry_bytes (lay));
}

static uint64_t run_of (const struct layout *lay, const struct cache_entry *e)
{
  uint64_t n = layout_l2_entries (lay), off = entry_in_buf (lay, e, 0), i;

  if (lay->extl2 || lay->data_file || !(off & QCOW_OFLAG_COPIED))
    return RUN_NONE;
  off &= ~QCOW_OFLAG_COPIED;
  if (off == 0 || (off & ~L2E_OFFSET_MASK) || (off & (lay->cluster_size - 1)))
    return RUN_NONE;
  for (i = 1; i < n; i++)
    if (entry_in_buf (lay, e, i) != ((off + (i << lay->cluster_bits)) | QCOW_OFLAG_COPIED))
      return RUN_NONE;
  return off | RUN_FROM;
}

/* Counts a lookup of a table not yet looked at, and looks at it when due. */
static void run_count_lookup (const struct layout *lay, struct cache_entry *e)
{
  uint64_t looks;

  if (e->note & (RUN_NONE | RUN_FROM))
    return;
  looks = e->note + RUN_LOOK;
  e->note = looks < RUN_LOOK * RUN_LOOKS_FIRST ? looks : run_of (lay, e);
}

uint64_t l2_entry_get (const struct q2_image *img, const struct cache_entry *e,
                       uint64_t index)
{
  const struct layout *lay = &img->m.lay;

  if (e->note & RUN_FROM)
    return ((e->note & ~(uint64_t) RUN_FROM) + (index << lay->cluster_bits)) |
      QCOW_OFLAG_COPIED;
  return entry_in_buf (lay, e, index);
}

void l2_entry_set (struct q2_image *img, struct cache_entry *e, uint64_t index, uint64_t v)
{
  assert (e->kind == META_L2 && e->pins > 0);
  be64_put ((uint8_t *) e->buf + index * layout_l2_entry_bytes (&img->m.lay), v);
  e->note = RUN_NONE;
  cache_mark_dirty (&img->m.cache, e);
}

uint64_t l2_bitmap_get (const struct q2_image *img, const struct cache_entry *e,
                        uint64_t index)
{
  if (!img->m.lay.extl2)
    return 0;
  return be64_get ((const uint8_t *) e->buf + index * 16 + 8);
}

void l2_bitmap_set (struct q2_image *img, struct cache_entry *e, uint64_t index,
                    uint64_t bitmap)
{
  assert (e->kind == META_L2 && e->pins > 0 && img->m.lay.extl2);
  be64_put ((uint8_t *) e->buf + index * 16 + 8, bitmap);
  e->note = RUN_NONE;
  cache_mark_dirty (&img->m.cache, e);
}

void l2_put (struct q2_image *img, struct cache_entry *e)
{
  cache_put (&img->m.cache, e);
}

/* The L2 offset in an L1 entry, checked before anything is read there. */
static int l1_entry_offset (struct q2_image *img, uint64_t guest, uint64_t *off)
{
  const struct layout *lay = &img->m.lay;
  uint64_t i = layout_l1_index (lay, guest);
  uint64_t e = table_get (&img->m.l1, i);
  uint64_t table_start = i << (lay->cluster_bits + lay->l2_bits);

  *off = e & L1E_OFFSET_MASK;
  if (*off == 0)
    return 0;
  if (e & L1E_RESERVED_MASK & ~QCOW_OFLAG_COPIED || *off & (lay->cluster_size - 1))
    return corrupt_error (lay, "L1 entry %" PRIu64 " (0x%" PRIx64 ") for guest offset 0x%"
                          PRIx64 " is not a valid L2 table offset", i, e, table_start);
  return corrupt_check_range (lay, *off, lay->cluster_size, META_L2, "L1 entry",
                              table_start);
}

/* The hint (engine.h, l2_hints) for the table of guest's L1 slot. */
static const void **hint_slot (struct q2_image *img, uint64_t guest)
{
  return &img->l2_hints[layout_l1_index (&img->m.lay, guest) % L2_HINTS];
}

int l2_get (struct q2_image *img, uint64_t guest, struct cache_entry **ep)
{
  uint64_t off;
  int r;

  assert (mutex_held (&img->m.lock));
  *ep = NULL;
  if ((r = l1_entry_offset (img, guest, &off)) < 0 || off == 0)
    return r;
  if ((r = cache_get (&img->m.cache, META_L2, off, ep)) < 0)
    return r;
  run_count_lookup (&img->m.lay, *ep);
  /* Stored only when it changed: a store on every lookup would move the
   * line between the CPUs that read it.  A table that is one run is never
   * loaded from, so it leaves nothing to prefetch.
   */
  const void **hint = hint_slot (img, guest);
  const void *want = (*ep)->note & RUN_FROM ? NULL : (*ep)->buf;
  if (__atomic_load_n (hint, __ATOMIC_RELAXED) != want)
    __atomic_store_n (hint, want, __ATOMIC_RELAXED);
  return 0;
}

/* A random request's L2 entry is a cache miss (the page-cache copies of
 * the requests before it evicted the table), and its load stalled the
 * lookup; issued here, the miss overlaps the range lock and the checks.
 * The table's buffer may have been evicted and reused since the hint was
 * stored: a prefetch of the wrong line is harmless, and of a freed one
 * too (prefetches do not fault).
 */
void l2_prefetch (struct q2_image *img, uint64_t guest)
{
  const struct layout *lay = &img->m.lay;
  const uint8_t *buf = __atomic_load_n (hint_slot (img, guest), __ATOMIC_RELAXED);

  if (buf)
    __builtin_prefetch (buf + layout_l2_index (lay, guest) * layout_l2_entry_bytes (lay));
}

int l2_get_writable (struct q2_image *img, uint64_t guest, struct cache_entry **ep)
{
  struct meta *m = &img->m;
  uint64_t i = layout_l1_index (&m->lay, guest);
  struct cache_entry *old = NULL, *e;
  uint64_t old_off, new_off;
  int r;

  assert (mutex_held (&m->lock));
  if ((r = l1_entry_offset (img, guest, &old_off)) < 0)
    return r;
  if (old_off && (table_get (&m->l1, i) & QCOW_OFLAG_COPIED))
    return cache_get (&m->cache, META_L2, old_off, ep);

  /* A new table, or a private copy of one shared with a snapshot. */
  if (old_off && (r = cache_get (&m->cache, META_L2, old_off, &old)) < 0)
    return r;
  r = alloc_contiguous (&img->alloc, 1, &new_off);
  if (r == 0)
    r = cache_get_new (&m->cache, META_L2, new_off, &e);
  if (r < 0) {
    if (old)
      cache_put (&m->cache, old);
    return r;
  }
  if (old) {
    memcpy (e->buf, old->buf, m->lay.cluster_size);
    cache_put (&m->cache, old);
    if ((r = alloc_free_later (&img->alloc, old_off, META_L2, false)) < 0) {
      cache_put (&m->cache, e);
      return r;
    }
  }
  if ((r = overlap_add (&m->lay.meta, new_off >> m->lay.cluster_bits, META_L2)) < 0) {
    cache_put (&m->cache, e);
    return r;
  }
  table_set (&m->l1, i, new_off | QCOW_OFLAG_COPIED);
  *ep = e;
  return 0;
}

int l2_move_table (struct q2_image *img, uint64_t l1i, bool *moved)
{
  struct meta *m = &img->m;
  uint64_t guest = l1i << (m->lay.cluster_bits + m->lay.l2_bits), off, where;
  int r;

  assert (mutex_held (&m->lock));
  *moved = false;
  if ((r = l1_entry_offset (img, guest, &off)) < 0 || !off)
    return r;
  /* A table shared with a snapshot is named by the snapshot's L1 too. */
  if (!(table_get (&m->l1, l1i) & QCOW_OFLAG_COPIED))
    return 0;
  if ((r = alloc_claim_below (&img->alloc, 1, off, &where)) < 0 || !where)
    return r;
  /* Nothing reaches the old place any more: lookups go through L1.  Its
   * unwritten changes are in the copy, which write-back puts on disk
   * before the L1 sector that names it.
   */
  if ((r = alloc_adopt_table (&img->alloc, META_L2, off, where)) < 0)
    return r;
  table_set (&m->l1, l1i, where | QCOW_OFLAG_COPIED);
  *moved = true;
  return alloc_free_later (&img->alloc, off, META_L2, false);
}

int l2_move_l1 (struct q2_image *img, bool *moved)
{
  struct meta *m = &img->m;
  uint64_t clusters = layout_clusters (&m->lay, m->lay.l1_entries * 8);
  uint64_t off = m->lay.l1_offset, where;
  bool synced, unsure = false;
  int r;

  assert (mutex_held (&m->lock));
  *moved = false;
  if (!clusters || m->failed)
    return m->failed ? -EIO : 0;
  if ((r = alloc_claim_below (&img->alloc, clusters, off, &where)) < 0 || !where)
    return r;
  /* Every table the L1 names is on disk before a copy of it is named by
   * the header (DESIGN.md, "Invariants").
   */
  if ((r = writeback_all (m, false, &synced)) < 0 ||
      (r = table_write_whole (&m->l1, where, clusters)) < 0 ||
      (r = host_sync (&m->hf)) < 0 ||
      (r = header_switch_table (&m->hf, &m->lay, HEADER_L1, where, off,
                                (uint32_t) m->lay.l1_entries, &unsure)) < 0) {
    /* Unsure which table the disk names: both stay, and nothing changes. */
    if (unsure)
      __atomic_store_n (&m->failed, true, __ATOMIC_RELEASE);
    else
      alloc_release_range (&img->alloc, where, clusters);
    return r;
  }
  m->lay.l1_offset = where;
  *moved = true;
  return alloc_release_range (&img->alloc, off, clusters);
}
