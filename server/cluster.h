/* Guest-to-host mapping: what a run of guest clusters is (unallocated,
 * zero, normal, compressed) and where its data lives.  Callers hold meta_lock.
 */
#ifndef Q2_CLUSTER_H
#define Q2_CLUSTER_H

#include <stdbool.h>
#include <stdint.h>

struct q2_image;

enum map_kind {
  MAP_UNALLOC,        /* backing file or zeros */
  MAP_ZERO_PLAIN,     /* reads as zero, nothing allocated */
  MAP_ZERO_ALLOC,     /* reads as zero, host cluster kept */
  MAP_NORMAL,
  MAP_COMPRESSED,
};

struct mapping {
  enum map_kind kind;
  uint64_t entry;     /* L2 entry of the first cluster */
  uint64_t host;      /* NORMAL, ZERO_ALLOC: host offset of the first byte */
  uint64_t bytes;     /* length of the run, from the requested offset */
  bool copied;        /* every cluster of the run has refcount 1 */
};

/* Describes the longest run starting at offset (at most bytes long, within
 * one L2 table) whose clusters are alike and, if allocated, contiguous.
 */
int map_get (struct q2_image *img, uint64_t offset, uint64_t bytes, struct mapping *m);
/* The same, taking meta_lock for the lookup. */
int map_get_locked (struct q2_image *img, uint64_t offset, uint64_t bytes,
                    struct mapping *m);

/* Decodes a compressed entry: start and length of the compressed bytes. */
void compressed_extent (const struct q2_image *img, uint64_t entry,
                        uint64_t *offset, uint64_t *len);

#endif
