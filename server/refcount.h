/* Refcounts: reading and writing the count of one host cluster in its
 * refcount block, creating blocks, and growing the refcount table.
 * Callers hold meta_lock.
 */
#ifndef Q2_REFCOUNT_H
#define Q2_REFCOUNT_H

#include <stdbool.h>
#include <stdint.h>

struct q2_image;

int refcount_get (struct q2_image *img, uint64_t cluster, uint64_t *value);
/* The block covering cluster must exist (refcount_ensure_block). */
int refcount_set (struct q2_image *img, uint64_t cluster, uint64_t value);
/* Makes sure a refcount block covers cluster, allocating one (and growing
 * the table) if needed.  Returns 1 if anything was allocated, because the
 * caller's view of free clusters is then stale.
 */
int refcount_ensure_block (struct q2_image *img, uint64_t cluster);

/* Scans block idx (present in the table): *last is the highest cluster with
 * a non-zero count (UINT64_MAX if none), and *only_self says whether the
 * block counts nothing but its own cluster, self, once.
 */
int refcount_block_scan (struct q2_image *img, uint64_t idx, uint64_t self,
                         uint64_t *last, bool *only_self);

#endif
