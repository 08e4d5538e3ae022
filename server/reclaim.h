/* Reclaim: discard and write-zeroes, host hole punching, freeing emptied
 * L2 tables and refcount blocks, and truncating the free end of the file.
 */
#ifndef Q2_RECLAIM_H
#define Q2_RECLAIM_H

#include <stdint.h>

struct q2_image;

/* Punches a host range; says once if the filesystem cannot. */
void reclaim_punch (struct q2_image *img, uint64_t offset, uint64_t len);
/* After deferred frees reached disk: drop refcount blocks that count
 * nothing and truncate free clusters at the end.  Caller holds meta_lock.
 */
int reclaim_shrink (struct q2_image *img);

#endif
