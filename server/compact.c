/* SPDX-License-Identifier: BSD-3-Clause */
/* Compaction: the file's length follows what the guest uses.
 *
 * A pass measures the clusters in use (their refcounts) and the file's
 * length.  When the length is past the bound (used + 10% + 1 MiB), the
 * clusters from the target (used + 2% + one cluster) up are planned: the
 * format has no reverse map, so the active L2 tables are scanned for the
 * entries that name them, and the refcount table, the L1 table and the
 * header for the metadata there.  Then, from the highest down, each moves
 * to the lowest free cluster below it (move.c for data, l2.c and alloc.c
 * for tables, bitmap.c for persistent bitmaps), and the commit sequence cuts the freed end off.  Every move
 * is a copy-on-write in the engine's usual order, so a power cut leaves
 * one valid copy named; a stale plan is caught when the move looks again.
 *
 * Persistent bitmaps the image keeps current move too (bitmap.c does it,
 * in the same order).  What cannot move stays, and is counted by why:
 * compressed clusters (their bytes share host clusters), clusters and
 * tables shared with internal snapshots, the snapshots' own tables,
 * persistent bitmaps left as they are (disabled, in use at open, of a
 * kind we do not know), and counted clusters that nothing names (leaks).
 *
 * The worker paces itself to the rate bound, takes one guest cluster at a
 * time (a request to it waits for at most one copy) and the metadata lock
 * only for short steps, and commits once a window.  The first thing it
 * does, and every pass does, is punch free clusters that still hold host
 * space (copies made without --sparse, clusters QEMU freed without
 * punching).
 *
 * Test hook: QCOW2RECLAIM_COMPACT_EAGER=1 makes the worker look every
 * 50 ms and compact past any free cluster below the end, so that the
 * crash and kill tests meet moves at every moment.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qcow2-format.h"
#include "bitmap.h"
#include "cleanup.h"
#include "commit.h"
#include "compact.h"
#include "corrupt.h"
#include "engine.h"
#include "l2.h"
#include "log.h"
#include "move.h"
#include "refcount.h"
#include "shrink.h"
#include "snapshot.h"
#include "vector.h"

#define CHUNK_CLUSTERS (1u << 16)   /* tail clusters planned at once */
#define WAKE_MS 1000                /* how often the worker looks */
#define EAGER_WAKE_MS 50
/* The first pass reads every refcount block, taking the metadata lock for
 * each, and the lock is not fair: started at once, it kept a new
 * server's first read waiting behind it (41 ms to the first answer on a
 * 1 TiB image with 100 GiB allocated, 9 ms without the worker).
 */
#define FIRST_PASS_MS 250
#define ERROR_BACKOFF_SECONDS 30
#define MAX_MISSES 64               /* items in a row that did not move */

enum item_kind { ITEM_DATA, ITEM_L2, ITEM_BLOCK, ITEM_L1, ITEM_REFTABLE, ITEM_SNAPTABLE,
                 ITEM_BITMAP };

struct item {
  uint64_t cluster;           /* the highest host cluster it occupies */
  uint64_t arg;               /* guest offset, L1 index, refcount table index, or
                               * what bitmap.c calls a bitmap cluster's reference */
  enum item_kind kind;
};
DEFINE_VECTOR_TYPE (item_vector, struct item);

/* Ranked: a cluster gets the highest mark anything gives it.  Freeing: a
 * deferred free waits for it (a trim during the pass), so it is neither
 * moved nor pinned.
 */
enum mark { MARK_NONE, MARK_MOVABLE, MARK_FREEING, MARK_COMPRESSED, MARK_SHARED,
            MARK_SNAPSHOT, MARK_UNREFERENCED, MARK_BITMAP };
#define PINNED_KINDS (MARK_BITMAP - MARK_COMPRESSED + 1)

struct compact {
  bool automatic;
  bool eager;                 /* the test hook */
  uint64_t rate;
  pthread_t thread;
  bool started;
  /* lock guards stop; cond wakes the worker early (to stop). */
  pthread_mutex_t lock;
  pthread_cond_t cond;
  bool stop;
  /* Under the image's metadata lock. */
  uint64_t clusters_moved, bytes_moved, free_bytes_punched, pinned_bytes, target;
  uint64_t freed_seen;
  bool measured;
  void (*notify) (void *opaque, bool pass_end);   /* the worker's, may be NULL */
  void *notify_opaque;
};

struct plan {
  struct q2_image *img;
  uint64_t lo, hi;            /* host clusters [lo, hi) */
  uint8_t *marks;             /* enum mark per cluster of the window */
  struct item_vector items;
};

int compact_new (struct compact **cp, bool automatic, uint64_t rate,
                 void (*notify) (void *opaque, bool pass_end), void *opaque)
{
  struct compact *c = calloc (1, sizeof *c);

  if (!c)
    return -ENOMEM;
  c->automatic = automatic;
  c->rate = rate ? rate : Q2_DEFAULT_COMPACT_RATE;
  c->notify = notify;
  c->notify_opaque = opaque;
  const char *e = getenv ("QCOW2RECLAIM_COMPACT_EAGER");
  c->eager = e && *e == '1';
  pthread_mutex_init (&c->lock, NULL);
  /* The waits are timed on the monotonic clock, which the condition must
   * use too: on the default (realtime) clock, a monotonic deadline is long
   * past, every wait returns at once, and the worker spins.
   */
  pthread_condattr_t attr;
  pthread_condattr_init (&attr);
  pthread_condattr_setclock (&attr, CLOCK_MONOTONIC);
  pthread_cond_init (&c->cond, &attr);
  pthread_condattr_destroy (&attr);
  *cp = c;
  return 0;
}

void compact_free (struct compact *c)
{
  if (!c)
    return;
  assert (!c->started);
  pthread_cond_destroy (&c->cond);
  pthread_mutex_destroy (&c->lock);
  free (c);
}

/* Past this length, compaction starts by itself ... */
static uint64_t bound_of (const struct compact *c, uint64_t used)
{
  return c->eager ? used : used + used / 10 + (1u << 20);
}

/* ... and moves clusters until none is in use from here on. */
static uint64_t target_clusters (const struct compact *c, uint64_t used_clusters)
{
  return c->eager ? used_clusters : used_clusters + used_clusters / 50 + 1;
}

/* Clusters with a refcount, and the highest of them. */
static int measure (struct q2_image *img, uint64_t *used, uint64_t *last)
{
  struct meta *m = &img->m;
  uint64_t idx, off, n, l;
  bool only_self;
  int r = 0;

  *used = *last = 0;
  for (idx = 0; r == 0; idx++) {
    LOCK_FOR_SCOPE (&m->lock);
    if (idx >= m->reftable.size)
      break;
    if ((r = refcount_block_offset (m, idx, &off)) < 0 || !off)
      continue;
    if ((r = refcount_block_scan (m, idx, UINT64_MAX, &l, &n, &only_self)) < 0)
      break;
    *used += n;
    if (l != UINT64_MAX && l > *last)
      *last = l;
  }
  return r;
}

/* Free clusters that still hold host space are punched, data extent by
 * data extent, under the metadata lock so that none is claimed meanwhile.
 */
static int punch_free (struct q2_image *img, bool dry_run, uint64_t *bytes)
{
  struct meta *m = &img->m;
  uint64_t size, nclusters, per = 1ull << m->lay.rb_bits, idx, c, off;
  uint32_t cb = m->lay.cluster_bits;
  int r;

  *bytes = 0;
  if ((r = host_size (&m->hf, &size)) < 0)
    return r;
  nclusters = layout_clusters (&m->lay, size);
  for (idx = 0; idx * per < nclusters; idx++) {
    LOCK_FOR_SCOPE (&m->lock);
    struct cache_entry *e = NULL;
    uint64_t first = idx * per, end = first + per < nclusters ? first + per : nclusters;
    if (refcount_covered (m, first)) {
      if ((r = refcount_block_offset (m, idx, &off)) < 0)
        return r;
      if (off && (r = cache_get (&m->cache, META_REFBLOCK, off, &e)) < 0)
        return r;
    }
    for (c = first; c < end; ) {
      uint64_t run = c, d, h;
      while (c < end && c != 0 &&
             (!e || refcount_block_get (e->buf, m->lay.refcount_order, c - first) == 0))
        c++;
      /* [run, c) is free: punch the data in it. */
      for (uint64_t pos = run << cb, stop = c << cb < size ? c << cb : size; pos < stop; ) {
        if ((r = host_seek_data (&m->hf, pos, &d)) < 0 || d >= stop)
          break;
        if ((r = host_seek_hole (&m->hf, d, &h)) < 0)
          break;
        if (h > stop || h <= d)
          h = stop;
        if (!dry_run)
          host_release (&m->hf, d, h - d);
        *bytes += h - d;
        pos = h;
      }
      if (r < 0)
        break;
      if (c == run)
        c++;            /* a cluster in use */
    }
    if (e)
      cache_put (&m->cache, e);
    if (r < 0)
      return r;
  }
  return 0;
}

static uint8_t *mark_slot (struct plan *p, uint64_t cluster)
{
  return cluster >= p->lo && cluster < p->hi ? &p->marks[cluster - p->lo] : NULL;
}

/* A pin outranks a move: a cluster two entries name stays. */
static void mark (struct plan *p, uint64_t cluster, enum mark k)
{
  uint8_t *s = mark_slot (p, cluster);

  if (s && *s < k)
    *s = (uint8_t) k;
}

static int add_item (struct plan *p, uint64_t cluster, uint64_t arg, enum item_kind kind)
{
  struct item it = { cluster, arg, kind };

  return item_vector_append (&p->items, it);
}

/* A table of n clusters at offset: one item if any of it is in the window. */
static int plan_table (struct plan *p, uint64_t offset, uint64_t n, enum item_kind kind)
{
  uint64_t first = offset >> p->img->m.lay.cluster_bits, c;

  if (!n || first + n <= p->lo || first >= p->hi)
    return 0;
  for (c = first; c < first + n; c++)
    mark (p, c, MARK_MOVABLE);
  return add_item (p, first + n - 1, 0, kind);
}

static int plan_l2_entries (struct plan *p, uint64_t l1i, struct cache_entry *t)
{
  const struct layout *lay = &p->img->m.lay;
  uint64_t j, first = l1i << lay->l2_bits, cs = lay->cluster_size;
  int r;

  /* A data file's clusters stay at their guest offsets: only metadata moves. */
  if (lay->data_file)
    return 0;
  for (j = 0; j < layout_l2_entries (lay); j++) {
    uint64_t e = l2_entry_get (p->img, t, j), off = e & L2E_OFFSET_MASK, c, coff, clen;
    if (e & QCOW_OFLAG_COMPRESSED) {
      layout_compressed_extent (lay, e, &coff, &clen);
      for (c = coff >> lay->cluster_bits; c <= (coff + clen - 1) >> lay->cluster_bits; c++)
        mark (p, c, MARK_COMPRESSED);
      continue;
    }
    if (!off || off & (cs - 1) || e & L2E_RESERVED_MASK || !mark_slot (p, off >> lay->cluster_bits))
      continue;
    if (!(e & QCOW_OFLAG_COPIED)) {
      mark (p, off >> lay->cluster_bits, MARK_SHARED);
      continue;
    }
    mark (p, off >> lay->cluster_bits, MARK_MOVABLE);
    if ((r = add_item (p, off >> lay->cluster_bits, (first + j) << lay->cluster_bits,
                       ITEM_DATA)) < 0)
      return r;
  }
  return 0;
}

/* A kept bitmap's directory, table or data cluster (bitmap.c knows
 * which): movable, or waiting to be freed.
 */
static int plan_bitmap (void *opaque, uint64_t first, uint64_t n, uint64_t ref, bool freeing)
{
  struct plan *p = opaque;
  uint64_t c;

  for (c = first; c < first + n; c++)
    mark (p, c, freeing ? MARK_FREEING : MARK_MOVABLE);
  return freeing ? 0 : add_item (p, first + n - 1, ref, ITEM_BITMAP);
}

/* Tables first, then data in guest order: data goes to the lowest free
 * clusters one after another, so guest clusters that follow each other end
 * up side by side on the host (as far as the free space allows) instead of
 * in the reverse order of a top-down move.  There is always room below the
 * target for everything above it, so the order costs nothing in length.
 */
static int cmp_item (const void *x, const void *y)
{
  const struct item *a = x, *b = y;
  bool ad = a->kind == ITEM_DATA, bd = b->kind == ITEM_DATA;

  if (ad != bd)
    return ad ? 1 : -1;
  if (ad)
    return a->arg < b->arg ? -1 : a->arg > b->arg;
  return a->cluster < b->cluster ? 1 : a->cluster > b->cluster ? -1 : 0;
}

/* What lies in [lo, hi), and what can move.  The metadata lock is taken
 * for one table at a time, so guest requests go on meanwhile; what changes
 * under the plan is caught by the moves, which look again.
 */
static int plan_window (struct plan *p, uint64_t pinned[PINNED_KINDS])
{
  struct q2_image *img = p->img;
  struct meta *m = &img->m;
  const struct layout *lay = &m->lay;
  uint64_t i, off, rc, c;
  int r = 0;

  p->marks = calloc (p->hi - p->lo, 1);
  if (!p->marks)
    return -ENOMEM;
  {
    LOCK_FOR_SCOPE (&m->lock);
    if ((r = plan_table (p, lay->l1_offset, layout_clusters (lay, lay->l1_entries * 8),
                         ITEM_L1)) < 0 ||
        (r = plan_table (p, lay->reftable_offset, lay->reftable_clusters, ITEM_REFTABLE)) < 0)
      return r;
    uint64_t snap_bytes;
    if (lay->nb_snapshots && snapshot_table_bytes (img, &snap_bytes) == 0 && snap_bytes &&
        (r = plan_table (p, lay->snapshots_offset & ~(lay->cluster_size - 1),
                         layout_clusters (lay, snap_bytes + layout_in_cluster (lay, lay->snapshots_offset)),
                         ITEM_SNAPTABLE)) < 0)
      return r;
    for (i = 0; i < m->reftable.size; i++) {
      if (refcount_block_offset (m, i, &off) < 0 || !off || !mark_slot (p, off >> lay->cluster_bits))
        continue;
      mark (p, off >> lay->cluster_bits, MARK_MOVABLE);
      if ((r = add_item (p, off >> lay->cluster_bits, i, ITEM_BLOCK)) < 0)
        return r;
    }
  }
  for (i = 0; r == 0 && i < m->l1.size; i++) {
    LOCK_FOR_SCOPE (&m->lock);
    struct cache_entry *t;
    uint64_t e = table_get (&m->l1, i);
    bool quiet = corrupt_quiet (true);
    /* A table the requests would refuse is left alone. */
    r = l2_get (img, i << (lay->cluster_bits + lay->l2_bits), &t);
    corrupt_quiet (quiet);
    if (r == -EIO) {
      r = 0;
      continue;
    }
    if (r < 0 || !t)
      continue;
    off = e & L1E_OFFSET_MASK;
    if (mark_slot (p, off >> lay->cluster_bits)) {
      if (!(e & QCOW_OFLAG_COPIED))
        mark (p, off >> lay->cluster_bits, MARK_SHARED);
      else {
        mark (p, off >> lay->cluster_bits, MARK_MOVABLE);
        r = add_item (p, off >> lay->cluster_bits, i, ITEM_L2);
      }
    }
    if (r == 0)
      r = plan_l2_entries (p, i, t);
    l2_put (img, t);
  }
  {
    LOCK_FOR_SCOPE (&m->lock);
    if (r == 0)
      r = bitmap_clusters (img->bitmaps, p->lo, p->hi, plan_bitmap, p);
    for (i = 0; i < img->alloc.pending.len; i++)
      mark (p, img->alloc.pending.ptr[i] >> lay->cluster_bits, MARK_FREEING);
  }
  /* Counted clusters nothing active names: persistent bitmaps left as
   * they are, which stay where they are, the snapshots', or leaks.
   */
  for (c = p->lo; r == 0 && c < p->hi; c++) {
    uint8_t *s = mark_slot (p, c);
    if (*s != MARK_NONE)
      continue;
    LOCK_FOR_SCOPE (&m->lock);
    if ((r = refcount_get (m, c, &rc)) == 0 && rc)
      *s = overlap_kind (&lay->meta, c) == META_BITMAP ? MARK_BITMAP
        : lay->nb_snapshots ? MARK_SNAPSHOT : MARK_UNREFERENCED;
  }
  for (c = p->lo; r == 0 && c < p->hi; c++) {
    uint8_t k = *mark_slot (p, c);
    if (k >= MARK_COMPRESSED)
      pinned[k - MARK_COMPRESSED] += lay->cluster_size;
  }
  if (r == 0 && p->items.len)
    qsort (p->items.ptr, p->items.len, sizeof *p->items.ptr, cmp_item);
  return r;
}

/* Sleeps until bytes have taken their share of the rate since start, or
 * stop is asked; false then.
 */
static bool pace (struct compact *c, const struct timespec *start, uint64_t bytes)
{
  struct timespec now, until;
  bool stop;

  pthread_mutex_lock (&c->lock);
  clock_gettime (CLOCK_MONOTONIC, &now);
  uint64_t want_ns = (uint64_t) ((double) bytes * 1e9 / (double) c->rate);
  until.tv_sec = start->tv_sec + (time_t) (want_ns / 1000000000u);
  until.tv_nsec = start->tv_nsec + (long) (want_ns % 1000000000u);
  if (until.tv_nsec >= 1000000000L) {
    until.tv_sec++;
    until.tv_nsec -= 1000000000L;
  }
  while (!c->stop && (now.tv_sec < until.tv_sec ||
                      (now.tv_sec == until.tv_sec && now.tv_nsec < until.tv_nsec))) {
    pthread_cond_timedwait (&c->cond, &c->lock, &until);
    clock_gettime (CLOCK_MONOTONIC, &now);
  }
  stop = c->stop;
  pthread_mutex_unlock (&c->lock);
  return !stop;
}

static bool stopping (struct compact *c)
{
  bool stop;

  pthread_mutex_lock (&c->lock);
  stop = c->stop;
  pthread_mutex_unlock (&c->lock);
  return stop;
}

static int move_item (struct q2_image *img, const struct item *it, bool *moved,
                      uint64_t *bytes)
{
  const struct layout *lay = &img->m.lay;
  int r;

  *bytes = lay->cluster_size;
  if (it->kind == ITEM_DATA)
    return move_data (img, it->arg, it->cluster << lay->cluster_bits, moved);
  LOCK_FOR_SCOPE (&img->m.lock);
  switch (it->kind) {
  case ITEM_L2:
    return l2_move_table (img, it->arg, moved);
  case ITEM_BLOCK:
    return alloc_move_block (&img->alloc, it->arg, moved);
  case ITEM_L1:
    *bytes = layout_clusters (lay, lay->l1_entries * 8) << lay->cluster_bits;
    return l2_move_l1 (img, moved);
  case ITEM_REFTABLE:
    *bytes = lay->reftable_clusters << lay->cluster_bits;
    r = alloc_move_reftable (&img->alloc, moved);
    return r;
  case ITEM_SNAPTABLE:
    return snapshot_move_table (img, moved);
  case ITEM_BITMAP: {
    uint64_t n;
    r = bitmap_move (img->bitmaps, &img->alloc, it->arg, it->cluster, moved, &n);
    *bytes = n << lay->cluster_bits;
    return r;
  }
  default:
    return -EINVAL;
  }
}

static int commit (struct q2_image *img)
{
  bool synced;

  LOCK_FOR_SCOPE (&img->m.lock);
  return commit_run (img, &synced);
}

/* A file longer than its last cluster in use (left so by another program,
 * or by frees no flush has applied yet): the commit, then the cut, which
 * the commit does only when it freed something itself.
 */
static int cut_free_end (struct q2_image *img)
{
  bool synced;
  int r;

  LOCK_FOR_SCOPE (&img->m.lock);
  if ((r = commit_run (img, &synced)) < 0)
    return r;
  return shrink_truncate (img);
}

struct run {
  struct q2_image *img;
  bool dry_run, paced;
  q2_progress_fn progress;
  void *opaque;
  struct q2_compact_result *res;
  struct timespec start;
};

/* Plans [lo, hi) and moves what can move, from the top. */
static int compact_window (struct run *run, uint64_t lo, uint64_t hi, uint64_t *moved_bytes,
                           uint64_t *stuck)
{
  struct q2_image *img = run->img;
  struct compact *c = img->compact;
  struct plan p = { .img = img, .lo = lo, .hi = hi };
  uint64_t pinned[PINNED_KINDS] = { 0 }, total = 0, bytes, i, misses, before = *moved_bytes;
  struct q2_compact_result *res = run->res;
  bool moved;
  int r;

  *stuck = 0;
  r = plan_window (&p, pinned);
  if (r == 0) {
    res->pinned_compressed += pinned[0];
    res->pinned_shared += pinned[1];
    res->pinned_snapshot += pinned[2];
    res->pinned_unreferenced += pinned[3];
    res->pinned_bitmaps += pinned[4];
    for (i = hi; i-- > lo; ) {
      uint8_t k = p.marks[i - lo];
      if (k >= MARK_COMPRESSED) {
        *stuck = i + 1;
        break;
      }
    }
    total = p.items.len * img->m.lay.cluster_size;
  }
  for (i = 0, misses = 0; r == 0 && !run->dry_run && i < p.items.len; i++) {
    if (run->paced && !pace (c, &run->start, *moved_bytes))
      break;
    if ((r = move_item (img, &p.items.ptr[i], &moved, &bytes)) < 0)
      continue;
    /* An item that did not move went stale, or found no room below (guest
     * writes took it meanwhile): after a run of those, the plan is over.
     */
    if (!moved) {
      if (++misses == MAX_MISSES)
        break;
      continue;
    }
    misses = 0;
    *moved_bytes += bytes;
    res->clusters_moved += bytes >> img->m.lay.cluster_bits;
    res->bytes_moved += bytes;
    {
      LOCK_FOR_SCOPE (&img->m.lock);
      c->clusters_moved += bytes >> img->m.lay.cluster_bits;
      c->bytes_moved += bytes;
    }
    if (run->progress)
      run->progress (run->opaque, *moved_bytes, total > *moved_bytes ? total : *moved_bytes);
  }
  /* One commit for the window: it frees the old places and cuts the end.
   * A commit syncs the whole file under the metadata lock, which guest
   * writes feel (randwrite IOPS halved with a commit every 16 MiB moved),
   * so no more often than this.
   */
  if (r == 0 && *moved_bytes > before && (r = commit (img)) == 0 && run->paced &&
      c->notify)
    c->notify (c->notify_opaque, false);
  free (p.marks);
  item_vector_reset (&p.items);
  return r;
}

/* paced: the worker's pass, which also moves nothing unless the length
 * is past the bound.
 */
static int compact_pass (struct q2_image *img, bool dry_run, bool paced,
                         q2_progress_fn progress, void *opaque,
                         struct q2_compact_result *res)
{
  struct compact *c = img->compact;
  const struct layout *lay = &img->m.lay;
  struct run run = { .img = img, .dry_run = dry_run, .paced = paced, .progress = progress,
                     .opaque = opaque, .res = res };
  uint64_t used, last, size, target, hi, lo, moved = 0, stuck;
  int r;

  memset (res, 0, sizeof *res);
  clock_gettime (CLOCK_MONOTONIC, &run.start);
  /* Frees waiting for a flush are clusters the moves may use. */
  if (!dry_run && alloc_pending (&img->alloc) && (r = commit (img)) < 0)
    return r;
  if ((r = punch_free (img, dry_run, &res->free_bytes_punched)) < 0 ||
      (r = measure (img, &used, &last)) < 0 ||
      (r = host_size (&img->m.hf, &size)) < 0)
    return r;
  /* Counts past the end of the file name nothing that could move (a
   * damaged or hand-made refcount block): the plan ends at the file's end.
   */
  if (last >= layout_clusters (lay, size))
    last = size ? layout_clusters (lay, size) - 1 : 0;
  target = target_clusters (c, used);
  res->length_before = res->length_after = size;
  res->used = used << lay->cluster_bits;
  res->bound = bound_of (c, res->used);
  res->target = target << lay->cluster_bits;
  res->reachable = (last + 1) << lay->cluster_bits;
  {
    LOCK_FOR_SCOPE (&img->m.lock);
    c->target = res->target;
    c->free_bytes_punched += dry_run ? 0 : res->free_bytes_punched;
    c->measured = true;
  }
  if (paced && size <= res->bound)
    return 0;
  /* Nothing in use past the target: at most a free end to cut. */
  if (last + 1 <= target) {
    if (!dry_run && size > (last + 1) << lay->cluster_bits)
      r = cut_free_end (img);
    if (r == 0 && (r = host_size (&img->m.hf, &size)) == 0)
      res->length_after = size;
    return r;
  }
  /* From the top down, a window at a time. */
  hi = last + 1;
  uint64_t reach = target;
  while (r == 0 && hi > target) {
    lo = hi - target > CHUNK_CLUSTERS ? hi - CHUNK_CLUSTERS : target;
    r = compact_window (&run, lo, hi, &moved, &stuck);
    if (stuck > reach)
      reach = stuck;
    hi = lo;
    if (r == 0 && !dry_run && stopping (c))
      break;
  }
  res->reachable = (reach > target ? reach : target) << lay->cluster_bits;
  {
    LOCK_FOR_SCOPE (&img->m.lock);
    c->pinned_bytes = res->pinned_compressed + res->pinned_shared + res->pinned_snapshot +
      res->pinned_unreferenced + res->pinned_bitmaps;
  }
  if (r == 0 && (r = host_size (&img->m.hf, &size)) == 0)
    res->length_after = size;
  return r;
}

int compact_run (struct q2_image *img, bool dry_run, q2_progress_fn progress,
                 void *opaque, struct q2_compact_result *res)
{
  return compact_pass (img, dry_run, false, progress, opaque, res);
}

static bool wait_or_stop (struct compact *c, unsigned ms)
{
  struct timespec until;
  bool stop;

  clock_gettime (CLOCK_MONOTONIC, &until);
  until.tv_sec += ms / 1000;
  until.tv_nsec += (long) (ms % 1000) * 1000000L;
  if (until.tv_nsec >= 1000000000L) {
    until.tv_sec++;
    until.tv_nsec -= 1000000000L;
  }
  pthread_mutex_lock (&c->lock);
  while (!c->stop && pthread_cond_timedwait (&c->cond, &c->lock, &until) != ETIMEDOUT)
    ;
  stop = c->stop;
  pthread_mutex_unlock (&c->lock);
  return !stop;
}

/* Looks once a second; measures only when clusters were freed since it
 * last did, and compacts only past the bound.
 */
static void *worker (void *opaque)
{
  struct q2_image *img = opaque;
  struct compact *c = img->compact;
  struct q2_compact_result res;
  bool first = true;
  uint64_t freed;
  int r;

  while (wait_or_stop (c, first ? (c->eager ? 0 : FIRST_PASS_MS) :
                      c->eager ? EAGER_WAKE_MS : WAKE_MS)) {
    bool pending;
    {
      LOCK_FOR_SCOPE (&img->m.lock);
      freed = img->alloc.clusters_freed + img->alloc.refblocks_freed;
      pending = alloc_pending (&img->alloc) > 0;
    }
    if (!first && freed == c->freed_seen && !pending)
      continue;
    /* The first pass also punches what QEMU freed without punching, or a
     * copy made without --sparse holds.
     */
    first = false;
    c->freed_seen = freed;
    r = compact_pass (img, false, true, NULL, NULL, &res);
    if (r == 0 && c->notify && (res.bytes_moved || res.free_bytes_punched ||
                                res.length_after != res.length_before))
      c->notify (c->notify_opaque, true);
    if (r == 0 && res.bytes_moved)
      log_debug ("%s: compaction moved %" PRIu64 " bytes; length %" PRIu64 " -> %"
                 PRIu64 " (target %" PRIu64 ")", img->m.lay.name, res.bytes_moved,
                 res.length_before, res.length_after, res.target);
    if (r < 0) {
      log_error ("%s: compaction stopped: %s; it tries again in %d s",
                 img->m.lay.name, strerror (-r), ERROR_BACKOFF_SECONDS);
      if (!wait_or_stop (c, ERROR_BACKOFF_SECONDS * 1000))
        break;
    }
  }
  return NULL;
}

int compact_start (struct q2_image *img)
{
  struct compact *c = img->compact;
  int r;

  if (!c->automatic || img->readonly || c->started)
    return 0;
  c->stop = false;
  if ((r = pthread_create (&c->thread, NULL, worker, img)) != 0) {
    log_error ("%s: cannot start the compaction worker: %s", img->m.lay.name, strerror (r));
    return -r;
  }
  c->started = true;
  return 0;
}

void compact_stop (struct q2_image *img)
{
  struct compact *c = img->compact;

  if (!c || !c->started)
    return;
  pthread_mutex_lock (&c->lock);
  c->stop = true;
  pthread_cond_broadcast (&c->cond);
  pthread_mutex_unlock (&c->lock);
  pthread_join (c->thread, NULL);
  c->started = false;
}

void compact_stats (struct q2_image *img, struct q2_stats *s)
{
  struct compact *c = img->compact;

  assert (mutex_held (&img->m.lock));
  s->clusters_moved = c->clusters_moved;
  s->bytes_moved = c->bytes_moved;
  s->free_bytes_punched = c->free_bytes_punched;
  s->pinned_bytes = c->pinned_bytes;
  s->target_length = c->measured ? c->target : 0;
}
