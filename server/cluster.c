/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>

#include "qcow2-format.h"
#include "cleanup.h"
#include "cluster.h"
#include "corrupt.h"
#include "engine.h"
#include "l2.h"

/* A bitmap QEMU would refuse: subclusters both allocated and zero,
 * allocated ones without a host cluster, any bit on a compressed cluster.
 */
static int check_bitmap (const struct layout *lay, uint64_t guest, uint64_t entry,
                         uint64_t bitmap, enum map_kind kind)
{
  const char *what = NULL;

  if (!lay->extl2)
    return 0;
  if (kind == MAP_COMPRESSED && bitmap)
    what = "a compressed cluster with subcluster bits set";
  else if ((bitmap >> 32) & bitmap)
    what = "subclusters both allocated and zero";
  else if (kind == MAP_UNALLOC && (bitmap & L2_BITMAP_ALLOC))
    what = "allocated subclusters without a host cluster";
  if (!what)
    return 0;
  return corrupt_error (lay, "the extended L2 entry for guest offset 0x%" PRIx64
                        " (bitmap 0x%016" PRIx64 ") has %s", guest, bitmap, what);
}

bool cluster_has_host (const struct q2_image *img, uint64_t entry)
{
  return (entry & L2E_OFFSET_MASK) ||
    (img->m.lay.data_file && (entry & QCOW_OFLAG_COPIED));
}

static int classify_entry (struct q2_image *img, uint64_t guest, uint64_t entry,
                           enum map_kind *kind)
{
  const struct layout *lay = &img->m.lay;
  uint64_t off = entry & L2E_OFFSET_MASK;
  bool alloc;

  if ((entry & QCOW_OFLAG_COMPRESSED) && lay->data_file)
    return corrupt_error (lay, "compressed L2 entry for guest offset 0x%" PRIx64
                          " in an image with an external data file", guest);
  if (entry & QCOW_OFLAG_COMPRESSED) {
    uint64_t coff, clen;
    layout_compressed_extent (lay, entry, &coff, &clen);
    *kind = MAP_COMPRESSED;
    if (entry & QCOW_OFLAG_COPIED)
      return corrupt_error (lay, "compressed L2 entry for guest offset 0x%" PRIx64
                            " has the COPIED bit set", guest);
    return corrupt_check_range (lay, coff, clen, META_DATA, "compressed L2 entry", guest);
  }
  if (entry & L2E_RESERVED_MASK || off & (lay->cluster_size - 1))
    return corrupt_error (lay, "L2 entry 0x%" PRIx64 " for guest offset 0x%" PRIx64
                          " has reserved bits set or an unaligned offset", entry, guest);
  alloc = cluster_has_host (img, entry);
  /* With subclusters, bit 0 means nothing: the bitmap says what is zero. */
  if ((entry & QCOW_OFLAG_ZERO) && !lay->extl2) {
    if (lay->version < 3)
      return corrupt_error (lay, "zero cluster entry for guest offset 0x%" PRIx64
                            " in a version 2 image", guest);
    *kind = alloc ? MAP_ZERO_ALLOC : MAP_ZERO_PLAIN;
  }
  else
    *kind = alloc ? MAP_NORMAL : MAP_UNALLOC;
  if (!alloc)
    return 0;
  /* QEMU puts every cluster of a data file at its guest offset, and
   * writes here rely on it (a new cluster goes to its guest offset).
   */
  if (lay->data_file)
    return off == (guest & ~(lay->cluster_size - 1)) ? 0 :
      corrupt_error (lay, "L2 entry for guest offset 0x%" PRIx64 " points to offset 0x%"
                     PRIx64 " of the external data file, not to the same offset", guest, off);
  return corrupt_check_range (lay, off, lay->cluster_size, META_DATA, "L2 entry", guest);
}

/* The kind of a cluster (with extended L2 entries: MAP_NORMAL if it has a
 * host cluster, MAP_UNALLOC if not, or MAP_COMPRESSED).
 */
static int classify (struct q2_image *img, uint64_t guest, uint64_t entry, uint64_t bitmap,
                     enum map_kind *kind)
{
  int r = classify_entry (img, guest, entry, kind);

  return r < 0 ? r : check_bitmap (&img->m.lay, guest, entry, bitmap, *kind);
}

/* The kind of subcluster s of a cluster of kind ck. */
static enum map_kind sub_kind (const struct layout *lay, enum map_kind ck, uint64_t bitmap,
                               unsigned s)
{
  if (!lay->extl2 || ck == MAP_COMPRESSED)
    return ck;
  if ((bitmap >> 32 >> s) & 1)
    return ck == MAP_NORMAL ? MAP_ZERO_ALLOC : MAP_ZERO_PLAIN;
  return (bitmap >> s) & 1 ? MAP_NORMAL : MAP_UNALLOC;
}

/* The first subcluster from s on whose kind is not kind (or the count). */
static unsigned sub_run_end (const struct layout *lay, enum map_kind ck, uint64_t bitmap,
                             unsigned s, enum map_kind kind)
{
  unsigned per = lay->extl2 ? L2_SUBCLUSTERS : 1;

  while (s < per && sub_kind (lay, ck, bitmap, s) == kind)
    s++;
  return s;
}

/* Can the next cluster join the run? */
static bool same_run (const struct q2_image *img, const struct mapping *m,
                      enum map_kind kind, uint64_t entry, uint64_t expect_host)
{
  if (kind != m->kind)
    return false;
  switch (kind) {
  case MAP_UNALLOC:
    /* Not over a host cluster whose other subclusters hold data. */
    return !cluster_has_host (img, entry) && !cluster_has_host (img, m->entry);
  case MAP_ZERO_PLAIN:
    return true;
  case MAP_NORMAL:
    return (entry & L2E_OFFSET_MASK) == expect_host &&
      !!(entry & QCOW_OFLAG_COPIED) == m->copied;
  default:
    return false;
  }
}

int cluster_map (struct q2_image *img, uint64_t offset, uint64_t bytes, struct mapping *m)
{
  const struct layout *lay = &img->m.lay;
  uint64_t in = layout_in_cluster (lay, offset), scs = layout_sc_size (lay);
  uint64_t idx = layout_l2_index (lay, offset), n, limit;
  unsigned per = lay->extl2 ? L2_SUBCLUSTERS : 1, s;
  struct cache_entry *e;
  enum map_kind ck;
  int r;

  if ((r = l2_get (img, offset, &e)) < 0)
    return r;
  limit = (layout_l2_entries (lay) - idx) * lay->cluster_size - in;
  if (bytes > limit)
    bytes = limit;
  m->entry = e ? l2_entry_get (img, e, idx) : 0;
  m->bitmap = e ? l2_bitmap_get (img, e, idx) : 0;
  if ((r = classify (img, offset, m->entry, m->bitmap, &ck)) < 0)
    goto out;
  s = in >> layout_sc_bits (lay);
  m->kind = sub_kind (lay, ck, m->bitmap, s);
  m->copied = !!(m->entry & QCOW_OFLAG_COPIED);
  m->host = (m->entry & L2E_OFFSET_MASK) + in;
  s = sub_run_end (lay, ck, m->bitmap, s + 1, m->kind);
  m->bytes = ((uint64_t) s << layout_sc_bits (lay)) - in;
  for (n = 1; s == per && m->bytes < bytes; n++) {
    uint64_t entry = e ? l2_entry_get (img, e, idx + n) : 0;
    uint64_t bitmap = e ? l2_bitmap_get (img, e, idx + n) : 0;
    uint64_t guest = offset - in + n * lay->cluster_size;
    /* A bad entry ends the run quietly; it is reported when reached. */
    bool quiet = corrupt_quiet (true);
    r = classify (img, guest, entry, bitmap, &ck);
    corrupt_quiet (quiet);
    if (r < 0) {
      r = 0;
      break;
    }
    if (!same_run (img, m, sub_kind (lay, ck, bitmap, 0), entry,
                   (m->entry & L2E_OFFSET_MASK) + n * lay->cluster_size))
      break;
    s = sub_run_end (lay, ck, bitmap, 1, m->kind);
    m->bytes += (uint64_t) s * scs;
  }
  if (m->bytes > bytes)
    m->bytes = bytes;
out:
  if (e)
    l2_put (img, e);
  return r;
}

int cluster_map_locked (struct q2_image *img, uint64_t offset, uint64_t bytes,
                        struct mapping *m)
{
  LOCK_FOR_SCOPE (&img->m.lock);
  return cluster_map (img, offset, bytes, m);
}

int cluster_unref_later (struct q2_image *img, uint64_t entry, bool punched)
{
  const struct layout *lay = &img->m.lay;
  uint64_t off, len, c;
  int r = 0;

  /* Clusters of a data file have no refcounts. */
  if (lay->data_file)
    return 0;
  if (entry & QCOW_OFLAG_COMPRESSED) {
    layout_compressed_extent (lay, entry, &off, &len);
    for (c = off & ~(lay->cluster_size - 1); c < off + len && r == 0; c += lay->cluster_size)
      r = alloc_free_later (&img->alloc, c, META_DATA, punched);
    return r;
  }
  off = entry & L2E_OFFSET_MASK;
  return off ? alloc_free_later (&img->alloc, off, META_DATA, punched) : 0;
}
