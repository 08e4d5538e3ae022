/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "cmdline.h"

/* nbdkit's own -r (--readonly, --read-only), read from its command line
 * as its getopt_long reads it: options anywhere before "--" (the plugin's
 * key=value words are not options), short ones in clusters, long ones by
 * prefix.  nbdkit 1.32 tells plugins of -r only in .open, per connection,
 * after the image is opened (q2r_get_ready), and has no call to ask.
 */
static const char short_with_arg[] = "DegipPtuU";
static const struct nbdkit_option {
  const char *name;
  bool arg, ro;
} nbdkit_options[] = {
#define FLAG(name) { name, false, false }
#define WITH_ARG(name) { name, true, false }
#define READONLY(name) { name, false, true }
  FLAG ("ipv4-only"), FLAG ("ipv6-only"), WITH_ARG ("debug"), FLAG ("dump-config"),
  FLAG ("dump-plugin"), FLAG ("exit-with-parent"), WITH_ARG ("export"),
  WITH_ARG ("export-name"), WITH_ARG ("exportname"), WITH_ARG ("filter"),
  FLAG ("foreground"), FLAG ("no-fork"), WITH_ARG ("group"), FLAG ("help"),
  WITH_ARG ("ip-addr"), WITH_ARG ("ipaddr"), WITH_ARG ("log"), FLAG ("long-options"),
  WITH_ARG ("mask-handshake"), FLAG ("new-style"), FLAG ("newstyle"), FLAG ("no-sr"),
  FLAG ("old-style"), FLAG ("oldstyle"), WITH_ARG ("pid-file"), WITH_ARG ("pidfile"),
  WITH_ARG ("port"), READONLY ("read-only"), READONLY ("readonly"), WITH_ARG ("run"),
  WITH_ARG ("selinux-label"), FLAG ("short-options"), FLAG ("single"), FLAG ("stdin"),
  FLAG ("swap"), WITH_ARG ("threads"), WITH_ARG ("tls"), WITH_ARG ("tls-certificates"),
  WITH_ARG ("tls-psk"), FLAG ("tls-verify-peer"), WITH_ARG ("unix"), WITH_ARG ("user"),
  FLAG ("verbose"), FLAG ("version"), FLAG ("vsock"),
#undef FLAG
#undef WITH_ARG
#undef READONLY
};

/* The option --name[=value] stands for: an exact name, or a prefix whose
 * names all behave alike (getopt_long's rule); NULL otherwise.
 */
static const struct nbdkit_option *long_option (const char *name, size_t len)
{
  const struct nbdkit_option *found = NULL;
  size_t i;

  for (i = 0; i < sizeof nbdkit_options / sizeof *nbdkit_options; i++) {
    const struct nbdkit_option *o = &nbdkit_options[i];
    if (strncmp (o->name, name, len) != 0)
      continue;
    if (strlen (o->name) == len)
      return o;
    if (found && (found->arg != o->arg || found->ro != o->ro))
      return NULL;
    found = o;
  }
  return found;
}

/* args: argc NUL-terminated words, one after the other. */
static bool args_say_readonly (const char *args, size_t argc)
{
  const struct nbdkit_option *o;
  bool ro = false, skip = true;   /* argv[0] */
  const char *p;
  size_t len;

  for (; argc > 0; argc--, args += strlen (args) + 1) {
    if (skip) {
      skip = false;
      continue;
    }
    if (strcmp (args, "--") == 0)
      break;
    if (args[0] != '-' || args[1] == '\0')
      continue;
    if (args[1] == '-') {
      len = strcspn (args + 2, "=");
      if ((o = long_option (args + 2, len)) != NULL) {
        ro |= o->ro;
        skip = o->arg && args[2 + len] != '=';
      }
      continue;
    }
    for (p = args + 1; *p; p++) {
      if (*p == 'r')
        ro = true;
      else if (strchr (short_with_arg, *p)) {
        skip = !p[1];
        break;
      }
    }
  }
  return ro;
}

bool cmdline_readonly (void)
{
  FILE *f = fopen ("/proc/self/cmdline", "re");
  char *buf = NULL, *nb;
  size_t cap = 0, len = 0, n, argc = 0, i;
  bool ro;

  if (!f) {
    nbdkit_debug ("/proc/self/cmdline: %m; nbdkit -r cannot be seen");
    return false;
  }
  do {
    if (len == cap) {
      if (!(nb = realloc (buf, cap = cap ? cap * 2 : 4096))) {
        free (buf);
        fclose (f);
        return false;
      }
      buf = nb;
    }
    n = fread (buf + len, 1, cap - len, f);
    len += n;
  } while (n > 0);
  fclose (f);
  buf[len] = '\0';             /* fread stopped short of cap */
  for (i = 0; i < len; i++)
    argc += buf[i] == '\0';
  ro = args_say_readonly (buf, argc);
  free (buf);
  return ro;
}
