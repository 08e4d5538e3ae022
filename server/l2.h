/* SPDX-License-Identifier: BSD-3-Clause */
/* L2 tables: finding the table for a guest offset through the L1 table,
 * and making one the caller may change (created, or copied when it is
 * shared with an internal snapshot).  Callers hold img->m.lock.
 */
#ifndef Q2_L2_H
#define Q2_L2_H

#include <stdbool.h>
#include <stdint.h>

struct cache_entry;
struct q2_image;

/* *ep is NULL when the L1 entry is empty (everything unallocated). */
int l2_get (struct q2_image *img, uint64_t guest, struct cache_entry **ep);
/* A table the caller may change: created or copied as needed, with the L1
 * entry naming it (COPIED set) changed in memory.
 */
int l2_get_writable (struct q2_image *img, uint64_t guest, struct cache_entry **ep);
void l2_put (struct q2_image *img, struct cache_entry *e);
/* Without the lock, at the start of a request: asks the CPU to bring in
 * the L2 entry of guest, if its table was in the cache when last looked
 * up, while the request's checks and locks run.
 */
void l2_prefetch (struct q2_image *img, uint64_t guest);

/* Compaction's moves: the L2 table of L1 entry l1i, and the L1 table
 * itself, to the lowest free place if it is below the old one (*moved).
 * The old table is freed once its replacement is named on disk.
 */
int l2_move_table (struct q2_image *img, uint64_t l1i, bool *moved);
int l2_move_l1 (struct q2_image *img, bool *moved);

/* The first word of entry index; with extended L2 entries, the second
 * (the subcluster bitmap, 0 without them).  Setting one leaves the other.
 */
uint64_t l2_entry_get (const struct q2_image *img, const struct cache_entry *e,
                       uint64_t index);
void l2_entry_set (struct q2_image *img, struct cache_entry *e, uint64_t index, uint64_t v);
uint64_t l2_bitmap_get (const struct q2_image *img, const struct cache_entry *e,
                        uint64_t index);
void l2_bitmap_set (struct q2_image *img, struct cache_entry *e, uint64_t index,
                    uint64_t bitmap);

#endif
