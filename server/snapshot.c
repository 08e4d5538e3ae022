/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-format.h"
#include "cleanup.h"
#include "corrupt.h"
#include "engine.h"
#include "header.h"
#include "log.h"
#include "snapshot.h"

/* An entry: 40 bytes of fixed fields, extra data, the id and the name,
 * padded to 8 bytes.
 */
#define ENTRY_FIXED 40

/* The extra data QEMU writes: the 64-bit VM state size, the disk size,
 * and the instruction count (-1: none).
 */
#define EXTRA_VM_STATE 0
#define EXTRA_ICOUNT 16

int snapshot_entry_read (struct q2_image *img, uint64_t off, struct snapshot_entry *e)
{
  uint8_t h[ENTRY_FIXED + EXTRA_ICOUNT + 8] = { 0 };
  int r;

  if ((r = host_pread (&img->m.hf, h, sizeof h, off)) < 0)
    return r;
  e->l1_offset = be64_get (h);
  e->l1_size = be32_get (h + 8);
  e->id_len = be16_get (h + 12);
  e->name_len = be16_get (h + 14);
  e->date_sec = be32_get (h + 16);
  e->date_nsec = be32_get (h + 20);
  e->vm_clock_nsec = be64_get (h + 24);
  e->vm_state_size = be32_get (h + 32);
  e->extra_len = be32_get (h + 36);
  if (e->extra_len >= EXTRA_VM_STATE + 8)
    e->vm_state_size = be64_get (h + ENTRY_FIXED + EXTRA_VM_STATE);
  e->icount = e->extra_len >= EXTRA_ICOUNT + 8 ? be64_get (h + ENTRY_FIXED + EXTRA_ICOUNT)
    : UINT64_MAX;
  e->has_icount = e->icount != UINT64_MAX;
  e->length = (ENTRY_FIXED + (uint64_t) e->extra_len + e->id_len + e->name_len + 7) & ~7ull;
  return 0;
}

static int read_string (struct q2_image *img, uint64_t off, uint16_t len, char **s)
{
  int r;

  if (!(*s = calloc (1, len + 1u)))
    return -ENOMEM;
  if (len && (r = host_pread (&img->m.hf, *s, len, off)) < 0) {
    free (*s);
    *s = NULL;
    return r;
  }
  return 0;
}

int snapshot_entry_names (struct q2_image *img, uint64_t off,
                          const struct snapshot_entry *e, char **id, char **name)
{
  uint64_t id_off = off + ENTRY_FIXED + e->extra_len;
  int r;

  *name = NULL;
  if ((r = read_string (img, id_off, e->id_len, id)) < 0)
    return r;
  if ((r = read_string (img, id_off + e->id_len, e->name_len, name)) < 0) {
    free (*id);
    *id = NULL;
  }
  return r;
}

int snapshot_table_bytes (struct q2_image *img, uint64_t *bytes)
{
  const struct layout *lay = &img->m.lay;
  uint64_t off = lay->snapshots_offset;
  struct snapshot_entry e;
  uint32_t i;
  int r;

  *bytes = 0;
  for (i = 0; i < lay->nb_snapshots; i++) {
    if (off + ENTRY_FIXED > lay->file_end)
      return corrupt_error (lay, "snapshot %u of the snapshot table at 0x%" PRIx64
                            " is past the end of the file", i, lay->snapshots_offset);
    if ((r = snapshot_entry_read (img, off, &e)) < 0)
      return r;
    off += e.length;
  }
  *bytes = off - lay->snapshots_offset;
  return 0;
}

int snapshot_move_table (struct q2_image *img, bool *moved)
{
  struct meta *m = &img->m;
  struct layout *lay = &m->lay;
  uint64_t bytes, n, where, old = lay->snapshots_offset;
  bool unsure = false;
  int r = 0;

  assert (mutex_held (&m->lock));
  *moved = false;
  if (!lay->nb_snapshots || m->failed)
    return m->failed ? -EIO : 0;
  /* QEMU puts the table at a cluster of its own; one that starts inside a
   * cluster may share it with something else, and stays.
   */
  if (layout_in_cluster (lay, old))
    return 0;
  if ((r = snapshot_table_bytes (img, &bytes)) < 0 || !bytes)
    return r;
  n = layout_clusters (lay, bytes);
  if ((r = alloc_claim_below (&img->alloc, n, old, &where)) < 0 || !where)
    return r;
  CLEANUP_FREE uint8_t *buf = calloc (n, lay->cluster_size);
  if (!buf)
    r = -ENOMEM;
  if (r == 0 && (r = host_pread (&m->hf, buf, bytes, old)) < 0)
    log_error ("%s: cannot read the snapshot table at 0x%" PRIx64 ": %s", lay->name,
               old, strerror (-r));
  if (r == 0 && (r = host_pwrite (&m->hf, buf, n << lay->cluster_bits, where)) < 0)
    log_error ("%s: cannot write the snapshot table at 0x%" PRIx64 ": %s", lay->name,
               where, strerror (-r));
  if (r == 0)
    r = host_sync (&m->hf);
  if (r == 0)
    r = header_switch_table (&m->hf, lay, HEADER_SNAPSHOTS, where, old,
                             lay->nb_snapshots, &unsure);
  if (r < 0) {
    if (unsure)
      __atomic_store_n (&m->failed, true, __ATOMIC_RELEASE);
    else
      alloc_release_range (&img->alloc, where, n);
    return r;
  }
  lay->snapshots_offset = where;
  *moved = true;
  return alloc_release_range (&img->alloc, old, n);
}
