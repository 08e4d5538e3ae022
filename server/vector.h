/* SPDX-License-Identifier: BSD-3-Clause */
/* Growable arrays, one type per element type:
 *
 *   DEFINE_VECTOR_TYPE (u64_vector, uint64_t);
 *   struct u64_vector v = { 0 };
 *   if (u64_vector_append (&v, x) < 0) ...    -- -ENOMEM
 *   ... v.ptr[i] for i < v.len ...
 *   u64_vector_reset (&v);
 *
 * The functions a definition makes carry the type's name as their prefix.
 */
#ifndef Q2_VECTOR_H
#define Q2_VECTOR_H

#include <assert.h>
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DEFINE_VECTOR_TYPE(name, type)                                  \
  struct name {                                                         \
    type *ptr;                                                          \
    size_t len, cap;                                                    \
  };                                                                    \
                                                                        \
  /* Room for n more elements; doubles, so appends are amortised O(1). */ \
  static inline int __attribute__ ((unused))                            \
  name##_reserve (struct name *v, size_t n)                             \
  {                                                                     \
    size_t cap;                                                         \
    type *p;                                                            \
                                                                        \
    if (v->cap - v->len >= n)                                           \
      return 0;                                                         \
    if (n > SIZE_MAX / sizeof (type) - v->len)                          \
      return -ENOMEM;                                                   \
    cap = v->cap ? v->cap : 16;                                         \
    while (cap - v->len < n)                                            \
      cap = cap > SIZE_MAX / sizeof (type) / 2 ? v->len + n : cap * 2;  \
    p = realloc (v->ptr, cap * sizeof (type));                          \
    if (!p)                                                             \
      return -ENOMEM;                                                   \
    v->ptr = p;                                                         \
    v->cap = cap;                                                       \
    return 0;                                                           \
  }                                                                     \
                                                                        \
  static inline int __attribute__ ((unused))                            \
  name##_append (struct name *v, type x)                                \
  {                                                                     \
    int r = name##_reserve (v, 1);                                      \
    if (r < 0)                                                          \
      return r;                                                         \
    v->ptr[v->len++] = x;                                               \
    return 0;                                                           \
  }                                                                     \
                                                                        \
  /* Drops the first n elements, keeping the order of the rest. */      \
  static inline void __attribute__ ((unused))                           \
  name##_remove_front (struct name *v, size_t n)                        \
  {                                                                     \
    assert (n <= v->len);                                               \
    if (n && n < v->len)                                                \
      memmove (v->ptr, v->ptr + n, (v->len - n) * sizeof (type));       \
    v->len -= n;                                                        \
  }                                                                     \
                                                                        \
  /* Frees the storage; the vector is empty and usable again. */        \
  static inline void __attribute__ ((unused))                           \
  name##_reset (struct name *v)                                         \
  {                                                                     \
    free (v->ptr);                                                      \
    v->ptr = NULL;                                                      \
    v->len = v->cap = 0;                                                \
  }

DEFINE_VECTOR_TYPE (u64_vector, uint64_t);

#endif
