#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""Live part of test-reclaim-rules.sh: one function per case.

    reclaim_checks.py live CASE URI IMAGE REF [--stats FILE]

connects to the server serving IMAGE, sends the case's operations, mirrors
each one into the raw file REF (so that the shell can `qemu-img compare` the
image with REF afterwards), reads every touched range back, and checks what
the rules say about the metadata (L1/L2 entries, refcounts: read from the
image file after a flush, which must have written them back), the host file
(allocated bytes, holes, length) and the statsfile counters.

Failures are collected, not fatal at once, so that one run reports every
broken rule of a case; exit status 1 if there was any.  The last line on
stdout holds the case's figures.

Run with a python3 that has libnbd's `nbd` module: $PYTHON in the tests.
"""

import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qcow2_patch import Image, Qcow2Error  # noqa: E402

try:
    import nbd
except ImportError:
    sys.exit("reclaim_checks: the nbd module is missing; "
             "run with a python3 that has it (python3-libnbd)")

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
HOST_BLOCK = 4096
# Punching a hole can make the host filesystem allocate an extent-tree
# block, so "allocation dropped by N" is checked as ">= N - SLACK".
SLACK = 8 * KiB
STAT_KEYS = ("bytes_punched", "clusters_freed", "l2_tables_freed",
             "refcount_blocks_freed", "truncations", "bytes_truncated")


def fmt_bytes(n):
    if n % MiB == 0 and n:
        return "%dM" % (n // MiB)
    if n % KiB == 0 and n:
        return "%dK" % (n // KiB)
    return str(n)


class Case:
    def __init__(self, name, uri, img, ref, statsfile=None):
        self.name, self.uri, self.img, self.ref = name, uri, img, ref
        self.statsfile = statsfile
        self.failures = []
        self.figures = []
        self.h = None
        self.connect()
        self.size = self.h.get_size()
        self.ref_fd = os.open(ref, os.O_RDWR) if ref else None
        q = Image(img)
        self.cs = q.cluster_size
        self.version = q.h["version"]
        self.backing = q.backing_file()
        q.close()

    # ---- connection --------------------------------------------------------

    def connect(self):
        self.h = nbd.NBD()
        self.h.connect_uri(self.uri)

    def reconnect(self):
        self.h.shutdown()
        self.h = nbd.NBD()
        self.h.connect_uri(self.uri)

    def close(self):
        if self.h:
            try:
                self.h.shutdown()
            except nbd.Error:
                pass

    # ---- checks ------------------------------------------------------------

    def fail(self, what, expected, got):
        msg = "%s: %s: expected %s, got %s" % (self.name, what, expected, got)
        self.failures.append(msg)
        print("  FAILED CHECK " + msg, file=sys.stderr, flush=True)

    def expect(self, cond, what, expected, got):
        if not cond:
            self.fail(what, expected, got)
        return cond

    def fig(self, text):
        self.figures.append(text)

    # ---- reference mirror -------------------------------------------------

    def ref_read(self, off, n):
        return os.pread(self.ref_fd, n, off)

    def ref_write(self, off, data):
        os.pwrite(self.ref_fd, data, off)

    def ref_zero(self, off, n):
        end = off + n
        while off < end:
            k = min(16 * MiB, end - off)
            self.ref_write(off, bytes(k))
            off += k

    def verify(self, off, n, what):
        """Read a range through NBD and compare it with the reference."""
        lo = max(0, off - self.cs)
        hi = min(self.size, off + n + self.cs)
        pos = lo
        while pos < hi:
            k = min(32 * MiB, hi - pos)
            got = self.h.pread(k, pos)
            want = self.ref_read(pos, k)
            if got != want:
                i = next(i for i in range(k) if got[i] != want[i])
                j = next(j for j in range(k - 1, -1, -1) if got[j] != want[j])
                self.fail("contents after %s" % what,
                          "byte 0x%02x at guest offset %d (0x%x)"
                          % (want[i], pos + i, pos + i),
                          "0x%02x (differences span %d..%d)"
                          % (got[i], pos + i, pos + j))
                return False
            pos += k
        return True

    # ---- operations (each mirrored into the reference) --------------------

    def write(self, off, n, pat):
        self.h.pwrite(bytes((pat,)) * n, off)
        self.ref_write(off, bytes((pat,)) * n)
        self.verify(off, n, "write %d+%d" % (off, n))

    def trim(self, off, n, expect="punch", check=True):
        """expect: what the trimmed range reads afterwards.
        punch:    the host-block-aligned part reads zeros, the rest is kept
        clusters: whole clusters read zeros, partial ones are unchanged
        zero:     the whole range reads zeros
        same:     nothing changes"""
        what = "trim %s+%s" % (fmt_bytes(off), fmt_bytes(n))
        try:
            self.h.trim(n, off)
        except nbd.Error as e:
            self.fail(what, "success", "error %s" % e)
            return
        if expect == "punch":
            lo = -(-off // HOST_BLOCK) * HOST_BLOCK
            hi = (off + n) // HOST_BLOCK * HOST_BLOCK
            if lo < hi:
                self.ref_zero(lo, hi - lo)
        elif expect == "clusters":
            lo = -(-off // self.cs) * self.cs
            hi = (off + n) // self.cs * self.cs
            if lo < hi:
                self.ref_zero(lo, hi - lo)
        elif expect == "zero":
            self.ref_zero(off, n)
        elif expect != "same":
            raise ValueError(expect)
        if check:
            self.verify(off, n, what)

    ZERO_FLAGS = {
        "maytrim": 0,
        "nohole": nbd.CMD_FLAG_NO_HOLE,
        "fast": nbd.CMD_FLAG_FAST_ZERO,
        "fastnohole": nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE,
    }

    def zero(self, off, n, mode="maytrim", fast_result="ok"):
        """fast_result (FAST_ZERO modes): ok, enotsup (the range must then
        be unchanged) or any (either is accepted; returns which)."""
        what = "zero(%s) %s+%s" % (mode, fmt_bytes(off), fmt_bytes(n))
        try:
            self.h.zero(n, off, self.ZERO_FLAGS[mode])
            result = "ok"
        except nbd.Error as e:
            if e.errnum in (errno.ENOTSUP, errno.EOPNOTSUPP) and "fast" in mode:
                result = "enotsup"
            else:
                self.fail(what, "success", "error %s" % e)
                return None
        if "fast" in mode and fast_result != "any":
            self.expect(result == fast_result, what, fast_result, result)
        if result == "ok":
            self.ref_zero(off, n)
        self.verify(off, n, what)
        return result

    def flush(self):
        self.h.flush()

    # ---- looking at the image file ----------------------------------------

    def image(self):
        # Opened afresh each time: the server may move tables or shrink
        # the file between two looks.
        return Image(self.img)

    def entry(self, goff):
        q = self.image()
        try:
            loc, _ = q.l2_entry_offset(goff)
            d = q.decode_l2(q.read_u64(loc))
            d["l2_table"] = loc // self.cs * self.cs
            return d
        except Qcow2Error as e:
            if "no L2 table" in str(e):
                return {"type": "no-l2", "host_offset": 0}
            return {"type": "unreadable (%s)" % e, "host_offset": 0}
        finally:
            q.close()

    def entries(self, off, n):
        return [self.entry(g) for g in range(off, off + n, self.cs)]

    def l1(self, index):
        q = self.image()
        try:
            return q.read_u64(q.l1_entry_offset(index))
        finally:
            q.close()

    def refcount(self, host):
        q = self.image()
        try:
            return q.get_refcount(host)
        except Qcow2Error as e:
            if "no refcount block" in str(e) or "beyond the end" in str(e):
                return 0
            raise
        finally:
            q.close()

    def last_used_end(self):
        """End of the last host cluster whose refcount is not zero."""
        q = self.image()
        try:
            n = -(-q.file_size() // self.cs)
            for i in range(n - 1, -1, -1):
                try:
                    if q.get_refcount(i * self.cs):
                        return (i + 1) * self.cs
                except Qcow2Error:
                    pass
            return 0
        finally:
            q.close()

    def alloc(self):
        return os.stat(self.img).st_blocks * 512

    def file_size(self):
        return os.stat(self.img).st_size

    def host_is_hole(self, off, n):
        """True if [off, off+n) of the host file holds no data (or lies
        beyond its end)."""
        fd = os.open(self.img, os.O_RDONLY)
        try:
            if off >= os.fstat(fd).st_size:
                return True
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return True
                raise
            return d >= off + n
        finally:
            os.close(fd)

    def host_reads_zero(self, off, n):
        fd = os.open(self.img, os.O_RDONLY)
        try:
            return os.pread(fd, n, off) == bytes(n)
        finally:
            os.close(fd)

    def stats(self):
        if not self.statsfile or not os.path.exists(self.statsfile):
            return {}
        out = {}
        with open(self.statsfile) as f:
            for line in f:
                if "=" in line:
                    k, v = line.strip().split("=", 1)
                    out[k] = int(v)
        return out

    # ---- common assertions -------------------------------------------------

    def expect_types(self, off, n, want, what):
        """Every guest cluster of the range has an L2 entry of type want
        (a tuple of acceptable types); no-l2 counts as unallocated."""
        bad = []
        for i, e in enumerate(self.entries(off, n)):
            t = e["type"]
            if t == "no-l2" and "unallocated" in want:
                continue
            if t not in want:
                bad.append("%s at %s" % (t, fmt_bytes(off + i * self.cs)))
        return self.expect(not bad, "%s: L2 entries of %s+%s" % (
            what, fmt_bytes(off), fmt_bytes(n)), "/".join(want),
            ", ".join(bad[:4]) + (" (+%d more)" % (len(bad) - 4)
                                  if len(bad) > 4 else ""))

    def expect_refcounts(self, hosts, want, what):
        bad = [(h, self.refcount(h)) for h in hosts]
        bad = [(h, r) for h, r in bad if r != want]
        return self.expect(not bad, "%s: refcount of %d host clusters" % (
            what, len(hosts)), want, ", ".join(
                "%d at 0x%x" % (r, h) for h, r in bad[:4]))

    def expect_drop(self, before, after, want, what):
        return self.expect(before - after >= want - SLACK, what,
                           "%s less (%d bytes of slack)" % (fmt_bytes(want), SLACK),
                           "%d less" % (before - after))

    def expect_truncated(self, what):
        end, size = self.last_used_end(), self.file_size()
        return self.expect(size == end, "%s: file length" % what,
                           "%d (end of the last used cluster)" % end, size)

    def hosts_of(self, off, n):
        return [e["host_offset"] for e in self.entries(off, n)
                if e["type"] in ("normal", "zero_allocated")]


# ---------------------------------------------------------------------------
# The cases.  Image contents are prepared by the shell (qemu-img / qemu-io);
# the layouts assumed here are documented there.
# ---------------------------------------------------------------------------

def case_v3(c):
    """1 GiB v3, 64 KiB clusters, no backing.  Data: 0x11 0..4M,
    0x22 8M..9M, 0x33 600M..601M, 0x44 1023M..1G (L2 table #1, end of
    file)."""
    a0, s0 = c.alloc(), c.file_size()
    whole = c.hosts_of(1 * MiB, 1 * MiB)
    c.expect(len(whole) == 16, "setup: clusters at 1M", 16, len(whole))
    c.trim(1 * MiB, 1 * MiB)
    a1 = c.alloc()
    c.expect_drop(a0, a1, 1 * MiB, "whole-cluster trim: host allocation drops "
             "at once (before any flush)")

    # Part of a cluster: the host-block-aligned middle is punched at once.
    cl = 2 * MiB
    host = c.entry(cl)["host_offset"]
    c.trim(cl + 4096, c.cs - 8192)
    a2 = c.alloc()
    c.expect_drop(a1, a2, c.cs - 8192, "partial trim: host allocation")
    c.expect(c.host_is_hole(host + 4096, c.cs - 8192),
             "partial trim: host range 0x%x+%d" % (host + 4096, c.cs - 8192),
             "a hole", "data")
    c.flush()
    c.expect_types(cl, c.cs, ("normal",), "partial trim, after flush")
    # The rest of it: now the whole cluster is a hole, so it is freed.
    c.trim(cl, 4096)
    c.trim(cl + c.cs - 4096, 4096)
    # Unaligned edges: only [3M+4K, 3M+8K) is punched.
    c.trim(3 * MiB + 100, 10000)
    c.trim(3 * MiB + 200 * KiB + 1, 4000)      # no whole host block: no-op

    # All of L2 table #1 (512M..1G): table freed, file truncated.
    l2_1 = c.l1(1) & 0x00FFFFFFFFFFFE00
    tail_hosts = c.hosts_of(600 * MiB, 1 * MiB) + c.hosts_of(1023 * MiB, 1 * MiB)
    c.trim(512 * MiB, 512 * MiB, check=False)
    c.verify(600 * MiB, 1 * MiB, "trim 512M+512M")
    c.verify(1023 * MiB, 1 * MiB, "trim 512M+512M")
    c.flush()
    a3, s3 = c.alloc(), c.file_size()

    c.expect_types(1 * MiB, 1 * MiB, ("unallocated",), "whole-cluster trim")
    c.expect_refcounts(whole, 0, "whole-cluster trim")
    c.expect_types(cl, c.cs, ("unallocated",), "cluster punched piece by piece")
    c.expect(c.refcount(host) == 0 or c.file_size() <= host,
             "cluster punched piece by piece: refcount of 0x%x" % host, 0,
             c.refcount(host))
    c.expect_types(3 * MiB, c.cs, ("normal",), "partial unaligned trim")
    c.expect(c.l1(1) == 0, "L2 table of 512M..1G emptied: L1[1]", 0,
             "0x%016x" % c.l1(1))
    c.expect(c.refcount(l2_1) == 0 or s3 <= l2_1,
             "freed L2 table at 0x%x: refcount" % l2_1, 0, c.refcount(l2_1))
    c.expect_refcounts([h for h in tail_hosts if h < s3], 0, "tail clusters")
    c.expect(s3 <= s0 - 2 * MiB, "tail freed: file length", "<= %d" %
             (s0 - 2 * MiB), s3)
    c.expect_truncated("after flush")
    st = c.stats()
    for k in ("bytes_punched", "clusters_freed", "l2_tables_freed",
              "truncations", "bytes_truncated"):
        c.expect(st.get(k, 0) > 0, "statsfile %s" % k, "> 0", st.get(k))
    c.fig("alloc %s->%s size %s->%s stats %s" % (
        fmt_bytes(a0), fmt_bytes(a3), fmt_bytes(s0), fmt_bytes(s3),
        ",".join("%s=%s" % (k, st.get(k)) for k in STAT_KEYS)))


def case_noalloc(c):
    """1 GiB v3 or v2, no backing, data only at 0..1M (L2 table #0)."""
    a0, s0 = c.alloc(), c.file_size()
    before = c.entry(100 * MiB)["type"]
    c.trim(100 * MiB, 100 * MiB, expect="zero", check=False)  # in L2 #0
    c.trim(600 * MiB, 100 * MiB, expect="zero", check=False)  # no L2 #1
    c.zero(700 * MiB, 100 * MiB, "maytrim")
    c.zero(800 * MiB, 50 * MiB, "nohole")
    c.zero(850 * MiB, 50 * MiB, "fast")
    c.zero(900 * MiB, 50 * MiB, "fastnohole")
    c.zero(950 * MiB + 100, 1000, "nohole")            # partial cluster
    c.trim(960 * MiB + 100, 100000, expect="zero")     # partial + whole
    c.zero(970 * MiB + 100, 1000, "fastnohole", fast_result="any")
    c.zero(200 * MiB + 12345, 70000, "maytrim")        # partial, L2 #0
    c.flush()
    a1, s1 = c.alloc(), c.file_size()
    c.expect(a1 == a0 and s1 == s0, "trim/zero over unallocated space: "
             "host file (allocated, length)", "%d, %d" % (a0, s0),
             "%d, %d" % (a1, s1))
    c.expect(c.l1(1) == 0, "no L2 table for 512M..1G: L1[1]", 0,
             "0x%016x" % c.l1(1))
    c.expect_types(100 * MiB, 1 * MiB, ("unallocated", "zero"),
                   "trim over unallocated")
    c.fig("v%d alloc %s->%s size %s->%s (L2 #0 entries were %s)" % (
        c.version, fmt_bytes(a0), fmt_bytes(a1), fmt_bytes(s0), fmt_bytes(s1),
        before))


def case_huge(c):
    """Fresh 100 GiB image: trim, then zero, the whole disk."""
    a0, s0 = c.alloc(), c.file_size()
    step = 2 * GiB
    for off in range(0, c.size, step):
        c.h.trim(min(step, c.size - off), off)
    c.flush()
    a1, s1 = c.alloc(), c.file_size()
    c.expect(a1 == a0 and s1 == s0, "full-disk trim of a fresh image: "
             "stat %b*512 and size", "%d %d" % (a0, s0), "%d %d" % (a1, s1))
    for off in range(0, c.size, step):
        c.h.zero(min(step, c.size - off), off)
    c.flush()
    a2, s2 = c.alloc(), c.file_size()
    c.expect(a2 == a0 and s2 == s0, "full-disk write-zeroes (MAY_TRIM) of a "
             "fresh image: stat %b*512 and size", "%d %d" % (a0, s0),
             "%d %d" % (a2, s2))
    for off in (0, 50 * GiB - 4096, c.size - 1 * MiB):
        got = c.h.pread(1 * MiB, off)
        c.expect(got == bytes(1 * MiB), "reads at %d" % off, "zeros", "data")
    c.fig("100G alloc %d->%d->%d size %d->%d->%d" % (a0, a1, a2, s0, s1, s2))


def case_backing3(c):
    """64M v3 top over a base with 0xaa 0..8M and 0xab 32M..40M; the top
    has 0x11 1M..2M and 0x12 33M..34M."""
    _case_backing(c, v3=True)


def case_backing2(c):
    _case_backing(c, v3=False)


def _case_backing(c, v3):
    a0 = c.alloc()
    owned = c.hosts_of(1 * MiB, 256 * KiB)
    c.trim(1 * MiB, 256 * KiB, expect="zero")          # owned, whole
    a1 = c.alloc()
    c.expect_drop(a0, a1, 256 * KiB, "trim of owned clusters: host "
             "allocation drops at once")
    # Owned cluster, partly: the aligned part is punched, reads zeros.
    c.trim(1 * MiB + 512 * KiB + 4096, 56 * KiB, expect="punch")
    if v3:
        c.trim(4 * MiB, 256 * KiB, expect="zero")      # backing only: zero flag
    else:
        c.trim(4 * MiB, 256 * KiB, expect="same")      # v2: nothing to record
    c.trim(5 * MiB + 4096, 8192, expect="same")        # partial, backing only
    c.zero(33 * MiB, 128 * KiB, "maytrim")
    nohole_hosts = c.hosts_of(33 * MiB + 256 * KiB, 128 * KiB)
    c.zero(33 * MiB + 256 * KiB, 128 * KiB, "nohole")
    c.zero(6 * MiB, 128 * KiB, "maytrim")              # backing only
    c.zero(7 * MiB, 64 * KiB, "nohole")                # backing only
    c.zero(5 * MiB + 100, 1000, "fast", fast_result="enotsup")
    fz = c.zero(8 * MiB + 64 * KiB, 64 * KiB, "fast",
                fast_result="ok" if v3 else "any")  # backing reads zeros
    fz2 = c.zero(2 * MiB + 128 * KiB, 64 * KiB, "fast",
                 fast_result="ok" if v3 else "enotsup")  # backing 0xaa
    c.flush()
    a2 = c.alloc()
    if v3:
        c.expect_types(1 * MiB, 256 * KiB, ("zero",), "v3+backing: trim of owned")
        c.expect_refcounts(owned, 0, "v3+backing: trim of owned")
        c.expect_types(4 * MiB, 256 * KiB, ("zero",), "v3+backing: trim over backing")
        c.expect_types(33 * MiB, 128 * KiB, ("zero",), "v3+backing: zero MAY_TRIM")
        c.expect_types(6 * MiB, 128 * KiB, ("zero", "zero_allocated"),
                       "v3+backing: zero MAY_TRIM over backing")
        c.expect_types(2 * MiB + 128 * KiB, 64 * KiB, ("zero",),
                       "v3+backing: FAST_ZERO over backing")
    else:
        es = c.entries(1 * MiB, 256 * KiB)
        c.expect([e["host_offset"] for e in es] == owned and
                 all(e["type"] == "normal" for e in es),
                 "v2+backing: trim keeps the entries", "normal at %s" %
                 [hex(h) for h in owned], [(e["type"], hex(e["host_offset"]))
                                           for e in es])
        c.expect(c.host_is_hole(min(owned), 256 * KiB) if owned else False,
                 "v2+backing: trimmed host range 0x%x+256K" % min(owned or [0]),
                 "a hole", "data")
        c.expect_types(4 * MiB, 256 * KiB, ("unallocated",),
                       "v2+backing: trim over backing")
        c.expect_types(6 * MiB, 128 * KiB, ("normal",),
                       "v2+backing: zero MAY_TRIM over backing writes zeros")
    kept = c.entries(33 * MiB + 256 * KiB, 128 * KiB)
    want_type = "zero_allocated" if v3 else "normal"
    c.expect([e["host_offset"] for e in kept] == nohole_hosts and
             all(e["type"] == want_type for e in kept),
             "zero NO_HOLE of owned clusters keeps them", "%s at %s" % (
                 want_type, [hex(h) for h in nohole_hosts]),
             [(e["type"], hex(e["host_offset"])) for e in kept])
    c.expect_refcounts(nohole_hosts, 1, "zero NO_HOLE of owned clusters")
    c.expect(all(c.host_reads_zero(h, c.cs) for h in nohole_hosts),
             "zero NO_HOLE: host data of the kept clusters", "zeros", "old data")
    c.fig("v%d+backing alloc %s->%s->%s fastzero=%s/%s" % (
        c.version, fmt_bytes(a0), fmt_bytes(a1), fmt_bytes(a2), fz, fz2))


def case_snapshot(c):
    """64M v3: 0x11 0..4M, 0x22 8M..9M, snapshot S, then 0x33 2M..3M and
    0x44 9M..9M+64K (refcount 1, the rest of 0..9M refcount 2)."""
    shared = c.hosts_of(0, 1 * MiB)
    own = c.hosts_of(2 * MiB, 1 * MiB)
    c.expect_refcounts(shared, 2, "setup: shared clusters")
    c.expect_refcounts(own, 1, "setup: clusters written after the snapshot")
    a0 = c.alloc()
    c.trim(0, 1 * MiB)
    a1 = c.alloc()
    c.expect(a1 >= a0, "trim of shared clusters: not punched (host "
             "allocation)", ">= %d" % a0, a1)
    c.trim(2 * MiB, 1 * MiB)
    a2 = c.alloc()
    c.expect_drop(a1, a2, 1 * MiB, "trim of unshared clusters: punched")
    c.trim(1 * MiB, 1 * MiB)                   # shared, again: no new notice
    c.trim(3 * MiB + 4096, 8192, expect="same")  # partial shared: kept
    c.zero(8 * MiB, 64 * KiB, "nohole")
    c.zero(8 * MiB + 128 * KiB + 100, 1000, "fast", fast_result="enotsup")
    c.zero(8 * MiB + 256 * KiB, 64 * KiB, "fast", fast_result="ok")
    c.flush()
    c.expect_types(0, 2 * MiB, ("unallocated",), "trim of shared clusters")
    c.expect_refcounts(shared, 1, "trim of shared clusters (snapshot keeps them)")
    c.expect(all(not c.host_is_hole(h, c.cs) for h in shared),
             "shared clusters after trim", "host data kept", "punched")
    c.expect_refcounts([h for h in own if h < c.file_size()], 0,
                       "trim of unshared clusters")
    c.reconnect()
    c.trim(3 * MiB + 128 * KiB, 128 * KiB)     # shared, second connection
    c.flush()
    c.fig("alloc %s->%s->%s (shared trim, then unshared)" % (
        fmt_bytes(a0), fmt_bytes(a1), fmt_bytes(a2)))


def case_compressed(c):
    """16M v3, every cluster of 0..8M zlib-compressed (several per host
    cluster)."""
    # Model: for each host cluster, the guest clusters whose compressed
    # bytes touch it; the refcount must be that number.
    users = {}
    comp = {}
    for g in range(0, 8 * MiB, c.cs):
        e = c.entry(g)
        if e["type"] != "compressed":
            continue
        comp[g] = e
        first = e["host_offset"] // c.cs
        last = (e["host_offset"] + e["compressed_length"] - 1) // c.cs
        for hc in range(first, last + 1):
            users.setdefault(hc * c.cs, set()).add(g)
    c.expect(len(comp) >= 100, "setup: compressed clusters", ">= 100", len(comp))
    model_ok = all(c.refcount(h) == len(u) for h, u in users.items())
    c.expect(model_ok, "setup: refcounts of compressed host clusters",
             "one per compressed cluster touching them", "other counts")
    a0 = c.alloc()
    trimmed = set(g for g in comp if g < 2 * MiB)
    c.trim(0, 2 * MiB)
    a1 = c.alloc()
    freed = [h for h, u in users.items() if u <= trimmed]
    partly = {h: len(u - trimmed) for h, u in users.items()
              if u & trimmed and not u <= trimmed}
    # Host clusters no compressed cluster uses any more: their refcount
    # drop waits for the flush that writes the L2 change (invariant), so
    # they may be punched then rather than at once.  Only reported.
    size = c.file_size()
    early = sum(1 for h in freed if h >= size or c.host_is_hole(h, c.cs))
    c.trim(4 * MiB + 4096, 8192, expect="same")        # partial compressed
    c.zero(4 * MiB + 64 * KiB + 100, 1000, "fast", fast_result="enotsup")
    c.zero(5 * MiB, 64 * KiB, "fast", fast_result="ok")
    c.zero(6 * MiB + 100, 1000, "nohole")
    c.zero(6 * MiB + 128 * KiB, 64 * KiB, "maytrim")
    c.flush()
    c.expect_types(0, 2 * MiB, ("unallocated",), "trim of compressed clusters")
    size = c.file_size()
    bad = [h for h in freed if h < size and
           (c.refcount(h) != 0 or not c.host_is_hole(h, c.cs))]
    c.expect(not bad, "host clusters used only by trimmed compressed "
             "clusters (%d)" % len(freed), "refcount 0 and a hole",
             ", ".join("0x%x: refcount %d" % (h, c.refcount(h)) for h in bad[:4]))
    bad = [(h, n, c.refcount(h)) for h, n in partly.items() if c.refcount(h) != n]
    c.expect(not bad, "host clusters shared with remaining compressed "
             "clusters (%d)" % len(partly), "count of remaining users",
             ", ".join("0x%x: want %d got %d" % b for b in bad[:4]))
    c.expect_types(4 * MiB, c.cs, ("compressed",), "partial trim of compressed")
    c.fig("%d compressed clusters, trimmed 32: %d host clusters freed "
          "(%d punched before the flush), %d still shared; alloc %s->%s->%s" % (
              len(comp), len(freed), early, len(partly), fmt_bytes(a0),
              fmt_bytes(a1), fmt_bytes(c.alloc())))


def case_v2(c):
    """64M v2 (compat=0.10), no backing: 0x11 0..4M, 0x22 60M..64M."""
    a0, s0 = c.alloc(), c.file_size()
    whole = c.hosts_of(1 * MiB, 1 * MiB)
    c.trim(1 * MiB, 1 * MiB)
    a1 = c.alloc()
    c.expect_drop(a0, a1, 1 * MiB, "trim: host allocation drops at once")
    c.trim(2 * MiB + 256 * KiB + 100, 100000)          # partial both ends
    c.zero(2 * MiB, 128 * KiB, "maytrim")
    kept = c.hosts_of(3 * MiB, 128 * KiB)
    c.zero(3 * MiB, 128 * KiB, "nohole")
    c.zero(3 * MiB + 512 * KiB, 64 * KiB, "fast", fast_result="ok")
    tail = c.hosts_of(60 * MiB, 4 * MiB)
    c.trim(60 * MiB, 4 * MiB)
    c.flush()
    a2, s2 = c.alloc(), c.file_size()
    c.expect_types(1 * MiB, 1 * MiB, ("unallocated",), "v2 trim")
    c.expect_refcounts(whole, 0, "v2 trim")
    c.expect_types(2 * MiB, 128 * KiB, ("unallocated",), "v2 zero MAY_TRIM")
    es = c.entries(3 * MiB, 128 * KiB)
    c.expect([e["host_offset"] for e in es] == kept and
             all(e["type"] == "normal" for e in es),
             "v2 zero NO_HOLE keeps the clusters", [hex(h) for h in kept],
             [(e["type"], hex(e["host_offset"])) for e in es])
    c.expect(all(c.host_reads_zero(h, c.cs) for h in kept),
             "v2 zero NO_HOLE: host data", "zeros", "old data")
    c.expect_types(3 * MiB + 512 * KiB, 64 * KiB, ("unallocated",),
                   "v2 FAST_ZERO of an owned cluster")
    c.expect_refcounts([h for h in tail if h < s2], 0, "v2 tail trim")
    c.expect(s2 <= s0 - 4 * MiB, "v2 tail trim: file length",
             "<= %d" % (s0 - 4 * MiB), s2)
    c.expect_truncated("v2 after flush")
    c.fig("alloc %s->%s->%s size %s->%s" % (fmt_bytes(a0), fmt_bytes(a1),
                                            fmt_bytes(a2), fmt_bytes(s0),
                                            fmt_bytes(s2)))


def case_c4k(c):
    """64M v3, 4 KiB clusters: 0x11 0..1M, 0x22 4M..40M.  An L2 table maps
    2M, a refcount block counts 8M of host file."""
    a0, s0 = c.alloc(), c.file_size()
    c.trim(512 * KiB + 100, 10000)          # one whole cluster inside
    c.trim(4 * MiB, 36 * MiB, check=False)
    a1 = c.alloc()
    c.expect_drop(a0, a1, 36 * MiB, "trim of 36M: host allocation drops at "
             "once")
    c.verify(4 * MiB, 1 * MiB, "trim 4M+36M")
    c.verify(39 * MiB, 1 * MiB, "trim 4M+36M")
    c.flush()
    a2, s2 = c.alloc(), c.file_size()
    c.expect_types(512 * KiB + 4096, 4096, ("unallocated",), "4K: trim of one cluster")
    c.expect_types(512 * KiB, 4096, ("normal",), "4K: partial cluster kept")
    l1_left = [i for i in range(2, 20) if c.l1(i) != 0]
    c.expect(not l1_left, "4K: L2 tables of 4M..40M freed: L1[2..19]",
             "all 0", "non-zero at %s" % l1_left)
    c.expect(s2 < 2 * MiB, "4K: file length after freeing 36M", "< 2M", s2)
    c.expect_truncated("4K after flush")
    st = c.stats()
    for k in STAT_KEYS:
        c.expect(st.get(k, 0) > 0, "statsfile %s" % k, "> 0", st.get(k))
    c.expect(st.get("l2_tables_freed", 0) >= 18, "statsfile l2_tables_freed",
             ">= 18", st.get("l2_tables_freed"))
    c.fig("alloc %s->%s size %s->%s stats %s" % (
        fmt_bytes(a0), fmt_bytes(a2), fmt_bytes(s0), fmt_bytes(s2),
        ",".join("%s=%s" % (k, st.get(k)) for k in STAT_KEYS)))


def case_c2m(c):
    """64M v3, 2 MiB clusters: 0x11 0..8M, 0x22 20M..22M, 0x33 62M..64M."""
    a0, s0 = c.alloc(), c.file_size()
    whole = c.hosts_of(2 * MiB, 2 * MiB)
    c.trim(2 * MiB, 2 * MiB)
    a1 = c.alloc()
    c.expect_drop(a0, a1, 2 * MiB, "2M: whole-cluster trim punches at once")
    c.trim(4 * MiB + 100, 1 * MiB)          # partial: [4M+4K, 5M) punched
    a2 = c.alloc()
    c.expect_drop(a1, a2, 1 * MiB - 4096, "2M: partial trim punches the "
             "aligned part")
    piece = c.hosts_of(6 * MiB, 2 * MiB)
    c.trim(6 * MiB, 1 * MiB)
    c.trim(7 * MiB, 1 * MiB - 4096)
    c.trim(8 * MiB - 4096, 4096)            # completes the hole
    tail = c.hosts_of(62 * MiB, 2 * MiB)
    c.trim(62 * MiB, 2 * MiB)
    c.flush()
    s3 = c.file_size()
    c.expect_types(2 * MiB, 2 * MiB, ("unallocated",), "2M: whole trim")
    c.expect_refcounts([h for h in whole if h < s3], 0, "2M: whole trim")
    c.expect_types(4 * MiB, 2 * MiB, ("normal",), "2M: partial trim")
    c.expect_types(6 * MiB, 2 * MiB, ("unallocated",),
                   "2M: cluster trimmed in three pieces")
    c.expect_refcounts([h for h in piece if h < s3], 0,
                       "2M: cluster trimmed in three pieces")
    c.expect(s3 <= s0 - 2 * MiB, "2M: tail trim: file length",
             "<= %d" % (s0 - 2 * MiB), s3)
    c.expect_refcounts([h for h in tail if h < s3], 0, "2M: tail trim")
    c.expect_truncated("2M after flush")
    c.fig("alloc %s->%s size %s->%s" % (fmt_bytes(a0), fmt_bytes(c.alloc()),
                                        fmt_bytes(s0), fmt_bytes(s3)))


def case_zeroflags(c):
    """64M v3, no backing: 0x11 0..4M."""
    a0 = c.alloc()
    h_may = c.hosts_of(0, 256 * KiB)
    c.zero(0, 256 * KiB, "maytrim")
    a1 = c.alloc()
    c.expect_drop(a0, a1, 256 * KiB, "zero MAY_TRIM of owned clusters: host "
             "allocation drops at once")
    h_keep = c.hosts_of(256 * KiB, 256 * KiB)
    c.zero(256 * KiB, 256 * KiB, "nohole")
    c.zero(512 * KiB + 100, 1000, "nohole")             # partial
    c.zero(576 * KiB + 4096, 8192, "maytrim")           # partial
    c.zero(640 * KiB, 64 * KiB, "fast", fast_result="ok")
    fnh = c.zero(704 * KiB, 64 * KiB, "fastnohole", fast_result="any")
    c.zero(10 * MiB, 1 * MiB, "fast", fast_result="ok")  # unallocated
    fpu = c.zero(12 * MiB + 100, 1000, "fast", fast_result="any")
    fpo = c.zero(1 * MiB + 100, 1000, "fast", fast_result="any")
    c.flush()
    c.expect_types(0, 256 * KiB, ("unallocated",), "zero MAY_TRIM, no backing")
    c.expect_refcounts(h_may, 0, "zero MAY_TRIM, no backing")
    es = c.entries(256 * KiB, 256 * KiB)
    c.expect([e["host_offset"] for e in es] == h_keep and
             all(e["type"] == "zero_allocated" for e in es),
             "zero NO_HOLE of owned clusters (v3)", "zero flag with offsets %s"
             % [hex(h) for h in h_keep],
             [(e["type"], hex(e["host_offset"])) for e in es])
    c.expect_refcounts(h_keep, 1, "zero NO_HOLE of owned clusters")
    c.expect(all(c.host_reads_zero(h, c.cs) for h in h_keep),
             "zero NO_HOLE: host data of the kept clusters", "zeros", "old data")
    c.expect_types(512 * KiB, 128 * KiB, ("normal",), "partial zero")
    c.expect_types(640 * KiB, 64 * KiB, ("unallocated", "zero"),
                   "FAST_ZERO of an owned cluster")
    c.expect_types(10 * MiB, 1 * MiB, ("unallocated",),
                   "FAST_ZERO over unallocated")
    c.fig("alloc %s->%s->%s; FAST_ZERO|NO_HOLE whole owned=%s, "
          "partial unallocated=%s, partial owned=%s" % (
              fmt_bytes(a0), fmt_bytes(a1), fmt_bytes(c.alloc()), fnh, fpu, fpo))


def case_keep(c):
    """discard=keep, 64M v3: 0x11 0..4M."""
    a0 = c.alloc()
    hosts = c.hosts_of(1 * MiB, 1 * MiB)
    c.trim(1 * MiB, 1 * MiB, expect="zero")
    a1 = c.alloc()
    c.expect_drop(a0, a1, 1 * MiB, "discard=keep: host range punched at once")
    c.trim(2 * MiB + 4096 + 100, 20000)
    c.flush()
    es = c.entries(1 * MiB, 1 * MiB)
    c.expect([e["host_offset"] for e in es] == hosts and
             all(e["type"] == "zero_allocated" for e in es),
             "discard=keep: entries", "zero flag, offsets kept",
             sorted(set((e["type"], e["host_offset"] in hosts) for e in es)))
    c.expect_refcounts(hosts, 1, "discard=keep")
    c.expect_types(2 * MiB, c.cs, ("normal",), "discard=keep: partial")
    c.fig("alloc %s->%s" % (fmt_bytes(a0), fmt_bytes(c.alloc())))


def case_ignore(c):
    """discard=ignore, 64M v3: 0x11 0..4M."""
    a0 = c.alloc()
    before = c.entries(0, 4 * MiB)
    c.trim(1 * MiB, 1 * MiB, expect="same")
    c.trim(2 * MiB + 100, 100000, expect="same")
    c.flush()
    a1 = c.alloc()
    c.expect(a1 == a0, "discard=ignore: host allocation", a0, a1)
    after = c.entries(0, 4 * MiB)
    c.expect(before == after, "discard=ignore: L2 entries", "unchanged",
             "changed")
    c.expect_refcounts([e["host_offset"] for e in after], 1, "discard=ignore")
    c.zero(3 * MiB, 64 * KiB, "maytrim")      # zeroing still zeroes
    c.fig("alloc %s->%s" % (fmt_bytes(a0), fmt_bytes(a1)))


def case_reuse(c):
    """64M v3: 0x11 0..8M, 0x22 16M..20M (host data after the first 8M)."""
    low = min(c.hosts_of(0, 8 * MiB))
    high = max(c.hosts_of(16 * MiB, 4 * MiB))
    c.trim(0, 8 * MiB)
    c.flush()
    s1, a1 = c.file_size(), c.alloc()
    c.write(40 * MiB, 2 * MiB, 0x33)
    c.write(50 * MiB + 100, 300000, 0x34)
    c.flush()
    s2, a2 = c.file_size(), c.alloc()
    new = c.hosts_of(40 * MiB, 2 * MiB) + c.hosts_of(50 * MiB, 320 * KiB)
    c.expect(max(new) < low + 8 * MiB, "new clusters after freeing the "
             "start: host offsets", "< 0x%x (inside the freed range)"
             % (low + 8 * MiB), "max 0x%x" % max(new))
    c.expect(s2 <= s1, "new writes into freed space: file length",
             "<= %d" % s1, s2)
    c.fig("freed host 0x%x.., new data at 0x%x..0x%x (old data up to 0x%x), "
          "size %s->%s alloc %s->%s" % (low, min(new), max(new), high,
                                         fmt_bytes(s1), fmt_bytes(s2),
                                         fmt_bytes(a1), fmt_bytes(a2)))


CASES = {n[5:]: f for n, f in globals().items() if n.startswith("case_")}


def main():
    args = sys.argv[1:]
    if len(args) < 5 or args[0] != "live" or args[1] not in CASES:
        sys.exit("usage: reclaim_checks.py live CASE URI IMAGE REF "
                 "[--stats FILE]\ncases: " + " ".join(CASES))
    _, name, uri, img, ref = args[:5]
    statsfile = None
    if len(args) >= 7 and args[5] == "--stats":
        statsfile = args[6]
    c = Case(name, uri, img, None if ref == "-" else ref, statsfile)
    try:
        CASES[name](c)
    except (nbd.Error, Qcow2Error, OSError) as e:
        c.fail("unexpected error", "none", "%s: %s" % (type(e).__name__, e))
    finally:
        c.close()
    print("; ".join(c.figures))
    if c.failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
