/* SPDX-License-Identifier: BSD-3-Clause */
/* Compressed clusters: reading and inflating (deflate or zstd, as the
 * header says).  Needs no lock: a request reads what its own mapping
 * resolved, under its range lock.
 */
#ifndef Q2_COMPRESS_H
#define Q2_COMPRESS_H

#include <stdint.h>

struct hostfile;
struct layout;

/* Fills out (one cluster) with the contents of the compressed cluster whose
 * L2 entry is entry, at guest offset guest (for messages).
 */
int compress_read (struct hostfile *hf, const struct layout *lay, uint64_t entry,
                   uint64_t guest, void *out);

#endif
