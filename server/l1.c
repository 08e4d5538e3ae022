#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "image.h"
#include "l1.h"
#include "log.h"

static uint64_t nsectors (uint64_t entries)
{
  return (entries + TABLE_SECTOR_ENTRIES - 1) / TABLE_SECTOR_ENTRIES;
}

int table_load (struct q2_image *img, struct mem_table *t, const char *what)
{
  uint64_t i;
  int r;

  t->disk_size = t->size;
  t->entries = calloc (t->size ? t->size : 1, sizeof (uint64_t));
  t->dirty = calloc (nsectors (t->size) + 1, 1);
  if (!t->entries || !t->dirty)
    return -ENOMEM;
  if (t->size == 0)
    return 0;
  r = host_pread (&img->hf, t->entries, t->size * 8, t->offset);
  if (r < 0) {
    q2_error ("%s: cannot read the %s at 0x%" PRIx64 ": %s", img->name, what,
              t->offset, strerror (-r));
    return r;
  }
  for (i = 0; i < t->size; i++)
    t->entries[i] = be64_get (&t->entries[i]);
  return 0;
}

void table_free (struct mem_table *t)
{
  free (t->entries);
  free (t->dirty);
  t->entries = NULL;
  t->dirty = NULL;
}

void table_set (struct mem_table *t, uint64_t index, uint64_t value)
{
  t->entries[index] = value;
  t->dirty[index / TABLE_SECTOR_ENTRIES] = 1;
}

int table_any_dirty (const struct mem_table *t)
{
  uint64_t i;

  for (i = 0; i < nsectors (t->size); i++)
    if (t->dirty[i])
      return 1;
  return 0;
}

int table_write_dirty (struct q2_image *img, struct mem_table *t, const char *what)
{
  uint64_t s, i;
  uint64_t buf[TABLE_SECTOR_ENTRIES];
  int r;

  /* While the refcount table grows, entries beyond the old table's room
   * stay dirty in memory until the new table is in place.
   */
  for (s = 0; s < nsectors (t->disk_size); s++) {
    if (!t->dirty[s])
      continue;
    uint64_t first = s * TABLE_SECTOR_ENTRIES;
    uint64_t n = t->disk_size - first < TABLE_SECTOR_ENTRIES ? t->disk_size - first : TABLE_SECTOR_ENTRIES;
    for (i = 0; i < n; i++)
      be64_put (&buf[i], t->entries[first + i]);
    r = host_pwrite (&img->hf, buf, n * 8, t->offset + first * 8);
    if (r < 0) {
      q2_error ("%s: cannot write the %s at 0x%" PRIx64 ": %s", img->name, what,
                t->offset + first * 8, strerror (-r));
      return r;
    }
    t->dirty[s] = 0;
  }
  return 0;
}

int table_resize (struct mem_table *t, uint64_t size)
{
  uint64_t *e = realloc (t->entries, size * sizeof *e);
  uint8_t *d;

  if (!e)
    return -ENOMEM;
  t->entries = e;
  d = realloc (t->dirty, nsectors (size) + 1);
  if (!d)
    return -ENOMEM;
  t->dirty = d;
  if (size > t->size) {
    memset (e + t->size, 0, (size - t->size) * sizeof *e);
    memset (d + nsectors (t->size), 0, nsectors (size) + 1 - nsectors (t->size));
  }
  t->size = size;
  return 0;
}
