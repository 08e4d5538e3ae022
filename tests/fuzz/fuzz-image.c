/* SPDX-License-Identifier: BSD-3-Clause */
/* libFuzzer target: an untrusted qcow2 image opened for writing by the
 * engine, then a short, input-driven sequence of requests.
 *
 * The whole input is the image file.  Its last bytes (up to 8 per request,
 * at most 16 requests) also choose the requests: a file's tail is usually
 * padding, so the mutator can steer requests without breaking the header.
 * Those bytes are XORed with a fixed key, so that the all-zero tail of a
 * qemu-img made seed already yields a mix of writes, reads, zeroes,
 * discards and flushes rather than sixteen identical reads.  A quarter of
 * the flushes are compactions instead (q2_compact, some of them dry runs):
 * synchronous, so an input replays the same; the background worker is
 * off, as its timing would not.
 *
 * A quarter of the inputs are repaired instead, as qcow2reclaim check -r
 * does (the configuration byte says which, and whether -r all or leaks).
 *
 * Oracle beyond "no crash": when the engine's own check finds the image
 * consistent before the requests, it must still find no corruption after
 * them (leaks are allowed, DESIGN.md "Invariants"); a repair with -r all
 * that did not refuse must leave no corruption at all.  FUZZ_ORACLE=0 turns
 * this off; FUZZ_VERBOSE=1 shows the engine's log.  To study a finding,
 * FUZZ_OPS=N runs only its first N requests and FUZZ_KEEP=FILE keeps a copy
 * of the image as the requests left it.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qcow2reclaim.h"

#define MAX_OPS 16
#define OP_BYTES 8
#define MAX_TOTAL (1u << 20)        /* bytes moved by all requests together */

static char *image_path;
static unsigned char *buf;
static int verbose, oracle = 1;
static long max_ops = MAX_OPS;
static const char *keep_path;

static void quiet_logger (int level, const char *msg)
{
  if (verbose)
    fprintf (stderr, "fuzz-image: [%d] %s\n", level, msg);
}

static char *image_dir;

static void remove_image (void)
{
  unlink (image_path);
  rmdir (image_dir);
}

/* A private folder for the image: a backing file name in the input is
 * then resolved beside it, where nothing else lives, so relative names
 * find the image itself (a loop) or nothing.
 */
int LLVMFuzzerInitialize (int *argc, char ***argv)
{
  const char *base = getenv ("TMPDIR");
  const char *e;
  char tmpl[4096];

  (void) argc; (void) argv;
  if (!base || !*base)
    base = access ("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
  snprintf (tmpl, sizeof tmpl, "%s/fuzz-image.XXXXXX", base);
  if (!mkdtemp (tmpl)) {
    perror ("fuzz-image: mkdtemp");
    abort ();
  }
  if (!(image_dir = strdup (tmpl)) ||
      asprintf (&image_path, "%s/image.qcow2", tmpl) < 0)
    abort ();
  atexit (remove_image);
  if (!(buf = malloc (MAX_TOTAL)))
    abort ();
  verbose = (e = getenv ("FUZZ_VERBOSE")) && *e && *e != '0';
  oracle = !((e = getenv ("FUZZ_ORACLE")) && *e == '0');
  if ((e = getenv ("FUZZ_OPS")) && *e)
    max_ops = atol (e);
  keep_path = getenv ("FUZZ_KEEP");
  q2_set_logger (quiet_logger);
  return 0;
}

static int write_file (const char *path, const uint8_t *data, size_t size)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  size_t done = 0;

  if (fd == -1)
    return -1;
  while (done < size) {
    ssize_t n = write (fd, data + done, size - done);
    if (n <= 0) {
      close (fd);
      return -1;
    }
    done += n;
  }
  return close (fd);
}

static uint64_t min64 (uint64_t a, uint64_t b) { return a < b ? a : b; }

static uint64_t get_be (const uint8_t *data, size_t size, uint64_t off, int n)
{
  uint64_t v = 0;
  int i;

  for (i = 0; i < n; i++)
    v = v << 8 | (off + i < size ? data[off + i] : 0);
  return v;
}

/* 1 if the engine's check finds no corruption, 0 if it finds some, -1 if
 * the image cannot be opened or checked at all.
 */
static int consistent (void)
{
  struct q2_options o = { .file = image_path, .readonly = true,
                          .cache_size = 64 << 10 };
  struct q2_image *img;
  struct q2_check res;
  int r;

  if (q2_open (&o, &img) < 0)
    return -1;
  r = q2_check (img, &res, NULL, NULL);
  q2_close (img);
  if (r < 0)
    return -1;
  q2_check_free (&res);
  return res.corruptions == 0;
}

static int count_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t type)
{
  (void) offset; (void) length; (void) type;
  return ++*(int *) opaque > 1024;      /* enough to walk a few tables */
}

/* Per-byte key for the request bytes: a hash, since a linear key would give
 * every request's first byte the same value modulo 8, hence one kind.
 */
static uint8_t key (size_t i)
{
  uint32_t x = (uint32_t) i * 0x9E3779B1u + 0x7F4A7C15u;

  x ^= x >> 15;
  x *= 0x2c1b3c6du;
  x ^= x >> 12;
  return (uint8_t) (x >> 8);
}

static void run_requests (struct q2_image *img, const uint8_t *ops, size_t nops)
{
  static const char *const names[8] = {
    "read", "write", "write", "zero", "discard", "flush", "extents", "read",
  };
  uint64_t vsize = q2_virtual_size (img);
  uint64_t cs = q2_cluster_size (img);
  uint64_t budget = MAX_TOTAL;
  size_t i, k;

  for (i = 0; i < nops && (long) i < max_ops; i++) {
    uint8_t b[OP_BYTES];
    for (k = 0; k < OP_BYTES; k++)
      b[k] = ops[i * OP_BYTES + k] ^ key (i * OP_BYTES + k);
    uint8_t kind = b[0] % 8, flags = b[1];
    uint32_t off32 = (uint32_t) b[2] << 24 | b[3] << 16 | b[4] << 8 | b[5];
    uint16_t len16 = (uint16_t) (b[6] << 8 | b[7]);
    uint64_t off, len;
    unsigned f = 0;
    int extents = 0, r = 0;

    if (kind == 5 && (flags & 3) == 3) {
      struct q2_compact_result res;
      r = q2_compact (img, flags & 4, NULL, NULL, &res);
      if (verbose)
        fprintf (stderr, "fuzz-image: compact%s: %d (moved %" PRIu64 ")\n",
                 flags & 4 ? " --dry-run" : "", r, r == 0 ? res.bytes_moved : 0);
      continue;
    }
    if (kind == 5) {
      r = q2_flush (img);
      if (verbose)
        fprintf (stderr, "fuzz-image: flush: %d\n", r);
      continue;
    }
    if (vsize == 0 || budget == 0)
      continue;
    /* Cluster-aligned offsets reach far L2 tables; byte offsets reach the
     * partial-cluster paths near the start.
     */
    off = flags & 1 ? ((uint64_t) off32 * cs) % vsize : off32 % vsize;
    switch ((flags >> 1) & 3) {
    case 0: len = (uint64_t) len16 + 1; break;
    case 1: len = (len16 % 8 + 1) * cs; break;
    case 2: len = ((uint64_t) len16 + 1) * 512; break;
    default: len = len16 % 4096 + 1; break;
    }
    len = min64 (min64 (len, budget), vsize - off);
    budget -= len;
    if (flags & 0x40)
      memset (buf, 0, len);             /* detect-zeroes turns these into zeroing */
    else
      memset (buf, (int) (i * 0x11 + 1) | 1, len);
    if (flags & 0x80)
      f |= Q2_FUA;

    switch (kind) {
    case 0: case 7:
      r = q2_read (img, buf, len, off);
      break;
    case 1: case 2:
      r = q2_write (img, buf, len, off, f);
      break;
    case 3:
      if (flags & 0x08) f |= Q2_MAY_TRIM;
      if (flags & 0x10) f |= Q2_FAST_ZERO;
      r = q2_zero (img, len, off, f);
      break;
    case 4:
      r = q2_discard (img, len, off, f);
      break;
    case 6:
      r = q2_extents (img, len, off, flags & 0x20, count_extent, &extents);
      break;
    }
    if (verbose)
      fprintf (stderr, "fuzz-image: %s 0x%" PRIx64 "+%" PRIu64 " flags 0x%x: %d\n",
               names[kind], off, len, f, r);
  }
}

static void run_repair (bool all)
{
  struct q2_options o = { .file = image_path, .repair = true, .cache_size = 1,
                          .compact = Q2_COMPACT_OFF };
  struct q2_repair_result res;
  struct q2_image *img;
  int r;

  if (q2_open (&o, &img) < 0)
    return;
  r = q2_repair (img, all ? Q2_REPAIR_ALL : Q2_REPAIR_LEAKS, &res, NULL, NULL);
  q2_close (img);
  if (verbose)
    fprintf (stderr, "fuzz-image: repair %s: %d\n", all ? "all" : "leaks", r);
  if (r < 0)
    return;
  q2_check_free (&res.after);
  if (oracle && all && (res.after.corruptions || consistent () == 0)) {
    fprintf (stderr, "fuzz-image: check -r all did not refuse the image, yet left "
             "corruption (rerun with FUZZ_VERBOSE=1 to see which)\n");
    abort ();
  }
}

static void keep_image (void)
{
  FILE *f = fopen (image_path, "rb");
  uint8_t *copy = NULL;
  long n;

  if (!f || fseek (f, 0, SEEK_END) < 0 || (n = ftell (f)) < 0 ||
      fseek (f, 0, SEEK_SET) < 0 || !(copy = malloc (n ? n : 1)) ||
      fread (copy, 1, n, f) != (size_t) n || write_file (keep_path, copy, n) < 0)
    perror ("fuzz-image: FUZZ_KEEP");
  free (copy);
  if (f)
    fclose (f);
}

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  /* cache_size 1: the engine's minimum of 16 tables, so that requests
   * spread over a few L2 tables already evict and write back.
   */
  struct q2_options o = { .file = image_path, .readonly = false,
                          .cache_size = 1, .compact = Q2_COMPACT_OFF };
  struct q2_image *img;
  size_t nops, opbytes;
  uint8_t cfg;
  int before = -1, after;

  if (write_file (image_path, data, size) < 0) {
    perror ("fuzz-image: writing the image");
    abort ();
  }
  /* The request bytes: the tail, at most a quarter of the input. */
  nops = min64 (MAX_OPS, size / 4 / OP_BYTES);
  opbytes = nops * OP_BYTES;
  cfg = size > opbytes ? data[size - opbytes - 1] ^ 0xa7 : 0;
  o.discard = (enum q2_discard_mode) (cfg % 3);
  o.detect_zeroes = (enum q2_detect_zeroes) ((cfg >> 2) % 3);

  if ((cfg & 0xa0) == 0xa0) {
    run_repair (cfg & 0x10);
    if (keep_path)
      keep_image ();
    return 0;
  }
  if (oracle)
    before = consistent ();
  if (q2_open (&o, &img) < 0)
    return 0;
  /* io_uring batches are the normal write-back path; cover them on some inputs. */
  if (cfg & 0x40)
    q2_after_fork (img);
  run_requests (img, data + size - opbytes, nops);
  q2_close (img);
  if (keep_path)
    keep_image ();

  if (before == 1 && (after = consistent ()) == 0) {
    fprintf (stderr, "fuzz-image: the engine's check found the image consistent "
             "before the requests and corrupt after them (rerun with "
             "FUZZ_VERBOSE=1 to see which clusters)\n");
    abort ();
  }
  return 0;
}
