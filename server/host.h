/* SPDX-License-Identifier: BSD-3-Clause */
/* Host file I/O: every read, write, punch, zero, seek, truncate and sync of
 * an image file goes through here, so that the test hooks (hosttest.h) see
 * all of it.  Metadata write-back is batched through io_uring (hostring.h) when the
 * kernel has it, with plain system calls as the fallback.
 *
 * Giving space back (host_release) carries the punch policy: a filesystem
 * that cannot punch holes is said once and then left alone, and the bytes
 * punched are counted, and apart those of them that held data: what the
 * host really got back.
 */
#ifndef Q2_HOST_H
#define Q2_HOST_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>

#include "hostring.h"
#include "punchq.h"

struct hosttest;

struct hostfile {
  bool live;                  /* host_open ran: host_close has work to do */
  int fd;
  char *name;                 /* as the user gave it, for messages */
  struct hostring *ring;      /* write-back batches (hostring.h); NULL: plain writes */
  struct hosttest *test;      /* fault injection and I/O log, normally NULL */
  /* Atomics: written by any request thread, with or without other locks. */
  uint64_t sync_started;      /* syncs begun, numbered from 1 */
  uint64_t sync_done;         /* the highest number of a sync that finished */
  uint64_t sync_needed;       /* the number that covers every completed change */
  bool punch_unsupported;     /* the filesystem said EOPNOTSUPP to a punch */
  bool discard_unsupported;   /* the device said EOPNOTSUPP to BLKDISCARD */
  uint64_t bytes_released;    /* bytes host_release turned into holes */
  /* Bytes that held data and became holes or were cut off: each byte
   * once, where a range punched and then cut counts in both of the
   * others.
   */
  uint64_t bytes_given_back;
  struct punchq pq;           /* deferred punches (punchq.h) */
  /* A block device (an LVM volume, an iSCSI LUN, a loop device) has no
   * length of its own, and the layers above reason about one (where new
   * clusters go, what compaction aims at, what a truncation cuts): 'end'
   * (atomic) stands for it, the end of the image as the image layer set
   * it at open (host_set_end), raised by writes and lowered by truncation,
   * which discards the tail.  Until it is set it is the device's size, so
   * a raw backing file on a device reads whole.
   */
  bool device;
  uint64_t device_size;
  uint64_t end;
};

/* Says nothing on failure (the caller knows what the file is for); hf is
 * then still safe to pass to host_close.
 */
int host_open (struct hostfile *hf, const char *name, bool readonly);
void host_close (struct hostfile *hf);
/* The ring is set up after nbdkit forks; failure falls back to syscalls. */
void host_start_ring (struct hostfile *hf);

/* Bytes past the end of the file read as zeros, as in QEMU; past a
 * device's image end they read what the device holds (the engine never
 * relies on zeros there: a fresh cluster is punched or written whole).
 */
int host_pread (struct hostfile *hf, void *buf, size_t len, uint64_t offset);
int host_pwrite (struct hostfile *hf, const void *buf, size_t len, uint64_t offset);
int host_pwrite_batch (struct hostfile *hf, const struct host_write *w, size_t n);
/* Makes a range a hole; fails with the filesystem's error (EOPNOTSUPP...). */
int host_punch (struct hostfile *hf, uint64_t offset, uint64_t len);
/* The range's contents no longer matter: give its space back if the
 * host can (a punch; on a device that cannot punch, a discard).  Never
 * fails; errors are logged, EOPNOTSUPP once.
 */
void host_release (struct hostfile *hf, uint64_t offset, uint64_t len);
/* Gives a range's space back so that it reads zeros: 0 when it does,
 * -EOPNOTSUPP where the host cannot (said once), other errors logged.
 * The caller writes zeros where it must have them.
 */
int host_release_zeros (struct hostfile *hf, uint64_t offset, uint64_t len);
bool host_can_punch (const struct hostfile *hf);

/* Deferred punches (punchq.h).  Every operation here runs those queued
 * over its range first, so a caller never sees a punch land late.
 * host_release_later queues one while a worker takes them
 * (host_release_accept); false: release the range now instead.
 */
void host_release_accept (struct hostfile *hf, bool on, uint64_t unit);
bool host_release_later (struct hostfile *hf, uint64_t offset, uint64_t len, uint64_t tag);
/* A job of the queue: a tag's ranges in one unit, [offset, end). */
struct host_release_job {
  uint64_t tag, offset, end;
};
/* Punches the next job's ranges and gives it; the caller looks at them
 * and calls host_release_finish.  upto UINT64_MAX: the worker, waiting
 * for jobs until the queue is off; a mark (host_release_mark): a drain,
 * until nothing queued by then is left.  1: a job; 0: no more; -ENOMEM.
 */
int host_release_next (struct hostfile *hf, uint64_t upto, struct host_release_job *job);
void host_release_finish (struct hostfile *hf, const struct host_release_job *job);
/* Waits for a job (true), or until the queue is off. */
bool host_release_wait (struct hostfile *hf);
/* The queue is half full: its jobs should not wait for a quiet moment. */
bool host_release_pressed (struct hostfile *hf);
uint64_t host_release_mark (struct hostfile *hf);
uint64_t host_bytes_released (const struct hostfile *hf);
uint64_t host_bytes_given_back (const struct hostfile *hf);
/* Zeroes a range, keeping it allocated where the filesystem can. */
int host_zero (struct hostfile *hf, uint64_t offset, uint64_t len);
/* Counts the data past size as given back.  On a device nothing is cut:
 * the end moves, and the range between the new end and the old is
 * discarded.  Past the device's size: ENOSPC.
 */
int host_truncate (struct hostfile *hf, uint64_t size);
int host_sync (struct hostfile *hf);
/* Syncs unless a finished sync covers every change completed so far. */
int host_sync_if_needed (struct hostfile *hf);
/* The file's length; on a device, the image's end (see 'end' above). */
int host_size (struct hostfile *hf, uint64_t *size);
int host_stat (struct hostfile *hf, struct stat *st);
bool host_is_device (const struct hostfile *hf);
/* The device's size in bytes; 0 for a file. */
uint64_t host_device_size (const struct hostfile *hf);
/* How far the image may reach: the device's size, or no bound for a file. */
uint64_t host_limit (const struct hostfile *hf);
/* The end of the image on a device, known once its refcounts are read. */
void host_set_end (struct hostfile *hf, uint64_t end);

/* The first byte of data at or after offset: UINT64_MAX when only holes
 * follow (or offset is past the end).  A device cannot tell holes: all of
 * it up to the image's end is data.
 */
int host_seek_data (struct hostfile *hf, uint64_t offset, uint64_t *data);
/* The first hole at or after offset; the end of the file counts as one. */
int host_seek_hole (struct hostfile *hf, uint64_t offset, uint64_t *hole);
/* The same, for a caller that uses only answers below limit: only the
 * punches queued in [offset, limit) run first, where the above run all
 * of those past offset.
 */
int host_seek_data_in (struct hostfile *hf, uint64_t offset, uint64_t limit, uint64_t *data);
int host_seek_hole_in (struct hostfile *hf, uint64_t offset, uint64_t limit, uint64_t *hole);
/* Whether [offset, offset + len) holds no data at all. */
int host_is_hole (struct hostfile *hf, uint64_t offset, uint64_t len, bool *hole);

#endif
