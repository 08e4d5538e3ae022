/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <string.h>

#include "qcow2-format.h"

#include "backing.h"
#include "cluster.h"
#include "engine.h"
#include "map.h"

static void from_mapping (const struct q2_image *img, const struct mapping *m,
                          struct q2_map_entry *e)
{
  e->file = img->data->name;
  e->present = true;
  e->zero = m->kind == MAP_ZERO_PLAIN || m->kind == MAP_ZERO_ALLOC;
  e->data = m->kind == MAP_NORMAL || m->kind == MAP_COMPRESSED;
  e->has_offset = m->kind == MAP_NORMAL || m->kind == MAP_ZERO_ALLOC;
  e->offset = m->host;
}

int map_status (struct q2_image *img, uint64_t offset, uint64_t len, int depth,
                struct q2_map_entry *e)
{
  struct mapping m;
  int r;

  if ((r = cluster_map_locked (img, offset, len, &m)) < 0)
    return r;
  memset (e, 0, sizeof *e);
  e->start = offset;
  e->length = m.bytes;
  e->depth = depth;
  if (m.kind != MAP_UNALLOC) {
    from_mapping (img, &m, e);
    return 0;
  }
  e->zero = true;
  e->file = img->m.lay.name;
  /* An unallocated subcluster of a cluster that has a host offset: qemu-img
   * map gives the offset it would have.
   */
  if (!img->backing && cluster_has_host (img, m.entry)) {
    e->has_offset = true;
    e->offset = m.host;
  }
  if (!img->backing)
    return 0;
  r = backing_map_status (img->backing, offset, m.bytes, depth + 1, e);
  e->start = offset;
  return r;
}

int map_walk (struct q2_image *img, q2_map_fn fn, void *opaque)
{
  uint64_t size = img->m.lay.virtual_size, off = 0;
  struct q2_map_entry cur = { 0 }, e;
  int r;

  while (off < size) {
    if ((r = map_status (img, off, size - off, 0, &e)) < 0)
      return r;
    /* Merge runs that continue each other, as qemu-img map does. */
    if (cur.length && cur.depth == e.depth && cur.present == e.present &&
        cur.zero == e.zero && cur.data == e.data && cur.has_offset == e.has_offset &&
        cur.file == e.file && (!e.has_offset || cur.offset + cur.length == e.offset))
      cur.length += e.length;
    else {
      if (cur.length && (r = fn (opaque, &cur)) != 0)
        return r;
      cur = e;
    }
    off += e.length;
  }
  return cur.length ? fn (opaque, &cur) : 0;
}
