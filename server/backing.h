/* Backing files: the chain below an image (qcow2 or raw), read through
 * where the image has nothing allocated.
 */
#ifndef Q2_BACKING_H
#define Q2_BACKING_H

#include <stdint.h>

struct q2_image;
struct backing;

/* Opens the backing file named in the header (or the override); depth
 * counts the images above, to refuse loops.
 */
int backing_open (struct q2_image *img, const char *name, const char *format,
                  int depth, struct backing **bp);
void backing_close (struct backing *b);

/* Reads len bytes at guest offset off; past the backing file's end: zeros. */
int backing_read (struct backing *b, void *buf, uint64_t len, uint64_t off);
/* Block status of the backing file at off, for at most len bytes. */
int backing_status (struct backing *b, uint64_t off, uint64_t len,
                    uint32_t *type, uint64_t *run);

struct q2_map_entry;
int backing_map_status (struct backing *b, uint64_t off, uint64_t len, int depth,
                        struct q2_map_entry *e);

#endif
