#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# Helpers for test-multiconn.sh.  Run with $PYTHON (functions.sh), a python3
# with libnbd's nbd module: the first python3 on PATH may have none.
#
#   probe SOCK                   print the export's flags; exit 1 without multi-conn
#   writer SOCK K N STRIPE ...   one connection's random workload on its own stripes
#   combine SIZE N STRIPE OUT IN...   merge the writers' results into one raw file
#   verify SOCK EXPECTED N STRIPE     read the whole export on a fresh connection
#
# The disk is cut into stripes; stripe i belongs to writer i mod N.  A writer
# keeps a model of its own stripes only, so the writers never need to talk to
# each other and the final expected image is just the stripes put back in place.

import argparse
import errno
import os
import random
import sys
import time

import nbd

MiB = 1024 * 1024


def stripe_len(i, stripe, size):
    return min(stripe, size - i * stripe)


def nstripes(size, stripe):
    return (size + stripe - 1) // stripe


def describe(buf, limit=16):
    b = bytes(buf[:limit])
    return b.hex() + ("..." if len(buf) > limit else "")


def first_diff(a, b):
    """Byte ranges [start, end) where a and b differ, at most 8 of them."""
    out = []
    n = len(a)
    i = 0
    # Compare in blocks first: the usual case is a few bad blocks in a big read.
    step = 4096
    while i < n and len(out) < 8:
        j = min(n, i + step)
        if a[i:j] == b[i:j]:
            i = j
            continue
        while i < j and a[i] == b[i]:
            i += 1
        # Random data agrees with other random data now and then: a range
        # only ends after 64 equal bytes in a row.
        k = last = i
        while k < n and k - last < 64:
            if a[k] != b[k]:
                last = k
            k += 1
        out.append((i, last + 1))
        i = last + 1
    return out


class Writer:
    def __init__(self, args):
        self.a = args
        self.k = args.index
        self.n = args.writers
        self.stripe = args.stripe
        self.cluster = args.cluster
        self.rng = random.Random(args.seed)
        self.h = nbd.NBD()
        self.h.set_handle_name("writer%d" % self.k)
        self.h.connect_unix(args.sock)
        self.size = self.h.get_size()
        self.ns = nstripes(self.size, self.stripe)
        self.mine = list(range(self.k, self.ns, self.n))
        self.history = []          # (op number, kind, offset, length, flags)
        self.counts = {}
        self.model = {}
        base = open(args.base, "rb") if args.base else None
        for i in self.mine:
            ln = stripe_len(i, self.stripe, self.size)
            if base:
                base.seek(i * self.stripe)
                data = base.read(ln)
                assert len(data) == ln, "base file shorter than the export"
                self.model[i] = bytearray(data)
            else:
                self.model[i] = bytearray(ln)
        if base:
            base.close()
        self.can_trim = self.h.can_trim()
        self.can_zero = self.h.can_zero()
        self.can_fast_zero = self.h.can_fast_zero()
        self.can_fua = self.h.can_fua()

    # --- model helpers -------------------------------------------------

    def expected(self, off, ln):
        i = off // self.stripe
        s = off - i * self.stripe
        return bytes(self.model[i][s:s + ln])

    def set_model(self, off, data):
        i = off // self.stripe
        s = off - i * self.stripe
        self.model[i][s:s + len(data)] = data

    def fail(self, what, off, exp, got):
        """Report a mismatch with enough context to find the bad request."""
        print("FAIL writer %d (seed %d): %s at guest range [%d, %d)"
              % (self.k, self.a.seed, what, off, off + len(exp)), file=sys.stderr)
        for (s, e) in first_diff(exp, got):
            print("  bytes [%d, %d) (%d bytes): expected %s got %s%s"
                  % (off + s, off + e, e - s, describe(exp[s:e]), describe(got[s:e]),
                     " (zeros)" if not any(got[s:e]) else ""), file=sys.stderr)
        lo, hi = off, off + len(exp)
        touching = [h for h in self.history if h[2] < hi and h[2] + h[3] > lo]
        print("  last requests of this writer overlapping the range:", file=sys.stderr)
        for h in touching[-10:]:
            print("    op %d %s offset %d length %d flags %s" % h, file=sys.stderr)
        sys.exit(1)

    def check(self, what, off, ln):
        got = self.h.pread(ln, off)
        exp = self.expected(off, ln)
        if got != exp:
            self.fail(what, off, exp, got)

    def adopt_zero_or_old(self, what, off, ln):
        """After TRIM (or a refused fast zero) the range may hold the old data
        or zeros, byte by byte; anything else is someone else's data."""
        got = self.h.pread(ln, off)
        exp = self.expected(off, ln)
        if got != exp:
            for x, (o, g) in enumerate(zip(exp, got)):
                if g != o and g != 0:
                    self.fail(what + " (each byte must be the old value or 0)",
                              off, exp, got)
            self.set_model(off, got)
        # Whatever it reads as now must stay that way.
        again = self.h.pread(ln, off)
        if again != got:
            self.fail(what + " (range changed between two reads)", off, got, again)

    # --- choosing where to work ----------------------------------------

    def pick_stripe(self, opno):
        # Most requests go to a window that moves through the disk with the op
        # number, so that all writers (who progress at about the same speed)
        # work in the same neighbourhood at the same time and fight over the
        # same L2 tables and refcount blocks; the rest go anywhere.
        if self.rng.random() < 0.65:
            win = max(4 * self.n, (2 * MiB) // self.stripe)
            start = ((opno // 20) * win) % self.ns
            cands = [i for i in range(start, min(self.ns, start + win))
                     if i % self.n == self.k]
            if cands:
                return self.rng.choice(cands)
        return self.rng.choice(self.mine)

    def pick_range(self, i):
        s0 = i * self.stripe
        sl = stripe_len(i, self.stripe, self.size)
        r = self.rng.random()
        c = self.cluster
        bounds = [b for b in range((s0 // c + 1) * c, s0 + sl, c)]
        if r < 0.25 and sl >= 4096:
            # 4 KiB aligned, what file systems send.
            a = self.rng.randrange(0, sl // 4096) * 4096
            ln = self.rng.randint(1, (sl - a) // 4096) * 4096
            return s0 + a, ln
        if r < 0.40 and s0 % c == 0 and sl >= c:
            # Whole clusters: the write-in-place / no-COW paths.
            a = self.rng.randrange(0, sl // c) * c
            ln = self.rng.randint(1, (sl - a) // c) * c
            return s0 + a, ln
        if r < 0.70 and bounds:
            # Straddle a cluster boundary with unaligned ends: two partial
            # clusters, each needing a fill from the old contents.
            b = self.rng.choice(bounds)
            before = self.rng.randint(1, min(b - s0, c + c // 2))
            after = self.rng.randint(1, min(s0 + sl - b, c + c // 2))
            return b - before, before + after
        # Unaligned anywhere, mostly small.
        a = self.rng.randrange(0, sl)
        if self.rng.random() < 0.7:
            ln = min(sl - a, int(self.rng.expovariate(1 / 6000.0)) + 1)
        else:
            ln = self.rng.randint(1, sl - a)
        return s0 + a, ln

    # --- the workload ----------------------------------------------------

    def op(self, opno):
        i = self.pick_stripe(opno)
        off, ln = self.pick_range(i)
        r = self.rng.random()
        if r < 0.60:
            kind = "write"
            flags = nbd.CMD_FLAG_FUA if self.can_fua and self.rng.random() < 0.1 else 0
            data = self.rng.randbytes(ln)
            self.history.append((opno, kind, off, ln, flags))
            self.h.pwrite(data, off, flags)
            self.set_model(off, data)
            if self.rng.random() < 0.35:
                # Read back a little more than was written: the neighbours
                # within the stripe must not have been disturbed by the fill.
                s0 = i * self.stripe
                sl = stripe_len(i, self.stripe, self.size)
                lo = max(s0, off - self.rng.randint(0, 4096))
                hi = min(s0 + sl, off + ln + self.rng.randint(0, 4096))
                self.check("read back after write op %d" % opno, lo, hi - lo)
        elif r < 0.70 and self.can_zero:
            kind = "zero"
            choices = [0, nbd.CMD_FLAG_NO_HOLE]
            if self.can_fast_zero:
                choices.append(nbd.CMD_FLAG_FAST_ZERO)
            flags = self.rng.choice(choices)
            if self.can_fua and self.rng.random() < 0.1:
                flags |= nbd.CMD_FLAG_FUA
            self.history.append((opno, kind, off, ln, flags))
            try:
                self.h.zero(ln, off, flags)
            except nbd.Error as e:
                if flags & nbd.CMD_FLAG_FAST_ZERO and e.errnum == errno.ENOTSUP:
                    self.adopt_zero_or_old("after refused fast zero op %d" % opno, off, ln)
                    kind = "zero-refused"
                else:
                    raise
            else:
                self.set_model(off, bytes(ln))
                if self.rng.random() < 0.5:
                    self.check("read back after zero op %d" % opno, off, ln)
        elif r < 0.75 and self.can_trim:
            kind = "trim"
            flags = nbd.CMD_FLAG_FUA if self.can_fua and self.rng.random() < 0.1 else 0
            self.history.append((opno, kind, off, ln, flags))
            self.h.trim(ln, off, flags)
            self.adopt_zero_or_old("read after trim op %d" % opno, off, ln)
        elif r < 0.77 and self.can_zero:
            # Zero (may trim) every own stripe of the current window.  All
            # writers are in the same window at about the same time, so
            # whole L2 tables and refcount blocks go empty and may be freed
            # while a neighbour is allocating in them.
            kind = "sweep"
            win = max(4 * self.n, (2 * MiB) // self.stripe)
            start = ((opno // 20) * win) % self.ns
            for j in range(start, min(self.ns, start + win)):
                if j % self.n == self.k:
                    off, ln = j * self.stripe, stripe_len(j, self.stripe, self.size)
                    self.history.append((opno, kind, off, ln, 0))
                    self.h.zero(ln, off, 0)
                    self.set_model(off, bytes(ln))
            self.check("read after sweep op %d" % opno, i * self.stripe,
                       stripe_len(i, self.stripe, self.size))
        elif r < 0.95:
            kind = "read"
            self.check("read op %d" % opno, off, ln)
        else:
            kind = "flush"
            self.h.flush()
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def run(self):
        if self.a.go:
            # Everyone connects first, then starts together.
            deadline = time.time() + 30
            while not os.path.exists(self.a.go):
                if time.time() > deadline:
                    sys.exit("writer %d: start signal never came" % self.k)
                time.sleep(0.01)
        end = time.time() + self.a.seconds if self.a.seconds else None
        opno = 0
        while opno < self.a.ops and (end is None or time.time() < end):
            self.op(opno)
            opno += 1
        self.h.flush()
        for i in self.mine:
            self.check("final read of own stripe %d" % i, i * self.stripe,
                       stripe_len(i, self.stripe, self.size))
        with open(self.a.out, "wb") as f:
            f.truncate(self.size)
            for i in self.mine:
                f.seek(i * self.stripe)
                f.write(self.model[i])
        self.h.shutdown()
        print("writer %d: %d ops %s" % (self.k, opno,
              " ".join("%s=%d" % kv for kv in sorted(self.counts.items()))))


def cmd_probe(a):
    h = nbd.NBD()
    h.connect_unix(a.sock)
    flags = dict(multi_conn=h.can_multi_conn(), flush=h.can_flush(), fua=h.can_fua(),
                 zero=h.can_zero(), trim=h.can_trim(), fast_zero=h.can_fast_zero(),
                 read_only=h.is_read_only())
    print("export: size %d %s" % (h.get_size(),
          " ".join("%s=%s" % kv for kv in flags.items())))
    h.shutdown()
    if not flags["trim"]:
        print("note: the export does not advertise TRIM; the writers will not send it")
    if not flags["multi_conn"]:
        sys.exit("FAIL: the server does not advertise multi-conn")
    if flags["read_only"]:
        sys.exit("FAIL: the export is read-only")


def cmd_combine(a):
    ns = nstripes(a.size, a.stripe)
    ins = [open(p, "rb") for p in a.inputs]
    assert len(ins) == a.writers
    with open(a.out, "wb") as out:
        out.truncate(a.size)
        for i in range(ns):
            f = ins[i % a.writers]
            ln = stripe_len(i, a.stripe, a.size)
            f.seek(i * a.stripe)
            data = f.read(ln)
            assert len(data) == ln
            out.seek(i * a.stripe)
            out.write(data)


def cmd_verify(a):
    h = nbd.NBD()
    h.connect_unix(a.sock)
    size = h.get_size()
    if os.path.getsize(a.expected) != size:
        sys.exit("FAIL: export size %d, expected file %d" % (size, os.path.getsize(a.expected)))
    bad = 0
    chunk = 4 * MiB
    with open(a.expected, "rb") as f:
        off = 0
        while off < size:
            ln = min(chunk, size - off)
            got = h.pread(ln, off)
            exp = f.read(ln)
            if got != exp:
                for (s, e) in first_diff(exp, got):
                    o = off + s
                    print("FAIL: fresh connection reads [%d, %d) (stripe %d, writer %d): "
                          "expected %s got %s" % (o, off + e, o // a.stripe,
                          (o // a.stripe) % a.writers, describe(exp[s:e]),
                          describe(got[s:e])), file=sys.stderr)
                    bad += 1
            off += ln
    h.shutdown()
    if bad:
        sys.exit(1)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("probe")
    s.add_argument("sock")
    s = sub.add_parser("writer")
    s.add_argument("sock")
    s.add_argument("index", type=int)
    s.add_argument("writers", type=int)
    s.add_argument("stripe", type=int)
    s.add_argument("--cluster", type=int, default=65536)
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--ops", type=int, default=1000)
    s.add_argument("--seconds", type=float, default=0)
    s.add_argument("--base", help="raw file with the initial contents (default zeros)")
    s.add_argument("--go", help="wait for this file to exist before starting")
    s.add_argument("--out", required=True)
    s = sub.add_parser("combine")
    s.add_argument("size", type=int)
    s.add_argument("writers", type=int)
    s.add_argument("stripe", type=int)
    s.add_argument("out")
    s.add_argument("inputs", nargs="+")
    s = sub.add_parser("verify")
    s.add_argument("sock")
    s.add_argument("expected")
    s.add_argument("writers", type=int)
    s.add_argument("stripe", type=int)
    a = p.parse_args()
    if a.cmd == "probe":
        cmd_probe(a)
    elif a.cmd == "writer":
        Writer(a).run()
    elif a.cmd == "combine":
        cmd_combine(a)
    else:
        cmd_verify(a)


if __name__ == "__main__":
    main()
