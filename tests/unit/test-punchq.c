/* SPDX-License-Identifier: BSD-3-Clause */
/* The queue of deferred punches against a model of 4 KiB blocks: random
 * additions inside 64 "clusters" of 16 blocks (the tag), claims of random
 * ranges (as host I/O makes them) and worker jobs, alone or two at once
 * (the worker beside a flush).  Every block added is
 * handed out to punch exactly once before it leaves; a claimed range has
 * nothing left queued over it; the items stay sorted, disjoint and within
 * the limit; an image closed with punches queued is caught by an assert.
 */
#include <config.h>

#include <string.h>

#include "punchq.h"
#include "unit.h"

#define BLK 4096u
#define PER 16u                 /* blocks per cluster */
#define CLUSTERS 64u
#define BLOCKS (PER * CLUSTERS)
#define LIMIT 40

static bool owed[BLOCKS];       /* added, not yet handed out to punch */

static void structure (struct punchq *q)
{
  size_t i;

  CHECK (q->items.len - q->head <= LIMIT);
  CHECK (punchq_live (q) == q->items.len - q->head);
  for (i = q->head; i < q->items.len; i++) {
    const struct punchq_item *it = &q->items.ptr[i];
    CHECK (it->len > 0 && it->state != PUNCHQ_PUNCHING);
    CHECK (it->offset / (PER * BLK) == it->tag &&
           (it->offset + it->len - 1) / (PER * BLK) == it->tag);
    if (i > q->head)
      CHECK (q->items.ptr[i - 1].offset + q->items.ptr[i - 1].len <= it->offset);
    /* A queued item is all owed; a punched one owes nothing. */
    for (uint64_t b = it->offset / BLK; b < (it->offset + it->len) / BLK; b++)
      CHECK (owed[b] == (it->state == PUNCHQ_QUEUED));
  }
}

static void hand_out (const struct punchq_items *punch)
{
  size_t i;

  for (i = 0; i < punch->len; i++)
    for (uint64_t b = punch->ptr[i].offset / BLK;
         b < (punch->ptr[i].offset + punch->ptr[i].len) / BLK; b++) {
      CHECK (owed[b]);
      owed[b] = false;
    }
}

struct job {
  struct punchq_items punch;
  uint64_t off, end;
};

static bool claim_job (struct punchq *q, bool wait, uint64_t upto, struct job *j)
{
  uint64_t tag, off, end;
  size_t i;
  struct punchq_items punch = { 0 };

  if (punchq_claim_next (q, wait, upto, &tag, &punch, &off, &end) != 1)
    return false;
  /* One tag, inside one cluster. */
  CHECK (off / (PER * BLK) == (end - 1) / (PER * BLK) && off / (PER * BLK) == tag);
  for (i = 0; i < punch.len; i++)
    CHECK (punch.ptr[i].tag == tag && punch.ptr[i].offset >= off &&
           punch.ptr[i].offset + punch.ptr[i].len <= end);
  hand_out (&punch);
  j->punch = punch;
  j->off = off;
  j->end = end;
  return true;
}

static void finish_job (struct punchq *q, struct job *j)
{
  punchq_punched (q, &j->punch);
  punchq_finish (q, j->off, j->end);
  punchq_items_reset (&j->punch);
}

static bool one_job (struct punchq *q, bool wait, uint64_t upto)
{
  struct job j;

  if (!claim_job (q, wait, upto, &j))
    return false;
  finish_job (q, &j);
  return true;
}

/* A drain takes what was queued before its mark, and stops there. */
static void drain_stops_at_mark (void)
{
  struct punchq q;
  uint64_t mark;
  unsigned n = 0;

  punchq_init (&q, LIMIT);
  punchq_accept (&q, true, PER * BLK);
  CHECK (punchq_add (&q, 5 * PER * BLK, BLK, 5));
  CHECK (punchq_add (&q, 9 * PER * BLK, BLK, 9));
  owed[5 * PER] = owed[9 * PER] = true;
  mark = punchq_mark (&q);
  CHECK (punchq_add (&q, 1 * PER * BLK, BLK, 1));     /* lower, but later */
  owed[1 * PER] = true;
  while (one_job (&q, true, mark))
    n++;
  CHECK (n == 2 && !owed[5 * PER] && !owed[9 * PER] && owed[1 * PER]);
  CHECK (one_job (&q, false, UINT64_MAX) && !owed[1 * PER]);
  punchq_destroy (&q);
}

static void closed_with_punches (void *opaque)
{
  struct punchq q;

  (void) opaque;
  punchq_init (&q, 4);
  punchq_accept (&q, true, 0);
  punchq_add (&q, 0, BLK, 0);
  punchq_destroy (&q);
}

int main (void)
{
  struct punchq q;
  unsigned i;

  punchq_init (&q, LIMIT);
  CHECK (!punchq_add (&q, 0, BLK, 0));          /* no worker yet */
  punchq_accept (&q, true, PER * BLK);
  for (i = 0; i < 200000; i++) {
    unsigned op = unit_random () % 10;
    if (op < 6) {
      uint64_t c = unit_random () % CLUSTERS, b = unit_random () % PER;
      uint64_t n = 1 + unit_random () % (PER - b);
      if (punchq_add (&q, (c * PER + b) * BLK, n * BLK, c))
        for (uint64_t k = 0; k < n; k++)
          owed[c * PER + b + k] = true;
    }
    else if (op < 8) {
      struct punchq_items mine = { 0 };
      uint64_t lo = unit_random () % BLOCKS, n = 1 + unit_random () % 40;
      CHECK (punchq_claim_range (&q, lo * BLK, n * BLK, &mine) == 0);
      hand_out (&mine);
      punchq_punched (&q, &mine);
      punchq_items_reset (&mine);
      for (uint64_t b = lo; b < lo + n && b < BLOCKS; b++)
        CHECK (!owed[b]);
    }
    else if (op < 9)
      one_job (&q, false, UINT64_MAX);
    else {
      /* The worker and a flush's drain, each with a job: the second
       * lies behind the first, and either may end first.
       */
      struct job a, b;
      if (claim_job (&q, false, UINT64_MAX, &a)) {
        if (claim_job (&q, false, UINT64_MAX, &b)) {
          if (unit_random () % 2)
            finish_job (&q, &b), finish_job (&q, &a);
          else
            finish_job (&q, &a), finish_job (&q, &b);
        }
        else
          finish_job (&q, &a);
      }
    }
    structure (&q);
  }
  /* Seeks claim to the end of the file. */
  if (punchq_add (&q, (CLUSTERS - 1) * PER * BLK, BLK, CLUSTERS - 1))
    owed[(CLUSTERS - 1) * PER] = true;
  {
    struct punchq_items mine = { 0 };
    CHECK (punchq_claim_range (&q, 0, UINT64_MAX, &mine) == 0);
    hand_out (&mine);
    punchq_punched (&q, &mine);
    punchq_items_reset (&mine);
  }
  for (i = 0; i < BLOCKS; i++)
    CHECK (!owed[i]);
  while (one_job (&q, true, punchq_mark (&q)))
    ;
  CHECK (punchq_live (&q) == 0);
  punchq_accept (&q, false, 0);
  CHECK (!punchq_add (&q, 0, BLK, 0));
  punchq_destroy (&q);
  drain_stops_at_mark ();
  CHECK (unit_aborts (closed_with_punches, NULL));
  return 0;
}
