/* SPDX-License-Identifier: BSD-3-Clause */
/* What a host cluster holds, for every layer that must tell them apart:
 * the overlap set, the metadata cache, the write-back, and the reference
 * that frees a cluster (a reference of one kind never frees another's).
 */
#ifndef Q2_METAKIND_H
#define Q2_METAKIND_H

enum meta_kind {
  META_DATA = 0,              /* guest data, or nothing known */
  META_L2,
  META_REFBLOCK,
  META_BITMAP,                /* a persistent bitmap's directory, table or data */
  META_KINDS
};

/* "an L2 table", for sentences. */
static inline const char *metakind_name (enum meta_kind k)
{
  static const char *const names[META_KINDS] = {
    [META_DATA] = "data", [META_L2] = "an L2 table", [META_REFBLOCK] = "a refcount block",
    [META_BITMAP] = "a persistent bitmap",
  };
  return k < META_KINDS ? names[k] : "something unknown";
}

#endif
