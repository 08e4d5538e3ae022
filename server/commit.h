/* SPDX-License-Identifier: BSD-3-Clause */
/* The commit sequence: what a flush does, in this order, each step relying
 * on the ones before it being on disk (DESIGN.md, "The commit sequence"):
 *
 *   0. bitmaps         changed bitmap data is written (new clusters claimed)
 *   1. write-back      every dirty table, in dependency order, synced;
 *                      then bitmap tables naming new clusters, synced
 *   2. deferred frees  the decrements whose references 1 took off the disk
 *                      are applied and written back
 *   3. COPIED          active entries left alone on a cluster get the flag
 *                      (needs 2's counts on disk), and are written back
 *   4. refcount blocks that count nothing leave the refcount table
 *   5. truncation      free clusters at the end of the file are cut off
 *
 * Callers hold img->m.lock.
 */
#ifndef Q2_COMMIT_H
#define Q2_COMMIT_H

#include <stdbool.h>

struct q2_image;

/* All five steps; *synced says a sync ran (data is then on disk too). */
int commit_run (struct q2_image *img, bool *synced);
/* What a flush runs: when only step 1 has work, its sync drops the lock
 * (writeback_all_sync_unlocked) and *synced is false, so the caller syncs
 * what it wrote; otherwise commit_run.
 */
int commit_flush (struct q2_image *img, bool *synced);
/* Steps 1 and 2 only: what a guest write may ask for when deferred frees
 * pile up.  Never changes the file's length.
 */
int commit_frees (struct q2_image *img);

#endif
