/* SPDX-License-Identifier: BSD-3-Clause */
/* Test hooks of the host I/O layer, off unless the environment asks:
 *   QCOW2RECLAIM_FAULTS=FILE  injects errors: FILE holds lines "OP ERRNO"
 *     (OP: read write punch zero truncate sync seek; ERRNO: EIO ENOSPC
 *     EOPNOTSUPP), re-read whenever it changes; an empty file injects none.
 *   QCOW2RECLAIM_IOLOG=FILE   records every write, punch, zero, truncate
 *     and sync of the image, with the data, for crash-point replay.
 * With either set, io_uring batches are not used, so every operation
 * passes through here.
 *   QCOW2RECLAIM_RING_STALL=1 (host.c) makes each io_uring batch wait
 *     behind a read of an empty pipe, as if the kernel held the writes.
 */
#ifndef Q2_HOSTTEST_H
#define Q2_HOSTTEST_H

#include <stddef.h>
#include <stdint.h>

/* The numbers are the I/O log's record types (tests/crash_replay.py). */
enum host_op {
  HOP_READ, HOP_WRITE, HOP_PUNCH, HOP_ZERO, HOP_TRUNCATE, HOP_SYNC, HOP_SEEK,
  HOP_DISCARD,                /* a device's BLKDISCARD, logged as a punch */
  HOP_COUNT
};

struct hosttest;

/* Returns NULL when no test hook is asked for (the normal case). */
struct hosttest *hosttest_new (const char *name, int writable);
void hosttest_free (struct hosttest *t);
/* 0, or the negative errno to fail this operation with. */
int hosttest_fault (struct hosttest *t, enum host_op op);
/* Records a completed operation (data only for writes; reads and seeks
 * change nothing and are not recorded).
 */
void hosttest_record (struct hosttest *t, enum host_op op, const void *data,
                      uint64_t offset, uint64_t len);

#endif
