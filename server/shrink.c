/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "engine.h"
#include "log.h"
#include "refcount.h"
#include "shrink.h"

int shrink_used_end (struct q2_image *img, uint64_t *end)
{
  struct meta *m = &img->m;
  uint64_t idx = m->reftable.size, last, off;
  bool only_self;
  int r;

  *end = m->lay.cluster_size;
  while (idx-- > 0) {
    if ((r = refcount_block_offset (m, idx, &off)) < 0)
      return r;
    if (!off)
      continue;
    if ((r = refcount_block_scan (m, idx, UINT64_MAX, &last, NULL, &only_self)) < 0)
      return r;
    if (last != UINT64_MAX) {
      *end = (last + 1) << m->lay.cluster_bits;
      return 0;
    }
  }
  return 0;
}

int shrink_truncate (struct q2_image *img)
{
  struct meta *m = &img->m;
  uint64_t end, size;
  int r;

  assert (mutex_held (&m->lock));
  if ((r = shrink_used_end (img, &end)) < 0 || (r = host_size (&m->hf, &size)) < 0)
    return r;
  if (end >= size)
    return 0;
  if ((r = host_truncate (&m->hf, end)) < 0) {
    log_error ("%s: cannot truncate the file to %" PRIu64 " bytes: %s", m->lay.name,
               end, strerror (-r));
    return r;
  }
  m->lay.file_end = end;
  img->truncations++;
  img->bytes_truncated += size - end;
  return 0;
}
