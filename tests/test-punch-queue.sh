#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Deferred punches (DESIGN.md, "Semantics": discard of part of a cluster).
# A TRIM of part of a cluster is answered before its punch; the punch must
# still come before anything else done to its range.
#
# 1. With QCOW2RECLAIM_PUNCH_HOLD=1 no worker runs, so each punch waits for
#    whatever touches its range: the TRIM leaves the host range allocated;
#    a read of it runs the punch and sees zeros; a write after a TRIM
#    survives the flush that drains the queue (a late punch would wipe it);
#    a cluster trimmed to nothing in 4 KiB pieces is freed by the flush; the
#    close drains what is left.
# 2. With the worker: two connections share eight clusters, one on the even
#    4 KiB blocks, one on the odd, writing, trimming and reading back at
#    random for a few seconds; each checks its own blocks every time.
# Both: qemu-img check clean, contents as the clients left them.
. "$srcdir/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires "$PYTHON" -c 'import nbd'

img=$TMP/pq.qcow2
qemu-img create -q -f qcow2 "$img" 64M
qemu-io -f qcow2 -c 'write -P 0xaa 0 1M' "$img" >/dev/null
# Host offset of each of the first 16 guest clusters.
hosts=$(qemu-img map --output=json "$img" | "$PYTHON" -c '
import json, sys
m = {}
for e in json.load(sys.stdin):
    if e["data"]:
        for o in range(e["start"], e["start"] + e["length"], 65536):
            m[o] = e["offset"] + o - e["start"]
print(" ".join(str(m[i * 65536]) for i in range(16)))')

QCOW2RECLAIM_PUNCH_HOLD=1 start_server "$TMP/pq.sock" "$TMP/pq.log" file="$img"
grep -q 'test hook: deferred punches wait' "$TMP/pq.log" ||
    fail "the engine did not see QCOW2RECLAIM_PUNCH_HOLD"
# A bound, as a request that deadlocks would otherwise hang the test.
timeout 120 "$PYTHON" - "$TMP/pq.sock" "$img" $hosts <<'PY'
import os, sys, nbd
sock, path = sys.argv[1], sys.argv[2]
H = [int(x) for x in sys.argv[3:]]
K = 4096
fd = os.open(path, os.O_RDONLY)

def is_hole(off, n):
    try:
        return os.lseek(fd, off, os.SEEK_DATA) >= off + n
    except OSError:
        return True

def fail(msg):
    sys.exit("FAIL: " + msg)

h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_unix(sock)
# The TRIM is answered, its punch still queued; a read of the range runs it.
h.trim(K, 2 * K)
if is_hole(H[0] + 2 * K, K):
    fail("the punch of a TRIM of part of a cluster was not deferred")
if h.pread(K, 2 * K) != bytes(K):
    fail("a read after a TRIM did not see zeros")
if not is_hole(H[0] + 2 * K, K):
    fail("the read did not run the queued punch first")
if h.pread(K, 3 * K) != b"\xaa" * K:
    fail("data next to the trimmed range was lost")

# A write after a TRIM of the same range, then the flush that drains.
h.trim(K, 65536 + 2 * K)
h.pwrite(b"\xbb" * K, 65536 + 2 * K)
h.flush()
if h.pread(K, 65536 + 2 * K) != b"\xbb" * K:
    fail("a write made after a TRIM was wiped by its deferred punch")

# Cluster 2 trimmed to nothing 4 KiB at a time: the flush punches and frees.
for i in range(16):
    h.trim(K, 2 * 65536 + i * K)
if is_hole(H[2], 65536):
    fail("the 4 KiB TRIMs were punched before the flush")
h.flush()
if not is_hole(H[2], 65536):
    fail("the flush did not run the queued punches")
ext = []
h.block_status(65536, 2 * 65536, lambda ctx, off, e, err: ext.extend(e))
if not ext or not (ext[1] & nbd.STATE_HOLE):
    fail("the cluster left all hole was not freed by the flush (block status %r)" % ext)
if h.pread(65536, 2 * 65536) != bytes(65536):
    fail("the freed cluster does not read as zeros")

# Block status of one cluster runs the punches queued in it, not those
# of the clusters after it.
h.trim(K, 6 * 65536 + 2 * K)
h.block_status(65536, 5 * 65536, lambda ctx, off, e, err: None)
if is_hole(H[6] + 2 * K, K):
    fail("block status of cluster 5 ran the punch queued in cluster 6")

# A write with FUA over a range whose punch is queued: the flush it
# makes drains the queue, whose job for this cluster needs the range the
# write holds, so it must flush after letting it go (it hung before).
h.trim(K, 4 * 65536 + 2 * K)
h.pwrite(b"\xcc" * K, 4 * 65536 + 2 * K, nbd.CMD_FLAG_FUA)
if h.pread(K, 4 * 65536 + 2 * K) != b"\xcc" * K:
    fail("a FUA write after a TRIM of the same range was lost")

# Left queued for the close.
h.trim(K, 3 * 65536 + 2 * K)
h.shutdown()
PY
stop_server "$LAST_SERVER_PID"
[ "$SERVER_STATUS" = 0 ] || fail "the server exited with status $SERVER_STATUS"
"$PYTHON" - "$img" $hosts <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
off = int(sys.argv[5]) + 2 * 4096
try:
    d = os.lseek(fd, off, os.SEEK_DATA)
except OSError:
    d = off + 4096
if d < off + 4096:
    sys.exit("FAIL: the close did not run the punch still queued")
PY
check_clean "$img"
qemu-io -f qcow2 -c 'read -P 0 8K 4K' -c 'read -P 0xaa 12K 52K' -c 'read -P 0xbb 72K 4K' \
    -c 'read -P 0 128K 64K' -c 'read -P 0 200K 4K' -c 'read -P 0xaa 204K 52K' \
    -c 'read -P 0xcc 264K 4K' -c 'read -P 0 392K 4K' "$img" |
    grep -q -i -e fail -e mismatch && fail "the image does not hold what the client left"
echo "ok: deferred punches run before the I/O over their range, a flush and the close"

# 2: the worker, under two writers sharing clusters.
qemu-img create -q -f qcow2 "$img" 64M
start_server "$TMP/pq2.sock" "$TMP/pq2.log" file="$img"
"$PYTHON" - "$TMP/pq2.sock" "$TMP/pq2.model" <<'PY'
import random, sys, threading, time, nbd
sock, model_path = sys.argv[1], sys.argv[2]
K, SPAN = 4096, 8 * 65536
errors = []
models = {}

def run(parity, seed):
    rng = random.Random(seed)
    h = nbd.NBD(); h.connect_unix(sock)
    mine = {}
    blocks = [b for b in range(SPAN // K) if b % 2 == parity]
    end = time.monotonic() + 6
    n = 0
    while time.monotonic() < end and not errors:
        b = rng.choice(blocks)
        op = rng.random()
        if op < 0.45:
            data = bytes([rng.randrange(1, 256)]) * K
            h.pwrite(data, b * K)
            mine[b] = data
        elif op < 0.9:
            h.trim(K, b * K)
            mine[b] = bytes(K)
        else:
            h.flush()
        c = rng.choice(blocks)
        got = h.pread(K, c * K)
        if got != mine.get(c, bytes(K)):
            errors.append("connection %d: block %d reads %r..., want %r..."
                          % (parity, c, got[:2], mine.get(c, bytes(K))[:2]))
        n += 1
    h.flush()
    h.shutdown()
    models[parity] = mine

ts = [threading.Thread(target=run, args=(p, 700 + p)) for p in (0, 1)]
for t in ts: t.start()
for t in ts: t.join()
if errors:
    sys.exit("FAIL: " + errors[0])
with open(model_path, "wb") as f:
    for b in range(SPAN // K):
        f.write(models[b % 2].get(b, bytes(K)))
PY
stop_server "$LAST_SERVER_PID"
check_clean "$img"
qemu-img convert -O raw "$img" "$TMP/pq2.raw"
cmp -n $((8 * 65536)) "$TMP/pq2.raw" "$TMP/pq2.model" ||
    fail "after the concurrent run the image differs from what the clients wrote"
echo "ok: two connections sharing clusters keep their data while the worker punches"
