/* SPDX-License-Identifier: BSD-3-Clause */
/* The internal snapshot table, as far as the engine touches it: its
 * entries read, its length, and moving it whole for compaction.  The
 * snapshots' own L1 and L2 tables are read by check.c and never changed.
 * Callers of the table functions hold img->m.lock.
 */
#ifndef Q2_SNAPSHOT_H
#define Q2_SNAPSHOT_H

#include <stdbool.h>
#include <stdint.h>

struct q2_image;

/* One entry of the table, without its id and name. */
struct snapshot_entry {
  uint64_t l1_offset;
  uint32_t l1_size;
  uint16_t id_len, name_len;
  uint32_t extra_len;
  uint32_t date_sec, date_nsec;
  uint64_t vm_clock_nsec;
  uint64_t vm_state_size;     /* the 64-bit one of the extra data, when there */
  bool has_icount;
  uint64_t icount;
  uint64_t length;            /* bytes the entry takes in the table, padded */
};

/* Reads the entry at host offset off. */
int snapshot_entry_read (struct q2_image *img, uint64_t off, struct snapshot_entry *e);
/* The id and the name of the entry e read at off, as C strings (malloc'd). */
int snapshot_entry_names (struct q2_image *img, uint64_t off,
                          const struct snapshot_entry *e, char **id, char **name);

/* Bytes from the table's start to the end of its last entry; -EIO (said)
 * when an entry runs past the end of the file.
 */
int snapshot_table_bytes (struct q2_image *img, uint64_t *bytes);
/* Moves the table to the lowest free place if that is below it: written
 * there, synced, the header switched, the old place freed.
 */
int snapshot_move_table (struct q2_image *img, bool *moved);

#endif
