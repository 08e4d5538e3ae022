/* SPDX-License-Identifier: BSD-3-Clause */
/* Metadata cache: cluster-sized L2 tables and refcount blocks, LRU-evicted
 * within a budget of entries.  The cache knows nothing of write ordering:
 * the layer above gives it a write-back function, which writes one dirty
 * entry with whatever must reach the disk before it (as QEMU's qcow2 cache
 * is given a dependency).  Callers hold the lock given at init.
 */
#ifndef Q2_CACHE_H
#define Q2_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "metakind.h"

struct hostfile;
struct layout;
struct mutex;

struct cache_entry {
  uint64_t offset;
  enum meta_kind kind;        /* META_L2 or META_REFBLOCK */
  bool dirty;
  unsigned pins;              /* users between get and put: never evicted */
  bool overflow;              /* allocated past the budget, freed on eviction */
  void *buf;
  /* The cache's user's own note about what buf holds; 0 whenever buf is
   * filled anew (read, zeroed or copied), so a note never outlives the
   * contents it describes.
   */
  uint64_t note;
  struct cache_entry *hnext;              /* hash chain */
  struct cache_entry *lru_prev, *lru_next;
};

/* Writes e back (and what it depends on) and marks it clean. */
typedef int (*cache_writeback_fn) (void *opaque, struct cache_entry *e);

struct meta_cache {
  struct hostfile *hf;
  const struct layout *lay;
  const struct mutex *lock;
  cache_writeback_fn writeback;
  void *writeback_opaque;
  bool evicting;              /* inside writeback: must not re-enter */
  size_t max_entries, nentries;
  /* The budget is allocated once, at init: max_entries buffers in one
   * slab and their entries, reused as tables come and go, so that the
   * memory the cache holds never outgrows cache-size whatever the
   * allocator does with freed blocks.  Unused entries are on free.
   */
  void *slab;
  struct cache_entry *entries;
  struct cache_entry *free;   /* chained through hnext */
  size_t nbuckets;
  struct cache_entry **buckets;
  struct cache_entry lru;     /* sentinel: lru.lru_next is the newest */
  size_t entry_size;
  size_t ndirty[META_KINDS];
  uint64_t dirty_gen;         /* counts every cache_mark_dirty: changes since */
};

int cache_init (struct meta_cache *c, struct hostfile *hf, const struct layout *lay,
                const struct mutex *lock, size_t bytes, size_t entry_size);
void cache_set_writeback (struct meta_cache *c, cache_writeback_fn fn, void *opaque);
void cache_free (struct meta_cache *c);

/* The pinned table at offset, read from the file if needed. */
int cache_get (struct meta_cache *c, enum meta_kind kind, uint64_t offset,
               struct cache_entry **ep);
/* A pinned, zeroed, dirty table for a newly allocated cluster. */
int cache_get_new (struct meta_cache *c, enum meta_kind kind, uint64_t offset,
                   struct cache_entry **ep);
void cache_put (struct meta_cache *c, struct cache_entry *e);
void cache_mark_dirty (struct meta_cache *c, struct cache_entry *e);
void cache_mark_clean (struct meta_cache *c, struct cache_entry *e);

/* A table copied to the newly allocated cluster to: the copy is dirty, the
 * original clean (its place is dead: nothing will write it again), so the
 * caller can name the copy instead and free the old place later.
 */
int cache_move (struct meta_cache *c, enum meta_kind kind, uint64_t from, uint64_t to);

/* Forgets the table of a freed cluster without writing it. */
void cache_drop (struct meta_cache *c, uint64_t offset);

/* Visits every dirty entry of a kind, least recently used first. */
typedef int (*cache_visit_fn) (void *opaque, struct cache_entry *e);
int cache_for_each_dirty (struct meta_cache *c, enum meta_kind kind,
                          cache_visit_fn fn, void *opaque);
bool cache_any_dirty (const struct meta_cache *c, enum meta_kind kind);

#endif
