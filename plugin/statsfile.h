/* SPDX-License-Identifier: BSD-3-Clause */
/* statsfile=: an image's reclaim counters in a file that follows them
 * while the server runs (statsfile.c).  file= has one such file, dir= one
 * per open image (STATSDIR/NAME.stats).
 */
#ifndef Q2R_STATSFILE_H
#define Q2R_STATSFILE_H

#include <stdbool.h>
#include <stddef.h>

#include "qcow2reclaim.h"

struct statsfile;

/* The counters as name=value lines, the format of the file. */
void statsfile_format (struct q2_image *img, char *buf, size_t len);

/* statsfile=FILE without dir=: the full path of FILE, whose folder must
 * exist and which must not be a folder; NULL, said, otherwise.
 */
char *statsfile_resolve (const char *value);

/* statsfile=DIR with dir=: the full path of DIR, which may not exist yet
 * but whose parent must; NULL, said, otherwise.
 */
char *statsfile_resolve_folder (const char *value);

/* The state of the file at path (copied), for an image not open yet:
 * nothing is written before statsfile_attach.  NULL, said, if out of
 * memory.
 */
struct statsfile *statsfile_new (const char *path);
void statsfile_free (struct statsfile *s);

/* The image is open: the file is written now, and from now on follows
 * img.  required: a file that cannot be written now is refused (said,
 * -1, not attached); otherwise the failure is said once as a later one
 * would be, and the file is attached all the same.
 */
int statsfile_attach (struct statsfile *s, struct q2_image *img, bool required);

/* Before the image closes: a last write, and the writer thread forgets
 * it, so that it never touches a closed image.  Updates asked for after
 * this (the compaction worker stops only in q2_close) are dropped.
 */
void statsfile_detach (struct statsfile *s);

/* The counters changed: written now if always or if the last write is a
 * tenth of a second old, else by the writer thread when it is.
 */
void statsfile_update (struct statsfile *s, bool always);

/* The writer thread, started after nbdkit forks (threads do not survive
 * it) and stopped at unload.
 */
int statsfile_start (void);
void statsfile_stop (void);

#endif
