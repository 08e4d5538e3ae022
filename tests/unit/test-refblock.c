/* SPDX-License-Identifier: BSD-3-Clause */
/* Refcount block encoding at all seven widths (1 to 64 bits):
 *  - random puts against a reference array, checking that a put changes
 *    its own count and no neighbour's, for counts up to the width's max;
 *  - the bit layout QEMU uses (narrow counts from the least significant
 *    bit of a byte, wide ones big-endian), on hand-made bytes;
 *  - with qemu-img on PATH: blocks of images QEMU created at each width
 *    decode to exactly the clusters QEMU counted.
 */
#include <config.h>

#include <fcntl.h>
#include <inttypes.h>
#include <string.h>

#include "qcow2-format.h"
#include "refcount.h"
#include "unit.h"

#define BLOCK 4096

static void random_puts (uint32_t order)
{
  unsigned bits = 1u << order;
  uint64_t n = BLOCK * 8 / bits, max = bits == 64 ? UINT64_MAX : (1ull << bits) - 1, i, k;
  uint8_t block[BLOCK] = { 0 };
  uint64_t *ref = calloc (n, sizeof *ref);

  CHECK (ref);
  for (k = 0; k < 20000; k++) {
    uint64_t v;
    i = unit_random () % n;
    switch (unit_random () % 4) {
    case 0: v = 0; break;
    case 1: v = max; break;
    case 2: v = 1; break;
    default: v = unit_random () & max;
    }
    refcount_block_put (block, order, i, v);
    ref[i] = v;
    CHECK (refcount_block_get (block, order, i) == v);
    if (i > 0)
      CHECK (refcount_block_get (block, order, i - 1) == ref[i - 1]);
    if (i + 1 < n)
      CHECK (refcount_block_get (block, order, i + 1) == ref[i + 1]);
  }
  for (i = 0; i < n; i++)
    CHECK (refcount_block_get (block, order, i) == ref[i]);
  free (ref);
}

static void layout (void)
{
  uint8_t b[16];

  memset (b, 0, sizeof b);
  refcount_block_put (b, 0, 9, 1);              /* 1 bit: byte 1, bit 1 */
  CHECK (b[1] == 0x02);
  memset (b, 0, sizeof b);
  refcount_block_put (b, 1, 5, 3);              /* 2 bits: byte 1, bits 2-3 */
  CHECK (b[1] == 0x0c);
  memset (b, 0, sizeof b);
  refcount_block_put (b, 2, 3, 0xa);            /* 4 bits: byte 1, high nibble */
  CHECK (b[1] == 0xa0);
  memset (b, 0, sizeof b);
  refcount_block_put (b, 3, 2, 0xab);
  CHECK (b[2] == 0xab);
  memset (b, 0, sizeof b);
  refcount_block_put (b, 4, 1, 0x1234);         /* 16 bits, big-endian */
  CHECK (b[2] == 0x12 && b[3] == 0x34);
  memset (b, 0, sizeof b);
  refcount_block_put (b, 5, 1, 0x12345678);
  CHECK (b[4] == 0x12 && b[7] == 0x78);
  memset (b, 0, sizeof b);
  refcount_block_put (b, 6, 1, 0x0102030405060708ull);
  CHECK (b[8] == 0x01 && b[15] == 0x08);
}

/* QEMU's image at each width: the clusters of the header, the refcount
 * table, the refcount block and the L1 table have count 1, nothing else.
 */
static void qemu_images (void)
{
  char dir[] = "/tmp/q2r-refblock.XXXXXX", cmd[512], path[300];
  unsigned order;

  if (system ("qemu-img --version >/dev/null 2>&1") != 0) {
    printf ("test-refblock: qemu-img is not installed; QEMU's encoding not compared\n");
    return;
  }
  CHECK (mkdtemp (dir));
  for (order = 0; order <= 6; order++) {
    uint8_t h[104], e[8], block[BLOCK];
    uint64_t i, n, counted = 0;
    int fd;
    snprintf (path, sizeof path, "%s/w%u.qcow2", dir, order);
    snprintf (cmd, sizeof cmd, "qemu-img create -q -f qcow2 -o cluster_size=%d,"
              "refcount_bits=%u %s 64M", BLOCK, 1u << order, path);
    CHECK (system (cmd) == 0);
    CHECK ((fd = open (path, O_RDONLY)) >= 0);
    CHECK (pread (fd, h, sizeof h, 0) == sizeof h);
    CHECK (be32_get (h + HDR_REFCOUNT_ORDER) == order);
    CHECK (pread (fd, e, 8, be64_get (h + HDR_REFTABLE_OFFSET)) == 8);
    CHECK (pread (fd, block, BLOCK, be64_get (e) & REFT_OFFSET_MASK) == BLOCK);
    close (fd);
    n = BLOCK * 8 >> order;
    for (i = 0; i < n; i++) {
      uint64_t v = refcount_block_get (block, order, i);
      CHECK (v <= 1);
      if (v)
        CHECK (i == counted++);       /* the first clusters, one after another */
    }
    CHECK (counted == 4);
    unlink (path);
  }
  rmdir (dir);
  printf ("test-refblock: QEMU's blocks decode at all seven widths\n");
}

int main (void)
{
  uint32_t order;

  for (order = 0; order <= 6; order++)
    random_puts (order);
  layout ();
  qemu_images ();
  printf ("test-refblock: ok\n");
  return 0;
}
