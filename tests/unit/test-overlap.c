/* SPDX-License-Identifier: BSD-3-Clause */
/* The overlap set against a plain array: random adds, kind changes and
 * deletions over a small key range (so probe runs collide and deletion's
 * re-insertion is exercised) and then over a large one (growth).
 */
#include <config.h>

#include <string.h>

#include "overlap.h"
#include "unit.h"

static void run (uint64_t range, unsigned ops)
{
  struct overlap s = { 0 };
  uint8_t *ref = calloc (range, 1);
  uint64_t c;
  unsigned i;

  CHECK (ref);
  CHECK (overlap_kind (&s, 12345) == META_DATA);      /* empty set */
  overlap_del (&s, 12345);
  for (i = 0; i < ops; i++) {
    c = unit_random () % range;
    switch (unit_random () % 3) {
    case 0: case 1: {
      enum meta_kind k = unit_random () % 2 ? META_L2 : META_REFBLOCK;
      CHECK (overlap_add (&s, c, k) == 0);
      ref[c] = k;
      break;
    }
    default:
      overlap_del (&s, c);
      ref[c] = META_DATA;
    }
    if (i % 97 == 0)
      for (c = 0; c < range && range <= 4096; c++)
        CHECK (overlap_kind (&s, c) == ref[c]);
  }
  size_t used = 0;
  for (c = 0; c < range; c++) {
    CHECK (overlap_kind (&s, c) == ref[c]);
    used += ref[c] != META_DATA;
  }
  CHECK (s.nused == used);
  CHECK (s.nslots >= 2 * s.nused);      /* never more than half full */
  /* Cluster 0 (the header) and clusters far out are keys like any other. */
  CHECK (overlap_add (&s, 0, META_REFBLOCK) == 0 && overlap_kind (&s, 0) == META_REFBLOCK);
  CHECK (overlap_add (&s, 1ull << 40, META_L2) == 0 && overlap_kind (&s, 1ull << 40) == META_L2);
  overlap_del (&s, 1ull << 40);
  CHECK (overlap_kind (&s, 1ull << 40) == META_DATA);
  overlap_free (&s);
  CHECK (s.slots == NULL && overlap_kind (&s, 0) == META_DATA);
  free (ref);
}

int main (void)
{
  run (700, 200000);          /* dense: long probe runs, many deletions */
  run (1u << 22, 300000);     /* sparse: the table grows several times */
  printf ("test-overlap: ok\n");
  return 0;
}
