/* SPDX-License-Identifier: BSD-3-Clause */
/* Messages from the engine: one sentence each, naming the image and the
 * offset or parameter, handed to the logger the program set (nbdkit's
 * logging in the plugin, stderr in the tool).
 */
#ifndef Q2_LOG_H
#define Q2_LOG_H

#define LOG_ERROR  0
#define LOG_NOTICE 1
#define LOG_DEBUG  2

typedef void (*log_fn) (int level, const char *msg);

/* NULL restores the default: errors and notices on stderr. */
void log_set_fn (log_fn fn);
void log_msg (int level, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

#define log_error(...) log_msg (LOG_ERROR, __VA_ARGS__)
#define log_notice(...) log_msg (LOG_NOTICE, __VA_ARGS__)
#define log_debug(...) log_msg (LOG_DEBUG, __VA_ARGS__)

#endif
