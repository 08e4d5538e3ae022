/* Write-back in dependency order (DESIGN.md "Invariants"):
 * refcount blocks, then the refcount table, then L2 tables, then L1, with a
 * sync between each step that has something to order; then the deferred
 * refcount decrements.  Callers hold meta_lock.
 */
#ifndef Q2_FLUSH_H
#define Q2_FLUSH_H

#include <stdbool.h>

struct q2_image;
struct cache_entry;

int flush_refcount_blocks (struct q2_image *img);
int flush_refcounts (struct q2_image *img);
int flush_evict_entry (struct q2_image *img, struct cache_entry *e);
/* Everything dirty to disk and synced; *synced says whether a sync ran. */
int flush_metadata (struct q2_image *img, bool *synced);
bool flush_needed (const struct q2_image *img);

#endif
