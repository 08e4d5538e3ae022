#include <config.h>

#include <errno.h>
#include <stdlib.h>

#include "image.h"
#include "overlap.h"

/* Open addressing with linear probing; deletion re-inserts the rest of the
 * cluster of slots, so no tombstones are needed.
 */
#define KIND_BITS 2
#define KIND_MASK ((1ull << KIND_BITS) - 1)

static uint64_t key_of (uint64_t slot) { return slot >> KIND_BITS; }

static size_t home (const struct meta_set *s, uint64_t key)
{
  return (size_t) ((key * 0x9e3779b97f4a7c15ull) >> 20) & (s->nslots - 1);
}

static size_t find (const struct meta_set *s, uint64_t key)
{
  size_t i = home (s, key);

  while (s->slots[i] && key_of (s->slots[i]) != key)
    i = (i + 1) & (s->nslots - 1);
  return i;
}

static int grow (struct meta_set *s)
{
  struct meta_set n = { calloc (s->nslots ? s->nslots * 2 : 1024, sizeof (uint64_t)),
                        s->nslots ? s->nslots * 2 : 1024, 0 };
  size_t i;

  if (!n.slots)
    return -ENOMEM;
  for (i = 0; i < s->nslots; i++)
    if (s->slots[i])
      n.slots[find (&n, key_of (s->slots[i]))] = s->slots[i], n.nused++;
  free (s->slots);
  *s = n;
  return 0;
}

int overlap_add (struct meta_set *s, uint64_t cluster, enum meta_kind kind)
{
  int r;

  if ((s->nused + 1) * 2 > s->nslots && (r = grow (s)) < 0)
    return r;
  size_t i = find (s, cluster + 1);
  if (!s->slots[i])
    s->nused++;
  s->slots[i] = (cluster + 1) << KIND_BITS | kind;
  return 0;
}

void overlap_del (struct meta_set *s, uint64_t cluster)
{
  size_t i, j;

  if (!s->nslots)
    return;
  i = find (s, cluster + 1);
  if (!s->slots[i])
    return;
  s->slots[i] = 0;
  s->nused--;
  for (j = (i + 1) & (s->nslots - 1); s->slots[j]; j = (j + 1) & (s->nslots - 1)) {
    uint64_t v = s->slots[j];
    s->slots[j] = 0;
    s->slots[find (s, key_of (v))] = v;
  }
}

enum meta_kind overlap_kind (const struct meta_set *s, uint64_t cluster)
{
  if (!s->nslots)
    return META_NONE;
  return (enum meta_kind) (s->slots[find (s, cluster + 1)] & KIND_MASK);
}

void overlap_free (struct meta_set *s)
{
  free (s->slots);
  s->slots = NULL;
  s->nslots = s->nused = 0;
}

/* Active L2 tables and refcount blocks; bad offsets are left for the
 * request that meets them to report.
 */
int overlap_build (struct q2_image *img)
{
  uint64_t i, off;
  int r;

  for (i = 0; i < img->reftable.size; i++)
    if ((off = img->reftable.entries[i] & REFT_OFFSET_MASK) &&
        (r = overlap_add (&img->meta, off >> img->cluster_bits, META_REFBLOCK)) < 0)
      return r;
  for (i = 0; i < img->l1.size; i++)
    if ((off = img->l1.entries[i] & L1E_OFFSET_MASK) &&
        overlap_kind (&img->meta, off >> img->cluster_bits) == META_NONE &&
        (r = overlap_add (&img->meta, off >> img->cluster_bits, META_L2)) < 0)
      return r;
  return 0;
}
