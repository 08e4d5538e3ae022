/* Locks: guest cluster ranges held by requests in flight, and the OFD
 * byte-range locks QEMU uses to keep two programs off one image.
 */
#ifndef Q2_LOCK_H
#define Q2_LOCK_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

struct range_held {
  uint64_t first, last;       /* guest cluster indexes, inclusive */
  bool exclusive;
  struct range_held *next;
};

struct range_lock {
  pthread_mutex_t mutex;
  pthread_cond_t cond;
  struct range_held *held;
};

void range_lock_init (struct range_lock *rl);
void range_lock_destroy (struct range_lock *rl);
/* Readers share, writers exclude everyone on overlapping clusters. */
void range_lock (struct range_lock *rl, struct range_held *h,
                 uint64_t first, uint64_t last, bool exclusive);
void range_unlock (struct range_lock *rl, struct range_held *h);

/* Takes QEMU-compatible image locks on fd; fails with a message if another
 * program (QEMU or us) holds the image in a conflicting way.
 */
int image_lock (int fd, const char *name, bool writable);

#endif
