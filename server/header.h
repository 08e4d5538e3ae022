/* The qcow2 header: validation at open, header extensions, and the few
 * fields we ever rewrite (each with one small write inside one sector).
 */
#ifndef Q2_HEADER_H
#define Q2_HEADER_H

#include <stdbool.h>
#include <stdint.h>

struct q2_image;

struct header_extras {
  uint64_t backing_offset;
  uint32_t backing_len;
  char backing_format[32];    /* empty when the extension is absent */
};

/* Parses and validates the header in buf (the first cluster, or as much of
 * it as the file has); fills img's geometry.  file_size guards truncation.
 */
int header_parse (struct q2_image *img, const uint8_t *buf, uint64_t buflen,
                  uint64_t file_size, struct header_extras *ex);

int header_write_reftable (struct q2_image *img, uint64_t offset, uint32_t clusters);
int header_clear_autoclear (struct q2_image *img);

#endif
