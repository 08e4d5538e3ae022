/* Host file I/O: whole-buffer reads and writes, hole punching, syncs and
 * batched metadata write-back (io_uring when available).
 */
#ifndef Q2_HOSTIO_H
#define Q2_HOSTIO_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct host_write {
  const void *buf;
  size_t len;
  uint64_t offset;
};

struct hostfile {
  int fd;
  char *name;                 /* as the user gave it, for messages */
  bool ring_ok;
  pthread_mutex_t ring_lock;
  void *ring;                 /* struct io_uring *, opaque here */
  /* Test hook QCOW2RECLAIM_RING_STALL=1: every batch waits behind a read of
   * this empty pipe, as if the kernel held the writes, until cancelled.
   */
  bool ring_stall;
  int stall_pipe[2];
  struct hosttest *test;      /* fault injection and I/O log, normally NULL */
  bool unsynced;              /* changed since the last sync began (atomic) */
};

int host_open (struct hostfile *hf, const char *name, bool readonly);
void host_close (struct hostfile *hf);
/* The ring is set up after nbdkit forks; failure falls back to syscalls. */
void host_start_ring (struct hostfile *hf);

/* Bytes past the end of the file read as zeros, as in QEMU. */
int host_pread (struct hostfile *hf, void *buf, size_t len, uint64_t offset);
int host_pwrite (struct hostfile *hf, const void *buf, size_t len, uint64_t offset);
int host_pwrite_batch (struct hostfile *hf, const struct host_write *w, size_t n);
int host_punch (struct hostfile *hf, uint64_t offset, uint64_t len);
int host_zero (struct hostfile *hf, uint64_t offset, uint64_t len);
int host_truncate (struct hostfile *hf, uint64_t size);
int host_sync (struct hostfile *hf);
/* Syncs only if anything changed since the last sync began. */
int host_sync_if_needed (struct hostfile *hf);
int host_size (struct hostfile *hf, uint64_t *size);

#endif
