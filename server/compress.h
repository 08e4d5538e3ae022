/* Compressed clusters: reading and inflating (deflate or zstd). */
#ifndef Q2_COMPRESS_H
#define Q2_COMPRESS_H

#include <stdint.h>

struct q2_image;

/* Fills out (one cluster) with the contents of the compressed cluster whose
 * L2 entry is entry, at guest offset guest (for messages).
 */
int compressed_read_cluster (struct q2_image *img, uint64_t entry, uint64_t guest,
                             void *out);

#endif
