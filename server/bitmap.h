/* SPDX-License-Identifier: BSD-3-Clause */
/* Persistent dirty bitmaps (DESIGN.md, "Persistent bitmaps"): the bitmap
 * directory as the header extension names it, and the bitmaps this version
 * keeps current while the image is open for writing.  Those are held
 * whole in memory; every change of guest data sets its granules' bits,
 * the commit sequence writes them back, and the in-use flag is on disk
 * from before the first change until the close has written them.
 */
#ifndef Q2_BITMAP_H
#define Q2_BITMAP_H

#include <stdbool.h>
#include <stdint.h>

struct alloc;
struct bitmaps;
struct meta;

/* One entry of the directory, as read at open. */
struct bitmap_entry {
  char *name;
  uint64_t pos;               /* of the entry, inside the directory */
  uint64_t table_offset;
  uint32_t table_size;        /* entries */
  uint32_t flags;             /* BME_FLAG_* as on disk */
  uint32_t extra_size;
  uint8_t type;
  uint8_t granularity_bits;
};

/* Reads the directory, when the autoclear bit says it is valid, and adds
 * its clusters to the overlap set.  writable: the bitmaps that record
 * changes (the auto flag, consistent, of a kind this version knows) are
 * loaded to be kept current; the others stay as they are, said once.
 * *cannot says (having said why) that the image has bitmaps that can be
 * neither kept current nor left valid: the caller clears the autoclear
 * bit, and *bp holds none.
 */
int bitmap_open (struct meta *m, bool writable, struct bitmaps **bp, bool *cannot);
void bitmap_free (struct bitmaps *b);
/* The directory's entries (all of them, kept or not); NULL: none. */
const struct bitmap_entry *bitmap_entries (const struct bitmaps *b, uint32_t *n);
/* Entry i has the in-use flag on disk (as read, or set since by us). */
bool bitmap_in_use (const struct bitmaps *b, uint32_t i);

/* Sets the in-use flag of every kept bitmap on disk, synced: before the
 * first change of guest data.
 */
int bitmap_mark_in_use (struct bitmaps *b, struct meta *m);
/* Marks the granules [offset, offset + len) touches dirty in every kept
 * bitmap, in memory, without a lock; b may be NULL.
 */
void bitmap_set (struct bitmaps *b, uint64_t offset, uint64_t len);

/* The first part of a write-back (callers hold m->lock): the data
 * clusters changed since the last, written in place, or into clusters
 * claimed from the allocator where the table had none.
 */
int bitmap_write_data (struct bitmaps *b, struct alloc *a);
/* A table names a cluster claimed since it was last written. */
bool bitmap_tables_dirty (const struct bitmaps *b);
/* Such tables, once the counts of what they name are written: synced
 * before and after; then the directory names tables compaction moved,
 * synced, and what the tables no longer name is freed later (a->pending).
 */
int bitmap_write_tables (struct bitmaps *b, struct alloc *a);
/* Compaction (DESIGN.md, "Compaction"): the clusters a kept bitmap's
 * table and data and the directory hold, and their moves.  fn is called
 * for each run of n clusters from first that meets [lo, hi): movable,
 * with a reference for bitmap_move, or freeing (moved away, freed once
 * what names the new place is on disk).  Only an image open for writing
 * has any; bitmaps left as they are stay where they are.
 */
typedef int (*bitmap_cluster_fn) (void *opaque, uint64_t first, uint64_t n, uint64_t ref,
                                  bool freeing);
int bitmap_clusters (const struct bitmaps *b, uint64_t lo, uint64_t hi,
                     bitmap_cluster_fn fn, void *opaque);
/* Moves what ref names, whose highest cluster the plan saw at cluster, to
 * the lowest free place below it (callers hold the metadata lock);
 * *moved false: the plan went stale or there is no room.  *clusters: its
 * size.  Data and tables move as a copy-on-write whose switch the next
 * write-back makes; the directory moves at once, the header switched.
 */
int bitmap_move (struct bitmaps *b, struct alloc *a, uint64_t ref, uint64_t cluster,
                 bool *moved, uint64_t *clusters);
/* The close, with everything written back and synced: clears the in-use
 * flags, synced.
 */
int bitmap_close (struct bitmaps *b, struct meta *m);

#endif
