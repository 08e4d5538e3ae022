/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "backing.h"
#include "cleanup.h"
#include "cluster.h"
#include "compress.h"
#include "crypto.h"
#include "engine.h"
#include "l2.h"
#include "read.h"
#include "request.h"

static int read_run (struct q2_image *img, const struct mapping *m, char *buf,
                     uint64_t offset)
{
  const struct layout *lay = &img->m.lay;
  uint64_t in = layout_in_cluster (lay, offset);
  int r;

  switch (m->kind) {
  case MAP_UNALLOC:
    if (img->backing)
      return backing_read (img->backing, buf, m->bytes, offset);
    /* fall through */
  case MAP_ZERO_PLAIN:
  case MAP_ZERO_ALLOC:
    memset (buf, 0, m->bytes);
    return 0;
  case MAP_NORMAL:
    r = crypto_pread (img->crypto, img->data, buf, m->bytes, m->host);
    return r < 0 ? request_io_error (img, "read", m->host, offset, r) : 0;
  case MAP_COMPRESSED: {
    CLEANUP_FREE char *cbuf = malloc (lay->cluster_size);
    if (!cbuf)
      return -ENOMEM;
    r = compress_read (&img->m.hf, lay, m->entry, offset - in, cbuf);
    if (r == 0)
      memcpy (buf, cbuf + in, m->bytes);
    return r;
  }
  }
  return -EIO;
}

int read_range (struct q2_image *img, void *buf, uint64_t count, uint64_t offset)
{
  struct rangelock_held h;
  struct mapping m;
  int r;

  l2_prefetch (img, offset);
  if ((r = request_check (img, count, offset)) < 0)
    return r;
  request_lock (img, &h, count, offset, false);
  while (count > 0 && r == 0) {
    if ((r = cluster_map_locked (img, offset, count, &m)) < 0)
      break;
    r = read_run (img, &m, buf, offset);
    buf = (char *) buf + m.bytes;
    offset += m.bytes;
    count -= m.bytes;
  }
  request_unlock (img, &h);
  return r;
}
