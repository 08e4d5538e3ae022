/* SPDX-License-Identifier: BSD-3-Clause */
/* The guest-to-host map for `qcow2reclaim map`, in qemu-img map's terms:
 * which layer of the chain provides each range, and where its data is.
 */
#ifndef Q2_MAP_H
#define Q2_MAP_H

#include <stdint.h>

#include "qcow2reclaim.h"

struct q2_image;

/* One run at offset, depth layers below the top, looking through the
 * backing chain where it is unallocated.
 */
int map_status (struct q2_image *img, uint64_t offset, uint64_t len, int depth,
                struct q2_map_entry *e);
/* The whole disk, runs that continue each other merged. */
int map_walk (struct q2_image *img, q2_map_fn fn, void *opaque);

#endif
