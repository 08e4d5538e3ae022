/* SPDX-License-Identifier: BSD-3-Clause */
/* The LUKS layer against images qemu-img and qemu-io make and read: a key
 * slot opens with the right passphrase only, data qemu-io wrote decrypts
 * (with the tweak of its host offset), and what crypto_pwrite writes, at
 * any alignment and across its chunks, qemu-io reads back.  Three
 * ciphers and hashes: qemu-img's default (aes-256, sha256, its default
 * iteration counts), aes-128 with sha1, aes-256 with sha512.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "qcow2-format.h"
#include "crypto.h"
#include "header.h"
#include "host.h"
#include "layout.h"
#include "unit.h"

#define SECRET "--object secret,id=s0,data=abc"
#define OPTS "--image-opts driver=qcow2,file.filename=%s,encrypt.key-secret=s0"

static int run_cmd (const char *fmt, const char *a, const char *b)
{
  char cmd[1024];

  snprintf (cmd, sizeof cmd, fmt, a, b);
  return system (cmd);
}

/* Where guest offset 0 lies (qemu-img map hides the offsets of an
 * encrypted image): L1 entry 0, then L2 entry 0.
 */
static uint64_t host_of_zero (struct hostfile *hf, const struct layout *lay)
{
  uint8_t e[8];
  uint64_t off;

  CHECK (host_pread (hf, e, 8, lay->l1_offset) == 0);
  off = be64_get (e) & L1E_OFFSET_MASK;
  CHECK (off && host_pread (hf, e, 8, off) == 0);
  off = be64_get (e) & L2E_OFFSET_MASK;
  CHECK (off != 0 && off % lay->cluster_size == 0);
  return off;
}

/* qemu-io reads the guest bytes [0, 300) as 0x5a, [300, 1300) as 0xa5 and
 * [1300, 4097) as 0x5a (one run: each unlocks the image again).
 */
static bool qemu_reads_back (const char *path)
{
  char cmd[1024];

  snprintf (cmd, sizeof cmd, "out=$(qemu-io " SECRET " -c 'read -P 0x5a 0 300' "
            "-c 'read -P 0xa5 300 1000' -c 'read -P 0x5a 1300 2797' " OPTS " 2>&1); "
            "case $out in *Pattern*) exit 1;; esac; "
            "n=$(printf '%%s\n' \"$out\" | grep -c -e 'read 300/300 ' -e 'read 1000/1000 ' "
            "-e 'read 2797/2797 '); test \"$n\" = 3", path);
  return system (cmd) == 0;
}

/* Small writes at every position in a sector (a write as long as its
 * offset in its sector once looped for ever), against a model of the
 * cluster's plaintext (the write across the chunks below goes over them).
 */
static void small_writes (struct crypto *c, struct hostfile *hf, uint64_t host)
{
  static const size_t offs[] = { 0, 1, 300, 511, 512, 700, 4095 };
  static const size_t lens[] = { 1, 212, 300, 511, 512, 513, 1000 };
  static uint8_t model[65536], got[65536], data[1000];
  size_t i, j;

  CHECK (crypto_pread (c, hf, model, sizeof model, host) == 0);
  for (i = 0; i < sizeof offs / sizeof *offs; i++)
    for (j = 0; j < sizeof lens / sizeof *lens; j++) {
      uint64_t at = 8192 + offs[i];
      memset (data, (int) (i * 16 + j + 1), lens[j]);
      CHECK (crypto_pwrite (c, hf, data, lens[j], host + at) == 0);
      memcpy (model + at, data, lens[j]);
      CHECK (crypto_pread (c, hf, got, sizeof got, host) == 0);
      CHECK (memcmp (got, model, sizeof got) == 0);
    }
}

static void check_image (const char *dir, const char *name, const char *create_opts)
{
  char path[512];
  struct hostfile hf = { 0 };
  struct layout lay = { 0 };
  struct header_extras ex;
  struct crypto *c;
  static uint8_t hdr[65536], buf[400000], raw[4096];
  uint64_t size, host;
  size_t i;

  snprintf (path, sizeof path, "%s/%s.qcow2", dir, name);
  /* QEMU's PBKDF calibration can fail on a loaded machine: one more try. */
  if (run_cmd ("qemu-img create -q -f qcow2 " SECRET " -o encrypt.format=luks,"
               "encrypt.key-secret=s0%s %s 1M", create_opts, path) != 0)
    CHECK (run_cmd ("qemu-img create -q -f qcow2 " SECRET " -o encrypt.format=luks,"
                    "encrypt.key-secret=s0%s %s 1M", create_opts, path) == 0);
  CHECK (run_cmd ("qemu-io " SECRET " -c 'write -q -P 0x5a 0 64k' " OPTS "%s", path, "") == 0);

  CHECK (host_open (&hf, path, false) == 0);
  lay.name = hf.name;
  CHECK (host_size (&hf, &size) == 0);
  lay.file_end = size;
  CHECK (host_pread (&hf, hdr, sizeof hdr, 0) == 0);
  CHECK (header_parse (&lay, hdr, sizeof hdr, size, true, &ex) == 0);
  CHECK (lay.crypt_method == CRYPT_LUKS && lay.crypto_offset && lay.crypto_length);

  CHECK (crypto_open (&c, &hf, name, lay.crypto_offset, lay.crypto_length, "abd", 3)
         == -EACCES && !c);
  CHECK (crypto_open (&c, &hf, name, lay.crypto_offset, lay.crypto_length, "abc", 3) == 0);

  /* What qemu-io wrote, aligned or not. */
  host = host_of_zero (&hf, &lay);
  CHECK (crypto_pread (c, &hf, buf, 65536, host) == 0);
  for (i = 0; i < 65536; i++)
    CHECK (buf[i] == 0x5a);
  CHECK (crypto_pread (c, &hf, buf, 1000, host + 77) == 0);
  for (i = 0; i < 1000; i++)
    CHECK (buf[i] == 0x5a);

  /* The tweak is the host offset / 512: encrypting the plaintext there
   * gives the file's bytes, one sector further it does not.
   */
  CHECK (host_pread (&hf, raw, sizeof raw, host) == 0);
  memset (buf, 0x5a, sizeof raw);
  crypto_encrypt (c, host, buf, sizeof raw);
  CHECK (memcmp (buf, raw, sizeof raw) == 0);
  memset (buf, 0x5a, sizeof raw);
  crypto_encrypt (c, host + 512, buf, sizeof raw);
  CHECK (memcmp (buf, raw, 512) != 0);
  crypto_decrypt (c, host + 512, buf, sizeof raw);
  CHECK (buf[0] == 0x5a && buf[sizeof raw - 1] == 0x5a);

  small_writes (c, &hf, host);

  /* Part of two sectors, then a write across the chunks (the cluster is
   * 64 KiB: the rest goes past it, into space qemu-io does not read).
   */
  memset (buf, 0xa5, 1000);
  CHECK (crypto_pwrite (c, &hf, buf, 1000, host + 300) == 0);
  CHECK (crypto_pread (c, &hf, buf, 2048, host) == 0);
  for (i = 0; i < 2048; i++)
    CHECK (buf[i] == (i >= 300 && i < 1300 ? 0xa5 : 0x5a));
  for (i = 0; i < sizeof buf; i++)
    buf[i] = (uint8_t) (i * 7 + i / 511);
  CHECK (crypto_pwrite (c, &hf, buf, sizeof buf - 33, host + 4097) == 0);
  memset (buf, 0, sizeof buf);
  CHECK (crypto_pread (c, &hf, buf, sizeof buf - 33, host + 4097) == 0);
  for (i = 0; i < sizeof buf - 33; i++)
    CHECK (buf[i] == (uint8_t) (i * 7 + i / 511));
  CHECK (qemu_reads_back (path));

  crypto_free (c);
  host_close (&hf);
}

int main (void)
{
  char dir[] = "/tmp/test-crypto.XXXXXX", cmd[600];

  if (system ("qemu-img --version >/dev/null 2>&1 && qemu-io --version >/dev/null 2>&1")) {
    fprintf (stderr, "qemu-img or qemu-io is missing\n");
    return 77;
  }
  CHECK (mkdtemp (dir));
  check_image (dir, "default", "");
  check_image (dir, "aes128-sha1", ",encrypt.cipher-alg=aes-128,encrypt.hash-alg=sha1,"
               "encrypt.iter-time=100");
  check_image (dir, "sha512", ",encrypt.hash-alg=sha512,encrypt.iter-time=100");
  snprintf (cmd, sizeof cmd, "rm -rf %s", dir);
  CHECK (system (cmd) == 0);
  return 0;
}
