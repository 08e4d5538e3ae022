/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <linux/fs.h>

#include "host.h"
#include "hosttest.h"
#include "log.h"
#include "punchq.h"

/* 16,384 deferred punches: 512 KiB at most, and minutes of a guest's
 * fstrim before a TRIM has to punch at once.
 */
#define PUNCH_QUEUE_MAX 16384

static int device_open (struct hostfile *hf)
{
  struct stat st;

  if (fstat (hf->fd, &st) == -1)
    return -errno;
  if (!S_ISBLK (st.st_mode))
    return 0;
  if (ioctl (hf->fd, BLKGETSIZE64, &hf->device_size) == -1)
    return -errno;
  hf->device = true;
  hf->end = hf->device_size;
  return 0;
}

int host_open (struct hostfile *hf, const char *name, bool readonly)
{
  memset (hf, 0, sizeof *hf);
  punchq_init (&hf->pq, PUNCH_QUEUE_MAX);
  hf->live = true;
  hf->fd = -1;
  if (!(hf->name = strdup (name)))
    return -ENOMEM;
  hf->fd = open (name, (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  if (hf->fd == -1)
    return -errno;
  hf->test = hosttest_new (name, !readonly);
  return device_open (hf);
}

void host_close (struct hostfile *hf)
{
  if (!hf->live)
    return;
  hf->live = false;
  hostring_free (hf->ring);
  hf->ring = NULL;
  if (hf->fd >= 0)
    close (hf->fd);
  hf->fd = -1;
  hosttest_free (hf->test);
  hf->test = NULL;
  punchq_destroy (&hf->pq);
  free (hf->name);
  hf->name = NULL;
}

void host_start_ring (struct hostfile *hf)
{
  if (!hf->ring)
    hf->ring = hostring_new (hf->name);
}

/* A change has completed: only a sync that starts from now on covers it,
 * so it needs the next sync number.  Called after the change, never
 * before: a sync numbered earlier may already have begun.
 */
static void host_changed (struct hostfile *hf)
{
  uint64_t want = __atomic_load_n (&hf->sync_started, __ATOMIC_SEQ_CST) + 1;
  uint64_t need = __atomic_load_n (&hf->sync_needed, __ATOMIC_SEQ_CST);

  while (need < want &&
         !__atomic_compare_exchange_n (&hf->sync_needed, &need, want, false,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
    ;
}

/* A write past a device's image end moves the end, as it would lengthen
 * a file.
 */
static void raise_end (struct hostfile *hf, uint64_t end)
{
  uint64_t cur;

  if (!hf->device)
    return;
  cur = __atomic_load_n (&hf->end, __ATOMIC_SEQ_CST);
  while (cur < end &&
         !__atomic_compare_exchange_n (&hf->end, &cur, end, false,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
    ;
}

/* Test hooks: an injected fault, then the operation, then its record. */
#define FAULT(hf, op) do {                                      \
    int fault_ = (hf)->test ? hosttest_fault ((hf)->test, op) : 0; \
    if (fault_)                                                 \
      return fault_;                                            \
  } while (0)
#define RECORD(hf, op, data, off, len) do {                     \
    host_changed (hf);                                          \
    if ((hf)->test)                                             \
      hosttest_record ((hf)->test, op, data, off, len);         \
  } while (0)

static int settle (struct hostfile *hf, uint64_t offset, uint64_t len);
#define SETTLE(hf, offset, len) do {            \
    int settle_ = settle (hf, offset, len);     \
    if (settle_ < 0)                            \
      return settle_;                           \
  } while (0)

int host_pread (struct hostfile *hf, void *buf, size_t len, uint64_t offset)
{
  char *p = buf;

  SETTLE (hf, offset, len);
  FAULT (hf, HOP_READ);
  while (len > 0) {
    ssize_t r = pread (hf->fd, p, len, offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    if (r == 0) {
      memset (p, 0, len);
      return 0;
    }
    p += r;
    len -= r;
    offset += r;
  }
  return 0;
}

static int pwrite_all (struct hostfile *hf, const void *buf, size_t len, uint64_t offset)
{
  const char *p = buf;

  while (len > 0) {
    ssize_t r = pwrite (hf->fd, p, len, offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    p += r;
    len -= r;
    offset += r;
  }
  return 0;
}

int host_pwrite (struct hostfile *hf, const void *buf, size_t len, uint64_t offset)
{
  int r;

  SETTLE (hf, offset, len);
  FAULT (hf, HOP_WRITE);
  r = pwrite_all (hf, buf, len, offset);
  raise_end (hf, offset + len);
  if (r == 0)
    RECORD (hf, HOP_WRITE, buf, offset, len);
  else
    host_changed (hf);          /* part of it may be written */
  return r;
}

int host_pwrite_batch (struct hostfile *hf, const struct host_write *w, size_t n)
{
  size_t i;
  int r;

  for (i = 0; i < n; i++)
    SETTLE (hf, w[i].offset, w[i].len);
  /* The test hooks see each write, so they take the plain path. */
  if (hostring_usable (hf->ring) && n > 1 && !hf->test) {
    r = hostring_write (hf->ring, hf->fd, w, n);
    /* Even a failed batch may have written some: a sync must cover it. */
    for (i = 0; i < n; i++)
      raise_end (hf, w[i].offset + w[i].len);
    host_changed (hf);
    if (r != -EAGAIN)
      return r;
  }
  for (i = 0; i < n; i++) {
    r = host_pwrite (hf, w[i].buf, w[i].len, w[i].offset);
    if (r < 0)
      return r;
  }
  return 0;
}

static int punch_raw (struct hostfile *hf, uint64_t offset, uint64_t len)
{
  FAULT (hf, HOP_PUNCH);
  if (fallocate (hf->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 offset, len) == -1)
    return -errno;
  RECORD (hf, HOP_PUNCH, NULL, offset, len);
  return 0;
}

/* Bytes of [offset, offset + len) that hold data, for the count of what
 * went back to the host.  Plain lseek, outside the test hooks: counting is
 * not I/O a fault should hit.  A host that cannot tell counts it all.
 */
static uint64_t data_bytes (struct hostfile *hf, uint64_t offset, uint64_t len)
{
  uint64_t end = offset + len, n = 0;
  off_t d, h;

  if (offset > INT64_MAX || end > INT64_MAX)
    return len;
  while (offset < end) {
    if ((d = lseek (hf->fd, (off_t) offset, SEEK_DATA)) == (off_t) -1)
      return errno == ENXIO ? n : n + end - offset;
    if ((uint64_t) d >= end)
      break;
    if ((h = lseek (hf->fd, d, SEEK_HOLE)) == (off_t) -1 || h <= d)
      return n + end - d;
    h = (uint64_t) h < end ? h : (off_t) end;
    n += h - d;
    offset = h;
  }
  return n;
}

/* Punches a range so that it reads zeros, counting what went back.  A
 * host that cannot is said once, by the first thread to find out.
 */
static int punch_counted (struct hostfile *hf, uint64_t offset, uint64_t len)
{
  uint64_t data;
  int r;

  if (!host_can_punch (hf))
    return -EOPNOTSUPP;
  data = data_bytes (hf, offset, len);
  r = punch_raw (hf, offset, len);
  if (r == -EOPNOTSUPP) {
    if (!__atomic_exchange_n (&hf->punch_unsupported, true, __ATOMIC_ACQ_REL)) {
      if (hf->device)
        log_notice ("%s: the device cannot discard a range so that it reads as zeros "
                    "(fallocate PUNCH_HOLE); freed clusters are discarded instead "
                    "(BLKDISCARD), parts of clusters are not given back", hf->name);
      else
        log_notice ("%s: the host filesystem cannot punch holes; freed clusters are "
                    "reused, but their space does not go back to the host", hf->name);
    }
    return r;
  }
  if (r < 0)
    return r;
  __atomic_add_fetch (&hf->bytes_released, len, __ATOMIC_RELAXED);
  __atomic_add_fetch (&hf->bytes_given_back, data, __ATOMIC_RELAXED);
  return 0;
}

/* A device that cannot punch so that a range reads zeros (a thin LVM
 * volume has no write-zeroes) can still be told the range is unused,
 * which frees it as well; only for ranges whose contents no longer
 * matter, since what they read afterwards is the device's choice.
 */
static int discard_raw (struct hostfile *hf, uint64_t offset, uint64_t len)
{
  uint64_t range[2] = { offset, len };

  if (__atomic_load_n (&hf->discard_unsupported, __ATOMIC_ACQUIRE))
    return -EOPNOTSUPP;
  /* An injected fault stands for the device's answer. */
  int e = hf->test ? -hosttest_fault (hf->test, HOP_DISCARD) : 0;
  if (e == 0 && ioctl (hf->fd, BLKDISCARD, range) == -1)
    e = errno;
  if (e) {
    if (e == EOPNOTSUPP &&
        !__atomic_exchange_n (&hf->discard_unsupported, true, __ATOMIC_ACQ_REL))
      log_notice ("%s: the device cannot discard either (BLKDISCARD); freed clusters are "
                  "reused, but their space does not go back to the device", hf->name);
    return -e;
  }
  /* The I/O log replays it as a punch: zeros are one thing it may read. */
  RECORD (hf, HOP_PUNCH, NULL, offset, len);
  __atomic_add_fetch (&hf->bytes_released, len, __ATOMIC_RELAXED);
  __atomic_add_fetch (&hf->bytes_given_back, len, __ATOMIC_RELAXED);
  return 0;
}

/* may_discard: the range's contents no longer matter at all; else it is
 * still mapped (a deferred punch of part of a cluster), where only a
 * punch, which leaves zeros, is allowed.
 */
static void release_raw (struct hostfile *hf, uint64_t offset, uint64_t len, bool may_discard)
{
  int r;

  if (len == 0)
    return;
  r = punch_counted (hf, offset, len);
  if (r == -EOPNOTSUPP && hf->device && may_discard)
    r = discard_raw (hf, offset, len);
  if (r < 0 && r != -EOPNOTSUPP)
    log_error ("%s: cannot %s host range 0x%" PRIx64 "+%" PRIu64 ": %s", hf->name,
               host_can_punch (hf) ? "punch" : "discard", offset, len, strerror (-r));
}

/* Runs the deferred punches over a range before anything else touches
 * it (punchq.h): one atomic load when none is queued.
 */
static int settle (struct hostfile *hf, uint64_t offset, uint64_t len)
{
  struct punchq_items mine = { 0 };
  size_t i;
  int r;

  if (!punchq_live (&hf->pq))
    return 0;
  if ((r = punchq_claim_range (&hf->pq, offset, len, &mine)) < 0)
    return r;
  for (i = 0; i < mine.len; i++)
    release_raw (hf, mine.ptr[i].offset, mine.ptr[i].len, false);
  punchq_punched (&hf->pq, &mine);
  punchq_items_reset (&mine);
  return 0;
}

int host_punch (struct hostfile *hf, uint64_t offset, uint64_t len)
{
  SETTLE (hf, offset, len);
  return punch_raw (hf, offset, len);
}

void host_release (struct hostfile *hf, uint64_t offset, uint64_t len)
{
  if (len == 0)
    return;
  if (settle (hf, offset, len) < 0) {
    log_error ("%s: out of memory before punching host range 0x%" PRIx64 "+%" PRIu64,
               hf->name, offset, len);
    return;
  }
  release_raw (hf, offset, len, true);
}

int host_release_zeros (struct hostfile *hf, uint64_t offset, uint64_t len)
{
  int r;

  if (len == 0)
    return 0;
  SETTLE (hf, offset, len);
  r = punch_counted (hf, offset, len);
  if (r < 0 && r != -EOPNOTSUPP)
    log_error ("%s: cannot punch host range 0x%" PRIx64 "+%" PRIu64 ": %s", hf->name,
               offset, len, strerror (-r));
  return r;
}

void host_release_accept (struct hostfile *hf, bool on, uint64_t unit)
{
  punchq_accept (&hf->pq, on, unit);
}

bool host_release_later (struct hostfile *hf, uint64_t offset, uint64_t len, uint64_t tag)
{
  return len > 0 && host_can_punch (hf) && punchq_add (&hf->pq, offset, len, tag);
}

int host_release_next (struct hostfile *hf, uint64_t upto, struct host_release_job *job)
{
  struct punchq_items punch = { 0 };
  size_t i;
  int r;

  r = punchq_claim_next (&hf->pq, true, upto, &job->tag, &punch, &job->offset, &job->end);
  if (r <= 0)
    return r;
  for (i = 0; i < punch.len; i++)
    release_raw (hf, punch.ptr[i].offset, punch.ptr[i].len, false);
  punchq_punched (&hf->pq, &punch);
  punchq_items_reset (&punch);
  return 1;
}

void host_release_finish (struct hostfile *hf, const struct host_release_job *job)
{
  punchq_finish (&hf->pq, job->offset, job->end);
}

bool host_release_wait (struct hostfile *hf)
{
  return punchq_wait_job (&hf->pq);
}

bool host_release_pressed (struct hostfile *hf)
{
  return punchq_half_full (&hf->pq);
}

uint64_t host_release_mark (struct hostfile *hf)
{
  return punchq_mark (&hf->pq);
}

bool host_can_punch (const struct hostfile *hf)
{
  return !__atomic_load_n (&hf->punch_unsupported, __ATOMIC_ACQUIRE);
}

uint64_t host_bytes_released (const struct hostfile *hf)
{
  return __atomic_load_n (&hf->bytes_released, __ATOMIC_RELAXED);
}

uint64_t host_bytes_given_back (const struct hostfile *hf)
{
  return __atomic_load_n (&hf->bytes_given_back, __ATOMIC_RELAXED);
}

/* Zeroes a range, keeping it allocated where the filesystem can. */
int host_zero (struct hostfile *hf, uint64_t offset, uint64_t len)
{
  static const char zeros[65536];

  SETTLE (hf, offset, len);
  FAULT (hf, HOP_ZERO);
  if (fallocate (hf->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                 offset, len) == 0) {
    RECORD (hf, HOP_ZERO, NULL, offset, len);
    return 0;
  }
  while (len > 0) {
    size_t n = len < sizeof zeros ? len : sizeof zeros;
    int r = host_pwrite (hf, zeros, n, offset);
    if (r < 0)
      return r;
    offset += n;
    len -= n;
  }
  return 0;
}

/* The tail's contents no longer matter, but a thin volume or a loop
 * device over a sparse file gets its space back only if it is told.
 */
static int device_cut (struct hostfile *hf, uint64_t size)
{
  uint64_t old = __atomic_load_n (&hf->end, __ATOMIC_SEQ_CST);

  if (size > hf->device_size)
    return -ENOSPC;
  if (size < old)
    release_raw (hf, size, old - size, true);
  __atomic_store_n (&hf->end, size, __ATOMIC_SEQ_CST);
  return 0;
}

/* What a cut gives back is the data past the new end: its holes were
 * counted when they were punched.
 */
int host_truncate (struct hostfile *hf, uint64_t size)
{
  uint64_t old, data = 0;

  SETTLE (hf, size, UINT64_MAX);
  FAULT (hf, HOP_TRUNCATE);
  if (hf->device) {
    int r = device_cut (hf, size);
    if (r < 0)
      return r;
  }
  else {
    if (host_size (hf, &old) == 0 && old > size)
      data = data_bytes (hf, size, old - size);
    if (ftruncate (hf->fd, size) == -1)
      return -errno;
  }
  __atomic_add_fetch (&hf->bytes_given_back, data, __ATOMIC_RELAXED);
  RECORD (hf, HOP_TRUNCATE, NULL, size, 0);
  return 0;
}

/* Syncs are numbered as they start; a change needs a sync numbered after
 * it completed (host_changed), and sync_done is the highest number that
 * finished.  Numbers, where a flag cleared at the start of a sync would
 * tell a caller its writes were covered while that sync still ran, so
 * that a table written next could reach the disk first.
 */
int host_sync (struct hostfile *hf)
{
  uint64_t mine, done;

  FAULT (hf, HOP_SYNC);
  mine = __atomic_add_fetch (&hf->sync_started, 1, __ATOMIC_SEQ_CST);
  if (fdatasync (hf->fd) == -1)
    return -errno;
  done = __atomic_load_n (&hf->sync_done, __ATOMIC_SEQ_CST);
  while (done < mine &&
         !__atomic_compare_exchange_n (&hf->sync_done, &done, mine, false,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
    ;
  if (hf->test)
    hosttest_record (hf->test, HOP_SYNC, NULL, 0, 0);
  return 0;
}

int host_sync_if_needed (struct hostfile *hf)
{
  uint64_t need = __atomic_load_n (&hf->sync_needed, __ATOMIC_SEQ_CST);

  return __atomic_load_n (&hf->sync_done, __ATOMIC_SEQ_CST) >= need ? 0 : host_sync (hf);
}

int host_size (struct hostfile *hf, uint64_t *size)
{
  struct stat st;

  if (hf->device) {
    *size = __atomic_load_n (&hf->end, __ATOMIC_SEQ_CST);
    return 0;
  }
  if (fstat (hf->fd, &st) == -1)
    return -errno;
  *size = st.st_size;
  return 0;
}

int host_stat (struct hostfile *hf, struct stat *st)
{
  return fstat (hf->fd, st) == -1 ? -errno : 0;
}

bool host_is_device (const struct hostfile *hf)
{
  return hf->device;
}

uint64_t host_device_size (const struct hostfile *hf)
{
  return hf->device ? hf->device_size : 0;
}

uint64_t host_limit (const struct hostfile *hf)
{
  return hf->device ? hf->device_size : UINT64_MAX;
}

void host_set_end (struct hostfile *hf, uint64_t end)
{
  __atomic_store_n (&hf->end, end, __ATOMIC_SEQ_CST);
}

/* ENXIO is lseek's "nothing of that kind from here on", not a failure.
 * A device's lseek knows only its size, so its image end is applied here.
 */
static int seek (struct hostfile *hf, uint64_t offset, int whence, uint64_t *pos)
{
  off_t r;

  FAULT (hf, HOP_SEEK);
  if (offset > INT64_MAX)
    return -EINVAL;
  if (hf->device) {
    uint64_t end = __atomic_load_n (&hf->end, __ATOMIC_SEQ_CST);
    if (offset >= end)
      return -ENXIO;
    *pos = whence == SEEK_DATA ? offset : end;
    return 0;
  }
  r = lseek (hf->fd, (off_t) offset, whence);
  if (r == (off_t) -1)
    return errno == ENXIO ? -ENXIO : -errno;
  *pos = (uint64_t) r;
  return 0;
}

/* What lies in [offset, limit) is asked: the punches queued there run
 * first.  Past limit the answer may name data a queued punch will take,
 * which a caller that asked up to limit never uses.
 */
int host_seek_data_in (struct hostfile *hf, uint64_t offset, uint64_t limit, uint64_t *data)
{
  int r = settle (hf, offset, limit > offset ? limit - offset : 0);

  if (r == 0)
    r = seek (hf, offset, SEEK_DATA, data);
  if (r == -ENXIO) {
    *data = UINT64_MAX;
    return 0;
  }
  return r;
}

int host_seek_hole_in (struct hostfile *hf, uint64_t offset, uint64_t limit, uint64_t *hole)
{
  int r = settle (hf, offset, limit > offset ? limit - offset : 0);

  if (r == 0)
    r = seek (hf, offset, SEEK_HOLE, hole);
  if (r == -ENXIO) {
    *hole = offset;
    return 0;
  }
  return r;
}

int host_seek_data (struct hostfile *hf, uint64_t offset, uint64_t *data)
{
  return host_seek_data_in (hf, offset, UINT64_MAX, data);
}

int host_seek_hole (struct hostfile *hf, uint64_t offset, uint64_t *hole)
{
  return host_seek_hole_in (hf, offset, UINT64_MAX, hole);
}

int host_is_hole (struct hostfile *hf, uint64_t offset, uint64_t len, bool *hole)
{
  uint64_t d;
  int r = host_seek_data_in (hf, offset, offset + len, &d);

  *hole = r == 0 && d >= offset + len;
  return r;
}
