/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <assert.h>

#include "mutex.h"

void mutex_init (struct mutex *mx)
{
  pthread_mutex_init (&mx->m, NULL);
  mx->held = false;
}

void mutex_destroy (struct mutex *mx)
{
  assert (!mx->held);
  pthread_mutex_destroy (&mx->m);
}

void mutex_lock (struct mutex *mx)
{
  pthread_mutex_lock (&mx->m);
  /* The owner goes first: a reader that sees held set by us also sees us. */
  __atomic_store_n (&mx->owner, pthread_self (), __ATOMIC_RELAXED);
  __atomic_store_n (&mx->held, true, __ATOMIC_RELEASE);
}

void mutex_unlock (struct mutex *mx)
{
  assert (mutex_held (mx));
  __atomic_store_n (&mx->held, false, __ATOMIC_RELEASE);
  pthread_mutex_unlock (&mx->m);
}

bool mutex_held (const struct mutex *mx)
{
  return __atomic_load_n (&mx->held, __ATOMIC_ACQUIRE) &&
    pthread_equal (__atomic_load_n (&mx->owner, __ATOMIC_RELAXED), pthread_self ());
}
