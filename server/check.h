/* SPDX-License-Identifier: BSD-3-Clause */
/* Consistency check: every reference in the image is counted and compared
 * with the stored refcounts, as `qemu-img check` does.
 */
#ifndef Q2_CHECK_H
#define Q2_CHECK_H

#include "qcow2reclaim.h"

struct q2_image;

int check_image (struct q2_image *img, struct q2_check *res, q2_progress_fn progress,
                 void *opaque);
/* What check_image allocated in res. */
void check_free (struct q2_check *res);

#endif
