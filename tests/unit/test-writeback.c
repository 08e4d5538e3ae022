/* SPDX-License-Identifier: BSD-3-Clause */
/* The order write-back puts metadata on disk (DESIGN.md, "Write
 * ordering"), read from the host I/O layer's own log: refcount blocks,
 * sync, refcount table, sync, L2 tables, sync, L1 table, sync; an evicted
 * L2 table only after the refcounts are synced; and no sync where nothing
 * was written.
 */
#include <config.h>

#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <string.h>

#include "hosttest.h"
#include "qcow2-format.h"
#include "unit.h"
#include "writeback.h"

#define CS 4096
#define REFTABLE (1 * CS)
#define L1 (2 * CS)

static char logpath[64];
static off_t log_seen;

/* The records logged since the last call, as "W<cluster> S ..." text. */
static void logged (char *out, size_t outlen)
{
  int fd = open (logpath, O_RDONLY);
  uint8_t head[24];
  size_t n = 0;

  CHECK (fd >= 0);
  out[0] = '\0';
  while (pread (fd, head, 24, log_seen) == 24) {
    uint64_t off, len;
    memcpy (&off, head + 8, 8);
    memcpy (&len, head + 16, 8);
    log_seen += 24 + (head[0] == HOP_WRITE ? len : 0);
    if (head[0] == HOP_WRITE)
      n += snprintf (out + n, outlen - n, "%sW%" PRIu64, n ? " " : "", off / CS);
    else if (head[0] == HOP_SYNC)
      n += snprintf (out + n, outlen - n, "%sS", n ? " " : "");
    else
      n += snprintf (out + n, outlen - n, "%s?%d", n ? " " : "", head[0]);
    CHECK (n < outlen);
  }
  close (fd);
}

static void new_table (struct meta *m, enum meta_kind kind, uint64_t cluster)
{
  struct cache_entry *e;

  CHECK (cache_get_new (&m->cache, kind, cluster * CS, &e) == 0);
  cache_put (&m->cache, e);
}

/* Another request, in the flush's unlocked sync: it takes the lock as soon
 * as the flush lets go (spinning, so that it is there before the sync
 * ends), writes data and links it in a new L2 table.
 */
static struct meta *meddled;
static bool meddle_go, meddle_done;

static void *meddle (void *opaque)
{
  (void) opaque;
  while (!__atomic_load_n (&meddle_go, __ATOMIC_ACQUIRE))
    ;
  while (pthread_mutex_trylock (&meddled->lock.m) != 0)
    ;
  pthread_mutex_unlock (&meddled->lock.m);
  mutex_lock (&meddled->lock);
  CHECK (host_pwrite (&meddled->hf, "data", 4, 41 * CS) == 0);
  new_table (meddled, META_L2, 5);
  __atomic_store_n (&meddle_done, true, __ATOMIC_RELEASE);
  mutex_unlock (&meddled->lock);
  return NULL;
}

#define EXPECT(want) do {                                               \
    char got_[4096];                                                    \
    logged (got_, sizeof got_);                                         \
    if (strcmp (got_, want) != 0) {                                     \
      fprintf (stderr, "%s:%d: logged \"%s\", expected \"%s\"\n",       \
               __FILE__, __LINE__, got_, want);                         \
      exit (1);                                                         \
    }                                                                   \
  } while (0)

int main (void)
{
  char path[] = "/tmp/q2r-writeback.XXXXXX";
  static struct meta m;
  uint64_t *l1 = calloc (8, sizeof *l1), *rt = calloc (CS / 8, sizeof *rt), i;
  bool synced;
  int fd = mkstemp (path);

  CHECK (fd >= 0 && l1 && rt);
  close (fd);
  snprintf (logpath, sizeof logpath, "%s.iolog", path);
  setenv ("QCOW2RECLAIM_IOLOG", logpath, 1);
  CHECK (host_open (&m.hf, path, false) == 0);
  unlink (path);
  m.lay = (struct layout) { .name = "test-writeback image", .cluster_bits = 12,
                            .cluster_size = CS, .reftable_offset = REFTABLE,
                            .reftable_clusters = 1, .l1_offset = L1, .l1_entries = 8 };
  mutex_init (&m.lock);
  CHECK (table_init_entries (&m.l1, &m.hf, &m.lay, "L1 table", l1, 8) == 0);
  CHECK (table_init_entries (&m.reftable, &m.hf, &m.lay, "refcount table", rt, CS / 8) == 0);
  CHECK (cache_init (&m.cache, &m.hf, &m.lay, &m.lock, 16 * CS, CS) == 0);
  writeback_init (&m);

  mutex_lock (&m.lock);
  /* Nothing dirty, nothing written: no sync either. */
  CHECK (!writeback_needed (&m));
  CHECK (writeback_all (&m, false, &synced) == 0 && !synced);
  EXPECT ("");

  /* One of each: a new refcount block named in the table, a new L2 table
   * named in L1.
   */
  new_table (&m, META_REFBLOCK, 3);
  table_set (&m.reftable, 0, 3 * CS);
  new_table (&m, META_L2, 4);
  table_set (&m.l1, 0, 4 * CS | QCOW_OFLAG_COPIED);
  CHECK (writeback_needed (&m));
  CHECK (writeback_all (&m, false, &synced) == 0 && synced);
  EXPECT ("W3 S W1 S W4 S W2 S");
  CHECK (!writeback_needed (&m));

  /* Only refcounts: blocks, sync, table, sync; no L2 or L1 write. */
  new_table (&m, META_REFBLOCK, 5);
  table_set (&m.reftable, 1, 5 * CS);
  CHECK (writeback_refcounts (&m) == 0);
  EXPECT ("W5 S W1 S");

  /* An L2 table changed in place: no table sector, one sync after it. */
  new_table (&m, META_L2, 4);
  CHECK (writeback_all (&m, false, &synced) == 0 && synced);
  EXPECT ("W4 S");

  /* Eviction: the cache is full of dirty L2 tables and a refcount block
   * is dirty too.  The least recently used table goes, after the refcount
   * block and table are on disk and synced.
   */
  for (i = 0; i < 16; i++)
    new_table (&m, META_L2, 10 + i);
  EXPECT ("");
  struct cache_entry *e;
  CHECK (cache_get (&m.cache, META_REFBLOCK, 3 * CS, &e) == 0);    /* evicts 10 */
  EXPECT ("W10");                       /* nothing of the refcounts was dirty */
  cache_mark_dirty (&m.cache, e);
  cache_put (&m.cache, e);
  table_set (&m.reftable, 2, 6 * CS);
  new_table (&m, META_L2, 30);          /* evicts 11, which needs the refcounts */
  EXPECT ("W3 S W1 S W11");

  /* What was written since the last sync (the evicted table) is synced
   * before more tables go; the rest of the L2 tables go in one batch.
   */
  CHECK (writeback_all (&m, true, &synced) == 0 && synced);
  char want[256], *p = want + sprintf (want, "S ");
  for (i = 12; i < 26; i++)
    p += sprintf (p, "W%" PRIu64 " ", i);
  sprintf (p, "W30 S");
  EXPECT (want);
  /* sync_anyway with everything on disk and synced: nothing to do. */
  CHECK (writeback_all (&m, true, &synced) == 0 && synced);
  EXPECT ("");

  /* A flush's write-back with the sync outside the lock: the refcount
   * block, its sync, the L2 table; the caller syncs the table.
   */
  bool done;
  new_table (&m, META_REFBLOCK, 3);
  new_table (&m, META_L2, 4);
  CHECK (writeback_all_sync_unlocked (&m, &done) == 0 && done);
  CHECK (mutex_held (&m.lock));
  EXPECT ("W3 S W4");
  CHECK (!writeback_needed (&m));
  CHECK (host_sync_if_needed (&m.hf) == 0);
  EXPECT ("S");
  CHECK (host_sync_if_needed (&m.hf) == 0);
  EXPECT ("");
  /* Only an L2 table: the sync still comes first, for the data it links. */
  new_table (&m, META_L2, 4);
  CHECK (host_pwrite (&m.hf, "data", 4, 40 * CS) == 0);
  CHECK (writeback_all_sync_unlocked (&m, &done) == 0 && done);
  EXPECT ("W40 S W4");
  CHECK (host_sync_if_needed (&m.hf) == 0);
  EXPECT ("S");
  /* A new L2 table named in L1 needs its own syncs: left to writeback_all,
   * with nothing written.
   */
  new_table (&m, META_REFBLOCK, 3);
  new_table (&m, META_L2, 7);
  table_set (&m.l1, 1, 7 * CS | QCOW_OFLAG_COPIED);
  CHECK (writeback_all_sync_unlocked (&m, &done) == 0 && !done);
  EXPECT ("");
  CHECK (writeback_all (&m, false, &synced) == 0 && synced);
  EXPECT ("W3 S W7 S W2 S");

  /* Another request links new data while the flush syncs: that data was
   * not covered, so the flush syncs again before writing the L2 tables.
   * The other thread may miss the window (it then runs after the flush,
   * and is tried again); when it gets in, the order is fixed.
   */
  int tries;
  for (tries = 0; tries < 20; tries++) {
    pthread_t th;
    meddled = &m;
    meddle_go = meddle_done = false;
    new_table (&m, META_REFBLOCK, 3);
    new_table (&m, META_L2, 4);
    CHECK (pthread_create (&th, NULL, meddle, NULL) == 0);
    __atomic_store_n (&meddle_go, true, __ATOMIC_RELEASE);
    CHECK (writeback_all_sync_unlocked (&m, &done) == 0 && done);
    bool in_window = __atomic_load_n (&meddle_done, __ATOMIC_ACQUIRE);
    mutex_unlock (&m.lock);
    CHECK (pthread_join (th, NULL) == 0);
    mutex_lock (&m.lock);
    if (in_window) {
      /* The data may be logged before the first sync's record, which is
       * made when the sync ends; either way a second sync follows it.
       */
      logged (want, sizeof want);
      CHECK (strcmp (want, "W3 S W41 S W4 W5") == 0 ||
             strcmp (want, "W3 W41 S S W4 W5") == 0);
      break;
    }
    CHECK (writeback_all (&m, false, &synced) == 0);
    logged (want, sizeof want);
  }
  CHECK (tries < 20);
  CHECK (host_sync_if_needed (&m.hf) == 0);
  EXPECT ("S");
  mutex_unlock (&m.lock);

  cache_free (&m.cache);
  table_free (&m.l1);
  table_free (&m.reftable);
  host_close (&m.hf);
  mutex_destroy (&m.lock);
  unlink (logpath);
  printf ("test-writeback: ok\n");
  return 0;
}
