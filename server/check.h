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
/* Mends what a check finds wrong in the counts and COPIED flags, as mode
 * allows, or refuses (-EINVAL, said, nothing changed) damage that counts
 * cannot mend.  Written back and synced; the caller checks again.
 */
int check_repair (struct q2_image *img, enum q2_repair_mode mode, uint64_t *leaks_fixed,
                  uint64_t *corruptions_fixed, q2_progress_fn progress, void *opaque);

#endif
