/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "log.h"
#include "vector.h"
#include "writeback.h"

DEFINE_VECTOR_TYPE (host_write_vector, struct host_write);
DEFINE_VECTOR_TYPE (entry_vector, struct cache_entry *);

struct batch {
  struct meta *m;
  struct host_write_vector w;
  struct entry_vector e;
};

static int collect (void *opaque, struct cache_entry *e)
{
  struct batch *b = opaque;
  struct host_write w = { e->buf, b->m->cache.entry_size, e->offset };
  int r;

  if ((r = host_write_vector_append (&b->w, w)) < 0 ||
      (r = entry_vector_append (&b->e, e)) < 0)
    return r;
  return 0;
}

/* Every dirty entry of one kind in one batch (io_uring when it can). */
static int write_kind (struct meta *m, enum meta_kind kind)
{
  struct batch b = { .m = m };
  size_t i;
  int r;

  if (!cache_any_dirty (&m->cache, kind))
    return 0;
  r = cache_for_each_dirty (&m->cache, kind, collect, &b);
  if (r == 0)
    r = host_pwrite_batch (&m->hf, b.w.ptr, b.w.len);
  if (r == 0)
    for (i = 0; i < b.e.len; i++)
      cache_mark_clean (&m->cache, b.e.ptr[i]);
  else
    log_error ("%s: cannot write back %s: %s", m->lay.name,
               kind == META_L2 ? "L2 tables" : "refcount blocks", strerror (-r));
  host_write_vector_reset (&b.w);
  entry_vector_reset (&b.e);
  return r;
}

/* Syncs when anything (data, evicted tables) was written since the last
 * sync: what a table about to be written relies on must be on disk first.
 */
static int sync_or_say (struct meta *m)
{
  int r;

  if (m->data && (r = host_sync_if_needed (m->data)) < 0) {
    log_error ("%s: cannot sync the external data file %s: %s", m->lay.name,
               m->data->name, strerror (-r));
    return r;
  }
  r = host_sync_if_needed (&m->hf);
  if (r < 0)
    log_error ("%s: cannot sync the image file: %s", m->lay.name, strerror (-r));
  return r;
}

int writeback_sync (struct meta *m)
{
  return sync_or_say (m);
}

/* A new refcount block must be on disk before the table entry naming it,
 * and both before any L2 entry that relies on the counts.
 */
int writeback_refcounts (struct meta *m)
{
  bool table = table_any_dirty (&m->reftable);
  int r;

  assert (mutex_held (&m->lock));
  if ((r = write_kind (m, META_REFBLOCK)) < 0)
    return r;
  if (table) {
    if ((r = sync_or_say (m)) < 0)
      return r;
    if ((r = table_write_dirty (&m->reftable, m->lay.reftable_offset)) < 0)
      return r;
  }
  return sync_or_say (m);
}

/* The cache's write-back of one entry it evicts.  A refcount block has no
 * dependency: increments may always reach the disk early, and decrements
 * are only made once the references they drop are gone on disk.
 */
static int evict (void *opaque, struct cache_entry *e)
{
  struct meta *m = opaque;
  int r;

  if (e->kind == META_L2 && (r = writeback_refcounts (m)) < 0)
    return r;
  r = host_pwrite (&m->hf, e->buf, m->cache.entry_size, e->offset);
  if (r < 0) {
    log_error ("%s: cannot write back metadata at 0x%" PRIx64 ": %s", m->lay.name,
               e->offset, strerror (-r));
    return r;
  }
  cache_mark_clean (&m->cache, e);
  return 0;
}

void writeback_init (struct meta *m)
{
  cache_set_writeback (&m->cache, evict, m);
}

bool writeback_needed (const struct meta *m)
{
  return cache_any_dirty (&m->cache, META_REFBLOCK) ||
    cache_any_dirty (&m->cache, META_L2) ||
    table_any_dirty (&m->reftable) || table_any_dirty (&m->l1);
}

int writeback_refused (const struct meta *m)
{
  if (!__atomic_load_n (&m->failed, __ATOMIC_ACQUIRE))
    return 0;
  log_error ("%s: refusing to change the image: a header switch could not be "
             "confirmed; stop the server and check the image", m->lay.name);
  return -EIO;
}

/* Sums of counters that only grow: equal means nothing was marked dirty. */
static uint64_t dirty_gen (const struct meta *m)
{
  return m->cache.dirty_gen + m->l1.dirty_gen + m->reftable.dirty_gen;
}

/* The flush's common case, with its sync outside the lock so that lookups
 * and in-place writes go on meanwhile: refcount blocks are written under
 * the lock, synced without it, and the L2 tables are written once the lock
 * is back if nothing was marked dirty in between.  Then every L2 entry
 * dirty now was dirty before that sync began, and so were the counts it
 * relies on, and its data was written before it was linked: the sync
 * covered them all.  Something marked dirty meanwhile (a new link, whose
 * data the sync may have missed) means another round; a dirty L1 or
 * refcount table (a new table, with syncs of its own between) means the
 * caller does it all under the lock.  The caller syncs the L2 tables.
 */
int writeback_all_sync_unlocked (struct meta *m, bool *done)
{
  uint64_t gen;
  int round, r;

  assert (mutex_held (&m->lock));
  *done = false;
  for (round = 0; round < 3; round++) {
    if (table_any_dirty (&m->l1) || table_any_dirty (&m->reftable))
      return 0;
    gen = dirty_gen (m);
    if ((r = write_kind (m, META_REFBLOCK)) < 0)
      return r;
    mutex_unlock (&m->lock);
    r = sync_or_say (m);
    mutex_lock (&m->lock);
    if (r < 0)
      return r;
    if ((r = writeback_refused (m)) < 0)  /* a header switch failed meanwhile */
      return r;
    if (dirty_gen (m) != gen)
      continue;
    assert (!cache_any_dirty (&m->cache, META_REFBLOCK));
    if ((r = write_kind (m, META_L2)) < 0)
      return r;
    *done = true;
    return 0;
  }
  return 0;
}

int writeback_all (struct meta *m, bool sync_anyway, bool *synced)
{
  bool l2 = cache_any_dirty (&m->cache, META_L2);
  bool l1 = table_any_dirty (&m->l1);
  int r;

  assert (mutex_held (&m->lock));
  *synced = false;
  if (!writeback_needed (m) && !sync_anyway)
    return 0;
  if ((r = writeback_refcounts (m)) < 0)
    return r;
  if (l2 || l1 || sync_anyway) {
    if ((r = write_kind (m, META_L2)) < 0)
      return r;
    /* A new L2 table must be on disk before the L1 entry pointing at it. */
    if (l1) {
      if ((r = sync_or_say (m)) < 0)
        return r;
      if ((r = table_write_dirty (&m->l1, m->lay.l1_offset)) < 0)
        return r;
    }
    if ((r = sync_or_say (m)) < 0)
      return r;
  }
  *synced = true;
  return 0;
}
