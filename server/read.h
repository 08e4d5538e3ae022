/* SPDX-License-Identifier: BSD-3-Clause */
/* Guest reads: host data, the backing file, zeros or inflated clusters,
 * run by run.  Reads share their range lock, so they run side by side.
 */
#ifndef Q2_READ_H
#define Q2_READ_H

#include <stdint.h>

struct q2_image;

int read_range (struct q2_image *img, void *buf, uint64_t count, uint64_t offset);

#endif
