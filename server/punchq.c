/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <assert.h>
#include <string.h>

#include "punchq.h"

void punchq_init (struct punchq *q, size_t limit)
{
  memset (q, 0, sizeof *q);
  pthread_mutex_init (&q->lock, NULL);
  pthread_cond_init (&q->cond, NULL);
  q->limit = limit;
}

void punchq_destroy (struct punchq *q)
{
  assert (q->items.len == q->head);
  punchq_items_reset (&q->items);
  pthread_cond_destroy (&q->cond);
  pthread_mutex_destroy (&q->lock);
}

void punchq_accept (struct punchq *q, bool on, uint64_t unit)
{
  pthread_mutex_lock (&q->lock);
  q->accepting = on;
  if (on)
    q->unit = unit;
  pthread_cond_broadcast (&q->cond);
  pthread_mutex_unlock (&q->lock);
}

static void set_live (struct punchq *q)
{
  __atomic_store_n (&q->live, q->items.len - q->head, __ATOMIC_RELEASE);
}

/* The first item that ends after offset: ends are sorted as the items
 * are disjoint.
 */
static size_t first_ending_after (const struct punchq *q, uint64_t offset)
{
  size_t lo = q->head, hi = q->items.len;

  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    const struct punchq_item *it = &q->items.ptr[mid];
    if (it->offset + it->len > offset)
      hi = mid;
    else
      lo = mid + 1;
  }
  return lo;
}

/* Only a queued item no job holds can grow: any other has begun. */
static bool can_merge (const struct punchq_item *it, uint64_t tag)
{
  return it->tag == tag && it->state == PUNCHQ_QUEUED && !it->claimed;
}

/* The worker takes from the front and fstrim adds at the back (it walks
 * the disk upwards): both ends cost nothing, where moving the queue on
 * each job made draining 12,800 punches take seconds.  A flush draining
 * beside the worker finishes jobs a few items behind the front: the
 * shorter side moves, so that costs a few items too, not the queue.
 */
static size_t remove_at (struct punchq *q, size_t i)
{
  if (i - q->head < q->items.len - i - 1) {
    memmove (&q->items.ptr[q->head + 1], &q->items.ptr[q->head],
             (i - q->head) * sizeof q->items.ptr[0]);
    i = i + 1;
    q->head++;
  }
  else {
    memmove (&q->items.ptr[i], &q->items.ptr[i + 1],
             (q->items.len - i - 1) * sizeof q->items.ptr[0]);
    q->items.len--;
  }
  if (q->head == q->items.len)
    i = q->head = q->items.len = 0;
  return i;                   /* where the item that followed now is */
}

static int insert_at (struct punchq *q, size_t i, const struct punchq_item *it)
{
  int r;

  if (i == q->head && q->head > 0) {
    q->items.ptr[--q->head] = *it;
    return 0;
  }
  if (q->items.len == q->items.cap && q->head > 0) {
    memmove (q->items.ptr, &q->items.ptr[q->head],
             (q->items.len - q->head) * sizeof q->items.ptr[0]);
    q->items.len -= q->head;
    i -= q->head;
    q->head = 0;
  }
  if ((r = punchq_items_reserve (&q->items, 1)) < 0)
    return r;
  memmove (&q->items.ptr[i + 1], &q->items.ptr[i],
           (q->items.len - i) * sizeof q->items.ptr[0]);
  q->items.ptr[i] = *it;
  q->items.len++;
  return 0;
}

bool punchq_add (struct punchq *q, uint64_t offset, uint64_t len, uint64_t tag)
{
  struct punchq_item new = { .offset = offset, .len = len, .tag = tag };
  uint64_t end = offset + len;
  struct punchq_item *next = NULL;
  bool ok = false;
  size_t i;

  assert (len > 0);
  pthread_mutex_lock (&q->lock);
  if (!q->accepting)
    goto out;
  /* i: the first item that ends at or after offset, i.e. that touches or
   * overlaps the new range from the right.
   */
  i = offset ? first_ending_after (q, offset - 1) : q->head;
  if (i < q->items.len && q->items.ptr[i].offset <= end)
    next = &q->items.ptr[i];
  /* A range it touches of the same tag, not begun, grows; past that the
   * queue stays disjoint, and an overlap with anything else (a range
   * trimmed again while its punch runs) is punched at once by the
   * caller: the order of two punches does not matter.
   */
  if (next && can_merge (next, tag) &&
      !(i + 1 < q->items.len && q->items.ptr[i + 1].offset < end)) {
    uint64_t e = next->offset + next->len > end ? next->offset + next->len : end;
    if (next->offset > offset)
      next->offset = offset;
    next->len = e - next->offset;
    ok = true;
    goto out;
  }
  if (next && next->offset + next->len == offset)
    i++, next = i < q->items.len && q->items.ptr[i].offset <= end ? &q->items.ptr[i] : NULL;
  if (next && next->offset < end)
    goto out;
  /* A grown range keeps its number: it was queued that early. */
  new.seq = q->seq + 1;
  if (q->items.len - q->head >= q->limit || insert_at (q, i, &new) < 0)
    goto out;
  q->seq++;
  set_live (q);
  pthread_cond_broadcast (&q->cond);
  ok = true;
 out:
  pthread_mutex_unlock (&q->lock);
  return ok;
}

int punchq_claim_range (struct punchq *q, uint64_t offset, uint64_t len,
                        struct punchq_items *out)
{
  uint64_t end = len > UINT64_MAX - offset ? UINT64_MAX : offset + len;
  size_t i, first, n;
  int r = 0;

  pthread_mutex_lock (&q->lock);
 again:
  first = first_ending_after (q, offset);
  for (i = first, n = 0; i < q->items.len && q->items.ptr[i].offset < end; i++) {
    if (q->items.ptr[i].state == PUNCHQ_PUNCHING) {
      pthread_cond_wait (&q->cond, &q->lock);
      goto again;
    }
    n += q->items.ptr[i].state == PUNCHQ_QUEUED;
  }
  /* All or nothing: a punch left queued could land after the caller's
   * I/O.
   */
  if (n && (r = punchq_items_reserve (out, n)) == 0)
    for (i = first; i < q->items.len && q->items.ptr[i].offset < end; i++)
      if (q->items.ptr[i].state == PUNCHQ_QUEUED) {
        out->ptr[out->len++] = q->items.ptr[i];
        q->items.ptr[i].state = PUNCHQ_PUNCHING;
      }
  pthread_mutex_unlock (&q->lock);
  return r;
}

static struct punchq_item *find (struct punchq *q, const struct punchq_item *it)
{
  size_t i = first_ending_after (q, it->offset);

  assert (i < q->items.len && q->items.ptr[i].offset == it->offset);
  return &q->items.ptr[i];
}

void punchq_punched (struct punchq *q, const struct punchq_items *done)
{
  size_t i;

  if (!done->len)
    return;
  pthread_mutex_lock (&q->lock);
  for (i = 0; i < done->len; i++) {
    struct punchq_item *it = find (q, &done->ptr[i]);
    assert (it->state == PUNCHQ_PUNCHING);
    it->state = PUNCHQ_PUNCHED;
  }
  pthread_cond_broadcast (&q->cond);
  pthread_mutex_unlock (&q->lock);
}

/* One job: a run of items of one tag inside one unit (a cluster: a tag
 * may name two places when its cluster moved, and each is looked at),
 * none held by a job nor being punched by a request (it will soon be
 * done, and looked at then), with an item queued by seq 'upto'.
 */
static bool same_job (const struct punchq *q, const struct punchq_item *a,
                      const struct punchq_item *b)
{
  return a->tag == b->tag && (!q->unit || a->offset / q->unit == b->offset / q->unit);
}

static bool next_job (const struct punchq *q, uint64_t upto, size_t *first, size_t *n)
{
  size_t i = q->head, j;

  while (i < q->items.len) {
    bool free = true, due = false;
    for (j = i; j < q->items.len && same_job (q, &q->items.ptr[i], &q->items.ptr[j]); j++) {
      free &= !q->items.ptr[j].claimed && q->items.ptr[j].state != PUNCHQ_PUNCHING;
      due |= q->items.ptr[j].seq <= upto;
    }
    if (free && due) {
      *first = i;
      *n = j - i;
      return true;
    }
    i = j;
  }
  return false;
}

static bool any_upto (const struct punchq *q, uint64_t upto)
{
  size_t i;

  for (i = q->head; i < q->items.len; i++)
    if (q->items.ptr[i].seq <= upto)
      return true;
  return false;
}

bool punchq_wait_job (struct punchq *q)
{
  size_t first, n;
  bool on;

  pthread_mutex_lock (&q->lock);
  while ((on = q->accepting) && !next_job (q, UINT64_MAX, &first, &n))
    pthread_cond_wait (&q->cond, &q->lock);
  pthread_mutex_unlock (&q->lock);
  return on;
}

int punchq_claim_next (struct punchq *q, bool wait, uint64_t upto, uint64_t *tag,
                       struct punchq_items *punch, uint64_t *offset, uint64_t *end)
{
  size_t first, n, i;
  int r = 0;

  pthread_mutex_lock (&q->lock);
  /* A drain waits until nothing numbered up to its mark is left, done by
   * itself or by whoever holds it.
   */
  while (!next_job (q, upto, &first, &n)) {
    if (!wait || !any_upto (q, upto))
      goto out;
    pthread_cond_wait (&q->cond, &q->lock);
  }
  if ((r = punchq_items_reserve (punch, n)) < 0)
    goto out;
  *tag = q->items.ptr[first].tag;
  *offset = q->items.ptr[first].offset;
  *end = q->items.ptr[first + n - 1].offset + q->items.ptr[first + n - 1].len;
  for (i = first; i < first + n; i++) {
    struct punchq_item *it = &q->items.ptr[i];
    it->claimed = true;
    if (it->state == PUNCHQ_QUEUED) {
      punch->ptr[punch->len++] = *it;
      it->state = PUNCHQ_PUNCHING;
    }
  }
  r = 1;
 out:
  pthread_mutex_unlock (&q->lock);
  return r;
}

void punchq_finish (struct punchq *q, uint64_t offset, uint64_t end)
{
  size_t i;

  pthread_mutex_lock (&q->lock);
  /* The job's items lie in [offset, end), with perhaps items no job holds
   * added between them since.
   */
  for (i = first_ending_after (q, offset); i < q->items.len && q->items.ptr[i].offset < end; )
    if (q->items.ptr[i].claimed) {
      assert (q->items.ptr[i].state == PUNCHQ_PUNCHED);
      i = remove_at (q, i);
    }
    else
      i++;
  set_live (q);
  pthread_cond_broadcast (&q->cond);
  pthread_mutex_unlock (&q->lock);
}

uint64_t punchq_mark (struct punchq *q)
{
  uint64_t seq;

  pthread_mutex_lock (&q->lock);
  seq = q->seq;
  pthread_mutex_unlock (&q->lock);
  return seq;
}

