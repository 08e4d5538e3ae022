/* SPDX-License-Identifier: BSD-3-Clause */
/* Block status as qemu-nbd reports it, so that nbdcopy and qemu-img
 * convert copy sparsely.
 */
#ifndef Q2_EXTENTS_H
#define Q2_EXTENTS_H

#include <stdbool.h>
#include <stdint.h>

#include "qcow2reclaim.h"

struct q2_image;

/* The status (Q2_EXTENT_* bits) of one run starting at offset, at most
 * len bytes long.
 */
int extents_status (struct q2_image *img, uint64_t offset, uint64_t len,
                    uint32_t *type, uint64_t *run);
/* Calls fn for consecutive extents covering at least [offset, offset + count). */
int extents_walk (struct q2_image *img, uint64_t count, uint64_t offset, bool req_one,
                  q2_extent_fn fn, void *opaque);

#endif
