/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-format.h"
#include "alloc.h"
#include "corrupt.h"
#include "log.h"
#include "refcount.h"
#include "writeback.h"

void alloc_init (struct alloc *a, struct meta *m)
{
  memset (a, 0, sizeof *a);
  a->m = m;
}

void alloc_free (struct alloc *a)
{
  u64_vector_reset (&a->pending);
  u64_vector_reset (&a->fell_to_one);
}

static void note_end (struct alloc *a, uint64_t end)
{
  if (end > a->m->lay.file_end)
    a->m->lay.file_end = end;
}

static int is_free (struct alloc *a, uint64_t cluster, bool *freep)
{
  uint64_t rc;
  int r = refcount_get (a->m, cluster, &rc);

  *freep = rc == 0 && cluster != 0;
  return r;
}

/* Scans from the hint (or the floor); past the last refcount block
 * everything is free.
 */
static int find_run (struct alloc *a, uint64_t want, uint64_t *start, uint64_t *len)
{
  bool from_hint = a->free_hint >= a->floor;
  uint64_t c = from_hint ? a->free_hint : a->floor, run = 0;
  bool seen_free = !from_hint, f;
  int r;

  for (;;) {
    if (!refcount_covered (a->m, c)) {
      if (run == 0)
        *start = c;
      *len = want;
      return 0;
    }
    if ((r = is_free (a, c, &f)) < 0)
      return r;
    if (f) {
      seen_free = true;
      if (run == 0)
        *start = c;
      if (++run == want) {
        *len = run;
        return 0;
      }
    }
    else {
      if (!seen_free)
        a->free_hint = c + 1;
      run = 0;
    }
    c++;
  }
}

/* The end moves first: a new refcount block among the clusters is checked
 * against it when the counts go in.
 */
static int claim (struct alloc *a, uint64_t start, uint64_t n)
{
  uint64_t c;
  int r;

  note_end (a, (start + n) << a->m->lay.cluster_bits);
  for (c = start; c < start + n; c++)
    if ((r = refcount_set (a->m, c, 1)) < 0)
      return r;
  return 0;
}

int alloc_release_range (struct alloc *a, uint64_t offset, uint64_t n)
{
  uint64_t i;
  int r;

  for (i = 0; i < n; i++)
    if ((r = alloc_release (a, offset + (i << a->m->lay.cluster_bits), META_DATA, NULL)) < 0)
      return r;
  host_release (&a->m->hf, offset, n << a->m->lay.cluster_bits);
  return 0;
}

/* An image on a device cannot grow past the device: said with what would
 * have been needed, so the user knows to extend the volume.
 */
static int room (struct alloc *a, uint64_t start, uint64_t n)
{
  const struct meta *m = a->m;
  uint64_t limit = host_limit (&m->hf) >> m->lay.cluster_bits;

  if (start + n <= limit)
    return 0;
  log_error ("%s: the device is full: %" PRIu64 " new clusters at host offset 0x%"
             PRIx64 " would end past its %" PRIu64 " bytes; extend the volume "
             "(lvextend) or trim in the guest", m->lay.name, n,
             start << m->lay.cluster_bits, host_device_size (&m->hf));
  return -ENOSPC;
}

/* Makes sure cluster c's count has a block.  -EAGAIN: something was
 * allocated for that, so what the caller found free may no longer be.
 * A new block takes the lowest free cluster; when that cluster's own count
 * needs a block too, that one comes first (the recursion ends there: the
 * block then covers itself).
 */
static int ensure_block (struct alloc *a, uint64_t c)
{
  struct meta *m = a->m;
  uint64_t idx = c >> m->lay.rb_bits, off, old_off, old_n, w, len;
  int r;

  if (!refcount_covered (m, c)) {
    if ((r = refcount_grow_table (m, idx, &old_off, &old_n)) < 0)
      return r;
    /* The header no longer names the old table, so it can go at once. */
    return (r = alloc_release_range (a, old_off, old_n)) < 0 ? r : -EAGAIN;
  }
  if ((r = refcount_block_offset (m, idx, &off)) < 0)
    return r;
  if (off)
    return 0;
  if ((r = find_run (a, 1, &w, &len)) < 0)
    return r;
  if ((w >> m->lay.rb_bits) != idx && (r = ensure_block (a, w)) < 0)
    return r;
  if ((r = room (a, w, 1)) < 0)
    return r;
  if ((r = refcount_add_block (m, idx, w << m->lay.cluster_bits)) < 0 ||
      (r = claim (a, w, 1)) < 0)
    return r;
  return -EAGAIN;
}

/* Every cluster of [start, start + n) gets a refcount block. */
static int ensure_blocks (struct alloc *a, uint64_t start, uint64_t n)
{
  uint32_t rb = a->m->lay.rb_bits;
  uint64_t c;
  int r;

  for (c = start; c < start + n; c = ((c >> rb) + 1) << rb)
    if ((r = ensure_block (a, c)) < 0)
      return r;
  return 0;
}

static int alloc_run (struct alloc *a, uint64_t want, bool exact,
                      uint64_t *offset, uint64_t *got)
{
  uint64_t start, len, c;
  bool f;
  int r;

  assert (mutex_held (&a->m->lock));
  assert (want > 0);
  if (a->m->failed)
    return -EIO;
  do {
    if (exact)
      r = find_run (a, want, &start, &len);
    else {
      r = find_run (a, 1, &start, &len);
      /* Extend the run while the following clusters are free too. */
      for (len = 1; r == 0 && len < want; len++) {
        c = start + len;
        if (!refcount_covered (a->m, c))
          continue;
        if ((r = is_free (a, c, &f)) < 0 || !f)
          break;
      }
    }
    /* A run that need not be whole stops at the device's end. */
    c = host_limit (&a->m->hf) >> a->m->lay.cluster_bits;
    if (r == 0 && !exact && start < c && len > c - start)
      len = c - start;
    if (r == 0)
      r = room (a, start, len);
    if (r == 0)
      r = ensure_blocks (a, start, len);
  } while (r == -EAGAIN);
  if (r < 0 || (r = claim (a, start, len)) < 0)
    return r;
  *offset = start << a->m->lay.cluster_bits;
  *got = len;
  return 0;
}

int alloc_contiguous (struct alloc *a, uint64_t n, uint64_t *offset)
{
  uint64_t got;

  return alloc_run (a, n, true, offset, &got);
}

int alloc_clusters (struct alloc *a, uint64_t max, uint64_t *offset, uint64_t *got)
{
  return alloc_run (a, max, false, offset, got);
}

int alloc_set_count (struct alloc *a, uint64_t cluster, uint64_t value)
{
  int r;

  assert (mutex_held (&a->m->lock));
  if (a->m->failed)
    return -EIO;
  while ((r = ensure_block (a, cluster)) == -EAGAIN)
    ;
  return r < 0 ? r : refcount_set (a->m, cluster, value);
}

int alloc_release (struct alloc *a, uint64_t offset, enum meta_kind kind, bool *freed)
{
  struct meta *m = a->m;
  uint64_t cluster = offset >> m->lay.cluster_bits, rc;
  enum meta_kind held = overlap_kind (&m->lay.meta, cluster);
  int r;

  assert (mutex_held (&m->lock));
  assert (offset % m->lay.cluster_size == 0);
  if (freed)
    *freed = false;
  if (held != kind)
    return corrupt_error (&m->lay, "a reference to host offset 0x%" PRIx64 " as %s would "
                          "free %s", offset, metakind_name (kind), metakind_name (held));
  if ((r = refcount_get (m, cluster, &rc)) < 0)
    return r;
  if (rc == 0)
    return corrupt_error (&m->lay, "freeing host offset 0x%" PRIx64 ", whose refcount "
                          "is already 0", offset);
  if ((r = refcount_set (m, cluster, rc - 1)) < 0)
    return r;
  if (rc == 2 && kind == META_DATA)
    return u64_vector_append (&a->fell_to_one, cluster);
  if (rc > 1)
    return 0;
  /* A stale cached table must never be written over the cluster's next use. */
  cache_drop (&m->cache, offset);
  overlap_del (&m->lay.meta, cluster);
  if (cluster < a->free_hint)
    a->free_hint = cluster;
  a->clusters_freed++;
  a->shrink_wanted = true;
  if (freed)
    *freed = true;
  return 0;
}

/* The low bits of a pending offset (clusters are aligned): whether the
 * host range was punched already, and the kind of the reference.
 */
#define PENDING_PUNCHED 1ull
#define PENDING_KIND_SHIFT 1
#define PENDING_FLAGS 7ull

int alloc_free_later (struct alloc *a, uint64_t offset, enum meta_kind kind, bool punched)
{
  assert (mutex_held (&a->m->lock));
  assert ((offset & PENDING_FLAGS) == 0 && kind < META_KINDS);
  return u64_vector_append (&a->pending, offset | (punched ? PENDING_PUNCHED : 0) |
                            (uint64_t) kind << PENDING_KIND_SHIFT);
}

size_t alloc_pending (const struct alloc *a)
{
  return a->pending.len;
}

static int cmp_u64 (const void *x, const void *y)
{
  uint64_t a = *(const uint64_t *) x, b = *(const uint64_t *) y;
  return a < b ? -1 : a > b;
}

/* Sorted, so that clusters freed side by side are punched with one call. */
int alloc_apply_pending (struct alloc *a)
{
  struct meta *m = a->m;
  uint64_t run_start = 0, run_len = 0;
  bool freed;
  size_t i;
  int r = 0;

  assert (mutex_held (&m->lock));
  if (a->pending.len)
    qsort (a->pending.ptr, a->pending.len, sizeof (uint64_t), cmp_u64);
  for (i = 0; i < a->pending.len; i++) {
    uint64_t off = a->pending.ptr[i] & ~PENDING_FLAGS;
    enum meta_kind kind = (a->pending.ptr[i] & PENDING_FLAGS) >> PENDING_KIND_SHIFT;
    if ((r = alloc_release (a, off, kind, &freed)) < 0)
      break;
    if (!freed || (a->pending.ptr[i] & PENDING_PUNCHED))
      continue;
    if (run_len && run_start + run_len == off)
      run_len += m->lay.cluster_size;
    else {
      host_release (&m->hf, run_start, run_len);
      run_start = off;
      run_len = m->lay.cluster_size;
    }
  }
  host_release (&m->hf, run_start, run_len);
  /* What was not applied stays for the next attempt. */
  u64_vector_remove_front (&a->pending, i);
  return r;
}

int alloc_drop_empty_blocks (struct alloc *a)
{
  struct meta *m = a->m;
  uint64_t idx, dropped[64], n = 0, i, last, off;
  bool empty;
  int r = 0;

  assert (mutex_held (&m->lock));
  /* Block 0 counts the header, so it is never empty. */
  for (idx = 1; idx < m->reftable.size && n < 64; idx++) {
    if ((r = refcount_block_offset (m, idx, &off)) < 0)
      return r;
    if (!off)
      continue;
    if ((r = refcount_block_scan (m, idx, off >> m->lay.cluster_bits, &last, NULL, &empty)) < 0)
      return r;
    if (!empty)
      continue;
    table_set (&m->reftable, idx, 0);
    dropped[n++] = off;
  }
  if (n == 0)
    return 0;
  /* The table must stop naming a block before its cluster is reused. */
  if ((r = writeback_refcounts (m)) < 0)
    return r;
  for (i = 0; i < n; i++) {
    uint64_t c = dropped[i] >> m->lay.cluster_bits;
    cache_drop (&m->cache, dropped[i]);
    overlap_del (&m->lay.meta, c);
    /* A block counted elsewhere gives that count back; one that counted
     * itself is simply gone.
     */
    if (refcount_covered (m, c) && table_get (&m->reftable, c >> m->lay.rb_bits) &&
        (r = alloc_release (a, dropped[i], META_DATA, NULL)) < 0)
      return r;
    if (c < a->free_hint)
      a->free_hint = c;
    host_release (&m->hf, dropped[i], m->lay.cluster_size);
    a->refblocks_freed++;
  }
  return writeback_refcounts (m);
}

/* n clusters at the lowest free place, if that is below limit (a byte
 * offset); *offset is 0 when there is none, and nothing is claimed.
 */
static int claim_below (struct alloc *a, uint64_t n, uint64_t limit, uint64_t *offset)
{
  uint64_t where, start, len;
  int r;

  *offset = 0;
  /* Looked for first, so that no place is claimed (nor a refcount block
   * created for it) past the limit: a move must never grow the file.
   */
  if ((r = find_run (a, n, &start, &len)) < 0)
    return r;
  if ((start + n) << a->m->lay.cluster_bits > limit)
    return 0;
  if ((r = alloc_contiguous (a, n, &where)) < 0)
    return r;
  if (where + (n << a->m->lay.cluster_bits) <= limit) {
    *offset = where;
    return 0;
  }
  /* Claimed, but no lower: given back, a reference that never reached disk. */
  return alloc_release_range (a, where, n);
}

int alloc_move_block (struct alloc *a, uint64_t idx, bool *moved)
{
  struct meta *m = a->m;
  uint64_t off, where;
  int r;

  assert (mutex_held (&m->lock));
  *moved = false;
  if (m->failed)
    return -EIO;
  if ((r = refcount_block_offset (m, idx, &off)) < 0 || !off)
    return r;
  if ((r = claim_below (a, 1, off, &where)) < 0 || !where)
    return r;
  /* Copied after the claim: the claim may have counted the new place in
   * this very block.
   */
  /* The old place is dead from here on: counts change in the new one, and
   * the refcount table names the new one before the old is freed.
   */
  if ((r = refcount_block_offset (m, idx, &off)) < 0 ||
      (r = alloc_adopt_table (a, META_REFBLOCK, off, where)) < 0)
    return r;
  table_set (&m->reftable, idx, where);
  *moved = true;
  return alloc_free_later (a, off, META_REFBLOCK, false);
}

int alloc_adopt_table (struct alloc *a, enum meta_kind kind, uint64_t from, uint64_t to)
{
  struct meta *m = a->m;
  uint64_t c = to >> m->lay.cluster_bits;
  int r;

  assert (mutex_held (&m->lock));
  if ((r = overlap_add (&m->lay.meta, c, kind)) < 0 ||
      (r = cache_move (&m->cache, kind, from, to)) < 0) {
    overlap_del (&m->lay.meta, c);
    alloc_release (a, to, META_DATA, NULL);
    return r;
  }
  return 0;
}

int alloc_move_reftable (struct alloc *a, bool *moved)
{
  struct meta *m = a->m;
  uint64_t n = m->lay.reftable_clusters, off = m->lay.reftable_offset, where;
  int r;

  assert (mutex_held (&m->lock));
  *moved = false;
  if (m->failed)
    return -EIO;
  if ((r = claim_below (a, n, off, &where)) < 0 || !where)
    return r;
  if ((r = refcount_move_table (m, where)) < 0) {
    /* Unsure which table the disk names: both stay, and nothing changes. */
    if (!m->failed)
      alloc_release_range (a, where, n);
    return r;
  }
  *moved = true;
  /* The header no longer names the old place, and that is synced. */
  return alloc_release_range (a, off, n);
}

int alloc_claim_below (struct alloc *a, uint64_t n, uint64_t limit, uint64_t *offset)
{
  assert (mutex_held (&a->m->lock));
  return claim_below (a, n, limit, offset);
}
