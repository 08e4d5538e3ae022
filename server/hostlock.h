/* SPDX-License-Identifier: BSD-3-Clause */
/* The OFD byte-range locks QEMU takes on an image, so that QEMU refuses an
 * image we serve for writing, and we refuse one QEMU holds.
 */
#ifndef Q2_HOSTLOCK_H
#define Q2_HOSTLOCK_H

#include <stdbool.h>

struct hostfile;

/* Fails with a message (and -EAGAIN) if another program holds the file in
 * a conflicting way.  The locks go with the file descriptor.
 */
int hostlock_take (struct hostfile *hf, bool writable);

#endif
