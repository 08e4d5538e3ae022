/* SPDX-License-Identifier: BSD-3-Clause */
/* The qcow2 header: validation at open, header extensions, and the few
 * fields we ever rewrite, each with one small write inside one sector, so
 * that a switch of the refcount table is atomic.
 */
#ifndef Q2_HEADER_H
#define Q2_HEADER_H

#include <stdbool.h>
#include <stdint.h>

struct hostfile;
struct layout;

struct header_extras {
  uint64_t backing_offset;
  uint32_t backing_len;
  char backing_format[32];    /* empty when the extension is absent */
  uint64_t data_file_offset;  /* the data file's name in the first cluster; 0: none */
  uint32_t data_file_len;
};

/* Parses and validates the header in buf (the first cluster, or as much of
 * it as the file has) into lay's geometry and places; file_size guards
 * truncation.  readonly allows images marked corrupt or dirty.
 */
int header_parse (struct layout *lay, const uint8_t *buf, uint64_t buflen,
                  uint64_t file_size, bool readonly, struct header_extras *ex);
/* Why an image header_parse accepted read-only cannot be opened for
 * writing (marked corrupt or dirty), as a sentence; NULL: it can.
 */
const char *header_write_refusal (const struct layout *lay);

/* Each of these is one write of 12 bytes inside the first sector. */
int header_write_reftable (struct hostfile *hf, uint64_t offset, uint32_t clusters);
int header_write_l1 (struct hostfile *hf, uint64_t offset, uint32_t entries);
int header_write_snapshots (struct hostfile *hf, uint64_t offset, uint32_t count);

enum header_table { HEADER_L1, HEADER_REFTABLE, HEADER_SNAPSHOTS, HEADER_BITMAP_DIR };

/* Switches the header from one place of a table to another (size: L1
 * entries, refcount table clusters, or snapshots; unused for the bitmap
 * directory, whose offset is in its extension), synced.  The new table must be on
 * disk.  If the write or its sync fails, the disk may name either table, so
 * the old values are written back; *unsure says that failed too, and the
 * caller must stop changing metadata.
 */
int header_switch_table (struct hostfile *hf, const struct layout *lay,
                         enum header_table which, uint64_t new_offset,
                         uint64_t old_offset, uint32_t size, bool *unsure);
/* Clears the autoclear bits we do not maintain before the first write:
 * the bitmaps' bit too unless keep_bitmaps (they are kept current).
 */
int header_clear_autoclear (struct hostfile *hf, struct layout *lay, bool keep_bitmaps);
/* Clears incompatible feature bits (the dirty and corrupt marks a repair
 * takes away), one write inside the first sector, synced.
 */
int header_clear_incompat (struct hostfile *hf, struct layout *lay, uint64_t bits);

#endif
