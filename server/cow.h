/* SPDX-License-Identifier: BSD-3-Clause */
/* Guest writes: in place into clusters this image alone references
 * (COPIED), copy-on-write into new clusters everywhere else, the part a
 * write does not cover filled from the old contents.  Shared by writes and
 * by write-zeroes over clusters that cannot simply be dropped.
 */
#ifndef Q2_COW_H
#define Q2_COW_H

#include <stdbool.h>
#include <stdint.h>

struct q2_image;

/* A guest write; the caller holds the range exclusively.  *apply_frees
 * (may be NULL) asks the caller to apply the deferred frees: so many are
 * pending that a long run of copy-on-write without a flush would grow the
 * file instead of reusing what it freed.
 */
int cow_write (struct q2_image *img, const void *buf, uint64_t count, uint64_t offset,
               bool *apply_frees);

#endif
