#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Memory is bounded by cache-size: a 1 TiB image whose L2 tables all exist
# (preallocation=metadata: 128 MiB of tables, 16 times an 8 MiB cache) is
# served at cache-size=8M while four connections send random reads, writes,
# trims, zero requests and flushes across the whole disk, so that the
# metadata cache evicts all the time.  The server's resident memory
# (VmRSS, sampled every 0.1 s) must stay at most cache-size + 16 MiB for
# the whole run and after it, and QEMU must find the image clean.
#
# Those requests are at most 64 KiB: nbdkit's core keeps one buffer per
# thread, as large as the largest request that thread has served (threads
# x connections x request size, the same for every nbdkit plugin), which is
# nbdkit's memory and not bounded by any plugin parameter.  Then four new
# connections send 1 MiB reads and writes: while they last, resident memory
# may pass the bound by nbdkit's buffers (THREADS x 4 connections x
# 1 MiB) and no more; once they are gone it must be back within the bound.
# Opening this image frees buffers of a few MiB, which raises glibc's mmap
# threshold, so this is what catches freed request buffers kept in the
# worker threads' malloc arenas.
#
# MEM_SECONDS (default 20) is the length of the load.

set -eu
srcdir=$(cd "${srcdir:-$(dirname "$0")}" && pwd)
. "$srcdir/functions.sh"

requires qemu-img --version
requires nbdkit --version
requires "$PYTHON" -c 'import nbd'

SECONDS_OF_LOAD=${MEM_SECONDS:-20}
CACHE_MIB=8
LIMIT_MIB=$((CACHE_MIB + 16))
# nbdkit's worker threads a connection, passed to nbdkit: its buffers in
# the 1 MiB phase are bounded by this.
THREADS=16

img=$TMP/big.qcow2
qemu-img create -q -f qcow2 -o preallocation=metadata,cluster_size=64k "$img" 1T

sock=$TMP/sock log=$TMP/nbdkit.log
rm -f "$sock"
# Without -v: a debug line per request would only slow the load down.
nbdkit -f --threads "$THREADS" -U "$sock" "$PLUGIN" file="$img" cache-size=${CACHE_MIB}M compact=off \
    >"$log" 2>&1 &
track_server $! "$sock" "$log" nbdkit
pid=$LAST_SERVER_PID

cat >"$TMP/load.py" <<'EOF'
import random, sys, threading, time
import nbd

sock, pid, seconds, limit_mib = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
threads = int(sys.argv[5])
CS = 65536
L2_SPAN = CS * (CS // 8)

def rss():
    d = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, v = line.split(":", 1)
            if k in ("VmRSS", "RssAnon"):
                d[k] = int(v.split()[0])
    return d["VmRSS"], d["RssAnon"]

peak = [0, 0, ""]
stop = threading.Event()
phase = ["load"]

def sampler():
    while not stop.is_set():
        r, a = rss()
        if r > peak[0]:
            peak[0], peak[1], peak[2] = r, a, phase[0]
        time.sleep(0.1)

t = threading.Thread(target=sampler, daemon=True)
t.start()

def connect(n):
    hs = []
    for i in range(n):
        h = nbd.NBD()
        h.connect_unix(sock)
        hs.append(h)
    return hs

def drain(hs):
    """Waits for every request in flight, then flushes each connection."""
    for h in hs:
        while h.aio_in_flight() > 0:
            h.poll(-1)
        h.flush()

handles = connect(4)
size = handles[0].get_size()
rng = random.Random(7)
tables = set()
counts = dict(read=0, write=0, trim=0, zero=0, flush=0)
data64 = bytes(rng.randrange(256) for _ in range(65536))
deadline = time.time() + seconds
DEPTH = 8
errors = []
off = 0

def done(err):
    # Returning 1 retires the command: nothing is left to collect.
    if err.value:
        errors.append(err.value)
    return 1

while time.time() < deadline and not errors:
    for h in handles:
        while h.aio_in_flight() < DEPTH:
            k = rng.random()
            if k < 0.55:
                off = rng.randrange(size // 4096) * 4096
                h.aio_pread(nbd.Buffer(4096), off, completion=done)
                counts["read"] += 1
            elif k < 0.80:
                n = rng.choice((4096, 65536))
                off = rng.randrange((size - n) // 4096) * 4096
                h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data64[:n])), off,
                             completion=done)
                counts["write"] += 1
            elif k < 0.90:
                off = min(rng.randrange(size // CS) * CS, size - 4 * CS)
                h.aio_trim(rng.choice((4096, CS, 4 * CS)), off, completion=done)
                counts["trim"] += 1
            elif k < 0.995:
                off = min(rng.randrange(size // 4096) * 4096, size - CS)
                h.aio_zero(rng.choice((4096, CS)), off, completion=done)
                counts["zero"] += 1
            else:
                h.aio_flush(completion=done)
                counts["flush"] += 1
            tables.add(off // L2_SPAN)
        h.poll(-1)
drain(handles)
if errors:
    sys.exit("FAIL: a request failed with errno %d" % errors[0])
phase[0] = "idle"
time.sleep(2)
r, a = rss()
for h in handles:
    h.shutdown()
print("requests: %s; %d of %d L2 tables touched" % (
    ", ".join("%d %s" % (v, k) for k, v in counts.items()), len(tables), size // L2_SPAN))
print("peak VmRSS %.1f MiB (anonymous %.1f MiB) during %s; idle after: %.1f MiB (%.1f)" % (
    peak[0] / 1024, peak[1] / 1024, peak[2], r / 1024, a / 1024))
if len(tables) < (size // L2_SPAN) // 2:
    sys.exit("FAIL: the load touched only %d L2 tables: it does not exercise eviction" % len(tables))
if max(peak[0], r) > limit_mib * 1024:
    sys.exit("FAIL: resident memory %.1f MiB passed cache-size + 16 MiB = %d MiB" % (
        max(peak[0], r) / 1024, limit_mib))

# 1 MiB requests on four new connections, sequential in the first 4 GiB.
MIB = 1 << 20
NBDKIT_BUFFERS_MIB = threads * 4
peak[:] = [0, 0, ""]
phase[0] = "1 MiB requests"
handles = connect(4)
data1m = bytearray(data64 * 16)
big = 0
deadline = time.time() + min(seconds, 5)
while time.time() < deadline and not errors:
    for i, h in enumerate(handles):
        while h.aio_in_flight() < 4:
            off = (i << 30) + (big % 1024) * MIB
            if big % 2:
                h.aio_pwrite(nbd.Buffer.from_bytearray(data1m), off, completion=done)
            else:
                h.aio_pread(nbd.Buffer(MIB), off, completion=done)
            big += 1
        h.poll(-1)
drain(handles)
for h in handles:
    h.shutdown()
del handles
if errors:
    sys.exit("FAIL: a 1 MiB request failed with errno %d" % errors[0])
big_peak = list(peak)
phase[0] = "idle after 1 MiB requests"
time.sleep(2)
stop.set()
t.join()
r, a = rss()
print("%d requests of 1 MiB: peak VmRSS %.1f MiB (anonymous %.1f MiB); "
      "idle after: %.1f MiB (%.1f)" % (
    big, big_peak[0] / 1024, big_peak[1] / 1024, r / 1024, a / 1024))
if big_peak[0] > (limit_mib + NBDKIT_BUFFERS_MIB) * 1024:
    sys.exit("FAIL: resident memory %.1f MiB during 1 MiB requests passed cache-size + 16 MiB "
             "+ nbdkit's request buffers = %d MiB" % (
        big_peak[0] / 1024, limit_mib + NBDKIT_BUFFERS_MIB))
if r > limit_mib * 1024:
    sys.exit("FAIL: resident memory %.1f MiB once the 1 MiB connections were gone passed "
             "cache-size + 16 MiB = %d MiB: freed request buffers stay resident" % (
        r / 1024, limit_mib))
EOF

"$PYTHON" "$TMP/load.py" "$sock" "$pid" "$SECONDS_OF_LOAD" "$LIMIT_MIB" "$THREADS" ||
    { tail -n 20 "$log" >&2; fail "memory is not bounded by cache-size=${CACHE_MIB}M"; }
stop_server "$pid"
[ "$SERVER_STATUS" = 0 ] || { cat "$log" >&2; fail "nbdkit exited with status $SERVER_STATUS"; }
check_clean "$img"
echo "PASS: resident memory within cache-size + 16 MiB = $LIMIT_MIB MiB"
