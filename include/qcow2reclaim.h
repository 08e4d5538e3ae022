/* SPDX-License-Identifier: BSD-3-Clause */
/* qcow2reclaim engine: the public API used by the nbdkit plugin, the tool
 * and the tests.  Every call returns 0 or a negative errno; failures have
 * already been logged as one sentence naming the image and the offset.
 */
#ifndef QCOW2RECLAIM_H
#define QCOW2RECLAIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct q2_image;

/* Flags for write, zero and discard. */
#define Q2_FUA        (1u << 0)   /* on stable storage before returning */
#define Q2_MAY_TRIM   (1u << 1)   /* zero: the range may be deallocated */
#define Q2_FAST_ZERO  (1u << 2)   /* zero: fail with ENOTSUP rather than write data */

/* Extent types, the same bits as NBD's block status. */
#define Q2_EXTENT_HOLE (1u << 0)
#define Q2_EXTENT_ZERO (1u << 1)

enum q2_discard_mode {
  Q2_DISCARD_PUNCH = 0,     /* unreference and punch host space (default) */
  Q2_DISCARD_KEEP,          /* zero flag, keep the allocation, punch host range */
  Q2_DISCARD_IGNORE,        /* accept TRIM and do nothing, as qemu-nbd's default */
};

enum q2_detect_zeroes {
  Q2_DETECT_ZEROES_OFF = 0,
  Q2_DETECT_ZEROES_ON,      /* all-zero writes become write-zeroes */
  Q2_DETECT_ZEROES_UNMAP,   /* ... with MAY_TRIM, so they free space */
};

enum q2_compact_mode {
  Q2_COMPACT_AUTO = 0,      /* a background worker keeps the length near the data */
  Q2_COMPACT_OFF,           /* only a free end is ever cut off */
};

struct q2_options {
  const char *file;
  bool readonly;
  /* Read-only, without taking the image lock (qemu-img's -U): another
   * program may be writing the image, so what is read may be stale.
   */
  bool force_share;
  /* For q2_repair only: writable, accepting an image marked corrupt or
   * dirty, and keeping the autoclear bits (a repair changes no guest data,
   * so persistent bitmaps stay valid).  Guest writes are refused.
   */
  bool repair;
  const char *backing;      /* NULL: the image's own; "none": refuse backing files */
  const char *data_file;    /* NULL: the external data file the image names */
  /* The passphrase of a LUKS-encrypted image (len bytes; NULL: none given).
   * The engine keeps no copy: the caller wipes it once q2_open returned.
   */
  const char *passphrase;
  size_t passphrase_len;
  /* An encrypted image opens without its passphrase, for its metadata
   * only (qcow2reclaim info, map, check and its repair): reading or
   * writing guest data, and compaction, are then refused.
   */
  bool metadata_only;
  size_t cache_size;        /* bytes of L2 tables and refcount blocks to keep, 0 = default */
  enum q2_discard_mode discard;
  enum q2_detect_zeroes detect_zeroes;
  enum q2_compact_mode compact;
  uint64_t compact_rate;    /* bytes a second the worker may move, 0 = default */
  /* Called by the background workers, outside every lock, so that
   * counters shown elsewhere can follow: by compaction after each window
   * it committed (pass_end false) and once a pass that changed the file
   * is over (true); by the worker of deferred punches after each batch
   * (false).
   */
  void (*worker_notify) (void *opaque, bool pass_end);
  void *worker_opaque;
};

#define Q2_DEFAULT_CACHE_SIZE (32u << 20)
#define Q2_DEFAULT_COMPACT_RATE (64u << 20)

/* Messages go to the logger; level 0 = error, 1 = notice, 2 = debug. */
typedef void (*q2_log_fn) (int level, const char *msg);
void q2_set_logger (q2_log_fn fn);

int q2_open (const struct q2_options *opts, struct q2_image **imgp);
/* Writes back everything and closes; returns the first error seen. */
int q2_close (struct q2_image *img);

/* Starts what must not exist before a fork: io_uring, and the compaction
 * worker (a thread) when the image is writable and compact=auto.
 */
int q2_after_fork (struct q2_image *img);

uint64_t q2_virtual_size (const struct q2_image *img);
/* LUKS-encrypted: data is encrypted in 512-byte sectors. */
bool q2_encrypted (const struct q2_image *img);
uint32_t q2_cluster_size (const struct q2_image *img);
bool q2_readonly (const struct q2_image *img);

int q2_read (struct q2_image *img, void *buf, uint64_t count, uint64_t offset);
int q2_write (struct q2_image *img, const void *buf, uint64_t count,
              uint64_t offset, unsigned flags);
/* Both return 1 (not an error) when an internal snapshot still holds some of
 * the range, so its space could not go back to the host.
 */
int q2_zero (struct q2_image *img, uint64_t count, uint64_t offset, unsigned flags);
int q2_discard (struct q2_image *img, uint64_t count, uint64_t offset, unsigned flags);
int q2_flush (struct q2_image *img);

/* Calls fn for consecutive extents starting at offset and covering at least
 * count bytes (fewer calls when req_one); stops at the first non-zero return.
 */
typedef int (*q2_extent_fn) (void *opaque, uint64_t offset, uint64_t length,
                             uint32_t type);
int q2_extents (struct q2_image *img, uint64_t count, uint64_t offset,
                bool req_one, q2_extent_fn fn, void *opaque);

/* What reclaim has done since the image was opened. */
struct q2_stats {
  uint64_t bytes_punched;       /* host bytes turned into holes */
  uint64_t clusters_freed;      /* refcounts that dropped to zero */
  uint64_t l2_tables_freed;
  uint64_t refblocks_freed;
  uint64_t truncations;
  uint64_t bytes_truncated;
  /* Compaction. */
  uint64_t clusters_moved;
  uint64_t bytes_moved;
  uint64_t free_bytes_punched;  /* host space of free clusters given back */
  uint64_t pinned_bytes;        /* past the target, and unable to move */
  /* Host bytes that held data and were punched or cut off, each once
   * (bytes_punched and bytes_truncated can both count a byte, and a punch
   * of a hole counts in bytes_punched again).
   */
  uint64_t bytes_given_back;
  /* Bytes trims (and write-zeroes that may trim) asked for, and those of
   * them that gave nothing back, by reason.
   */
  uint64_t bytes_trimmed;
  uint64_t not_freed_snapshot;  /* shared with an internal snapshot */
  uint64_t not_freed_backing;   /* unallocated over a backing file */
  uint64_t not_freed_small;     /* parts of host blocks (4 KiB) */
  uint64_t not_freed_already_free;
  uint64_t not_freed_compressed;  /* parts of compressed clusters */
  /* Parts of clusters of an encrypted image: a hole there would not read
   * as zeros, so nothing is punched.
   */
  uint64_t not_freed_encrypted;
  /* Gauges, as of the call. */
  uint64_t file_length;
  uint64_t host_allocated;      /* bytes the host file takes on disk */
  uint64_t target_length;       /* what compaction aims at; 0 before it measured */
  uint64_t image_end_offset;    /* end of the last cluster with a refcount */
  /* On a block device (0 on a file): its size, and the smallest size that
   * holds the image (its end, rounded up to 4 MiB, LVM's default extent):
   * what lvreduce may take the volume down to once the image is closed.
   */
  uint64_t device_size;
  uint64_t lvreduce_size;
};
void q2_get_stats (struct q2_image *img, struct q2_stats *stats);

/* Consistency check and figures for the tool (qcow2reclaim info/check). */
struct q2_check {
  uint64_t corruptions;         /* refcount lower than references, bad COPIED, bad offsets */
  uint64_t leaks;               /* refcount higher than references */
  uint64_t total_clusters;      /* guest clusters of the virtual disk */
  uint64_t allocated_clusters;  /* guest clusters with host space (as qemu-img check) */
  uint64_t fragmented_clusters;
  uint64_t compressed_clusters;
  uint64_t image_end_offset;    /* end of the last referenced cluster */
  uint64_t snapshot_only_clusters;  /* referenced only by internal snapshots */
  uint64_t reclaimable_bytes;   /* host space in unreferenced clusters and past the end */
  /* Per internal snapshot, in the table's order (q2_snapshot_count of
   * them, NULL without any): bytes in clusters no other snapshot and not
   * the active layer references, which deleting it would free.
   */
  uint64_t *snapshot_alone;
};
typedef void (*q2_progress_fn) (void *opaque, uint64_t done, uint64_t total);
int q2_check (struct q2_image *img, struct q2_check *res, q2_progress_fn progress,
              void *opaque);
/* Frees what a successful q2_check allocated in res. */
void q2_check_free (struct q2_check *res);

/* Repairs, as qemu-img check -r does (qcow2reclaim check -r). */
enum q2_repair_mode {
  Q2_REPAIR_LEAKS = 1,      /* counts above the references */
  Q2_REPAIR_ALL,            /* and counts below them, and COPIED flags */
};
struct q2_repair_result {
  uint64_t leaks_fixed, corruptions_fixed;
  struct q2_check after;    /* the check of the repaired image (q2_check_free it) */
};
/* The image must have been opened with repair.  Damage a count cannot mend
 * (table entries, refcount blocks, a cluster used as two things) is refused
 * with -EINVAL, said, before anything changes.  The counts are written
 * back and synced before the COPIED flags that rely on them, and the dirty
 * and corrupt marks are cleared, synced, once nothing is left wrong.
 */
int q2_repair (struct q2_image *img, enum q2_repair_mode mode,
               struct q2_repair_result *res, q2_progress_fn progress, void *opaque);

/* What a compaction found and did (qcow2reclaim compact). */
struct q2_compact_result {
  uint64_t length_before, length_after;
  uint64_t used;                /* bytes in clusters with a refcount */
  uint64_t bound;               /* past this length compaction starts by itself */
  uint64_t target;              /* the length it aims at */
  uint64_t reachable;           /* the length moving all that can move gives */
  uint64_t clusters_moved, bytes_moved;
  uint64_t free_bytes_punched;
  /* Bytes past the target that stay where they are, by reason. */
  uint64_t pinned_compressed;   /* compressed clusters */
  uint64_t pinned_shared;       /* shared with internal snapshots */
  uint64_t pinned_snapshot;     /* the snapshots' own tables and data */
  uint64_t pinned_unreferenced; /* counted but referenced by nothing (leaks) */
  uint64_t pinned_bitmaps;      /* persistent bitmaps: directory, tables, data */
};
/* Compacts now, in place (dry_run: only measures and plans); progress
 * sees bytes moved of bytes to move.
 */
int q2_compact (struct q2_image *img, bool dry_run, q2_progress_fn progress,
                void *opaque, struct q2_compact_result *res);

/* The guest-to-host map, as qemu-img map reports it. */
struct q2_map_entry {
  uint64_t start, length;
  int depth;                    /* 0: this image, 1: its backing file, ... */
  bool present, zero, data;
  bool has_offset;
  uint64_t offset;              /* host offset in file */
  const char *file;
};
typedef int (*q2_map_fn) (void *opaque, const struct q2_map_entry *e);
int q2_map (struct q2_image *img, q2_map_fn fn, void *opaque);
const char *q2_file_name (const struct q2_image *img);
uint32_t q2_format_version (const struct q2_image *img);
uint32_t q2_snapshot_count (const struct q2_image *img);
int q2_file_size (struct q2_image *img, uint64_t *size);

/* What the header says, as qemu-img info shows it (qcow2reclaim info).
 * The strings belong to the image.
 */
struct q2_header_info {
  uint32_t version;
  uint32_t refcount_bits;
  const char *compression;      /* "zlib" or "zstd", as qemu-img names them */
  bool lazy_refcounts, corrupt, dirty;
  bool extended_l2;             /* 16-byte L2 entries with 32 subclusters */
  bool bitmaps;                 /* the autoclear bit of persistent bitmaps */
  const char *backing_file;     /* as the header names it; NULL: none */
  const char *backing_format;   /* NULL: the header names none */
  const char *backing_path;     /* the file opened for it; NULL: none */
  /* The external data file as the header names it ("" if it names none);
   * NULL: the image has none.  data_path: the file opened for it.
   */
  const char *data_file, *data_path;
  bool data_file_raw;
  const char *encryption;       /* "luks"; NULL: not encrypted */
  /* Why the plugin would serve the image read-only only (marked corrupt or
   * dirty), as a sentence; NULL: it would serve it for writing.
   */
  const char *write_refusal;
};
void q2_header_info (const struct q2_image *img, struct q2_header_info *info);

/* A persistent dirty bitmap, as the bitmap directory has it (only while
 * the autoclear bit says the directory is valid).
 */
struct q2_bitmap {
  char *name;
  uint64_t granularity;         /* bytes of the disk per bit */
  bool in_use;                  /* inconsistent, or being kept current */
  bool auto_flag;               /* enabled: it records every change */
};
/* The bitmaps in the directory's order, *n of them (NULL and 0: none). */
int q2_bitmaps (struct q2_image *img, struct q2_bitmap **list, uint32_t *n);
void q2_bitmaps_free (struct q2_bitmap *list, uint32_t n);

/* An internal snapshot, as the snapshot table has it. */
struct q2_snapshot {
  char *id, *name;
  uint64_t vm_state_size;       /* bytes of saved VM state */
  uint32_t date_sec, date_nsec; /* when it was taken, since the epoch */
  uint64_t vm_clock_nsec;       /* the guest's clock then */
  bool has_icount;
  uint64_t icount;              /* instructions executed, under record/replay */
};
/* The snapshots in the table's order, q2_snapshot_count of them. */
int q2_snapshots (struct q2_image *img, struct q2_snapshot **list);
void q2_snapshots_free (struct q2_snapshot *list, uint32_t n);

#endif /* QCOW2RECLAIM_H */
