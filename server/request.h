/* SPDX-License-Identifier: BSD-3-Clause */
/* What every guest request does first: check its range against the disk,
 * take its guest clusters in the range lock, and say host I/O errors in
 * one sentence naming both offsets.
 */
#ifndef Q2_REQUEST_H
#define Q2_REQUEST_H

#include <stdbool.h>
#include <stdint.h>

#include "rangelock.h"

struct q2_image;

/* EINVAL, with a message, for a range past the virtual size. */
int request_check (struct q2_image *img, uint64_t count, uint64_t offset);
void request_lock (struct q2_image *img, struct rangelock_held *h, uint64_t count,
                   uint64_t offset, bool exclusive);
void request_unlock (struct q2_image *img, struct rangelock_held *h);
/* Logs "cannot WHAT host offset H (guest offset G): error" and returns r. */
int request_io_error (struct q2_image *img, const char *what, uint64_t host,
                      uint64_t guest, int r);

#endif
