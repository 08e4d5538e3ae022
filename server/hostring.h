/* SPDX-License-Identifier: BSD-3-Clause */
/* Batches of writes to one file through io_uring (host.h uses it for the
 * metadata write-back).  Built without liburing, or on a kernel without
 * it, there is no ring and the caller writes with plain system calls.
 *
 * A ring serves one batch at a time (its lock).  A write the kernel has
 * not started after RING_CANCEL_SECONDS is taken back and written with
 * pwrite; one it holds longer than RING_SLOW_SECONDS is said in the log.
 * A batch the kernel will not take in full gives the ring up for good
 * (hostring_usable turns false): requests left in it point at the
 * caller's buffers and must never run later.
 *
 * Test hook QCOW2RECLAIM_RING_STALL=1: every batch waits behind a read of
 * an empty pipe, as if the kernel held the writes, until cancelled.
 */
#ifndef Q2_HOSTRING_H
#define Q2_HOSTRING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct host_write {
  const void *buf;
  size_t len;
  uint64_t offset;
};

struct hostring;

/* NULL when there is no io_uring: not an error, the caller writes plainly.
 * name is for messages.
 */
struct hostring *hostring_new (const char *name);
void hostring_free (struct hostring *r);
/* Read without the lock, to choose the path. */
bool hostring_usable (const struct hostring *r);
/* All or an error, as pwrite in a loop would be; -EAGAIN: nothing more
 * goes through the ring, write what is left plainly (a write that went
 * through already may be written again: the same bytes).
 */
int hostring_write (struct hostring *r, int fd, const struct host_write *w, size_t n);

#endif
