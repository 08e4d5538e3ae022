#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "lock.h"
#include "log.h"

void range_lock_init (struct range_lock *rl)
{
  pthread_mutex_init (&rl->mutex, NULL);
  pthread_cond_init (&rl->cond, NULL);
  rl->held = NULL;
}

void range_lock_destroy (struct range_lock *rl)
{
  pthread_cond_destroy (&rl->cond);
  pthread_mutex_destroy (&rl->mutex);
}

static bool conflicts (const struct range_lock *rl, uint64_t first,
                       uint64_t last, bool exclusive)
{
  const struct range_held *h;

  for (h = rl->held; h; h = h->next)
    if (h->first <= last && first <= h->last && (exclusive || h->exclusive))
      return true;
  return false;
}

void range_lock (struct range_lock *rl, struct range_held *h,
                 uint64_t first, uint64_t last, bool exclusive)
{
  pthread_mutex_lock (&rl->mutex);
  while (conflicts (rl, first, last, exclusive))
    pthread_cond_wait (&rl->cond, &rl->mutex);
  h->first = first;
  h->last = last;
  h->exclusive = exclusive;
  h->next = rl->held;
  rl->held = h;
  pthread_mutex_unlock (&rl->mutex);
}

void range_unlock (struct range_lock *rl, struct range_held *h)
{
  struct range_held **pp;

  pthread_mutex_lock (&rl->mutex);
  for (pp = &rl->held; *pp != h; pp = &(*pp)->next)
    ;
  *pp = h->next;
  pthread_cond_broadcast (&rl->cond);
  pthread_mutex_unlock (&rl->mutex);
}

/* QEMU's file-posix locks one byte per permission: 100 + bit for the
 * permissions a user holds, 200 + bit for those it does not share.
 */
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

int image_lock (int fd, const char *name, bool writable)
{
  unsigned held = 1u << PERM_CONSISTENT_READ;
  unsigned unshared = 1u << PERM_WRITE | 1u << PERM_RESIZE;
  int i, r;

  if (writable)
    held |= 1u << PERM_WRITE | 1u << PERM_WRITE_UNCHANGED | 1u << PERM_RESIZE;

  for (i = 0; i < NPERMS; i++) {
    const char *what = NULL;
    if ((held & (1u << i)) &&
        ofd_lock (fd, LOCK_SHARED_BASE + i, F_WRLCK, F_OFD_GETLK) == -EAGAIN)
      what = "another program does not share";
    else if ((unshared & (1u << i)) &&
             ofd_lock (fd, LOCK_PERM_BASE + i, F_WRLCK, F_OFD_GETLK) == -EAGAIN)
      what = "another program holds";
    if (what) {
      q2_error ("%s: failed to get \"%s\" lock: %s that permission; is another "
                "process (qemu, qemu-nbd, nbdkit) using the image?",
                name, perm_names[i], what);
      return -EAGAIN;
    }
  }
  for (i = 0; i < NPERMS; i++) {
    r = 0;
    if (held & (1u << i))
      r = ofd_lock (fd, LOCK_PERM_BASE + i, F_RDLCK, F_OFD_SETLK);
    if (r == 0 && (unshared & (1u << i)))
      r = ofd_lock (fd, LOCK_SHARED_BASE + i, F_RDLCK, F_OFD_SETLK);
    if (r == -EAGAIN || r == -EACCES) {
      q2_error ("%s: failed to get \"%s\" lock: the image is in use by another process",
                name, perm_names[i]);
      return -EAGAIN;
    }
    if (r == -EINVAL || r == -ENOTSUP || r == -ENOLCK) {
      q2_notice ("%s: the filesystem does not support OFD locks; "
                 "nothing stops another program from opening the image", name);
      return 0;
    }
    if (r < 0)
      return r;
  }
  return 0;
}
