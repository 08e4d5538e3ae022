/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "discard.h"
#include "engine.h"
#include "log.h"
#include "punch.h"
#include "writeback.h"

/* Test hook: QCOW2RECLAIM_PUNCH_HOLD=1 queues punches but starts no
 * worker, so that they wait for whatever touches their range, a flush or
 * the close: the tests see each of those run them first.
 */
struct punch {
  bool worker;
  pthread_t thread;
};

/* The job's ranges are punched: look at their cluster, then let them go.
 * An error only costs the chance to free the cluster; the TRIM that
 * queued it was answered long ago.
 */
static void job_done (struct q2_image *img, const struct host_release_job *job)
{
  uint64_t cluster = job->offset & ~((uint64_t) img->m.lay.cluster_size - 1);
  int r;

  if (writeback_refused (&img->m) == 0 &&
      (r = discard_if_hole (img, job->tag, cluster)) < 0)
    log_debug ("%s: the cluster at host offset 0x%" PRIx64 " was punched but could "
               "not be freed: %s", img->m.lay.name, cluster, strerror (-r));
  host_release_finish (&img->m.hf, job);
}

/* Jobs until 'upto' says there are no more; out of memory for a job's
 * list only delays it.  With 'yield', also until a new TRIM queued
 * something, unless the queue is half full: a pause of a few ms in an
 * fstrim (between block groups, a journal commit) must not set the
 * worker punching thousands of ranges beside the rest of the burst.
 * How many ran.
 */
static unsigned run_jobs (struct q2_image *img, uint64_t upto, bool yield)
{
  struct host_release_job job;
  unsigned n = 0;
  int r;

  while ((r = host_release_next (&img->m.hf, upto, &job)) != 0) {
    if (r < 0) {
      usleep (10000);
      continue;
    }
    job_done (img, &job);
    n++;
    if (yield && host_release_mark (&img->m.hf) != upto &&
        !host_release_pressed (&img->m.hf))
      break;
  }
  return n;
}

/* Punches compete with the TRIMs that queue them, for the CPUs and for
 * the host filesystem (a punch there may wait for the disk's own
 * discard): while a burst goes on, a TRIM within the last QUIET, the
 * worker waits, unless the queue is half full.  An fstrim then gets its
 * answers as fast as if nothing were punched, and its space back a moment
 * after its last TRIM; waking for each TRIM cost a context switch per
 * request.  Nothing waits for the worker meanwhile: a request or a flush
 * over a queued range punches it itself.
 */
#define QUIET_MICROSECONDS 2000

static void *worker (void *arg)
{
  struct q2_image *img = arg;
  uint64_t seen;

  while (host_release_wait (&img->m.hf)) {
    do {
      seen = host_release_mark (&img->m.hf);
      usleep (QUIET_MICROSECONDS);
    } while (host_release_mark (&img->m.hf) != seen && !host_release_pressed (&img->m.hf));
    /* What went back shows in the counters only now, after the TRIMs
     * that asked for it were answered.
     */
    if (run_jobs (img, host_release_mark (&img->m.hf), true) && img->notify)
      img->notify (img->notify_opaque, false);
  }
  return NULL;
}

int punch_start (struct q2_image *img)
{
  const char *e;
  int r;

  if (img->readonly || img->discard != Q2_DISCARD_PUNCH || img->punch)
    return 0;
  if (!(img->punch = calloc (1, sizeof *img->punch)))
    return -ENOMEM;
  host_release_accept (&img->m.hf, true, img->m.lay.cluster_size);
  e = getenv ("QCOW2RECLAIM_PUNCH_HOLD");
  if (e && *e == '1') {
    log_debug ("%s: test hook: deferred punches wait for a flush", img->m.lay.name);
    return 0;
  }
  if ((r = pthread_create (&img->punch->thread, NULL, worker, img)) != 0) {
    host_release_accept (&img->m.hf, false, 0);
    free (img->punch);
    img->punch = NULL;
    log_error ("%s: cannot start the worker of deferred punches: %s", img->m.lay.name,
               strerror (r));
    return -r;
  }
  img->punch->worker = true;
  return 0;
}

void punch_stop (struct q2_image *img)
{
  if (!img->punch)
    return;
  host_release_accept (&img->m.hf, false, 0);
  if (img->punch->worker)
    pthread_join (img->punch->thread, NULL);
  free (img->punch);
  img->punch = NULL;
}

void punch_drain (struct q2_image *img)
{
  run_jobs (img, host_release_mark (&img->m.hf), false);
}
