/* SPDX-License-Identifier: BSD-3-Clause */
/* QEMU's file-posix locks one byte per permission: 100 + bit for the
 * permissions a user holds, 200 + bit for those it does not share.  A
 * conflicting program is found with F_OFD_GETLK before anything is taken,
 * so the message can say which permission collides.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "host.h"
#include "hostlock.h"
#include "log.h"

#define LOCK_PERM_BASE   100
#define LOCK_SHARED_BASE 200
enum { PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE, NPERMS };
static const char *const perm_names[NPERMS] = {
  "consistent read", "write", "write unchanged", "resize",
};

static int ofd_lock (int fd, off_t byte, short type, int cmd)
{
  struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1 };

  if (fcntl (fd, cmd, &fl) == -1)
    return -errno;
  return cmd == F_OFD_GETLK && fl.l_type != F_UNLCK ? -EAGAIN : 0;
}

int hostlock_take (struct hostfile *hf, bool writable)
{
  unsigned held = 1u << PERM_CONSISTENT_READ;
  unsigned unshared = 1u << PERM_WRITE | 1u << PERM_RESIZE;
  int i, r;

  if (writable)
    held |= 1u << PERM_WRITE | 1u << PERM_WRITE_UNCHANGED | 1u << PERM_RESIZE;

  for (i = 0; i < NPERMS; i++) {
    const char *what = NULL;
    if ((held & (1u << i)) &&
        ofd_lock (hf->fd, LOCK_SHARED_BASE + i, F_WRLCK, F_OFD_GETLK) == -EAGAIN)
      what = "another program does not share";
    else if ((unshared & (1u << i)) &&
             ofd_lock (hf->fd, LOCK_PERM_BASE + i, F_WRLCK, F_OFD_GETLK) == -EAGAIN)
      what = "another program holds";
    if (what) {
      log_error ("%s: failed to get \"%s\" lock: %s that permission; is another "
                 "process (qemu, qemu-nbd, nbdkit) using the image?",
                 hf->name, perm_names[i], what);
      return -EAGAIN;
    }
  }
  for (i = 0; i < NPERMS; i++) {
    r = 0;
    if (held & (1u << i))
      r = ofd_lock (hf->fd, LOCK_PERM_BASE + i, F_RDLCK, F_OFD_SETLK);
    if (r == 0 && (unshared & (1u << i)))
      r = ofd_lock (hf->fd, LOCK_SHARED_BASE + i, F_RDLCK, F_OFD_SETLK);
    if (r == -EAGAIN || r == -EACCES) {
      log_error ("%s: failed to get \"%s\" lock: the image is in use by another process",
                 hf->name, perm_names[i]);
      return -EAGAIN;
    }
    if (r == -EINVAL || r == -ENOTSUP || r == -ENOLCK) {
      log_notice ("%s: the filesystem does not support OFD locks; "
                  "nothing stops another program from opening the image", hf->name);
      return 0;
    }
    if (r < 0)
      return r;
  }
  return 0;
}
