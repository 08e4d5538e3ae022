/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>

#include "corrupt.h"
#include "log.h"

/* Per thread: one request's look-ahead must not silence another's report. */
static __thread bool quiet;

bool corrupt_quiet (bool q)
{
  bool old = quiet;

  quiet = q;
  return old;
}

int corrupt_error (const struct layout *lay, const char *fmt, ...)
{
  char msg[768];
  va_list ap;

  if (quiet)
    return -EIO;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  log_error ("%s: corrupt image: %s", lay->name, msg);
  return -EIO;
}

static bool overlaps (uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
  return blen && a < b + blen && b < a + alen;
}

int corrupt_check_range (const struct layout *lay, uint64_t offset, uint64_t len,
                         enum meta_kind self, const char *what, uint64_t guest)
{
  static const char *const held[META_KINDS] = {
    [META_L2] = "which holds an L2 table", [META_REFBLOCK] = "which holds a refcount block",
    [META_BITMAP] = "which holds a persistent bitmap",
  };
  uint64_t cs = lay->cluster_size, c;
  const char *why = NULL;
  enum meta_kind k;
  char gbuf[48] = "";

  /* The last cluster may end past the end of the file: partial writes
   * into fresh clusters leave the rest as a hole, which reads as zeros.
   */
  if (offset >= lay->file_end)
    why = "past the end of the file";
  else if (offset < cs)
    why = "inside the image header";
  else if (overlaps (offset, len, lay->l1_offset, (lay->l1_entries * 8 + cs - 1) & ~(cs - 1)))
    why = "inside the L1 table";
  else if (overlaps (offset, len, lay->reftable_offset, lay->reftable_clusters * cs))
    why = "inside the refcount table";
  else if (overlaps (offset, len, lay->crypto_offset, lay->crypto_length))
    why = "inside the encryption header";
  for (c = offset >> lay->cluster_bits; !why && c <= (offset + len - 1) >> lay->cluster_bits; c++)
    if ((k = overlap_kind (&lay->meta, c)) != META_DATA && k != self)
      why = held[k];
  if (!why)
    return 0;
  if (guest != UINT64_MAX)
    snprintf (gbuf, sizeof gbuf, " for guest offset 0x%" PRIx64, guest);
  return corrupt_error (lay, "%s%s points to host offset 0x%" PRIx64 ", %s",
                        what, gbuf, offset, why);
}
