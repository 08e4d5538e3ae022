/* The guest-to-host map for `qcow2reclaim map`, in qemu-img map's terms:
 * which layer of the chain provides each range, and where its data is.
 */
#include <config.h>

#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "image.h"
#include "backing.h"
#include "cluster.h"

static void from_mapping (const struct q2_image *img, const struct mapping *m,
                          struct q2_map_entry *e)
{
  e->file = img->name;
  e->present = true;
  e->zero = m->kind == MAP_ZERO_PLAIN || m->kind == MAP_ZERO_ALLOC;
  e->data = m->kind == MAP_NORMAL || m->kind == MAP_COMPRESSED;
  e->has_offset = m->kind == MAP_NORMAL || m->kind == MAP_ZERO_ALLOC;
  e->offset = m->host;
}

/* One run at offset, looking through the backing chain where unallocated. */
int image_map_status (struct q2_image *img, uint64_t offset, uint64_t len, int depth,
                      struct q2_map_entry *e)
{
  struct mapping m;
  int r;

  if ((r = map_get_locked (img, offset, len, &m)) < 0)
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
  e->file = img->name;
  if (!img->backing)
    return 0;
  r = backing_map_status (img->backing, offset, m.bytes, depth + 1, e);
  e->start = offset;
  return r;
}

int q2_map (struct q2_image *img, q2_map_fn fn, void *opaque)
{
  struct q2_map_entry cur = { 0 }, e;
  uint64_t off = 0;
  int r;

  while (off < img->virtual_size) {
    if ((r = image_map_status (img, off, img->virtual_size - off, 0, &e)) < 0)
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

const char *q2_file_name (const struct q2_image *img)
{
  return img->name;
}

int q2_file_size (struct q2_image *img, uint64_t *size)
{
  return host_size (&img->hf, size);
}

uint32_t q2_format_version (const struct q2_image *img)
{
  return img->version;
}

uint32_t q2_snapshot_count (const struct q2_image *img)
{
  return img->nb_snapshots;
}
