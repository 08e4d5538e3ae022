/* SPDX-License-Identifier: BSD-3-Clause */
/* What the unit tests share: a check that names the line, a seeded
 * random source, and a death test for the engine's asserts.
 */
#ifndef Q2_UNIT_H
#define Q2_UNIT_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHECK(cond) do {                                                \
    if (!(cond)) {                                                      \
      fprintf (stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      exit (1);                                                         \
    }                                                                   \
  } while (0)

static uint64_t unit_rng = 88172645463325252ull;

static inline uint64_t unit_random (void)
{
  unit_rng ^= unit_rng << 13;
  unit_rng ^= unit_rng >> 7;
  unit_rng ^= unit_rng << 17;
  return unit_rng;
}

/* Runs fn in a child, which must die of SIGABRT (a failed assert). */
static inline int unit_aborts (void (*fn) (void *), void *opaque)
{
  int status;
  pid_t pid = fork ();

  if (pid == 0) {
    /* The sanitizers would report the abort; the test only wants it. */
    freopen ("/dev/null", "w", stderr);
    fn (opaque);
    _exit (0);
  }
  if (pid < 0 || waitpid (pid, &status, 0) != pid)
    return 0;
  return WIFSIGNALED (status) && WTERMSIG (status) == SIGABRT;
}

#endif
