#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "image.h"
#include "alloc.h"
#include "copied.h"
#include "refcount.h"
#include "reclaim.h"
#include "log.h"

void alloc_note_end (struct q2_image *img, uint64_t end)
{
  if (end > img->file_end)
    img->file_end = end;
}

static int is_free (struct q2_image *img, uint64_t cluster, int *freep)
{
  uint64_t rc;
  int r = refcount_get (img, cluster, &rc);

  *freep = rc == 0 && cluster != 0;
  return r;
}

/* Scans from the hint; past the last refcount block everything is free. */
static int find_run (struct q2_image *img, uint64_t want, uint64_t *start, uint64_t *len)
{
  uint64_t c = img->free_hint, run = 0;
  uint64_t covered = img->reftable.size << img->rb_bits;
  bool seen_free = false;
  int f, r;

  for (;;) {
    if (c >= covered) {
      if (run == 0)
        *start = c;
      *len = want;
      return 0;
    }
    if ((r = is_free (img, c, &f)) < 0)
      return r;
    if (f) {
      seen_free = true;
      if (run == 0)
        *start = c;
      if (++run == want) {
        *len = run;
        return 0;
      }
    }
    else {
      if (!seen_free)
        img->free_hint = c + 1;
      run = 0;
    }
    c++;
  }
}

int alloc_find_free (struct q2_image *img, uint64_t n, uint64_t *offset)
{
  uint64_t start, len;
  int r = find_run (img, n, &start, &len);

  *offset = start << img->cluster_bits;
  return r;
}

/* Makes sure every cluster of [start, start+n) has a refcount block.
 * Returns 1 if blocks were allocated (the run may no longer be free).
 */
static int ensure_blocks (struct q2_image *img, uint64_t start, uint64_t n)
{
  uint64_t c;
  int r;

  for (c = start; c < start + n; c = ((c >> img->rb_bits) + 1) << img->rb_bits)
    if ((r = refcount_ensure_block (img, c)) != 0)
      return r;
  return 0;
}

static int claim (struct q2_image *img, uint64_t start, uint64_t n)
{
  uint64_t c;
  int r;

  for (c = start; c < start + n; c++)
    if ((r = refcount_set (img, c, 1)) < 0)
      return r;
  alloc_note_end (img, (start + n) << img->cluster_bits);
  return 0;
}

static int alloc_run (struct q2_image *img, uint64_t want, bool exact,
                      uint64_t *offset, uint64_t *got)
{
  uint64_t start, len, c;
  int f, r;

  for (;;) {
    if (exact)
      r = find_run (img, want, &start, &len);
    else {
      r = find_run (img, 1, &start, &len);
      /* Extend the run while the following clusters are free too. */
      for (len = 1; r == 0 && len < want; len++) {
        c = start + len;
        if (c >= img->reftable.size << img->rb_bits)
          continue;
        if ((r = is_free (img, c, &f)) < 0 || !f)
          break;
      }
    }
    if (r < 0)
      return r;
    r = ensure_blocks (img, start, len);
    if (r < 0)
      return r;
    if (r == 0)
      break;
  }
  if ((r = claim (img, start, len)) < 0)
    return r;
  *offset = start << img->cluster_bits;
  *got = len;
  return 0;
}

int alloc_contiguous (struct q2_image *img, uint64_t n, uint64_t *offset)
{
  uint64_t got;
  return alloc_run (img, n, true, offset, &got);
}

int alloc_clusters (struct q2_image *img, uint64_t max, uint64_t *offset, uint64_t *got)
{
  return alloc_run (img, max, false, offset, got);
}

/* Returns 1 when the count reached zero: the cluster is free. */
int alloc_release (struct q2_image *img, uint64_t offset, enum meta_kind kind)
{
  static const char *const names[] = { "data", "an L2 table", "a refcount block" };
  uint64_t cluster = offset >> img->cluster_bits, rc;
  enum meta_kind held = overlap_kind (&img->meta, cluster);
  int r;

  if (held != kind)
    return q2_corrupt (img, "a reference to host offset 0x%" PRIx64 " as %s would "
                       "free %s", offset, names[kind], names[held]);
  if ((r = refcount_get (img, cluster, &rc)) < 0)
    return r;
  if (rc == 0)
    return q2_corrupt (img, "freeing host offset 0x%" PRIx64 ", whose refcount "
                       "is already 0", offset);
  if ((r = refcount_set (img, cluster, rc - 1)) < 0)
    return r;
  if (rc == 2 && kind == META_NONE)
    return copied_note_single (img, cluster);
  if (rc > 1)
    return 0;
  /* A stale cached table must never be written over the cluster's next use. */
  cache_drop (&img->cache, offset);
  overlap_del (&img->meta, cluster);
  if (cluster < img->free_hint)
    img->free_hint = cluster;
  img->stats.clusters_freed++;
  img->shrink_wanted = true;
  return 1;
}

/* The low bit of a pending offset (clusters are aligned) says the host
 * range was punched already, when the request dropped its only reference.
 */
#define PENDING_PUNCHED 1ull
#define PENDING_KIND_SHIFT 1
#define PENDING_FLAGS 7ull

int alloc_free_later (struct q2_image *img, uint64_t offset, enum meta_kind kind,
                      bool punched)
{
  return u64_list_push (&img->pending, offset | (punched ? PENDING_PUNCHED : 0) |
                        (uint64_t) kind << PENDING_KIND_SHIFT);
}

static int cmp_u64 (const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
  return x < y ? -1 : x > y;
}

/* Sorted, so that clusters freed side by side are punched with one call. */
int alloc_apply_pending (struct q2_image *img)
{
  uint64_t run_start = 0, run_len = 0;
  size_t i;
  int r = 0;

  qsort (img->pending.v, img->pending.n, sizeof (uint64_t), cmp_u64);
  for (i = 0; i < img->pending.n; i++) {
    uint64_t off = img->pending.v[i] & ~PENDING_FLAGS;
    enum meta_kind kind = (img->pending.v[i] & PENDING_FLAGS) >> PENDING_KIND_SHIFT;
    if ((r = alloc_release (img, off, kind)) < 0)
      break;
    if (r == 0 || (img->pending.v[i] & PENDING_PUNCHED))
      continue;
    if (run_len && run_start + run_len == off)
      run_len += img->cluster_size;
    else {
      if (run_len)
        reclaim_punch (img, run_start, run_len);
      run_start = off;
      run_len = img->cluster_size;
    }
  }
  if (run_len)
    reclaim_punch (img, run_start, run_len);
  if (r < 0) {
    memmove (img->pending.v, img->pending.v + i,
             (img->pending.n - i) * sizeof *img->pending.v);
    img->pending.n -= i;
    return r;
  }
  img->pending.n = 0;
  return 0;
}
