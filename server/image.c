#include <config.h>

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "image.h"
#include "copied.h"
#include "header.h"
#include "backing.h"
#include "flush.h"
#include "l1.h"
#include "log.h"

#define HEADER_READ_MAX (2u << 20)   /* the largest cluster holds the header */

int q2_corrupt (struct q2_image *img, const char *fmt, ...)
{
  char msg[768];
  va_list ap;

  if (img->quiet_corruption)
    return -EIO;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  q2_error ("%s: corrupt image: %s", img->name, msg);
  return -EIO;
}

static bool overlaps (uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
  return blen && a < b + blen && b < a + alen;
}

/* self is what the range is meant to hold: data (META_NONE), or one kind
 * of metadata, which must then be known as that kind.
 */
int check_host_range (struct q2_image *img, uint64_t offset, uint64_t len,
                      enum meta_kind self, const char *what, uint64_t guest)
{
  static const char *const held[] = {
    [META_L2] = "which holds an L2 table", [META_REFBLOCK] = "which holds a refcount block",
  };
  enum meta_kind k;
  uint64_t c;
  const char *why = NULL;
  uint64_t cs = img->cluster_size;
  char gbuf[48] = "";

  /* The last cluster may end past the end of the file: partial writes
   * into fresh clusters leave the rest as a hole, which reads as zeros.
   */
  if (offset >= img->file_end)
    why = "past the end of the file";
  else if (offset < cs)
    why = "inside the image header";
  else if (overlaps (offset, len, img->l1.offset, (img->l1.size * 8 + cs - 1) & ~(cs - 1)))
    why = "inside the L1 table";
  else if (overlaps (offset, len, img->reftable.offset, img->reftable_clusters * cs))
    why = "inside the refcount table";
  for (c = offset >> img->cluster_bits; !why && c <= (offset + len - 1) >> img->cluster_bits; c++)
    if ((k = overlap_kind (&img->meta, c)) != META_NONE && k != self)
      why = held[k];
  if (!why)
    return 0;
  if (guest != UINT64_MAX)
    snprintf (gbuf, sizeof gbuf, " for guest offset 0x%" PRIx64, guest);
  return q2_corrupt (img, "%s%s points to host offset 0x%" PRIx64 ", %s",
                     what, gbuf, offset, why);
}

static int read_header (struct q2_image *img, char **backing_name, char *backing_fmt, size_t fmtlen)
{
  struct header_extras ex;
  uint64_t size, n;
  uint8_t *buf;
  int r;

  if ((r = host_size (&img->hf, &size)) < 0)
    return r;
  img->file_end = size;
  n = size < HEADER_READ_MAX ? size : HEADER_READ_MAX;
  buf = calloc (1, n > HDR_V3_MIN_LENGTH ? n : HDR_V3_MIN_LENGTH);
  if (!buf)
    return -ENOMEM;
  r = host_pread (&img->hf, buf, n, 0);
  if (r < 0)
    q2_error ("%s: cannot read the header: %s", img->name, strerror (-r));
  if (r == 0)
    r = header_parse (img, buf, n, size, &ex);
  if (r == 0 && ex.backing_offset && ex.backing_len) {
    *backing_name = strndup ((char *) buf + ex.backing_offset, ex.backing_len);
    snprintf (backing_fmt, fmtlen, "%s", ex.backing_format);
    if (!*backing_name)
      r = -ENOMEM;
  }
  free (buf);
  return r;
}

/* backing=none refuses images that need a backing file; backing=FILE
 * replaces the one the header names.
 */
static int open_backing (struct q2_image *img, const char *override, char *name,
                         const char *fmt, int depth)
{
  if (override && strcmp (override, "none") == 0) {
    if (!name)
      return 0;
    q2_error ("%s: the image has a backing file (%s), and backing=none refuses to "
              "follow it", img->name, name);
    return -EINVAL;
  }
  if (override)
    return backing_open (img, override, NULL, depth, &img->backing);
  if (!name)
    return 0;
  return backing_open (img, name, fmt[0] ? fmt : NULL, depth, &img->backing);
}

static int image_open (const struct q2_options *o, int depth,
                       const struct q2_image *child, struct q2_image **imgp)
{
  struct q2_image *img;
  char *backing_name = NULL;
  char backing_fmt[32] = "";
  int r;

  *imgp = NULL;
  img = calloc (1, sizeof *img);
  if (!img)
    return -ENOMEM;
  pthread_mutex_init (&img->meta_lock, NULL);
  range_lock_init (&img->guest_lock);
  img->readonly = o->readonly;
  img->discard = o->discard;
  img->detect_zeroes = o->detect_zeroes;
  img->child = child;
  img->hf.fd = -1;
  pthread_mutex_init (&img->hf.ring_lock, NULL);
  r = host_open (&img->hf, o->file, o->readonly);
  if (r < 0)
    goto fail;
  img->name = img->hf.name;
  if ((r = image_lock (img->hf.fd, img->name, !o->readonly)) < 0)
    goto fail;
  if ((r = read_header (img, &backing_name, backing_fmt,
                        sizeof backing_fmt)) < 0)
    goto fail;
  if ((r = table_load (img, &img->l1, "L1 table")) < 0 ||
      (r = table_load (img, &img->reftable, "refcount table")) < 0)
    goto fail;
  if ((r = overlap_build (img)) < 0)
    goto fail;
  r = cache_init (&img->cache, o->cache_size ? o->cache_size : Q2_DEFAULT_CACHE_SIZE,
                  img->cluster_size);
  if (r < 0)
    goto fail;
  r = open_backing (img, o->backing, backing_name, backing_fmt, depth);
  img->child = NULL;
  if (r < 0)
    goto fail;
  if (!img->readonly && (r = header_clear_autoclear (img)) < 0)
    goto fail;
  free (backing_name);
  *imgp = img;
  return 0;
fail:
  free (backing_name);
  q2_close (img);
  return r;
}

int q2_open (const struct q2_options *o, struct q2_image **imgp)
{
  return image_open (o, 0, NULL, imgp);
}

int image_open_chain (const char *path, int depth, const struct q2_image *child,
                      struct q2_image **imgp)
{
  struct q2_options o = { .file = path, .readonly = true,
                          .cache_size = Q2_DEFAULT_CACHE_SIZE / 4 };
  return image_open (&o, depth, child, imgp);
}

int q2_after_fork (struct q2_image *img)
{
  if (!img->readonly)
    host_start_ring (&img->hf);
  return 0;
}

int q2_close (struct q2_image *img)
{
  bool synced;
  int r = 0;

  if (!img)
    return 0;
  if (!img->readonly && img->hf.fd >= 0 && img->cache.buckets) {
    pthread_mutex_lock (&img->meta_lock);
    r = flush_metadata (img, &synced);
    pthread_mutex_unlock (&img->meta_lock);
  }
  backing_close (img->backing);
  if (img->cache.buckets)
    cache_free (&img->cache);
  overlap_free (&img->meta);
  table_free (&img->l1);
  table_free (&img->reftable);
  u64_list_free (&img->pending);
  copied_free (img);
  host_close (&img->hf);
  range_lock_destroy (&img->guest_lock);
  pthread_mutex_destroy (&img->meta_lock);
  free (img);
  return r;
}

uint64_t q2_virtual_size (const struct q2_image *img)
{
  return img->virtual_size;
}

uint32_t q2_cluster_size (const struct q2_image *img)
{
  return (uint32_t) img->cluster_size;
}

bool q2_readonly (const struct q2_image *img)
{
  return img->readonly;
}
