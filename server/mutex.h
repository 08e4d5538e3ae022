/* SPDX-License-Identifier: BSD-3-Clause */
/* A mutex that knows its owner, so that a function whose caller must hold
 * the lock can assert it (assert (mutex_held (lock))).
 */
#ifndef Q2_MUTEX_H
#define Q2_MUTEX_H

#include <pthread.h>
#include <stdbool.h>

struct mutex {
  pthread_mutex_t m;
  /* Written by the owner only, read by anyone asking "do I hold it?":
   * atomics, so a thread that does not hold it reads false, never garbage.
   */
  pthread_t owner;
  bool held;
};

void mutex_init (struct mutex *mx);
void mutex_destroy (struct mutex *mx);
void mutex_lock (struct mutex *mx);
void mutex_unlock (struct mutex *mx);
/* True when the calling thread holds mx. */
bool mutex_held (const struct mutex *mx);

#endif
