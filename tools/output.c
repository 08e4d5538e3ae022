/* SPDX-License-Identifier: BSD-3-Clause */
/* Sizes and strings as the tool prints them. */
#include <config.h>

#include <stdio.h>

#include "tool.h"

const char *human_size (uint64_t bytes, char buf[HUMAN_SIZE_LEN])
{
  static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
  double v = (double) bytes;
  unsigned u = 0;

  /* The next unit as soon as the number would need four digits, so that
   * 1000 bytes are 0.977 KiB, as qemu-img writes them.
   */
  while (v >= 1000 && u + 1 < sizeof units / sizeof units[0]) {
    v /= 1024;
    u++;
  }
  snprintf (buf, HUMAN_SIZE_LEN, "%0.3g %s", v, units[u]);
  return buf;
}

double percent (uint64_t part, uint64_t whole)
{
  return whole ? 100.0 * part / whole : 0;
}

void json_string (const char *s)
{
  if (!s) {
    fputs ("null", stdout);
    return;
  }
  putchar ('"');
  for (; *s; s++) {
    unsigned char c = *s;
    if (c == '"' || c == '\\')
      printf ("\\%c", c);
    else if (c < 0x20)
      printf ("\\u%04x", c);
    else
      putchar (c);
  }
  putchar ('"');
}
