/* Metadata cache: cluster-sized L2 tables and refcount blocks, LRU-evicted
 * within a byte budget.  Callers hold the image's meta_lock.
 */
#ifndef Q2_CACHE_H
#define Q2_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct q2_image;

enum cache_kind { CACHE_L2, CACHE_REFBLOCK };

struct cache_entry {
  uint64_t offset;
  enum cache_kind kind;
  bool dirty;
  unsigned pins;
  void *buf;
  struct cache_entry *hnext;              /* hash chain */
  struct cache_entry *lru_prev, *lru_next;
};

struct meta_cache {
  size_t max_entries, nentries;
  size_t nbuckets;
  struct cache_entry **buckets;
  struct cache_entry lru;                 /* sentinel: lru.next is newest */
  size_t entry_size;
  size_t ndirty[2];                       /* per cache_kind */
};

int cache_init (struct meta_cache *c, size_t bytes, size_t entry_size);
void cache_free (struct meta_cache *c);

/* Returns the pinned table at offset, reading it from the file if needed. */
int cache_get (struct q2_image *img, enum cache_kind kind, uint64_t offset,
               struct cache_entry **ep);
/* Returns a pinned, zeroed, dirty table for a newly allocated cluster. */
int cache_get_new (struct q2_image *img, enum cache_kind kind, uint64_t offset,
                   struct cache_entry **ep);
void cache_put (struct cache_entry *e);
void cache_mark_dirty (struct meta_cache *c, struct cache_entry *e);
void cache_mark_clean (struct meta_cache *c, struct cache_entry *e);

/* Forget a table whose cluster was freed, without writing it. */
void cache_drop (struct meta_cache *c, uint64_t offset);

/* Visit every dirty entry of a kind, oldest first. */
typedef int (*cache_visit_fn) (struct q2_image *img, struct cache_entry *e, void *opaque);
int cache_for_each_dirty (struct q2_image *img, enum cache_kind kind,
                          cache_visit_fn fn, void *opaque);
bool cache_any_dirty (const struct meta_cache *c, enum cache_kind kind);

#endif
