/* Shrinking: refcount blocks that count nothing are dropped from the
 * refcount table, and free clusters at the end of the file are cut off.
 * Runs inside a flush, after the deferred decrements are on disk.
 */
#include <config.h>

#include <errno.h>
#include <string.h>

#include "image.h"
#include "alloc.h"
#include "flush.h"
#include "l1.h"
#include "log.h"
#include "reclaim.h"
#include "refcount.h"

static int drop_empty_blocks (struct q2_image *img)
{
  uint64_t idx, dropped[64], n = 0, i, last;
  bool empty;
  int r = 0;

  /* Block 0 counts the header, so it is never empty. */
  for (idx = 1; idx < img->reftable.size && n < 64; idx++) {
    uint64_t off = img->reftable.entries[idx] & REFT_OFFSET_MASK;
    if (!off)
      continue;
    if ((r = refcount_block_scan (img, idx, off >> img->cluster_bits, &last, &empty)) < 0)
      return r;
    if (!empty)
      continue;
    table_set (&img->reftable, idx, 0);
    dropped[n++] = off;
  }
  if (n == 0)
    return 0;
  /* The table must stop naming a block before its cluster is reused. */
  if ((r = flush_refcounts (img)) < 0)
    return r;
  for (i = 0; i < n; i++) {
    uint64_t c = dropped[i] >> img->cluster_bits;
    cache_drop (&img->cache, dropped[i]);
    overlap_del (&img->meta, c);
    /* A block counted elsewhere gives that count back; one that counted
     * itself is simply gone.
     */
    if ((c >> img->rb_bits) < img->reftable.size &&
        img->reftable.entries[c >> img->rb_bits] &&
        (r = alloc_release (img, dropped[i], META_NONE)) < 0)
      return r;
    if (c < img->free_hint)
      img->free_hint = c;
    reclaim_punch (img, dropped[i], img->cluster_size);
    img->stats.refblocks_freed++;
  }
  return flush_refcounts (img);
}

/* The end of the last cluster still in use. */
static int used_end (struct q2_image *img, uint64_t *end)
{
  uint64_t idx = img->reftable.size, last;
  bool only_self;
  int r;

  *end = img->cluster_size;
  while (idx-- > 0) {
    if (!(img->reftable.entries[idx] & REFT_OFFSET_MASK))
      continue;
    if ((r = refcount_block_scan (img, idx, UINT64_MAX, &last, &only_self)) < 0)
      return r;
    if (last != UINT64_MAX) {
      *end = (last + 1) << img->cluster_bits;
      return 0;
    }
  }
  return 0;
}

static int truncate_free_end (struct q2_image *img)
{
  uint64_t end, size;
  int r;

  if ((r = used_end (img, &end)) < 0 || (r = host_size (&img->hf, &size)) < 0)
    return r;
  if (end >= size)
    return 0;
  if ((r = host_truncate (&img->hf, end)) < 0) {
    q2_error ("%s: cannot truncate the file to %" PRIu64 " bytes: %s", img->name,
              end, strerror (-r));
    return r;
  }
  img->file_end = end;
  img->stats.truncations++;
  img->stats.bytes_truncated += size - end;
  return 0;
}

int reclaim_shrink (struct q2_image *img)
{
  int r;

  if (!img->shrink_wanted)
    return 0;
  img->shrink_wanted = false;
  if ((r = drop_empty_blocks (img)) < 0)
    return r;
  return truncate_free_end (img);
}
