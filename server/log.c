/* SPDX-License-Identifier: BSD-3-Clause */
#include <config.h>

#include <stdarg.h>
#include <stdio.h>

#include "log.h"

static void stderr_logger (int level, const char *msg)
{
  if (level <= LOG_NOTICE)
    fprintf (stderr, "qcow2reclaim: %s\n", msg);
}

/* Set once, before any image is opened (the plugin's .load). */
static log_fn logger = stderr_logger;

void log_set_fn (log_fn fn)
{
  logger = fn ? fn : stderr_logger;
}

void log_msg (int level, const char *fmt, ...)
{
  char msg[1024];
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  logger (level, msg);
}
