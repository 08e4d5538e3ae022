/* SPDX-License-Identifier: BSD-3-Clause */
/* The growable array: appends keep order and contents across every
 * growth, remove_front keeps the rest in order, reset frees, and a
 * request for impossibly many elements fails instead of wrapping.
 */
#include <config.h>

#include <errno.h>
#include <signal.h>

#include "unit.h"
#include "vector.h"

struct pair { uint32_t a; uint64_t b; };
DEFINE_VECTOR_TYPE (pair_vector, struct pair);

static void remove_too_many (void *opaque)
{
  struct u64_vector *v = opaque;

  u64_vector_remove_front (v, v->len + 1);
}

int main (void)
{
  struct u64_vector v = { 0 };
  struct pair_vector p = { 0 };
  size_t i, caps = 0, last_cap = 0;

  for (i = 0; i < 100000; i++) {
    CHECK (u64_vector_append (&v, i * 3) == 0);
    if (v.cap != last_cap) {
      caps++;
      last_cap = v.cap;
    }
  }
  CHECK (v.len == 100000);
  /* Doubling: about log2 (100000 / 16) growths, not one per append. */
  CHECK (caps <= 14);
  for (i = 0; i < v.len; i++)
    CHECK (v.ptr[i] == i * 3);

  u64_vector_remove_front (&v, 99990);
  CHECK (v.len == 10);
  for (i = 0; i < v.len; i++)
    CHECK (v.ptr[i] == (99990 + i) * 3);
  u64_vector_remove_front (&v, 0);
  CHECK (v.len == 10 && v.ptr[0] == 99990 * 3);
  u64_vector_remove_front (&v, 10);
  CHECK (v.len == 0);
  CHECK (unit_aborts (remove_too_many, &v));

  /* Reserve makes room without changing the length. */
  CHECK (u64_vector_reserve (&v, 1000) == 0);
  CHECK (v.len == 0 && v.cap >= 1000);
  CHECK (u64_vector_reserve (&v, SIZE_MAX / 4) == -ENOMEM);
  CHECK (u64_vector_reserve (&v, SIZE_MAX) == -ENOMEM);
  CHECK (v.cap >= 1000);

  u64_vector_reset (&v);
  CHECK (v.ptr == NULL && v.len == 0 && v.cap == 0);
  CHECK (u64_vector_append (&v, 7) == 0 && v.ptr[0] == 7);
  u64_vector_reset (&v);

  for (i = 0; i < 1000; i++)
    CHECK (pair_vector_append (&p, (struct pair) { (uint32_t) i, ~(uint64_t) i }) == 0);
  for (i = 0; i < 1000; i++)
    CHECK (p.ptr[i].a == i && p.ptr[i].b == ~(uint64_t) i);
  pair_vector_reset (&p);
  printf ("test-vector: ok\n");
  return 0;
}
