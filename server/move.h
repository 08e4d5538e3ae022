/* SPDX-License-Identifier: BSD-3-Clause */
/* Moving one data cluster to the lowest free place, for compaction
 * (DESIGN.md, "Compaction"): copy, then switch the one L2 entry that names
 * it; the old cluster is freed once the switch is on disk.
 */
#ifndef Q2_MOVE_H
#define Q2_MOVE_H

#include <stdbool.h>
#include <stdint.h>

struct q2_image;

/* Moves the data of guest cluster guest (a byte offset) from host offset
 * host, if the active entry still names it alone (COPIED) and a free
 * cluster lies below it.  *moved says it did.  Takes the guest range, so
 * a request to that cluster waits for at most this one copy.
 */
int move_data (struct q2_image *img, uint64_t guest, uint64_t host, bool *moved);

#endif
