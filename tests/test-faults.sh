#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Host I/O errors (server/hosttest.h fault injection) as a full disk or a
# failing disk produces them.  What users rely on:
#  - the request that met the error fails with that errno, EIO or ENOSPC,
#    not a different one (a guest treats ENOSPC as "disk full, pause" and
#    EIO as "disk broken"; QEMU's werror=enospc depends on the difference);
#  - the server survives it, and the same connection keeps working once
#    the host recovers;
#  - the image stays consistent: qemu-img check finds no corruption (a
#    failed allocation may leak a cluster, which check -r leaks repairs),
#    and everything the client wrote and then flushed successfully is
#    there after the server stops;
#  - a failed write, zero or trim leaves each byte either old or new, never
#    bytes from somewhere else (such as a reused cluster's stale data).
# A failed punch is the exception to the first rule: see punch_cases.
# Then a host filesystem that cannot punch holes at all: freed clusters
# must still be reused, and the administrator told once.
set -eu
: "${srcdir:=$(cd "$(dirname "$0")" && pwd)}"
. "$srcdir/functions.sh"

requires nbdkit --version
requires qemu-img --version
requires qemu-io --version
requires "$PYTHON" -c 'import nbd'

DIR=$(realpath "$TMP")
FAULTS=$DIR/faults
# The engine reads this when it opens the image: set before nbdkit starts.
export QCOW2RECLAIM_FAULTS=$FAULTS
SOCK=$DIR/sock

cat >"$DIR/client.py" <<'EOF'
import errno, os, sys
import nbd

sock, pid, faults, case, outdir = sys.argv[1:6]
pid = int(pid)
MiB = 1 << 20
CHUNK = 4 * MiB

h = nbd.NBD()
h.connect_unix(sock)
size = h.get_size()

def fail(msg):
    sys.exit("%s: %s" % (case, msg))

# The engine re-reads the control file when its mtime changes; two writes
# within one timestamp tick would look alike, so each gets its own mtime.
stamp = [0]
def set_faults(text):
    with open(faults, "w") as f:
        f.write(text)
    stamp[0] += 1
    t = 1600000000 * 10**9 + stamp[0] * 10**6
    os.utime(faults, ns=(t, t))

def alive(after):
    try:
        os.kill(pid, 0)
    except OSError:
        fail("the server died after %s" % after)

# The model: what each byte must read as; bytes whose content a request
# left open are re-read and adopted once checked against what is allowed.
ref = bytearray(size)
for off in range(0, size, CHUNK):
    ref[off:off + CHUNK] = h.pread(min(CHUNK, size - off), off)

def expect_errno(what, want, fn):
    try:
        fn()
    except nbd.Error as e:
        if e.errnum != want:
            fail("%s failed with %s (%s), expected %s"
                 % (what, errno.errorcode.get(e.errnum, e.errnum), e.string,
                    errno.errorcode[want]))
        print("ok: %s: %s" % (case, what))
        return
    fail("%s succeeded, expected %s" % (what, errno.errorcode[want]))

def verify(off, length, when):
    got = h.pread(length, off)
    if got != ref[off:off + length]:
        i = next(i for i in range(length) if got[i] != ref[off + i])
        fail("%s: byte 0x%x reads 0x%02x, expected 0x%02x"
             % (when, off + i, got[i], ref[off + i]))

def settle(off, length, new, when):
    """After a failed request: each byte must be the old or the new value
    (new is one byte value); the result becomes the reference."""
    got = h.pread(length, off)
    old = ref[off:off + length]
    for b in range(0, length, 4096):
        g, o = got[b:b + 4096], old[b:b + 4096]
        if g == o or g == bytes([new]) * len(g):
            continue
        for i in range(len(g)):
            if g[i] != o[i] and g[i] != new:
                fail("%s: byte 0x%x reads 0x%02x, neither old 0x%02x nor 0x%02x"
                     % (when, off + b + i, g[i], o[i], new))
    ref[off:off + length] = got

def write(off, length, byte, flags=0):
    h.pwrite(bytes([byte]) * length, off, flags)
    ref[off:off + length] = bytes([byte]) * length

# Requests that must work once the fault is gone: on the same connection,
# old data, a new write read back, and a flush.
health_byte = [0x30]
def health(after):
    alive(after)
    verify(0, 64 * 1024, "reading old data after %s" % after)
    health_byte[0] += 1
    write(40 * MiB, 128 * 1024, health_byte[0])
    verify(40 * MiB, 128 * 1024, "reading a new write after %s" % after)
    h.flush()

def write_cases(err):
    name = errno.errorcode[err]
    # In place, over data the image already holds (written by qemu-io).
    # Then a fresh allocation: part of a cluster (the rest is filled from
    # zeros), and whole clusters.
    for what, off, length, byte in (
            ("write in place over allocated data", 2 * MiB, 64 * 1024, 0xb1),
            ("write of part of an unallocated cluster", 20 * MiB + 4096, 4096, 0xb2),
            ("write of whole unallocated clusters", 24 * MiB, 128 * 1024, 0xb3)):
        set_faults("write %s\n" % name)
        expect_errno(what, err, lambda: h.pwrite(bytes([byte]) * length, off))
        alive(what)
        set_faults("")
        settle(off, length, byte, "after the failed %s" % what)
        health(what)
    # Metadata write-back: an allocation makes L2 and refcount entries
    # dirty; the flush that writes them back meets the error.
    write(30 * MiB, 64 * 1024, 0xb4)
    set_faults("write %s\n" % name)
    expect_errno("flush writing back metadata", err, h.flush)
    alive("the failed flush")
    set_faults("")
    h.flush()
    verify(30 * MiB, 64 * 1024, "data written before a failed flush")
    health("the failed metadata write-back")

def sync_cases(err):
    name = errno.errorcode[err]
    write(3 * MiB, 64 * 1024, 0xc1)
    set_faults("sync %s\n" % name)
    expect_errno("flush", err, h.flush)
    alive("the failed flush")
    # FUA promises stable storage before the reply: it must fail too.
    expect_errno("FUA write", err,
                 lambda: h.pwrite(b"\xc2" * 65536, 3 * MiB + 65536, nbd.CMD_FLAG_FUA))
    alive("the failed FUA write")
    set_faults("")
    settle(3 * MiB + 65536, 65536, 0xc2, "after the failed FUA write")
    h.flush()
    verify(3 * MiB, 64 * 1024, "data written before the failed flush")
    health("the failed flush")

# A failed punch need not fail the trim.  By the time the engine punches,
# the L2 entry has changed and the clusters are free: the trim did what the
# guest asked, only the host keeps the space.  QEMU ignores its protocol
# layer's discard errors the same way, and NBD lets a TRIM leave any
# content.  So: EIO or success, nothing else; on success the error must be
# in the log, so the administrator learns why space is not coming back.
def trim_tolerant(what, length, off):
    try:
        h.trim(length, off)
    except nbd.Error as e:
        if e.errnum != errno.EIO:
            fail("%s failed with %s, expected EIO or success"
                 % (what, errno.errorcode.get(e.errnum, e.errnum)))
        print("ok: %s: %s failed with EIO" % (case, what))
        return
    print("ok: %s: %s succeeded (the punch error is only logged)" % (case, what))
    punch_logged.append(what)

punch_logged = []
def punch_cases():
    # Whole allocated clusters: the trim unreferences them and punches.
    set_faults("punch EIO\n")
    trim_tolerant("trim of whole allocated clusters", MiB, 4 * MiB)
    alive("the failed trim")
    set_faults("")
    settle(4 * MiB, MiB, 0, "after the failed trim")
    # Part of a cluster: only punching can make it read as zeros.
    set_faults("punch EIO\n")
    trim_tolerant("trim of part of a cluster", 8192, 5 * MiB + 4096)
    alive("the failed partial trim")
    set_faults("")
    settle(5 * MiB + 4096, 8192, 0, "after the failed partial trim")
    health("the failed trims")
    # Clusters freed without being punched still hold their old data.  A
    # write of part of a cluster in unallocated space may get one of them
    # and must not rely on a hole for the rest: it reads as zeros.
    set_faults("punch EIO\n")
    h.trim(MiB, 6 * MiB)
    # Whole clusters without a backing file become unallocated: zeros,
    # whether or not the host range was punched.
    ref[6 * MiB:7 * MiB] = bytes(MiB)
    h.flush()
    for i in range(4):
        write(28 * MiB + i * 65536 + 8192, 4096, 0xd1 + i)
    set_faults("")
    verify(28 * MiB, 4 * 65536, "partial writes into clusters freed while "
           "punching failed (stale data must not show)")
    verify(6 * MiB, MiB, "range trimmed while punching failed")
    health("writes into reused clusters")

def zero_cases():
    for what, off, length in (
            ("write-zeroes of whole allocated clusters", 6 * MiB, 128 * 1024),
            ("write-zeroes of part of a cluster", 6 * MiB + 256 * 1024 + 512, 8192)):
        set_faults("zero EIO\n")
        # NO_HOLE, i.e. no MAY_TRIM (NBD write-zeroes may trim unless told
        # otherwise): the clusters keep their space and the host range is
        # really zeroed, which is the operation that fails here.
        expect_errno(what, errno.EIO,
                     lambda: h.zero(length, off, nbd.CMD_FLAG_NO_HOLE))
        alive(what)
        set_faults("")
        settle(off, length, 0, "after the failed %s" % what)
        health(what)

if case == "read-EIO":
    set_faults("read EIO\n")
    expect_errno("read of allocated data", errno.EIO, lambda: h.pread(65536, MiB))
    alive("the failed read")
    set_faults("")
    verify(MiB, 65536, "the same read once the fault is gone")
    health("the failed read")
elif case == "write-EIO":
    write_cases(errno.EIO)
elif case == "write-ENOSPC":
    write_cases(errno.ENOSPC)
elif case == "sync-EIO":
    sync_cases(errno.EIO)
elif case == "sync-ENOSPC":
    sync_cases(errno.ENOSPC)
elif case == "punch-EIO":
    punch_cases()
elif case == "zero-EIO":
    zero_cases()
else:
    fail("unknown case")

set_faults("")
h.flush()
h.shutdown()
with open(os.path.join(outdir, "expected.raw"), "wb") as f:
    f.write(ref)
with open(os.path.join(outdir, "punch-logged"), "w") as f:
    f.write("".join(w + "\n" for w in punch_logged))
EOF

# compare.py RAW EXPECTED: after the server stopped, the image holds what
# the client last saw (everything was flushed successfully at the end).
cat >"$DIR/compare.py" <<'EOF'
import sys
got, want = (open(p, "rb").read() for p in sys.argv[1:3])
if len(got) != len(want):
    sys.exit("image is %d bytes, expected %d" % (len(got), len(want)))
if got != want:
    i = next(i for i in range(len(got)) if got[i] != want[i])
    sys.exit("byte 0x%x is 0x%02x after the restart, the client saw 0x%02x"
             % (i, got[i], want[i]))
EOF

# check_image IMG CASE: no corruption; leaks allowed but reported.
check_image() {
    local out rc=0
    out=$(qemu-img check "$1" 2>&1) || rc=$?
    case $rc in
        0) echo "ok: $2: qemu-img check clean" ;;
        3) echo "ok: $2: qemu-img check: no corruption, leaks:" \
               "$(echo "$out" | grep -E 'leaked clusters' | head -1)" ;;
        *) echo "$out" >&2; fail "$2: qemu-img check found corruption (exit $rc)" ;;
    esac
}

base=$DIR/base.qcow2
qemu-img create -q -f qcow2 -o cluster_size=64k "$base" 64M
# Allocated data with a pattern in the first 8 MiB; the rest unallocated.
qemu-io -f qcow2 -c 'write -P 0xa1 0 8M' "$base" >/dev/null


fault_case() {
    local case=$1 img=$DIR/$1.qcow2 log=$DIR/$1.log pid out=$DIR/$1.d
    mkdir -p "$out"
    cp "$base" "$img"
    : >"$FAULTS"
    start_server "$SOCK" "$log" file="$img"
    pid=$LAST_SERVER_PID
    grep -q 'test hooks are on' "$log" || fail "$case: the engine did not see QCOW2RECLAIM_FAULTS"
    if ! timeout 120 "$PYTHON" "$DIR/client.py" "$SOCK" "$pid" "$FAULTS" "$case" "$out"; then
        stop_server "$pid"
        grep -v ': debug: ' "$log" | tail -20 >&2 || true
        fail "$case: client checks failed"
    fi
    kill -0 "$pid" 2>/dev/null || { tail -20 "$log" >&2; fail "$case: the server died"; }
    : >"$FAULTS"
    stop_server "$pid"
    if [ -s "$out/punch-logged" ] &&
        ! grep -F -- "$img" "$log" | grep -q 'cannot punch host range'; then
        fail "$case: a trim succeeded although punching failed, and the log does not say so"
    fi
    check_image "$img" "$case"
    qemu-img convert -f qcow2 -O raw "$img" "$out/image.raw"
    "$PYTHON" "$DIR/compare.py" "$out/image.raw" "$out/expected.raw" ||
        fail "$case: data lost after the restart"
    echo "PASS: $case"
    rm -rf "$out" "$img"
}

for c in read-EIO write-EIO write-ENOSPC sync-EIO sync-ENOSPC punch-EIO zero-EIO; do
    run_case fault_case "$c"
done

# --- a host filesystem that cannot punch holes ----------------------------
no_punch() {
    local img=$DIR/nopunch.qcow2 log=$DIR/nopunch.log pid before after n
    qemu-img create -q -f qcow2 -o cluster_size=64k "$img" 256M
    echo "punch EOPNOTSUPP" >"$FAULTS"
    start_server "$SOCK" "$log" file="$img"
    pid=$LAST_SERVER_PID
    cat >"$DIR/nopunch.py" <<'EOF'
import os, sys
import nbd
sock, img = sys.argv[1:3]
MiB = 1 << 20
h = nbd.NBD()
h.connect_unix(sock)
for off in range(0, 32 * MiB, MiB):
    h.pwrite(b"\x5a" * MiB, off)
# One cluster behind the data, so that freeing the data cannot simply
# shorten the file: only reuse keeps it from growing.
h.pwrite(b"\x5b" * 65536, 200 * MiB)
h.flush()
before = os.stat(img).st_size
h.trim(32 * MiB, 0)
h.flush()
for off in range(64 * MiB, 96 * MiB, MiB):
    h.pwrite(b"\x5c" * MiB, off)
h.flush()
after = os.stat(img).st_size
if h.pread(MiB, 0) != bytes(MiB):
    sys.exit("the trimmed range does not read as zeros")
if h.pread(MiB, 95 * MiB) != b"\x5c" * MiB:
    sys.exit("data written into reused clusters does not read back")
h.shutdown()
print(before, after)
EOF
    read -r before after < <(timeout 120 "$PYTHON" "$DIR/nopunch.py" "$SOCK" "$img") ||
        { tail -20 "$log" >&2; fail "no punch: client failed"; }
    kill -0 "$pid" 2>/dev/null || { tail -20 "$log" >&2; fail "no punch: the server died"; }
    : >"$FAULTS"
    stop_server "$pid"
    echo "no punch: file size $before before the trim, $after after writing 32 MiB elsewhere"
    # A few clusters of slack: an L2 table or refcount block may move.
    [ "$after" -le $((before + 4 * 65536)) ] ||
        fail "no punch: the file grew by $((after - before)) bytes: freed clusters were not reused"
    n=$(grep -c 'cannot punch holes' "$log" || true)
    [ "$n" -eq 1 ] || { grep 'punch' "$log" | head >&2; fail "no punch: $n log lines say holes cannot be punched, expected exactly 1"; }
    check_clean "$img"
    echo "PASS: no punch: freed clusters reused, told once, check clean"
}
run_case no_punch

# --- io_uring writes the kernel never starts --------------------------------
# The test hook queues each metadata batch behind a read of an empty pipe,
# as a stuck kernel would hold it.  The flush must still finish (the
# unstarted writes are taken back after 2 s and written with plain calls),
# say so in the log, and leave the data and the image intact.
ring_stall() {
    local img=$DIR/stall.qcow2 log=$DIR/stall.log pid t0 t1
    qemu-img create -q -f qcow2 "$img" 1G
    # The fault hooks turn io_uring off; this case needs it on.
    unset QCOW2RECLAIM_FAULTS
    QCOW2RECLAIM_RING_STALL=1 start_server "$SOCK" "$log" file="$img"
    pid=$LAST_SERVER_PID
    export QCOW2RECLAIM_FAULTS=$FAULTS
    t0=$(date +%s%N)
    timeout $((60 * SLOW)) "$PYTHON" -m nbd -u "nbd+unix:///?socket=$SOCK" -c '
for i in range(8):
    h.pwrite(bytes([0x40 + i]) * 65536, i * (128 << 20))
h.flush()
for i in range(8):
    assert h.pread(65536, i * (128 << 20)) == bytes([0x40 + i]) * 65536
' || { tail -20 "$log" >&2; fail "ring stall: the client failed"; }
    t1=$(date +%s%N)
    kill -0 "$pid" 2>/dev/null || { tail -20 "$log" >&2; fail "ring stall: the server died"; }
    stop_server "$pid"
    echo "ring stall: writes and flush took $(( (t1 - t0) / 1000000 )) ms"
    grep -q 'io_uring had not started .* plain system calls' "$log" ||
        { tail -20 "$log" >&2; fail "ring stall: no notice that stalled writes were taken back"; }
    check_clean "$img"
    for i in 0 1 2 3 4 5 6 7; do
        qemu-io -f qcow2 -r -c "read -q -P $((0x40 + i)) $((i * 128))M 64k" "$img" |
            grep -q 'Pattern verification failed' && fail "ring stall: data at $((i * 128)) MiB lost"
    done
    echo "PASS: ring stall: unstarted writes taken back and done, data and image intact"
}
run_case ring_stall

[ "$FAILED" -eq 0 ] || fail "$FAILED case(s) failed"
