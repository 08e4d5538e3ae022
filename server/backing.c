/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <errno.h>
#include <libgen.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "qcow2-format.h"
#include "qcow2reclaim.h"
#include "backing.h"
#include "host.h"
#include "hostlock.h"
#include "log.h"

/* Deeper than any real chain; a loop the inode check misses ends here. */
#define MAX_CHAIN 16

struct backing {
  const struct backing_ops *ops;
  void *qcow2;                /* the qcow2 image's handle, or NULL for raw */
  struct hostfile raw;
  uint64_t size;
  char *path;                 /* the file opened */
};

/* Relative names are relative to the folder of the image naming them. */
static char *resolve (const char *image, const char *name)
{
  char *copy, *dir, *path;

  /* An image named without a folder has its backing file beside it, in
   * the current folder: keep the name as written, as QEMU does.
   */
  if (name[0] == '/' || !strchr (image, '/'))
    return strdup (name);
  copy = strdup (image);
  if (!copy)
    return NULL;
  dir = dirname (copy);
  if (asprintf (&path, "%s/%s", dir, name) < 0)
    path = NULL;
  free (copy);
  return path;
}

/* The format of a backing file the header does not name: qcow2 if it has
 * the magic, else raw, as QEMU probes (but never a format that could make
 * a raw file be read as something else).
 */
static int probe_format (const char *path, char *fmt, size_t len)
{
  struct hostfile hf;
  uint8_t magic[4];
  uint64_t size;
  int r = host_open (&hf, path, true);

  if (r == 0)
    r = host_size (&hf, &size);
  if (r == 0 && size >= 4)
    r = host_pread (&hf, magic, 4, 0);
  host_close (&hf);
  if (r == 0)
    snprintf (fmt, len, "%s", size >= 4 && be32_get (magic) == QCOW2_MAGIC ? "qcow2" : "raw");
  return r;
}

static int open_raw (struct backing *b, const char *image, const char *path,
                     bool force_share)
{
  int r = host_open (&b->raw, path, true);

  if (r < 0)
    log_error ("%s: cannot open backing file %s: %s", image, path, strerror (-r));
  if (r == 0 && !force_share)
    r = hostlock_take (&b->raw, false);
  if (r == 0)
    r = host_size (&b->raw, &b->size);
  return r;
}

/* A file already in the chain, named again (a -> b -> a): said as a loop,
 * before the lock it would collide with speaks of another program.
 */
static int check_loop (const struct backing_chain *chain, const char *path)
{
  const struct backing_chain *p;
  struct stat sb;

  if (stat (path, &sb) < 0)
    return 0;           /* the open that follows says why */
  for (p = chain; p; p = p->above)
    if (p->dev == sb.st_dev && p->ino == sb.st_ino) {
      if (strcmp (path, p->name) == 0)
        log_error ("%s: the backing chain loops: backing file %s is already in the "
                   "chain", chain->name, path);
      else
        log_error ("%s: the backing chain loops: backing file %s is the same file as "
                   "%s, already in the chain", chain->name, path, p->name);
      return -ELOOP;
    }
  return 0;
}

int backing_open (const struct backing_ops *ops, const struct backing_chain *chain,
                  const char *name, const char *format, int depth, bool force_share,
                  struct backing **bp)
{
  const char *image = chain->name;
  struct backing *b;
  char fmt[32];
  char *path;
  int r;

  *bp = NULL;
  if (depth >= MAX_CHAIN) {
    log_error ("%s: the backing chain is more than %d images deep (does it loop?)",
               image, MAX_CHAIN);
    return -ELOOP;
  }
  path = resolve (image, name);
  b = calloc (1, sizeof *b);
  if (!path || !b) {
    free (path);
    free (b);
    return -ENOMEM;
  }
  b->ops = ops;
  if ((r = check_loop (chain, path)) < 0)
    goto fail;
  snprintf (fmt, sizeof fmt, "%s", format ? format : "");
  if (!fmt[0] && (r = probe_format (path, fmt, sizeof fmt)) < 0) {
    log_error ("%s: cannot open backing file %s: %s", image, path, strerror (-r));
    goto fail;
  }
  if (strcmp (fmt, "qcow2") == 0)
    r = ops->open (path, depth + 1, force_share, chain, &b->qcow2);
  else if (strcmp (fmt, "raw") == 0)
    r = open_raw (b, image, path, force_share);
  else {
    log_error ("%s: backing file %s has format \"%s\"; only qcow2 and raw are supported",
               image, path, fmt);
    r = -ENOTSUP;
  }
  if (r < 0) {
    log_error ("%s: cannot use backing file %s", image, path);
    goto fail;
  }
  if (b->qcow2)
    b->size = ops->size (b->qcow2);
  b->path = path;
  *bp = b;
  return 0;
fail:
  free (path);
  backing_close (b);
  return r;
}

void backing_close (struct backing *b)
{
  if (!b)
    return;
  if (b->qcow2)
    b->ops->close (b->qcow2);
  host_close (&b->raw);
  free (b->path);
  free (b);
}

const char *backing_path (const struct backing *b)
{
  return b->path;
}

int backing_read (struct backing *b, void *buf, uint64_t len, uint64_t off)
{
  uint64_t n = off >= b->size ? 0 : (len < b->size - off ? len : b->size - off);
  int r = 0;

  if (n)
    r = b->qcow2 ? b->ops->read (b->qcow2, buf, n, off) : host_pread (&b->raw, buf, n, off);
  if (r == 0 && n < len)
    memset ((char *) buf + n, 0, len - n);
  return r;
}

static int raw_status (struct backing *b, uint64_t off, uint64_t len,
                       uint32_t *type, uint64_t *run)
{
  uint64_t data, hole;
  int r;

  if ((r = host_seek_data (&b->raw, off, &data)) < 0)
    return r;
  if (data > off) {
    /* A hole up to the next data (or the end). */
    *type = Q2_EXTENT_HOLE | Q2_EXTENT_ZERO;
    *run = (data > b->size ? b->size : data) - off;
  }
  else {
    if ((r = host_seek_hole (&b->raw, off, &hole)) < 0)
      return r;
    *type = 0;
    *run = (hole > b->size ? b->size : hole) - off;
  }
  if (*run > len || *run == 0)
    *run = len;
  return 0;
}

int backing_status (struct backing *b, uint64_t off, uint64_t len,
                    uint32_t *type, uint64_t *run)
{
  if (off >= b->size) {
    *type = Q2_EXTENT_HOLE | Q2_EXTENT_ZERO;
    *run = len;
    return 0;
  }
  if (len > b->size - off)
    len = b->size - off;
  if (b->qcow2)
    return b->ops->block_status (b->qcow2, off, len, type, run);
  return raw_status (b, off, len, type, run);
}

int backing_map_status (struct backing *b, uint64_t off, uint64_t len, int depth,
                        struct q2_map_entry *e)
{
  uint32_t type;
  uint64_t run;
  int r;

  if (off >= b->size) {
    e->length = len;
    return 0;
  }
  if (len > b->size - off)
    len = b->size - off;
  if (b->qcow2)
    return b->ops->map_status (b->qcow2, off, len, depth, e);
  /* A raw file maps one to one. */
  if ((r = raw_status (b, off, len, &type, &run)) < 0)
    return r;
  e->length = run;
  e->depth = depth;
  e->file = b->raw.name;
  e->present = true;
  e->zero = !!(type & Q2_EXTENT_ZERO);
  e->data = !(type & Q2_EXTENT_ZERO);
  e->has_offset = true;
  e->offset = off;
  return 0;
}
