/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "hosttest.h"
#include "log.h"

struct hosttest {
  pthread_mutex_t lock;
  char *faults_path;
  struct timespec faults_mtime;
  int fault[HOP_COUNT];       /* errno to inject per operation, 0 none */
  int iolog_fd;
};

static const char *const op_names[HOP_COUNT] = {
  "read", "write", "punch", "zero", "truncate", "sync", "seek", "discard",
};

struct hosttest *hosttest_new (const char *name, int writable)
{
  const char *faults = getenv ("QCOW2RECLAIM_FAULTS");
  const char *iolog = writable ? getenv ("QCOW2RECLAIM_IOLOG") : NULL;
  struct hosttest *t;

  if ((!faults || !*faults) && (!iolog || !*iolog))
    return NULL;
  t = calloc (1, sizeof *t);
  if (!t)
    return NULL;
  pthread_mutex_init (&t->lock, NULL);
  t->iolog_fd = -1;
  if (faults && *faults)
    t->faults_path = strdup (faults);
  if (iolog && *iolog) {
    t->iolog_fd = open (iolog, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (t->iolog_fd == -1)
      log_error ("%s: cannot open the I/O log %s: %s", name, iolog, strerror (errno));
  }
  log_notice ("%s: test hooks are on (%s%s%s)", name, faults ? "faults" : "",
             faults && iolog ? ", " : "", iolog ? "I/O log" : "");
  return t;
}

void hosttest_free (struct hosttest *t)
{
  if (!t)
    return;
  if (t->iolog_fd >= 0)
    close (t->iolog_fd);
  free (t->faults_path);
  pthread_mutex_destroy (&t->lock);
  free (t);
}

static int errno_of (const char *s)
{
  return strcmp (s, "EIO") == 0 ? EIO : strcmp (s, "ENOSPC") == 0 ? ENOSPC
    : strcmp (s, "EOPNOTSUPP") == 0 ? EOPNOTSUPP : 0;
}

/* The control file is read again only when its mtime changes. */
static void reload (struct hosttest *t)
{
  struct stat st;
  char op[32], err[32];
  FILE *f;
  int i;

  if (stat (t->faults_path, &st) == -1) {
    memset (t->fault, 0, sizeof t->fault);
    return;
  }
  if (st.st_mtim.tv_sec == t->faults_mtime.tv_sec &&
      st.st_mtim.tv_nsec == t->faults_mtime.tv_nsec)
    return;
  t->faults_mtime = st.st_mtim;
  memset (t->fault, 0, sizeof t->fault);
  if (!(f = fopen (t->faults_path, "re")))
    return;
  while (fscanf (f, "%31s %31s", op, err) == 2)
    for (i = 0; i < HOP_COUNT; i++)
      if (strcmp (op, op_names[i]) == 0)
        t->fault[i] = errno_of (err);
  fclose (f);
}

int hosttest_fault (struct hosttest *t, enum host_op op)
{
  int e;

  if (!t->faults_path)
    return 0;
  pthread_mutex_lock (&t->lock);
  reload (t);
  e = t->fault[op];
  pthread_mutex_unlock (&t->lock);
  return -e;
}

/* One record: op (u8), 7 bytes of zeros, offset (u64), length (u64), all
 * in the machine's byte order, then the data of a write.
 */
void hosttest_record (struct hosttest *t, enum host_op op, const void *data,
                      uint64_t offset, uint64_t len)
{
  uint8_t head[24] = { (uint8_t) op };

  if (t->iolog_fd < 0 || op == HOP_READ || op == HOP_SEEK)
    return;
  memcpy (head + 8, &offset, 8);
  memcpy (head + 16, &len, 8);
  pthread_mutex_lock (&t->lock);
  if (write (t->iolog_fd, head, sizeof head) != sizeof head ||
      (op == HOP_WRITE && write (t->iolog_fd, data, len) != (ssize_t) len))
    log_error ("I/O log write failed: %s", strerror (errno));
  pthread_mutex_unlock (&t->lock);
}
