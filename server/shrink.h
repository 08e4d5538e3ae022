/* SPDX-License-Identifier: BSD-3-Clause */
/* The end of the file: free clusters at the end are cut off, so the file's
 * length follows what is in use.  A step of the commit sequence.
 */
#ifndef Q2_SHRINK_H
#define Q2_SHRINK_H

#include <stdint.h>

struct q2_image;

/* The end of the last cluster with a non-zero count (qemu-img check's
 * "image end offset").  The caller holds img->m.lock.
 */
int shrink_used_end (struct q2_image *img, uint64_t *end);

/* Truncates the file after its last cluster with a non-zero count.  The
 * caller holds img->m.lock and has the decrements on disk.
 */
int shrink_truncate (struct q2_image *img);

#endif
