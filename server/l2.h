/* L2 tables: finding the table for a guest offset through L1, creating it
 * or copying it when it is shared with a snapshot.  Callers hold meta_lock.
 */
#ifndef Q2_L2_H
#define Q2_L2_H

#include <stdint.h>

#include "image.h"

/* *ep is NULL when the L1 entry is empty (everything unallocated). */
int l2_table_get (struct q2_image *img, uint64_t guest_offset, struct cache_entry **ep);
/* A table the caller may modify: created or copied as needed (COPIED set). */
int l2_table_get_writable (struct q2_image *img, uint64_t guest_offset,
                           struct cache_entry **ep);

uint64_t l2_entry_get (const struct cache_entry *e, uint64_t index);
void l2_entry_set (struct q2_image *img, struct cache_entry *e, uint64_t index, uint64_t v);

static inline uint64_t l2_index (const struct q2_image *img, uint64_t guest_offset)
{
  return (guest_offset >> img->cluster_bits) & (l2_entries (img) - 1);
}

#endif
