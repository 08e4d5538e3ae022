/* Which host clusters hold L2 tables or refcount blocks, so that an entry
 * pointing data at metadata (or metadata at the wrong metadata) is caught
 * before anything is read or written there.  Callers hold meta_lock.
 */
#ifndef Q2_OVERLAP_H
#define Q2_OVERLAP_H

#include <stddef.h>
#include <stdint.h>

enum meta_kind { META_NONE = 0, META_L2 = 1, META_REFBLOCK = 2 };

struct meta_set {
  uint64_t *slots;            /* cluster index + 1 in the high bits, kind low */
  size_t nslots, nused;
};

struct q2_image;

int overlap_build (struct q2_image *img);
void overlap_free (struct meta_set *s);
int overlap_add (struct meta_set *s, uint64_t cluster, enum meta_kind kind);
void overlap_del (struct meta_set *s, uint64_t cluster);
enum meta_kind overlap_kind (const struct meta_set *s, uint64_t cluster);

#endif
