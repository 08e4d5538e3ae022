/* SPDX-License-Identifier: BSD-3-Clause */
/* Which host clusters hold L2 tables or refcount blocks, so that an entry
 * pointing data at metadata (or metadata at the wrong metadata) is caught
 * before anything is read or written there.  The owner of the set guards
 * it (the image's metadata lock).
 */
#ifndef Q2_OVERLAP_H
#define Q2_OVERLAP_H

#include <stddef.h>
#include <stdint.h>

#include "metakind.h"

struct overlap {
  uint64_t *slots;            /* cluster index + 1 in the high bits, kind low */
  size_t nslots, nused;
};

int overlap_add (struct overlap *s, uint64_t cluster, enum meta_kind kind);
void overlap_del (struct overlap *s, uint64_t cluster);
/* META_DATA for a cluster the set does not hold. */
enum meta_kind overlap_kind (const struct overlap *s, uint64_t cluster);
void overlap_free (struct overlap *s);

#endif
