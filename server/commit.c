/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <assert.h>

#include "bitmap.h"
#include "commit.h"
#include "copied.h"
#include "engine.h"
#include "shrink.h"

/* Pending decrements need their references' removal synced, even when an
 * eviction already wrote the table: sync_anyway.
 */
static int step_writeback (struct q2_image *img, bool *synced)
{
  return writeback_all (&img->m, alloc_pending (&img->alloc) > 0, synced);
}

/* The counts drop only now; they reach the disk before anything relies on
 * them (COPIED, a dropped block, a truncation).
 */
static int step_frees (struct q2_image *img)
{
  int r;

  if (!alloc_pending (&img->alloc))
    return 0;
  if ((r = alloc_apply_pending (&img->alloc)) < 0)
    return r;
  return writeback_refcounts (&img->m);
}

/* COPIED may be set only once the count of 1 is on disk: set early, a
 * crash could leave it on a shared cluster, which is then written in place.
 */
static int step_copied (struct q2_image *img)
{
  bool changed, synced;
  int r;

  if ((r = copied_restore (img, &changed)) < 0 || !changed)
    return r;
  return writeback_all (&img->m, false, &synced);
}

static int step_shrink (struct q2_image *img)
{
  int r;

  if (!img->alloc.shrink_wanted)
    return 0;
  img->alloc.shrink_wanted = false;
  if ((r = alloc_drop_empty_blocks (&img->alloc)) < 0)
    return r;
  return shrink_truncate (img);
}

/* Step 1 puts the counts of clusters the bitmaps claimed on disk: only
 * then may their tables name them.
 */
static int step_bitmap_tables (struct q2_image *img, bool *synced)
{
  if (!bitmap_tables_dirty (img->bitmaps))
    return 0;
  *synced = true;
  return bitmap_write_tables (img->bitmaps, &img->alloc);
}

int commit_run (struct q2_image *img, bool *synced)
{
  int r;

  assert (mutex_held (&img->m.lock));
  if ((r = bitmap_write_data (img->bitmaps, &img->alloc)) < 0 ||
      (r = step_writeback (img, synced)) < 0 ||
      (r = step_bitmap_tables (img, synced)) < 0 ||
      (r = step_frees (img)) < 0 ||
      (r = step_copied (img)) < 0)
    return r;
  return step_shrink (img);
}

/* Nothing for the steps after the write-back: only then may its sync drop
 * the lock, for the steps rely on the sync covering what they free.
 */
static bool only_writeback (struct q2_image *img)
{
  return !alloc_pending (&img->alloc) && !img->alloc.fell_to_one.len &&
    !img->alloc.shrink_wanted;
}

int commit_flush (struct q2_image *img, bool *synced)
{
  bool done;
  int r;

  assert (mutex_held (&img->m.lock));
  *synced = false;
  /* Bitmap data written in place is synced as guest data is; a cluster
   * claimed for it needs the whole sequence.
   */
  if ((r = bitmap_write_data (img->bitmaps, &img->alloc)) < 0)
    return r;
  if (only_writeback (img) && !bitmap_tables_dirty (img->bitmaps)) {
    if ((r = writeback_all_sync_unlocked (&img->m, &done)) < 0)
      return r;
    if (done && only_writeback (img))
      return 0;
  }
  return commit_run (img, synced);
}

int commit_frees (struct q2_image *img)
{
  bool synced;
  int r;

  assert (mutex_held (&img->m.lock));
  if ((r = step_writeback (img, &synced)) < 0)
    return r;
  return step_frees (img);
}
