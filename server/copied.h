/* COPIED flags of active data clusters whose other references went away
 * (DESIGN.md: the COPIED bit always equals "refcount is 1").  Callers hold
 * meta_lock.
 */
#ifndef Q2_COPIED_H
#define Q2_COPIED_H

#include <stdbool.h>
#include <stdint.h>

struct q2_image;

/* A data cluster's count fell to 1: its last reference may be an active
 * entry that needs the flag.  Remembered until copied_restore.
 */
int copied_note_single (struct q2_image *img, uint64_t cluster);

/* Sets COPIED on the active entries that are now the only reference to
 * their cluster.  Call only with the decrements on disk and no L2 table
 * dirty (the end of a flush); *changed says the tables need writing.
 */
int copied_restore (struct q2_image *img, bool *changed);

void copied_free (struct q2_image *img);

#endif
