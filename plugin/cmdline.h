/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit's own command line, for what nbdkit does not tell a plugin. */
#ifndef Q2R_CMDLINE_H
#define Q2R_CMDLINE_H

#include <stdbool.h>

/* Whether nbdkit was started with -r (--readonly, --read-only).  nbdkit
 * 1.32 tells plugins of it only in .open, per connection, after the
 * image was opened, and has no call to ask.
 */
bool cmdline_readonly (void);

#endif
