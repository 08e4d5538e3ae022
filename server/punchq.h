/* SPDX-License-Identifier: BSD-3-Clause */
/* Host ranges whose hole punch is deferred.
 *
 * A TRIM of part of a cluster costs a fallocate(PUNCH_HOLE) and a
 * SEEK_DATA: about 200 µs on ext4, where the rest of the request takes
 * 20.  So the punch is queued and the request answered; a worker punches
 * and then looks whether the cluster became all hole.  The queue holds
 * no I/O of its own: the host layer punches what it hands out.
 *
 * The one rule is that a queued punch must never land after anything
 * else done to its range, or it would wipe what was written there.
 * Every host operation on a range therefore first claims the punches
 * queued over it and runs them (punchq_claim_range), or waits for one
 * that another thread runs.  A punch done that way stays queued, as
 * punched, so that the worker still looks at its cluster.
 *
 * Ranges are kept sorted by offset and disjoint, so that the claim of a
 * range is a binary search: the whole point is that the queue is cheap
 * to look at from every read and write.
 */
#ifndef Q2_PUNCHQ_H
#define Q2_PUNCHQ_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vector.h"

enum punchq_state {
  PUNCHQ_QUEUED,              /* not punched */
  PUNCHQ_PUNCHING,            /* being punched: I/O over it waits */
  PUNCHQ_PUNCHED,             /* punched, its cluster not looked at yet */
};

struct punchq_item {
  uint64_t offset, len;
  uint64_t tag;               /* the caller's name for the range's owner */
  uint64_t seq;               /* when it was queued: 1, 2, ... */
  enum punchq_state state;
  bool claimed;               /* part of the worker's job (punchq_claim_next) */
};

DEFINE_VECTOR_TYPE (punchq_items, struct punchq_item);

struct punchq {
  /* lock guards everything below but 'live', which is also read without
   * it (atomic) so that I/O over an empty queue costs one load.
   */
  pthread_mutex_t lock;
  pthread_cond_t cond;        /* a punch done, an item added or gone, stop */
  bool accepting;             /* a worker runs: additions are taken */
  struct punchq_items items;  /* [head, len): sorted by offset, disjoint */
  size_t head;
  size_t limit;               /* at most this many items */
  uint64_t unit;              /* a job stays inside one unit (a cluster); 0: any */
  uint64_t seq;               /* the last item's number */
  size_t live;                /* items in the queue (atomic) */
};

void punchq_init (struct punchq *q, size_t limit);
void punchq_destroy (struct punchq *q);
/* Off: additions are refused, and waiting claims return empty.  unit:
 * what one job may span (punchq_claim_next).
 */
void punchq_accept (struct punchq *q, bool on, uint64_t unit);
bool punchq_add (struct punchq *q, uint64_t offset, uint64_t len, uint64_t tag);
static inline size_t punchq_live (struct punchq *q)
{
  return __atomic_load_n (&q->live, __ATOMIC_ACQUIRE);
}
/* Past half its limit, the queue should not wait any longer. */
static inline bool punchq_half_full (struct punchq *q)
{
  return punchq_live (q) >= q->limit / 2;
}
/* The queued punches over [offset, offset + len), after waiting for
 * those another thread is punching there: the caller punches them and
 * calls punchq_punched.
 */
int punchq_claim_range (struct punchq *q, uint64_t offset, uint64_t len,
                        struct punchq_items *out);
void punchq_punched (struct punchq *q, const struct punchq_items *done);
/* The next job: the first run of items of one tag in one unit that no
 * job holds and that has an item numbered 'upto' or lower; those still
 * to punch are in 'punch', marked punching, and the caller punches them
 * and calls punchq_punched.  [offset, end) is where the run lies.  With
 * 'wait' it waits, while a job up to the mark is held by another thread,
 * until nothing numbered up to it is left (the worker itself waits in
 * punchq_wait_job).  1: a job; 0: none; -ENOMEM.
 */
int punchq_claim_next (struct punchq *q, bool wait, uint64_t upto, uint64_t *tag,
                       struct punchq_items *punch, uint64_t *offset, uint64_t *end);
/* Waits until there is a job to claim (true) or the queue is off. */
bool punchq_wait_job (struct punchq *q);
/* The job punchq_claim_next gave is over: its items leave. */
void punchq_finish (struct punchq *q, uint64_t offset, uint64_t end);
/* The number of the last item queued so far: a flush drains what came
 * before it, not what a guest keeps trimming meanwhile.
 */
uint64_t punchq_mark (struct punchq *q);

#endif
