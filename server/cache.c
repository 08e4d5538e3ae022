/* SPDX-License-Identifier: BSD-3-Clause */
/* A hash of entries by host offset and one LRU list.  Eviction takes the
 * least recently used unpinned entry, writing it back first through the
 * write-back function when dirty; when everything is pinned the cache
 * grows past its budget for a moment rather than fail a request (an
 * overflow entry, freed again when it is evicted).
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "corrupt.h"
#include "host.h"
#include "log.h"
#include "mutex.h"

/* Even a tiny budget keeps enough tables for one request's worth of work:
 * an L2 table, a couple of refcount blocks and whatever is pinned meanwhile.
 */
#define MIN_ENTRIES 16

int cache_init (struct meta_cache *c, struct hostfile *hf, const struct layout *lay,
                const struct mutex *lock, size_t bytes, size_t entry_size)
{
  memset (c, 0, sizeof *c);
  c->hf = hf;
  c->lay = lay;
  c->lock = lock;
  c->entry_size = entry_size;
  c->max_entries = bytes / entry_size;
  if (c->max_entries < MIN_ENTRIES)
    c->max_entries = MIN_ENTRIES;
  c->nbuckets = 64;
  while (c->nbuckets < c->max_entries * 2)
    c->nbuckets *= 2;
  c->buckets = calloc (c->nbuckets, sizeof *c->buckets);
  c->entries = calloc (c->max_entries, sizeof *c->entries);
  if (!c->buckets || !c->entries ||
      posix_memalign (&c->slab, 4096, c->max_entries * entry_size) != 0) {
    free (c->buckets);
    free (c->entries);
    c->buckets = NULL;
    c->entries = NULL;
    return -ENOMEM;
  }
  for (size_t i = 0; i < c->max_entries; i++) {
    c->entries[i].buf = (char *) c->slab + i * entry_size;
    c->entries[i].hnext = c->free;
    c->free = &c->entries[i];
  }
  c->lru.lru_next = c->lru.lru_prev = &c->lru;
  return 0;
}

void cache_set_writeback (struct meta_cache *c, cache_writeback_fn fn, void *opaque)
{
  c->writeback = fn;
  c->writeback_opaque = opaque;
}

static size_t bucket_of (const struct meta_cache *c, uint64_t offset)
{
  uint64_t h = offset * 0x9e3779b97f4a7c15ull;
  return (h >> 32) & (c->nbuckets - 1);
}

static void lru_unlink (struct cache_entry *e)
{
  e->lru_prev->lru_next = e->lru_next;
  e->lru_next->lru_prev = e->lru_prev;
}

static void lru_push_front (struct meta_cache *c, struct cache_entry *e)
{
  e->lru_next = c->lru.lru_next;
  e->lru_prev = &c->lru;
  c->lru.lru_next->lru_prev = e;
  c->lru.lru_next = e;
}

static void hash_remove (struct meta_cache *c, struct cache_entry *e)
{
  struct cache_entry **pp = &c->buckets[bucket_of (c, e->offset)];

  while (*pp != e)
    pp = &(*pp)->hnext;
  *pp = e->hnext;
}

void cache_mark_dirty (struct meta_cache *c, struct cache_entry *e)
{
  if (!e->dirty)
    c->ndirty[e->kind]++;
  e->dirty = true;
  c->dirty_gen++;
}

void cache_mark_clean (struct meta_cache *c, struct cache_entry *e)
{
  if (e->dirty) {
    assert (c->ndirty[e->kind] > 0);
    c->ndirty[e->kind]--;
  }
  e->dirty = false;
}

static void entry_free (struct meta_cache *c, struct cache_entry *e)
{
  cache_mark_clean (c, e);
  hash_remove (c, e);
  lru_unlink (e);
  c->nentries--;
  if (e->overflow) {
    free (e->buf);
    free (e);
    return;
  }
  e->hnext = c->free;
  c->free = e;
}

void cache_free (struct meta_cache *c)
{
  if (!c->buckets)
    return;
  while (c->lru.lru_next != &c->lru)
    entry_free (c, c->lru.lru_next);
  free (c->buckets);
  free (c->entries);
  free (c->slab);
  c->buckets = NULL;
  c->entries = NULL;
  c->slab = NULL;
}

static struct cache_entry *lookup (struct meta_cache *c, uint64_t offset)
{
  struct cache_entry *e;

  for (e = c->buckets[bucket_of (c, offset)]; e; e = e->hnext)
    if (e->offset == offset)
      return e;
  return NULL;
}

static int make_room (struct meta_cache *c)
{
  struct cache_entry *e;
  int r;

  if (c->nentries < c->max_entries)
    return 0;
  for (e = c->lru.lru_prev; e != &c->lru; e = e->lru_prev) {
    if (e->pins)
      continue;
    if (e->dirty) {
      /* The write-back must not need the cache: that would evict again. */
      assert (c->writeback && !c->evicting);
      c->evicting = true;
      r = c->writeback (c->writeback_opaque, e);
      c->evicting = false;
      if (r < 0)
        return r;
      assert (!e->dirty && !e->pins);
    }
    entry_free (c, e);
    return 0;
  }
  return 0;
}

static int insert (struct meta_cache *c, enum meta_kind kind, uint64_t offset,
                   struct cache_entry **ep)
{
  struct cache_entry *e;
  size_t b;
  int r;

  if ((r = make_room (c)) < 0)
    return r;
  if ((e = c->free) != NULL) {
    c->free = e->hnext;
    e->dirty = false;
  }
  else {
    /* Everything is pinned: past the budget, for as long as that lasts. */
    if (!(e = calloc (1, sizeof *e)))
      return -ENOMEM;
    if (posix_memalign (&e->buf, 4096, c->entry_size) != 0) {
      free (e);
      return -ENOMEM;
    }
    e->overflow = true;
  }
  e->offset = offset;
  e->kind = kind;
  e->note = 0;
  e->pins = 1;
  b = bucket_of (c, offset);
  e->hnext = c->buckets[b];
  c->buckets[b] = e;
  lru_push_front (c, e);
  c->nentries++;
  *ep = e;
  return 0;
}

int cache_get (struct meta_cache *c, enum meta_kind kind, uint64_t offset,
               struct cache_entry **ep)
{
  struct cache_entry *e;
  int r;

  assert (mutex_held (c->lock));
  assert (kind == META_L2 || kind == META_REFBLOCK);
  if ((e = lookup (c, offset)) != NULL) {
    if (e->kind != kind)
      return corrupt_error (c->lay, "%s at host offset 0x%" PRIx64 " is also used as %s",
                            kind == META_L2 ? "an L2 table" : "a refcount block",
                            offset, metakind_name (e->kind));
    lru_unlink (e);
    lru_push_front (c, e);
    e->pins++;
    *ep = e;
    return 0;
  }
  if ((r = insert (c, kind, offset, &e)) < 0)
    return r;
  r = host_pread (c->hf, e->buf, c->entry_size, offset);
  if (r < 0) {
    log_error ("%s: cannot read %s at host offset 0x%" PRIx64 ": %s", c->lay->name,
               kind == META_L2 ? "L2 table" : "refcount block", offset, strerror (-r));
    e->pins = 0;
    entry_free (c, e);
    return r;
  }
  *ep = e;
  return 0;
}

int cache_get_new (struct meta_cache *c, enum meta_kind kind, uint64_t offset,
                   struct cache_entry **ep)
{
  struct cache_entry *e;
  int r;

  assert (mutex_held (c->lock));
  assert (kind == META_L2 || kind == META_REFBLOCK);
  if ((e = lookup (c, offset)) != NULL) {
    /* A stale table of a freed cluster: reuse the slot. */
    cache_mark_clean (c, e);
    e->kind = kind;
    e->pins++;
  }
  else if ((r = insert (c, kind, offset, &e)) < 0)
    return r;
  memset (e->buf, 0, c->entry_size);
  e->note = 0;
  cache_mark_dirty (c, e);
  *ep = e;
  return 0;
}

void cache_put (struct meta_cache *c, struct cache_entry *e)
{
  assert (mutex_held (c->lock));
  assert (e->pins > 0);
  e->pins--;
}

int cache_move (struct meta_cache *c, enum meta_kind kind, uint64_t from, uint64_t to)
{
  struct cache_entry *old, *e;
  int r;

  if ((r = cache_get (c, kind, from, &old)) < 0)
    return r;
  if ((r = cache_get_new (c, kind, to, &e)) < 0) {
    cache_put (c, old);
    return r;
  }
  memcpy (e->buf, old->buf, c->entry_size);
  cache_mark_clean (c, old);
  cache_put (c, old);
  cache_put (c, e);
  return 0;
}

void cache_drop (struct meta_cache *c, uint64_t offset)
{
  struct cache_entry *e = lookup (c, offset);

  assert (mutex_held (c->lock));
  if (e && !e->pins)
    entry_free (c, e);
  else if (e)
    cache_mark_clean (c, e);
}

int cache_for_each_dirty (struct meta_cache *c, enum meta_kind kind,
                          cache_visit_fn fn, void *opaque)
{
  struct cache_entry *e;
  int r;

  assert (mutex_held (c->lock));
  if (!c->ndirty[kind])
    return 0;
  for (e = c->lru.lru_prev; e != &c->lru; e = e->lru_prev) {
    if (e->dirty && e->kind == kind && (r = fn (opaque, e)) < 0)
      return r;
  }
  return 0;
}

bool cache_any_dirty (const struct meta_cache *c, enum meta_kind kind)
{
  return c->ndirty[kind] > 0;
}
