/* SPDX-License-Identifier: BSD-3-Clause */
/* The internal snapshot table, as far as the engine touches it: its
 * length, and moving it whole for compaction.  The snapshots' own L1 and
 * L2 tables are read by check.c and never changed.  Callers hold
 * img->m.lock.
 */
#ifndef Q2_SNAPSHOT_H
#define Q2_SNAPSHOT_H

#include <stdbool.h>
#include <stdint.h>

struct q2_image;

/* Bytes from the table's start to the end of its last entry; -EIO (said)
 * when an entry runs past the end of the file.
 */
int snapshot_table_bytes (struct q2_image *img, uint64_t *bytes);
/* Moves the table to the lowest free place if that is below it: written
 * there, synced, the header switched, the old place freed.
 */
int snapshot_move_table (struct q2_image *img, bool *moved);

#endif
