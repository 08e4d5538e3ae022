/* Cluster allocation: lowest free clusters first, so that freed space near
 * the start is reused and the end of the file can be truncated.  Freeing is
 * deferred until the references dropped are on disk.  Callers hold meta_lock.
 */
#ifndef Q2_ALLOC_H
#define Q2_ALLOC_H

#include <stdbool.h>
#include <stdint.h>

#include "overlap.h"

struct q2_image;

/* Lowest run of n free clusters; nothing is claimed. */
int alloc_find_free (struct q2_image *img, uint64_t n, uint64_t *offset);
/* Claims exactly n contiguous clusters (refcount 1 each). */
int alloc_contiguous (struct q2_image *img, uint64_t n, uint64_t *offset);
/* Claims between 1 and max contiguous clusters at the lowest free place. */
int alloc_clusters (struct q2_image *img, uint64_t max, uint64_t *offset, uint64_t *got);
/* Drops one reference now: only for references that are not on disk.
 * kind says what the cluster holds (data, an L2 table...): a reference of
 * one kind never drops another's count, whatever a corrupt entry says.
 * Returns 1 when the cluster became free (the caller may punch it).
 */
int alloc_release (struct q2_image *img, uint64_t offset, enum meta_kind kind);
/* Drops one reference once the metadata that used it has been written;
 * punched says the host range is already a hole.
 */
int alloc_free_later (struct q2_image *img, uint64_t offset, enum meta_kind kind,
                      bool punched);
int alloc_apply_pending (struct q2_image *img);
void alloc_note_end (struct q2_image *img, uint64_t end);

#endif
