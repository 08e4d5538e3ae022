/* The open image: geometry read from the header, in-memory L1 and refcount
 * tables, the metadata cache and the locks.  Internal to the engine.
 */
#ifndef Q2_IMAGE_H
#define Q2_IMAGE_H

#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "qcow2reclaim.h"
#include "qcow2-format.h"
#include "hostio.h"
#include "cache.h"
#include "lock.h"
#include "overlap.h"
#include "u64list.h"

struct backing;

/* A table kept whole in memory (L1, refcount table) with per-sector dirt. */
struct mem_table {
  uint64_t *entries;
  uint64_t size;              /* entries in memory */
  uint64_t disk_size;         /* entries the table at offset has room for */
  uint64_t offset;            /* host offset */
  uint8_t *dirty;             /* one flag per 512-byte sector (64 entries) */
};

struct q2_image {
  struct hostfile hf;
  const char *name;           /* = hf.name, for messages */
  bool readonly;
  enum q2_discard_mode discard;
  enum q2_detect_zeroes detect_zeroes;

  /* Geometry and features from the header. */
  uint32_t version;
  uint32_t cluster_bits;
  uint64_t cluster_size;
  uint32_t l2_bits;           /* log2 of entries per L2 table */
  uint32_t refcount_order;    /* refcount width is 1 << order bits */
  uint32_t rb_bits;           /* log2 of counts per refcount block */
  uint64_t refcount_max;
  uint64_t virtual_size;
  uint64_t incompat, compat, autoclear;
  uint32_t header_length;
  int compression_type;
  uint32_t csize_shift;       /* compressed L2 entry: sector count position */
  uint64_t csize_mask, coffset_mask;
  uint32_t nb_snapshots;
  uint64_t snapshots_offset;

  struct mem_table l1;
  struct mem_table reftable;
  uint64_t reftable_clusters;

  struct meta_cache cache;
  struct meta_set meta;       /* clusters holding L2 tables and refcount blocks */

  /* Allocation state. */
  uint64_t file_end;          /* bytes: max(host file size, allocated end) */
  uint64_t free_hint;         /* no cluster below this index is free */
  bool growing_reftable;

  /* Decrements that wait until the L2/L1 changes dropping the references
   * are on disk (DESIGN.md: refcount >= references at every instant).
   */
  struct u64_list pending;    /* host offsets of single clusters */
  bool shrink_wanted;         /* clusters were freed since the last shrink */

  /* COPIED upkeep (copied.c). */
  struct u64_list fell_to_one;  /* data clusters whose count fell to 1 */
  struct shared_ref *shared;    /* active entries sharing a host cluster */
  size_t nshared, shared_cap;
  bool shared_scanned;
  bool punch_unsupported;     /* the host filesystem cannot punch holes */
  struct q2_stats stats;
  bool quiet_corruption;      /* looking ahead: do not log what is found */

  struct backing *backing;
  const struct q2_image *child; /* the image this one backs, while opening */

  pthread_mutex_t meta_lock;  /* L1, refcounts, cache, allocation */
  struct range_lock guest_lock;
};

static inline uint64_t l2_entries (const struct q2_image *img)
{
  return 1ull << img->l2_bits;
}

static inline uint64_t size_to_clusters (const struct q2_image *img, uint64_t n)
{
  return (n + img->cluster_size - 1) >> img->cluster_bits;
}

static inline uint64_t offset_in_cluster (const struct q2_image *img, uint64_t off)
{
  return off & (img->cluster_size - 1);
}

/* Corruption found: log it with the image name and return -EIO. */
int q2_corrupt (struct q2_image *img, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

/* Is [offset, offset+len) a valid place for a table or data cluster? */
int check_host_range (struct q2_image *img, uint64_t offset, uint64_t len,
                      enum meta_kind self, const char *what, uint64_t guest_offset);

/* Opens a backing image of the chain, depth images below the served one. */
int image_open_chain (const char *path, int depth, const struct q2_image *child,
                      struct q2_image **imgp);
/* qemu-img map's view of one run at offset, depth layers below the top. */
int image_map_status (struct q2_image *img, uint64_t offset, uint64_t len, int depth,
                      struct q2_map_entry *e);
/* Block status of one run starting at offset (at most len bytes). */
int image_block_status (struct q2_image *img, uint64_t offset, uint64_t len,
                        uint32_t *type, uint64_t *run);

#endif
