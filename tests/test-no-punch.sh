#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Hosts that cannot punch holes (README, "Images on block devices"): an
# NFSv3 share or a FUSE filesystem without fallocate, and block devices
# without write-zeroes (a thin LVM volume, many iSCSI LUNs).  The punch is
# refused there (injected: fallocate PUNCH_HOLE fails with EOPNOTSUPP).
#
# 1. A file: write-zeroes that may trim (what every client sends by
#    default) over part of a cluster, and over whole clusters of a v2 image
#    with a backing file, must still read zeros: they are written instead
#    of punched.  The image stays clean; the notice is said once.
# 2. A loop device over a sparse file (standing for the thin volume): the
#    clusters a TRIM frees are discarded with BLKDISCARD, so the sparse file
#    gets its space back; write-zeroes over part of a cluster reads zeros;
#    data reads back, check clean.
# 3. The same device refusing BLKDISCARD too: nothing goes back, said once,
#    and everything still reads as it should.
. "$srcdir/functions.sh"
[ "$(id -u)" = 0 ] || skip "needs root (losetup)"
requires losetup --version
requires qemu-img --version
requires "$PYTHON" -c 'import nbd'
requires losetup -f

MiB=$((1 << 20))
FAULTS=$TMP/faults
export QCOW2RECLAIM_FAULTS=$FAULTS
allocated() { echo $(( $(stat -c %b "$1") * 512 )); }

# clients SOCKET KIND: the guest's side; KIND says what it may expect of
# the space (device: whole-cluster trims come back as holes).
clients() {
    "$PYTHON" - "$@" <<'PY'
import sys, nbd
sock, kind = sys.argv[1], sys.argv[2]
MiB, K = 1 << 20, 1024
h = nbd.NBD()
h.connect_unix(sock)
for i in range(32):
    h.pwrite(bytes([0x40 + i]) * MiB, i * MiB)
h.flush()
# Write-zeroes, may trim: 8 KiB inside a cluster, then 1 MiB of whole
# clusters.
h.zero(8 * K, 4 * K)
h.zero(MiB, 2 * MiB)
h.flush()
b = h.pread(64 * K, 0)
if b[4 * K:12 * K] != bytes(8 * K):
    sys.exit("FAIL: %s: write-zeroes over part of a cluster left old data: %r"
             % (kind, set(b[4 * K:12 * K])))
if b[:4 * K] != b"\x40" * 4 * K or b[12 * K:] != b"\x40" * (52 * K):
    sys.exit("FAIL: %s: write-zeroes changed the bytes around it" % kind)
if h.pread(MiB, 2 * MiB) != bytes(MiB):
    sys.exit("FAIL: %s: write-zeroes over whole clusters does not read zeros" % kind)
# Trims: MiB 4..27 in whole clusters.
h.trim(24 * MiB, 4 * MiB)
h.flush()
for i in range(4, 28):
    if h.pread(MiB, i * MiB) != bytes(MiB):
        sys.exit("FAIL: %s: trimmed MiB %d does not read zeros" % (kind, i))
for i in (3, 28, 31):
    if h.pread(MiB, i * MiB) != bytes([0x40 + i]) * MiB:
        sys.exit("FAIL: %s: MiB %d does not read back" % (kind, i))
h.shutdown()
PY
}

# ---- 1. a file whose filesystem cannot punch ----------------------------------
echo "punch EOPNOTSUPP" >"$FAULTS"
img=$TMP/file.qcow2 sock=$TMP/file.sock log=$TMP/file.log
qemu-img create -q -f qcow2 "$img" 64M
start_server "$sock" "$log" file="$img" compact=off
pid=$LAST_SERVER_PID
clients "$sock" file
stop_server "$pid"
[ "$SERVER_STATUS" = 0 ] || { cat "$log" >&2; fail "file: the server exited with status $SERVER_STATUS"; }
check_clean "$img"
n=$(grep -c 'the host filesystem cannot punch holes' "$log" || true)
[ "$n" = 1 ] || { cat "$log" >&2; fail "file: the notice that punching is refused was said $n times, not once"; }
echo "ok: file: write-zeroes read zeros without punching, trims answered, check clean, one notice"

# A v2 image over a backing file has no zero flag: write-zeroes of whole
# clusters there leaves the cluster mapped, so it must be written.
qemu-img create -q -f qcow2 -o compat=0.10 "$TMP/base.qcow2" 4M
qemu-io -f qcow2 -c 'write -P 0x11 0 4M' "$TMP/base.qcow2" >/dev/null
qemu-img create -q -f qcow2 -o compat=0.10 -b "$TMP/base.qcow2" -F qcow2 "$TMP/v2.qcow2"
qemu-io -f qcow2 -c 'write -P 0x22 0 1M' "$TMP/v2.qcow2" >/dev/null
start_server "$sock" "$log.v2" file="$TMP/v2.qcow2" compact=off
pid=$LAST_SERVER_PID
"$PYTHON" - "$sock" <<'PY'
import sys, nbd
h = nbd.NBD()
h.connect_unix(sys.argv[1])
h.zero(1 << 19, 0)
h.flush()
b = h.pread(1 << 20, 0)
if b[:1 << 19] != bytes(1 << 19):
    sys.exit("FAIL: v2 over a backing file: write-zeroes of whole clusters reads %r"
             % set(b[:1 << 19]))
if b[1 << 19:] != b"\x22" * (1 << 19):
    sys.exit("FAIL: v2 over a backing file: the rest of the megabyte changed")
h.shutdown()
PY
stop_server "$pid"
check_clean "$TMP/v2.qcow2"
echo "ok: file: v2 over a backing file, write-zeroes of whole clusters reads zeros"

# ---- 2. a device that cannot punch, but can discard ---------------------------
BACKING=$TMP/backing
truncate -s $((128 * MiB)) "$BACKING"
DEV=$(losetup -f --show "$BACKING") || skip "no loop device could be set up"
cleanup_fn losetup -d "$DEV"
: >"$FAULTS"
qemu-img create -q -f qcow2 "$TMP/empty.qcow2" 64M
qemu-img convert -O qcow2 "$TMP/empty.qcow2" "$DEV"
echo "punch EOPNOTSUPP" >"$FAULTS"
start_server "$sock" "$log.dev" file="$DEV" compact=off
pid=$LAST_SERVER_PID
clients "$sock" device
stop_server "$pid"
[ "$SERVER_STATUS" = 0 ] || { cat "$log.dev" >&2; fail "device: the server exited with status $SERVER_STATUS"; }
: >"$FAULTS"
check_clean "$DEV"
grep -q 'freed clusters are discarded instead (BLKDISCARD)' "$log.dev" ||
    { cat "$log.dev" >&2; fail "device: no notice that freed clusters are discarded instead"; }
# 32 MiB written, 26 MiB of it zeroed or trimmed in whole clusters.
a=$(allocated "$BACKING")
[ "$a" -le $((9 * MiB)) ] ||
    fail "device: the sparse file holds $a bytes after 26 of 32 MiB were freed (want at most 9 MiB)"
echo "ok: device without punch: freed clusters discarded, sparse file at $((a / 1024)) KiB, check clean"

# ---- 3. a device that can do neither -------------------------------------------
qemu-img convert -O qcow2 "$TMP/empty.qcow2" "$DEV"
printf 'punch EOPNOTSUPP\ndiscard EOPNOTSUPP\n' >"$FAULTS"
start_server "$sock" "$log.none" file="$DEV" compact=off
pid=$LAST_SERVER_PID
clients "$sock" "device, no discard"
stop_server "$pid"
[ "$SERVER_STATUS" = 0 ] || { cat "$log.none" >&2; fail "no discard: the server exited with status $SERVER_STATUS"; }
: >"$FAULTS"
check_clean "$DEV"
n=$(grep -c 'the device cannot discard either' "$log.none" || true)
[ "$n" = 1 ] || { cat "$log.none" >&2; fail "no discard: the notice was said $n times, not once"; }
echo "ok: device without punch or discard: data right, check clean, one notice"
