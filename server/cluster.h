/* SPDX-License-Identifier: BSD-3-Clause */
/* Guest clusters: what a run of them is (unallocated, zero, normal,
 * compressed) and where its data lives, and the references an L2 entry
 * holds.  Callers hold img->m.lock, except for cluster_map_locked.
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
  uint64_t bitmap;    /* its subcluster bitmap (extended L2 entries; else 0) */
  uint64_t host;      /* NORMAL, ZERO_ALLOC: host offset of the first byte */
  uint64_t bytes;     /* length of the run, from the requested offset */
  bool copied;        /* every cluster of the run has refcount 1 */
};

/* Describes the longest run starting at offset (at most bytes long, within
 * one L2 table) whose clusters are alike and, if allocated, contiguous.
 * With extended L2 entries the kind is the subclusters' (a subcluster
 * neither allocated nor zero is MAP_UNALLOC even in a cluster with a host
 * offset); unallocated runs join only clusters without one.
 */
int cluster_map (struct q2_image *img, uint64_t offset, uint64_t bytes, struct mapping *m);
/* The same, taking the metadata lock for the lookup. */
int cluster_map_locked (struct q2_image *img, uint64_t offset, uint64_t bytes,
                        struct mapping *m);

/* Whether an L2 entry (not compressed) names a host cluster: in a data
 * file, cluster 0 lives at offset 0, and COPIED says it is there.
 */
bool cluster_has_host (const struct q2_image *img, uint64_t entry);

/* Drops the references an L2 entry held, once the entry replacing it is on
 * disk; punched says their host range is already a hole.
 */
int cluster_unref_later (struct q2_image *img, uint64_t entry, bool punched);

#endif
