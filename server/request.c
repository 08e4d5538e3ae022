/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "engine.h"
#include "log.h"
#include "request.h"

int request_check (struct q2_image *img, uint64_t count, uint64_t offset)
{
  const struct layout *lay = &img->m.lay;

  if (offset > lay->virtual_size || count > lay->virtual_size - offset) {
    log_error ("%s: request at 0x%" PRIx64 " for %" PRIu64 " bytes is beyond the "
               "virtual size %" PRIu64, lay->name, offset, count, lay->virtual_size);
    return -EINVAL;
  }
  return 0;
}

void request_lock (struct q2_image *img, struct rangelock_held *h, uint64_t count,
                   uint64_t offset, bool exclusive)
{
  uint64_t last = count ? offset + count - 1 : offset;

  rangelock_lock (&img->guest_lock, h, offset >> img->m.lay.cluster_bits,
                  last >> img->m.lay.cluster_bits, exclusive);
}

void request_unlock (struct q2_image *img, struct rangelock_held *h)
{
  rangelock_unlock (&img->guest_lock, h);
}

int request_io_error (struct q2_image *img, const char *what, uint64_t host,
                      uint64_t guest, int r)
{
  log_error ("%s: cannot %s host offset 0x%" PRIx64 " (guest offset 0x%" PRIx64 "): %s",
             img->m.lay.name, what, host, guest, strerror (-r));
  return r;
}
