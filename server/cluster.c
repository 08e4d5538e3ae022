#include <config.h>

#include <errno.h>

#include "image.h"
#include "cluster.h"
#include "l2.h"
#include "log.h"

void compressed_extent (const struct q2_image *img, uint64_t entry,
                        uint64_t *offset, uint64_t *len)
{
  uint64_t sectors = ((entry >> img->csize_shift) & img->csize_mask) + 1;

  *offset = entry & img->coffset_mask;
  *len = sectors * 512 - (*offset & 511);
}

static int classify (struct q2_image *img, uint64_t guest, uint64_t entry,
                     enum map_kind *kind)
{
  uint64_t off = entry & L2E_OFFSET_MASK;

  if (entry & QCOW_OFLAG_COMPRESSED) {
    uint64_t coff, clen;
    compressed_extent (img, entry, &coff, &clen);
    *kind = MAP_COMPRESSED;
    if (entry & QCOW_OFLAG_COPIED)
      return q2_corrupt (img, "compressed L2 entry for guest offset 0x%" PRIx64
                         " has the COPIED bit set", guest);
    return check_host_range (img, coff, clen, META_NONE, "compressed L2 entry", guest);
  }
  if (entry & L2E_RESERVED_MASK || off & (img->cluster_size - 1))
    return q2_corrupt (img, "L2 entry 0x%" PRIx64 " for guest offset 0x%" PRIx64
                       " has reserved bits set or an unaligned offset", entry, guest);
  if (entry & QCOW_OFLAG_ZERO) {
    if (img->version < 3)
      return q2_corrupt (img, "zero cluster entry for guest offset 0x%" PRIx64
                         " in a version 2 image", guest);
    *kind = off ? MAP_ZERO_ALLOC : MAP_ZERO_PLAIN;
  }
  else
    *kind = off ? MAP_NORMAL : MAP_UNALLOC;
  if (off == 0)
    return 0;
  return check_host_range (img, off, img->cluster_size, META_NONE, "L2 entry", guest);
}

/* Can the next cluster join the run? */
static bool same_run (const struct mapping *m, enum map_kind kind, uint64_t entry,
                      uint64_t expect_host, const struct q2_image *img)
{
  if (kind != m->kind)
    return false;
  switch (kind) {
  case MAP_UNALLOC:
  case MAP_ZERO_PLAIN:
    return true;
  case MAP_NORMAL:
    return (entry & L2E_OFFSET_MASK) == expect_host &&
      !!(entry & QCOW_OFLAG_COPIED) == m->copied;
  default:
    (void) img;
    return false;
  }
}

int map_get (struct q2_image *img, uint64_t offset, uint64_t bytes, struct mapping *m)
{
  struct cache_entry *e;
  uint64_t in = offset_in_cluster (img, offset);
  uint64_t idx = l2_index (img, offset), n, limit;
  enum map_kind kind;
  int r;

  if ((r = l2_table_get (img, offset, &e)) < 0)
    return r;
  limit = (l2_entries (img) - idx) * img->cluster_size - in;
  if (bytes > limit)
    bytes = limit;
  m->entry = e ? l2_entry_get (e, idx) : 0;
  if ((r = classify (img, offset, m->entry, &m->kind)) < 0)
    goto out;
  m->copied = !!(m->entry & QCOW_OFLAG_COPIED);
  m->host = (m->entry & L2E_OFFSET_MASK) + in;
  m->bytes = img->cluster_size - in;
  for (n = 1; m->bytes < bytes; n++) {
    uint64_t entry = e ? l2_entry_get (e, idx + n) : 0;
    uint64_t guest = offset - in + n * img->cluster_size;
    /* A bad entry ends the run quietly; it is reported when reached. */
    img->quiet_corruption = true;
    r = classify (img, guest, entry, &kind);
    img->quiet_corruption = false;
    if (r < 0) {
      r = 0;
      break;
    }
    if (!same_run (m, kind, entry, (m->entry & L2E_OFFSET_MASK) +
                   n * img->cluster_size, img))
      break;
    m->bytes += img->cluster_size;
  }
  if (m->bytes > bytes)
    m->bytes = bytes;
out:
  if (e)
    cache_put (e);
  return r;
}

int map_get_locked (struct q2_image *img, uint64_t offset, uint64_t bytes,
                    struct mapping *m)
{
  int r;

  pthread_mutex_lock (&img->meta_lock);
  r = map_get (img, offset, bytes, m);
  pthread_mutex_unlock (&img->meta_lock);
  return r;
}
