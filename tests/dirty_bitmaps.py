#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""Persistent dirty bitmaps, seen through NBD, for the bitmap tests.

  dirty_bitmaps.py workload SOCKET SIZE SEED OPS RECORD
      seeded random writes, trims and write-zeroes (with and without
      may-trim) and flushes; every range changed goes into RECORD, one
      "offset length" line each
  dirty_bitmaps.py dirty SOCKET NAME
      the ranges qemu:dirty-bitmap:NAME says are dirty, one
      "offset length" line each (serve the image with qemu-nbd -B NAME)
  dirty_bitmaps.py compare GRANULARITY SIZE DIRTY MUST [MAY...]
      every granule a range of MUST touches is dirty in DIRTY, and every
      dirty granule is touched by a range of MUST or of a MAY file

Run it with a python3 that has libnbd's nbd module ($PYTHON in the tests).
Exit status: 0 as expected, 1 a difference (said on stderr), 2 an error.
"""

import random
import sys

try:
    import nbd
except ImportError:
    sys.stderr.write("dirty_bitmaps: the nbd module is missing\n")
    sys.exit(2)

KiB = 1 << 10


def connect(sock, context=None):
    h = nbd.NBD()
    if context:
        h.add_meta_context(context)
    h.connect_unix(sock)
    return h


def workload(sock, size, seed, ops, record):
    rnd = random.Random(seed)
    h = connect(sock)
    with open(record, "w") as out:
        for _ in range(ops):
            kind = rnd.choice(["write", "write", "trim", "zero", "zero-trim", "flush"])
            if kind == "flush":
                h.flush()
                continue
            # Small and large, aligned and not, so granules at both ends
            # of a range are touched in part.
            length = rnd.choice([512, 4 * KiB, 65 * KiB, 1 << 20, rnd.randrange(1, 3 << 20)])
            off = rnd.randrange(0, size - length)
            if rnd.random() < 0.5:
                off &= ~4095
            if kind == "write":
                h.pwrite(bytes([rnd.randrange(1, 256)]) * length, off)
            elif kind == "trim":
                h.trim(length, off)
            else:
                h.zero(length, off, nbd.CMD_FLAG_NO_HOLE if kind == "zero" else 0)
            out.write("%d %d\n" % (off, length))
        h.flush()
    h.shutdown()


def dirty(sock, name):
    ctx = "qemu:dirty-bitmap:" + name
    h = connect(sock, ctx)
    size, off, runs = h.get_size(), 0, []
    while off < size:
        got = []

        def cb(metacontext, offset, entries, err):
            if metacontext == ctx:
                got.extend(entries)
            return 0
        h.block_status(min(size - off, 1 << 30), off, cb)
        if not got:
            sys.exit("dirty_bitmaps: no %s extents at %d" % (ctx, off))
        for i in range(0, len(got), 2):
            if got[i + 1] & 1:
                runs.append((off, got[i]))
            off += got[i]
    h.shutdown()
    for o, n in runs:
        print(o, n)


def granules(path, g, size):
    out = set()
    for line in open(path):
        o, n = map(int, line.split())
        out.update(range(o // g, min(o + n - 1, size - 1) // g + 1))
    return out


def compare(g, size, dirty_file, must, may):
    have = granules(dirty_file, g, size)
    want = granules(must, g, size)
    allowed = set(want)
    for m in may:
        allowed |= granules(m, g, size)
    missing = sorted(want - have)
    extra = sorted(have - allowed)
    if missing:
        sys.stderr.write("%d granules of %d bytes changed but clean, first at %d\n"
                         % (len(missing), g, missing[0] * g))
    if extra:
        sys.stderr.write("%d granules of %d bytes dirty but never changed, first at %d\n"
                         % (len(extra), g, extra[0] * g))
    print("%d granules dirty, %d changed" % (len(have), len(want)))
    return 1 if missing or extra else 0


def main(argv):
    if len(argv) >= 6 and argv[0] == "workload":
        workload(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), argv[5])
        return 0
    if len(argv) == 3 and argv[0] == "dirty":
        dirty(argv[1], argv[2])
        return 0
    if len(argv) >= 5 and argv[0] == "compare":
        return compare(int(argv[1]), int(argv[2]), argv[3], argv[4], argv[5:])
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
