/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "qcow2-format.h"
#include "header.h"
#include "host.h"
#include "layout.h"
#include "log.h"

/* Looks up a feature's name in the header's feature name table, so that a
 * refusal can say what the unknown feature is.
 */
static void feature_name (const uint8_t *buf, uint64_t start, uint64_t end,
                          int type, int bit, char *name, size_t len)
{
  uint64_t off = start;

  name[0] = '\0';
  while (off + 8 <= end) {
    uint32_t t = be32_get (buf + off), l = be32_get (buf + off + 4);
    if (t == HDR_EXT_END || off + 8 + l > end)
      return;
    if (t == HDR_EXT_FEATURE_TABLE) {
      const uint8_t *f;
      for (f = buf + off + 8; f + 48 <= buf + off + 8 + l; f += 48)
        if (f[0] == type && f[1] == bit) {
          snprintf (name, len, " \"%.46s\"", (const char *) f + 2);
          return;
        }
    }
    off += 8 + ((l + 7) & ~7u);
  }
}

static int parse_extensions (struct layout *lay, const uint8_t *buf,
                             uint64_t start, uint64_t end, struct header_extras *ex)
{
  uint64_t off = start;

  while (off + 8 <= end) {
    uint32_t t = be32_get (buf + off), l = be32_get (buf + off + 4);
    if (t == HDR_EXT_END)
      return 0;
    if (off + 8 + l > end) {
      log_error ("%s: header extension 0x%x at offset 0x%" PRIx64
                " runs past the first cluster", lay->name, t, off);
      return -EINVAL;
    }
    if (t == HDR_EXT_BACKING_FORMAT) {
      size_t n = l < sizeof ex->backing_format - 1 ? l : sizeof ex->backing_format - 1;
      memcpy (ex->backing_format, buf + off + 8, n);
      ex->backing_format[n] = '\0';
    }
    if (t == HDR_EXT_CRYPTO && l >= 16) {
      lay->crypto_offset = be64_get (buf + off + 8);
      lay->crypto_length = be64_get (buf + off + 16);
    }
    if (t == HDR_EXT_DATA_FILE) {
      ex->data_file_offset = off + 8;
      ex->data_file_len = l;
    }
    /* Without its autoclear bit, the extension is stale: QEMU ignores it. */
    if (t == HDR_EXT_BITMAPS && l >= BITMAPS_EXT_LENGTH &&
        (lay->autoclear & AUTOCLEAR_BITMAPS)) {
      lay->nb_bitmaps = be32_get (buf + off + 8);
      lay->bitmap_dir_size = be64_get (buf + off + 16);
      lay->bitmap_dir_offset = be64_get (buf + off + 24);
      lay->bitmap_ext = off + 8;
    }
    off += 8 + ((l + 7) & ~7u);
  }
  return 0;
}

static int refuse_features (struct layout *lay, const uint8_t *buf,
                            uint64_t ext_start, uint64_t ext_end, bool readonly)
{
  uint64_t unknown = lay->incompat & ~INCOMPAT_KNOWN;
  char name[64];

  if (unknown) {
    int bit = __builtin_ctzll (unknown);
    feature_name (buf, ext_start, ext_end, 0, bit, name, sizeof name);
    log_error ("%s: the image uses an unknown incompatible feature (bit %d%s) "
              "that this version cannot serve safely", lay->name, bit, name);
    return -ENOTSUP;
  }
  /* QEMU never makes subclusters of less than 512 bytes. */
  if ((lay->incompat & INCOMPAT_EXTL2) && lay->cluster_bits < QCOW2_EXTL2_MIN_CLUSTER_BITS) {
    log_error ("%s: the image uses extended L2 entries with %" PRIu64 "-byte clusters; "
               "they need clusters of at least 16 KiB", lay->name, lay->cluster_size);
    return -EINVAL;
  }
  if (!readonly && header_write_refusal (lay)) {
    log_error ("%s: %s", lay->name, header_write_refusal (lay));
    return -EINVAL;
  }
  return 0;
}

/* LUKS is served (crypto.c); the legacy AES of qcow2 is not: QEMU itself
 * no longer opens it for writing, and its flaws are known.
 */
static int parse_crypt_method (struct layout *lay, const uint8_t *buf)
{
  lay->crypt_method = be32_get (buf + HDR_CRYPT_METHOD);
  if (lay->crypt_method == CRYPT_AES) {
    log_error ("%s: the image uses the legacy AES encryption of qcow2 (method 1), "
               "which has known weaknesses and is not supported; convert it to a "
               "LUKS-encrypted image with qemu-img convert -o encrypt.format=luks",
               lay->name);
    return -ENOTSUP;
  }
  if (lay->crypt_method != CRYPT_NONE && lay->crypt_method != CRYPT_LUKS) {
    log_error ("%s: the image is encrypted with an unknown method (%u)", lay->name,
               lay->crypt_method);
    return -ENOTSUP;
  }
  return 0;
}

/* The LUKS header lies in clusters of its own, inside the file. */
static int check_crypto_area (const struct layout *lay, uint64_t file_size)
{
  if (lay->crypt_method != CRYPT_LUKS) {
    if (lay->crypto_length)
      log_error ("%s: the image has an encryption header but is not LUKS-encrypted",
                 lay->name);
    return lay->crypto_length ? -EINVAL : 0;
  }
  if (!lay->crypto_length) {
    log_error ("%s: the image is LUKS-encrypted but has no encryption header "
               "extension (0x%x)", lay->name, HDR_EXT_CRYPTO);
    return -EINVAL;
  }
  if (lay->crypto_offset & (lay->cluster_size - 1) || lay->crypto_offset == 0 ||
      lay->crypto_offset > file_size || lay->crypto_length > file_size - lay->crypto_offset) {
    log_error ("%s: the encryption header at 0x%" PRIx64 " (%" PRIu64 " bytes) is not "
               "at a cluster boundary inside the file", lay->name, lay->crypto_offset,
               lay->crypto_length);
    return -EINVAL;
  }
  return 0;
}

const char *header_write_refusal (const struct layout *lay)
{
  if (lay->incompat & INCOMPAT_CORRUPT)
    return "the image is marked corrupt; repair it with qcow2reclaim check -r all "
      "(or qemu-img check -r all), or serve it with readonly=true to read what is left";
  /* The dirty bit is no refusal: opening for writing rebuilds the
   * refcounts (image.c), as QEMU does.
   */
  return NULL;
}

static int parse_v3_fields (struct layout *lay, const uint8_t *buf, uint64_t buflen)
{
  lay->incompat = be64_get (buf + HDR_INCOMPAT);
  lay->compat = be64_get (buf + HDR_COMPAT);
  lay->autoclear = be64_get (buf + HDR_AUTOCLEAR);
  lay->refcount_order = be32_get (buf + HDR_REFCOUNT_ORDER);
  lay->header_length = be32_get (buf + HDR_HEADER_LENGTH);
  if (lay->header_length < HDR_V3_MIN_LENGTH || lay->header_length > buflen ||
      lay->header_length % 8) {
    log_error ("%s: the header length %u is invalid", lay->name, lay->header_length);
    return -EINVAL;
  }
  if (lay->refcount_order > 6) {
    log_error ("%s: refcount order %u is invalid (at most 6)", lay->name,
              lay->refcount_order);
    return -EINVAL;
  }
  lay->compression_type = COMPRESSION_DEFLATE;
  if (lay->header_length > HDR_COMPRESSION_TYPE)
    lay->compression_type = buf[HDR_COMPRESSION_TYPE];
  if (lay->compression_type > COMPRESSION_ZSTD ||
      (lay->compression_type != COMPRESSION_DEFLATE) !=
      !!(lay->incompat & INCOMPAT_COMPRESSION)) {
    log_error ("%s: compression type %d is not supported or does not match the "
              "incompatible feature bits", lay->name, lay->compression_type);
    return -ENOTSUP;
  }
  return 0;
}

/* Geometry: cluster size, L2 and refcount block shapes, compressed entry layout. */
static int parse_geometry (struct layout *lay, const uint8_t *buf)
{
  lay->cluster_bits = be32_get (buf + HDR_CLUSTER_BITS);
  if (lay->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
      lay->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
    log_error ("%s: cluster size 2^%u is outside what QEMU supports (512 B to 2 MiB)",
              lay->name, lay->cluster_bits);
    return -EINVAL;
  }
  lay->cluster_size = 1ull << lay->cluster_bits;
  /* Only a v3 header has the incompatible bits that say so. */
  lay->extl2 = lay->version >= 3 && (lay->incompat & INCOMPAT_EXTL2);
  lay->l2_bits = lay->cluster_bits - (lay->extl2 ? 4 : 3);
  lay->rb_bits = lay->cluster_bits + 3 - lay->refcount_order;
  lay->refcount_max = lay->refcount_order == 6 ? UINT64_MAX
    : (1ull << (1u << lay->refcount_order)) - 1;
  lay->csize_shift = 62 - (lay->cluster_bits - 8);
  lay->csize_mask = (1ull << (lay->cluster_bits - 8)) - 1;
  lay->coffset_mask = (1ull << lay->csize_shift) - 1;
  lay->virtual_size = be64_get (buf + HDR_SIZE);
  return 0;
}

/* A table at [offset, offset + bytes) must be cluster aligned and inside the file. */
static int check_table (struct layout *lay, const char *what, uint64_t offset,
                        uint64_t bytes, uint64_t file_size)
{
  if (offset & (lay->cluster_size - 1) || offset == 0) {
    log_error ("%s: the %s offset 0x%" PRIx64 " is not a valid cluster offset",
              lay->name, what, offset);
    return -EINVAL;
  }
  if (offset > file_size || bytes > file_size - offset) {
    log_error ("%s: the file is truncated: the %s at 0x%" PRIx64 " (%" PRIu64
              " bytes) ends past the end of the file (%" PRIu64 " bytes)",
              lay->name, what, offset, bytes, file_size);
    return -EINVAL;
  }
  return 0;
}

static int parse_tables (struct layout *lay, const uint8_t *buf, uint64_t file_size)
{
  uint64_t l2_span = lay->cluster_size << lay->l2_bits;
  uint64_t needed, l1_size;
  int r;

  l1_size = be32_get (buf + HDR_L1_SIZE);
  lay->l1_offset = be64_get (buf + HDR_L1_OFFSET);
  if (lay->virtual_size > (1ull << 62)) {
    log_error ("%s: the virtual size %" PRIu64 " is too large", lay->name, lay->virtual_size);
    return -EINVAL;
  }
  needed = (lay->virtual_size + l2_span - 1) / l2_span;
  if (l1_size < needed || l1_size * 8 > QCOW2_MAX_L1_BYTES) {
    log_error ("%s: the L1 table has %" PRIu64 " entries, but the virtual size needs %"
              PRIu64 " (and at most %u are allowed)", lay->name, l1_size, needed,
              QCOW2_MAX_L1_BYTES / 8);
    return -EINVAL;
  }
  lay->l1_entries = l1_size;
  if (l1_size && (r = check_table (lay, "L1 table", lay->l1_offset, l1_size * 8, file_size)) < 0)
    return r;

  lay->reftable_offset = be64_get (buf + HDR_REFTABLE_OFFSET);
  lay->reftable_clusters = be32_get (buf + HDR_REFTABLE_CLUSTERS);
  if (lay->reftable_clusters == 0 ||
      lay->reftable_clusters << lay->cluster_bits > QCOW2_MAX_REFTABLE_BYTES) {
    log_error ("%s: the refcount table size (%" PRIu64 " clusters) is invalid",
              lay->name, lay->reftable_clusters);
    return -EINVAL;
  }
  r = check_table (lay, "refcount table", lay->reftable_offset,
                   lay->reftable_clusters << lay->cluster_bits, file_size);
  if (r < 0)
    return r;

  lay->nb_snapshots = be32_get (buf + HDR_NB_SNAPSHOTS);
  lay->snapshots_offset = be64_get (buf + HDR_SNAPSHOTS_OFFSET);
  if (lay->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
    log_error ("%s: the image claims %u internal snapshots, more than the %u QEMU allows",
              lay->name, lay->nb_snapshots, QCOW2_MAX_SNAPSHOTS);
    return -EINVAL;
  }
  /* A snapshot would need refcounts on data clusters, which a data file
   * has none of: QEMU refuses to create one.
   */
  if (lay->nb_snapshots && lay->data_file) {
    log_error ("%s: the image has internal snapshots and an external data file, "
               "which cannot go together", lay->name);
    return -EINVAL;
  }
  if (lay->nb_snapshots &&
      (r = check_table (lay, "snapshot table", lay->snapshots_offset, 40, file_size)) < 0)
    return r;
  return 0;
}

int header_parse (struct layout *lay, const uint8_t *buf, uint64_t buflen,
                  uint64_t file_size, bool readonly, struct header_extras *ex)
{
  uint64_t ext_start, ext_end;
  int r;

  memset (ex, 0, sizeof *ex);
  if (file_size < HDR_V2_LENGTH || be32_get (buf + HDR_MAGIC) != QCOW2_MAGIC) {
    log_error ("%s: is not a qcow2 image (no qcow2 magic in the first bytes)", lay->name);
    return -EINVAL;
  }
  lay->version = be32_get (buf + HDR_VERSION);
  if (lay->version != 2 && lay->version != 3) {
    log_error ("%s: qcow2 version %u is not supported (only versions 2 and 3 are)",
              lay->name, lay->version);
    return -ENOTSUP;
  }
  if ((r = parse_crypt_method (lay, buf)) < 0)
    return r;
  lay->refcount_order = 4;
  lay->header_length = HDR_V2_LENGTH;
  if (lay->version == 3) {
    if (file_size < HDR_V3_MIN_LENGTH) {
      log_error ("%s: the file is truncated inside the qcow2 header", lay->name);
      return -EINVAL;
    }
    if ((r = parse_v3_fields (lay, buf, buflen)) < 0)
      return r;
  }
  if ((r = parse_geometry (lay, buf)) < 0)
    return r;
  lay->data_file = !!(lay->incompat & INCOMPAT_DATA_FILE);
  lay->data_raw = lay->data_file && (lay->autoclear & AUTOCLEAR_DATA_FILE_RAW);
  ext_start = lay->header_length;
  ext_end = buflen < lay->cluster_size ? buflen : lay->cluster_size;
  if ((r = refuse_features (lay, buf, ext_start, ext_end, readonly)) < 0)
    return r;
  if ((r = parse_extensions (lay, buf, ext_start, ext_end, ex)) < 0 ||
      (r = check_crypto_area (lay, file_size)) < 0)
    return r;

  ex->backing_offset = be64_get (buf + HDR_BACKING_OFFSET);
  ex->backing_len = be32_get (buf + HDR_BACKING_SIZE);
  if (ex->backing_offset &&
      (ex->backing_len > QCOW2_MAX_BACKING_NAME ||
       ex->backing_len > ext_end || ex->backing_offset > ext_end - ex->backing_len)) {
    log_error ("%s: the backing file name at offset 0x%" PRIx64 " (%u bytes) is "
              "invalid", lay->name, ex->backing_offset, ex->backing_len);
    return -EINVAL;
  }
  return parse_tables (lay, buf, file_size);
}

int header_write_reftable (struct hostfile *hf, uint64_t offset, uint32_t clusters)
{
  uint8_t b[12];

  be64_put (b, offset);
  be32_put (b + 8, clusters);
  return host_pwrite (hf, b, sizeof b, HDR_REFTABLE_OFFSET);
}

int header_write_l1 (struct hostfile *hf, uint64_t offset, uint32_t entries)
{
  uint8_t b[12];

  be32_put (b, entries);
  be64_put (b + 4, offset);
  return host_pwrite (hf, b, sizeof b, HDR_L1_SIZE);
}

int header_write_snapshots (struct hostfile *hf, uint64_t offset, uint32_t count)
{
  uint8_t b[12];

  be32_put (b, count);
  be64_put (b + 4, offset);
  return host_pwrite (hf, b, sizeof b, HDR_NB_SNAPSHOTS);
}

/* The directory's offset is 8 bytes at an 8-byte boundary (extensions
 * start at one), so inside one sector.
 */
static int write_bitmap_dir (struct hostfile *hf, const struct layout *lay, uint64_t offset)
{
  uint8_t b[8];

  be64_put (b, offset);
  return host_pwrite (hf, b, sizeof b, lay->bitmap_ext + 16);
}

static int write_table_field (struct hostfile *hf, const struct layout *lay,
                              enum header_table which, uint64_t offset, uint32_t size)
{
  int r = which == HEADER_L1 ? header_write_l1 (hf, offset, size)
    : which == HEADER_REFTABLE ? header_write_reftable (hf, offset, size)
    : which == HEADER_SNAPSHOTS ? header_write_snapshots (hf, offset, size)
    : write_bitmap_dir (hf, lay, offset);

  return r < 0 ? r : host_sync (hf);
}

int header_switch_table (struct hostfile *hf, const struct layout *lay,
                         enum header_table which, uint64_t new_offset,
                         uint64_t old_offset, uint32_t size, bool *unsure)
{
  const char *what = which == HEADER_L1 ? "L1 table"
    : which == HEADER_REFTABLE ? "refcount table"
    : which == HEADER_SNAPSHOTS ? "snapshot table" : "persistent bitmap directory";
  int r = write_table_field (hf, lay, which, new_offset, size);

  *unsure = false;
  if (r == 0)
    return 0;
  log_error ("%s: cannot switch the header to the %s at 0x%" PRIx64 ": %s",
             lay->name, what, new_offset, strerror (-r));
  if (write_table_field (hf, lay, which, old_offset, size) < 0) {
    log_error ("%s: the header may name either %s; no more metadata changes until "
               "the image is checked (qemu-img check -r all)", lay->name, what);
    *unsure = true;
  }
  return r;
}

/* Autoclear features we do not maintain (bitmaps we cannot keep current,
 * bits of features we do not know) must be switched off before we change
 * the image, so QEMU will not trust what went stale.  A raw data file
 * stays raw: every write, discard and zero keeps it so.
 */
int header_clear_autoclear (struct hostfile *hf, struct layout *lay, bool keep_bitmaps)
{
  uint64_t keep = (lay->data_raw ? AUTOCLEAR_DATA_FILE_RAW : 0) |
    (keep_bitmaps ? lay->autoclear & AUTOCLEAR_BITMAPS : 0);
  uint8_t b[8];
  int r;

  if (lay->version < 3 || (lay->autoclear & ~keep) == 0)
    return 0;
  be64_put (b, keep);
  r = host_pwrite (hf, b, sizeof b, HDR_AUTOCLEAR);
  if (r == 0)
    r = host_sync (hf);
  if (r < 0) {
    log_error ("%s: cannot clear the autoclear feature bits: %s", lay->name, strerror (-r));
    return r;
  }
  if ((lay->autoclear & ~keep) & AUTOCLEAR_BITMAPS)
    log_notice ("%s: cleared autoclear feature bits 0x%" PRIx64
                " (persistent bitmaps are no longer valid after writes)",
                lay->name, lay->autoclear & ~keep);
  else
    log_notice ("%s: cleared autoclear feature bits 0x%" PRIx64 " (features this "
                "version does not know)", lay->name, lay->autoclear & ~keep);
  if (!(keep & AUTOCLEAR_BITMAPS))
    lay->nb_bitmaps = 0;      /* their clusters are leaks from now on, for QEMU too */
  lay->autoclear = keep;
  return 0;
}

int header_clear_incompat (struct hostfile *hf, struct layout *lay, uint64_t bits)
{
  uint8_t b[8];
  int r;

  if (lay->version < 3 || !(lay->incompat & bits))
    return 0;
  be64_put (b, lay->incompat & ~bits);
  r = host_pwrite (hf, b, sizeof b, HDR_INCOMPAT);
  if (r == 0)
    r = host_sync (hf);
  if (r < 0) {
    log_error ("%s: cannot clear incompatible feature bits 0x%" PRIx64 ": %s", lay->name,
               lay->incompat & bits, strerror (-r));
    return r;
  }
  lay->incompat &= ~bits;
  return 0;
}
