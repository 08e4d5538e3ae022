#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "image.h"
#include "flush.h"
#include "alloc.h"
#include "copied.h"
#include "l1.h"
#include "reclaim.h"
#include "log.h"

struct batch {
  struct host_write *w;
  struct cache_entry **e;
  size_t n, cap;
};

static int collect (struct q2_image *img, struct cache_entry *e, void *opaque)
{
  struct batch *b = opaque;

  if (b->n == b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 32;
    struct host_write *w = realloc (b->w, cap * sizeof *w);
    if (!w)
      return -ENOMEM;
    b->w = w;
    struct cache_entry **ee = realloc (b->e, cap * sizeof *ee);
    if (!ee)
      return -ENOMEM;
    b->e = ee;
    b->cap = cap;
  }
  b->w[b->n] = (struct host_write) { e->buf, img->cache.entry_size, e->offset };
  b->e[b->n++] = e;
  return 0;
}

static int write_kind (struct q2_image *img, enum cache_kind kind)
{
  struct batch b = { 0 };
  size_t i;
  int r;

  if (!cache_any_dirty (&img->cache, kind))
    return 0;
  r = cache_for_each_dirty (img, kind, collect, &b);
  if (r == 0)
    r = host_pwrite_batch (&img->hf, b.w, b.n);
  if (r == 0)
    for (i = 0; i < b.n; i++)
      cache_mark_clean (&img->cache, b.e[i]);
  else
    q2_error ("%s: cannot write back %s: %s", img->name,
              kind == CACHE_L2 ? "L2 tables" : "refcount blocks", strerror (-r));
  free (b.w);
  free (b.e);
  return r;
}

int flush_refcount_blocks (struct q2_image *img)
{
  return write_kind (img, CACHE_REFBLOCK);
}

/* Syncs when anything (data, evicted tables) was written since the last
 * sync: what a table about to be written relies on must be on disk first.
 */
static int sync_or_say (struct q2_image *img)
{
  int r = host_sync_if_needed (&img->hf);

  if (r < 0)
    q2_error ("%s: cannot sync the image file: %s", img->name, strerror (-r));
  return r;
}

/* A new refcount block must be on disk before the table entry naming it,
 * and both before any L2 entry that relies on the counts.
 */
int flush_refcounts (struct q2_image *img)
{
  bool table = table_any_dirty (&img->reftable);
  int r;

  if ((r = flush_refcount_blocks (img)) < 0)
    return r;
  if (table) {
    if ((r = sync_or_say (img)) < 0)
      return r;
    if ((r = table_write_dirty (img, &img->reftable, "refcount table")) < 0)
      return r;
  }
  return sync_or_say (img);
}

int flush_evict_entry (struct q2_image *img, struct cache_entry *e)
{
  int r;

  if (e->kind == CACHE_L2 && (r = flush_refcounts (img)) < 0)
    return r;
  r = host_pwrite (&img->hf, e->buf, img->cache.entry_size, e->offset);
  if (r < 0) {
    q2_error ("%s: cannot write back metadata at 0x%" PRIx64 ": %s", img->name,
              e->offset, strerror (-r));
    return r;
  }
  cache_mark_clean (&img->cache, e);
  return 0;
}

bool flush_needed (const struct q2_image *img)
{
  return cache_any_dirty (&img->cache, CACHE_REFBLOCK) ||
    cache_any_dirty (&img->cache, CACHE_L2) ||
    table_any_dirty (&img->reftable) || table_any_dirty (&img->l1) ||
    img->pending.n > 0;
}

static int flush_once (struct q2_image *img, bool *synced)
{
  bool l2 = cache_any_dirty (&img->cache, CACHE_L2);
  bool l1 = table_any_dirty (&img->l1);
  int r;

  *synced = false;
  if (!flush_needed (img))
    return 0;
  if ((r = flush_refcounts (img)) < 0)
    return r;
  /* Pending decrements need their L2 changes synced, even ones an
   * eviction already wrote.
   */
  if (l2 || l1 || img->pending.n) {
    if ((r = write_kind (img, CACHE_L2)) < 0)
      return r;
    /* A new L2 table must be on disk before the L1 entry pointing at it. */
    if (l1) {
      if ((r = sync_or_say (img)) < 0)
        return r;
      if ((r = table_write_dirty (img, &img->l1, "L1 table")) < 0)
        return r;
    }
    if ((r = sync_or_say (img)) < 0)
      return r;
  }
  *synced = true;
  /* The references are gone on disk: the counts may now drop.  They reach
   * disk with the next flush; until then a crash only leaks.
   */
  if (img->pending.n) {
    if ((r = alloc_apply_pending (img)) < 0)
      return r;
    if ((r = flush_refcounts (img)) < 0)
      return r;
  }
  return 0;
}

int flush_metadata (struct q2_image *img, bool *synced)
{
  bool changed;
  int r = flush_once (img, synced);

  /* COPIED may be set only once the count of 1 is on disk: set early, a
   * crash could leave it on a shared cluster, which is then written in place.
   */
  if (r == 0 && (r = copied_restore (img, &changed)) == 0 && changed)
    r = flush_once (img, synced);
  return r < 0 ? r : reclaim_shrink (img);
}
