/* SPDX-License-Identifier: BSD-3-Clause */
/* Drives the engine directly (built with ASan and UBSan): seeded random
 * writes, zeroes, discards, reads and flushes mirrored into memory, then a full
 * comparison, close, reopen and compare again.
 *
 *   engine-ops-asan IMAGE SEED OPS
 */
#include <config.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2reclaim.h"

static uint64_t rng;

static uint64_t next (void)
{
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

static uint64_t pick_len (uint64_t max, uint32_t cs)
{
  switch (next () % 4) {
  case 0: return 1 + next () % 4096;
  case 1: return cs * (1 + next () % 4);
  default: return 1 + next () % (max < (1u << 20) ? max : (1u << 20));
  }
}

static int compare (struct q2_image *img, const unsigned char *ref, uint64_t size)
{
  unsigned char *buf = malloc (1 << 20);
  uint64_t off;

  for (off = 0; off < size; off += 1 << 20) {
    uint64_t n = size - off < (1 << 20) ? size - off : (1 << 20);
    if (q2_read (img, buf, n, off) < 0 || memcmp (buf, ref + off, n) != 0) {
      fprintf (stderr, "engine-ops: mismatch in the MiB at 0x%" PRIx64 "\n", off);
      free (buf);
      return -1;
    }
  }
  free (buf);
  return 0;
}

/* Discarded bytes may read as before or as zeros, nothing else. */
static int discard (struct q2_image *img, unsigned char *ref, unsigned char *buf,
                    uint64_t len, uint64_t off)
{
  uint64_t i;
  int r = q2_discard (img, len, off, 0);

  if (r == 0)
    r = q2_read (img, buf, len, off);
  for (i = 0; r == 0 && i < len; i++) {
    if (buf[i] && buf[i] != ref[off + i]) {
      fprintf (stderr, "engine-ops: discard at 0x%" PRIx64 " left byte 0x%" PRIx64
               " neither old nor zero\n", off, off + i);
      return -1;
    }
    ref[off + i] = buf[i];
  }
  return r < 0 ? r : 0;
}

static int run (struct q2_image *img, unsigned char *ref, uint64_t size, long ops)
{
  uint32_t cs = q2_cluster_size (img);
  unsigned char *buf = malloc (4 * (size_t) cs + (1 << 20));
  long i;
  int r = 0;

  for (i = 0; i < ops && r == 0; i++) {
    uint64_t len = pick_len (size, cs);
    uint64_t off = next () % size;
    if (next () % 2)
      off -= off % cs;
    if (len > size - off)
      len = size - off;
    switch (next () % 8) {
    case 0: case 1: case 2:
      memset (buf, (int) (i & 0xff) | 1, len);
      r = q2_write (img, buf, len, off, next () % 16 == 0 ? Q2_FUA : 0);
      if (r == 0)
        memcpy (ref + off, buf, len);
      break;
    case 3:
      r = q2_zero (img, len, off, next () % 2 ? Q2_MAY_TRIM : 0);
      if (r == 0)
        memset (ref + off, 0, len);
      break;
    case 7:
      r = discard (img, ref, buf, len, off);
      break;
    case 4:
      r = q2_flush (img);
      break;
    default:
      r = q2_read (img, buf, len, off);
      if (r == 0 && memcmp (buf, ref + off, len) != 0) {
        fprintf (stderr, "engine-ops: op %ld: read at 0x%" PRIx64 "+%" PRIu64
                 " differs\n", i, off, len);
        r = -1;
      }
    }
    if (r < 0)
      fprintf (stderr, "engine-ops: op %ld at 0x%" PRIx64 " failed: %d\n", i, off, r);
  }
  free (buf);
  return r;
}

int main (int argc, char **argv)
{
  struct q2_options o = { 0 };
  struct q2_image *img;
  unsigned char *ref;
  uint64_t size;
  int r;

  if (argc != 4) {
    fprintf (stderr, "usage: engine-ops-asan IMAGE SEED OPS\n");
    return 2;
  }
  o.file = argv[1];
  o.cache_size = 256 << 10;  /* small, so eviction write-back is exercised */
  rng = strtoull (argv[2], NULL, 0) | 1;
  if (q2_open (&o, &img) < 0)
    return 1;
  size = q2_virtual_size (img);
  ref = malloc (size);
  if (!ref || q2_read (img, ref, size, 0) < 0)
    return 1;
  r = run (img, ref, size, strtol (argv[3], NULL, 0));
  if (r == 0)
    r = compare (img, ref, size);
  if (q2_close (img) < 0)
    r = -1;
  if (r == 0 && (r = q2_open (&o, &img)) == 0) {
    r = compare (img, ref, size);
    if (q2_close (img) < 0)
      r = -1;
  }
  free (ref);
  printf ("engine-ops: %s\n", r == 0 ? "ok" : "FAILED");
  return r == 0 ? 0 : 1;
}
