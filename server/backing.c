#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "image.h"
#include "backing.h"
#include "log.h"

/* Deeper than any real chain; a loop (a -> b -> a) ends here. */
#define MAX_CHAIN 16

struct backing {
  struct q2_image *qcow2;     /* or NULL for raw */
  struct hostfile raw;
  uint64_t size;
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

static int probe_format (const char *path, char *fmt, size_t len)
{
  uint8_t magic[4];
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  ssize_t n;

  if (fd == -1)
    return -errno;
  n = pread (fd, magic, 4, 0);
  close (fd);
  snprintf (fmt, len, "%s", n == 4 && be32_get (magic) == QCOW2_MAGIC ? "qcow2" : "raw");
  return 0;
}

static int open_raw (struct backing *b, const char *path)
{
  int r = host_open (&b->raw, path, true);

  if (r == 0)
    r = image_lock (b->raw.fd, path, false);
  if (r == 0)
    r = host_size (&b->raw, &b->size);
  return r;
}

/* A file already in the chain, named again (a -> b -> a): said as a loop,
 * before the lock it would collide with speaks of another program.
 */
static int check_loop (const struct q2_image *img, const char *path)
{
  const struct q2_image *p;
  struct stat sb, sp;

  if (stat (path, &sb) < 0)
    return 0;           /* the open that follows says why */
  for (p = img; p; p = p->child)
    if (fstat (p->hf.fd, &sp) == 0 && sp.st_dev == sb.st_dev && sp.st_ino == sb.st_ino) {
      if (strcmp (path, p->name) == 0)
        q2_error ("%s: the backing chain loops: backing file %s is already in the "
                  "chain", img->name, path);
      else
        q2_error ("%s: the backing chain loops: backing file %s is the same file as "
                  "%s, already in the chain", img->name, path, p->name);
      return -ELOOP;
    }
  return 0;
}

int backing_open (struct q2_image *img, const char *name, const char *format,
                  int depth, struct backing **bp)
{
  struct backing *b;
  char fmt[32];
  char *path;
  int r;

  *bp = NULL;
  if (depth >= MAX_CHAIN) {
    q2_error ("%s: the backing chain is more than %d images deep (does it loop?)",
              img->name, MAX_CHAIN);
    return -ELOOP;
  }
  path = resolve (img->name, name);
  b = calloc (1, sizeof *b);
  if (!path || !b) {
    free (path);
    free (b);
    return -ENOMEM;
  }
  b->raw.fd = -1;
  if ((r = check_loop (img, path)) < 0)
    goto fail;
  snprintf (fmt, sizeof fmt, "%s", format ? format : "");
  if (!fmt[0] && (r = probe_format (path, fmt, sizeof fmt)) < 0) {
    q2_error ("%s: cannot open backing file %s: %s", img->name, path, strerror (-r));
    goto fail;
  }
  if (strcmp (fmt, "qcow2") == 0)
    r = image_open_chain (path, depth + 1, img, &b->qcow2);
  else if (strcmp (fmt, "raw") == 0)
    r = open_raw (b, path);
  else {
    q2_error ("%s: backing file %s has format \"%s\"; only qcow2 and raw are supported",
              img->name, path, fmt);
    r = -ENOTSUP;
  }
  if (r < 0) {
    q2_error ("%s: cannot use backing file %s", img->name, path);
    goto fail;
  }
  if (b->qcow2)
    b->size = q2_virtual_size (b->qcow2);
  free (path);
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
    q2_close (b->qcow2);
  if (b->raw.fd >= 0)
    host_close (&b->raw);
  free (b);
}

int backing_read (struct backing *b, void *buf, uint64_t len, uint64_t off)
{
  uint64_t n = off >= b->size ? 0 : (len < b->size - off ? len : b->size - off);
  int r = 0;

  if (n)
    r = b->qcow2 ? q2_read (b->qcow2, buf, n, off) : host_pread (&b->raw, buf, n, off);
  if (r == 0 && n < len)
    memset ((char *) buf + n, 0, len - n);
  return r;
}

static int raw_status (struct backing *b, uint64_t off, uint64_t len,
                       uint32_t *type, uint64_t *run)
{
  off_t data = lseek (b->raw.fd, off, SEEK_DATA), hole;

  if (data == (off_t) -1 || (uint64_t) data > off) {
    /* A hole up to the next data (or the end). */
    uint64_t end = data == (off_t) -1 ? b->size : (uint64_t) data;
    *type = Q2_EXTENT_HOLE | Q2_EXTENT_ZERO;
    *run = end - off;
  }
  else {
    hole = lseek (b->raw.fd, off, SEEK_HOLE);
    *type = 0;
    *run = (hole == (off_t) -1 ? b->size : (uint64_t) hole) - off;
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
    return image_block_status (b->qcow2, off, len, type, run);
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
    return image_map_status (b->qcow2, off, len, depth, e);
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
