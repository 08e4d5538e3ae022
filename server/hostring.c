/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#ifdef HAVE_LIBURING
#include <liburing.h>
#endif

#include "hostring.h"
#include "log.h"

#ifdef HAVE_LIBURING

#define RING_DEPTH 64
#define RING_CANCEL_SECONDS 2
#define RING_SLOW_SECONDS 10

struct hostring {
  const char *name;
  /* lock guards ring and the stall pipe: one batch at a time.  usable is
   * read without it (atomic) to choose the path.
   */
  pthread_mutex_t lock;
  bool usable;
  struct io_uring ring;
  bool stall;
  int stall_pipe[2];
};

/* user_data of the ring's own requests, which are not the caller's writes. */
static const char cancel_tag, stall_tag;

struct hostring *hostring_new (const char *name)
{
  struct hostring *r = calloc (1, sizeof *r);
  const char *e;

  if (!r)
    return NULL;
  if (io_uring_queue_init (RING_DEPTH, &r->ring, 0) < 0) {
    log_debug ("%s: io_uring is not available, using plain system calls", name);
    free (r);
    return NULL;
  }
  r->name = name;
  pthread_mutex_init (&r->lock, NULL);
  r->usable = true;
  e = getenv ("QCOW2RECLAIM_RING_STALL");
  if (e && *e == '1' && pipe2 (r->stall_pipe, O_CLOEXEC) == 0)
    r->stall = true;
  return r;
}

void hostring_free (struct hostring *r)
{
  if (!r)
    return;
  io_uring_queue_exit (&r->ring);
  if (r->stall) {
    close (r->stall_pipe[0]);
    close (r->stall_pipe[1]);
  }
  pthread_mutex_destroy (&r->lock);
  free (r);
}

bool hostring_usable (const struct hostring *r)
{
  return r && __atomic_load_n (&r->usable, __ATOMIC_ACQUIRE);
}

static int pwrite_all (int fd, const char *p, size_t len, uint64_t offset)
{
  while (len > 0) {
    ssize_t n = pwrite (fd, p, len, offset);
    if (n == -1) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    p += n;
    len -= n;
    offset += n;
  }
  return 0;
}

/* Asks the kernel to drop the batch's writes that have not started: they
 * complete with -ECANCELED and are then written with plain system calls.
 * Writes under way are not affected.
 */
static void cancel_unstarted (struct hostring *r)
{
  struct io_uring_sqe *sqe = io_uring_get_sqe (&r->ring);

  if (!sqe)
    return;
  io_uring_prep_cancel (sqe, NULL, IORING_ASYNC_CANCEL_ANY);
  io_uring_sqe_set_data (sqe, (void *) &cancel_tag);
  io_uring_submit (&r->ring);
}

/* Waits for n write completions; short or cancelled ones are finished
 * with plain pwrite, so the caller sees all-or-error.
 */
static int reap (struct hostring *r, int fd, size_t n)
{
  size_t done = 0, redone = 0;
  unsigned idle = 0;
  int err = 0;

  while (done < n) {
    struct io_uring_cqe *cqe;
    /* Waits are bounded: writes the kernel has not started after a while
     * are taken back, and writes it holds for long are reported (their
     * buffers are the kernel's until they complete, so the wait goes on).
     */
    struct __kernel_timespec second = { .tv_sec = 1 };
    int rc = io_uring_wait_cqe_timeout (&r->ring, &cqe, &second);
    if (rc == -ETIME) {
      if (++idle == RING_CANCEL_SECONDS)
        cancel_unstarted (r);
      if (idle == RING_SLOW_SECONDS)
        log_notice ("%s: %zu of %zu host writes are still pending after %u s",
                    r->name, n - done, n, idle);
    }
    if (rc == -EINTR || rc == -ETIME)
      continue;
    if (rc < 0)
      return rc;
    const struct host_write *hw = io_uring_cqe_get_data (cqe);
    int res = cqe->res;
    io_uring_cqe_seen (&r->ring, cqe);
    if ((const void *) hw == &cancel_tag || (const void *) hw == &stall_tag)
      continue;
    done++;
    if (res == -ECANCELED) {
      redone++;
      res = 0;
    }
    if (res < 0 && !err)
      err = res;
    else if (res >= 0 && (size_t) res < hw->len && !err)
      err = pwrite_all (fd, (const char *) hw->buf + res, hw->len - res, hw->offset + res);
  }
  if (redone)
    log_notice ("%s: io_uring had not started %zu of %zu host writes after %u s; "
                "they were written with plain system calls", r->name, redone, n,
                RING_CANCEL_SECONDS);
  return err;
}

/* The test hook's stall: a read of an empty pipe that the batch's writes
 * are linked behind.  Returns the number of requests it queued.
 */
static size_t queue_stall (struct hostring *r)
{
  static char byte;
  struct io_uring_sqe *sqe;

  if (!r->stall || !(sqe = io_uring_get_sqe (&r->ring)))
    return 0;
  io_uring_prep_read (sqe, r->stall_pipe[0], &byte, 1, 0);
  io_uring_sqe_set_data (sqe, (void *) &stall_tag);
  sqe->flags |= IOSQE_IO_LINK;
  return 1;
}

/* One batch of up to RING_DEPTH - 1 writes.  The kernel may take fewer
 * requests than were queued (it stops at one it cannot start), so
 * submission repeats and only what it took is waited for.  If it takes
 * nothing more, the ring is given up.
 */
static int write_some (struct hostring *r, int fd, const struct host_write *w, size_t n)
{
  size_t i, extra = queue_stall (r), submitted = 0;
  int rc, err;

  for (i = 0; i < n; i++) {
    struct io_uring_sqe *sqe = io_uring_get_sqe (&r->ring);
    if (!sqe)
      break;
    io_uring_prep_write (sqe, fd, w[i].buf, w[i].len, w[i].offset);
    io_uring_sqe_set_data (sqe, (void *) &w[i]);
    if (extra && i + 1 < n)
      sqe->flags |= IOSQE_IO_LINK;
  }
  while (submitted < i + extra) {
    rc = io_uring_submit (&r->ring);
    if (rc <= 0)
      break;
    submitted += rc;
  }
  submitted = submitted > extra ? submitted - extra : 0;
  err = reap (r, fd, submitted);
  if (submitted < n) {
    log_debug ("%s: io_uring took %zu of %zu writes, using plain system calls",
               r->name, submitted, n);
    __atomic_store_n (&r->usable, false, __ATOMIC_RELEASE);
    return err ? err : -EAGAIN;
  }
  return err;
}

int hostring_write (struct hostring *r, int fd, const struct host_write *w, size_t n)
{
  size_t i;
  int rc;

  pthread_mutex_lock (&r->lock);
  rc = r->usable ? 0 : -EAGAIN;
  for (i = 0; i < n && rc == 0; i += RING_DEPTH - 1)
    rc = write_some (r, fd, &w[i], n - i < RING_DEPTH - 1 ? n - i : RING_DEPTH - 1);
  pthread_mutex_unlock (&r->lock);
  return rc;
}

#else /* !HAVE_LIBURING: the plain system calls are the only path */

struct hostring *hostring_new (const char *name)
{
  log_debug ("%s: built without io_uring, using plain system calls", name);
  return NULL;
}

void hostring_free (struct hostring *r)
{
  (void) r;
}

bool hostring_usable (const struct hostring *r)
{
  (void) r;
  return false;
}

int hostring_write (struct hostring *r, int fd, const struct host_write *w, size_t n)
{
  (void) r, (void) fd, (void) w, (void) n;
  return -EAGAIN;
}

#endif
