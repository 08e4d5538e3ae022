/* SPDX-License-Identifier: BSD-3-Clause */
/* What the commands of qcow2reclaim share: the options, opening and
 * checking an image, and writing sizes and JSON.
 */
#ifndef QCOW2RECLAIM_TOOL_H
#define QCOW2RECLAIM_TOOL_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "qcow2reclaim.h"

struct tool_options {
  bool json;                  /* --output=json */
  bool dry_run;               /* compact --dry-run */
  bool force_share;           /* -U */
  enum q2_repair_mode repair; /* check -r; 0: none */
  const char *passphrase_file;  /* compact --passphrase-file; NULL: none */
};
extern struct tool_options opt;

/* Opens file read-only (writable: for writing), saying on stderr what a
 * lock refusal or -U means.
 */
int tool_open (const char *file, bool writable, struct q2_image **img);
/* q2_check with a progress figure on a terminal; says why it failed. */
int tool_check (struct q2_image *img, struct q2_check *res);

/* A size as qemu-img writes it, three significant digits and a binary
 * unit ("4.33 MiB", "64 MiB", "0 B"), into buf.
 */
#define HUMAN_SIZE_LEN 32
const char *human_size (uint64_t bytes, char buf[HUMAN_SIZE_LEN]);
double percent (uint64_t part, uint64_t whole);
/* s as a JSON string, quoted and escaped; null for NULL. */
void json_string (const char *s);

/* Several images one after the other, or one line each (summary). */
int cmd_info (int nfiles, char **files, bool summary);

#endif
