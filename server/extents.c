/* SPDX-License-Identifier: BSD-3-Clause */
/* Data for normal and compressed clusters, hole+zero for zero clusters and
 * for unallocated ones without a backing file, and the backing file's own
 * status where it shows through.
 */
#include <config.h>

#include <errno.h>

#include "backing.h"
#include "cluster.h"
#include "engine.h"
#include "extents.h"

/* Holes in the host file inside allocated clusters (never-written parts
 * of partially written clusters, sub-cluster discards) read as zeros:
 * report them as zero, allocated, as qemu-nbd does.
 */
static int host_status (struct q2_image *img, uint64_t host, uint32_t *type,
                        uint64_t *run)
{
  uint64_t d, h;
  int r;

  /* Only the run matters: block status must not run every punch queued
   * past it.
   */
  if ((r = host_seek_data_in (img->data, host, host + *run, &d)) < 0)
    return r;
  if (d > host) {
    if (d - host < *run)
      *run = d - host;
    *type = Q2_EXTENT_ZERO;
    return 0;
  }
  if ((r = host_seek_hole_in (img->data, host, host + *run, &h)) < 0)
    return r;
  if (h > host && h - host < *run)
    *run = h - host;
  *type = 0;
  return 0;
}

int extents_status (struct q2_image *img, uint64_t offset, uint64_t len,
                    uint32_t *type, uint64_t *run)
{
  struct mapping m;
  int r;

  if ((r = cluster_map_locked (img, offset, len, &m)) < 0)
    return r;
  *run = m.bytes;
  switch (m.kind) {
  case MAP_UNALLOC:
    if (img->backing)
      return backing_status (img->backing, offset, m.bytes, type, run);
    /* fall through */
  case MAP_ZERO_PLAIN:
  case MAP_ZERO_ALLOC:
    *type = Q2_EXTENT_HOLE | Q2_EXTENT_ZERO;
    return 0;
  case MAP_NORMAL:
    /* In an encrypted image a hole decrypts to garbage, not zeros. */
    if (img->m.lay.crypt_method)
      break;
    return host_status (img, m.host, type, run);
  default:
    break;
  }
  *type = 0;
  return 0;
}

int extents_walk (struct q2_image *img, uint64_t count, uint64_t offset, bool req_one,
                  q2_extent_fn fn, void *opaque)
{
  uint64_t end = offset + count, start = offset, run, len = 0;
  uint32_t type, cur = 0;
  int r;

  if (offset >= img->m.lay.virtual_size || count > img->m.lay.virtual_size - offset)
    return -EINVAL;
  /* Adjacent runs of one type are merged into one extent. */
  while (offset < end) {
    if ((r = extents_status (img, offset, end - offset, &type, &run)) < 0)
      return r;
    if (len && type != cur) {
      if ((r = fn (opaque, start, len, cur)) != 0)
        return r;
      if (req_one)
        return 0;
      start = offset;
      len = 0;
    }
    cur = type;
    len += run;
    offset += run;
  }
  return len ? fn (opaque, start, len, cur) : 0;
}
