/* A growable list of 64-bit values (host offsets waiting for something). */
#ifndef Q2_U64LIST_H
#define Q2_U64LIST_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

struct u64_list {
  uint64_t *v;
  size_t n, cap;
};

static inline int u64_list_push (struct u64_list *l, uint64_t x)
{
  if (l->n == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 64;
    uint64_t *p = realloc (l->v, cap * sizeof *p);
    if (!p)
      return -ENOMEM;
    l->v = p;
    l->cap = cap;
  }
  l->v[l->n++] = x;
  return 0;
}

static inline void u64_list_free (struct u64_list *l)
{
  free (l->v);
  l->v = NULL;
  l->n = l->cap = 0;
}

#endif
