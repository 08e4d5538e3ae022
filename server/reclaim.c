/* Write-zeroes and discard. */
#include <config.h>

#include <errno.h>
#include <stdlib.h>

#include "image.h"
#include "log.h"

#define ZERO_CHUNK (1u << 20)

int q2_zero (struct q2_image *img, uint64_t count, uint64_t offset, unsigned flags)
{
  char *zeros;
  int r = 0;

  if (flags & Q2_FAST_ZERO)
    return -ENOTSUP;
  zeros = calloc (1, ZERO_CHUNK);
  if (!zeros)
    return -ENOMEM;
  while (count > 0 && r == 0) {
    uint64_t n = count < ZERO_CHUNK ? count : ZERO_CHUNK;
    r = q2_write (img, zeros, n, offset, flags & Q2_FUA);
    offset += n;
    count -= n;
  }
  free (zeros);
  return r;
}

int q2_discard (struct q2_image *img, uint64_t count, uint64_t offset, unsigned flags)
{
  (void) img; (void) count; (void) offset; (void) flags;
  return -ENOTSUP;
}
