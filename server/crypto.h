/* SPDX-License-Identifier: BSD-3-Clause */
/* LUKS encryption of guest data (qcow2 crypt_method 2): the LUKS1 header
 * the image holds, a key slot unlocked with the passphrase, and AES-XTS
 * of the data sectors (DESIGN.md, "Encryption").
 *
 * Data is encrypted in 512-byte sectors; a sector's tweak is its *host*
 * offset / 512 (plain64), so a cluster that moves must be decrypted at the
 * old offset and encrypted at the new.  Metadata is never encrypted, and
 * holes are not a ciphertext of zeros: callers never leave a hole where
 * data is still named.
 *
 * The master key lives only in the key schedules of one allocation kept
 * out of core dumps, wiped when it is freed; the passphrase, the keys
 * derived from it and the merged key material are wiped as soon as they
 * are used.
 */
#ifndef Q2_CRYPTO_H
#define Q2_CRYPTO_H

#include <stddef.h>
#include <stdint.h>

struct hostfile;
struct crypto;

#define CRYPTO_SECTOR 512u

/* Reads the LUKS header at [offset, offset + length) of hf and unlocks it
 * with the passphrase (len bytes).  A header that cannot be served is
 * -ENOTSUP or -EINVAL, a passphrase no key slot accepts -EACCES, each
 * said in one sentence naming the image (name).
 */
int crypto_open (struct crypto **cp, struct hostfile *hf, const char *name,
                 uint64_t offset, uint64_t length, const char *passphrase, size_t len);
/* Wipes the keys and frees; NULL is fine. */
void crypto_free (struct crypto *c);

/* In place, len a multiple of CRYPTO_SECTOR, host (the sectors' place in
 * the file) a multiple of it too.
 */
void crypto_encrypt (const struct crypto *c, uint64_t host, void *buf, size_t len);
void crypto_decrypt (const struct crypto *c, uint64_t host, void *buf, size_t len);

/* host_pread and host_pwrite of guest data at host offset host, through
 * the cipher when c is not NULL.  Any alignment: a write that covers part
 * of a sector reads, decrypts and rewrites the rest of it (the caller
 * holds the guest range, so no other write shares the sector).
 */
int crypto_pread (const struct crypto *c, struct hostfile *hf, void *buf, size_t len,
                  uint64_t host);
int crypto_pwrite (const struct crypto *c, struct hostfile *hf, const void *buf,
                   size_t len, uint64_t host);

#endif
