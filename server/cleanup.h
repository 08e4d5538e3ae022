/* SPDX-License-Identifier: BSD-3-Clause */
/* Scope-bound cleanup (GCC and clang's cleanup attribute), as nbdkit's
 * common/utils/cleanup.h has it: memory freed and locks released on every
 * way out of a scope, so error paths need no goto ladders.
 */
#ifndef Q2_CLEANUP_H
#define Q2_CLEANUP_H

#include <stdlib.h>

#include "mutex.h"

static inline void cleanup_free (void *ptr)
{
  free (*(void **) ptr);
}
/* CLEANUP_FREE char *buf = malloc (n);  -- freed when buf goes out of scope. */
#define CLEANUP_FREE __attribute__ ((cleanup (cleanup_free)))

static inline struct mutex *cleanup_mutex_lock (struct mutex *mx)
{
  mutex_lock (mx);
  return mx;
}

static inline void cleanup_mutex_unlock (struct mutex **mx)
{
  mutex_unlock (*mx);
}

#define CLEANUP_CONCAT_(a, b) a##b
#define CLEANUP_CONCAT(a, b) CLEANUP_CONCAT_ (a, b)
/* Takes mx until the end of the enclosing scope. */
#define LOCK_FOR_SCOPE(mx)                                              \
  __attribute__ ((cleanup (cleanup_mutex_unlock), unused))              \
  struct mutex *CLEANUP_CONCAT (scope_lock_, __COUNTER__) = cleanup_mutex_lock (mx)

#endif
