/* SPDX-License-Identifier: BSD-3-Clause */
/* The metadata of an open image as it is held in memory, and its
 * write-back in dependency order (DESIGN.md, "Write ordering"):
 *
 *   refcount blocks -> sync -> refcount table -> sync
 *     -> L2 tables -> sync -> L1 table -> sync
 *
 * so that on disk, at every instant, a cluster's refcount covers every
 * reference to it and every table is named only once it is there.  A sync
 * runs only where something was written since the last one.  The cache
 * uses the same order for one entry it evicts.  Callers hold m->lock.
 */
#ifndef Q2_WRITEBACK_H
#define Q2_WRITEBACK_H

#include <stdbool.h>

#include "cache.h"
#include "host.h"
#include "layout.h"
#include "mutex.h"
#include "table.h"

struct meta {
  struct layout lay;
  struct hostfile hf;
  /* Guards lay's places, the cache, both tables and the allocation state
   * built on them (alloc.h): every metadata lookup and change.
   */
  struct mutex lock;
  /* A header switch could be neither confirmed nor undone, so the disk
   * names one of two tables (or a repair stopped half way): no metadata
   * change may follow (writes, zeroes,
   * discards and flushes fail with EIO; reads go on).
   */
  bool failed;
  /* The external data file, NULL when there is none: guest data lives
   * there, so every sync of the image syncs it first, as data must be on
   * disk before the tables that name it.
   */
  struct hostfile *data;
  struct meta_cache cache;
  struct mem_table l1;
  struct mem_table reftable;
};

/* Syncs the data file (if any), then the image, each unless a finished
 * sync covers every change to it; says what failed.
 */
int writeback_sync (struct meta *m);
/* -EIO, said in the log, once failed is set: no metadata change may follow. */
int writeback_refused (const struct meta *m);
/* Gives the cache its write-back, in the order above. */
void writeback_init (struct meta *m);
/* Refcount blocks, then the refcount table, each synced. */
int writeback_refcounts (struct meta *m);
/* Everything dirty to disk and synced.  sync_anyway syncs even when
 * nothing is dirty (tables evicted since the last sync must be on disk
 * before references they dropped are given up); *synced says a sync ran.
 */
int writeback_all (struct meta *m, bool sync_anyway, bool *synced);
/* The same for a flush, syncing with the lock dropped (taken again before
 * it returns): *done says the L2 tables are written, to be synced by the
 * caller; otherwise nothing is left half done, and the caller goes on with
 * writeback_all under the lock.
 */
int writeback_all_sync_unlocked (struct meta *m, bool *done);
bool writeback_needed (const struct meta *m);

#endif
