/* SPDX-License-Identifier: BSD-3-Clause */
/* Compaction (DESIGN.md, "Compaction"): when the file is longer than its
 * live clusters need, clusters at the end move into the lowest free ones
 * and the file is cut; free clusters that still hold host space are
 * punched.  A background worker does it while the image is served, and
 * the tool does it offline.
 */
#ifndef Q2_COMPACT_H
#define Q2_COMPACT_H

#include <stdbool.h>
#include <stdint.h>

#include "qcow2reclaim.h"

struct compact;
struct q2_image;

/* rate: bytes a second the worker may move (0: the default). */
int compact_new (struct compact **cp, bool automatic, uint64_t rate,
                 void (*notify) (void *opaque, bool pass_end), void *opaque);
void compact_free (struct compact *c);

/* The worker, when the image is writable and compaction automatic.  Stop
 * waits for the move in progress and returns once the worker is gone.
 */
int compact_start (struct q2_image *img);
void compact_stop (struct q2_image *img);

/* One compaction now, unpaced (the tool).  dry_run measures and plans
 * only.  progress sees bytes moved of bytes to move.
 */
int compact_run (struct q2_image *img, bool dry_run, q2_progress_fn progress,
                 void *opaque, struct q2_compact_result *res);

/* The counters and gauges for q2_get_stats.  Caller holds img->m.lock. */
void compact_stats (struct q2_image *img, struct q2_stats *s);

#endif
