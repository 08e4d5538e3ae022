/* SPDX-License-Identifier: BSD-3-Clause */
/* Discard and write-zeroes (DESIGN.md, "Semantics").
 *
 * Whole clusters lose their L2 entry (or get the zero flag where a backing
 * file would show through); clusters only we reference are punched at once
 * (in an encrypted image only when their deferred free runs: the old entry
 * would decrypt a hole to garbage), their refcount drops once the L2 change
 * is on disk.  Parts of clusters are
 * punched on host block boundaries, and a cluster that has become all hole
 * is freed like a whole one.  For a TRIM that punch is deferred while a
 * worker takes it (host_release_later; punch.c): the request is answered
 * at once, and discard_if_hole frees the cluster once the worker punched.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-format.h"
#include "cleanup.h"
#include "cluster.h"
#include "corrupt.h"
#include "cow.h"
#include "discard.h"
#include "engine.h"
#include "l2.h"
#include "log.h"
#include "request.h"
#include "vector.h"

#define HOST_BLOCK 4096u

enum op { OP_DISCARD, OP_ZERO };

struct reclaim {
  struct q2_image *img;
  enum op op;
  bool release;               /* give clusters up (discard, or zero + MAY_TRIM) */
  bool keep;                  /* discard=keep: zero flag, allocation kept */
  bool fast;                  /* FAST_ZERO: never write data */
  bool shared_seen;           /* a snapshot kept some of the space */
  bool apply_frees;           /* zeroes written by copy-on-write left many frees */
  uint64_t punch_start, punch_len;
  bool punch_mapped;          /* the pending punch is of clusters still named */
  uint64_t l1_pending;        /* L2 table to check for emptiness */
  bool cleared;               /* an entry of it became 0: only then can it be empty */
  struct trim_counts counts;  /* this request's, added to the image's at its end */
  /* Clusters whose entries are gone but whose punch may still be queued:
   * they are handed to the deferred frees only after every punch of the
   * request ran, or a flush could free them, a write reuse them, and the
   * late punch wipe the new data.
   */
  struct u64_vector unref;
};

static int zero_failed (struct q2_image *img, uint64_t offset, uint64_t len, int r)
{
  log_error ("%s: cannot zero host offset 0x%" PRIx64 "+%" PRIu64 ": %s",
             img->data->name, offset, len, strerror (-r));
  return r;
}

/* Gives a range of guest data back.  'mapped': the range stays named by
 * an entry (part of a cluster, or a cluster discard=keep or a v2 backing
 * file keeps), so only a punch, which leaves zeros, will do, and after
 * write-zeroes it must read zeros: where the host cannot punch, it is
 * written with zeros.  A raw data file must read zeros at once, as what
 * qcow2 serves does.  Elsewhere (a cluster whose entry is gone) any way
 * of freeing it is good.
 */
static int release_data (struct reclaim *rc, uint64_t offset, uint64_t len, bool mapped)
{
  struct q2_image *img = rc->img;
  bool zeros = img->m.lay.data_raw || (mapped && rc->op == OP_ZERO);
  int r;

  if (len == 0)
    return 0;
  if (!mapped && !img->m.lay.data_raw) {
    host_release (img->data, offset, len);
    return 0;
  }
  if (host_release_zeros (img->data, offset, len) == 0 || !zeros)
    return 0;
  return (r = host_zero (img->data, offset, len)) < 0 ? zero_failed (img, offset, len, r) : 0;
}

/* Bytes of a trim that give nothing back, and why: counted only where
 * space was asked for (a trim, or write-zeroes that may trim).
 */
static void not_freed (struct reclaim *rc, uint64_t *reason, uint64_t len)
{
  if (rc->release)
    *reason += len;
}

static void counts_add (struct trim_counts *to, const struct trim_counts *c)
{
  __atomic_add_fetch (&to->asked, c->asked, __ATOMIC_RELAXED);
  __atomic_add_fetch (&to->snapshot, c->snapshot, __ATOMIC_RELAXED);
  __atomic_add_fetch (&to->backing, c->backing, __ATOMIC_RELAXED);
  __atomic_add_fetch (&to->small, c->small, __ATOMIC_RELAXED);
  __atomic_add_fetch (&to->already_free, c->already_free, __ATOMIC_RELAXED);
  __atomic_add_fetch (&to->compressed, c->compressed, __ATOMIC_RELAXED);
  __atomic_add_fetch (&to->encrypted, c->encrypted, __ATOMIC_RELAXED);
}

/* Adjacent punches of one request become one fallocate call. */
static int punch_add (struct reclaim *rc, uint64_t offset, uint64_t len, bool mapped)
{
  int r;

  if (rc->punch_len && rc->punch_start + rc->punch_len == offset &&
      rc->punch_mapped == mapped) {
    rc->punch_len += len;
    return 0;
  }
  r = release_data (rc, rc->punch_start, rc->punch_len, rc->punch_mapped);
  rc->punch_start = offset;
  rc->punch_len = len;
  rc->punch_mapped = mapped;
  return r;
}

/* The entry that reads as zeros without any allocation, if there is one:
 * v2 images with a backing file have none.
 */
static bool zero_entry (const struct q2_image *img, uint64_t *e, uint64_t *bitmap)
{
  *bitmap = 0;
  if (!img->backing)
    *e = 0;
  else if (img->m.lay.extl2) {
    /* Bit 0 means nothing there: every subcluster reads as zero instead. */
    *e = 0;
    *bitmap = L2_BITMAP_ZERO;
  }
  else if (img->m.lay.version >= 3)
    *e = QCOW_OFLAG_ZERO;
  else
    return false;
  return true;
}

static int set_entry (struct reclaim *rc, uint64_t guest, uint64_t old, uint64_t e,
                      uint64_t bitmap, bool free_old, bool punched)
{
  struct q2_image *img = rc->img;
  uint64_t idx = layout_l2_index (&img->m.lay, guest);
  struct cache_entry *t;
  int r;

  rc->cleared |= e == 0 && bitmap == 0;
  LOCK_FOR_SCOPE (&img->m.lock);
  if ((r = l2_get_writable (img, guest, &t)) < 0)
    return r;
  l2_entry_set (img, t, idx, e);
  if (img->m.lay.extl2)
    l2_bitmap_set (img, t, idx, bitmap);
  l2_put (img, t);
  return free_old ? cluster_unref_later (img, old, punched) : 0;
}

static int release_unrefs (struct reclaim *rc)
{
  size_t i;
  int r = 0;

  if (!rc->unref.len)
    return 0;
  mutex_lock (&rc->img->m.lock);
  for (i = 0; i < rc->unref.len && r == 0; i++)
    r = alloc_free_later (&rc->img->alloc, rc->unref.ptr[i], META_DATA, true);
  mutex_unlock (&rc->img->m.lock);
  u64_vector_reset (&rc->unref);
  return r;
}

static int write_zeros (struct reclaim *rc, uint64_t guest, uint64_t len)
{
  if (rc->fast)
    return -ENOTSUP;
  CLEANUP_FREE char *z = calloc (1, len);
  if (!z)
    return -ENOMEM;
  bool more = false;
  int r = cow_write (rc->img, z, len, guest, &more);

  rc->apply_frees |= more;
  return r;
}

/* A whole cluster that is ours alone, with data. */
static int whole_owned (struct reclaim *rc, uint64_t guest, const struct mapping *m)
{
  struct q2_image *img = rc->img;
  uint64_t host = m->entry & L2E_OFFSET_MASK, cs = img->m.lay.cluster_size, e, bm;
  bool v3 = img->m.lay.version >= 3;
  int r;

  if (rc->release && !rc->keep && zero_entry (img, &e, &bm)) {
    /* Until the new entry is on disk a crash leaves the old one, which
     * would decrypt a hole to garbage: the deferred free punches the
     * cluster once the entry is synced (alloc_apply_pending).
     */
    if (img->crypto)
      return set_entry (rc, guest, m->entry, e, bm, true, false);
    if (!img->m.lay.data_file && (r = u64_vector_append (&rc->unref, host)) < 0)
      return r;
    if ((r = punch_add (rc, host, cs, false)) < 0)
      return r;
    return set_entry (rc, guest, m->entry, e, bm, false, false);
  }
  if (m->kind == MAP_ZERO_ALLOC) {
    /* discard=keep punched it when it got the zero flag. */
    not_freed (rc, &rc->counts.already_free, cs);
    return 0;
  }
  /* Without a zero flag (v2) the entry keeps naming the cluster, and
   * neither a hole nor zeros there decrypt to zeros.
   */
  if (img->crypto && !v3) {
    not_freed (rc, &rc->counts.encrypted, cs);
    return rc->op == OP_ZERO ? write_zeros (rc, guest, cs) : 0;
  }
  /* The zero flag alone makes it read zeros; a hole or zeros under it
   * would be garbage through the old entry, after a crash before the new
   * one is on disk.  So the ciphertext stays.
   */
  if (img->crypto) {
    not_freed (rc, &rc->counts.encrypted, cs);
    return set_entry (rc, guest, m->entry, m->entry | QCOW_OFLAG_ZERO, 0, false, false);
  }
  if (rc->release) {
    /* keep mode, or a v2 image over a backing file: the hole reads zeros. */
    if ((r = punch_add (rc, host, cs, true)) < 0)
      return r;
  }
  else if ((r = host_zero (img->data, host, cs)) < 0) {
    log_error ("%s: cannot zero host offset 0x%" PRIx64 ": %s", img->m.lay.name, host,
               strerror (-r));
    return r;
  }
  return v3 ? set_entry (rc, guest, m->entry, m->entry | QCOW_OFLAG_ZERO, 0, false, false) : 0;
}

/* A whole cluster shared with a snapshot, or compressed. */
static int whole_shared (struct reclaim *rc, uint64_t guest, const struct mapping *m)
{
  uint64_t e, bm;

  if (m->kind != MAP_COMPRESSED) {
    rc->shared_seen = true;
    not_freed (rc, &rc->counts.snapshot, rc->img->m.lay.cluster_size);
  }
  if (!zero_entry (rc->img, &e, &bm))
    return rc->op == OP_ZERO ? write_zeros (rc, guest, rc->img->m.lay.cluster_size) : 0;
  return set_entry (rc, guest, m->entry, e, bm, true, false);
}

static int whole_cluster (struct reclaim *rc, uint64_t guest, const struct mapping *m)
{
  uint64_t e, bm;

  switch (m->kind) {
  case MAP_ZERO_PLAIN:
    not_freed (rc, &rc->counts.already_free, rc->img->m.lay.cluster_size);
    return 0;
  case MAP_UNALLOC:
    /* Over a backing file, discarded clusters read zeros too (v3), as in
     * QEMU: a guest that trimmed expects its old data gone.
     */
    if (!rc->img->backing) {
      not_freed (rc, &rc->counts.already_free, rc->img->m.lay.cluster_size);
      return 0;
    }
    not_freed (rc, &rc->counts.backing, rc->img->m.lay.cluster_size);
    if (zero_entry (rc->img, &e, &bm))
      return set_entry (rc, guest, 0, e, bm, false, false);
    return rc->op == OP_ZERO ? write_zeros (rc, guest, rc->img->m.lay.cluster_size) : 0;
  case MAP_NORMAL:
  case MAP_ZERO_ALLOC:
    /* A data file's clusters are never shared (no snapshots). */
    return m->copied || rc->img->m.lay.data_file ? whole_owned (rc, guest, m) : whole_shared (rc, guest, m);
  case MAP_COMPRESSED:
    return whole_shared (rc, guest, m);
  }
  return -EIO;
}

/* Extended L2 entries: subclusters s0 to before s1, as bitmap bits. */
static uint64_t sub_mask (unsigned s0, unsigned s1)
{
  if (s1 <= s0)
    return 0;
  return (s1 - s0 == 64 ? ~0ull : (1ull << (s1 - s0)) - 1) << s0;
}

/* What the subclusters in mask give nothing back for, and why. */
static void sub_not_freed (struct reclaim *rc, uint64_t alloc, uint64_t zero, uint64_t mask,
                           bool owned)
{
  uint64_t scs = layout_sc_size (&rc->img->m.lay), plain = mask & ~alloc & ~zero;

  not_freed (rc, &rc->counts.already_free, __builtin_popcountll (mask & zero) * scs);
  not_freed (rc, rc->img->backing ? &rc->counts.backing : &rc->counts.already_free,
             __builtin_popcountll (plain) * scs);
  if (!owned && (mask & alloc)) {
    rc->shared_seen = true;
    not_freed (rc, &rc->counts.snapshot, __builtin_popcountll (mask & alloc) * scs);
  }
}

/* A raw data file reads zeros at once where subclusters [a, b) were
 * cleared, also in the parts of host blocks [start, end) left out.
 */
static int raw_zero_parts (struct reclaim *rc, uint64_t a, uint64_t b, uint64_t start,
                           uint64_t end)
{
  struct q2_image *img = rc->img;
  uint64_t part[2][2] = { { a, start < b ? start : b }, { end > a ? end : a, b } };
  int i, r;

  if (start >= end)
    part[0][1] = b, part[1][0] = b;
  for (i = 0; i < 2; i++)
    if (part[i][0] < part[i][1] &&
        (r = host_zero (img->data, part[i][0], part[i][1] - part[i][0])) < 0)
      return zero_failed (img, part[i][0], part[i][1] - part[i][0], r);
  return 0;
}

/* The host range of the subclusters lo to before hi, widened over the
 * neighbours that hold no data after the change (alloc), given back in
 * whole host blocks; or, for write-zeroes that keeps the space, zeroed.
 */
static int sub_run_op (struct reclaim *rc, uint64_t host, unsigned lo, unsigned hi,
                       uint64_t alloc)
{
  struct q2_image *img = rc->img;
  const struct layout *lay = &img->m.lay;
  uint64_t a = host + ((uint64_t) lo << layout_sc_bits (lay));
  uint64_t b = host + ((uint64_t) hi << layout_sc_bits (lay)), start, end;
  int r;

  if (!rc->release)
    return (r = host_zero (img->data, a, b - a)) < 0 ? zero_failed (img, a, b - a, r) : 0;
  while (lo > 0 && !((alloc >> (lo - 1)) & 1))
    lo--;
  while (hi < L2_SUBCLUSTERS && !((alloc >> hi) & 1))
    hi++;
  start = host + ((uint64_t) lo << layout_sc_bits (lay));
  start = (start + HOST_BLOCK - 1) & ~(uint64_t) (HOST_BLOCK - 1);
  end = (host + ((uint64_t) hi << layout_sc_bits (lay))) & ~(uint64_t) (HOST_BLOCK - 1);
  /* Those subclusters read through their bits now, whatever the host
   * holds there: any way of freeing the range will do.
   */
  if (start < end && (r = release_data (rc, start, end - start, false)) < 0)
    return r;
  return img->m.lay.data_raw ? raw_zero_parts (rc, a, b, start, end) : 0;
}

/* The subclusters in mask, one run of them at a time: the mask of a
 * cluster found partly hole may have gaps, and a subcluster in a gap
 * still holds data.
 */
static int sub_host_op (struct reclaim *rc, uint64_t host, uint64_t mask, uint64_t alloc)
{
  unsigned lo, hi;
  int r;

  while (mask) {
    lo = __builtin_ctzll (mask);
    for (hi = lo; hi < 64 && ((mask >> hi) & 1); hi++)
      ;
    if ((r = sub_run_op (rc, host, lo, hi, alloc)) < 0)
      return r;
    mask &= hi < 64 ? ~0ull << hi : 0;
  }
  return 0;
}

/* A cluster with a host offset that only this entry names: COPIED, or in
 * a data file (never shared, no snapshots).
 */
static bool sub_owned (const struct q2_image *img, const struct mapping *m)
{
  return cluster_has_host (img, m->entry) && (m->copied || img->m.lay.data_file);
}

/* The new first word and bitmap for whole subclusters (mask) of the
 * cluster m maps; *drop: the cluster's host offset goes.
 */
static void sub_new_entry (const struct reclaim *rc, const struct mapping *m, uint64_t mask,
                           uint64_t *ne, uint64_t *nb, bool *drop)
{
  uint64_t alloc = m->bitmap & L2_BITMAP_ALLOC, zero = m->bitmap >> 32, na = alloc & ~mask, nz;
  bool mapped = cluster_has_host (rc->img, m->entry), owned = sub_owned (rc->img, m);
  bool backing = rc->img->backing != NULL;

  if (!mapped)
    nz = backing ? zero | mask : zero;
  else if (!owned || (rc->release && !rc->keep))
    nz = backing ? zero | mask : zero & ~mask;
  else
    nz = zero | mask;
  *drop = mapped && !na && (!owned || (rc->release && !rc->keep));
  *ne = *drop ? 0 : m->entry;
  *nb = *drop && !backing ? 0 : nz << 32 | na;
}

/* Whole subclusters (mask) of the cluster at guest g, not compressed.
 * They lose their allocation; where a backing file would show through, or
 * the space is kept (discard=keep, write-zeroes without MAY_TRIM), they
 * get zero bits instead.  A cluster left with no allocated subcluster is
 * dropped like a whole one: ours alone, punched and freed once the entry is
 * on disk; shared, only this reference goes.
 */
static int sub_whole (struct reclaim *rc, uint64_t g, uint64_t mask)
{
  struct q2_image *img = rc->img;
  const struct layout *lay = &img->m.lay;
  uint64_t idx = layout_l2_index (lay, g), off, alloc, ne, nb;
  struct cache_entry *t;
  struct mapping m;
  bool owned, drop;
  int r;

  {
    LOCK_FOR_SCOPE (&img->m.lock);
    if ((r = cluster_map (img, g, lay->cluster_size, &m)) < 0 || m.kind == MAP_COMPRESSED)
      return r;
    off = m.entry & L2E_OFFSET_MASK;
    alloc = m.bitmap & L2_BITMAP_ALLOC;
    owned = sub_owned (img, &m);
    sub_not_freed (rc, alloc, m.bitmap >> 32, mask, owned);
    sub_new_entry (rc, &m, mask, &ne, &nb, &drop);
    if (ne == m.entry && nb == m.bitmap)
      return 0;
    if ((r = l2_get_writable (img, g, &t)) < 0)
      return r;
    l2_entry_set (img, t, idx, ne);
    l2_bitmap_set (img, t, idx, nb);
    l2_put (img, t);
    rc->cleared |= ne == 0 && nb == 0;
    /* Encrypted: the host range keeps its ciphertext, which the old
     * bitmap still names until the new one is on disk; a dropped cluster
     * is punched by its deferred free, once the entry is synced.
     */
    if (!owned || img->crypto)
      return drop ? cluster_unref_later (img, m.entry, false) : 0;
  }
  if (drop) {
    if (!lay->data_file && (r = u64_vector_append (&rc->unref, off)) < 0)
      return r;
    return punch_add (rc, off, lay->cluster_size, false);
  }
  return alloc & mask ? sub_host_op (rc, off, mask, nb & L2_BITMAP_ALLOC) : 0;
}

/* The allocated subclusters among cand of the cluster at guest g that are
 * all hole in the host file now, freed as if discarded whole.
 */
static int sub_holes (struct reclaim *rc, uint64_t g, uint64_t cand)
{
  struct q2_image *img = rc->img;
  const struct layout *lay = &img->m.lay;
  uint64_t scs = layout_sc_size (lay), off, mask = 0;
  struct mapping m;
  bool hole;
  unsigned s;
  int r;

  if ((r = cluster_map_locked (img, g, lay->cluster_size, &m)) < 0)
    return r;
  off = m.entry & L2E_OFFSET_MASK;
  cand &= m.bitmap & L2_BITMAP_ALLOC;
  if (m.kind == MAP_COMPRESSED || !sub_owned (img, &m) || !cand)
    return 0;
  /* Only a chance to free them: if the host cannot tell, they stay. */
  if (host_is_hole (img->data, off, lay->cluster_size, &hole) == 0 && hole)
    mask = cand;
  else
    for (s = 0; s < L2_SUBCLUSTERS; s++)
      if ((cand >> s) & 1 && host_is_hole (img->data, off + s * scs, scs, &hole) == 0 && hole)
        mask |= 1ull << s;
  return mask ? sub_whole (rc, g, mask) : 0;
}

/* Part of a cluster of an encrypted image, which stays named: a hole or
 * zeros there would decrypt to garbage, so nothing is punched, and
 * write-zeroes writes encrypted zeros.
 */
static int partial_encrypted (struct reclaim *rc, uint64_t guest, uint64_t len)
{
  not_freed (rc, &rc->counts.encrypted, len);
  return rc->op == OP_ZERO ? write_zeros (rc, guest, len) : 0;
}

/* Part of a cluster we own: punch what host blocks it covers. */
static int partial_owned (struct reclaim *rc, uint64_t guest, uint64_t len,
                          const struct mapping *m)
{
  struct q2_image *img = rc->img;
  const struct layout *lay = &img->m.lay;
  uint64_t h = m->host, start = (h + HOST_BLOCK - 1) & ~(uint64_t) (HOST_BLOCK - 1);
  uint64_t end = (h + len) & ~(uint64_t) (HOST_BLOCK - 1);
  uint64_t cluster = h - layout_in_cluster (lay, guest);
  struct mapping whole = *m;
  bool hole;
  int r = 0;

  if (img->crypto)
    return partial_encrypted (rc, guest, len);
  if (!rc->release) {
    if ((r = host_zero (img->data, h, len)) < 0)
      return zero_failed (img, h, len, r);
  }
  else {
    not_freed (rc, &rc->counts.small, start < end ? len - (end - start) : len);
    /* A TRIM needs no zeros now: the punch can wait for the worker, which
     * also looks at the cluster afterwards (discard_if_hole).  Each read
     * or write of the range runs it first.  Not into a data file: the
     * queue and its worker serve the image's own file.
     */
    if (rc->op == OP_DISCARD && start < end && !rc->keep && !lay->data_file &&
        host_release_later (&img->m.hf, start, end - start, guest - layout_in_cluster (lay, guest)))
      return 0;
    if (start < end && (r = release_data (rc, start, end - start, true)) < 0)
      return r;
    /* The edges must read as zeros after write-zeroes. */
    if (rc->op == OP_ZERO && start >= end && (r = host_zero (img->data, h, len)) < 0)
      return zero_failed (img, h, len, r);
    if (rc->op == OP_ZERO && start < end && start > h &&
        (r = host_zero (img->data, h, start - h)) < 0)
      return zero_failed (img, h, start - h, r);
    if (rc->op == OP_ZERO && start < end && h + len > end &&
        (r = host_zero (img->data, end, h + len - end)) < 0)
      return zero_failed (img, end, h + len - end, r);
  }
  if (!rc->release || rc->keep)
    return 0;
  if (lay->extl2)
    return sub_holes (rc, guest - layout_in_cluster (lay, guest),
                      1ull << (layout_in_cluster (lay, guest) >> layout_sc_bits (lay)));
  /* Whether the cluster is all hole now is only a chance to free it:
   * if the host cannot tell, the cluster stays.
   */
  if (host_is_hole (img->data, cluster, lay->cluster_size, &hole) < 0 || !hole)
    return 0;
  whole.host = cluster;
  return whole_cluster (rc, guest - layout_in_cluster (lay, guest), &whole);
}

static int partial_cluster (struct reclaim *rc, uint64_t guest, uint64_t len,
                            const struct mapping *m)
{
  switch (m->kind) {
  case MAP_ZERO_PLAIN:
  case MAP_ZERO_ALLOC:
    not_freed (rc, &rc->counts.already_free, len);
    return 0;
  case MAP_UNALLOC:
    not_freed (rc, rc->img->backing ? &rc->counts.backing : &rc->counts.already_free, len);
    return rc->op == OP_ZERO && rc->img->backing ? write_zeros (rc, guest, len) : 0;
  case MAP_NORMAL:
    if (m->copied || rc->img->m.lay.data_file)
      return partial_owned (rc, guest, len, m);
    rc->shared_seen = true;
    not_freed (rc, &rc->counts.snapshot, len);
    return rc->op == OP_ZERO ? write_zeros (rc, guest, len) : 0;
  case MAP_COMPRESSED:
    not_freed (rc, &rc->counts.compressed, len);
    return rc->op == OP_ZERO ? write_zeros (rc, guest, len) : 0;
  }
  return -EIO;
}

/* Part of a subcluster: by its kind, as part of a cluster would be. */
static int sub_part (struct reclaim *rc, uint64_t guest, uint64_t len)
{
  struct mapping m;
  int r;

  if ((r = cluster_map_locked (rc->img, guest, len, &m)) < 0)
    return r;
  return partial_cluster (rc, guest, len, &m);
}

/* Extended L2 entries, one cluster (not compressed): the whole subclusters
 * of [offset, offset + len) by their bits, the parts at the edges as parts.
 */
static int sub_cluster (struct reclaim *rc, uint64_t offset, uint64_t len)
{
  const struct layout *lay = &rc->img->m.lay;
  uint64_t in = layout_in_cluster (lay, offset), g = offset - in, end = in + len;
  uint32_t b = layout_sc_bits (lay);
  unsigned s0 = (in + layout_sc_size (lay) - 1) >> b, s1 = end >> b;
  int r = 0;

  if (s0 > s1)
    return sub_part (rc, offset, len);
  if (s0 < s1)
    r = sub_whole (rc, g, sub_mask (s0, s1));
  if (r == 0 && in < ((uint64_t) s0 << b))
    r = sub_part (rc, offset, ((uint64_t) s0 << b) - in);
  if (r == 0 && ((uint64_t) s1 << b) < end)
    r = sub_part (rc, g + ((uint64_t) s1 << b), end - ((uint64_t) s1 << b));
  return r;
}

/* An L2 table whose entries are all empty is freed (L1 entry cleared). */
static int free_l2_if_empty (struct q2_image *img, uint64_t l1i)
{
  struct meta *m = &img->m;
  uint64_t e = table_get (&m->l1, l1i), off = e & L1E_OFFSET_MASK, i;
  struct cache_entry *t;
  bool empty = true;
  int r;

  if (!off || !(e & QCOW_OFLAG_COPIED))
    return 0;
  if ((r = l2_get (img, l1i << (m->lay.cluster_bits + m->lay.l2_bits), &t)) < 0)
    return r;
  /* Every word: extended L2 entries have two. */
  for (i = 0; i < m->lay.cluster_size / 8 && empty; i++)
    empty = be64_get ((const uint8_t *) t->buf + i * 8) == 0;
  l2_put (img, t);
  if (!empty)
    return 0;
  /* Two L1 entries naming one table is corruption: freeing it would let
   * guest data overwrite a table still in use.
   */
  for (i = 0; i < m->l1.size; i++)
    if (i != l1i && (table_get (&m->l1, i) & L1E_OFFSET_MASK) == off)
      return corrupt_error (&m->lay, "L1 entries %" PRIu64 " and %" PRIu64 " both point "
                            "to the L2 table at host offset 0x%" PRIx64, i, l1i, off);
  table_set (&m->l1, l1i, 0);
  img->l2_tables_freed++;
  return alloc_free_later (&img->alloc, off, META_L2, false);
}

static int check_l2 (struct reclaim *rc, uint64_t next_l1)
{
  int r = 0;

  if (rc->l1_pending == next_l1)
    return 0;
  /* A TRIM of part of a cluster, fstrim's most common, changes no entry:
   * it skips the lock and the table.
   */
  if (rc->l1_pending != UINT64_MAX && rc->cleared) {
    mutex_lock (&rc->img->m.lock);
    r = free_l2_if_empty (rc->img, rc->l1_pending);
    mutex_unlock (&rc->img->m.lock);
  }
  rc->l1_pending = next_l1;
  rc->cleared = false;
  return r;
}

/* Nothing to do over a run that already reads as zeros and owns nothing. */
static bool nothing_to_do (const struct reclaim *rc, const struct mapping *m)
{
  /* With subclusters, an unallocated one may lie in a cluster that the
   * discard could free.
   */
  return m->kind == MAP_ZERO_PLAIN ||
    (m->kind == MAP_UNALLOC && !cluster_has_host (rc->img, m->entry) &&
     (!rc->img->backing || (rc->op == OP_DISCARD && rc->img->m.lay.version < 3)));
}

/* What a request leaves to its end: the last punch, the clusters it
 * unreferenced, the last L2 table it emptied.
 */
static int reclaim_end (struct reclaim *rc, int r)
{
  int rr;

  rr = release_data (rc, rc->punch_start, rc->punch_len, rc->punch_mapped);
  if (r == 0)
    r = rr;
  rr = release_unrefs (rc);
  if (r == 0)
    r = rr;
  if (r == 0)
    r = check_l2 (rc, UINT64_MAX);
  return r;
}

static int reclaim_range (struct q2_image *img, uint64_t count, uint64_t offset,
                          struct reclaim *rc)
{
  const struct layout *lay = &img->m.lay;
  uint64_t l1_shift = lay->cluster_bits + lay->l2_bits;
  struct rangelock_held h;
  struct mapping m;
  int r;

  if (img->readonly)
    return -EROFS;
  if ((r = request_check (img, count, offset)) < 0)
    return r;
  rc->img = img;
  rc->l1_pending = UINT64_MAX;
  if (rc->release)
    rc->counts.asked = count;
  request_lock (img, &h, count, offset, true);
  while (count > 0 && r == 0) {
    uint64_t in = layout_in_cluster (lay, offset);
    uint64_t len = lay->cluster_size - in < count ? lay->cluster_size - in : count;
    /* One cluster at a time, except over runs with nothing to do, which
     * are measured whole and skipped: asking for the whole remaining range
     * each time would walk the rest of the L2 table per cluster.
     */
    if ((r = cluster_map_locked (img, offset, len, &m)) < 0)
      break;
    if (nothing_to_do (rc, &m)) {
      if ((r = cluster_map_locked (img, offset, count, &m)) < 0)
        break;
      len = m.bytes;
      not_freed (rc, m.kind == MAP_ZERO_PLAIN || !img->backing ? &rc->counts.already_free
                 : &rc->counts.backing, len);
    }
    else {
      if ((r = check_l2 (rc, offset >> l1_shift)) < 0)
        break;
      if (lay->extl2 && m.kind != MAP_COMPRESSED)
        r = sub_cluster (rc, offset, len);
      else if (in == 0 && len == lay->cluster_size)
        r = whole_cluster (rc, offset, &m);
      else
        r = partial_cluster (rc, offset, len, &m);
    }
    offset += len;
    count -= len;
  }
  r = reclaim_end (rc, r);
  request_unlock (img, &h);
  counts_add (&img->trims, &rc->counts);
  return r;
}

int discard_if_hole (struct q2_image *img, uint64_t guest, uint64_t host)
{
  const struct layout *lay = &img->m.lay;
  struct reclaim rc = {
    .img = img, .op = OP_DISCARD, .release = true, .l1_pending = UINT64_MAX,
  };
  struct rangelock_held h;
  struct mapping m;
  bool hole;
  int r;

  assert (layout_in_cluster (lay, guest) == 0 && (host & (lay->cluster_size - 1)) == 0);
  request_lock (img, &h, lay->cluster_size, guest, true);
  /* The cluster may have been rewritten, freed or moved since the TRIM
   * was answered: only the same cluster, still ours alone, is looked at.
   */
  r = cluster_map_locked (img, guest, lay->cluster_size, &m);
  if (r == 0 && lay->extl2 && (m.entry & L2E_OFFSET_MASK) == host &&
      (r = check_l2 (&rc, guest >> (lay->cluster_bits + lay->l2_bits))) == 0)
    r = sub_holes (&rc, guest, L2_BITMAP_ALLOC);
  else if (r == 0 && m.kind == MAP_NORMAL && m.copied &&
      (m.entry & L2E_OFFSET_MASK) == host &&
      host_is_hole (img->data, host, lay->cluster_size, &hole) == 0 && hole &&
      (r = check_l2 (&rc, guest >> (lay->cluster_bits + lay->l2_bits))) == 0)
    r = whole_cluster (&rc, guest, &m);
  r = reclaim_end (&rc, r);
  request_unlock (img, &h);
  return r;
}

int discard_zero (struct q2_image *img, uint64_t count, uint64_t offset, unsigned flags,
                  bool *kept, bool *apply_frees)
{
  struct reclaim rc = {
    .op = OP_ZERO,
    .release = (flags & Q2_MAY_TRIM) && img->discard != Q2_DISCARD_IGNORE,
    .keep = img->discard == Q2_DISCARD_KEEP,
    .fast = !!(flags & Q2_FAST_ZERO),
  };
  int r = reclaim_range (img, count, offset, &rc);

  *kept = rc.shared_seen;
  *apply_frees = rc.apply_frees;
  return r;
}

int discard_range (struct q2_image *img, uint64_t count, uint64_t offset, bool *kept)
{
  struct reclaim rc = {
    .op = OP_DISCARD,
    .release = true,
    .keep = img->discard == Q2_DISCARD_KEEP,
  };
  int r;

  *kept = false;
  if (img->discard == Q2_DISCARD_IGNORE)
    return img->readonly ? -EROFS : 0;
  r = reclaim_range (img, count, offset, &rc);
  *kept = rc.shared_seen;
  return r;
}
