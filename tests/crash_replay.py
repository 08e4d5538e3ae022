#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""Crash consistency of qcow2reclaim: power cuts replayed from the host I/O
log (test-crash.sh) and SIGKILL under parallel load (test-kill.sh).

Run it with a python3 that has libnbd's `nbd` module: the tests run it as
$PYTHON (see functions.sh); on Debian that is /usr/bin/python3.

  workload --uri URI --iolog LOG --journal J [--seed S --ops N ...]
      One sequential client: writes of mixed sizes (some FUA), trims, zeroes
      with and without MAY_TRIM, fast zeroes, flushes, and reads checked
      against a model.  For every request it journals the I/O log's size
      just before sending it and just after its reply arrived.
  replay --initial IMG --iolog LOG --journal J --plugin SO --workdir D ...
      Builds the images a power cut could leave at chosen crash points and
      checks each: qemu-img check (leaks only), the plugin opens and reads
      it, durable data reads back as written, the plugin and qemu read the
      same bytes, and (some points) the plugin can go on writing to it.
      With --secret-file F the image is encrypted: qemu-img gets the key as
      a secret object read from F, the plugin passphrase=+F.
  kill-round --sock S --pid PID --state DIR [--verify-only] ...
      One round of test-kill.sh: check what the previous round made
      durable, then run parallel clients on distinct regions and SIGKILL the
      server at a random moment.

Why the journal holds log sizes: the engine records a host operation after
it completed, and every record of a request is in the log before the reply
is sent.  So a request issued when the log was I bytes long can only have
records at or after I, and once a flush reply arrived when the log was R
bytes long, every record needed to make the data durable lies before R and
is followed by a sync before R.

The power-cut model at crash point k (the k-th record): everything up to
the last sync at or before k is on disk; of the records after that sync up
to k, any subset may be, and the last one chosen may be torn at a sector
boundary.  The crash happened after the log reached P = end of record k, so
a client request is durable there if its own FUA reply, or the reply of a
flush issued after its reply, was seen at a log size <= P.  (That is a
little stronger than "flushed before the last sync": a flush that returned
before its data was synced is caught too, and a failure report says whether
the weaker rule would have flagged it as well.)  A byte must read as the
last durable request left it, unless a later request that is not durable
was issued before P: then it may be old or new, but nothing else (each
sector piece must hold its durable value or what one of those requests
wrote; anything else is stale data from some other cluster).

Each crash point gets one full check and a few more subsets of the same
records checked with qemu-img check only.  Which records write metadata
(found by replaying the log once and reading the tables at every sync)
steers both the points (stretches with several metadata writes between
two syncs) and the subsets (drop one metadata write, or keep only what
follows one).
"""

import argparse
import bisect
import ctypes
import errno
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

try:
    import nbd
except ImportError:
    sys.stderr.write("crash_replay: the nbd module is missing; "
                     "run with a python3 that has it (python3-libnbd)\n")
    sys.exit(2)

KiB = 1 << 10
MiB = 1 << 20
SECTOR = 512
CHUNK = 4 * MiB

OP_WRITE, OP_PUNCH, OP_ZERO, OP_TRUNCATE, OP_SYNC = 1, 2, 3, 4, 5
OP_NAMES = {1: "write", 2: "punch", 3: "zero", 4: "truncate", 5: "sync"}
REC = struct.Struct("<B7xQQ")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                            ctypes.c_int64)


def fallocate(fd, mode, off, ln):
    if ln and _libc.fallocate(fd, mode, off, ln) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "fallocate(mode=0x%x, %d, %d): %s"
                      % (mode, off, ln, os.strerror(e)))


def parse_size(text):
    text = text.strip()
    mult = {"k": KiB, "m": MiB, "g": 1 << 30}.get(text[-1:].lower())
    return int(text[:-1]) * mult if mult else int(text)


def hexs(b, n=16):
    return bytes(b[:n]).hex() + ("..." if len(b) > n else "")


# ---- byte ranges -----------------------------------------------------------

class Ranges:
    """Disjoint sorted half-open intervals."""

    def __init__(self):
        self.s, self.e = [], []

    def add(self, a, b):
        if a >= b:
            return
        i = bisect.bisect_left(self.e, a)
        j = bisect.bisect_right(self.s, b)
        if i < j:
            a, b = min(a, self.s[i]), max(b, self.e[j - 1])
        self.s[i:j] = [a]
        self.e[i:j] = [b]

    def remove(self, a, b):
        if a >= b:
            return
        i = bisect.bisect_right(self.e, a)
        j = bisect.bisect_left(self.s, b)
        if i >= j:
            return
        ns, ne = [], []
        if self.s[i] < a:
            ns.append(self.s[i])
            ne.append(a)
        if self.e[j - 1] > b:
            ns.append(b)
            ne.append(self.e[j - 1])
        self.s[i:j] = ns
        self.e[i:j] = ne

    def copy(self):
        r = Ranges()
        r.s, r.e = list(self.s), list(self.e)
        return r

    def contains(self, x):
        i = bisect.bisect_right(self.s, x) - 1
        return i >= 0 and x < self.e[i]

    def total(self):
        return sum(e - s for s, e in zip(self.s, self.e))

    def gaps(self, lo, hi):
        """The parts of [lo, hi) outside every interval."""
        pos = lo
        for s, e in zip(self.s, self.e):
            if e <= pos:
                continue
            if s >= hi:
                break
            if s > pos:
                yield pos, s
            pos = max(pos, e)
        if pos < hi:
            yield pos, hi


# ---- request contents ------------------------------------------------------
# Written data is described, not stored: ("rand", key), ("tag", bytes),
# ("fill", byte) or ("bytes", data) for what a read-back returned.  Random
# data is regenerated from its key, which keeps journals small.

# Random data is a window into a fixed pool: regenerating it for every
# durable request of a round must be cheap (randbytes is ~250 MB/s).
POOL_SIZE = 8 * MiB
_pool = None


def pool():
    global _pool
    if _pool is None:
        _pool = random.Random(0x9c0c2).randbytes(POOL_SIZE)
    return _pool


def materialize(src, n):
    kind, v = src
    if kind == "rand":
        p, start = pool(), v % POOL_SIZE
        out = p[start:start + n]
        while len(out) < n:
            out += p[:n - len(out)]
        return out
    if kind == "tag":
        return (v * (n // len(v) + 1))[:n]
    if kind == "fill":
        return bytes(n) if v == 0 else bytes((v,)) * n
    if kind == "bytes":
        assert len(v) == n
        return v
    raise ValueError(kind)


def readback_src(data):
    return ("fill", 0) if not any(data) else ("bytes", bytes(data))


def read_all(h, size):
    buf = bytearray(size)
    for off in range(0, size, CHUNK):
        n = min(CHUNK, size - off)
        buf[off:off + n] = h.pread(n, off)
    return buf


def first_bad(exp, got, a, b):
    """First differing offset in [a, b), or None."""
    step = 64 * KiB
    for s in range(a, b, step):
        e = min(b, s + step)
        if exp[s:e] != got[s:e]:
            for x in range(s, e):
                if exp[x] != got[x]:
                    return x
    return None


def compare(exp, got, unchecked, size):
    """Compare outside the unchecked ranges; returns (checked bytes,
    first bad offset or None).  exp is overwritten in the unchecked
    ranges, so that one memcmp of the whole buffers does the work."""
    for a, b in zip(unchecked.s, unchecked.e):
        exp[a:b] = got[a:b]
    checked = size - unchecked.total()
    if exp == got:
        return checked, None
    for x in range(0, size, CHUNK):
        y = min(size, x + CHUNK)
        if exp[x:y] != got[x:y]:
            return checked, first_bad(exp, got, x, y)
    return checked, None


def check_in_flight(exp, got, unchecked, pending, trim_unknown_zero,
                    durable=()):
    """Bytes that are not durable may be old or new, nothing else: each
    piece must hold its durable value or what one of the requests sent over
    it (and not durable) wrote.  Anything else is stale data, e.g. a table
    entry that reached the disk before the data it points at.  Pieces are
    cut at request boundaries (durable requests too: one may have
    overwritten part of one in flight) and sectors, since a sector holds
    one write.
    Returns (first bad offset or None, candidate values there, number of
    pieces that mixed values byte by byte)."""
    cache = {}

    def value(o):
        key = id(o)
        if key not in cache:
            src = o["src"]
            if src is None:
                src = ("fill", 0) if trim_unknown_zero else None
            cache[key] = None if src is None else materialize(src, o["len"])
        return cache[key]

    mixed = 0
    pending = sorted(pending, key=lambda o: o["off"])
    starts = [o["off"] for o in pending]
    durable = sorted(durable, key=lambda o: o["off"])
    dstarts = [o["off"] for o in durable]
    for a, b in zip(unchecked.s, unchecked.e):
        if got[a:b] == exp[a:b]:
            continue
        # Requests overlapping [a, b): the lists are sorted by offset.
        ops = [o for o in pending[:bisect.bisect_left(starts, b)]
               if o["off"] + o["len"] > a]
        cuts = {a, b}
        for o in ops + [o for o in durable[:bisect.bisect_left(dstarts, b)]
                        if o["off"] + o["len"] > a]:
            cuts.add(min(b, max(a, o["off"])))
            cuts.add(min(b, max(a, o["off"] + o["len"])))
        cuts = sorted(cuts)
        for s, e in zip(cuts, cuts[1:]):
            g = got[s:e]
            if g == exp[s:e]:
                continue
            over = [o for o in ops if o["off"] <= s and e <= o["off"] + o["len"]]
            if any(value(o) is None for o in over):
                continue            # a request whose result is unknown
            cands = [exp[s:e]] + [value(o)[s - o["off"]:e - o["off"]]
                                  for o in over]
            if g in cands:
                continue
            x = s
            while x < e:
                y = min(e, (x // SECTOR + 1) * SECTOR)
                piece = g[x - s:y - s]
                if not any(piece == c[x - s:y - s] for c in cands):
                    for i in range(x, y):
                        if all(got[i] != c[i - s] for c in cands):
                            return i, [c[i - s:i - s + 16] for c in cands], \
                                mixed
                    mixed += 1
                    if os.environ.get("CRASH_REPLAY_DEBUG"):
                        print("mixed piece [%d, %d): got %s; candidates %s"
                              % (x, y, hexs(piece, 24), " | ".join(
                                  hexs(c[x - s:y - s], 24) for c in cands)),
                              file=sys.stderr)
                x = y
    return None, None, mixed


# ---- the client ------------------------------------------------------------

class Mismatch(Exception):
    pass


class Client:
    """A random request generator over [lo, hi) of an export, with a model
    of the current contents.  `note` is called for every request before it
    is sent and after its reply, which is how both journals are kept."""

    def __init__(self, h, rng, model, lo, hi, cs, weights, fua_rate,
                 max_write, max_zero, trim_zero_clusters, tagname, note):
        # An encrypted image advertises 512-byte blocks, but takes any
        # request: smaller ones are where it reads, decrypts and rewrites
        # a sector, so they are sent all the same.
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
        self.h, self.rng, self.model = h, rng, model
        self.lo, self.hi, self.cs = lo, hi, cs
        self.names = list(weights)
        self.weights = [weights[n] for n in self.names]
        self.fua_rate = fua_rate if h.can_fua() else 0
        self.max_write, self.max_zero = max_write, max_zero
        self.trim_zero_clusters = trim_zero_clusters
        self.tagname = tagname.encode()
        self.note = note
        self.recent = []
        self.read_recent = 0.6
        self.opno = 0
        self.stats = {}
        if "fastzero" in weights and not h.can_fast_zero():
            self.weights[self.names.index("fastzero")] = 0

    def count(self, k, n=1):
        self.stats[k] = self.stats.get(k, 0) + n

    def pick_len(self, maxlen):
        rng, cs = self.rng, self.cs
        r = rng.random()
        if r < 0.35:
            # Small requests are where read-modify-write bugs live.
            n = int(2 ** rng.uniform(0, 12.5))
        elif r < 0.60:
            n = cs * rng.randint(1, max(1, maxlen // cs))
        elif r < 0.70:
            n = cs * rng.randint(1, max(1, maxlen // cs)) + \
                rng.choice((-1, 1, -512, 512))
        else:
            n = int(2 ** rng.uniform(0, maxlen.bit_length() - 1))
        return max(1, min(n, maxlen, self.hi - self.lo))

    def pick_off(self, n):
        rng = self.rng
        lo, hi = self.lo, self.hi - n
        r = rng.random()
        if r < 0.25 and self.recent:
            # Overlap something recent: in-place rewrites, partial
            # overwrites of fresh clusters, trims of just-written data.
            b_off, b_len = rng.choice(self.recent)
            off = b_off + rng.randint(-n, b_len)
        elif r < 0.30:
            off = rng.choice((lo, hi))
        else:
            off = rng.randint(lo, hi)
        off = max(lo, min(off, hi))
        align = rng.choice((self.cs, 512, 1))
        return max(lo, off // align * align)

    def pick_src(self, off):
        r = self.rng.random()
        if r < 0.5:
            return ("rand", self.rng.getrandbits(64))
        if r < 0.9:
            # A tag names the request, so a wrong byte tells where it is from.
            return ("tag", b"<%s#%d@%x>" % (self.tagname, self.opno, off))
        if r < 0.95:
            return ("fill", 0)
        return ("fill", self.rng.randrange(1, 256))

    def fua(self):
        return nbd.CMD_FLAG_FUA if self.rng.random() < self.fua_rate else 0

    def remember(self, off, n):
        self.recent.append((off, n))
        if len(self.recent) > 32:
            del self.recent[0]

    def one(self):
        name = self.rng.choices(self.names, self.weights)[0]
        getattr(self, "op_" + name)()
        self.opno += 1

    def op_write(self):
        n = self.pick_len(self.max_write)
        off = self.pick_off(n)
        src = self.pick_src(off)
        data = materialize(src, n)
        flags = self.fua()
        rec = self.note("issue", self.opno, "write", off, n, flags, src)
        self.h.pwrite(data, off, flags)
        self.note("reply", rec)
        self.model[off - self.lo:off - self.lo + n] = data
        self.remember(off, n)
        self.count("write")
        self.count("fua" if flags else "nofua")

    def op_zero(self):
        n = self.pick_len(self.max_zero)
        off = self.pick_off(n)
        flags = self.fua()
        if self.rng.random() < 0.5:
            flags |= nbd.CMD_FLAG_NO_HOLE
        rec = self.note("issue", self.opno, "zero", off, n, flags, ("fill", 0))
        self.h.zero(n, off, flags)
        self.note("reply", rec)
        self.model[off - self.lo:off - self.lo + n] = bytes(n)
        self.remember(off, n)
        self.count("zero_nohole" if flags & nbd.CMD_FLAG_NO_HOLE
                   else "zero_maytrim")

    def op_fastzero(self):
        n = self.pick_len(self.max_zero)
        off = self.pick_off(n)
        flags = nbd.CMD_FLAG_FAST_ZERO
        if self.rng.random() < 0.5:
            flags |= nbd.CMD_FLAG_NO_HOLE
        rec = self.note("issue", self.opno, "fastzero", off, n, flags,
                        ("fill", 0))
        try:
            self.h.zero(n, off, flags)
        except nbd.Error as e:
            if e.errnum not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            # Refused: the range is its old contents (or zeros where a
            # server zeroed the fast parts first); whatever it reads as now
            # is what the request left.
            self.note("reply", rec)
            got = self.h.pread(n, off)
            self.note("readback", rec, readback_src(got))
            old = self.model[off - self.lo:off - self.lo + n]
            if any(g != o and g != 0 for g, o in zip(got, old)):
                raise Mismatch("refused fast zero off=%d len=%d left bytes "
                               "that are neither old nor zero" % (off, n))
            self.model[off - self.lo:off - self.lo + n] = got
            self.count("fastzero_refused")
            return
        self.note("reply", rec)
        self.model[off - self.lo:off - self.lo + n] = bytes(n)
        self.remember(off, n)
        self.count("fastzero")

    def op_trim(self):
        n = self.pick_len(self.max_zero)
        off = self.pick_off(n)
        flags = self.fua()
        rec = self.note("issue", self.opno, "trim", off, n, flags, None)
        self.h.trim(n, off, flags)
        self.note("reply", rec)
        # NBD leaves trimmed contents undefined; ours are defined (zeros,
        # the backing file, or old data at unaligned edges), so what it
        # reads as now is what a durable trim must leave after a crash.
        got = self.h.pread(n, off)
        self.note("readback", rec, readback_src(got))
        if self.trim_zero_clusters:
            a = -(-off // self.cs) * self.cs
            b = (off + n) // self.cs * self.cs
            if a < b and any(got[a - off:b - off]):
                raise Mismatch("trim off=%d len=%d: whole clusters [%d, %d) "
                               "do not read as zeros" % (off, n, a, b))
        self.model[off - self.lo:off - self.lo + n] = got
        self.remember(off, n)
        self.count("trim")

    def op_flush(self):
        rec = self.note("issue", self.opno, "flush", 0, 0, 0, None)
        self.h.flush()
        self.note("reply", rec)
        self.count("flush")

    def op_scan(self):
        """Small reads all over the disk: each may load another L2 table,
        so the metadata cache evicts (and writes back) tables and refcount
        blocks in an order no write alone produces."""
        # One read in each of several ranges mapped by distinct L2 tables.
        span = self.cs * self.cs // 8
        tables = list(range(self.lo // span, (self.hi - 1) // span + 1))
        picked = self.rng.sample(tables, min(len(tables),
                                             self.rng.randint(8, 40)))
        for t in picked:
            n = self.rng.choice((1, 512, 4096))
            a, b = max(self.lo, t * span), min(self.hi, (t + 1) * span)
            n = min(n, b - a)
            off = self.rng.randint(a, b - n)
            got = self.h.pread(n, off)
            exp = self.model[off - self.lo:off - self.lo + n]
            if got != exp:
                x = first_bad(exp, got, 0, n)
                raise Mismatch("scan read off=%d len=%d: byte %d expected %s "
                               "got %s" % (off, n, off + x, hexs(exp[x:]),
                                           hexs(got[x:])))
        self.count("scan")

    def op_read(self):
        if self.recent and self.rng.random() < self.read_recent:
            off, n = self.rng.choice(self.recent)
        else:
            n = self.pick_len(self.max_write)
            off = self.pick_off(n)
        got = self.h.pread(n, off)
        exp = self.model[off - self.lo:off - self.lo + n]
        if got != exp:
            x = first_bad(exp, got, 0, n)
            raise Mismatch("read off=%d len=%d: byte %d expected %s got %s"
                           % (off, n, off + x, hexs(exp[x:]), hexs(got[x:])))
        self.count("read")


# ---- workload (test-crash.sh) ----------------------------------------------

CRASH_MIX = {"write": 40, "trim": 12, "zero": 12, "fastzero": 3,
             "flush": 7, "read": 10, "scan": 0}


def log_size(path):
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def cmd_workload(a):
    h = nbd.NBD()
    h.connect_uri(a.uri)
    size = h.get_size()
    model = read_all(h, size)
    ops = []

    def note(what, *args):
        if what == "issue":
            no, kind, off, n, flags, src = args
            ops.append({"no": no, "kind": kind, "off": off, "len": n,
                        "fua": bool(flags & nbd.CMD_FLAG_FUA), "flags": flags,
                        "src": src, "issue": log_size(a.iolog), "reply": None})
            return ops[-1]
        if what == "reply":
            args[0]["reply"] = log_size(a.iolog)
        elif what == "readback":
            args[0]["src"] = args[1]
        return None

    rng = random.Random(a.seed)
    mix = dict(CRASH_MIX)
    for item in (a.mix or "").split(","):
        if item:
            name, weight = item.split(":")
            if name not in mix:
                raise SystemExit("--mix: unknown request %r" % name)
            mix[name] = int(weight)
    # Rare flushes leave many host records between syncs (the states where
    # ordering matters most); frequent ones give many durable points.  The
    # seed picks one, unless asked.
    mix["flush"] = a.flush_weight if a.flush_weight is not None else \
        rng.choice((1, 3, 7, 7))
    fua_rate = a.fua_rate if a.fua_rate is not None else \
        rng.choice((0.03, 0.12))
    c = Client(h, rng, model, 0, size, a.cluster_size, mix, fua_rate,
               a.max_write, a.max_zero, a.trim_zero_clusters, "s%d" % a.seed,
               note)
    c.read_recent = a.read_recent
    status = 0
    t0 = time.monotonic()
    try:
        for _ in range(a.ops):
            c.one()
    except Mismatch as e:
        print("crash_replay workload: MISMATCH seed=%d op#%d: %s"
              % (a.seed, c.opno, e), file=sys.stderr)
        status = 1
    except nbd.Error as e:
        print("crash_replay workload: NBD error seed=%d op#%d: %s"
              % (a.seed, c.opno, e), file=sys.stderr)
        status = 2
    # A request with no reply has unknown effects: keep it (it is never
    # durable) but mark its reply as never.
    for o in ops:
        if o["reply"] is None:
            o["reply"] = float("inf")
    with open(a.journal, "wb") as f:
        pickle.dump({"size": size, "seed": a.seed, "ops": ops}, f)
    s = c.stats
    print("crash_replay workload: seed=%d ops=%d (flush weight %d, fua "
          "rate %.2f) write=%d (fua %d) trim=%d "
          "zero=%d (no-hole %d, may-trim %d) fastzero=%d (refused %d) "
          "flush=%d read=%d scan=%d log=%.1f MiB %.1fs %s"
          % (a.seed, c.opno, mix["flush"], fua_rate, s.get("write", 0),
             s.get("fua", 0),
             s.get("trim", 0), s.get("zero_nohole", 0) + s.get("zero_maytrim", 0),
             s.get("zero_nohole", 0), s.get("zero_maytrim", 0),
             s.get("fastzero", 0), s.get("fastzero_refused", 0),
             s.get("flush", 0), s.get("read", 0), s.get("scan", 0),
             log_size(a.iolog) / MiB,
             time.monotonic() - t0, "OK" if status == 0 else "FAILED"),
          flush=True)
    try:
        h.shutdown()
    except nbd.Error:
        pass
    return status


# ---- the I/O log -----------------------------------------------------------

class IOLog:
    def __init__(self, path):
        with open(path, "rb") as f:
            self.buf = f.read()
        self.recs = []        # (op, offset, length, data position, end)
        pos, n = 0, len(self.buf)
        while pos + REC.size <= n:
            op, off, ln = REC.unpack_from(self.buf, pos)
            if op not in OP_NAMES:
                raise ValueError("I/O log %s: bad op %d at %d" % (path, op, pos))
            end = pos + REC.size + (ln if op == OP_WRITE else 0)
            if end > n:
                break
            self.recs.append((op, off, ln, pos + REC.size, end))
            pos = end
        # syncs[i] is the 1-based index of a sync record.
        self.syncs = [i + 1 for i, r in enumerate(self.recs) if r[0] == OP_SYNC]

    def end(self, k):
        """Log size once records 1..k were written."""
        return self.recs[k - 1][4] if k > 0 else 0

    def last_sync(self, k):
        i = bisect.bisect_right(self.syncs, k) - 1
        return self.syncs[i] if i >= 0 else 0

    def apply(self, fd, k, torn=None):
        """Apply record k (1-based) to the open file; torn = bytes of a
        write to keep (a whole number of sectors of the file)."""
        op, off, ln, dpos, _ = self.recs[k - 1]
        if op == OP_WRITE:
            n = ln if torn is None else torn
            mv = memoryview(self.buf)[dpos:dpos + n]
            done = 0
            while done < n:
                done += os.pwrite(fd, mv[done:], off + done)
        elif op == OP_PUNCH:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, ln)
        elif op == OP_ZERO:
            fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, ln)
        elif op == OP_TRUNCATE:
            os.ftruncate(fd, off)

    def describe(self, k):
        op, off, ln, _, _ = self.recs[k - 1]
        if op == OP_TRUNCATE:
            return "#%d truncate to %d" % (k, off)
        if op == OP_SYNC:
            return "#%d sync" % k
        return "#%d %s 0x%x+0x%x" % (k, OP_NAMES[op], off, ln)


def sparse_copy(src, dst):
    """Copy keeping holes: the engine looks at holes (SEEK_DATA) and
    copying 48 MiB of zeros per crash point would be most of the cost."""
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = os.fstat(fi).st_size
        pos = 0
        while pos < size:
            try:
                d = os.lseek(fi, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            hl = os.lseek(fi, d, os.SEEK_HOLE)
            o = d
            while o < hl:
                n = os.copy_file_range(fi, fo, hl - o, o, o)
                if n <= 0:
                    raise OSError("copy_file_range returned %d" % n)
                o += n
            pos = hl
        os.ftruncate(fo, size)
    finally:
        os.close(fi)
        os.close(fo)


def write_sparse(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        zero = bytes(64 * KiB)
        for off in range(0, len(data), len(zero)):
            part = data[off:off + len(zero)]
            if part != zero[:len(part)]:
                os.pwrite(fd, part, off)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


# ---- qemu-img and the plugin -----------------------------------------------

# An encrypted image is named to qemu-img by --image-opts, which is how the
# key (a secret object read from a file) reaches its qcow2 driver; then
# every image of the command is named that way, raw ones too.

def qemu_secret(secret):
    """The options of a qemu-img command whose images are given by
    qemu_image, before any of them."""
    if secret is None:
        return []
    return ["--object", "secret,id=s0,file=" + secret.replace(",", ",,"),
            "--image-opts"]


def qemu_image(path, fmt, secret):
    if secret is None:
        return path
    opts = "driver=%s,file.filename=%s" % (fmt, path.replace(",", ",,"))
    return opts + (",encrypt.key-secret=s0" if fmt == "qcow2" else "")


def qemu_check(img, repair=False, secret=None):
    cmd = ["qemu-img", "check"] + (["-r", "leaks"] if repair else []) + \
        qemu_secret(secret) + [qemu_image(img, "qcow2", secret)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
    m = re.search(r"(\d+) leaked clusters were found", p.stdout)
    return p.returncode, p.stdout, int(m.group(1)) if m else 0


def check_errors(out, n=12):
    """The errors of a qemu-img check report, without the leak lines."""
    lines = [x for x in out.splitlines()
             if x.strip() and not x.startswith("Leaked cluster")]
    return "\n".join("  | " + x for x in lines[:n] +
                     (["..."] if len(lines) > n else []))


class ServeError(Exception):
    pass


class Server:
    """nbdkit in the foreground on a Unix socket, without the test hooks
    (the I/O log is for the run under test only)."""

    def __init__(self, plugin, image, workdir, readonly, extra=()):
        self.sock = os.path.join(workdir, "srv.sock")
        self.log = os.path.join(workdir, "srv.log")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("QCOW2RECLAIM_")}
        cmd = ["nbdkit", "-f", "-v", "-U", self.sock, plugin, "file=" + image]
        if readonly:
            cmd.append("readonly=true")
        cmd += list(extra)
        with open(self.log, "w") as logf:
            self.p = subprocess.Popen(cmd, stdout=logf, stderr=logf, env=env)
        for _ in range(600):
            if os.path.exists(self.sock):
                return
            if self.p.poll() is not None:
                raise ServeError("nbdkit exited with %d before serving:\n%s"
                                 % (self.p.returncode, self.errors()))
            time.sleep(0.01)
        self.stop()
        raise ServeError("nbdkit did not create its socket")

    def errors(self, n=15):
        try:
            with open(self.log) as f:
                lines = [x.rstrip() for x in f
                         if re.search(r"error|Assertion|Sanitizer|corrupt",
                                      x, re.I)]
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def connect(self):
        # The socket file appears at bind(), a moment before listen().
        for i in range(200):
            h = nbd.NBD()
            try:
                h.connect_unix(self.sock)
                return h
            except nbd.Error as e:
                if e.errnum != errno.ECONNREFUSED or i == 199 or \
                        self.p.poll() is not None:
                    raise
            time.sleep(0.01)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            return -9


# ---- durability from the workload journal ----------------------------------

def apply_op(buf, o):
    buf[o["off"]:o["off"] + o["len"]] = materialize(o["src"], o["len"])


class Durable:
    """Expected contents at a log position P, built incrementally: the
    requests before the last flush answered by P are a prefix that only
    grows as P does; after it only FUA requests answered by P count."""

    def __init__(self, journal, initial):
        self.ops = [o for o in journal["ops"]]
        self.size = journal["size"]
        self.flush_at = [i for i, o in enumerate(self.ops)
                         if o["kind"] == "flush"]
        self.flush_reply = [self.ops[i]["reply"] for i in self.flush_at]
        # Where each request became durable: its own FUA reply, or the
        # reply of the first flush sent after it.
        nxt = float("inf")
        for o in reversed(self.ops):
            if o["kind"] == "flush":
                nxt = min(nxt, o["reply"])
                o["dur"] = o["reply"]
            else:
                o["dur"] = min(nxt, o["reply"] if o["fua"] else nxt)
        self.pre = bytearray(initial)
        # Requests whose result is unknown (no reply, or a trim whose
        # read-back never came) leave their range unknown until overwritten.
        self.pre_unknown = Ranges()
        self.done = 0
        self.last_P = 0

    @staticmethod
    def put(buf, unknown, o):
        if o["src"] is None or o["reply"] == float("inf"):
            unknown.add(o["off"], o["off"] + o["len"])
        else:
            apply_op(buf, o)
            unknown.remove(o["off"], o["off"] + o["len"])

    def expected(self, P):
        assert P >= self.last_P, "crash points must be checked in order"
        self.last_P = P
        j = bisect.bisect_right(self.flush_reply, P) - 1
        upto = self.flush_at[j] if j >= 0 else 0
        while self.done < upto:
            o = self.ops[self.done]
            if o["kind"] != "flush":
                self.put(self.pre, self.pre_unknown, o)
            self.done += 1
        exp = bytearray(self.pre)
        unchecked = self.pre_unknown.copy()
        # The ranges whose result is unknown are free for anything.
        free = self.pre_unknown.copy()
        pending, durable = [], []
        for o in self.ops[upto:]:
            if o["issue"] >= P:
                break
            if o["kind"] == "flush":
                continue
            if o["dur"] <= P:
                self.put(exp, unchecked, o)
                durable.append(o)
                if o["src"] is None or o["reply"] == float("inf"):
                    free.add(o["off"], o["off"] + o["len"])
                else:
                    free.remove(o["off"], o["off"] + o["len"])
            else:
                unchecked.add(o["off"], o["off"] + o["len"])
                pending.append(o)
        for a, b in zip(free.s, free.e):
            pending.append({"off": a, "len": b - a, "src": None})
        return exp, unchecked, pending, durable

    def touching(self, x, P):
        """Requests issued before P that cover byte x, for reports."""
        out = []
        for o in self.ops:
            if o["issue"] >= P:
                break
            if o["kind"] != "flush" and o["off"] <= x < o["off"] + o["len"]:
                out.append(o)
        return out


def fmt_op(o, P=None):
    s = "op#%d %s off=%d (0x%x) len=%d%s issued@%d replied@%s durable@%s" % (
        o["no"], o["kind"], o["off"], o["off"], o["len"],
        " FUA" if o["fua"] else "", o["issue"], o["reply"], o.get("dur"))
    if o["src"] is not None:
        s += " data=%s" % (o["src"][0] if o["src"][0] != "tag"
                           else o["src"][1].decode(errors="replace"))
    return s


# ---- replay ----------------------------------------------------------------

def metadata_clusters(fd):
    """Host clusters holding qcow2 metadata in the image as it is now:
    header, L1 table, refcount table, L2 tables, refcount blocks."""
    hdr = os.pread(fd, 72, 0)
    if len(hdr) < 72:
        return 16, set()
    cb, = struct.unpack_from(">I", hdr, 20)
    if not 9 <= cb <= 21:
        return 16, set()
    l1_size, l1_off, rt_off, rt_clusters = struct.unpack_from(">IQQI", hdr, 36)
    meta = {0}

    def span(off, n):
        meta.update(range(off >> cb, (off + max(n, 1) - 1 >> cb) + 1))

    span(l1_off, l1_size * 8)
    span(rt_off, rt_clusters << cb)
    l1 = os.pread(fd, l1_size * 8, l1_off)
    for (e,) in struct.iter_unpack(">Q", l1[:len(l1) // 8 * 8]):
        if e & 0x00fffffffffffe00:
            meta.add((e & 0x00fffffffffffe00) >> cb)
    rt = os.pread(fd, rt_clusters << cb, rt_off)
    for (e,) in struct.iter_unpack(">Q", rt[:len(rt) // 8 * 8]):
        if e & ~0x1ff:
            meta.add((e & ~0x1ff) >> cb)
    return cb, meta


def read_bitmaps(path):
    """The persistent bitmaps of an image: {name: (flags, granularity,
    data)}, data read through each bitmap table; None when the autoclear
    bit says the bitmaps are not valid."""
    with open(path, "rb") as f:
        hdr = f.read(1 << 21)
        cb, = struct.unpack_from(">I", hdr, 20)
        autoclear, = struct.unpack_from(">Q", hdr, 88)
        hlen, = struct.unpack_from(">I", hdr, 100)
        if not autoclear & 1:
            return None
        off, out = hlen, {}
        while off + 8 <= len(hdr):
            t, ln = struct.unpack_from(">II", hdr, off)
            if t == 0:
                break
            if t == 0x23852875:
                n, _, dsize, doff = struct.unpack_from(">IIQQ", hdr, off + 8)
                f.seek(doff)
                d, pos = f.read(dsize), 0
                for _ in range(n):
                    toff, tsize, flags, _, gb, nlen, extra = \
                        struct.unpack_from(">QIIBBHI", d, pos)
                    name = d[pos + 24 + extra:pos + 24 + extra + nlen].decode()
                    f.seek(toff)
                    table = struct.unpack(">%dQ" % tsize, f.read(8 * tsize))
                    data = bytearray()
                    for e in table:
                        if e & 0x00fffffffffffe00:
                            f.seek(e & 0x00fffffffffffe00)
                            data += f.read(1 << cb).ljust(1 << cb, b"\0")
                        else:
                            data += (b"\xff" if e & 1 else b"\0") * (1 << cb)
                    out[name] = (flags, 1 << gb, bytes(data))
                    pos += (24 + extra + nlen + 7) // 8 * 8
            off += 8 + (ln + 7) // 8 * 8
        return out


def survey(log, initial, path):
    """Which records write metadata: the image is rebuilt once, and at
    every sync the metadata clusters it holds are noted.  Tables created
    between two syncs are not known yet; those are new clusters, whose
    ordering matters less than that of tables already in use."""
    sparse_copy(initial, path)
    fd = os.open(path, os.O_RDWR)
    is_meta = [False] * (len(log.recs) + 1)
    try:
        cb, meta = metadata_clusters(fd)
        for k in range(1, len(log.recs) + 1):
            op, off, ln, _, _ = log.recs[k - 1]
            if op == OP_WRITE and ln and \
                    any(c in meta for c in range(off >> cb,
                                                 ((off + ln - 1) >> cb) + 1)):
                is_meta[k] = True
            log.apply(fd, k)
            if op == OP_SYNC:
                cb, meta = metadata_clusters(fd)
    finally:
        os.close(fd)
        os.unlink(path)
    return is_meta


class Replay:
    def __init__(self, a):
        self.a = a
        self.log = IOLog(a.iolog)
        with open(a.journal, "rb") as f:
            self.journal = pickle.load(f)
        self.size = self.journal["size"]
        self.secret = a.secret_file
        # nbdkit reads the same file (less a final newline, which QEMU
        # would keep: the file has none).
        self.plugin_args = ["passphrase=+" + a.secret_file] \
            if a.secret_file else []
        os.makedirs(a.workdir, exist_ok=True)
        self.base = os.path.join(a.workdir, "base.qcow2")
        self.crash = os.path.join(a.workdir, "crash.qcow2")
        sparse_copy(a.initial, self.base)
        self.base_k = 0
        self.base_fd = os.open(self.base, os.O_RDWR)
        raw = os.path.join(a.workdir, "initial.raw")
        # qemu's reading of the initial image is the starting point, so the
        # plugin's own reading of backing files is checked too.
        subprocess.run(["qemu-img", "convert"] + qemu_secret(self.secret) +
                       [qemu_image(a.initial, "qcow2", self.secret),
                        "-O", "raw", raw], check=True)
        with open(raw, "rb") as f:
            initial = f.read()
        os.unlink(raw)
        if len(initial) != self.size:
            raise SystemExit("initial image is %d bytes, journal says %d"
                             % (len(initial), self.size))
        self.dur = Durable(self.journal, initial)
        self.is_meta = survey(self.log, a.initial,
                              os.path.join(a.workdir, "survey.qcow2"))
        self.stats = {"points": 0, "ok": 0, "leaky": 0, "leaked": 0,
                      "failed": 0, "checked_bytes": 0, "torn": 0,
                      "continued": 0, "applied": 0, "dropped": 0,
                      "mixed": 0, "variants": 0, "failures": 0,
                      "bitmaps_in_use": 0, "bitmaps_whole": 0}
        self.failures = []

    def points(self):
        a, log = self.a, self.log
        n = len(log.recs)
        if a.point:
            return sorted(set(k for k in a.point if 0 <= k <= n))
        rng = random.Random("points:%d" % a.seed)
        want = min(a.points, n)
        pts = set()
        # A third evenly spread; a third just before a sync (everything
        # since the previous one in flight: the moment ordering matters);
        # a third at or just after a sync (the synced state, plus a few
        # records of what follows).
        even = max(1, want // 3)
        for i in range(even):
            pts.add(max(1, round((i + 1) * n / even)))
        # Header writes switch to metadata that moved (refcount table
        # growth, L1): just before and just after them, when there are any.
        hdr = [i + 1 for i, r in enumerate(log.recs)
               if r[0] == OP_WRITE and r[1] < SECTOR]
        for h in rng.sample(hdr, min(len(hdr), max(1, want // 12))):
            pts.update((h - 1, h))
        # Compaction switches a bitmap to a table it moved, and the header
        # to a directory it moved (its extension may lie past the first
        # sector), with one 8-byte write each: around them (a few in a
        # run; at most 6 when there are more).
        if a.bitmaps:
            sw = [i + 1 for i, r in enumerate(log.recs)
                  if r[0] == OP_WRITE and r[1] >= SECTOR and r[2] == 8]
            for h in rng.sample(sw, min(len(sw), max(6, want // 6))):
                pts.update((h - 1, h))
        # Bitmaps become whole only in the close's last syncs: around
        # each of them, where a wrong order would show.
        if a.bitmaps:
            for s in log.syncs[-4:]:
                pts.update((s - 1, s))
        before = [s - 1 for s in log.syncs if s - 1 > log.last_sync(s - 1)]
        # Where several metadata writes happen without a sync between them
        # is where a missing sync corrupts: those stretches first, then
        # long ones.
        weights = []
        for k in before:
            nmeta = sum(self.is_meta[log.last_sync(k) + 1:k + 1])
            weights.append((k - log.last_sync(k)) +
                           (50 * nmeta * nmeta if nmeta > 1 else 0))
        tries = 0
        while len(pts) < want and log.syncs and tries < 20 * want:
            tries += 1
            if before and (len(pts) < 2 * want // 3 or tries % 2):
                pts.add(rng.choices(before, weights)[0])
            else:
                pts.add(min(n, rng.choice(log.syncs) + rng.randint(0, 3)))
        while len(pts) < want:
            pts.add(rng.randint(1, n))
        return sorted(pts)

    def advance_base(self, s):
        while self.base_k < s:
            self.base_k += 1
            self.log.apply(self.base_fd, self.base_k)

    def choose(self, s, k, variant):
        """Which records after the last sync reach the disk, and how much
        of the last chosen write when it is torn."""
        rng = random.Random("%d:%d:%d" % (self.a.seed, k, variant))
        cand = list(range(s + 1, k + 1))
        r = rng.random()
        if r < 0.10:
            chosen, mode = cand, "all"
        elif r < 0.20:
            chosen, mode = [], "none"
        elif r < 0.35 and cand:
            # The later records made it, the earlier ones did not: what a
            # missing sync between two dependent writes allows.  Cutting
            # just after a metadata write is where that bites.
            meta = [x + 1 for x in cand[:-1] if self.is_meta[x]]
            cut = rng.choice(meta if meta and rng.random() < 0.8 else cand)
            chosen, mode = [x for x in cand if x >= cut], "from #%d" % cut
        elif r < 0.55 and cand:
            meta = [x for x in cand if self.is_meta[x]]
            gone = rng.choice(meta if meta and rng.random() < 0.8 else cand)
            chosen, mode = [x for x in cand if x != gone], "all but #%d" % gone
        else:
            p = rng.random()
            chosen = [x for x in cand if rng.random() < p]
            mode = "p=%.2f" % p
        torn = None
        if chosen and rng.random() < self.a.torn_rate:
            op, off, ln, _, _ = self.log.recs[chosen[-1] - 1]
            if op == OP_WRITE:
                # Sector boundaries of the file inside the write.
                bounds = list(range((off // SECTOR + 1) * SECTOR, off + ln,
                                    SECTOR))
                if bounds:
                    torn = rng.choice(bounds) - off
        return chosen, torn, mode

    def build(self, k, variant):
        """Makes self.crash the state of crash point k (variant v of the
        possible subsets); returns a description for reports."""
        log = self.log
        s = log.last_sync(k)
        self.advance_base(s)
        sparse_copy(self.base, self.crash)
        chosen, torn, mode = self.choose(s, k, variant)
        fd = os.open(self.crash, os.O_RDWR)
        try:
            for x in chosen:
                log.apply(fd, x, torn if x == chosen[-1] else None)
        finally:
            os.close(fd)
        self.stats["applied"] += len(chosen)
        self.stats["dropped"] += (k - s) - len(chosen)
        if torn is not None:
            self.stats["torn"] += 1
        what = ("variant %d: last sync #%d, %d of %d later records (%s)%s"
                % (variant, s, len(chosen), k - s, mode,
                   ", %s torn after %d bytes" % (log.describe(chosen[-1]), torn)
                   if torn is not None else ""))
        if self.a.verbose:
            print("point %d: %s" % (k, what), flush=True)
        def desc(x):
            return log.describe(x) + ("(meta)" if self.is_meta[x] else "")
        return "  crash state: " + what + \
            "\n  applied after the sync: " + \
            (" ".join(desc(x) for x in chosen[-16:]) or "none") + \
            "\n  dropped: " + (" ".join(desc(x) for x in range(s + 1, k + 1)
                                         if x not in chosen)[:800] or "none")

    def fail(self, k, kind, msg, extra="", variant=None):
        if variant is None:
            variant = self.a.variant or 0
        self.point_failed = True
        self.stats["failures"] += 1
        text = "FAIL %s point %d variant %d (seed %d): %s" % (
            self.a.name, k, variant, self.a.seed, kind)
        if msg:
            text += "\n" + "\n".join(x if x.startswith("  ") else "  " + x
                                     for x in msg.splitlines())
        if extra:
            text += "\n" + extra
        inputs = [self.a.initial, self.a.iolog, self.a.journal] + \
            ([self.secret] if self.secret else [])
        if self.a.keep:
            # The inputs live in the test's temporary directory; keep them
            # (the initial image keeps its name: a backing file is named
            # by absolute path, so it must stay where it is or be copied).
            os.makedirs(self.a.keep, exist_ok=True)
            shutil.copyfile(self.crash, os.path.join(
                self.a.keep, "%s-point%d-variant%d.qcow2"
                % (self.a.name, k, variant)))
            kept = []
            for src in inputs:
                d = os.path.join(self.a.keep, os.path.basename(src))
                if not os.path.exists(d):
                    shutil.copyfile(src, d)
                kept.append(d)
            inputs = kept
        text += ("\n  reproduce: crash_replay.py replay --initial %s --iolog "
                 "%s --journal %s --seed %d --point %d --variant %d "
                 "--cluster-size %d%s%s --workdir DIR"
                 % (inputs[0], inputs[1], inputs[2], self.a.seed, k, variant,
                    self.a.cluster_size,
                    " --trim-zero-clusters" if self.a.trim_zero_clusters
                    else "",
                    " --secret-file %s" % inputs[3] if self.secret else ""))
        self.failures.append(text)
        print(text, file=sys.stderr, flush=True)

    def run(self):
        pts = self.points()
        t0 = time.monotonic()
        for i, k in enumerate(pts):
            self.point_failed = False
            self.check_point(k, continue_after=(
                self.a.continue_every > 0 and i % self.a.continue_every
                == self.a.continue_every - 1))
            self.stats["failed" if self.point_failed else "ok"] += 1
        os.close(self.base_fd)
        s = self.stats
        print("crash_replay %s: points=%d variants=%d ok=%d leaky=%d (%d clusters "
              "leaked, repaired) failed=%d (%d failures) torn=%d continued=%d "
              "records=%d "
              "syncs=%d applied-after-sync=%d dropped=%d checked=%.0f MiB "
              "mixed-sectors=%d bitmaps-in-use=%d bitmaps-whole=%d %.1fs"
              % (self.a.name, s["points"], s["variants"], s["ok"], s["leaky"],
                 s["leaked"], s["failed"], s["failures"], s["torn"],
                 s["continued"], len(self.log.recs),
                 len(self.log.syncs), s["applied"], s["dropped"],
                 s["checked_bytes"] / MiB, s["mixed"], s["bitmaps_in_use"],
                 s["bitmaps_whole"], time.monotonic() - t0),
              flush=True)
        return 1 if s["failed"] else 0

    def check_point(self, k, continue_after):
        a, log = self.a, self.log
        self.stats["points"] += 1
        main = a.variant if a.variant is not None else 0
        # Other subsets of the same point only get qemu-img check: it is
        # cheap next to serving and reading the image, and what an ordering
        # bug leaves is most often a refcount below its references.
        if a.variant is None:
            for v in range(1, a.variants + 1):
                detail = self.build(k, v)
                self.stats["variants"] += 1
                rc, out, _ = qemu_check(self.crash, secret=self.secret)
                if rc not in (0, 3):
                    self.fail(k, "qemu-img check reports corruption (exit %d)"
                              % rc, check_errors(out), detail, variant=v)
                    # The main variant may show what it does to the data.
                    break
        detail = self.build(k, main)
        P = log.end(k)

        rc, out, leaked = qemu_check(self.crash, secret=self.secret)
        corrupt = rc not in (0, 3)
        if corrupt:
            self.fail(k, "qemu-img check reports corruption (exit %d)" % rc,
                      check_errors(out), detail, variant=main)
        if a.bitmaps:
            self.check_bitmaps(k, P, detail)

        # The plugin opens the image as it was left, leaks and all.
        try:
            srv = Server(a.plugin, self.crash, a.workdir, readonly=True,
                         extra=self.plugin_args)
        except ServeError as e:
            self.fail(k, "the plugin does not open the image", str(e), detail)
            return
        try:
            h = srv.connect()
            got = read_all(h, self.size)
            h.shutdown()
            del h
        except nbd.Error as e:
            srv.stop()
            self.fail(k, "the plugin cannot read the image", "%s\n%s"
                      % (e, srv.errors()), detail)
            return
        srv.stop()

        exp, unchecked, pending, durable = self.dur.expected(P)
        stale, cands, mixed = check_in_flight(exp, got, unchecked, pending,
                                              False, durable)
        self.stats["mixed"] += mixed
        checked, bad = compare(exp, got, unchecked, self.size)
        self.stats["checked_bytes"] += checked
        if bad is not None:
            self.report_lost(k, P, bad, exp, got, detail)
        if stale is not None:
            self.report_stale(k, P, stale, got, cands, detail)
        if corrupt or bad is not None or stale is not None:
            return

        # Everything else may be old or new, but qemu must read the same.
        raw = os.path.join(a.workdir, "got.raw")
        write_sparse(raw, got)
        fmts = [] if self.secret else ["-f", "raw", "-F", "qcow2"]
        p = subprocess.run(["qemu-img", "compare"] + fmts +
                           qemu_secret(self.secret) +
                           [qemu_image(raw, "raw", self.secret),
                            qemu_image(self.crash, "qcow2", self.secret)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
        os.unlink(raw)
        if p.returncode != 0:
            self.fail(k, "the plugin and qemu read different contents",
                      p.stdout.strip(), detail)
            return

        if continue_after:
            self.stats["continued"] += 1
            if not self.go_on(k, got, detail):
                return
            rc, out, leaked = qemu_check(self.crash, secret=self.secret)
            if rc not in (0, 3):
                self.fail(k, "corruption after writing to the crashed image "
                          "(exit %d)" % rc, check_errors(out), detail)
                return

        if rc == 3:
            self.stats["leaky"] += 1
            self.stats["leaked"] += leaked
            rc2, out2, _ = qemu_check(self.crash, repair=True,
                                      secret=self.secret)
            rc3, out3, _ = qemu_check(self.crash, secret=self.secret)
            if rc3 != 0:
                self.fail(k, "not clean after qemu-img check -r leaks "
                          "(exit %d, repair exit %d)" % (rc3, rc2),
                          check_errors(out3), detail)

    def check_bitmaps(self, k, P, detail):
        """Each bitmap is in use (inconsistent, as QEMU reads it), or
        whole: every granule a request issued before the crash changed is
        dirty.  Never consistent with a change missing."""
        got = read_bitmaps(self.crash)
        if got is None:
            self.fail(k, "the persistent bitmaps were invalidated", "", detail)
            return
        for name in self.a.bitmaps.split(","):
            if name not in got:
                self.fail(k, "bitmap %s is gone" % name, "", detail)
                continue
            flags, g, data = got[name]
            if flags & 1:
                self.stats["bitmaps_in_use"] += 1
                continue
            self.stats["bitmaps_whole"] += 1
            for o in self.dur.ops:
                if o["issue"] >= P:
                    break
                if o["kind"] == "flush" or not o["len"]:
                    continue
                for x in range(o["off"] // g, (o["off"] + o["len"] - 1) // g + 1):
                    if not data[x // 8] >> (x % 8) & 1:
                        self.fail(k, "bitmap %s is not in use, but granule %d "
                                  "(guest offset %d) is clean after %s"
                                  % (name, x, x * g, fmt_op(o)), "", detail)
                        return

    def go_on(self, k, got, detail):
        """Serve the crashed image read-write and keep working on it: the
        allocator must cope with whatever the crash left (leaks)."""
        a = self.a
        try:
            srv = Server(a.plugin, self.crash, a.workdir, readonly=False,
                         extra=self.plugin_args)
        except ServeError as e:
            self.fail(k, "the plugin does not open the crashed image "
                      "read-write", str(e), detail)
            return False
        try:
            h = srv.connect()
            c = Client(h, random.Random("go:%d:%d" % (a.seed, k)), got, 0,
                       self.size, a.cluster_size, CRASH_MIX, 0.2,
                       256 * KiB, 2 * MiB, a.trim_zero_clusters,
                       "go%d" % k, lambda *x: None)
            for _ in range(40):
                c.one()
            h.flush()
            after = read_all(h, self.size)
            h.shutdown()
            del h
            if after != got:
                x = first_bad(got, after, 0, self.size)
                raise Mismatch("after writing: byte %d expected %s got %s"
                               % (x, hexs(got[x:]), hexs(after[x:])))
        except (nbd.Error, Mismatch) as e:
            srv.stop()
            self.fail(k, "writing to the crashed image went wrong",
                      "%s\n%s" % (e, srv.errors()), detail)
            return False
        srv.stop()
        return True

    def report_stale(self, k, P, bad, got, cands, detail):
        ops = self.dur.touching(bad, P)
        lines = [
            "  guest offset %d (0x%x) reads %s, which no request wrote there"
            % (bad, bad, hexs(got[bad:])),
            "  got as text: %r" % bytes(got[bad:bad + 24]),
            "  allowed: the durable value %s or a request in flight: %s"
            % (hexs(cands[0]), " ".join(hexs(c) for c in cands[1:]) or
               "none"),
            "  crash point P = log byte %d" % P,
            "  requests covering the byte (last 8):",
        ]
        lines += ["    " + fmt_op(o) for o in ops[-8:]] or ["    (none)"]
        self.fail(k, "data that is neither old nor new", "\n".join(lines),
                  detail)

    def report_lost(self, k, P, bad, exp, got, detail):
        log = self.log
        ops = self.dur.touching(bad, P)
        # Would the weaker rule (durable only once the last sync included
        # came after the flush reply) also check this byte?
        P_sync = log.end(log.last_sync(k))
        weak = ("yes" if ops and ops[-1]["dur"] <= P_sync else
                "no (caught only because a reply came before records that "
                "the last sync in the crash state does not cover)")
        lines = [
            "  durable data lost at guest offset %d (0x%x): expected %s got %s"
            % (bad, bad, hexs(exp[bad:]), hexs(got[bad:])),
            "  got as text: %r" % bytes(got[bad:bad + 24]),
            "  crash point P = log byte %d; last sync in it ends at %d"
            % (P, P_sync),
            "  also required by the flushed-before-last-sync rule: %s" % weak,
            "  requests covering the byte (last 8):",
        ]
        lines += ["    " + fmt_op(o) for o in ops[-8:]] or ["    (none)"]
        self.fail(k, "durable data does not read back", "\n".join(lines),
                  detail)


def cmd_replay(a):
    r = Replay(a)
    return r.run()


# ---- kill rounds (test-kill.sh) --------------------------------------------

KILL_MIX = {"write": 50, "trim": 14, "zero": 10, "flush": 10, "read": 16}


def journal_path(state, i):
    return os.path.join(state, "journal%d" % i)


def read_events(path):
    out = []
    try:
        with open(path, "rb") as f:
            while True:
                try:
                    out.append(pickle.load(f))
                except EOFError:
                    break
                except (pickle.UnpicklingError, ValueError):
                    break
    except FileNotFoundError:
        pass
    return out


def kill_expected(ref, state, nclients, cs):
    """Expected contents after a SIGKILL: the page cache survives, so only
    what the server kept in memory can be lost.  Durable: acknowledged FUA
    requests, and requests acknowledged before a flush that was itself
    acknowledged.  Everything else a client sent may be old or new."""
    exp = bytearray(ref)
    unchecked = Ranges()
    pending, durable_ops = [], []
    info = {"durable": 0, "acked": 0, "sent": 0, "flushes": 0}
    for i in range(nclients):
        ops, order = {}, []
        for ev in read_events(journal_path(state, i)):
            if ev[0] == "I":
                _, no, kind, off, n, fua, src = ev
                ops[no] = {"no": no, "kind": kind, "off": off, "len": n,
                           "fua": fua, "src": src, "acked": False}
                order.append(no)
            elif ev[0] == "A":
                ops[ev[1]]["acked"] = True
            elif ev[0] == "R":
                ops[ev[1]]["src"] = ev[2]
        flushed = max([no for no in order if ops[no]["kind"] == "flush"
                       and ops[no]["acked"]], default=-1)
        for no in order:
            o = ops[no]
            if o["kind"] == "flush":
                info["flushes"] += o["acked"]
                continue
            info["sent"] += 1
            info["acked"] += o["acked"]
            a, b = o["off"], o["off"] + o["len"]
            durable = o["acked"] and (o["fua"] or no < flushed)
            if durable and o["src"] is not None:
                apply_op(exp, o)
                unchecked.remove(a, b)
                durable_ops.append(o)
                info["durable"] += 1
            elif durable:
                # A durable trim whose read-back was cut off: whole
                # clusters read as zeros, the unaligned edges are unknown.
                ca, cb = -(-a // cs) * cs, b // cs * cs
                if ca < cb:
                    exp[ca:cb] = bytes(cb - ca)
                    unchecked.remove(ca, cb)
                    unchecked.add(a, ca)
                    unchecked.add(cb, b)
                else:
                    unchecked.add(a, b)
                pending.append(o)
                info["durable"] += 1
            else:
                unchecked.add(a, b)
                pending.append(o)
    return exp, unchecked, pending, durable_ops, info


def kill_loader(a, i, model, lo, hi, ready, go):
    """One client process: requests on its own region until the server is
    gone; every request is journaled when sent and when acknowledged.

    It connects first and says so on ready; the parent answers on go with
    the moment of the kill, once every client is connected: a client slow
    to connect on a loaded machine must not meet the kill in its handshake
    and look like a server failure."""
    fd = os.open(journal_path(a.state, i),
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)

    def note(what, *args):
        if what == "issue":
            no, kind, off, n, flags, src = args
            os.write(fd, pickle.dumps(("I", no, kind, off, n,
                                       bool(flags & nbd.CMD_FLAG_FUA), src)))
            return no
        if what == "reply":
            os.write(fd, pickle.dumps(("A", args[0])))
        elif what == "readback":
            os.write(fd, pickle.dumps(("R", args[0], args[1])))
        return None

    rng = random.Random("%d:%d" % (a.seed, i))
    try:
        h = nbd.NBD()
        h.connect_unix(a.sock)
    except nbd.Error as e:
        os.write(ready, b"f")
        print("kill-round %d client %d: cannot connect: %s" % (a.round, i, e),
              file=sys.stderr)
        return 2
    os.write(ready, b"c")
    got = os.read(go, 8)
    if len(got) != 8:
        return 2
    kill_at = struct.unpack("d", got)[0]
    c = Client(h, rng, model, lo, hi, a.cluster_size, KILL_MIX, 0.15,
               256 * KiB, 1 * MiB, True, "r%dc%d" % (a.round, i), note)
    deadline = time.monotonic() + a.max_time + 10
    try:
        while time.monotonic() < deadline:
            c.one()
    except Mismatch as e:
        print("FAIL kill-round %d client %d (seed %d) op#%d: live read: %s"
              % (a.round, i, a.seed, c.opno, e), file=sys.stderr)
        return 1
    except nbd.Error as e:
        # An error before the kill is the server failing a request; after
        # it, it is only the connection going away.
        if time.monotonic() < kill_at - 0.005 and \
                e.errnum not in (None, errno.ENOTCONN, errno.EPIPE,
                                 errno.ECONNRESET, errno.ESHUTDOWN):
            print("FAIL kill-round %d client %d (seed %d) op#%d: request "
                  "failed before the kill: %s" % (a.round, i, a.seed, c.opno, e),
                  file=sys.stderr)
            return 1
    finally:
        os.close(fd)
    return 0


def cmd_kill_round(a):
    t0 = time.monotonic()
    state = a.state
    refp = os.path.join(state, "ref.raw")
    h = nbd.NBD()
    h.connect_unix(a.sock)
    size = h.get_size()
    got = read_all(h, size)
    h.shutdown()
    del h
    status = 0
    if os.path.exists(refp) and os.path.exists(journal_path(state, 0)):
        with open(refp, "rb") as f:
            ref = f.read()
        exp, unchecked, pending, durable, info = kill_expected(
            ref, state, a.clients, a.cluster_size)
        # Trims cut off before their read-back: zeros or old (no backing).
        stale, cands, mixed = check_in_flight(exp, got, unchecked, pending,
                                              True, durable)
        checked, bad = compare(exp, got, unchecked, size)
        if bad is None and stale is not None:
            status = 1
            print("FAIL kill-round %d (seed %d, previous round): guest offset "
                  "%d (0x%x) reads %s (%r), which is neither its durable "
                  "value %s nor what a request in flight wrote (%s)"
                  % (a.round, a.seed, stale, stale, hexs(got[stale:]),
                     bytes(got[stale:stale + 24]), hexs(cands[0]),
                     " ".join(hexs(c) for c in cands[1:]) or "none"),
                  file=sys.stderr)
            bad_at = stale
        else:
            bad_at = bad
        if bad is not None:
            status = 1
            print("FAIL kill-round %d (seed %d, previous round): durable data "
                  "lost at guest offset %d (0x%x): expected %s got %s (%r)"
                  % (a.round, a.seed, bad, bad, hexs(exp[bad:]),
                     hexs(got[bad:]), bytes(got[bad:bad + 24])),
                  file=sys.stderr)
        if bad_at is not None:
            region = size // a.clients // a.cluster_size * a.cluster_size
            i = min(a.clients - 1, bad_at // region)
            acked = set(ev[1] for ev in read_events(journal_path(state, i))
                        if ev[0] == "A")
            for ev in read_events(journal_path(state, i)):
                if ev[0] == "I" and ev[2] != "flush" and \
                        ev[3] <= bad_at < ev[3] + ev[4]:
                    print("    client %d op#%d %s off=%d len=%d%s%s data=%s"
                          % (i, ev[1], ev[2], ev[3], ev[4],
                             " FUA" if ev[5] else "",
                             " acked" if ev[1] in acked else " not acked",
                             ev[6] and ev[6][0]), file=sys.stderr)
            if a.keep:
                os.makedirs(a.keep, exist_ok=True)
                for j in range(a.clients):
                    shutil.copyfile(journal_path(state, j), os.path.join(
                        a.keep, "round%d-journal%d" % (a.round, j)))
                shutil.copyfile(refp, os.path.join(a.keep, "round%d-ref.raw"
                                                   % a.round))
        print("kill-round %d: previous round sent %d requests, %d acknowledged, "
              "%d durable, %d flushes; %.1f MiB checked in %.2fs %s"
              % (a.round, info["sent"], info["acked"], info["durable"],
                 info["flushes"], checked / MiB, time.monotonic() - t0,
                 "OK" if status == 0 else "FAILED"), flush=True)
    # What the server reads now is the base for the next round.
    with open(refp, "wb") as f:
        f.write(got)
    for j in range(a.clients):
        if os.path.exists(journal_path(state, j)):
            os.unlink(journal_path(state, j))
    if a.verify_only or status:
        return status

    rng = random.Random("kill:%d" % a.seed)
    delay = rng.uniform(a.min_time, a.max_time)
    region = size // a.clients // a.cluster_size * a.cluster_size
    pids, gos = [], []
    ready_r, ready_w = os.pipe()
    for i in range(a.clients):
        lo = i * region
        hi = size if i == a.clients - 1 else lo + region
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                os.close(ready_r)
                os.close(go_w)
                code = kill_loader(a, i, bytearray(got[lo:hi]), lo, hi, ready_w, go_r)
            finally:
                os._exit(code)
        os.close(go_r)
        pids.append(pid)
        gos.append(go_w)
    os.close(ready_w)
    # The kill is timed from when every client is connected.
    answers = b""
    while len(answers) < a.clients:
        more = os.read(ready_r, a.clients - len(answers))
        if not more:
            break
        answers += more
    os.close(ready_r)
    kill_at = time.monotonic() + delay
    for g in gos:
        try:
            os.write(g, struct.pack("d", kill_at))
        except OSError:
            pass
        os.close(g)
    time.sleep(max(0, kill_at - time.monotonic()))
    os.kill(a.pid, signal.SIGKILL)
    t1 = time.monotonic()
    for pid in pids:
        _, st = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(st)
        if code != 0:
            status = 1
    print("kill-round %d: killed after %.2fs, clients done %.2fs later"
          % (a.round, delay, time.monotonic() - t1), flush=True)
    return status


# ---- main ------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("workload")
    w.add_argument("--uri", required=True)
    w.add_argument("--iolog", required=True)
    w.add_argument("--journal", required=True)
    w.add_argument("--seed", type=int, default=1)
    w.add_argument("--ops", type=int, default=300)
    w.add_argument("--cluster-size", type=parse_size, default=64 * KiB)
    w.add_argument("--fua-rate", type=float,
                   help="fraction of writes, zeroes and trims with FUA "
                        "(default: 0.03 or 0.12, from the seed)")
    w.add_argument("--mix", help="weights to change, e.g. read:40,trim:5 "
                   "(defaults: %s)" % ",".join("%s:%d" % kv for kv in
                                               CRASH_MIX.items()))
    w.add_argument("--read-recent", type=float, default=0.6,
                   help="fraction of reads that go back to a recent request; "
                        "the rest go anywhere (which loads other tables into "
                        "the metadata cache, evicting what is there)")
    w.add_argument("--flush-weight", type=int,
                   help="weight of flush in the mix (default: 1, 3 or 7, "
                        "from the seed; writes weigh 40)")
    w.add_argument("--max-write", type=parse_size, default=1 * MiB)
    w.add_argument("--max-zero", type=parse_size, default=4 * MiB)
    w.add_argument("--trim-zero-clusters", action="store_true",
                   help="no backing file: trimmed whole clusters must read "
                        "as zeros")

    r = sub.add_parser("replay")
    r.add_argument("--initial", required=True,
                   help="copy of the image taken before it was served")
    r.add_argument("--iolog", required=True)
    r.add_argument("--journal", required=True)
    r.add_argument("--plugin", default=os.environ.get("PLUGIN"))
    r.add_argument("--workdir", required=True)
    r.add_argument("--name", default="replay")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--points", type=int, default=20)
    r.add_argument("--point", type=int, action="append",
                   help="check this crash point (repeatable)")
    r.add_argument("--variant", type=int,
                   help="with --point: check this variant (subset) fully")
    r.add_argument("--variants", type=int, default=4,
                   help="other subsets per point, checked with qemu-img "
                        "check only (default 4)")
    r.add_argument("--torn-rate", type=float, default=0.3)
    r.add_argument("--continue-every", type=int, default=4,
                   help="every Nth point, also write to the crashed image")
    r.add_argument("--cluster-size", type=parse_size, default=64 * KiB)
    r.add_argument("--trim-zero-clusters", action="store_true")
    r.add_argument("--keep", help="copy failing crash images here")
    r.add_argument("--secret-file",
                   help="the image is encrypted: its passphrase is in this "
                        "file, without a final newline (qemu-img reads it as "
                        "a secret object's file=, the plugin as "
                        "passphrase=+FILE)")
    r.add_argument("--bitmaps", help="persistent bitmaps (NAME,NAME) that each "
                   "crash state must have in use, or whole")
    r.add_argument("--verbose", action="store_true")

    k = sub.add_parser("kill-round")
    k.add_argument("--sock", required=True)
    k.add_argument("--pid", type=int, required=True)
    k.add_argument("--state", required=True)
    k.add_argument("--round", type=int, default=0)
    k.add_argument("--seed", type=int, default=1)
    k.add_argument("--clients", type=int, default=4)
    k.add_argument("--cluster-size", type=parse_size, default=64 * KiB)
    k.add_argument("--min-time", type=float, default=0.2)
    k.add_argument("--max-time", type=float, default=0.8)
    k.add_argument("--verify-only", action="store_true")
    k.add_argument("--keep")

    a = p.parse_args()
    if a.cmd == "replay" and not a.plugin:
        p.error("--plugin or $PLUGIN is needed")
    return {"workload": cmd_workload, "replay": cmd_replay,
            "kill-round": cmd_kill_round}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
