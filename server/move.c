/* SPDX-License-Identifier: BSD-3-Clause */
/* The order that keeps a move safe comes from write-back, as for any
 * copy-on-write: the new cluster's count, then (synced with it) the data,
 * then the L2 entry, and the old cluster's count drops only after that is
 * on disk.  A power cut leaves either the old entry and the old data, or
 * the new entry and the copy.
 */
#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-format.h"
#include "cleanup.h"
#include "cluster.h"
#include "crypto.h"
#include "engine.h"
#include "l2.h"
#include "move.h"
#include "refcount.h"
#include "request.h"

/* An encrypted cluster's tweaks are its host offsets: decrypted where it
 * was, encrypted for where it goes, written whole.
 */
static int recrypt_cluster (struct q2_image *img, uint64_t from, uint64_t to,
                            uint64_t guest)
{
  uint64_t cs = img->m.lay.cluster_size;
  CLEANUP_FREE char *buf = malloc (cs);
  int r;

  if (!buf)
    return -ENOMEM;
  if ((r = crypto_pread (img->crypto, &img->m.hf, buf, cs, from)) < 0)
    return request_io_error (img, "read", from, guest, r);
  r = crypto_pwrite (img->crypto, &img->m.hf, buf, cs, to);
  return r < 0 ? request_io_error (img, "write", to, guest, r) : 0;
}

/* Copies what the source cluster holds, keeping its holes holes: a
 * cluster punched in part by sub-cluster discards stays as sparse.
 */
static int copy_cluster (struct q2_image *img, uint64_t from, uint64_t to, uint64_t guest,
                         bool data)
{
  struct hostfile *hf = &img->m.hf;
  uint64_t cs = img->m.lay.cluster_size, pos = from, d, h;
  CLEANUP_FREE char *buf = NULL;
  bool sparse;
  int r;

  if (data && img->crypto)
    return recrypt_cluster (img, from, to, guest);
  /* A free cluster is usually a hole already (freeing punched it): then
   * no punch, which costs the filesystem far more than the check.
   */
  if (host_is_hole (hf, to, cs, &sparse) < 0 || !sparse)
    sparse = host_can_punch (hf) && host_punch (hf, to, cs) == 0;

  if (!data && sparse)
    return 0;
  if (!(buf = malloc (cs)))
    return -ENOMEM;
  if (!sparse) {
    /* The destination may hold old bytes: write the cluster whole. */
    if (!data)
      memset (buf, 0, cs);
    else if ((r = host_pread (hf, buf, cs, from)) < 0)
      return request_io_error (img, "read", from, guest, r);
    r = host_pwrite (hf, buf, cs, to);
    return r < 0 ? request_io_error (img, "write", to, guest, r) : 0;
  }
  while (pos < from + cs) {
    if ((r = host_seek_data_in (hf, pos, from + cs, &d)) < 0)
      return request_io_error (img, "seek in", pos, guest, r);
    if (d >= from + cs)
      break;
    if ((r = host_seek_hole_in (hf, d, from + cs, &h)) < 0)
      return request_io_error (img, "seek in", d, guest, r);
    if (h > from + cs || h <= d)
      h = from + cs;
    if ((r = host_pread (hf, buf, h - d, d)) < 0)
      return request_io_error (img, "read", d, guest, r);
    if ((r = host_pwrite (hf, buf, h - d, to + (d - from))) < 0)
      return request_io_error (img, "write", to + (d - from), guest, r);
    pos = h;
  }
  return 0;
}

/* Under the metadata lock: is the entry still the one the plan saw, the
 * only reference to its cluster?
 */
static int still_movable (struct q2_image *img, uint64_t guest, uint64_t host,
                          struct mapping *m, bool *ok)
{
  uint64_t rc;
  int r;

  *ok = false;
  if ((r = cluster_map (img, guest, img->m.lay.cluster_size, m)) < 0)
    return r;
  /* The entry, not the kind, says where the cluster is: with subclusters
   * the kind is only the first one's.
   */
  if (m->kind == MAP_COMPRESSED || !m->copied || (m->entry & L2E_OFFSET_MASK) != host)
    return 0;
  if ((r = refcount_get (&img->m, host >> img->m.lay.cluster_bits, &rc)) < 0)
    return r;
  *ok = rc == 1;
  return 0;
}

int move_data (struct q2_image *img, uint64_t guest, uint64_t host, bool *moved)
{
  struct meta *m = &img->m;
  struct rangelock_held h;
  struct cache_entry *t;
  struct mapping map;
  uint64_t where = 0, idx;
  bool ok;
  int r;

  *moved = false;
  request_lock (img, &h, m->lay.cluster_size, guest, true);
  mutex_lock (&m->lock);
  r = still_movable (img, guest, host, &map, &ok);
  if (r == 0 && ok)
    r = alloc_claim_below (&img->alloc, 1, host, &where);
  mutex_unlock (&m->lock);
  if (r < 0 || !where)
    goto out;

  r = copy_cluster (img, host, where, guest,
                    m->lay.extl2 ? (map.bitmap & L2_BITMAP_ALLOC) != 0 : map.kind == MAP_NORMAL);

  mutex_lock (&m->lock);
  if (r < 0)
    alloc_release (&img->alloc, where, META_DATA, NULL);
  else if ((r = l2_get_writable (img, guest, &t)) == 0) {
    idx = layout_l2_index (&m->lay, guest);
    l2_entry_set (img, t, idx, where | QCOW_OFLAG_COPIED | (map.entry & QCOW_OFLAG_ZERO));
    l2_put (img, t);
    r = cluster_unref_later (img, map.entry, false);
    *moved = r == 0;
  }
  else
    alloc_release (&img->alloc, where, META_DATA, NULL);
  mutex_unlock (&m->lock);
out:
  request_unlock (img, &h);
  return r;
}
