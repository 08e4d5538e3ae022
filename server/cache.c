#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "image.h"
#include "flush.h"
#include "log.h"

/* Even a tiny budget keeps enough tables for one request's worth of work:
 * an L2 table, a couple of refcount blocks and whatever is pinned meanwhile.
 */
#define MIN_ENTRIES 16

int cache_init (struct meta_cache *c, size_t bytes, size_t entry_size)
{
  memset (c, 0, sizeof *c);
  c->entry_size = entry_size;
  c->max_entries = bytes / entry_size;
  if (c->max_entries < MIN_ENTRIES)
    c->max_entries = MIN_ENTRIES;
  c->nbuckets = 64;
  while (c->nbuckets < c->max_entries * 2)
    c->nbuckets *= 2;
  c->buckets = calloc (c->nbuckets, sizeof *c->buckets);
  if (!c->buckets)
    return -ENOMEM;
  c->lru.lru_next = c->lru.lru_prev = &c->lru;
  return 0;
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
}

void cache_mark_clean (struct meta_cache *c, struct cache_entry *e)
{
  if (e->dirty)
    c->ndirty[e->kind]--;
  e->dirty = false;
}

static void entry_free (struct meta_cache *c, struct cache_entry *e)
{
  cache_mark_clean (c, e);
  hash_remove (c, e);
  lru_unlink (e);
  free (e->buf);
  free (e);
  c->nentries--;
}

void cache_free (struct meta_cache *c)
{
  while (c->lru.lru_next != &c->lru)
    entry_free (c, c->lru.lru_next);
  free (c->buckets);
  c->buckets = NULL;
}

static struct cache_entry *lookup (struct meta_cache *c, uint64_t offset)
{
  struct cache_entry *e;

  for (e = c->buckets[bucket_of (c, offset)]; e; e = e->hnext)
    if (e->offset == offset)
      return e;
  return NULL;
}

/* Makes room for one entry by evicting the least recently used unpinned
 * one, writing it back first (in dependency order) when dirty.
 */
static int make_room (struct q2_image *img)
{
  struct meta_cache *c = &img->cache;
  struct cache_entry *e;
  int r;

  if (c->nentries < c->max_entries)
    return 0;
  for (e = c->lru.lru_prev; e != &c->lru; e = e->lru_prev) {
    if (e->pins)
      continue;
    if (e->dirty) {
      r = flush_evict_entry (img, e);
      if (r < 0)
        return r;
    }
    entry_free (c, e);
    return 0;
  }
  return 0;          /* everything pinned: grow past the budget briefly */
}

static int insert (struct q2_image *img, enum cache_kind kind, uint64_t offset,
                   struct cache_entry **ep)
{
  struct meta_cache *c = &img->cache;
  struct cache_entry *e;
  int r;

  r = make_room (img);
  if (r < 0)
    return r;
  e = calloc (1, sizeof *e);
  if (!e)
    return -ENOMEM;
  if (posix_memalign (&e->buf, 4096, c->entry_size) != 0) {
    free (e);
    return -ENOMEM;
  }
  e->offset = offset;
  e->kind = kind;
  e->pins = 1;
  size_t b = bucket_of (c, offset);
  e->hnext = c->buckets[b];
  c->buckets[b] = e;
  lru_push_front (c, e);
  c->nentries++;
  *ep = e;
  return 0;
}

int cache_get (struct q2_image *img, enum cache_kind kind, uint64_t offset,
               struct cache_entry **ep)
{
  struct meta_cache *c = &img->cache;
  struct cache_entry *e = lookup (c, offset);
  int r;

  if (e) {
    if (e->kind != kind)
      return q2_corrupt (img, "%s at host offset 0x%" PRIx64 " is also used as %s",
                         kind == CACHE_L2 ? "an L2 table" : "a refcount block",
                         offset,
                         e->kind == CACHE_L2 ? "an L2 table" : "a refcount block");
    lru_unlink (e);
    lru_push_front (c, e);
    e->pins++;
    *ep = e;
    return 0;
  }
  r = insert (img, kind, offset, &e);
  if (r < 0)
    return r;
  r = host_pread (&img->hf, e->buf, c->entry_size, offset);
  if (r < 0) {
    q2_error ("%s: cannot read %s at host offset 0x%" PRIx64 ": %s", img->name,
              kind == CACHE_L2 ? "L2 table" : "refcount block", offset, strerror (-r));
    e->pins = 0;
    entry_free (c, e);
    return r;
  }
  *ep = e;
  return 0;
}

int cache_get_new (struct q2_image *img, enum cache_kind kind, uint64_t offset,
                   struct cache_entry **ep)
{
  struct cache_entry *e = lookup (&img->cache, offset);
  int r;

  if (e) {
    /* A stale table of a freed cluster: reuse the slot. */
    cache_mark_clean (&img->cache, e);
    e->kind = kind;
    e->pins++;
  }
  else {
    r = insert (img, kind, offset, &e);
    if (r < 0)
      return r;
  }
  memset (e->buf, 0, img->cache.entry_size);
  cache_mark_dirty (&img->cache, e);
  *ep = e;
  return 0;
}

void cache_put (struct cache_entry *e)
{
  e->pins--;
}

void cache_drop (struct meta_cache *c, uint64_t offset)
{
  struct cache_entry *e = lookup (c, offset);

  if (e && !e->pins)
    entry_free (c, e);
  else if (e)
    cache_mark_clean (c, e);
}

int cache_for_each_dirty (struct q2_image *img, enum cache_kind kind,
                          cache_visit_fn fn, void *opaque)
{
  struct meta_cache *c = &img->cache;
  struct cache_entry *e;
  int r;

  for (e = c->lru.lru_prev; e != &c->lru; e = e->lru_prev) {
    if (e->dirty && e->kind == kind) {
      r = fn (img, e, opaque);
      if (r < 0)
        return r;
    }
  }
  return 0;
}

bool cache_any_dirty (const struct meta_cache *c, enum cache_kind kind)
{
  return c->ndirty[kind] > 0;
}
