/* SPDX-License-Identifier: BSD-3-Clause */
/* The open image as the layers from the mapping up see it: the metadata
 * and allocation state below, and what the requests need besides (the
 * backing chain, the guest range locks, the options).  Lower layers never
 * see this structure; they are handed the parts they work on.
 *
 * Locks, outermost first (DESIGN.md, "Concurrency"):
 *   guest_lock   guest cluster ranges of requests in flight
 *   m.lock       all metadata and allocation state (m, alloc, copied,
 *                and the counters below)
 *   the host file's ring_lock, inside host I/O only.
 */
#ifndef Q2_ENGINE_H
#define Q2_ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include "qcow2reclaim.h"
#include "alloc.h"
#include "rangelock.h"
#include "writeback.h"

#define L2_HINTS 256

struct backing;
struct bitmaps;
struct compact;
struct copied;
struct crypto;

/* What trims (and write-zeroes that may trim) asked for, and the bytes of
 * it that gave nothing back, by reason (discard.c decides them).
 */
struct trim_counts {
  uint64_t asked;
  uint64_t snapshot;          /* shared with an internal snapshot */
  uint64_t backing;           /* unallocated over a backing file: nothing of ours */
  uint64_t small;             /* parts of host blocks, at the edges of a partial trim */
  uint64_t already_free;      /* unallocated, or already reading zeros */
  uint64_t compressed;        /* parts of compressed clusters */
  uint64_t encrypted;         /* parts of clusters of an encrypted image */
};

struct q2_image {
  struct meta m;
  /* Where guest clusters live: the image's own file (&m.hf), or the
   * external data file (data_hf), where host offset = guest offset.
   */
  struct hostfile *data;
  struct hostfile data_hf;
  struct alloc alloc;
  struct copied *copied;      /* COPIED upkeep (copied.h) */
  struct compact *compact;    /* compaction (compact.h) */
  /* The user's q2_options.worker_notify, for the worker of punches. */
  void (*notify) (void *opaque, bool pass_end);
  void *notify_opaque;
  struct punch *punch;        /* the deferred punches' worker (punch.h) */
  struct backing *backing;    /* NULL: unallocated clusters read as zeros */
  struct bitmaps *bitmaps;    /* persistent bitmaps (bitmap.h); NULL: none */
  /* The cipher of a LUKS-encrypted image's data (crypto.h); NULL: not
   * encrypted, or opened for its metadata only (lay.crypt_method says).
   */
  struct crypto *crypto;
  struct rangelock guest_lock;
  /* Where the L2 table of an L1 slot (index modulo L2_HINTS) was last
   * found in the cache.  Written under m.lock, read without it, and only
   * to prefetch the entry a request will look up (l2_prefetch): a stale
   * pointer costs a wasted prefetch, never a wrong answer.
   */
  const void *l2_hints[L2_HINTS];

  bool readonly;
  bool repair;                /* opened for q2_repair: no guest writes */
  char *backing_name;         /* as the header names it; NULL: none */
  char *data_name;            /* the external data file, as the header names it */
  char backing_format[32];    /* as the header names it; empty: none */
  enum q2_discard_mode discard;
  enum q2_detect_zeroes detect_zeroes;

  /* Counters of the operations above allocation (the rest live with the
   * layer that counts them).
   */
  uint64_t l2_tables_freed;
  uint64_t truncations;
  uint64_t bytes_truncated;
  struct trim_counts trims;   /* atomics: added to at the end of each request */
};

#endif
