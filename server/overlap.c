/* SPDX-License-Identifier: BSD-3-Clause */
/* Open addressing with linear probing.  Deletion re-inserts the rest of the
 * run of occupied slots after the hole, so lookups never need tombstones.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdlib.h>

#include "overlap.h"

#define KIND_BITS 2
#define KIND_MASK ((1ull << KIND_BITS) - 1)

static uint64_t key_of (uint64_t slot) { return slot >> KIND_BITS; }

static size_t home (const struct overlap *s, uint64_t key)
{
  return (size_t) ((key * 0x9e3779b97f4a7c15ull) >> 20) & (s->nslots - 1);
}

static size_t find (const struct overlap *s, uint64_t key)
{
  size_t i = home (s, key);

  while (s->slots[i] && key_of (s->slots[i]) != key)
    i = (i + 1) & (s->nslots - 1);
  return i;
}

static int grow (struct overlap *s)
{
  size_t n = s->nslots ? s->nslots * 2 : 1024, i;
  struct overlap g = { calloc (n, sizeof (uint64_t)), n, 0 };

  if (!g.slots)
    return -ENOMEM;
  for (i = 0; i < s->nslots; i++)
    if (s->slots[i]) {
      g.slots[find (&g, key_of (s->slots[i]))] = s->slots[i];
      g.nused++;
    }
  free (s->slots);
  *s = g;
  return 0;
}

int overlap_add (struct overlap *s, uint64_t cluster, enum meta_kind kind)
{
  size_t i;
  int r;

  assert (kind != META_DATA && kind < META_KINDS);
  /* At most half full, so probe runs stay short. */
  if ((s->nused + 1) * 2 > s->nslots && (r = grow (s)) < 0)
    return r;
  i = find (s, cluster + 1);
  if (!s->slots[i])
    s->nused++;
  s->slots[i] = (cluster + 1) << KIND_BITS | kind;
  return 0;
}

void overlap_del (struct overlap *s, uint64_t cluster)
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

enum meta_kind overlap_kind (const struct overlap *s, uint64_t cluster)
{
  if (!s->nslots)
    return META_DATA;
  return (enum meta_kind) (s->slots[find (s, cluster + 1)] & KIND_MASK);
}

void overlap_free (struct overlap *s)
{
  free (s->slots);
  s->slots = NULL;
  s->nslots = s->nused = 0;
}
