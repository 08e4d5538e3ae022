/* SPDX-License-Identifier: BSD-3-Clause */
/* The metadata cache alone, over a scratch file: what it reads, which
 * entry it evicts (least recently used, never a pinned one), that a dirty
 * entry leaves only through the write-back function it was given (and
 * stays when that fails), kinds, drops, the order dirty entries are
 * visited in, and the asserts on pins and on the lock.
 */
#include <config.h>

#include <errno.h>
#include <signal.h>
#include <string.h>

#include "cache.h"
#include "host.h"
#include "layout.h"
#include "mutex.h"
#include "unit.h"
#include "vector.h"

#define CS 4096
#define NCLUSTERS 64

static struct hostfile hf;
static struct layout lay = { .name = "test-cache image", .cluster_size = CS,
                             .cluster_bits = 12 };
static struct mutex lock;
static struct meta_cache cache;

/* What the write-back function saw, and what it should answer. */
static struct u64_vector written;
static int writeback_result;

static int writeback (void *opaque, struct cache_entry *e)
{
  CHECK (opaque == &cache);
  CHECK (e->dirty && e->pins == 0);
  if (writeback_result)
    return writeback_result;
  CHECK (u64_vector_append (&written, e->offset) == 0);
  CHECK (host_pwrite (&hf, e->buf, CS, e->offset) == 0);
  cache_mark_clean (&cache, e);
  return 0;
}

static uint8_t first_byte (enum meta_kind kind, uint64_t cluster)
{
  struct cache_entry *e;
  uint8_t b;

  CHECK (cache_get (&cache, kind, cluster * CS, &e) == 0);
  b = ((uint8_t *) e->buf)[0];
  cache_put (&cache, e);
  return b;
}

static void fill_file (uint8_t base)
{
  uint8_t buf[CS];
  uint64_t i;

  for (i = 0; i < NCLUSTERS; i++) {
    memset (buf, (uint8_t) (base + i), CS);
    CHECK (host_pwrite (&hf, buf, CS, i * CS) == 0);
  }
}

static void put_unpinned (void *opaque)
{
  struct cache_entry *e;

  mutex_lock (&lock);
  CHECK (cache_get (&cache, META_L2, 63 * CS, &e) == 0);
  cache_put (&cache, e);
  cache_put (&cache, e);          /* one put too many */
}

static void get_unlocked (void *opaque)
{
  struct cache_entry *e;

  cache_get (&cache, META_L2, 63 * CS, &e);
}

static int visit (void *opaque, struct cache_entry *e)
{
  return u64_vector_append (opaque, e->offset);
}

int main (void)
{
  char path[] = "/tmp/q2r-cache.XXXXXX";
  struct cache_entry *e, *pinned[20];
  struct u64_vector order = { 0 };
  uint64_t i;
  int fd = mkstemp (path);

  CHECK (fd >= 0);
  close (fd);
  CHECK (host_open (&hf, path, false) == 0);
  unlink (path);
  mutex_init (&lock);
  CHECK (cache_init (&cache, &hf, &lay, &lock, 16 * CS, CS) == 0);
  CHECK (cache.max_entries == 16);
  cache_set_writeback (&cache, writeback, &cache);
  fill_file (0);

  mutex_lock (&lock);
  /* Reads what the file holds at the offset. */
  for (i = 0; i < 16; i++)
    CHECK (first_byte (META_L2, i) == i);
  CHECK (cache.nentries == 16);
  /* Cached from now on: a change underneath is not seen. */
  fill_file (100);
  for (i = 0; i < 16; i++)
    CHECK (first_byte (META_L2, i) == i);

  /* Least recently used goes first: all dirty, so the write-back says who. */
  for (i = 0; i < 16; i++) {
    CHECK (cache_get (&cache, META_L2, i * CS, &e) == 0);
    cache_mark_dirty (&cache, e);
    cache_put (&cache, e);
  }
  CHECK (cache_any_dirty (&cache, META_L2) && !cache_any_dirty (&cache, META_REFBLOCK));
  CHECK (first_byte (META_L2, 0) == 0);           /* 0 is the newest now */
  CHECK (first_byte (META_L2, 16) == 116);        /* evicts 1 */
  CHECK (written.len == 1 && written.ptr[0] == 1 * CS);
  CHECK (first_byte (META_L2, 17) == 117);        /* evicts 2 */
  CHECK (written.len == 2 && written.ptr[1] == 2 * CS);
  /* A pinned entry is passed over. */
  CHECK (cache_get (&cache, META_L2, 3 * CS, &pinned[0]) == 0);
  CHECK (first_byte (META_L2, 18) == 118);        /* 3 pinned: evicts 4 */
  CHECK (written.len == 3 && written.ptr[2] == 4 * CS);
  cache_put (&cache, pinned[0]);
  /* Written back means on disk: read again after eviction, it is there. */
  CHECK (first_byte (META_L2, 1) == 1);
  CHECK (cache.nentries == 16);

  /* A failing write-back fails the get, and the entry stays, dirty. */
  writeback_result = -EIO;
  CHECK (cache_get (&cache, META_L2, 30 * CS, &e) == -EIO);
  writeback_result = 0;
  CHECK (cache.nentries == 16);

  /* Everything pinned: the cache grows past its budget rather than fail. */
  for (i = 0; i < 16; i++)
    CHECK (cache_get (&cache, META_L2, (40 + i) * CS, &pinned[i]) == 0);
  CHECK (cache_get (&cache, META_L2, 60 * CS, &e) == 0);
  CHECK (cache.nentries == 17);
  cache_put (&cache, e);
  for (i = 0; i < 16; i++)
    cache_put (&cache, pinned[i]);

  /* One cluster is one kind: asking for another kind is corruption. */
  CHECK (cache_get (&cache, META_REFBLOCK, 40 * CS, &e) == -EIO);

  /* A new table is zeroed and dirty; dropped, it is never written. */
  size_t before = written.len;
  CHECK (cache_get_new (&cache, META_REFBLOCK, 50 * CS, &e) == 0);
  CHECK (e->dirty && ((uint8_t *) e->buf)[0] == 0 && ((uint8_t *) e->buf)[CS - 1] == 0);
  cache_put (&cache, e);
  CHECK (cache_any_dirty (&cache, META_REFBLOCK));
  cache_drop (&cache, 50 * CS);
  CHECK (!cache_any_dirty (&cache, META_REFBLOCK));
  CHECK (first_byte (META_REFBLOCK, 50) == 150);  /* read from the file again */
  CHECK (written.len == before);

  /* Dirty entries are visited least recently used first (a fresh cache,
   * so that no eviction reorders them).
   */
  static const uint64_t perm[16] = { 7, 3, 12, 0, 9, 15, 1, 4, 11, 2, 14, 6, 10, 5, 13, 8 };
  cache_free (&cache);
  CHECK (cache_init (&cache, &hf, &lay, &lock, 16 * CS, CS) == 0);
  cache_set_writeback (&cache, writeback, &cache);
  for (i = 0; i < 16; i++) {
    CHECK (cache_get (&cache, i % 3 ? META_L2 : META_REFBLOCK, perm[i] * CS, &e) == 0);
    if (i != 5)
      cache_mark_dirty (&cache, e);
    cache_put (&cache, e);
  }
  (void) first_byte (META_L2, perm[4]);      /* perm[4] is the newest now */
  CHECK (cache_for_each_dirty (&cache, META_L2, visit, &order) == 0);
  uint64_t want[16], n = 0;
  for (i = 0; i < 16; i++)
    if (i % 3 && i != 5 && i != 4)
      want[n++] = perm[i] * CS;
  want[n++] = perm[4] * CS;
  CHECK (order.len == n);
  for (i = 0; i < n; i++)
    CHECK (order.ptr[i] == want[i]);
  mutex_unlock (&lock);

  CHECK (unit_aborts (put_unpinned, NULL));
  CHECK (unit_aborts (get_unlocked, NULL));

  cache_free (&cache);
  host_close (&hf);
  mutex_destroy (&lock);
  u64_vector_reset (&written);
  u64_vector_reset (&order);
  printf ("test-cache: ok\n");
  return 0;
}
