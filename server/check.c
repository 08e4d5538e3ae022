/* SPDX-License-Identifier: BSD-3-Clause */
/* Consistency check: every reference in the image (header, L1 tables of the
 * active layer and of each internal snapshot, L2 tables, data and
 * compressed clusters, refcount table and blocks, snapshot table, persistent
 * bitmaps, the encryption header) is counted and compared with the stored refcounts, as `qemu-img
 * check` does.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-format.h"
#include "alloc.h"
#include "check.h"
#include "cleanup.h"
#include "engine.h"
#include "l2.h"
#include "log.h"
#include "refcount.h"
#include "snapshot.h"

/* Who references a cluster, when the image has snapshots: nobody yet, the
 * active layer or the image's own metadata, several snapshots, or snapshot
 * i alone (i + 1).
 */
#define OWNER_NONE 0
#define OWNER_ACTIVE UINT32_MAX
#define OWNER_SNAPSHOTS (UINT32_MAX - 1)

/* What a reference says a cluster holds.  Two kinds in one cluster is
 * damage that no count can mend: a repair refuses it.
 */
enum ref_kind {
  REF_HEADER, REF_L1, REF_L2, REF_DATA, REF_COMPRESSED, REF_REFTABLE, REF_REFBLOCK,
  REF_SNAPSHOTS, REF_BITMAP_DIR, REF_BITMAP_TABLE, REF_BITMAP_DATA, REF_CRYPTO, REF_KINDS
};
static const char *const ref_names[REF_KINDS] = {
  [REF_HEADER] = "header", [REF_L1] = "L1 table", [REF_L2] = "L2 table",
  [REF_DATA] = "data cluster", [REF_COMPRESSED] = "compressed cluster",
  [REF_REFTABLE] = "refcount table", [REF_REFBLOCK] = "refcount block",
  [REF_SNAPSHOTS] = "snapshot table", [REF_BITMAP_DIR] = "bitmap directory",
  [REF_BITMAP_TABLE] = "bitmap table", [REF_BITMAP_DATA] = "bitmap data cluster",
  [REF_CRYPTO] = "encryption header",
};
#define KIND_NONE 0             /* per cluster: 0, or the kind + 1 */

/* Refcount blocks that cannot be read: the entry names no cluster, or a
 * cluster past the end of the file (a repair names a new block instead),
 * or the block lies over other metadata.
 */
#define BLOCK_INVALID 1
#define BLOCK_PAST_END 2
#define BLOCK_OVERLAP 3

struct walk {
  struct q2_image *img;
  const struct layout *lay;
  struct q2_check *res;
  uint32_t *refs;             /* references found, per host cluster */
  uint32_t *owner;            /* OWNER_*, per host cluster; NULL without snapshots */
  uint8_t *block_bad;         /* per refcount table entry: BLOCK_*, 0 when it is fine */
  uint8_t *kind;              /* KIND_NONE or the first ref_kind + 1, per host
                               * cluster; NULL in a check */
  uint64_t nclusters;
  uint64_t next_contiguous;   /* for fragmentation, as qemu-img counts it */
  q2_progress_fn progress;
  void *opaque;
  uint64_t done, total;
  /* The corruptions of the kinds a repair mends; any other is refused. */
  uint64_t low_counts;        /* counts below the references */
  uint64_t copied_errors;     /* COPIED flags that disagree with the count */
  uint64_t overflows;         /* more references than a count can hold */
  uint64_t blocks_past_end;   /* refcount table entries past the end of the file */
  uint64_t clash;             /* cluster + 1 referenced as two kinds; 0: none */
  enum ref_kind clash_kinds[2];
  /* A repair: the first pass finds (and says the mismatches only when it
   * does not fix them), the second fixes what mode allows.
   */
  enum q2_repair_mode mode;   /* 0: a check */
  bool fixing;
  uint64_t leaks_fixed, corruptions_fixed;
  struct u64_vector freed;    /* leaked clusters whose count went to 0 */
};

static void add_owner (struct walk *w, uint64_t c, uint32_t owner)
{
  uint32_t *o = &w->owner[c];

  if (*o == OWNER_NONE || owner == OWNER_ACTIVE)
    *o = owner;
  else if (*o != owner && *o != OWNER_ACTIVE)
    *o = OWNER_SNAPSHOTS;
}

static void add_kind (struct walk *w, uint64_t c, enum ref_kind kind)
{
  uint8_t *k = &w->kind[c];

  if (*k == KIND_NONE)
    *k = kind + 1;
  else if (*k != kind + 1 && !w->clash) {
    w->clash = c + 1;
    w->clash_kinds[0] = *k - 1;
    w->clash_kinds[1] = kind;
  }
}

static void add_ref (struct walk *w, uint64_t offset, uint64_t len, uint32_t owner,
                     enum ref_kind kind)
{
  uint64_t c, first = offset >> w->lay->cluster_bits;
  uint64_t last = (offset + len - 1) >> w->lay->cluster_bits;

  for (c = first; c <= last; c++) {
    if (c >= w->nclusters) {
      log_error ("%s: ERROR %s at host offset 0x%" PRIx64 " is past the end of the file",
                w->lay->name, ref_names[kind], offset);
      w->res->corruptions++;
      return;
    }
    w->refs[c]++;
    if (w->kind)
      add_kind (w, c, kind);
    if (w->owner)
      add_owner (w, c, owner);
  }
}

static uint64_t read_be64 (struct q2_image *img, uint64_t off, int *r)
{
  uint8_t b[8];

  *r = host_pread (&img->m.hf, b, 8, off);
  return be64_get (b);
}

/* A subcluster bitmap the request paths refuse (cluster.c says why). */
static bool bad_bitmap (const struct layout *lay, uint64_t e, uint64_t bitmap)
{
  if (!lay->extl2)
    return false;
  if (e & QCOW_OFLAG_COMPRESSED)
    return bitmap != 0;
  /* In a data file, COPIED names cluster 0 at offset 0. */
  return ((bitmap >> 32) & bitmap) ||
    (!(e & L2E_OFFSET_MASK) && !(lay->data_file && (e & QCOW_OFLAG_COPIED)) &&
     (bitmap & L2_BITMAP_ALLOC));
}

static void count_l2_entry (struct walk *w, uint64_t e, uint64_t bitmap, uint32_t owner,
                            bool frag)
{
  const struct layout *lay = w->lay;
  uint64_t off = e & L2E_OFFSET_MASK;

  if (bad_bitmap (lay, e, bitmap)) {
    log_error ("%s: ERROR L2 entry 0x%" PRIx64 " has an invalid subcluster bitmap 0x%016"
               PRIx64, lay->name, e, bitmap);
    w->res->corruptions++;
    return;
  }

  if ((e & QCOW_OFLAG_COMPRESSED) && lay->data_file) {
    log_error ("%s: ERROR compressed L2 entry 0x%" PRIx64 " in an image with an "
               "external data file", lay->name, e);
    w->res->corruptions++;
    return;
  }
  if (e & QCOW_OFLAG_COMPRESSED) {
    uint64_t coff, clen;
    layout_compressed_extent (lay, e, &coff, &clen);
    add_ref (w, coff, clen, owner, REF_COMPRESSED);
    if (frag) {
      w->res->allocated_clusters++;
      w->res->compressed_clusters++;
      w->res->fragmented_clusters++;
    }
    return;
  }
  /* What the request paths refuse as corrupt, the check reports too. */
  if (e & L2E_RESERVED_MASK || off & (lay->cluster_size - 1) ||
      ((e & QCOW_OFLAG_ZERO) && lay->version < 3)) {
    log_error ("%s: ERROR L2 entry 0x%" PRIx64 " has reserved bits set or an unaligned "
              "offset", lay->name, e);
    w->res->corruptions++;
    return;
  }
  if (!off && !(lay->data_file && (e & QCOW_OFLAG_COPIED)))
    return;
  /* A data file's clusters are counted by nobody: only metadata is. */
  if (!lay->data_file)
    add_ref (w, off, lay->cluster_size, owner, REF_DATA);
  if (frag) {
    w->res->allocated_clusters++;
    if (w->next_contiguous && off != w->next_contiguous)
      w->res->fragmented_clusters++;
    w->next_contiguous = off + lay->cluster_size;
  }
}

static int walk_l2 (struct walk *w, uint64_t l2off, uint32_t owner)
{
  const struct layout *lay = w->lay;
  struct q2_image *img = w->img;
  uint8_t *t = malloc (lay->cluster_size);
  uint64_t i;
  int r;

  if (!t)
    return -ENOMEM;
  w->next_contiguous = 0;     /* qemu-img counts fragmentation per L2 table */
  r = host_pread (&img->m.hf, t, lay->cluster_size, l2off);
  for (i = 0; r == 0 && i < layout_l2_entries (lay); i++) {
    const uint8_t *p = t + i * layout_l2_entry_bytes (lay);
    count_l2_entry (w, be64_get (p), lay->extl2 ? be64_get (p + 8) : 0, owner,
                    owner == OWNER_ACTIVE);
  }
  free (t);
  return r;
}

static int walk_l1 (struct walk *w, uint64_t l1off, uint64_t l1size, uint32_t owner)
{
  const struct layout *lay = w->lay;
  struct q2_image *img = w->img;
  bool active = owner == OWNER_ACTIVE;
  uint64_t i, e, l2;
  int r = 0;

  if (l1size == 0)
    return 0;
  add_ref (w, l1off, l1size * 8, owner, REF_L1);
  for (i = 0; i < l1size && r == 0; i++) {
    e = active ? table_get (&img->m.l1, i) : read_be64 (img, l1off + i * 8, &r);
    l2 = e & L1E_OFFSET_MASK;
    if (r < 0 || !l2)
      continue;
    if (l2 & (lay->cluster_size - 1) || (l2 >> lay->cluster_bits) >= w->nclusters) {
      log_error ("%s: ERROR L1 entry %" PRIu64 " points to invalid L2 table offset 0x%"
                PRIx64, lay->name, i, l2);
      w->res->corruptions++;
      continue;
    }
    add_ref (w, l2, lay->cluster_size, owner, REF_L2);
    r = walk_l2 (w, l2, owner);
    if (w->progress && active)
      w->progress (w->opaque, ++w->done, w->total);
  }
  return r;
}

/* Internal snapshots: the table, and each snapshot's L1 and L2 tables. */
static int walk_snapshots (struct walk *w)
{
  const struct layout *lay = w->lay;
  struct q2_image *img = w->img;
  uint64_t off = lay->snapshots_offset, start = off;
  uint64_t file_bytes = w->nclusters << lay->cluster_bits;
  struct snapshot_entry e;
  uint32_t i;
  int r;

  for (i = 0; i < lay->nb_snapshots; i++) {
    if (off >= file_bytes) {
      log_error ("%s: ERROR snapshot %u at 0x%" PRIx64 " is past the end of the file",
                lay->name, i, off);
      w->res->corruptions++;
      break;
    }
    if ((r = snapshot_entry_read (img, off, &e)) < 0)
      return r;
    if ((uint64_t) e.l1_size * 8 > QCOW2_MAX_L1_BYTES || e.l1_offset >= file_bytes ||
        e.l1_size * 8ull > file_bytes - e.l1_offset) {
      log_error ("%s: ERROR snapshot %u has an invalid L1 table (0x%" PRIx64 ", %u entries)",
                lay->name, i, e.l1_offset, e.l1_size);
      w->res->corruptions++;
    }
    else if ((r = walk_l1 (w, e.l1_offset, e.l1_size, i + 1)) < 0)
      return r;
    off += e.length;
  }
  if (off > start)
    add_ref (w, start, off - start, OWNER_ACTIVE, REF_SNAPSHOTS);
  return 0;
}

/* QEMU's bounds: a directory of at most 64 MiB, a bitmap table of at
 * most 2^27 entries.
 */
#define BITMAP_DIR_MAX (64ull << 20)
#define BITMAP_TABLE_MAX (1ull << 27)

/* One bitmap's table, a cluster at a time, and the data clusters it names. */
static int walk_bitmap_table (struct walk *w, uint64_t off, uint64_t entries)
{
  const struct layout *lay = w->lay;
  uint64_t per = lay->cluster_size / 8, i, j, n, e;
  uint8_t *t;
  int r = 0;

  add_ref (w, off, entries * 8, OWNER_ACTIVE, REF_BITMAP_TABLE);
  if (!(t = malloc (lay->cluster_size)))
    return -ENOMEM;
  for (i = 0; i < entries && r == 0; i += per) {
    n = entries - i < per ? entries - i : per;
    if ((r = host_pread (&w->img->m.hf, t, n * 8, off + i * 8)) < 0)
      break;
    for (j = 0; j < n; j++)
      if ((e = be64_get (t + j * 8) & BITMAP_TABLE_OFFSET_MASK))
        add_ref (w, e, lay->cluster_size, OWNER_ACTIVE, REF_BITMAP_DATA);
  }
  free (t);
  return r;
}

/* Persistent bitmaps (only when their autoclear bit is set): the
 * directory, each bitmap's table and its data clusters, as qemu-img
 * check counts them.
 */
static int walk_bitmaps (struct walk *w)
{
  const struct layout *lay = w->lay;
  uint64_t size = lay->bitmap_dir_size, off = lay->bitmap_dir_offset, pos, toff;
  uint32_t i, tsize, extra, namelen;
  uint8_t *dir;
  int r;

  if (!lay->nb_bitmaps)
    return 0;
  if (size > BITMAP_DIR_MAX || size < BITMAP_ENTRY_FIXED || off & (lay->cluster_size - 1) ||
      (off >> lay->cluster_bits) >= w->nclusters) {
    log_error ("%s: ERROR the bitmap directory (0x%" PRIx64 ", %" PRIu64 " bytes) is "
               "not inside the file", lay->name, off, size);
    w->res->corruptions++;
    return 0;
  }
  add_ref (w, off, size, OWNER_ACTIVE, REF_BITMAP_DIR);
  if (!(dir = malloc (size)))
    return -ENOMEM;
  if ((r = host_pread (&w->img->m.hf, dir, size, off)) < 0)
    goto out;
  for (i = 0, pos = 0; i < lay->nb_bitmaps && r == 0; i++) {
    if (pos + BITMAP_ENTRY_FIXED > size)
      break;
    toff = be64_get (dir + pos);
    tsize = be32_get (dir + pos + 8);
    namelen = be16_get (dir + pos + 18);
    extra = be32_get (dir + pos + 20);
    if (tsize > BITMAP_TABLE_MAX || toff & (lay->cluster_size - 1) ||
        (tsize && (toff >> lay->cluster_bits) >= w->nclusters)) {
      log_error ("%s: ERROR bitmap %u has an invalid table (0x%" PRIx64 ", %u entries)",
                 lay->name, i, toff, tsize);
      w->res->corruptions++;
    }
    else if (tsize)
      r = walk_bitmap_table (w, toff, tsize);
    pos += (BITMAP_ENTRY_FIXED + (uint64_t) extra + namelen + 7) & ~7ull;
  }
out:
  free (dir);
  return r;
}

/* A refcount table entry that cannot name a block: reserved bits, not a
 * cluster, or past the end of the file.  Its counts read as 0, as QEMU
 * reads them.
 */
static bool bad_block_entry (const struct walk *w, uint64_t e)
{
  uint64_t off = e & REFT_OFFSET_MASK;

  return e & ~REFT_OFFSET_MASK || off & (w->lay->cluster_size - 1) ||
    (off && (off >> w->lay->cluster_bits) >= w->nclusters);
}

static int walk_refcount_structures (struct walk *w)
{
  const struct layout *lay = w->lay;
  struct q2_image *img = w->img;
  uint64_t i, e, b;

  add_ref (w, lay->reftable_offset, lay->reftable_clusters << lay->cluster_bits,
           OWNER_ACTIVE, REF_REFTABLE);
  for (i = 0; i < img->m.reftable.size; i++) {
    e = table_get (&img->m.reftable, i);
    b = e & REFT_OFFSET_MASK;
    if (bad_block_entry (w, e)) {
      w->block_bad[i] = BLOCK_INVALID;
      if (e == b && !(b & (lay->cluster_size - 1))) {
        log_error ("%s: ERROR refcount block %" PRIu64 " at host offset 0x%" PRIx64
                   " is past the end of the file", lay->name, i, b);
        w->block_bad[i] = BLOCK_PAST_END;
        w->blocks_past_end++;
      }
      else
        log_error ("%s: ERROR refcount block %" PRIu64 ": the refcount table entry 0x%"
                   PRIx64 " is not a valid cluster offset", lay->name, i, e);
      w->res->corruptions++;
    }
    else if (b)
      add_ref (w, b, lay->cluster_size, OWNER_ACTIVE, REF_REFBLOCK);
  }
  return 0;
}

/* A refcount block's cluster holds counts and nothing else: a second
 * reference to it (another entry, other metadata, data) is corruption.
 */
static void check_blocks_unshared (struct walk *w)
{
  const struct layout *lay = w->lay;
  struct q2_image *img = w->img;
  uint64_t i, b;

  for (i = 0; i < img->m.reftable.size; i++) {
    b = table_get (&img->m.reftable, i) & REFT_OFFSET_MASK;
    if (!b || w->block_bad[i] || w->refs[b >> lay->cluster_bits] == 1)
      continue;
    log_error ("%s: ERROR refcount block %" PRIu64 " at host offset 0x%" PRIx64
               " is referenced %" PRIu32 " times, by other metadata or data too",
               lay->name, i, b, w->refs[b >> lay->cluster_bits]);
    w->res->corruptions++;
  }
}

/* The stored count of cluster c (inside the file); 0 under a block that
 * cannot be read, which counts as one corruption, said once.
 */
static int stored_count (struct walk *w, uint64_t c, uint64_t *rc)
{
  struct q2_image *img = w->img;
  uint64_t idx = c >> w->lay->rb_bits;
  int r;

  *rc = 0;
  if (!refcount_covered (&img->m, c) || w->block_bad[idx])
    return 0;
  if ((r = refcount_get (&img->m, c, rc)) == -EIO) {
    /* Said by the engine: a block over other metadata. */
    w->res->corruptions++;
    w->block_bad[idx] = BLOCK_OVERLAP;
    *rc = 0;
    return 0;
  }
  return r;
}

/* COPIED must say exactly "refcount is 1" in the active tables. */
static int check_copied (struct walk *w)
{
  const struct layout *lay = w->lay;
  struct q2_image *img = w->img;
  uint8_t *t = malloc (lay->cluster_size);
  uint64_t i, j, rc;
  int r = 0;

  if (!t)
    return -ENOMEM;
  for (i = 0; i < img->m.l1.size && r == 0; i++) {
    uint64_t e = table_get (&img->m.l1, i), l2 = e & L1E_OFFSET_MASK;
    if (!l2 || (l2 >> lay->cluster_bits) >= w->nclusters)
      continue;
    if ((r = stored_count (w, l2 >> lay->cluster_bits, &rc)) < 0)
      break;
    if (!!(e & QCOW_OFLAG_COPIED) != (rc == 1)) {
      if (!w->mode)
        log_error ("%s: ERROR OFLAG_COPIED L2 table at 0x%" PRIx64 ": refcount=%" PRIu64,
                   lay->name, l2, rc);
      w->res->corruptions++;
      w->copied_errors++;
    }
    if ((r = host_pread (&img->m.hf, t, lay->cluster_size, l2)) < 0)
      break;
    for (j = 0; j < layout_l2_entries (lay) && r == 0; j++) {
      uint64_t d = be64_get (t + j * layout_l2_entry_bytes (lay)), off = d & L2E_OFFSET_MASK;
      if (!off || lay->data_file || (d & QCOW_OFLAG_COMPRESSED) ||
          (off >> lay->cluster_bits) >= w->nclusters)
        continue;
      if ((r = stored_count (w, off >> lay->cluster_bits, &rc)) < 0)
        break;
      if (!!(d & QCOW_OFLAG_COPIED) != (rc == 1)) {
        if (!w->mode)
          log_error ("%s: ERROR OFLAG_COPIED data cluster at 0x%" PRIx64 ": refcount=%"
                     PRIu64, lay->name, off, rc);
        w->res->corruptions++;
        w->copied_errors++;
      }
    }
  }
  free (t);
  return r;
}

/* COPIED made to say "refcount is 1" again, the counts being right now:
 * in the L1 entry of each active L2 table, and in each entry of it.
 */
static int fix_copied_l2 (struct walk *w, uint64_t i)
{
  const struct layout *lay = w->lay;
  struct q2_image *img = w->img;
  uint64_t guest = i << (lay->cluster_bits + lay->l2_bits), j, d, off, rc;
  struct cache_entry *e;
  int r;

  if ((r = l2_get (img, guest, &e)) < 0 || !e)
    return r;
  for (j = 0; j < layout_l2_entries (lay) && r == 0; j++) {
    d = l2_entry_get (img, e, j);
    off = d & L2E_OFFSET_MASK;
    /* A data file's clusters have no refcount: COPIED is theirs always,
     * and the image file's count at that number belongs to another
     * cluster.
     */
    if (!off || (d & QCOW_OFLAG_COMPRESSED) || lay->data_file)
      continue;
    if ((r = stored_count (w, off >> lay->cluster_bits, &rc)) < 0 ||
        !!(d & QCOW_OFLAG_COPIED) == (rc == 1))
      continue;
    log_notice ("%s: Repairing OFLAG_COPIED data cluster at 0x%" PRIx64 ": refcount=%"
                PRIu64, lay->name, off, rc);
    l2_entry_set (img, e, j, d ^ QCOW_OFLAG_COPIED);
    w->corruptions_fixed++;
  }
  l2_put (img, e);
  return r;
}

static int fix_copied (struct walk *w)
{
  const struct layout *lay = w->lay;
  struct q2_image *img = w->img;
  uint64_t i, e, l2, rc;
  int r = 0;

  for (i = 0; i < img->m.l1.size && r == 0; i++) {
    e = table_get (&img->m.l1, i);
    if (!(l2 = e & L1E_OFFSET_MASK))
      continue;
    if ((r = stored_count (w, l2 >> lay->cluster_bits, &rc)) < 0)
      break;
    if (!!(e & QCOW_OFLAG_COPIED) != (rc == 1)) {
      log_notice ("%s: Repairing OFLAG_COPIED L2 table at 0x%" PRIx64 ": refcount=%"
                  PRIu64, lay->name, l2, rc);
      table_set (&img->m.l1, i, e ^ QCOW_OFLAG_COPIED);
      w->corruptions_fixed++;
    }
    r = fix_copied_l2 (w, i);
  }
  return r;
}

/* The first cluster from c on (before limit) that something references. */
static uint64_t next_referenced (const struct walk *w, uint64_t c, uint64_t limit)
{
  for (; c < limit && c < w->nclusters; c++)
    if (w->refs[c])
      return c;
  return limit;
}

/* A leak mended: the count comes down to the references at once (a leaked
 * count may be near 2^64), and when nothing references the cluster, its
 * last count goes through the allocator, which frees it; its host space is
 * given back once that is on disk.
 */
static int fix_leak (struct walk *w, uint64_t c, uint64_t want)
{
  struct q2_image *img = w->img;
  uint64_t off = c << w->lay->cluster_bits;
  bool freed;
  int r;

  if ((r = refcount_set (&img->m, c, want ? want : 1)) < 0 || want)
    return r;
  if ((r = alloc_release (&img->alloc, off, overlap_kind (&w->lay->meta, c), &freed)) < 0)
    return r;
  return freed ? u64_vector_append (&w->freed, off) : 0;
}

/* What the second pass of a repair does with a mismatch: fixes it (1),
 * or leaves it to be said and counted (0).
 */
static int fix_count (struct walk *w, uint64_t c, uint64_t rc, uint64_t want)
{
  const struct layout *lay = w->lay;
  int r;

  if (!w->fixing || (rc < want && w->mode != Q2_REPAIR_ALL))
    return 0;
  log_notice ("%s: Repairing cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64,
              lay->name, c, rc, want);
  if (rc > want) {
    if ((r = fix_leak (w, c, want)) < 0)
      return r;
    w->leaks_fixed++;
  }
  else {
    if ((r = alloc_set_count (&w->img->alloc, c, want)) < 0)
      return r;
    w->corruptions_fixed++;
  }
  return 1;
}

static void count_mismatch (struct walk *w, uint64_t c, uint64_t rc, uint64_t want)
{
  const struct layout *lay = w->lay;
  bool say = !w->mode || w->fixing;

  if (rc < want) {
    if (say)
      log_error ("%s: ERROR cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64,
                 lay->name, c, rc, want);
    w->res->corruptions++;
    w->low_counts++;
    if (want > lay->refcount_max)
      w->overflows++;
  }
  else {
    if (say)
      log_notice ("%s: Leaked cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64,
                  lay->name, c, rc, want);
    w->res->leaks++;
  }
}

/* Inside the file only, as qemu-img compares them: a count past its end
 * names no space, and a reference there is already an error.
 */
static int compare_refcounts (struct walk *w)
{
  const struct layout *lay = w->lay;
  struct q2_image *img = w->img;
  uint64_t covered = img->m.reftable.size << lay->rb_bits, c, rc;
  int r;

  for (c = 0; c < w->nclusters; c++) {
    uint64_t want = w->refs[c];
    if (c < covered && !want &&
        !(table_get (&img->m.reftable, c >> lay->rb_bits) & REFT_OFFSET_MASK)) {
      /* Skip the absent block, but not a reference further into it. */
      c = next_referenced (w, c + 1, (c | ((1ull << lay->rb_bits) - 1)) + 1) - 1;
      continue;
    }
    if ((r = stored_count (w, c, &rc)) < 0)
      return r;
    if (want || rc)
      w->res->image_end_offset = (c + 1) << lay->cluster_bits;
    if (rc != want && (r = fix_count (w, c, rc, want)) < 0)
      return r;
    if (rc != want && r == 0)
      count_mismatch (w, c, rc, want);
    if (want && w->owner && w->owner[c] != OWNER_ACTIVE && !w->fixing) {
      w->res->snapshot_only_clusters++;
      if (w->owner[c] != OWNER_SNAPSHOTS)
        w->res->snapshot_alone[w->owner[c] - 1] += w->lay->cluster_size;
    }
  }
  return 0;
}

/* Host space the file holds in clusters nothing references. */
static int host_bytes_in_free (struct walk *w, uint64_t *total)
{
  struct q2_image *img = w->img;
  uint64_t cs = w->lay->cluster_size, pos = 0, d, h;
  int r;

  *total = 0;
  for (;;) {
    if ((r = host_seek_data (&img->m.hf, pos, &d)) < 0)
      return r;
    if (d == UINT64_MAX)
      return 0;
    if ((r = host_seek_hole (&img->m.hf, d, &h)) < 0)
      return r;
    if (h <= d)
      return 0;
    for (uint64_t o = d; o < h; ) {
      uint64_t c = o / cs, next = (c + 1) * cs < h ? (c + 1) * cs : h;
      if (c >= w->nclusters || w->refs[c] == 0)
        *total += next - o;
      o = next;
    }
    pos = h;
  }
}

static int walk_all (struct walk *w)
{
  struct q2_image *img = w->img;
  int r;

  LOCK_FOR_SCOPE (&img->m.lock);
  add_ref (w, 0, w->lay->cluster_size, OWNER_ACTIVE, REF_HEADER);
  /* The LUKS header and key material: read by nobody here, counted all the
   * same (a repair must not free them), and never decrypted.
   */
  if (w->lay->crypto_length)
    add_ref (w, w->lay->crypto_offset, w->lay->crypto_length, OWNER_ACTIVE, REF_CRYPTO);
  if ((r = walk_l1 (w, w->lay->l1_offset, img->m.l1.size, OWNER_ACTIVE)) < 0 ||
      (r = walk_snapshots (w)) < 0 ||
      (r = walk_bitmaps (w)) < 0 ||
      (r = walk_refcount_structures (w)) < 0)
    return r;
  check_blocks_unshared (w);
  if ((r = compare_refcounts (w)) < 0)
    return r;
  return check_copied (w);
}

/* Why the damage the first pass found cannot be mended by setting counts
 * and flags; NULL: it can.
 */
static const char *refusal (struct walk *w, char *buf, size_t len)
{
  uint64_t other = w->res->corruptions - w->low_counts - w->copied_errors -
    w->blocks_past_end;

  if (w->clash)
    snprintf (buf, len, "cluster %" PRIu64 " holds two things, %s and %s", w->clash - 1,
              ref_names[w->clash_kinds[0]], ref_names[w->clash_kinds[1]]);
  else if (other)
    snprintf (buf, len, "%" PRIu64 " of the errors are in tables, refcount blocks or "
              "bitmaps, not in counts or COPIED flags (see the ERROR lines)", other);
  else if (w->overflows && w->mode == Q2_REPAIR_ALL)
    snprintf (buf, len, "%" PRIu64 " clusters have more references than %u-bit refcounts "
              "can count", w->overflows, 1u << w->lay->refcount_order);
  else
    return NULL;
  return buf;
}

/* A refcount table entry past the end of the file is dropped: the counts
 * it should hold read as 0, and the pass that follows sets them in a new
 * block, which the table names once the block is on disk.
 */
static void drop_blocks_past_end (struct walk *w)
{
  struct meta *m = &w->img->m;
  uint64_t i, off;

  for (i = 0; i < m->reftable.size; i++) {
    if (w->block_bad[i] != BLOCK_PAST_END)
      continue;
    off = table_get (&m->reftable, i);
    log_notice ("%s: Repairing refcount block %" PRIu64 " at host offset 0x%" PRIx64
                " past the end of the file: its counts go into a new block", m->lay.name,
                i, off);
    table_set (&m->reftable, i, 0);
    overlap_del (&m->lay.meta, off >> m->lay.cluster_bits);
    w->block_bad[i] = 0;
    w->corruptions_fixed++;
  }
}

/* Punched only once the counts at 0 are on disk. */
static void punch_freed (struct walk *w)
{
  size_t i;

  for (i = 0; i < w->freed.len; i++)
    host_release (&w->img->m.hf, w->freed.ptr[i], w->lay->cluster_size);
}

/* The second pass: counts first, written back and synced, so that the
 * COPIED flags fixed after them rely on counts that are on disk.  COPIED is
 * fixed with -r leaks too when nothing else is left wrong, as qemu-img does.
 */
static int repair_pass (struct walk *w)
{
  struct meta *m = &w->img->m;
  struct q2_check second;
  bool synced, copied;
  int r;

  memset (&second, 0, sizeof second);
  w->res = &second;
  w->fixing = true;
  w->low_counts = w->copied_errors = 0;
  w->img->alloc.floor = w->nclusters;
  if (w->mode == Q2_REPAIR_ALL)
    drop_blocks_past_end (w);
  r = compare_refcounts (w);
  w->img->alloc.floor = 0;
  if (r == 0)
    r = writeback_all (m, false, &synced);
  copied = w->mode == Q2_REPAIR_ALL ||
    (second.corruptions == 0 && second.leaks == 0 && w->blocks_past_end == 0);
  if (r == 0)
    r = copied ? fix_copied (w) : check_copied (w);
  if (r == 0)
    r = writeback_all (m, false, &synced);
  if (r == 0)
    punch_freed (w);
  return r;
}

static int walk_new (struct walk *w, struct q2_image *img, struct q2_check *res)
{
  const struct layout *lay = &img->m.lay;
  uint32_t nsnap = lay->nb_snapshots;
  uint64_t size;
  int r;

  memset (res, 0, sizeof *res);
  w->img = img;
  w->lay = lay;
  w->res = res;
  if ((r = host_size (&img->m.hf, &size)) < 0)
    return r;
  w->nclusters = layout_clusters (lay, size);
  w->total = img->m.l1.size;
  w->refs = calloc (w->nclusters + 1, sizeof *w->refs);
  /* Only a repair needs to know what each cluster holds. */
  if (w->mode)
    w->kind = calloc (w->nclusters + 1, 1);
  w->block_bad = calloc (img->m.reftable.size + 1, 1);
  if (nsnap) {
    w->owner = calloc (w->nclusters + 1, sizeof *w->owner);
    res->snapshot_alone = calloc (nsnap, sizeof *res->snapshot_alone);
  }
  if (!w->refs || (w->mode && !w->kind) || !w->block_bad ||
      (nsnap && (!w->owner || !res->snapshot_alone)))
    return -ENOMEM;
  res->total_clusters = layout_clusters (lay, lay->virtual_size);
  return 0;
}

static void walk_free (struct walk *w)
{
  free (w->refs);
  free (w->kind);
  free (w->block_bad);
  free (w->owner);
  u64_vector_reset (&w->freed);
}

int check_repair (struct q2_image *img, enum q2_repair_mode mode, uint64_t *leaks_fixed,
                  uint64_t *corruptions_fixed, q2_progress_fn progress, void *opaque)
{
  struct walk w = { .mode = mode, .progress = progress, .opaque = opaque };
  struct q2_check first;
  const char *why;
  char buf[256];
  int r;

  *leaks_fixed = *corruptions_fixed = 0;
  if ((r = walk_new (&w, img, &first)) == 0)
    r = walk_all (&w);
  if (r == 0 && (why = refusal (&w, buf, sizeof buf))) {
    log_error ("%s: cannot repair safely: %s; nothing was changed (qemu-img check -r all "
               "rebuilds the refcount structure)", w.lay->name, why);
    r = -EINVAL;
  }
  if (r == 0) {
    LOCK_FOR_SCOPE (&img->m.lock);
    r = repair_pass (&w);
  }
  *leaks_fixed = w.leaks_fixed;
  *corruptions_fixed = w.corruptions_fixed;
  walk_free (&w);
  check_free (&first);
  return r;
}

int check_image (struct q2_image *img, struct q2_check *res, q2_progress_fn progress,
                 void *opaque)
{
  struct walk w = { .progress = progress, .opaque = opaque };
  int r;

  if ((r = walk_new (&w, img, res)) == 0)
    r = walk_all (&w);
  if (r == 0)
    r = host_bytes_in_free (&w, &res->reclaimable_bytes);
  walk_free (&w);
  if (r < 0)
    check_free (res);
  return r;
}

void check_free (struct q2_check *res)
{
  free (res->snapshot_alone);
  res->snapshot_alone = NULL;
}
