/* SPDX-License-Identifier: BSD-3-Clause */
/* Guest cluster ranges held by requests in flight: readers share a range,
 * writers exclude everyone on overlapping clusters.  A request takes its
 * range before it looks anything up, so no cluster it resolved can be
 * freed, reused or punched under it.
 */
#ifndef Q2_RANGELOCK_H
#define Q2_RANGELOCK_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

/* One held range, on the caller's stack for the life of its request. */
struct rangelock_held {
  uint64_t first, last;       /* guest cluster indexes, inclusive */
  bool exclusive;
  struct rangelock_held *next;
};

struct rangelock {
  pthread_mutex_t mutex;      /* guards held */
  pthread_cond_t cond;        /* broadcast whenever a range is released */
  struct rangelock_held *held;
};

void rangelock_init (struct rangelock *rl);
void rangelock_destroy (struct rangelock *rl);
void rangelock_lock (struct rangelock *rl, struct rangelock_held *h,
                     uint64_t first, uint64_t last, bool exclusive);
void rangelock_unlock (struct rangelock *rl, struct rangelock_held *h);

#endif
