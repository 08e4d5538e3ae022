#include <config.h>

#include <errno.h>
#include <string.h>

#include "image.h"
#include "l2.h"
#include "l1.h"
#include "alloc.h"
#include "log.h"

static uint64_t l1_index (const struct q2_image *img, uint64_t guest_offset)
{
  return guest_offset >> (img->cluster_bits + img->l2_bits);
}

uint64_t l2_entry_get (const struct cache_entry *e, uint64_t index)
{
  return be64_get ((const uint8_t *) e->buf + index * 8);
}

void l2_entry_set (struct q2_image *img, struct cache_entry *e, uint64_t index, uint64_t v)
{
  be64_put ((uint8_t *) e->buf + index * 8, v);
  cache_mark_dirty (&img->cache, e);
}

/* The L2 offset in an L1 entry, checked before anything is read there. */
static int l1_entry_offset (struct q2_image *img, uint64_t guest_offset, uint64_t *off)
{
  uint64_t i = l1_index (img, guest_offset);
  uint64_t e = img->l1.entries[i];
  uint64_t table_start = i << (img->cluster_bits + img->l2_bits);

  *off = e & L1E_OFFSET_MASK;
  if (*off == 0)
    return 0;
  if (e & L1E_RESERVED_MASK & ~QCOW_OFLAG_COPIED || *off & (img->cluster_size - 1))
    return q2_corrupt (img, "L1 entry %" PRIu64 " (0x%" PRIx64 ") for guest offset 0x%"
                       PRIx64 " is not a valid L2 table offset", i, e, table_start);
  return check_host_range (img, *off, img->cluster_size, META_L2, "L1 entry",
                           table_start);
}

int l2_table_get (struct q2_image *img, uint64_t guest_offset, struct cache_entry **ep)
{
  uint64_t off;
  int r;

  *ep = NULL;
  if ((r = l1_entry_offset (img, guest_offset, &off)) < 0 || off == 0)
    return r;
  return cache_get (img, CACHE_L2, off, ep);
}

int l2_table_get_writable (struct q2_image *img, uint64_t guest_offset,
                           struct cache_entry **ep)
{
  uint64_t i = l1_index (img, guest_offset);
  struct cache_entry *old = NULL, *e;
  uint64_t old_off, new_off;
  int r;

  if ((r = l1_entry_offset (img, guest_offset, &old_off)) < 0)
    return r;
  if (old_off && (img->l1.entries[i] & QCOW_OFLAG_COPIED))
    return cache_get (img, CACHE_L2, old_off, ep);

  /* New table, or a private copy of one shared with a snapshot. */
  if (old_off && (r = cache_get (img, CACHE_L2, old_off, &old)) < 0)
    return r;
  r = alloc_contiguous (img, 1, &new_off);
  if (r == 0)
    r = cache_get_new (img, CACHE_L2, new_off, &e);
  if (r < 0) {
    if (old)
      cache_put (old);
    return r;
  }
  if (old) {
    memcpy (e->buf, old->buf, img->cluster_size);
    cache_put (old);
    if ((r = alloc_free_later (img, old_off, META_L2, false)) < 0) {
      cache_put (e);
      return r;
    }
  }
  if ((r = overlap_add (&img->meta, new_off >> img->cluster_bits, META_L2)) < 0) {
    cache_put (e);
    return r;
  }
  table_set (&img->l1, i, new_off | QCOW_OFLAG_COPIED);
  *ep = e;
  return 0;
}
