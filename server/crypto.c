/* SPDX-License-Identifier: BSD-3-Clause */
/* The LUKS1 header (the cryptsetup project's "LUKS1 On-Disk Format
 * Specification"): a 592-byte header naming the cipher, the hash, the
 * master key's size and a digest of it, and eight key slots.  An active
 * slot holds the master key split into stripes (the anti-forensic
 * splitter) and encrypted with a key PBKDF2 derives from a passphrase.
 * Unlocking: derive the slot key, decrypt the stripes, merge them, and
 * accept the result only if its PBKDF2 digest is the header's.
 *
 * Only what qemu-img creates is served: AES in XTS mode with plain64
 * tweaks (aes-128 or aes-256, 32- or 64-byte keys), and sha1, sha256 or
 * sha512 as the hash.  Every cipher and hash is nettle's.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <nettle/memops.h>
#include <nettle/nettle-meta.h>
#include <nettle/pbkdf2.h>
#include <nettle/sha1.h>
#include <nettle/sha2.h>
#include <nettle/xts.h>

#include "qcow2-format.h"
#include "cleanup.h"
#include "crypto.h"
#include "host.h"
#include "log.h"

/* The header's fields (big-endian), and those of a key slot. */
#define LUKS_PHDR_LEN 592
#define PH_VERSION 6
#define PH_CIPHER 8
#define PH_MODE 40
#define PH_HASH 72
#define PH_KEY_BYTES 108
#define PH_MK_DIGEST 112
#define PH_MK_SALT 132
#define PH_MK_ITER 164
#define PH_SLOTS 208
#define NAME_LEN 32
#define DIGEST_LEN 20
#define SALT_LEN 32
#define SLOTS 8
#define SLOT_LEN 48
#define SL_ITER 4
#define SL_SALT 8
#define SL_OFFSET 40
#define SL_STRIPES 44
#define SLOT_ACTIVE 0x00ac71f3u
/* cryptsetup and QEMU write 4000; the bound keeps a bad header from
 * asking for gigabytes.
 */
#define MAX_STRIPES 65536u

static const uint8_t luks_magic[6] = { 'L', 'U', 'K', 'S', 0xba, 0xbe };

typedef void pbkdf2_fn (size_t key_length, const uint8_t *key, unsigned iterations,
                        size_t salt_length, const uint8_t *salt,
                        size_t length, uint8_t *dst);

struct luks_hash {
  const char *name;
  const struct nettle_hash *hash;
  pbkdf2_fn *pbkdf2;
};

static const struct luks_hash hashes[] = {
  { "sha1", &nettle_sha1, pbkdf2_hmac_sha1 },
  { "sha256", &nettle_sha256, pbkdf2_hmac_sha256 },
  { "sha512", &nettle_sha512, pbkdf2_hmac_sha512 },
};

/* One allocation of its own (pages kept out of core dumps, and locked in
 * memory where the limits allow), so that no copy of the key schedules
 * is left in the heap.
 */
struct crypto {
  size_t key_bytes;           /* 32: AES-128-XTS, 64: AES-256-XTS */
  union {
    struct xts_aes128_key k128;
    struct xts_aes256_key k256;
  } enc, dec;
};

/* What the header says, checked. */
struct luks_header {
  const struct luks_hash *hash;
  uint32_t key_bytes;
  uint8_t mk_digest[DIGEST_LEN], mk_salt[SALT_LEN];
  uint32_t mk_iter;
};

static struct crypto *key_alloc (void)
{
  void *p = mmap (NULL, sizeof (struct crypto), PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

  if (p == MAP_FAILED)
    return NULL;
  madvise (p, sizeof (struct crypto), MADV_DONTDUMP);
  mlock (p, sizeof (struct crypto));      /* best effort: RLIMIT_MEMLOCK */
  return p;
}

void crypto_free (struct crypto *c)
{
  if (!c)
    return;
  explicit_bzero (c, sizeof *c);
  munlock (c, sizeof *c);
  munmap (c, sizeof *c);
}

static void key_set (struct crypto *c, const uint8_t *key, size_t len)
{
  c->key_bytes = len;
  if (len == 32) {
    xts_aes128_set_encrypt_key (&c->enc.k128, key);
    xts_aes128_set_decrypt_key (&c->dec.k128, key);
  }
  else {
    xts_aes256_set_encrypt_key (&c->enc.k256, key);
    xts_aes256_set_decrypt_key (&c->dec.k256, key);
  }
}

/* plain64: the sector number, little-endian, in a 16-byte tweak. */
static void tweak_of (uint64_t sector, uint8_t t[16])
{
  int i;

  memset (t, 0, 16);
  for (i = 0; i < 8; i++)
    t[i] = (uint8_t) (sector >> (8 * i));
}

/* nettle's functions take the key without const, but only read it. */
static void xts_sectors (const struct crypto *c, uint64_t sector, uint8_t *buf,
                         size_t len, bool encrypt)
{
  struct crypto *k = (struct crypto *) c;
  uint8_t t[16];
  size_t off;

  for (off = 0; off < len; off += CRYPTO_SECTOR, sector++) {
    tweak_of (sector, t);
    if (c->key_bytes == 32 && encrypt)
      xts_aes128_encrypt_message (&k->enc.k128, t, CRYPTO_SECTOR, buf + off, buf + off);
    else if (c->key_bytes == 32)
      xts_aes128_decrypt_message (&k->dec.k128, t, CRYPTO_SECTOR, buf + off, buf + off);
    else if (encrypt)
      xts_aes256_encrypt_message (&k->enc.k256, t, CRYPTO_SECTOR, buf + off, buf + off);
    else
      xts_aes256_decrypt_message (&k->dec.k256, t, CRYPTO_SECTOR, buf + off, buf + off);
  }
}

void crypto_encrypt (const struct crypto *c, uint64_t host, void *buf, size_t len)
{
  xts_sectors (c, host / CRYPTO_SECTOR, buf, len, true);
}

void crypto_decrypt (const struct crypto *c, uint64_t host, void *buf, size_t len)
{
  xts_sectors (c, host / CRYPTO_SECTOR, buf, len, false);
}

/* A NUL-padded name field, as a string. */
static void field_name (const uint8_t *f, char out[NAME_LEN + 1])
{
  memcpy (out, f, NAME_LEN);
  out[NAME_LEN] = '\0';
}

static int parse_header (const uint8_t *ph, const char *name, struct luks_header *h)
{
  char cipher[NAME_LEN + 1], mode[NAME_LEN + 1], hash[NAME_LEN + 1];
  size_t i;

  if (memcmp (ph, luks_magic, sizeof luks_magic) != 0) {
    log_error ("%s: the encryption header is not a LUKS1 header (no LUKS magic)", name);
    return -EINVAL;
  }
  if (be16_get (ph + PH_VERSION) != 1) {
    log_error ("%s: the encryption header is LUKS version %u; only LUKS1 (what QEMU "
               "writes into qcow2 images) is supported", name, be16_get (ph + PH_VERSION));
    return -ENOTSUP;
  }
  field_name (ph + PH_CIPHER, cipher);
  field_name (ph + PH_MODE, mode);
  field_name (ph + PH_HASH, hash);
  h->key_bytes = be32_get (ph + PH_KEY_BYTES);
  if (strcmp (cipher, "aes") != 0 || strcmp (mode, "xts-plain64") != 0 ||
      (h->key_bytes != 32 && h->key_bytes != 64)) {
    log_error ("%s: the image is encrypted with %s-%s and a %u-byte key; only "
               "aes-xts-plain64 with 32- or 64-byte keys (aes-128 or aes-256, as "
               "qemu-img creates) is supported", name, cipher, mode, h->key_bytes);
    return -ENOTSUP;
  }
  h->hash = NULL;
  for (i = 0; i < sizeof hashes / sizeof *hashes; i++)
    if (strcmp (hash, hashes[i].name) == 0)
      h->hash = &hashes[i];
  if (!h->hash) {
    log_error ("%s: the encryption header uses the hash %s; only sha1, sha256 and "
               "sha512 are supported", name, hash);
    return -ENOTSUP;
  }
  memcpy (h->mk_digest, ph + PH_MK_DIGEST, DIGEST_LEN);
  memcpy (h->mk_salt, ph + PH_MK_SALT, SALT_LEN);
  h->mk_iter = be32_get (ph + PH_MK_ITER);
  if (h->mk_iter == 0) {
    log_error ("%s: the encryption header's master key digest has 0 iterations", name);
    return -EINVAL;
  }
  return 0;
}

/* The splitter's diffusion: each digest-sized piece i of buf becomes
 * H(be32 (i) || piece), the last, shorter one truncated.
 */
static void af_diffuse (const struct nettle_hash *h, uint8_t *buf, size_t len)
{
  union {
    struct sha1_ctx s1;
    struct sha256_ctx s256;
    struct sha512_ctx s512;
  } ctx;
  uint8_t d[SHA512_DIGEST_SIZE], iv[4];
  size_t off, n;
  uint32_t i;

  for (i = 0, off = 0; off < len; i++, off += n) {
    n = len - off < h->digest_size ? len - off : h->digest_size;
    be32_put (iv, i);
    h->init (&ctx);
    h->update (&ctx, sizeof iv, iv);
    h->update (&ctx, n, buf + off);
    h->digest (&ctx, h->digest_size, d);
    memcpy (buf + off, d, n);
  }
  explicit_bzero (&ctx, sizeof ctx);
  explicit_bzero (d, sizeof d);
}

/* stripes pieces of len bytes in split; the key they merge to in key. */
static void af_merge (const struct nettle_hash *h, const uint8_t *split, uint32_t stripes,
                      size_t len, uint8_t *key)
{
  uint32_t i;

  memset (key, 0, len);
  for (i = 0; i + 1 < stripes; i++) {
    memxor (key, split + (size_t) i * len, len);
    af_diffuse (h, key, len);
  }
  memxor (key, split + (size_t) (stripes - 1) * len, len);
}

/* Where slot s keeps its stripes, checked against the header's area. */
static int slot_material (const uint8_t *slot, const struct luks_header *h, uint64_t length,
                          const char *name, int s, uint64_t *off, size_t *bytes)
{
  uint32_t stripes = be32_get (slot + SL_STRIPES);
  uint64_t n = (uint64_t) h->key_bytes * stripes;

  *off = (uint64_t) be32_get (slot + SL_OFFSET) * CRYPTO_SECTOR;
  *bytes = (n + CRYPTO_SECTOR - 1) / CRYPTO_SECTOR * CRYPTO_SECTOR;
  if (stripes == 0 || stripes > MAX_STRIPES || be32_get (slot + SL_ITER) == 0 ||
      *off < LUKS_PHDR_LEN || *off > length || *bytes > length - *off) {
    log_error ("%s: key slot %d of the encryption header is invalid (%u stripes at "
               "offset %" PRIu64 ", %u iterations)", name, s, stripes, *off,
               be32_get (slot + SL_ITER));
    return -EINVAL;
  }
  return 0;
}

/* Tries one active slot: 1 and the master key in mk when the passphrase
 * opens it, 0 when not.
 */
static int try_slot (struct hostfile *hf, const uint8_t *slot, const struct luks_header *h,
                     uint64_t offset, uint64_t length, const char *name, int s,
                     const char *pass, size_t passlen, uint8_t *mk)
{
  uint8_t slot_key[64], digest[DIGEST_LEN];
  struct crypto *sk;
  uint64_t off;
  size_t bytes;
  int r;

  if ((r = slot_material (slot, h, length, name, s, &off, &bytes)) < 0)
    return r;
  CLEANUP_FREE uint8_t *split = malloc (bytes);
  if (!split || !(sk = key_alloc ()))
    return -ENOMEM;
  if ((r = host_pread (hf, split, bytes, offset + off)) < 0) {
    log_error ("%s: cannot read key slot %d of the encryption header: %s", name, s,
               strerror (-r));
    crypto_free (sk);
    return r;
  }
  h->hash->pbkdf2 (passlen, (const uint8_t *) pass, be32_get (slot + SL_ITER),
                   SALT_LEN, slot + SL_SALT, h->key_bytes, slot_key);
  key_set (sk, slot_key, h->key_bytes);
  explicit_bzero (slot_key, sizeof slot_key);
  /* The stripes are encrypted as sectors numbered from 0. */
  crypto_decrypt (sk, 0, split, bytes);
  crypto_free (sk);
  af_merge (h->hash->hash, split, be32_get (slot + SL_STRIPES), h->key_bytes, mk);
  explicit_bzero (split, bytes);
  h->hash->pbkdf2 (h->key_bytes, mk, h->mk_iter, SALT_LEN, h->mk_salt,
                   DIGEST_LEN, digest);
  r = memeql_sec (digest, h->mk_digest, DIGEST_LEN);
  explicit_bzero (digest, sizeof digest);
  if (!r)
    explicit_bzero (mk, h->key_bytes);
  return r;
}

static int unlock (struct hostfile *hf, const uint8_t *ph, const struct luks_header *h,
                   uint64_t offset, uint64_t length, const char *name,
                   const char *pass, size_t passlen, uint8_t *mk)
{
  int s, r, active = 0;

  for (s = 0; s < SLOTS; s++) {
    const uint8_t *slot = ph + PH_SLOTS + s * SLOT_LEN;
    if (be32_get (slot) != SLOT_ACTIVE)
      continue;
    active++;
    if ((r = try_slot (hf, slot, h, offset, length, name, s, pass, passlen, mk)) != 0)
      return r;
  }
  if (!active)
    log_error ("%s: the encryption header has no active key slot", name);
  else
    log_error ("%s: no key slot accepts the passphrase", name);
  return active ? -EACCES : -EINVAL;
}

int crypto_open (struct crypto **cp, struct hostfile *hf, const char *name,
                 uint64_t offset, uint64_t length, const char *pass, size_t passlen)
{
  uint8_t ph[LUKS_PHDR_LEN], mk[64];
  struct luks_header h;
  struct crypto *c;
  int r;

  *cp = NULL;
  if (length < LUKS_PHDR_LEN) {
    log_error ("%s: the encryption header (%" PRIu64 " bytes) is too short for a LUKS "
               "header", name, length);
    return -EINVAL;
  }
  if ((r = host_pread (hf, ph, sizeof ph, offset)) < 0) {
    log_error ("%s: cannot read the encryption header: %s", name, strerror (-r));
    return r;
  }
  if ((r = parse_header (ph, name, &h)) < 0)
    return r;
  r = unlock (hf, ph, &h, offset, length, name, pass, passlen, mk);
  if (r == 1 && !(c = key_alloc ()))
    r = -ENOMEM;
  if (r == 1) {
    key_set (c, mk, h.key_bytes);
    *cp = c;
    r = 0;
  }
  explicit_bzero (mk, sizeof mk);
  return r;
}

/* The sectors [first, first + len) of a write, in buf: those the write
 * covers only in part get the rest of their old contents.
 */
static int fill_edges (const struct crypto *c, struct hostfile *hf, uint8_t *buf,
                       size_t len, uint64_t first, uint64_t host, size_t n)
{
  uint64_t last = first + len - CRYPTO_SECTOR;
  int r;

  if (host > first && (r = crypto_pread (c, hf, buf, CRYPTO_SECTOR, first)) < 0)
    return r;
  if ((host + n) % CRYPTO_SECTOR && (last > first || host == first) &&
      (r = crypto_pread (c, hf, buf + len - CRYPTO_SECTOR, CRYPTO_SECTOR, last)) < 0)
    return r;
  return 0;
}

int crypto_pread (const struct crypto *c, struct hostfile *hf, void *buf, size_t len,
                  uint64_t host)
{
  uint64_t first = host & ~(uint64_t) (CRYPTO_SECTOR - 1);
  size_t n = (host + len - first + CRYPTO_SECTOR - 1) & ~(size_t) (CRYPTO_SECTOR - 1);
  int r;

  if (!c)
    return host_pread (hf, buf, len, host);
  if (first == host && n == len) {
    if ((r = host_pread (hf, buf, len, host)) == 0)
      crypto_decrypt (c, host, buf, len);
    return r;
  }
  CLEANUP_FREE uint8_t *b = malloc (n);
  if (!b)
    return -ENOMEM;
  if ((r = host_pread (hf, b, n, first)) < 0)
    return r;
  crypto_decrypt (c, first, b, n);
  memcpy (buf, b + (host - first), len);
  return 0;
}

/* Encrypted a piece at a time, so that a large write needs no buffer of
 * its size.
 */
#define WRITE_CHUNK (256u << 10)

int crypto_pwrite (const struct crypto *c, struct hostfile *hf, const void *buf,
                   size_t len, uint64_t host)
{
  const uint8_t *src = buf;
  size_t cap = len < WRITE_CHUNK ? len + CRYPTO_SECTOR : WRITE_CHUNK;
  int r = 0;

  if (!c)
    return host_pwrite (hf, buf, len, host);
  /* A small write gets a small buffer (one of WRITE_CHUNK would be an
   * mmap and munmap for every 4 KiB write), room for its offset in its
   * first sector included, so that each turn writes something.
   */
  CLEANUP_FREE uint8_t *b = malloc (cap + 2 * CRYPTO_SECTOR);
  if (!b)
    return -ENOMEM;
  while (len > 0 && r == 0) {
    uint64_t first = host & ~(uint64_t) (CRYPTO_SECTOR - 1);
    size_t n = cap - (host - first) < len ? cap - (host - first) : len;
    size_t span = (host + n - first + CRYPTO_SECTOR - 1) & ~(size_t) (CRYPTO_SECTOR - 1);
    if ((r = fill_edges (c, hf, b, span, first, host, n)) < 0)
      break;
    memcpy (b + (host - first), src, n);
    crypto_encrypt (c, first, b, span);
    r = host_pwrite (hf, b, span, first);
    src += n;
    host += n;
    len -= n;
  }
  return r;
}
