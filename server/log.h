/* Messages from the engine: one sentence each, naming the image and offset. */
#ifndef Q2_LOG_H
#define Q2_LOG_H

#define Q2_LOG_ERROR  0
#define Q2_LOG_NOTICE 1
#define Q2_LOG_DEBUG  2

void q2_log (int level, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

#define q2_error(...) q2_log (Q2_LOG_ERROR, __VA_ARGS__)
#define q2_notice(...) q2_log (Q2_LOG_NOTICE, __VA_ARGS__)
#define q2_debug(...) q2_log (Q2_LOG_DEBUG, __VA_ARGS__)

#endif
