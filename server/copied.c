/* SPDX-License-Identifier: BSD-3-Clause */
/* COPIED upkeep when a shared data cluster loses its other references.
 *
 * When a request drops a reference and a data cluster's count falls to 1,
 * the one left may be an active L2 entry without COPIED, which must now get
 * it.  QEMU never shares a host cluster between an active normal entry and
 * another active reference, but a hand-made image may: two guest clusters on
 * one host cluster, or a normal cluster over compressed bytes.  The format
 * has no reverse map, so the first time a count falls to 1 the active L2
 * tables are scanned once for such entries; the (usually none) found are
 * remembered, and later falls look them up.  Entries the engine writes are
 * never shared, so the list only goes stale, and each use checks the entry.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-format.h"
#include "copied.h"
#include "corrupt.h"
#include "engine.h"
#include "l2.h"
#include "log.h"
#include "refcount.h"
#include "vector.h"

struct shared_ref {
  uint64_t cluster;           /* host cluster index */
  uint64_t guest;             /* guest cluster index of the entry */
};
DEFINE_VECTOR_TYPE (shared_vector, struct shared_ref);

struct copied {
  struct shared_vector shared;  /* sorted by cluster, then guest */
  bool scanned;
};

#define WINDOW_BITS 26          /* host clusters per scan pass: 64 MiB of counts */
#define MAX_SHARED (1u << 20)   /* remembered entries: 16 MiB */

/* Per host cluster of the window: active references, saturating. */
#define COUNT_MASK 3
#define NOT_COPIED 4            /* an active normal entry without COPIED uses it */
#define FELL_TO_ONE 8           /* its count fell to 1 before the scan */

struct scan {
  struct q2_image *img;
  uint8_t *c;
  uint64_t base, n;           /* the window: host clusters [base, base + n) */
  bool collect;               /* second pass: remember the wanted entries */
  bool full_said;
  int err;
};

/* The host cluster of a normal or allocated-zero entry, if it has one. */
static bool plain_cluster (const struct layout *lay, uint64_t e, uint64_t *cluster)
{
  uint64_t off = e & L2E_OFFSET_MASK;

  if (lay->data_file || e & (QCOW_OFLAG_COMPRESSED | L2E_RESERVED_MASK) || !off ||
      off & (lay->cluster_size - 1))
    return false;
  *cluster = off >> lay->cluster_bits;
  return true;
}

static uint8_t *slot (struct scan *s, uint64_t cluster)
{
  return cluster >= s->base && cluster - s->base < s->n ? &s->c[cluster - s->base] : NULL;
}

static void count (struct scan *s, uint64_t cluster, bool not_copied)
{
  uint8_t *p = slot (s, cluster);

  if (!p)
    return;
  if ((*p & COUNT_MASK) < COUNT_MASK)
    (*p)++;
  if (not_copied)
    *p |= NOT_COPIED;
}

static bool wanted (uint8_t v)
{
  return (v & NOT_COPIED) && ((v & COUNT_MASK) >= 2 || (v & FELL_TO_ONE));
}

static void remember (struct scan *s, uint64_t cluster, uint64_t guest)
{
  struct copied *cp = s->img->copied;
  struct shared_ref ref = { cluster, guest };

  if (cp->shared.len == MAX_SHARED) {
    if (!s->full_said)
      log_notice ("%s: more than %u guest clusters share host clusters; COPIED flags "
                  "of the others are left for `qemu-img check -r all`", s->img->m.lay.name,
                  MAX_SHARED);
    s->full_said = true;
    return;
  }
  if (shared_vector_append (&cp->shared, ref) < 0)
    s->err = -ENOMEM;
}

static void visit_entry (struct scan *s, uint64_t e, uint64_t guest)
{
  uint64_t cl, off, len, c;
  uint8_t *p;

  if (e & QCOW_OFLAG_COMPRESSED) {
    if (s->collect)
      return;
    layout_compressed_extent (&s->img->m.lay, e, &off, &len);
    for (c = off >> s->img->m.lay.cluster_bits;
         c <= (off + len - 1) >> s->img->m.lay.cluster_bits; c++)
      count (s, c, false);
    return;
  }
  if (!plain_cluster (&s->img->m.lay, e, &cl))
    return;
  if (!s->collect)
    count (s, cl, !(e & QCOW_OFLAG_COPIED));
  else if (!(e & QCOW_OFLAG_COPIED) && (p = slot (s, cl)) && wanted (*p))
    remember (s, cl, guest);
}

/* One pass over the active L2 tables.  Tables the requests would refuse
 * as corrupt are skipped: nothing can be written through them anyway.
 */
static int scan_pass (struct scan *s)
{
  struct q2_image *img = s->img;
  const struct layout *lay = &img->m.lay;
  bool quiet = corrupt_quiet (true);
  uint64_t i, j;
  int r = 0;

  for (i = 0; i < img->m.l1.size && s->err == 0; i++) {
    uint64_t first = i << lay->l2_bits;
    struct cache_entry *e;
    r = l2_get (img, first << lay->cluster_bits, &e);
    if (r == -EIO)
      continue;
    if (r < 0)
      break;
    if (!e)
      continue;
    for (j = 0; j < layout_l2_entries (lay); j++)
      visit_entry (s, l2_entry_get (img, e, j), first + j);
    l2_put (img, e);
  }
  corrupt_quiet (quiet);
  return r < 0 && r != -EIO ? r : s->err;
}

static int scan_window (struct scan *s)
{
  struct q2_image *img = s->img;
  uint64_t i;
  uint8_t *p;
  bool any = false;
  int r;

  if (!(s->c = calloc (s->n, 1)))
    return -ENOMEM;
  for (i = 0; i < img->alloc.fell_to_one.len; i++)
    if ((p = slot (s, img->alloc.fell_to_one.ptr[i])))
      *p |= FELL_TO_ONE;
  s->collect = false;
  r = scan_pass (s);
  for (i = 0; r == 0 && i < s->n && !any; i++)
    any = wanted (s->c[i]);
  if (r == 0 && any) {
    s->collect = true;
    r = scan_pass (s);
  }
  free (s->c);
  return r;
}

static int cmp_ref (const void *a, const void *b)
{
  const struct shared_ref *x = a, *y = b;

  if (x->cluster != y->cluster)
    return x->cluster < y->cluster ? -1 : 1;
  return x->guest < y->guest ? -1 : x->guest > y->guest;
}

static int scan (struct q2_image *img)
{
  struct copied *cp = img->copied;
  uint64_t total = layout_clusters (&img->m.lay, img->m.lay.file_end);
  struct scan s = { .img = img };
  int r = 0;

  for (s.base = 0; s.base < total && r == 0; s.base += s.n) {
    s.n = total - s.base < (1ull << WINDOW_BITS) ? total - s.base : 1ull << WINDOW_BITS;
    r = scan_window (&s);
  }
  if (r < 0) {
    cp->shared.len = 0;
    return r;
  }
  if (cp->shared.len) {
    qsort (cp->shared.ptr, cp->shared.len, sizeof *cp->shared.ptr, cmp_ref);
    log_notice ("%s: %zu guest clusters share a host cluster with other active "
                "references (not an image QEMU writes); their COPIED flags are kept "
                "up to date", img->m.lay.name, cp->shared.len);
  }
  cp->scanned = true;
  return 0;
}

/* The first remembered entry of cluster, or the number of them. */
static size_t first_ref (const struct copied *cp, uint64_t cluster)
{
  size_t lo = 0, hi = cp->shared.len;

  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (cp->shared.ptr[mid].cluster < cluster)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

/* Whether the active entry of guest cluster g still uses cluster without COPIED. */
static int still_shared (struct q2_image *img, uint64_t g, uint64_t cluster, bool *yes)
{
  const struct layout *lay = &img->m.lay;
  struct cache_entry *e;
  uint64_t entry, cl;
  int r;

  *yes = false;
  if ((r = l2_get (img, g << lay->cluster_bits, &e)) < 0 || !e)
    return r;
  entry = l2_entry_get (img, e, layout_l2_index (lay, g << lay->cluster_bits));
  l2_put (img, e);
  *yes = plain_cluster (lay, entry, &cl) && cl == cluster && !(entry & QCOW_OFLAG_COPIED);
  return 0;
}

static int restore_one (struct q2_image *img, uint64_t cluster, bool *changed)
{
  const struct layout *lay = &img->m.lay;
  const struct copied *cp = img->copied;
  uint64_t rc, guest = 0, entry;
  struct cache_entry *e;
  size_t k, users = 0;
  bool yes;
  int r;

  if ((r = refcount_get (&img->m, cluster, &rc)) < 0 || rc != 1)
    return r;
  for (k = first_ref (cp, cluster); k < cp->shared.len &&
         cp->shared.ptr[k].cluster == cluster; k++) {
    if ((r = still_shared (img, cp->shared.ptr[k].guest, cluster, &yes)) < 0)
      return r;
    if (yes) {
      users++;
      guest = cp->shared.ptr[k].guest << lay->cluster_bits;
    }
  }
  if (users != 1) {
    /* Two users of a count of 1: flagging either would let writes through. */
    if (users > 1)
      corrupt_error (lay, "host offset 0x%" PRIx64 " is mapped by %zu guest clusters "
                     "but its refcount is 1", cluster << lay->cluster_bits, users);
    return 0;
  }
  if ((r = l2_get_writable (img, guest, &e)) < 0)
    return r;
  entry = l2_entry_get (img, e, layout_l2_index (lay, guest));
  l2_entry_set (img, e, layout_l2_index (lay, guest), entry | QCOW_OFLAG_COPIED);
  l2_put (img, e);
  *changed = true;
  return 0;
}

int copied_new (struct copied **cpp)
{
  return (*cpp = calloc (1, sizeof **cpp)) ? 0 : -ENOMEM;
}

void copied_free (struct copied *cp)
{
  if (!cp)
    return;
  shared_vector_reset (&cp->shared);
  free (cp);
}

int copied_restore (struct q2_image *img, bool *changed)
{
  struct u64_vector *fell = &img->alloc.fell_to_one;
  size_t i;
  int r = 0;

  assert (mutex_held (&img->m.lock));
  *changed = false;
  if (!fell->len)
    return 0;
  if (!img->copied->scanned && (r = scan (img)) < 0)
    return r;
  for (i = 0; i < fell->len && r == 0; i++)
    r = restore_one (img, fell->ptr[i], changed);
  /* The one that failed is tried again next time, with the rest. */
  u64_vector_remove_front (fell, r < 0 ? i - 1 : i);
  return r;
}
