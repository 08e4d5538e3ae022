/* SPDX-License-Identifier: BSD-3-Clause */
/* The layout of an open image: its geometry, read from the header and
 * fixed for the life of the image, and where the metadata that every
 * offset is checked against lies (the header cluster, the L1 table, the
 * refcount table, the clusters holding L2 tables and refcount blocks, the
 * end of the file).  The layers that move or add metadata keep the second
 * part current, under the image's metadata lock.
 */
#ifndef Q2_LAYOUT_H
#define Q2_LAYOUT_H

#include <stdbool.h>
#include <stdint.h>

#include "overlap.h"

struct layout {
  const char *name;           /* the image file, for messages */

  uint32_t version;
  uint32_t cluster_bits;
  uint64_t cluster_size;
  uint32_t l2_bits;           /* log2 of entries per L2 table */
  /* Extended L2 entries: 16 bytes, the second word a bitmap of 32
   * subclusters (low half allocated, high half reads as zero).  Without
   * them a cluster is one subcluster.
   */
  bool extl2;
  uint32_t refcount_order;    /* refcount width is 1 << order bits */
  uint32_t rb_bits;           /* log2 of counts per refcount block */
  uint64_t refcount_max;
  uint64_t virtual_size;
  uint64_t incompat, compat, autoclear;
  uint32_t header_length;
  /* An external data file holds the guest clusters at their guest offsets,
   * with no refcounts; raw: it reads as the guest disk at every moment.
   */
  bool data_file, data_raw;
  int compression_type;
  uint32_t csize_shift;       /* compressed L2 entry: sector count position */
  uint64_t csize_mask, coffset_mask;
  uint32_t nb_snapshots;
  uint64_t snapshots_offset;
  /* LUKS encryption (crypt_method CRYPT_LUKS): where the LUKS header and
   * its key material lie, in clusters of their own (0 length: none).
   */
  uint32_t crypt_method;
  uint64_t crypto_offset, crypto_length;
  /* The persistent bitmaps' directory, when the autoclear bit says the
   * extension is valid (0 bitmaps otherwise); bitmap_ext is where the
   * extension's data starts in the first cluster (compaction moves the
   * directory, and switches its offset there).
   */
  uint32_t nb_bitmaps;
  uint64_t bitmap_dir_offset, bitmap_dir_size, bitmap_ext;

  uint64_t l1_offset;
  uint64_t l1_entries;
  uint64_t reftable_offset;
  uint64_t reftable_clusters;
  uint64_t file_end;          /* bytes: max(host file size, allocated end) */
  struct overlap meta;        /* clusters holding L2 tables and refcount blocks */
};

static inline uint64_t layout_l2_entries (const struct layout *lay)
{
  return 1ull << lay->l2_bits;
}

static inline uint64_t layout_l2_entry_bytes (const struct layout *lay)
{
  return lay->extl2 ? 16 : 8;
}

static inline uint32_t layout_sc_bits (const struct layout *lay)
{
  return lay->cluster_bits - (lay->extl2 ? 5 : 0);
}

static inline uint64_t layout_sc_size (const struct layout *lay)
{
  return 1ull << layout_sc_bits (lay);
}

/* Clusters needed to hold n bytes. */
static inline uint64_t layout_clusters (const struct layout *lay, uint64_t n)
{
  return (n + lay->cluster_size - 1) >> lay->cluster_bits;
}

static inline uint64_t layout_in_cluster (const struct layout *lay, uint64_t off)
{
  return off & (lay->cluster_size - 1);
}

static inline uint64_t layout_l1_index (const struct layout *lay, uint64_t guest)
{
  return guest >> (lay->cluster_bits + lay->l2_bits);
}

static inline uint64_t layout_l2_index (const struct layout *lay, uint64_t guest)
{
  return (guest >> lay->cluster_bits) & (layout_l2_entries (lay) - 1);
}

/* Entries the refcount table has room for. */
static inline uint64_t layout_reftable_entries (const struct layout *lay)
{
  return (lay->reftable_clusters << lay->cluster_bits) / 8;
}

/* Where the bytes of a compressed L2 entry lie in the file. */
static inline void layout_compressed_extent (const struct layout *lay, uint64_t entry,
                                             uint64_t *offset, uint64_t *len)
{
  uint64_t sectors = ((entry >> lay->csize_shift) & lay->csize_mask) + 1;

  *offset = entry & lay->coffset_mask;
  *len = sectors * 512 - (*offset & 511);
}

#endif
