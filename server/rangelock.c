/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <assert.h>

#include "rangelock.h"

void rangelock_init (struct rangelock *rl)
{
  pthread_mutex_init (&rl->mutex, NULL);
  pthread_cond_init (&rl->cond, NULL);
  rl->held = NULL;
}

void rangelock_destroy (struct rangelock *rl)
{
  assert (rl->held == NULL);
  pthread_cond_destroy (&rl->cond);
  pthread_mutex_destroy (&rl->mutex);
}

static bool conflicts (const struct rangelock *rl, uint64_t first,
                       uint64_t last, bool exclusive)
{
  const struct rangelock_held *h;

  for (h = rl->held; h; h = h->next)
    if (h->first <= last && first <= h->last && (exclusive || h->exclusive))
      return true;
  return false;
}

void rangelock_lock (struct rangelock *rl, struct rangelock_held *h,
                     uint64_t first, uint64_t last, bool exclusive)
{
  assert (first <= last);
  pthread_mutex_lock (&rl->mutex);
  while (conflicts (rl, first, last, exclusive))
    pthread_cond_wait (&rl->cond, &rl->mutex);
  h->first = first;
  h->last = last;
  h->exclusive = exclusive;
  h->next = rl->held;
  rl->held = h;
  pthread_mutex_unlock (&rl->mutex);
}

void rangelock_unlock (struct rangelock *rl, struct rangelock_held *h)
{
  struct rangelock_held **pp;

  pthread_mutex_lock (&rl->mutex);
  for (pp = &rl->held; *pp != h; pp = &(*pp)->next)
    assert (*pp != NULL);       /* h must be a range this lock holds */
  *pp = h->next;
  pthread_cond_broadcast (&rl->cond);
  pthread_mutex_unlock (&rl->mutex);
}
