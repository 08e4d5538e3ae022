/* SPDX-License-Identifier: BSD-3-Clause */
/* On-disk qcow2 format: header layout, feature bits, entry masks and the
 * big-endian helpers every reader of the format needs.
 * See QEMU's docs/interop/qcow2.txt for the authoritative description.
 */
#ifndef QCOW2_FORMAT_H
#define QCOW2_FORMAT_H

#include <stdint.h>
#include <string.h>

#define QCOW2_MAGIC 0x514649fbu

/* Header field offsets (bytes from the start of the file). */
#define HDR_MAGIC                0
#define HDR_VERSION              4
#define HDR_BACKING_OFFSET       8
#define HDR_BACKING_SIZE        16
#define HDR_CLUSTER_BITS        20
#define HDR_SIZE                24
#define HDR_CRYPT_METHOD        32
#define HDR_L1_SIZE             36
#define HDR_L1_OFFSET           40
#define HDR_REFTABLE_OFFSET     48
#define HDR_REFTABLE_CLUSTERS   56
#define HDR_NB_SNAPSHOTS        60
#define HDR_SNAPSHOTS_OFFSET    64
#define HDR_V2_LENGTH           72
#define HDR_INCOMPAT            72
#define HDR_COMPAT              80
#define HDR_AUTOCLEAR           88
#define HDR_REFCOUNT_ORDER      96
#define HDR_HEADER_LENGTH      100
#define HDR_COMPRESSION_TYPE   104
#define HDR_V3_MIN_LENGTH      104

#define INCOMPAT_DIRTY          (1ull << 0)
#define INCOMPAT_CORRUPT        (1ull << 1)
#define INCOMPAT_DATA_FILE      (1ull << 2)
#define INCOMPAT_COMPRESSION    (1ull << 3)
#define INCOMPAT_EXTL2          (1ull << 4)
#define INCOMPAT_KNOWN          ((1ull << 5) - 1)

#define COMPAT_LAZY_REFCOUNTS   (1ull << 0)

#define AUTOCLEAR_BITMAPS       (1ull << 0)
#define AUTOCLEAR_DATA_FILE_RAW (1ull << 1)

#define COMPRESSION_DEFLATE 0
#define COMPRESSION_ZSTD    1

/* Header extension types. */
#define HDR_EXT_END             0x00000000u
#define HDR_EXT_BACKING_FORMAT  0xe2792acau
#define HDR_EXT_FEATURE_TABLE   0x6803f857u
#define HDR_EXT_DATA_FILE       0x44415441u
#define HDR_EXT_BITMAPS         0x23852875u
#define HDR_EXT_CRYPTO          0x0537be77u   /* u64 offset, u64 length of the LUKS header */

/* crypt_method */
#define CRYPT_NONE 0
#define CRYPT_AES  1            /* the legacy AES-CBC of qcow2: refused */
#define CRYPT_LUKS 2

/* Persistent bitmaps: the extension's fields, a directory entry's fixed
 * part, and where a bitmap table entry keeps its data cluster.
 */
#define BITMAPS_EXT_LENGTH      24
#define BITMAP_ENTRY_FIXED      24
#define BITMAP_TABLE_OFFSET_MASK 0x00fffffffffffe00ull
#define BITMAP_TABLE_RESERVED_MASK 0xff000000000001feull
#define BITMAP_TABLE_ALL_ONES   1ull   /* with offset 0: the cluster reads as ones */

/* A directory entry: table offset (8 bytes), table size (4), flags (4),
 * type (1), granularity bits (1), name size (2), extra data size (4).
 */
#define BME_TABLE_OFFSET        0
#define BME_TABLE_SIZE          8
#define BME_FLAGS              12
#define BME_TYPE               16
#define BME_GRANULARITY        17
#define BME_NAME_SIZE          18
#define BME_EXTRA_SIZE         20
#define BME_FLAG_IN_USE         (1u << 0)
#define BME_FLAG_AUTO           (1u << 1)
#define BME_FLAG_EXTRA_COMPAT   (1u << 2)
#define BME_TYPE_DIRTY_TRACKING 1

/* L1 and L2 entries. */
#define L1E_OFFSET_MASK   0x00fffffffffffe00ull
#define L1E_RESERVED_MASK 0x7f000000000001ffull
#define L2E_OFFSET_MASK   0x00fffffffffffe00ull
#define L2E_RESERVED_MASK 0x3f000000000001feull
#define QCOW_OFLAG_COPIED     (1ull << 63)
#define QCOW_OFLAG_COMPRESSED (1ull << 62)
#define QCOW_OFLAG_ZERO       (1ull << 0)
/* Extended L2 entries: the bitmap word of 32 subclusters. */
#define L2_SUBCLUSTERS        32
#define L2_BITMAP_ALLOC       0x00000000ffffffffull
#define L2_BITMAP_ZERO        0xffffffff00000000ull
#define QCOW2_EXTL2_MIN_CLUSTER_BITS 14

#define REFT_OFFSET_MASK  0xfffffffffffffe00ull

/* QEMU's own limits, so that any image QEMU accepts we accept too. */
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_MAX_L1_BYTES     (32u << 20)
#define QCOW2_MAX_REFTABLE_BYTES (8u << 20)
#define QCOW2_MAX_BACKING_NAME 1023
#define QCOW2_MAX_SNAPSHOTS    65536

static inline uint16_t be16_get (const void *p)
{
  const uint8_t *b = p;
  return (uint16_t) (b[0] << 8 | b[1]);
}

static inline uint32_t be32_get (const void *p)
{
  const uint8_t *b = p;
  return (uint32_t) b[0] << 24 | (uint32_t) b[1] << 16 |
         (uint32_t) b[2] << 8 | b[3];
}

static inline uint64_t be64_get (const void *p)
{
  return (uint64_t) be32_get (p) << 32 | be32_get ((const uint8_t *) p + 4);
}

static inline void be32_put (void *p, uint32_t v)
{
  uint8_t *b = p;
  b[0] = v >> 24; b[1] = v >> 16; b[2] = v >> 8; b[3] = v;
}

static inline void be64_put (void *p, uint64_t v)
{
  be32_put (p, v >> 32);
  be32_put ((uint8_t *) p + 4, (uint32_t) v);
}

#endif /* QCOW2_FORMAT_H */
