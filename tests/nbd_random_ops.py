#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""Seeded random workload against an NBD export, checked against a raw mirror.

Every operation sent to the server is applied to a reference raw file of the
same size, so any read can be compared byte for byte.  The same seed always
produces the same sequence of operations, which is what makes a failure
reproducible: rerun with the printed seed and the same image.

Run it with a python3 that has libnbd's `nbd` module: the tests run it as
$PYTHON (see functions.sh); on Debian that is /usr/bin/python3.

Exit status: 0 all reads matched, 1 a read did not match the reference,
2 an NBD error or a usage problem.
"""

import argparse
import collections
import errno
import os
import random
import sys
import time

try:
    import nbd
except ImportError:
    sys.stderr.write("nbd_random_ops: the nbd module is missing; "
                     "run with a python3 that has it (python3-libnbd)\n")
    sys.exit(2)

KiB = 1 << 10
MiB = 1 << 20

# Weights used when --ops-mix names an operation without a weight.
DEFAULT_WEIGHTS = {
    "write": 50, "read": 35, "flush": 5,
    "zero": 10, "trim": 10, "fastzero": 3,
}
KNOWN_OPS = tuple(DEFAULT_WEIGHTS)
DEFAULT_MIX = "write:55,read:38,flush:7"

MAX_WRITE = 1 * MiB
MAX_READ = 4 * MiB
VERIFY_CHUNK = 4 * MiB


class Mismatch(Exception):
    pass


class NbdFailure(Exception):
    pass


def parse_mix(text):
    mix = collections.OrderedDict()
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        for sep in (":", "="):
            if sep in item:
                name, weight = item.split(sep, 1)
                break
        else:
            name, weight = item, None
        name = name.strip()
        if name not in KNOWN_OPS:
            raise ValueError("unknown operation %r (known: %s)"
                             % (name, ", ".join(KNOWN_OPS)))
        w = DEFAULT_WEIGHTS[name] if weight is None else int(weight)
        if w < 0:
            raise ValueError("negative weight for %s" % name)
        if w:
            mix[name] = w
    if not mix:
        raise ValueError("empty operation mix")
    return mix


def parse_size(text):
    text = text.strip()
    mult = {"k": KiB, "m": MiB, "g": 1 << 30}.get(text[-1:].lower())
    return int(text[:-1]) * mult if mult else int(text)


class Workload:
    def __init__(self, args, handle, fd, size):
        self.a = args
        self.h = handle
        self.fd = fd
        self.size = size
        self.cs = args.cluster_size
        self.rng = random.Random(args.seed)
        self.mix = parse_mix(args.ops_mix)
        self.names = list(self.mix)
        self.weights = [self.mix[n] for n in self.names]
        self.fua_ok = handle.can_fua()
        # Every operation is logged so that a mismatch can be explained by
        # the operations that touched the bad byte, not just the last few.
        self.log = []
        self.recent = collections.deque(maxlen=32)
        self.stats = collections.Counter()
        self.opno = 0
        self.trim_foreign = 0

    # ---- choosing sizes, offsets and data -------------------------------

    def pick_len(self, maxlen):
        rng, cs = self.rng, self.cs
        r = rng.random()
        if r < 0.35:
            # Small requests are where read-modify-write bugs live.
            n = int(2 ** rng.uniform(0, 12.5))
        elif r < 0.60:
            # Whole clusters take the no-COW path; let a single cluster
            # through even when it is larger than maxlen (2 MiB clusters).
            n = cs * rng.randint(1, max(1, maxlen // cs))
        elif r < 0.70:
            # One byte or one sector either side of a cluster multiple.
            n = cs * rng.randint(1, max(1, maxlen // cs)) + \
                rng.choice((-1, 1, -512, 512))
        else:
            n = int(2 ** rng.uniform(0, maxlen.bit_length() - 1))
        return max(1, min(n, self.size))

    def pick_off(self, n):
        rng = self.rng
        hi = self.size - n
        r = rng.random()
        if r < 0.20 and self.recent:
            # Overlap something written recently: in-place rewrites and
            # partial overwrites of fresh clusters.
            base_off, base_len = rng.choice(self.recent)
            off = base_off + rng.randint(-n, base_len)
        elif r < 0.25:
            off = rng.choice((0, hi))
        else:
            off = rng.randint(0, hi)
        off = max(0, min(off, hi))
        # A third each: cluster aligned, sector aligned, any byte.
        align = rng.choice((self.cs, 512, 1))
        return off // align * align

    def make_data(self, off, n):
        rng = self.rng
        r = rng.random()
        if r < 0.45:
            return rng.randbytes(n)
        if r < 0.90:
            # A tag naming the operation and offset, so that a wrong byte in
            # a failure report tells which write it came from.
            tag = b"<op%d@%x>" % (self.opno, off)
            return (tag * (n // len(tag) + 1))[:n]
        if r < 0.95:
            return bytes(n)
        return bytes((rng.randrange(1, 256),)) * n

    def fua(self):
        return nbd.CMD_FLAG_FUA if self.fua_ok and \
            self.rng.random() < self.a.fua_rate else 0

    # ---- the reference ---------------------------------------------------

    def ref_read(self, off, n):
        data = os.pread(self.fd, n, off)
        if len(data) != n:
            raise NbdFailure("short read of reference at %d" % off)
        return data

    def ref_write(self, off, data):
        if os.pwrite(self.fd, data, off) != len(data):
            raise NbdFailure("short write to reference at %d" % off)

    def ref_zero(self, off, n):
        pos = off
        while pos < off + n:
            k = min(VERIFY_CHUNK, off + n - pos)
            self.ref_write(pos, bytes(k))
            pos += k

    # ---- comparing -------------------------------------------------------

    def compare(self, off, got, what):
        want = self.ref_read(off, len(got))
        if got == want:
            return
        first = next(i for i in range(len(got)) if got[i] != want[i])
        last = next(i for i in range(len(got) - 1, -1, -1)
                    if got[i] != want[i])
        bad = off + first
        lines = [
            "MISMATCH seed=%d op#%d (%s off=%d len=%d): first bad byte at "
            "offset %d (0x%x), last at %d, %d bytes span"
            % (self.a.seed, self.opno, what, off, len(got), bad, bad,
               off + last, last - first + 1),
            "  expected: %s" % want[first:first + 24].hex(" "),
            "  got:      %s" % got[first:first + 24].hex(" "),
            "  got as text: %r" % bytes(got[first:first + 24]),
            "  operations that touched offset %d:" % bad,
        ]
        touching = [e for e in self.log
                    if e[1] in ("write", "zero", "trim", "fastzero")
                    and e[2] <= bad < e[2] + e[3]]
        for e in touching[-12:] or [None]:
            lines.append("    " + (self.fmt(e) if e else "(none: prefill)"))
        lines.append("  last operations:")
        for e in self.log[-8:]:
            lines.append("    " + self.fmt(e))
        raise Mismatch("\n".join(lines))

    @staticmethod
    def fmt(e):
        no, name, off, n, flags = e
        return "#%d %s off=%d (0x%x) len=%d%s" % (
            no, name, off, off, n, " flags=%s" % flags if flags else "")

    # ---- operations ------------------------------------------------------

    def nbd_call(self, what, off, n, fn, *args):
        try:
            return fn(*args)
        except nbd.Error as e:
            raise NbdFailure("NBD error seed=%d op#%d %s off=%d len=%d: %s"
                             % (self.a.seed, self.opno, what, off, n, e))

    @staticmethod
    def flag_names(flags):
        names = []
        for bit, name in ((nbd.CMD_FLAG_FUA, "FUA"),
                          (nbd.CMD_FLAG_NO_HOLE, "NO_HOLE"),
                          (nbd.CMD_FLAG_FAST_ZERO, "FAST_ZERO")):
            if flags & bit:
                names.append(name)
        return "|".join(names)

    def record(self, name, off, n, flags=0):
        self.log.append((self.opno, name, off, n, self.flag_names(flags)))
        if self.a.trace:
            print(self.fmt(self.log[-1]), flush=True)

    def op_write(self):
        n = self.pick_len(MAX_WRITE)
        off = self.pick_off(n)
        data = self.make_data(off, n)
        flags = self.fua()
        self.record("write", off, n, flags)
        self.nbd_call("write", off, n, self.h.pwrite, data, off, flags)
        self.ref_write(off, data)
        self.recent.append((off, n))
        self.stats["write"] += 1
        self.stats["bytes_written"] += n
        if flags:
            self.stats["fua"] += 1

    def op_read(self):
        n = self.pick_len(MAX_READ)
        if self.recent and self.rng.random() < 0.5:
            # Read back what was just written, with some margin around it.
            base_off, base_len = self.rng.choice(self.recent)
            margin = self.rng.choice((0, 1, 511, self.cs))
            off = max(0, base_off - margin)
            n = min(base_len + 2 * margin, self.size - off)
            n = max(1, min(n, MAX_READ))
        else:
            off = self.pick_off(n)
        self.record("read", off, n)
        got = self.nbd_call("read", off, n, self.h.pread, n, off)
        self.compare(off, got, "read")
        self.stats["read"] += 1
        self.stats["bytes_read"] += n

    def op_flush(self):
        self.record("flush", 0, 0)
        self.nbd_call("flush", 0, 0, self.h.flush)
        self.stats["flush"] += 1

    def op_zero(self):
        n = self.pick_len(self.a.max_zero)
        off = self.pick_off(n)
        # NO_HOLE asks to keep the allocation; without it the server may
        # trim (MAY_TRIM).  Both must read back as zeros.
        flags = self.fua()
        if self.rng.random() < 0.5:
            flags |= nbd.CMD_FLAG_NO_HOLE
        self.record("zero", off, n, flags)
        self.nbd_call("zero", off, n, self.h.zero, n, off, flags)
        self.ref_zero(off, n)
        self.recent.append((off, n))
        self.stats["zero"] += 1
        self.stats["zero_nohole" if flags & nbd.CMD_FLAG_NO_HOLE
                   else "zero_maytrim"] += 1

    def op_fastzero(self):
        n = self.pick_len(self.a.max_zero)
        off = self.pick_off(n)
        flags = nbd.CMD_FLAG_FAST_ZERO
        if self.rng.random() < 0.5:
            flags |= nbd.CMD_FLAG_NO_HOLE
        self.record("fastzero", off, n, flags)
        try:
            self.h.zero(n, off, flags)
        except nbd.Error as e:
            # Refusing a slow zero is allowed; the range is then untouched,
            # which the reference already reflects.
            if e.errnum in (errno.ENOTSUP, errno.EOPNOTSUPP):
                self.stats["fastzero_refused"] += 1
                # QEMU zeroes the parts it can do fast before refusing the
                # rest, so each byte is now its old value or zero.
                foreign = self.adopt("fastzero-readback", off, n)[1]
                if foreign:
                    raise Mismatch(
                        "MISMATCH seed=%d op#%d: refused fastzero off=%d "
                        "len=%d left %d bytes that are neither the old data "
                        "nor zero" % (self.a.seed, self.opno, off, n,
                                      foreign))
                return
            raise NbdFailure("NBD error seed=%d op#%d fastzero off=%d "
                             "len=%d: %s" % (self.a.seed, self.opno,
                                             off, n, e))
        self.ref_zero(off, n)
        self.recent.append((off, n))
        self.stats["fastzero"] += 1

    def op_trim(self):
        n = self.pick_len(self.a.max_zero)
        off = self.pick_off(n)
        flags = self.fua()
        self.record("trim", off, n, flags)
        self.nbd_call("trim", off, n, self.h.trim, n, off, flags)
        self.stats["trim"] += 1
        self.recent.append((off, n))
        if self.a.trim_reads_zero:
            self.ref_zero(off, n)
            return
        # Otherwise adopt what the server now returns, so that later reads
        # check it stays stable.
        old = self.ref_read(off, n)
        got, foreign = self.adopt("trim-readback", off, n)
        if not self.a.trim_zero_clusters:
            # A backing file showing through is the legitimate source of
            # bytes that are neither the old data nor zero.
            self.trim_foreign += foreign
            return
        # Without a backing file: whole clusters read as zeros, partial
        # ones may keep their data (NBD allows a trim to do nothing).
        lo = -(-off // self.cs) * self.cs
        hi = (off + n) // self.cs * self.cs
        inner = got[lo - off:hi - off] if lo < hi else b""
        if foreign or inner.count(0) != len(inner):
            # Put the allowed contents in the reference so that compare()
            # reports the first byte that breaks the rule.
            want = bytearray(g if g == 0 or g == o else o
                             for g, o in zip(got, old))
            if lo < hi:
                want[lo - off:hi - off] = bytes(hi - lo)
            self.ref_write(off, bytes(want))
            self.compare(off, got, "trim readback")

    def adopt(self, what, off, n):
        """Make the server's current contents of a range the reference;
        return them and how many bytes are neither the old contents nor
        zero."""
        got = self.nbd_call(what, off, n, self.h.pread, n, off)
        old = self.ref_read(off, n)
        foreign = 0
        if got != old:
            # Byte loops in Python are slow; most blocks are either
            # unchanged or all zero, so only look inside the others.
            step = 4096
            zero = bytes(step)
            for i in range(0, n, step):
                g, o = got[i:i + step], old[i:i + step]
                if g == o or g == zero[:len(g)]:
                    continue
                foreign += sum(1 for x, y in zip(g, o) if x != y and x != 0)
            self.ref_write(off, got)
        return got, foreign

    # ---- driving ---------------------------------------------------------

    def check_support(self):
        need = {"zero": self.h.can_zero, "trim": self.h.can_trim,
                "flush": self.h.can_flush, "fastzero": self.h.can_fast_zero}
        for name in self.names:
            if name in need and not need[name]():
                raise NbdFailure("the server does not support %s, which "
                                 "the operation mix asks for" % name)
        if self.h.is_read_only() and set(self.names) - {"read"}:
            raise NbdFailure("the export is read-only")

    def run(self):
        self.check_support()
        dispatch = {name: getattr(self, "op_" + name) for name in KNOWN_OPS}
        for i in range(self.a.ops):
            self.opno = i
            name = self.rng.choices(self.names, self.weights)[0]
            dispatch[name]()
        self.opno = self.a.ops

    def verify_all(self):
        off = 0
        while off < self.size:
            n = min(VERIFY_CHUNK, self.size - off)
            got = self.nbd_call("verify-read", off, n, self.h.pread, n, off)
            self.compare(off, got, "verify-all")
            off += n
        self.stats["verified_bytes"] = self.size


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--uri", required=True,
                   help="NBD URI, e.g. nbd+unix:///?socket=S")
    p.add_argument("--ref", required=True,
                   help="raw reference file, same size as the export; "
                        "it is modified along with the export")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ops", type=int, default=2000)
    p.add_argument("--cluster-size", type=parse_size, default=65536,
                   help="cluster size of the image, used to bias sizes "
                        "and offsets (default 64k)")
    p.add_argument("--ops-mix", default=DEFAULT_MIX,
                   help="comma separated op[:weight] among %s "
                        "(default %s)" % (",".join(KNOWN_OPS), DEFAULT_MIX))
    p.add_argument("--fua-rate", type=float, default=0.1,
                   help="fraction of writes/zeros/trims sent with FUA")
    p.add_argument("--max-zero", type=parse_size, default=8 * MiB,
                   help="largest zero or trim request (default 8M)")
    p.add_argument("--trim-reads-zero", action="store_true",
                   help="trimmed ranges must read back as zeros (no "
                        "backing file)")
    p.add_argument("--trim-zero-clusters", action="store_true",
                   help="trim without a backing file: whole clusters must "
                        "read back as zeros, the rest its old data or zeros")
    p.add_argument("--trim-undefined", action="store_true",
                   help="allow trim without --trim-reads-zero: the "
                        "contents read after a trim become the reference")
    p.add_argument("--verify-all", action="store_true",
                   help="at the end compare the whole export")
    p.add_argument("--final-flush", action="store_true",
                   help="flush before disconnecting (by default the "
                        "server's own shutdown must make data durable)")
    p.add_argument("--unaligned", action="store_true",
                   help="send requests below the server's minimum block "
                        "size too (libnbd refuses them by default)")
    p.add_argument("--trace", action="store_true",
                   help="print every operation as it is sent")
    a = p.parse_args()

    try:
        mix = parse_mix(a.ops_mix)
    except ValueError as e:
        p.error(str(e))
    if "trim" in mix and not (a.trim_reads_zero or a.trim_zero_clusters or
                              a.trim_undefined):
        # With a backing file a trimmed range may show the backing data;
        # only the caller knows which semantics apply.
        p.error("trim in --ops-mix needs --trim-reads-zero, "
                "--trim-zero-clusters or --trim-undefined")
    if a.cluster_size < 512 or a.cluster_size & (a.cluster_size - 1):
        p.error("--cluster-size must be a power of two >= 512")

    start = time.monotonic()
    h = nbd.NBD()
    if a.unaligned:
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    try:
        h.connect_uri(a.uri)
    except nbd.Error as e:
        print("nbd_random_ops: cannot connect to %s: %s" % (a.uri, e),
              file=sys.stderr)
        return 2
    size = h.get_size()
    fd = os.open(a.ref, os.O_RDWR)
    ref_size = os.fstat(fd).st_size
    if ref_size != size:
        print("nbd_random_ops: export is %d bytes, reference %s is %d"
              % (size, a.ref, ref_size), file=sys.stderr)
        return 2

    w = Workload(a, h, fd, size)
    status = 0
    try:
        w.run()
        if a.final_flush and h.can_flush():
            h.flush()
        if a.verify_all:
            w.verify_all()
    except Mismatch as e:
        print(e, file=sys.stderr)
        status = 1
    except NbdFailure as e:
        print(e, file=sys.stderr)
        status = 2
    finally:
        os.close(fd)

    s = w.stats
    summary = ("seed=%d ops=%d/%d write=%d (fua %d, %.1f MiB) read=%d "
               "(%.1f MiB) flush=%d" % (
                   a.seed, w.opno, a.ops, s["write"], s["fua"],
                   s["bytes_written"] / MiB, s["read"],
                   s["bytes_read"] / MiB, s["flush"]))
    if "zero" in w.mix:
        summary += " zero=%d (no-hole %d, may-trim %d)" % (
            s["zero"], s["zero_nohole"], s["zero_maytrim"])
    if "fastzero" in w.mix:
        summary += " fastzero=%d refused=%d" % (
            s["fastzero"], s["fastzero_refused"])
    if "trim" in w.mix:
        summary += " trim=%d" % s["trim"]
        if w.trim_foreign:
            summary += " (%d bytes after trim were neither old nor zero)" \
                % w.trim_foreign
    if s["verified_bytes"]:
        summary += " verified=%d MiB" % (s["verified_bytes"] // MiB)
    summary += " %.1fs %s" % (time.monotonic() - start,
                              "OK" if status == 0 else "FAILED")
    print("nbd_random_ops: " + summary, flush=True)

    try:
        h.shutdown()
    except nbd.Error:
        pass
    return status


if __name__ == "__main__":
    sys.exit(main())
