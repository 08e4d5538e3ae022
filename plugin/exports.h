/* SPDX-License-Identifier: BSD-3-Clause */
/* dir=DIR: the images of one folder, chosen by export name.  An image is
 * opened when its first connection arrives and written back, unlocked and
 * closed when its last one ends.  The connections to one image share one
 * engine instance (one metadata cache), so multi-conn stays safe.
 */
#ifndef Q2R_EXPORTS_H
#define Q2R_EXPORTS_H

#include <stdbool.h>

#include "qcow2reclaim.h"

struct nbdkit_exports;

/* One image being served.  Everything but the registry's fields is set
 * before the first connection gets it and stays until the last one ends.
 */
struct export {
  char *name;                 /* the export name: a file name in the folder */
  char *path;                 /* DIR/name */
  struct statsfile *stats;    /* STATSDIR/name.stats, or NULL */
  struct q2_image *img;

  /* The registry's (exports.c), under its lock. */
  unsigned refs;              /* connections holding it */
  int state;
  struct export *next;
};

/* Called with an image's final counters, after its last write-back and
 * its stats file's last write, before it is closed.
 */
typedef void (*exports_retire_fn) (struct export *e);

/* dir and statsdir (NULL: no stats files) are full paths; opts is copied,
 * and its file and worker_opaque are set per image (the latter to the
 * export; readonly includes nbdkit -r).  Checks that both folders are
 * there, creating statsdir (one level) if it is not, and that statsdir
 * can be written.
 */
int exports_init (const char *dir, const char *statsdir,
                  const struct q2_options *opts, exports_retire_fn retire);
void exports_free (void);

/* The regular files of the folder whose names do not start with '.'. */
int exports_list (struct nbdkit_exports *list);

/* The export of that name, opened if no connection holds it; NULL (the
 * reason logged, errno set) if the name is refused or the image cannot
 * be opened.
 */
struct export *exports_get (const char *name);
/* The connection is done with it: the last one closes the image. */
void exports_put (struct export *e);
/* EACCES, EPERM or EROFS when this process may not open path for
 * writing, for a refusal that says the way out; 0 otherwise.
 */
int exports_write_refusal (const char *path);

#endif
