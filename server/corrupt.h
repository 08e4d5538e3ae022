/* SPDX-License-Identifier: BSD-3-Clause */
/* Validation: every offset read from the image is checked against its
 * layout before anything is read or written there, and what is wrong is
 * reported as corruption (EIO) in one sentence naming the image.
 */
#ifndef Q2_CORRUPT_H
#define Q2_CORRUPT_H

#include <stdbool.h>
#include <stdint.h>

#include "layout.h"

/* Logs "IMAGE: corrupt image: ..." and returns -EIO. */
int corrupt_error (const struct layout *lay, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

/* While the calling thread looks ahead (a run of entries, a scan), what it
 * finds is not reported; the request that reaches it reports it.  Returns
 * the previous setting, to be restored.
 */
bool corrupt_quiet (bool quiet);

/* Is [offset, offset + len) a valid place for self (META_DATA: guest data,
 * else that kind of metadata, which the layout must then know it holds)?
 * what and guest (UINT64_MAX: none) name the entry for the message.
 */
int corrupt_check_range (const struct layout *lay, uint64_t offset, uint64_t len,
                         enum meta_kind self, const char *what, uint64_t guest);

#endif
