#include <config.h>

#include <stdarg.h>
#include <stdio.h>

#include "qcow2reclaim.h"
#include "log.h"

static void stderr_logger (int level, const char *msg)
{
  if (level <= Q2_LOG_NOTICE)
    fprintf (stderr, "qcow2reclaim: %s\n", msg);
}

static q2_log_fn logger = stderr_logger;

void q2_set_logger (q2_log_fn fn)
{
  logger = fn ? fn : stderr_logger;
}

void q2_log (int level, const char *fmt, ...)
{
  char msg[1024];
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  logger (level, msg);
}
