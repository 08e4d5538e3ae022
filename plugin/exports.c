/* SPDX-License-Identifier: BSD-3-Clause */
/* The registry of the images open under dir=DIR (exports.h). */
#include <config.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "exports.h"
#include "statsfile.h"

enum { OPENING, OPEN, CLOSING };

static char *dir;
static char *statsdir;
static struct q2_options options;
static exports_retire_fn retire;

/* lock guards the list and each export's refs, state and next.  An
 * image is opened and closed outside it, so that one image's write-back
 * does not hold up the others; its state says so meanwhile, and a
 * connection to an image that is opening or closing waits on changed.
 * Waiting for a close matters: the image's lock goes only with it, and
 * opening it again before that would find it locked.
 */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static struct export *list;

/* A missing statsdir is created (its parent must exist), as a missing
 * stats file would be: the systemd unit names one under /run.
 */
static int check_dirs (void)
{
  struct stat st;

  if (stat (dir, &st) < 0 || !S_ISDIR (st.st_mode)) {
    nbdkit_error ("dir=%s: not a folder", dir);
    return -1;
  }
  if (!statsdir)
    return 0;
  if (mkdir (statsdir, 0755) < 0 && errno != EEXIST) {
    nbdkit_error ("statsfile=%s: cannot create the folder for the stats files: %m",
                  statsdir);
    return -1;
  }
  if (stat (statsdir, &st) < 0 || !S_ISDIR (st.st_mode)) {
    nbdkit_error ("statsfile=%s: with dir=, statsfile names a folder for one "
                  "NAME.stats file per image, and this is not a folder", statsdir);
    return -1;
  }
  if (access (statsdir, W_OK | X_OK) < 0) {
    nbdkit_error ("statsfile=%s: the folder for the stats files cannot be "
                  "written: %m", statsdir);
    return -1;
  }
  if (strcmp (statsdir, dir) == 0) {
    nbdkit_error ("statsfile=%s: the stats files cannot go into the folder of the "
                  "images, where they would be listed as images", statsdir);
    return -1;
  }
  return 0;
}

int exports_init (const char *d, const char *sd, const struct q2_options *opts,
                  exports_retire_fn fn)
{
  if (!(dir = strdup (d)) || (sd && !(statsdir = strdup (sd)))) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  options = *opts;
  retire = fn;
  return check_dirs ();
}

void exports_free (void)
{
  free (dir);
  free (statsdir);
  dir = statsdir = NULL;
}

/* Symbolic links are followed: what the folder's owner links in is
 * served, as nbdkit's file plugin does.
 */
static bool is_regular (int dfd, const char *name)
{
  struct stat st;

  return fstatat (dfd, name, &st, 0) == 0 && S_ISREG (st.st_mode);
}

static int visible (const struct dirent *d)
{
  return d->d_name[0] != '.';
}

int exports_list (struct nbdkit_exports *exports)
{
  struct dirent **names;
  int n, i, dfd, r = 0;

  if ((dfd = open (dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0 ||
      (n = scandir (dir, &names, visible, alphasort)) < 0) {
    nbdkit_error ("dir=%s: cannot list the folder: %m", dir);
    if (dfd >= 0)
      close (dfd);
    return -1;
  }
  for (i = 0; i < n; i++) {
    if (r == 0 && is_regular (dfd, names[i]->d_name))
      r = nbdkit_add_export (exports, names[i]->d_name, NULL);
    free (names[i]);
  }
  free (names);
  close (dfd);
  return r;
}

/* The name is untrusted client data: only a plain name of a file in the
 * folder is taken, so that no name reaches outside it.  It is quoted in
 * messages only once it is known to hold no control characters.
 */
static int check_name (const char *name)
{
  const unsigned char *p;

  if (name[0] == '\0') {
    nbdkit_error ("dir=%s: the client asked for the default export (an empty "
                  "name), and there is none: ask for an image by its file name "
                  "in the folder (nbdinfo --list shows them)", dir);
    return ENOENT;
  }
  for (p = (const unsigned char *) name; *p; p++)
    if (*p < 0x20 || *p == 0x7f) {
      nbdkit_error ("dir=%s: an export name with a control character in it is "
                    "refused", dir);
      return EINVAL;
    }
  if (strlen (name) > NAME_MAX) {
    nbdkit_error ("dir=%s: export name '%.32s...' is refused: longer than a file "
                  "name can be", dir, name);
    return EINVAL;
  }
  if (strchr (name, '/')) {
    nbdkit_error ("dir=%s: export name '%s' is refused: it must be the name of a "
                  "file in the folder, with no '/'", dir, name);
    return EINVAL;
  }
  if (name[0] == '.') {
    nbdkit_error ("dir=%s: export name '%s' is refused: names starting with '.' "
                  "are not served", dir, name);
    return EINVAL;
  }
  return 0;
}

static void export_free (struct export *e)
{
  free (e->name);
  free (e->path);
  statsfile_free (e->stats);
  free (e);
}

/* Takes path. */
static struct export *export_new (const char *name, char *path)
{
  struct export *e = calloc (1, sizeof *e);
  char *stats = NULL;

  if (!e || !(e->name = strdup (name)) ||
      (statsdir && asprintf (&stats, "%s/%s.stats", statsdir, name) < 0)) {
    nbdkit_error ("%s: out of memory for a new export", path);
    free (path);
    if (e)
      export_free (e);
    return NULL;
  }
  e->path = path;
  if (stats && !(e->stats = statsfile_new (stats))) {
    free (stats);
    export_free (e);
    return NULL;
  }
  free (stats);
  e->refs = 1;
  e->state = OPENING;
  return e;
}

/* The path of a regular file in the folder, or NULL and an errno. */
static char *image_path (const char *name, int *err)
{
  struct stat st;
  char *path;

  if (asprintf (&path, "%s/%s", dir, name) < 0) {
    nbdkit_error ("dir=%s: out of memory for export '%s'", dir, name);
    *err = ENOMEM;
    return NULL;
  }
  if (stat (path, &st) < 0) {
    *err = errno;
    nbdkit_error ("dir=%s: export '%s': %s", dir, name,
                  *err == ENOENT ? "no such image in the folder" : strerror (*err));
  }
  else if (!S_ISREG (st.st_mode)) {
    *err = EINVAL;
    nbdkit_error ("dir=%s: export '%s' is not a regular file", dir, name);
  }
  else
    return path;
  free (path);
  return NULL;
}

/* Under lock: the entry for name, once it is neither opening nor closing
 * (it may be gone then).
 */
static struct export *find_settled (const char *name)
{
  struct export *e;

  for (;;) {
    for (e = list; e && strcmp (e->name, name) != 0; e = e->next)
      ;
    if (!e || e->state == OPEN)
      return e;
    pthread_cond_wait (&changed, &lock);
  }
}

static void unlink_export (struct export *e)
{
  struct export **pp;

  for (pp = &list; *pp != e; pp = &(*pp)->next)
    ;
  *pp = e->next;
}

int exports_write_refusal (const char *path)
{
  int fd = open (path, O_RDWR | O_CLOEXEC);

  if (fd >= 0) {
    close (fd);
    return 0;
  }
  /* Anything else the engine's open says better. */
  return errno == EACCES || errno == EPERM || errno == EROFS ? errno : 0;
}

/* As with file=, an image that cannot be written is refused with the way
 * out; here only its connection is.
 */
static int check_writable (struct export *e)
{
  int err = exports_write_refusal (e->path);

  if (!err)
    return 0;
  nbdkit_error ("dir=%s: export '%s': cannot open it for writing: %s; to serve "
                "it read-only, add readonly=true (or run nbdkit -r)", dir, e->name,
                strerror (err));
  return -1;
}

/* Opened after nbdkit forked (a connection is there), so what the engine
 * starts after a fork starts at once.  Its stats file is written now, as
 * file= writes its own at start; the server is serving other images by
 * then, so a file that cannot be written is said and the image served.
 */
static int open_image (struct export *e)
{
  struct q2_options o = options;
  int r;

  o.file = e->path;
  o.worker_opaque = e;
  if (!o.readonly && check_writable (e) < 0)
    return -EACCES;
  if ((r = q2_open (&o, &e->img)) < 0)
    return r;
  if ((r = q2_after_fork (e->img)) < 0) {
    q2_close (e->img);
    e->img = NULL;
    return r;
  }
  if (e->stats)
    statsfile_attach (e->stats, e->img, false);
  nbdkit_debug ("%s: opened for export '%s'", e->path, e->name);
  return 0;
}

struct export *exports_get (const char *name)
{
  struct export *e;
  char *path;
  int err, r;

  if (!name)                   /* nbdkit said why */
    return NULL;
  if ((err = check_name (name)) != 0 || !(path = image_path (name, &err))) {
    errno = err;
    return NULL;
  }
  pthread_mutex_lock (&lock);
  if ((e = find_settled (name)) != NULL) {
    e->refs++;
    pthread_mutex_unlock (&lock);
    free (path);
    return e;
  }
  if ((e = export_new (name, path)) != NULL) {
    e->next = list;
    list = e;
  }
  pthread_mutex_unlock (&lock);
  if (!e) {
    errno = ENOMEM;
    return NULL;
  }

  r = open_image (e);
  pthread_mutex_lock (&lock);
  if (r < 0)
    unlink_export (e);
  else
    e->state = OPEN;
  pthread_cond_broadcast (&changed);
  pthread_mutex_unlock (&lock);
  if (r < 0) {
    export_free (e);
    /* The client learns what the log says: a lock held elsewhere, no
     * permission, a refused image.
     */
    errno = -r;
    return NULL;
  }
  return e;
}

/* The last write-back goes first, so that the counters written and
 * handed to retire are final; the stats file is detached before the
 * close, so that its writer thread never reads a closed image.  Closing
 * releases the image's lock.
 */
static void close_image (struct export *e)
{
  if (!q2_readonly (e->img))
    q2_flush (e->img);
  if (e->stats)
    statsfile_detach (e->stats);
  retire (e);
  if (q2_close (e->img) < 0)
    nbdkit_error ("%s: metadata could not be written back when its last "
                  "connection ended", e->path);
  e->img = NULL;
  nbdkit_debug ("%s: closed: no connection to export '%s' is left", e->path, e->name);
}

void exports_put (struct export *e)
{
  pthread_mutex_lock (&lock);
  if (--e->refs > 0) {
    pthread_mutex_unlock (&lock);
    return;
  }
  e->state = CLOSING;
  pthread_mutex_unlock (&lock);

  close_image (e);
  pthread_mutex_lock (&lock);
  unlink_export (e);
  pthread_cond_broadcast (&changed);
  pthread_mutex_unlock (&lock);
  export_free (e);
}
