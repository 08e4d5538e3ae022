/* SPDX-License-Identifier: BSD-3-Clause */
/* Cluster allocation on top of the refcounts: lowest free clusters first,
 * so that freed space near the start is reused and the end of the file
 * can be truncated.  Freeing a cluster whose reference is on disk is
 * deferred until the change dropping the reference is on disk too
 * (DESIGN.md, "Invariants").  Callers hold m->lock.
 */
#ifndef Q2_ALLOC_H
#define Q2_ALLOC_H

#include <stdbool.h>
#include <stdint.h>

#include "metakind.h"
#include "vector.h"

struct meta;

struct alloc {
  struct meta *m;
  uint64_t free_hint;         /* no cluster below this index is free */
  /* Decrements waiting for the metadata change that dropped their
   * reference to reach the disk: host offset | kind << 1 | punched.
   */
  struct u64_vector pending;
  /* Data clusters whose count fell to 1: their last reference may be an
   * active entry that needs COPIED (copied.h takes them).
   */
  struct u64_vector fell_to_one;
  /* While a repair raises counts: no cluster below this is handed out,
   * since counts there may still be lower than the references.
   */
  uint64_t floor;
  bool shrink_wanted;         /* clusters were freed since the last shrink */
  uint64_t clusters_freed;
  uint64_t refblocks_freed;
};

void alloc_init (struct alloc *a, struct meta *m);
void alloc_free (struct alloc *a);

/* Claims exactly n contiguous clusters (refcount 1 each). */
int alloc_contiguous (struct alloc *a, uint64_t n, uint64_t *offset);
/* Claims between 1 and max contiguous clusters at the lowest free place. */
int alloc_clusters (struct alloc *a, uint64_t max, uint64_t *offset, uint64_t *got);
/* Sets the count of cluster to value, giving it a refcount block first if
 * it has none: for a repair, which knows the references.
 */
int alloc_set_count (struct alloc *a, uint64_t cluster, uint64_t value);
/* Drops one reference now: only for references that are not on disk.
 * kind says what the cluster holds: a reference of one kind never drops
 * another's count, whatever a corrupt entry says.  *freed (may be NULL)
 * says the count reached zero.
 */
int alloc_release (struct alloc *a, uint64_t offset, enum meta_kind kind, bool *freed);
/* Drops one reference once the metadata that held it has been written;
 * punched says the host range is already a hole.
 */
int alloc_free_later (struct alloc *a, uint64_t offset, enum meta_kind kind, bool punched);
size_t alloc_pending (const struct alloc *a);
/* The deferred decrements, once what they wait for is on disk. */
int alloc_apply_pending (struct alloc *a);
/* Releases n clusters from offset whose only reference is gone from the
 * disk (synced), and gives their host space back.
 */
int alloc_release_range (struct alloc *a, uint64_t offset, uint64_t n);

/* Compaction's moves (DESIGN.md, "Compaction").  Each claims the lowest
 * free place and does nothing (*moved false, or *offset 0) when that is not
 * below the old one.
 */
/* n clusters at the lowest free place, if they end at or below limit. */
int alloc_claim_below (struct alloc *a, uint64_t n, uint64_t limit, uint64_t *offset);
/* The table at from (an L2 table or refcount block) copied to to, a
 * cluster just claimed, which now holds that kind; the caller names it
 * instead of from.  On failure to is given back and nothing changed.
 */
int alloc_adopt_table (struct alloc *a, enum meta_kind kind, uint64_t from, uint64_t to);
/* Refcount block idx to a lower cluster; the old one is freed later. */
int alloc_move_block (struct alloc *a, uint64_t idx, bool *moved);
/* The refcount table to a lower place, switched by the header. */
int alloc_move_reftable (struct alloc *a, bool *moved);

/* Drops refcount blocks that count nothing (but perhaps themselves) from
 * the refcount table, once the decrements that emptied them are on disk.
 */
int alloc_drop_empty_blocks (struct alloc *a);

#endif
