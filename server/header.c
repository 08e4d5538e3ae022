#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "image.h"
#include "header.h"
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

static int parse_extensions (struct q2_image *img, const uint8_t *buf,
                             uint64_t start, uint64_t end, struct header_extras *ex)
{
  uint64_t off = start;

  while (off + 8 <= end) {
    uint32_t t = be32_get (buf + off), l = be32_get (buf + off + 4);
    if (t == HDR_EXT_END)
      return 0;
    if (off + 8 + l > end) {
      q2_error ("%s: header extension 0x%x at offset 0x%" PRIx64
                " runs past the first cluster", img->name, t, off);
      return -EINVAL;
    }
    if (t == HDR_EXT_BACKING_FORMAT) {
      size_t n = l < sizeof ex->backing_format - 1 ? l : sizeof ex->backing_format - 1;
      memcpy (ex->backing_format, buf + off + 8, n);
      ex->backing_format[n] = '\0';
    }
    off += 8 + ((l + 7) & ~7u);
  }
  return 0;
}

static int refuse_features (struct q2_image *img, const uint8_t *buf,
                            uint64_t ext_start, uint64_t ext_end)
{
  uint64_t unknown = img->incompat & ~INCOMPAT_KNOWN;
  char name[64];

  if (unknown) {
    int bit = __builtin_ctzll (unknown);
    feature_name (buf, ext_start, ext_end, 0, bit, name, sizeof name);
    q2_error ("%s: the image uses an unknown incompatible feature (bit %d%s) "
              "that this version cannot serve safely", img->name, bit, name);
    return -ENOTSUP;
  }
  if (img->incompat & INCOMPAT_EXTL2) {
    q2_error ("%s: the image uses extended L2 entries (subclusters), which are "
              "not supported yet; convert it with qemu-img convert -O qcow2", img->name);
    return -ENOTSUP;
  }
  if (img->incompat & INCOMPAT_DATA_FILE) {
    q2_error ("%s: the image keeps its data in an external data file, which is "
              "not supported yet", img->name);
    return -ENOTSUP;
  }
  if ((img->incompat & INCOMPAT_CORRUPT) && !img->readonly) {
    q2_error ("%s: the image is marked corrupt; repair it with qemu-img check -r all, "
              "or serve it with readonly=true to read what is left", img->name);
    return -EINVAL;
  }
  if ((img->incompat & INCOMPAT_DIRTY) && !img->readonly) {
    q2_error ("%s: the image has the dirty bit set (lazy refcounts were not written "
              "back); run qemu-img check -r all to repair it, or serve it with "
              "readonly=true", img->name);
    return -EINVAL;
  }
  return 0;
}

static int parse_v3_fields (struct q2_image *img, const uint8_t *buf, uint64_t buflen)
{
  img->incompat = be64_get (buf + HDR_INCOMPAT);
  img->compat = be64_get (buf + HDR_COMPAT);
  img->autoclear = be64_get (buf + HDR_AUTOCLEAR);
  img->refcount_order = be32_get (buf + HDR_REFCOUNT_ORDER);
  img->header_length = be32_get (buf + HDR_HEADER_LENGTH);
  if (img->header_length < HDR_V3_MIN_LENGTH || img->header_length > buflen ||
      img->header_length % 8) {
    q2_error ("%s: the header length %u is invalid", img->name, img->header_length);
    return -EINVAL;
  }
  if (img->refcount_order > 6) {
    q2_error ("%s: refcount order %u is invalid (at most 6)", img->name,
              img->refcount_order);
    return -EINVAL;
  }
  img->compression_type = COMPRESSION_DEFLATE;
  if (img->header_length > HDR_COMPRESSION_TYPE)
    img->compression_type = buf[HDR_COMPRESSION_TYPE];
  if (img->compression_type > COMPRESSION_ZSTD ||
      (img->compression_type != COMPRESSION_DEFLATE) !=
      !!(img->incompat & INCOMPAT_COMPRESSION)) {
    q2_error ("%s: compression type %d is not supported or does not match the "
              "incompatible feature bits", img->name, img->compression_type);
    return -ENOTSUP;
  }
  return 0;
}

/* Geometry: cluster size, L2 and refcount block shapes, compressed entry layout. */
static int parse_geometry (struct q2_image *img, const uint8_t *buf)
{
  img->cluster_bits = be32_get (buf + HDR_CLUSTER_BITS);
  if (img->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
      img->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
    q2_error ("%s: cluster size 2^%u is outside what QEMU supports (512 B to 2 MiB)",
              img->name, img->cluster_bits);
    return -EINVAL;
  }
  img->cluster_size = 1ull << img->cluster_bits;
  img->l2_bits = img->cluster_bits - 3;
  img->rb_bits = img->cluster_bits + 3 - img->refcount_order;
  img->refcount_max = img->refcount_order == 6 ? UINT64_MAX
    : (1ull << (1u << img->refcount_order)) - 1;
  img->csize_shift = 62 - (img->cluster_bits - 8);
  img->csize_mask = (1ull << (img->cluster_bits - 8)) - 1;
  img->coffset_mask = (1ull << img->csize_shift) - 1;
  img->virtual_size = be64_get (buf + HDR_SIZE);
  return 0;
}

/* A table at [offset, offset + bytes) must be cluster aligned and inside the file. */
static int check_table (struct q2_image *img, const char *what, uint64_t offset,
                        uint64_t bytes, uint64_t file_size)
{
  if (offset & (img->cluster_size - 1) || offset == 0) {
    q2_error ("%s: the %s offset 0x%" PRIx64 " is not a valid cluster offset",
              img->name, what, offset);
    return -EINVAL;
  }
  if (offset > file_size || bytes > file_size - offset) {
    q2_error ("%s: the file is truncated: the %s at 0x%" PRIx64 " (%" PRIu64
              " bytes) ends past the end of the file (%" PRIu64 " bytes)",
              img->name, what, offset, bytes, file_size);
    return -EINVAL;
  }
  return 0;
}

static int parse_tables (struct q2_image *img, const uint8_t *buf, uint64_t file_size)
{
  uint64_t l2_span = img->cluster_size << img->l2_bits;
  uint64_t needed, l1_size;
  int r;

  l1_size = be32_get (buf + HDR_L1_SIZE);
  img->l1.offset = be64_get (buf + HDR_L1_OFFSET);
  if (img->virtual_size > (1ull << 62)) {
    q2_error ("%s: the virtual size %" PRIu64 " is too large", img->name, img->virtual_size);
    return -EINVAL;
  }
  needed = (img->virtual_size + l2_span - 1) / l2_span;
  if (l1_size < needed || l1_size * 8 > QCOW2_MAX_L1_BYTES) {
    q2_error ("%s: the L1 table has %" PRIu64 " entries, but the virtual size needs %"
              PRIu64 " (and at most %u are allowed)", img->name, l1_size, needed,
              QCOW2_MAX_L1_BYTES / 8);
    return -EINVAL;
  }
  img->l1.size = l1_size;
  if (l1_size && (r = check_table (img, "L1 table", img->l1.offset, l1_size * 8, file_size)) < 0)
    return r;

  img->reftable.offset = be64_get (buf + HDR_REFTABLE_OFFSET);
  img->reftable_clusters = be32_get (buf + HDR_REFTABLE_CLUSTERS);
  if (img->reftable_clusters == 0 ||
      img->reftable_clusters << img->cluster_bits > QCOW2_MAX_REFTABLE_BYTES) {
    q2_error ("%s: the refcount table size (%" PRIu64 " clusters) is invalid",
              img->name, img->reftable_clusters);
    return -EINVAL;
  }
  img->reftable.size = (img->reftable_clusters << img->cluster_bits) / 8;
  r = check_table (img, "refcount table", img->reftable.offset,
                   img->reftable_clusters << img->cluster_bits, file_size);
  if (r < 0)
    return r;

  img->nb_snapshots = be32_get (buf + HDR_NB_SNAPSHOTS);
  img->snapshots_offset = be64_get (buf + HDR_SNAPSHOTS_OFFSET);
  if (img->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
    q2_error ("%s: the image claims %u internal snapshots, more than the %u QEMU allows",
              img->name, img->nb_snapshots, QCOW2_MAX_SNAPSHOTS);
    return -EINVAL;
  }
  if (img->nb_snapshots &&
      (r = check_table (img, "snapshot table", img->snapshots_offset, 40, file_size)) < 0)
    return r;
  return 0;
}

int header_parse (struct q2_image *img, const uint8_t *buf, uint64_t buflen,
                  uint64_t file_size, struct header_extras *ex)
{
  uint64_t ext_start, ext_end;
  int r;

  memset (ex, 0, sizeof *ex);
  if (file_size < HDR_V2_LENGTH || be32_get (buf + HDR_MAGIC) != QCOW2_MAGIC) {
    q2_error ("%s: is not a qcow2 image (no qcow2 magic in the first bytes)", img->name);
    return -EINVAL;
  }
  img->version = be32_get (buf + HDR_VERSION);
  if (img->version != 2 && img->version != 3) {
    q2_error ("%s: qcow2 version %u is not supported (only versions 2 and 3 are)",
              img->name, img->version);
    return -ENOTSUP;
  }
  if (be32_get (buf + HDR_CRYPT_METHOD) != 0) {
    q2_error ("%s: the image is encrypted (method %u); encrypted images are not "
              "supported", img->name, be32_get (buf + HDR_CRYPT_METHOD));
    return -ENOTSUP;
  }
  img->refcount_order = 4;
  img->header_length = HDR_V2_LENGTH;
  if (img->version == 3) {
    if (file_size < HDR_V3_MIN_LENGTH) {
      q2_error ("%s: the file is truncated inside the qcow2 header", img->name);
      return -EINVAL;
    }
    if ((r = parse_v3_fields (img, buf, buflen)) < 0)
      return r;
  }
  if ((r = parse_geometry (img, buf)) < 0)
    return r;
  ext_start = img->header_length;
  ext_end = buflen < img->cluster_size ? buflen : img->cluster_size;
  if ((r = refuse_features (img, buf, ext_start, ext_end)) < 0)
    return r;
  if ((r = parse_extensions (img, buf, ext_start, ext_end, ex)) < 0)
    return r;

  ex->backing_offset = be64_get (buf + HDR_BACKING_OFFSET);
  ex->backing_len = be32_get (buf + HDR_BACKING_SIZE);
  if (ex->backing_offset &&
      (ex->backing_len > QCOW2_MAX_BACKING_NAME ||
       ex->backing_len > ext_end || ex->backing_offset > ext_end - ex->backing_len)) {
    q2_error ("%s: the backing file name at offset 0x%" PRIx64 " (%u bytes) is "
              "invalid", img->name, ex->backing_offset, ex->backing_len);
    return -EINVAL;
  }
  return parse_tables (img, buf, file_size);
}

int header_write_reftable (struct q2_image *img, uint64_t offset, uint32_t clusters)
{
  uint8_t b[12];

  be64_put (b, offset);
  be32_put (b + 8, clusters);
  return host_pwrite (&img->hf, b, sizeof b, HDR_REFTABLE_OFFSET);
}

/* Autoclear features we do not maintain (bitmaps) must be switched off
 * before we change the image, so QEMU will not trust stale bitmaps.
 */
int header_clear_autoclear (struct q2_image *img)
{
  uint8_t b[8] = { 0 };
  int r;

  if (img->version < 3 || img->autoclear == 0)
    return 0;
  r = host_pwrite (&img->hf, b, sizeof b, HDR_AUTOCLEAR);
  if (r == 0)
    r = host_sync (&img->hf);
  if (r < 0) {
    q2_error ("%s: cannot clear the autoclear feature bits: %s", img->name, strerror (-r));
    return r;
  }
  q2_notice ("%s: cleared autoclear feature bits 0x%" PRIx64
             " (persistent bitmaps are no longer valid after writes)",
             img->name, img->autoclear);
  img->autoclear = 0;
  return 0;
}
