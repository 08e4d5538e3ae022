/* SPDX-License-Identifier: BSD-3-Clause */
/* Tables kept whole in memory, the L1 table and the refcount table, with a
 * dirty flag per 512-byte sector: one sector write is atomic on the disks
 * we run on, so a table is always written back in whole sectors.
 */
#ifndef Q2_TABLE_H
#define Q2_TABLE_H

#include <stdbool.h>
#include <stdint.h>

#define TABLE_SECTOR_ENTRIES 64

struct hostfile;
struct layout;

struct mem_table {
  uint64_t *entries;          /* in host byte order */
  uint64_t size;              /* entries */
  uint8_t *dirty;             /* one flag per sector of entries */
  uint64_t dirty_gen;         /* counts every table_set: changes since */
  struct hostfile *hf;
  const struct layout *lay;
  const char *what;           /* "L1 table", for messages */
};

int table_load (struct mem_table *t, struct hostfile *hf, const struct layout *lay,
                const char *what, uint64_t offset, uint64_t size);
void table_free (struct mem_table *t);
uint64_t table_get (const struct mem_table *t, uint64_t index);
void table_set (struct mem_table *t, uint64_t index, uint64_t value);
bool table_any_dirty (const struct mem_table *t);
/* Writes the dirty sectors to the table at offset. */
int table_write_dirty (struct mem_table *t, uint64_t offset);
/* Writes the whole table at offset, padded with zeros to clusters
 * clusters, and marks it clean: for a table put in a new place.
 */
int table_write_whole (struct mem_table *t, uint64_t offset, uint64_t clusters);
/* A table made of entries (malloc'd, size of them; the table owns them
 * on success), all clean: for a table just written whole at a new place.
 */
int table_init_entries (struct mem_table *t, struct hostfile *hf,
                        const struct layout *lay, const char *what,
                        uint64_t *entries, uint64_t size);

#endif
