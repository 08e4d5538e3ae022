/* SPDX-License-Identifier: BSD-3-Clause */
/* The worker of deferred punches: a TRIM of part of a cluster queues its
 * punch (host_release_later) and is answered; this worker punches and
 * then frees the clusters left all hole (discard_if_hole).  A flush and
 * the close drain the queue first, so what they commit includes it.
 */
#ifndef Q2_PUNCH_H
#define Q2_PUNCH_H

struct q2_image;

/* After nbdkit forks; nothing to do for read-only images or discard=keep. */
int punch_start (struct q2_image *img);
/* Stops taking punches and joins the worker; what is queued stays. */
void punch_stop (struct q2_image *img);
/* Runs what was queued before it in the caller's thread, and waits for
 * the jobs of that time others hold; what guests queue meanwhile is left
 * to the worker.  The caller holds no lock, not even a guest range: each
 * job takes its cluster's.
 */
void punch_drain (struct q2_image *img);

#endif
