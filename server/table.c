/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-format.h"
#include "host.h"
#include "layout.h"
#include "log.h"
#include "table.h"

static uint64_t nsectors (uint64_t entries)
{
  return (entries + TABLE_SECTOR_ENTRIES - 1) / TABLE_SECTOR_ENTRIES;
}

int table_load (struct mem_table *t, struct hostfile *hf, const struct layout *lay,
                const char *what, uint64_t offset, uint64_t size)
{
  uint64_t i;
  int r;

  t->hf = hf;
  t->lay = lay;
  t->what = what;
  t->size = size;
  t->entries = calloc (size ? size : 1, sizeof (uint64_t));
  t->dirty = calloc (nsectors (size) + 1, 1);
  if (!t->entries || !t->dirty)
    return -ENOMEM;
  if (size == 0)
    return 0;
  r = host_pread (hf, t->entries, size * 8, offset);
  if (r < 0) {
    log_error ("%s: cannot read the %s at 0x%" PRIx64 ": %s", lay->name, what,
               offset, strerror (-r));
    return r;
  }
  for (i = 0; i < size; i++)
    t->entries[i] = be64_get (&t->entries[i]);
  return 0;
}

void table_free (struct mem_table *t)
{
  free (t->entries);
  free (t->dirty);
  t->entries = NULL;
  t->dirty = NULL;
  t->size = 0;
}

uint64_t table_get (const struct mem_table *t, uint64_t index)
{
  assert (index < t->size);
  return t->entries[index];
}

void table_set (struct mem_table *t, uint64_t index, uint64_t value)
{
  assert (index < t->size);
  t->entries[index] = value;
  t->dirty[index / TABLE_SECTOR_ENTRIES] = 1;
  t->dirty_gen++;
}

bool table_any_dirty (const struct mem_table *t)
{
  uint64_t i;

  for (i = 0; i < nsectors (t->size); i++)
    if (t->dirty[i])
      return true;
  return false;
}

int table_write_dirty (struct mem_table *t, uint64_t offset)
{
  uint64_t buf[TABLE_SECTOR_ENTRIES];
  uint64_t s, i;
  int r;

  for (s = 0; s < nsectors (t->size); s++) {
    if (!t->dirty[s])
      continue;
    uint64_t first = s * TABLE_SECTOR_ENTRIES;
    uint64_t n = t->size - first < TABLE_SECTOR_ENTRIES ? t->size - first : TABLE_SECTOR_ENTRIES;
    for (i = 0; i < n; i++)
      be64_put (&buf[i], t->entries[first + i]);
    r = host_pwrite (t->hf, buf, n * 8, offset + first * 8);
    if (r < 0) {
      log_error ("%s: cannot write the %s at 0x%" PRIx64 ": %s", t->lay->name, t->what,
                 offset + first * 8, strerror (-r));
      return r;
    }
    t->dirty[s] = 0;
  }
  return 0;
}

int table_write_whole (struct mem_table *t, uint64_t offset, uint64_t clusters)
{
  uint64_t bytes = clusters << t->lay->cluster_bits, i;
  uint64_t *disk;
  int r;

  assert (t->size * 8 <= bytes);
  if (!(disk = calloc (1, bytes)))
    return -ENOMEM;
  for (i = 0; i < t->size; i++)
    be64_put (&disk[i], t->entries[i]);
  r = host_pwrite (t->hf, disk, bytes, offset);
  free (disk);
  if (r < 0) {
    log_error ("%s: cannot write the %s at 0x%" PRIx64 ": %s", t->lay->name, t->what,
               offset, strerror (-r));
    return r;
  }
  memset (t->dirty, 0, nsectors (t->size) + 1);
  return 0;
}

int table_init_entries (struct mem_table *t, struct hostfile *hf,
                        const struct layout *lay, const char *what,
                        uint64_t *entries, uint64_t size)
{
  t->hf = hf;
  t->lay = lay;
  t->what = what;
  t->dirty = calloc (nsectors (size) + 1, 1);
  if (!t->dirty)
    return -ENOMEM;
  t->entries = entries;
  t->size = size;
  return 0;
}
