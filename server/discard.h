/* SPDX-License-Identifier: BSD-3-Clause */
/* Discard (NBD TRIM) and write-zeroes: the reclaim rules of DESIGN.md,
 * "Semantics".  *kept says an internal snapshot still holds some of the
 * range, so its space could not go back to the host.
 */
#ifndef Q2_DISCARD_H
#define Q2_DISCARD_H

#include <stdbool.h>
#include <stdint.h>

struct q2_image;

int discard_range (struct q2_image *img, uint64_t count, uint64_t offset, bool *kept);
/* flags: Q2_MAY_TRIM, Q2_FAST_ZERO (Q2_FUA is the caller's).  *apply_frees
 * as cow_write says it, for zeroes that had to be written.
 */
int discard_zero (struct q2_image *img, uint64_t count, uint64_t offset, unsigned flags,
                  bool *kept, bool *apply_frees);
/* The worker's look at a cluster after a deferred punch (punch.c): frees
 * it when it still maps guest to host, is ours alone, and is all hole.
 */
int discard_if_hole (struct q2_image *img, uint64_t guest, uint64_t host);

#endif
