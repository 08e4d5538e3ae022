/* SPDX-License-Identifier: BSD-3-Clause */
/* Refcounts: the count of each host cluster in its refcount block, new
 * blocks, and growth of the refcount table.  Allocation (alloc.h) is built
 * on this and is the only user that changes counts.  Callers hold m->lock.
 */
#ifndef Q2_REFCOUNT_H
#define Q2_REFCOUNT_H

#include <stdbool.h>
#include <stdint.h>

struct meta;

/* Counts inside one block, at any of the seven widths (order 0..6 is
 * 1..64 bits): narrower than a byte packed from the least significant bit,
 * wider big-endian, as QEMU stores them.
 */
uint64_t refcount_block_get (const void *block, uint32_t order, uint64_t i);
void refcount_block_put (void *block, uint32_t order, uint64_t i, uint64_t v);

/* Whether the refcount table has an entry for cluster's block at all. */
bool refcount_covered (const struct meta *m, uint64_t cluster);
/* The validated offset of block idx (idx < table size); 0: none. */
int refcount_block_offset (struct meta *m, uint64_t idx, uint64_t *offset);

int refcount_get (struct meta *m, uint64_t cluster, uint64_t *value);
/* The block covering cluster must exist. */
int refcount_set (struct meta *m, uint64_t cluster, uint64_t value);

/* Names a new, empty block for index idx at where (a cluster the caller
 * counts next, through the block that covers it).
 */
int refcount_add_block (struct meta *m, uint64_t idx, uint64_t where);

/* Moves the refcount table to a larger one that has an entry for idx.
 * The old table's clusters are then referenced by nothing: the caller
 * frees them.
 */
int refcount_grow_table (struct meta *m, uint64_t idx, uint64_t *old_offset,
                         uint64_t *old_clusters);

/* Writes the refcount table whole at where (clusters the caller
 * allocated), then switches the header to it.  The old place is then
 * referenced by nothing: the caller frees it.
 */
int refcount_move_table (struct meta *m, uint64_t where);

/* Scans block idx (present in the table): *last is the highest cluster with
 * a non-zero count (UINT64_MAX if none), *used (may be NULL) how many have
 * one, and *only_self whether the block counts nothing but its own
 * cluster, self, once.
 */
int refcount_block_scan (struct meta *m, uint64_t idx, uint64_t self,
                         uint64_t *last, uint64_t *used, bool *only_self);

#endif
