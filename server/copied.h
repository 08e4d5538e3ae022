/* SPDX-License-Identifier: BSD-3-Clause */
/* COPIED flags of active data clusters whose other references went away
 * (DESIGN.md, "Semantics": the COPIED bit always equals "refcount is 1").
 * Callers hold img->m.lock.
 */
#ifndef Q2_COPIED_H
#define Q2_COPIED_H

#include <stdbool.h>

struct copied;
struct q2_image;

int copied_new (struct copied **cpp);
void copied_free (struct copied *cp);

/* Sets COPIED on the active entries that are now the only reference to
 * their cluster (the clusters allocation saw fall to a count of 1).  Call
 * only with those decrements on disk and no L2 table dirty (in the commit
 * sequence); *changed says the tables need writing.
 */
int copied_restore (struct q2_image *img, bool *changed);

#endif
