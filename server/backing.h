/* SPDX-License-Identifier: BSD-3-Clause */
/* Backing files: the chain below an image, read through where the image
 * has nothing allocated.  A raw backing file is read here directly; a
 * qcow2 one is an image of its own, reached through the operations the
 * image layer hands in (as an nbdkit filter calls next->pread), so this
 * layer knows nothing of the image above or below it.
 */
#ifndef Q2_BACKING_H
#define Q2_BACKING_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

struct backing;
struct q2_map_entry;

/* The images from the one opening a backing file up to the top: the file
 * a backing file must not be (a -> b -> a would never end).
 */
struct backing_chain {
  const struct backing_chain *above;
  dev_t dev;
  ino_t ino;
  const char *name;
};

struct backing_ops {
  /* Opens the qcow2 image at path, depth images below the top, read-only;
   * force_share: without the image lock, as the top was opened.
   */
  int (*open) (const char *path, int depth, bool force_share,
               const struct backing_chain *chain, void **handle);
  void (*close) (void *handle);
  uint64_t (*size) (void *handle);
  int (*read) (void *handle, void *buf, uint64_t len, uint64_t offset);
  int (*block_status) (void *handle, uint64_t offset, uint64_t len,
                       uint32_t *type, uint64_t *run);
  int (*map_status) (void *handle, uint64_t offset, uint64_t len, int depth,
                     struct q2_map_entry *e);
};

/* Opens the backing file name (as the image at the head of chain names
 * it; relative to that image's folder) of the given format (NULL: probe).
 * depth counts the images above the new one.  force_share takes no lock on
 * it (the top was opened with force_share: everything is read as it is).
 */
int backing_open (const struct backing_ops *ops, const struct backing_chain *chain,
                  const char *name, const char *format, int depth, bool force_share,
                  struct backing **bp);
void backing_close (struct backing *b);
/* The file opened (the name resolved against the image's folder). */
const char *backing_path (const struct backing *b);

/* Reads len bytes at guest offset off; past the backing file's end: zeros. */
int backing_read (struct backing *b, void *buf, uint64_t len, uint64_t off);
/* Block status of the backing file at off, for at most len bytes. */
int backing_status (struct backing *b, uint64_t off, uint64_t len,
                    uint32_t *type, uint64_t *run);
/* qemu-img map's view of the backing file at off, depth layers down. */
int backing_map_status (struct backing *b, uint64_t off, uint64_t len, int depth,
                        struct q2_map_entry *e);

#endif
