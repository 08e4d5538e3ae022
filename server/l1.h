/* Top-level tables kept whole in memory: the L1 table, and (with the same
 * code) the refcount table.  Dirty sectors are written back by flush.
 */
#ifndef Q2_L1_H
#define Q2_L1_H

#include <stdint.h>

struct q2_image;
struct mem_table;

int table_load (struct q2_image *img, struct mem_table *t, const char *what);
void table_free (struct mem_table *t);
void table_set (struct mem_table *t, uint64_t index, uint64_t value);
/* Writes the dirty sectors of t at t->offset. */
int table_write_dirty (struct q2_image *img, struct mem_table *t, const char *what);
int table_any_dirty (const struct mem_table *t);
/* Grows the in-memory copy to size entries (new ones zero). */
int table_resize (struct mem_table *t, uint64_t size);

#define TABLE_SECTOR_ENTRIES 64

#endif
