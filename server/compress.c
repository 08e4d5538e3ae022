/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "qcow2-format.h"
#include "cleanup.h"
#include "compress.h"
#include "corrupt.h"
#include "host.h"
#include "log.h"

/* qcow2 stores raw deflate streams (no zlib header) with a 4 KiB window. */
static int inflate_raw (const void *in, size_t inlen, void *out, size_t outlen)
{
  z_stream s;
  int r;

  memset (&s, 0, sizeof s);
  if (inflateInit2 (&s, -12) != Z_OK)
    return -ENOMEM;
  s.next_in = (Bytef *) in;
  s.avail_in = inlen;
  s.next_out = out;
  s.avail_out = outlen;
  r = inflate (&s, Z_FINISH);
  inflateEnd (&s);
  /* The stored length is rounded up to sectors: trailing bytes are padding. */
  if ((r == Z_STREAM_END || r == Z_BUF_ERROR) && s.avail_out == 0)
    return 0;
  return -EIO;
}

static int unzstd (const void *in, size_t inlen, void *out, size_t outlen)
{
  ZSTD_DCtx *d = ZSTD_createDCtx ();
  ZSTD_inBuffer ib = { in, inlen, 0 };
  ZSTD_outBuffer ob = { out, outlen, 0 };
  int r = 0;

  if (!d)
    return -ENOMEM;
  while (ob.pos < ob.size) {
    size_t z = ZSTD_decompressStream (d, &ob, &ib);
    if (ZSTD_isError (z)) {
      r = -EIO;
      break;
    }
    if (z == 0 || (ib.pos == ib.size && ob.pos < ob.size)) {
      r = ob.pos == ob.size ? 0 : -EIO;
      break;
    }
  }
  ZSTD_freeDCtx (d);
  return r;
}

int compress_read (struct hostfile *hf, const struct layout *lay, uint64_t entry,
                   uint64_t guest, void *out)
{
  uint64_t coff, clen;
  int r;

  layout_compressed_extent (lay, entry, &coff, &clen);
  CLEANUP_FREE void *in = malloc (clen);
  if (!in)
    return -ENOMEM;
  r = host_pread (hf, in, clen, coff);
  if (r < 0) {
    log_error ("%s: cannot read the compressed cluster for guest offset 0x%" PRIx64
               " at host offset 0x%" PRIx64 ": %s", lay->name, guest, coff, strerror (-r));
    return r;
  }
  if (lay->compression_type == COMPRESSION_ZSTD)
    r = unzstd (in, clen, out, lay->cluster_size);
  else
    r = inflate_raw (in, clen, out, lay->cluster_size);
  if (r == -EIO)
    corrupt_error (lay, "the compressed cluster for guest offset 0x%" PRIx64
                   " at host offset 0x%" PRIx64 " (%" PRIu64 " bytes) cannot be "
                   "decompressed", guest, coff, clen);
  return r;
}
