/* Pieces of the read/write path that write-zeroes and discard share. */
#ifndef Q2_RW_H
#define Q2_RW_H

#include <stdbool.h>
#include <stdint.h>

#include "cluster.h"
#include "lock.h"

struct q2_image;

int check_request (struct q2_image *img, uint64_t count, uint64_t offset);
void lock_guest (struct q2_image *img, struct range_held *h, uint64_t count,
                 uint64_t offset, bool exclusive);
/* A guest write with the range lock already held. */
int write_locked (struct q2_image *img, const void *buf, uint64_t count, uint64_t offset);
/* Drops the reference an L2 entry held, once the new entry is on disk.
 * Caller holds meta_lock.
 */
int free_old_entry (struct q2_image *img, uint64_t entry, bool punched);

#endif
