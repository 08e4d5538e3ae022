/* SPDX-License-Identifier: BSD-3-Clause */
/* A kept bitmap is whole in memory, one bit per granule, its data
 * clusters one after another as the bitmap table orders them.  Bits are
 * set with atomic ORs and never cleared, so requests set them without a
 * lock; a byte whose OR changed something marks its data cluster dirty,
 * after the OR.  The write-back takes a cluster's dirty mark before it
 * writes the cluster, so a bit set meanwhile marks it again: it is
 * written the next time, never lost.
 *
 * On disk the kept bitmaps carry the in-use flag from the open to the
 * close, so what a crash leaves is marked inconsistent, whatever order
 * their data and tables reached the disk in; only the close, once all of
 * it is written and synced, clears the flag (DESIGN.md, "Persistent
 * bitmaps").
 *
 * Compaction moves the kept bitmaps' clusters through bitmap_move: a data
 * cluster or a table gets its new place in memory, and the next
 * write-back writes it there, then (synced) the table or the directory
 * entry naming it, synced, before the old place joins the deferred frees;
 * the directory moves at once, switched in the header.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-format.h"
#include "alloc.h"
#include "bitmap.h"
#include "header.h"
#include "log.h"
#include "refcount.h"
#include "writeback.h"

/* QEMU's bounds: a directory of at most 64 MiB, names of at most 1023
 * bytes, granularities of 512 B to 2 GiB, 512 MiB of one bitmap's data.
 */
#define DIR_MAX (64ull << 20)
#define NAME_MAX_BYTES 1023
#define GRANULARITY_MIN 9
#define GRANULARITY_MAX 31
#define DATA_MAX (512ull << 20)
#define BME_FLAGS_KNOWN (BME_FLAG_IN_USE | BME_FLAG_AUTO | BME_FLAG_EXTRA_COMPAT)

struct kept {
  struct bitmap_entry *e;     /* its table_offset: where the table is written */
  uint64_t nbits;             /* granules of the virtual disk */
  uint64_t *table;            /* the bitmap table, host order */
  uint8_t *data;              /* table_size clusters */
  uint8_t *dirty;             /* per data cluster: changed since written (atomic) */
  bool table_dirty;           /* an entry names a cluster claimed since */
  /* Compaction moved the table from here (0: it did not): the directory
   * names this place until the copy at e->table_offset is on disk.
   */
  uint64_t table_from;
};

struct bitmaps {
  uint32_t cluster_bits;      /* a data cluster's size: the table's unit */
  uint64_t dir_offset, dir_size;
  struct bitmap_entry *entries;
  uint32_t n;
  struct kept *kept;
  uint32_t nkept;
  bool marked;                /* the in-use flags are on disk */
  /* The kept bitmaps are loaded whole and kept current (the image is
   * open for writing); otherwise only their tables are, for plans.
   */
  bool current;
  /* Data clusters compaction moved away from: the tables on disk name
   * them until they are written, and only then are they freed.
   */
  struct u64_vector moved_from;
};

/* What an open for writing does with a bitmap. */
enum use { USE_KEEP, USE_LEAVE, USE_LEAVE_SAID, USE_CANNOT };

static uint64_t round8 (uint64_t n)
{
  return (n + 7) & ~7ull;
}

/* Granules of the disk, and the table entries that many bits need. */
static uint64_t granules (const struct layout *lay, uint8_t bits)
{
  return (lay->virtual_size + (1ull << bits) - 1) >> bits;
}

static uint64_t table_needed (const struct layout *lay, uint8_t bits)
{
  return layout_clusters (lay, (granules (lay, bits) + 7) / 8);
}

static int parse_entry (const uint8_t *dir, uint64_t size, uint64_t *pos,
                        struct bitmap_entry *e)
{
  const uint8_t *p = dir + *pos;
  uint32_t namelen;

  if (*pos + BITMAP_ENTRY_FIXED > size)
    return -EINVAL;
  e->pos = *pos;
  e->table_offset = be64_get (p + BME_TABLE_OFFSET);
  e->table_size = be32_get (p + BME_TABLE_SIZE);
  e->flags = be32_get (p + BME_FLAGS);
  e->type = p[BME_TYPE];
  e->granularity_bits = p[BME_GRANULARITY];
  namelen = be16_get (p + BME_NAME_SIZE);
  e->extra_size = be32_get (p + BME_EXTRA_SIZE);
  if (namelen == 0 || namelen > NAME_MAX_BYTES ||
      BITMAP_ENTRY_FIXED + (uint64_t) e->extra_size + namelen > size - *pos)
    return -EINVAL;
  if (!(e->name = strndup ((const char *) p + BITMAP_ENTRY_FIXED + e->extra_size, namelen)))
    return -ENOMEM;
  *pos += round8 (BITMAP_ENTRY_FIXED + (uint64_t) e->extra_size + namelen);
  return 0;
}

/* The directory's entries; -EINVAL, said, when it is not one. */
static int read_directory (struct meta *m, struct bitmaps *b)
{
  const struct layout *lay = &m->lay;
  uint64_t size = lay->bitmap_dir_size, off = lay->bitmap_dir_offset, pos = 0;
  uint32_t i;
  int r;

  if (size < BITMAP_ENTRY_FIXED || size > DIR_MAX || off == 0 ||
      off & (lay->cluster_size - 1) || off >= lay->file_end || size > lay->file_end - off) {
    log_notice ("%s: the persistent bitmap directory (0x%" PRIx64 ", %" PRIu64
                " bytes) is not inside the file", lay->name, off, size);
    return -EINVAL;
  }
  /* Each entry takes at least its fixed part: a count past what the
   * directory can hold is a bad header, not a reason to allocate for it.
   */
  if (lay->nb_bitmaps > size / BITMAP_ENTRY_FIXED) {
    log_notice ("%s: the header counts %" PRIu32 " persistent bitmaps, more than a "
                "directory of %" PRIu64 " bytes holds", lay->name, lay->nb_bitmaps, size);
    return -EINVAL;
  }
  uint8_t *dir = malloc (size);
  if (!dir || !(b->entries = calloc (lay->nb_bitmaps, sizeof *b->entries))) {
    free (dir);
    return -ENOMEM;
  }
  b->dir_offset = off;
  b->dir_size = size;
  if ((r = host_pread (&m->hf, dir, size, off)) < 0)
    log_error ("%s: cannot read the persistent bitmap directory: %s", lay->name,
               strerror (-r));
  for (i = 0; r == 0 && i < lay->nb_bitmaps; i++, b->n++)
    if ((r = parse_entry (dir, size, &pos, &b->entries[i])) == -EINVAL)
      log_notice ("%s: entry %u of the persistent bitmap directory at 0x%" PRIx64
                  " is invalid", lay->name, i, off);
  free (dir);
  return r;
}

/* A table inside the file, where the layout puts no other metadata. */
static bool table_place_ok (const struct layout *lay, const struct bitmap_entry *e)
{
  uint64_t bytes = (uint64_t) e->table_size * 8;

  return e->table_size && e->table_offset && !(e->table_offset & (lay->cluster_size - 1)) &&
    e->table_offset < lay->file_end && bytes <= lay->file_end - e->table_offset;
}

/* say: the notices go to the log (an open for writing says each once). */
static enum use classify (const struct layout *lay, const struct bitmap_entry *e, bool say)
{
  uint64_t need;
  bool bad_size;

  if (e->flags & BME_FLAG_IN_USE) {
    if (say)
      log_notice ("%s: persistent bitmap '%s' is marked in use (the program that used it "
                "last did not save it), so it is inconsistent: it is left as it is",
                lay->name, e->name);
    return USE_LEAVE_SAID;
  }
  if (e->flags & ~BME_FLAGS_KNOWN || e->type != BME_TYPE_DIRTY_TRACKING ||
      (e->extra_size && !(e->flags & BME_FLAG_EXTRA_COMPAT))) {
    if (say)
      log_notice ("%s: persistent bitmap '%s' is of a kind this version does not know "
                "(type %u, flags 0x%x, %u bytes of extra data): it is left as it is",
                lay->name, e->name, e->type, e->flags, e->extra_size);
    return USE_LEAVE_SAID;
  }
  /* A disabled bitmap records nothing: left as it is, it stays true. */
  if (!(e->flags & BME_FLAG_AUTO))
    return USE_LEAVE;
  if (e->granularity_bits < GRANULARITY_MIN || e->granularity_bits > GRANULARITY_MAX) {
    if (say)
      log_notice ("%s: persistent bitmap '%s' has a granularity of 2^%u bytes, outside the "
                "512 B to 2 GiB this version keeps", lay->name, e->name, e->granularity_bits);
    return USE_CANNOT;
  }
  need = table_needed (lay, e->granularity_bits);
  bad_size = e->table_size != need || need << lay->cluster_bits > DATA_MAX;
  if (!bad_size && table_place_ok (lay, e))
    return USE_KEEP;
  if (!say)
    return USE_CANNOT;
  if (bad_size)
    log_notice ("%s: persistent bitmap '%s' has a table of %u entries, where the virtual "
                "size needs %" PRIu64 " (at most %llu MiB of data)", lay->name, e->name,
                e->table_size, need, DATA_MAX >> 20);
  else
    log_notice ("%s: persistent bitmap '%s' has its table at 0x%" PRIx64 ", not a valid "
                "place in the file", lay->name, e->name, e->table_offset);
  return USE_CANNOT;
}

static bool entry_ok (const struct layout *lay, uint64_t t)
{
  uint64_t off = t & BITMAP_TABLE_OFFSET_MASK;

  if (t & BITMAP_TABLE_RESERVED_MASK)
    return false;
  return !off || (!(t & BITMAP_TABLE_ALL_ONES) && !(off & (lay->cluster_size - 1)) &&
                  off < lay->file_end);
}

static int read_table (struct meta *m, const struct bitmap_entry *e, uint64_t **tp)
{
  uint64_t *t = malloc ((size_t) e->table_size * 8), i;
  int r;

  *tp = NULL;
  if (!t)
    return -ENOMEM;
  if ((r = host_pread (&m->hf, t, (size_t) e->table_size * 8, e->table_offset)) < 0) {
    log_error ("%s: cannot read the table of persistent bitmap '%s': %s", m->lay.name,
               e->name, strerror (-r));
    free (t);
    return r;
  }
  for (i = 0; i < e->table_size; i++)
    t[i] = be64_get (&t[i]);
  *tp = t;
  return 0;
}

/* Clusters of a bitmap go into the overlap set, so that nothing else is
 * read or written there; a clash with other metadata is left out.
 */
static int add_cluster (struct meta *m, uint64_t off)
{
  uint64_t c = off >> m->lay.cluster_bits;

  if (overlap_kind (&m->lay.meta, c) != META_DATA)
    return 0;
  return overlap_add (&m->lay.meta, c, META_BITMAP);
}

static int add_range (struct meta *m, uint64_t off, uint64_t bytes)
{
  uint64_t c;
  int r;

  for (c = 0; c < layout_clusters (&m->lay, bytes); c++)
    if ((r = add_cluster (m, off + (c << m->lay.cluster_bits))) < 0)
      return r;
  return 0;
}

/* A bitmap's table and data clusters, for one not kept (a bad table is
 * not followed).
 */
static int add_bitmap (struct meta *m, const struct bitmap_entry *e, const uint64_t *table)
{
  uint64_t *t = NULL, i;
  int r;

  if (!table_place_ok (&m->lay, e))
    return 0;
  if (!table && (r = read_table (m, e, &t)) < 0)
    return r == -ENOMEM ? r : 0;
  if ((r = add_range (m, e->table_offset, (uint64_t) e->table_size * 8)) == 0)
    for (i = 0; i < e->table_size && r == 0; i++) {
      uint64_t v = (table ? table : t)[i];
      if (entry_ok (&m->lay, v) && (v & BITMAP_TABLE_OFFSET_MASK))
        r = add_cluster (m, v & BITMAP_TABLE_OFFSET_MASK);
    }
  free (t);
  return r;
}

/* The bitmap's data, from the clusters its table names. */
static int load_kept (struct meta *m, struct kept *k, bool *bad)
{
  const struct layout *lay = &m->lay;
  const struct bitmap_entry *e = k->e;
  uint64_t cs = lay->cluster_size, i;
  int r;

  *bad = false;
  k->nbits = granules (lay, e->granularity_bits);
  if ((r = read_table (m, e, &k->table)) < 0)
    return r;
  if (!(k->data = calloc (e->table_size, cs)) || !(k->dirty = calloc (e->table_size, 1)))
    return -ENOMEM;
  for (i = 0; i < e->table_size; i++) {
    uint64_t t = k->table[i], off = t & BITMAP_TABLE_OFFSET_MASK;
    if (!entry_ok (lay, t)) {
      log_notice ("%s: persistent bitmap '%s' has an invalid table entry %" PRIu64
                  " (0x%" PRIx64 ")", lay->name, e->name, i, t);
      *bad = true;
      return 0;
    }
    if (off && (r = host_pread (&m->hf, k->data + i * cs, cs, off)) < 0) {
      log_error ("%s: cannot read persistent bitmap '%s' at 0x%" PRIx64 ": %s",
                 lay->name, e->name, off, strerror (-r));
      return r;
    }
    if (!off && (t & BITMAP_TABLE_ALL_ONES))
      memset (k->data + i * cs, 0xff, cs);
  }
  return 0;
}

static void free_kept (struct bitmaps *b)
{
  uint32_t i;

  for (i = 0; i < b->nkept; i++) {
    free (b->kept[i].table);
    free (b->kept[i].data);
    free (b->kept[i].dirty);
  }
  free (b->kept);
  b->kept = NULL;
  b->nkept = 0;
}

void bitmap_free (struct bitmaps *b)
{
  uint32_t i;

  if (!b)
    return;
  free_kept (b);
  u64_vector_reset (&b->moved_from);
  for (i = 0; i < b->n; i++)
    free (b->entries[i].name);
  free (b->entries);
  free (b);
}

/* Which bitmaps are kept, and their data; *cannot when one that records
 * changes can be neither kept nor left valid.
 */
static int choose (struct meta *m, struct bitmaps *b, bool *cannot)
{
  uint32_t i;
  bool bad;
  int r;

  if (!(b->kept = calloc (b->n, sizeof *b->kept)))
    return -ENOMEM;
  for (i = 0; i < b->n && !*cannot; i++) {
    enum use u = classify (&m->lay, &b->entries[i], true);
    if (u == USE_CANNOT)
      *cannot = true;
    if (u != USE_KEEP)
      continue;
    b->kept[b->nkept].e = &b->entries[i];
    if ((r = load_kept (m, &b->kept[b->nkept++], &bad)) < 0)
      return r;
    *cannot = bad;
  }
  b->current = true;
  return 0;
}

/* Opened read-only (or for a repair): the bitmaps an open for writing
 * would keep, with their tables only, so that a plan (compact --dry-run,
 * info) counts their clusters as movable.
 */
static int choose_planned (struct meta *m, struct bitmaps *b)
{
  uint32_t i;
  uint64_t j;
  int r;

  if (!(b->kept = calloc (b->n, sizeof *b->kept)))
    return -ENOMEM;
  for (i = 0; i < b->n; i++) {
    struct kept *k = &b->kept[b->nkept];
    if (classify (&m->lay, &b->entries[i], false) != USE_KEEP)
      continue;
    k->e = &b->entries[i];
    if ((r = read_table (m, k->e, &k->table)) < 0)
      return r == -ENOMEM ? r : 0;
    for (j = 0; j < k->e->table_size && entry_ok (&m->lay, k->table[j]); j++)
      ;
    if (j < k->e->table_size) {
      free (k->table);
      k->table = NULL;
      continue;
    }
    b->nkept++;
  }
  return 0;
}

int bitmap_open (struct meta *m, bool writable, struct bitmaps **bp, bool *cannot)
{
  struct bitmaps *b;
  uint32_t i, k;
  int r;

  *bp = NULL;
  *cannot = false;
  if (!m->lay.nb_bitmaps)
    return 0;
  if (!(b = calloc (1, sizeof *b)))
    return -ENOMEM;
  b->cluster_bits = m->lay.cluster_bits;
  r = read_directory (m, b);
  if (r == 0)
    r = writable ? choose (m, b, cannot) : choose_planned (m, b);
  if (r == -EINVAL)
    *cannot = writable;
  if (r < 0 || *cannot) {
    bitmap_free (b);
    return r == -EINVAL || *cannot ? 0 : r;
  }
  r = add_range (m, b->dir_offset, m->lay.bitmap_dir_size);
  for (i = 0, k = 0; i < b->n && r == 0; i++) {
    const uint64_t *t = k < b->nkept && b->kept[k].e == &b->entries[i] ? b->kept[k++].table
      : NULL;
    r = add_bitmap (m, &b->entries[i], t);
  }
  if (r < 0) {
    bitmap_free (b);
    return r;
  }
  *bp = b;
  return 0;
}

const struct bitmap_entry *bitmap_entries (const struct bitmaps *b, uint32_t *n)
{
  *n = b ? b->n : 0;
  return b ? b->entries : NULL;
}

bool bitmap_in_use (const struct bitmaps *b, uint32_t i)
{
  uint32_t k;

  if (b->entries[i].flags & BME_FLAG_IN_USE)
    return true;
  for (k = 0; b->marked && k < b->nkept; k++)
    if (b->kept[k].e == &b->entries[i])
      return true;
  return false;
}

/* Each flag is 4 bytes inside one sector: a write of it is atomic. */
static int write_flags (struct bitmaps *b, struct meta *m, bool in_use)
{
  uint32_t i;
  uint8_t f[4];
  int r;

  for (i = 0; i < b->nkept; i++) {
    const struct bitmap_entry *e = b->kept[i].e;
    be32_put (f, in_use ? e->flags | BME_FLAG_IN_USE : e->flags & ~BME_FLAG_IN_USE);
    if ((r = host_pwrite (&m->hf, f, sizeof f, b->dir_offset + e->pos + BME_FLAGS)) < 0)
      return r;
  }
  return host_sync (&m->hf);
}

int bitmap_mark_in_use (struct bitmaps *b, struct meta *m)
{
  int r;

  if (!b || !b->nkept || !b->current)
    return 0;
  if ((r = write_flags (b, m, true)) < 0) {
    log_error ("%s: cannot mark the persistent bitmaps in use: %s", m->lay.name,
               strerror (-r));
    return r;
  }
  b->marked = true;
  return 0;
}

int bitmap_close (struct bitmaps *b, struct meta *m)
{
  int r;

  if (!b || !b->marked)
    return 0;
  if ((r = write_flags (b, m, false)) < 0) {
    log_error ("%s: cannot clear the in-use flags of the persistent bitmaps (they stay "
               "inconsistent): %s", m->lay.name, strerror (-r));
    return r;
  }
  b->marked = false;
  return 0;
}

static void set_bits (struct kept *k, uint64_t first, uint64_t last, uint32_t cluster_bits)
{
  uint64_t byte, end = last / 8;

  for (byte = first / 8; byte <= end; byte++) {
    unsigned lo = byte == first / 8 ? first % 8 : 0, hi = byte == end ? last % 8 : 7;
    uint8_t mask = (uint8_t) ((0xffu >> (7 - hi)) & (0xffu << lo));
    uint8_t old = __atomic_fetch_or (&k->data[byte], mask, __ATOMIC_SEQ_CST);
    if ((old & mask) != mask)
      __atomic_store_n (&k->dirty[byte >> cluster_bits], 1, __ATOMIC_SEQ_CST);
  }
}

void bitmap_set (struct bitmaps *b, uint64_t offset, uint64_t len)
{
  uint32_t i;

  if (!b || !len || !b->current)
    return;
  for (i = 0; i < b->nkept; i++) {
    struct kept *k = &b->kept[i];
    uint8_t gb = k->e->granularity_bits;
    uint64_t end = len - 1 > UINT64_MAX - offset ? UINT64_MAX : offset + len - 1;
    uint64_t first = offset >> gb, last = end >> gb;
    if (first >= k->nbits)
      continue;
    set_bits (k, first, last < k->nbits ? last : k->nbits - 1, b->cluster_bits);
  }
}

/* A data cluster the table has none for (it read as zeros) is claimed
 * now: its count goes to disk in the write-back that follows, before the
 * table naming it (bitmap_write_tables).
 */
static int write_cluster (struct kept *k, struct alloc *a, uint64_t i)
{
  struct meta *m = a->m;
  uint64_t cs = m->lay.cluster_size, off = k->table[i] & BITMAP_TABLE_OFFSET_MASK;
  int r;

  if (!off) {
    if ((r = alloc_contiguous (a, 1, &off)) < 0)
      return r;
    if ((r = overlap_add (&m->lay.meta, off >> m->lay.cluster_bits, META_BITMAP)) < 0) {
      alloc_release (a, off, META_DATA, NULL);
      return r;
    }
    k->table[i] = off;
    k->table_dirty = true;
  }
  if ((r = host_pwrite (&m->hf, k->data + i * cs, cs, off)) < 0)
    log_error ("%s: cannot write persistent bitmap '%s' at 0x%" PRIx64 ": %s",
               m->lay.name, k->e->name, off, strerror (-r));
  return r;
}

int bitmap_write_data (struct bitmaps *b, struct alloc *a)
{
  uint32_t i;
  uint64_t j;
  int r;

  if (!b || !b->current)
    return 0;
  for (i = 0; i < b->nkept; i++) {
    struct kept *k = &b->kept[i];
    for (j = 0; j < k->e->table_size; j++) {
      if (!__atomic_exchange_n (&k->dirty[j], 0, __ATOMIC_SEQ_CST))
        continue;
      if ((r = write_cluster (k, a, j)) < 0) {
        __atomic_store_n (&k->dirty[j], 1, __ATOMIC_SEQ_CST);
        return r;
      }
    }
  }
  return 0;
}

bool bitmap_tables_dirty (const struct bitmaps *b)
{
  uint32_t i;

  for (i = 0; b && i < b->nkept; i++)
    if (b->kept[i].table_dirty || b->kept[i].table_from)
      return true;
  return false;
}

/* Whole sectors, so that a torn write leaves each entry old or new. */
static int write_table (struct kept *k, struct meta *m)
{
  uint64_t bytes = ((uint64_t) k->e->table_size * 8 + 511) & ~511ull, i;
  uint8_t *buf = calloc (1, bytes);
  int r;

  if (!buf)
    return -ENOMEM;
  for (i = 0; i < k->e->table_size; i++)
    be64_put (buf + i * 8, k->table[i]);
  if ((r = host_pwrite (&m->hf, buf, bytes, k->e->table_offset)) < 0)
    log_error ("%s: cannot write the table of persistent bitmap '%s' at 0x%" PRIx64
               ": %s", m->lay.name, k->e->name, k->e->table_offset, strerror (-r));
  free (buf);
  return r;
}

static uint64_t table_clusters (const struct bitmaps *b, const struct bitmap_entry *e)
{
  uint64_t cs = 1ull << b->cluster_bits;

  return ((uint64_t) e->table_size * 8 + cs - 1) >> b->cluster_bits;
}

static uint64_t dir_clusters (const struct bitmaps *b)
{
  uint64_t cs = 1ull << b->cluster_bits;

  return (b->dir_size + cs - 1) >> b->cluster_bits;
}

static int free_range_later (struct bitmaps *b, struct alloc *a, uint64_t off, uint64_t n)
{
  uint64_t c;
  int r;

  for (c = 0; c < n; c++)
    if ((r = alloc_free_later (a, off + (c << b->cluster_bits), META_BITMAP, false)) < 0)
      return r;
  return 0;
}

/* The directory names the moved tables' new places (an 8-byte field at an
 * 8-byte boundary of the directory, so inside one sector), synced; then
 * the old tables, and the data clusters the old tables named, are freed
 * with the next deferred frees.
 */
static int switch_tables (struct bitmaps *b, struct alloc *a)
{
  struct meta *m = a->m;
  uint8_t f[8];
  uint32_t i;
  bool any = false;
  size_t j, frees = b->moved_from.len;
  int r;

  for (i = 0; i < b->nkept; i++) {
    struct kept *k = &b->kept[i];
    if (!k->table_from)
      continue;
    frees += table_clusters (b, k->e);
    be64_put (f, k->e->table_offset);
    if ((r = host_pwrite (&m->hf, f, sizeof f,
                          b->dir_offset + k->e->pos + BME_TABLE_OFFSET)) < 0) {
      log_error ("%s: cannot switch persistent bitmap '%s' to its table at 0x%" PRIx64
                 ": %s", m->lay.name, k->e->name, k->e->table_offset, strerror (-r));
      return r;
    }
    any = true;
  }
  if (any && (r = host_sync (&m->hf)) < 0)
    return r;
  /* Room first: a free handed over twice would drop a count twice. */
  if ((r = u64_vector_reserve (&a->pending, frees)) < 0)
    return r;
  for (i = 0; i < b->nkept; i++) {
    struct kept *k = &b->kept[i];
    if (k->table_from &&
        (r = free_range_later (b, a, k->table_from, table_clusters (b, k->e))) < 0)
      return r;
    k->table_from = 0;
  }
  for (j = 0; j < b->moved_from.len; j++)
    if ((r = alloc_free_later (a, b->moved_from.ptr[j], META_BITMAP, false)) < 0)
      break;
  u64_vector_remove_front (&b->moved_from, j);
  return r;
}

int bitmap_write_tables (struct bitmaps *b, struct alloc *a)
{
  struct meta *m = a->m;
  uint32_t i;
  int r;

  if (!bitmap_tables_dirty (b))
    return 0;
  /* The counts may have gone out with an evicted block, unsynced; and the
   * data of clusters the tables now name is synced with them.
   */
  if ((r = writeback_sync (m)) < 0)
    return r;
  for (i = 0; i < b->nkept; i++) {
    if (!b->kept[i].table_dirty)
      continue;
    if ((r = write_table (&b->kept[i], m)) < 0)
      return r;
    b->kept[i].table_dirty = false;
  }
  if ((r = writeback_sync (m)) < 0)
    return r;
  return switch_tables (b, a);
}

/* Compaction's moves.  A reference names what a cluster belongs to: the
 * directory, a kept bitmap's table, or one of its data clusters.
 */
#define REF_DIRECTORY UINT64_MAX
#define REF_TABLE UINT32_MAX

static uint64_t ref_of (uint32_t kept, uint64_t index)
{
  return (uint64_t) kept << 32 | index;
}

int bitmap_clusters (const struct bitmaps *b, uint64_t lo, uint64_t hi,
                     bitmap_cluster_fn fn, void *opaque)
{
  uint32_t cb, i;
  uint64_t j;
  size_t f;
  int r = 0;

  /* Only an image open for writing has bitmaps it keeps (and may move). */
  if (!b || !b->kept)
    return 0;
  cb = b->cluster_bits;
#define RANGE(first, n) ((first) + (n) > lo && (first) < hi)
  if (b->dir_offset) {
    uint64_t first = b->dir_offset >> cb, n = dir_clusters (b);
    if (RANGE (first, n) && (r = fn (opaque, first, n, REF_DIRECTORY, false)) < 0)
      return r;
  }
  for (i = 0; i < b->nkept; i++) {
    const struct kept *k = &b->kept[i];
    uint64_t n = table_clusters (b, k->e), first = k->e->table_offset >> cb;
    if (RANGE (first, n) && (r = fn (opaque, first, n, ref_of (i, REF_TABLE), false)) < 0)
      return r;
    first = k->table_from >> cb;
    if (k->table_from && RANGE (first, n) && (r = fn (opaque, first, n, 0, true)) < 0)
      return r;
    for (j = 0; j < k->e->table_size; j++) {
      first = (k->table[j] & BITMAP_TABLE_OFFSET_MASK) >> cb;
      if (first && RANGE (first, 1) && (r = fn (opaque, first, 1, ref_of (i, j), false)) < 0)
        return r;
    }
  }
  for (f = 0; f < b->moved_from.len; f++) {
    uint64_t first = b->moved_from.ptr[f] >> cb;
    if (RANGE (first, 1) && (r = fn (opaque, first, 1, 0, true)) < 0)
      return r;
  }
#undef RANGE
  return 0;
}

/* n clusters from first hold nothing but this bitmap's (a clash with
 * other metadata was left out of the overlap set) and only it counts them.
 */
static int owned (struct meta *m, uint64_t first, uint64_t n, bool *ok)
{
  uint64_t c, rc;
  int r;

  *ok = false;
  for (c = first; c < first + n; c++) {
    if (overlap_kind (&m->lay.meta, c) != META_BITMAP)
      return 0;
    if ((r = refcount_get (m, c, &rc)) < 0)
      return r;
    if (rc != 1)
      return 0;
  }
  *ok = true;
  return 0;
}

/* n clusters below first, which now hold bitmap metadata; *where 0: none. */
static int claim (struct alloc *a, uint64_t first, uint64_t n, uint64_t *where)
{
  struct meta *m = a->m;
  uint32_t cb = m->lay.cluster_bits;
  uint64_t c;
  bool ok;
  int r;

  *where = 0;
  if ((r = owned (m, first, n, &ok)) < 0 || !ok)
    return r;
  if ((r = alloc_claim_below (a, n, first << cb, where)) < 0 || !*where)
    return r;
  for (c = 0; c < n; c++)
    if ((r = overlap_add (&m->lay.meta, (*where >> cb) + c, META_BITMAP)) < 0) {
      while (c-- > 0)
        overlap_del (&m->lay.meta, (*where >> cb) + c);
      alloc_release_range (a, *where, n);
      *where = 0;
      return r;
    }
  return 0;
}

static void unclaim (struct alloc *a, uint64_t where, uint64_t n)
{
  uint64_t c;

  for (c = 0; c < n; c++)
    alloc_release (a, where + (c << a->m->lay.cluster_bits), META_BITMAP, NULL);
  host_release (&a->m->hf, where, n << a->m->lay.cluster_bits);
}

/* The new place is written by the next write-back (the cluster is marked
 * dirty), synced, before the table naming it; the old one is freed after
 * that table is on disk.
 */
static int move_data (struct bitmaps *b, struct alloc *a, struct kept *k, uint64_t j,
                      uint64_t cluster, bool *moved)
{
  uint64_t off = k->table[j] & BITMAP_TABLE_OFFSET_MASK, where;
  int r;

  if (!off || off >> b->cluster_bits != cluster)
    return 0;
  if ((r = u64_vector_reserve (&b->moved_from, 1)) < 0 ||
      (r = claim (a, cluster, 1, &where)) < 0 || !where)
    return r;
  u64_vector_append (&b->moved_from, off);
  k->table[j] = where;
  __atomic_store_n (&k->dirty[j], 1, __ATOMIC_SEQ_CST);
  k->table_dirty = true;
  *moved = true;
  return 0;
}

/* Written at its new place by the next write-back, after everything it
 * names is on disk; the directory switched, synced, before the old place
 * is freed (switch_tables).
 */
static int move_table (struct bitmaps *b, struct alloc *a, struct kept *k,
                       uint64_t cluster, bool *moved)
{
  uint64_t n = table_clusters (b, k->e), first = k->e->table_offset >> b->cluster_bits;
  uint64_t where;
  int r;

  /* A table moved since the last write-back waits for it. */
  if (k->table_from || first + n - 1 != cluster)
    return 0;
  if ((r = claim (a, first, n, &where)) < 0 || !where)
    return r;
  k->table_from = k->e->table_offset;
  k->e->table_offset = where;
  k->table_dirty = true;
  *moved = true;
  return 0;
}

/* The directory moves at once, as the L1 table does: the new place's
 * count and the copy on disk, synced, then the header switched, synced.
 * The copy is of the disk's directory, which is always whole (only small
 * writes inside one sector change it in place).
 */
static int move_directory (struct bitmaps *b, struct alloc *a, uint64_t cluster,
                           bool *moved)
{
  struct meta *m = a->m;
  uint64_t n = dir_clusters (b), first = b->dir_offset >> b->cluster_bits, where;
  uint8_t *buf = NULL;
  bool synced, unsure = false;
  int r;

  if (m->failed)
    return -EIO;
  if (first + n - 1 != cluster)
    return 0;
  if (!(buf = malloc (b->dir_size)))
    return -ENOMEM;
  if ((r = claim (a, first, n, &where)) < 0 || !where) {
    free (buf);
    return r;
  }
  if ((r = host_pread (&m->hf, buf, b->dir_size, b->dir_offset)) < 0 ||
      (r = writeback_all (m, false, &synced)) < 0 ||
      (r = host_pwrite (&m->hf, buf, b->dir_size, where)) < 0 ||
      (r = host_sync (&m->hf)) < 0 ||
      (r = header_switch_table (&m->hf, &m->lay, HEADER_BITMAP_DIR, where, b->dir_offset,
                                0, &unsure)) < 0) {
    free (buf);
    log_error ("%s: cannot move the persistent bitmap directory to 0x%" PRIx64 ": %s",
               m->lay.name, where, strerror (-r));
    /* Unsure which directory the disk names: both stay, nothing changes. */
    if (unsure)
      __atomic_store_n (&m->failed, true, __ATOMIC_RELEASE);
    else
      unclaim (a, where, n);
    return r;
  }
  free (buf);
  r = free_range_later (b, a, b->dir_offset, n);
  b->dir_offset = m->lay.bitmap_dir_offset = where;
  *moved = true;
  return r;
}

int bitmap_move (struct bitmaps *b, struct alloc *a, uint64_t ref, uint64_t cluster,
                 bool *moved, uint64_t *clusters)
{
  uint32_t i = (uint32_t) (ref >> 32);
  uint64_t j = ref & UINT32_MAX;

  assert (mutex_held (&a->m->lock));
  *moved = false;
  *clusters = 1;
  if (!b || !b->current)
    return 0;
  if (ref == REF_DIRECTORY) {
    *clusters = dir_clusters (b);
    return move_directory (b, a, cluster, moved);
  }
  if (i >= b->nkept)
    return 0;
  if (j == REF_TABLE) {
    *clusters = table_clusters (b, b->kept[i].e);
    return move_table (b, a, &b->kept[i], cluster, moved);
  }
  if (j >= b->kept[i].e->table_size)
    return 0;
  return move_data (b, a, &b->kept[i], j, cluster, moved);
}
