#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# L1 and L2 entries that point outside the file or at metadata: the only
# safe answer is EIO for the requests that touch them, a log line naming the
# image and the bad offset so an administrator can find it, and business as
# usual everywhere else.  Above all, a write must never land on the bad
# offset: in place on metadata it would destroy the image, past the end it
# would grow the file with garbage.
set -eu
: "${srcdir:=$(cd "$(dirname "$0")" && pwd)}"
. "$srcdir/functions.sh"

requires nbdkit --version
requires qemu-img --version
requires qemu-io --version
requires "$PYTHON" -c 'import nbd'

PATCH=$srcdir/qcow2_patch.py
# The plugin may print the canonical path; make ours canonical to match.
DIR=$(realpath "$TMP")
COPIED=0x8000000000000000
FAR=0x7fff0000          # cluster aligned, far beyond any image built here

# One client session per server: the bad range must fail with EIO (reads,
# and writes when read-write), the good range must keep returning its data
# before and after the failures.
cat >"$DIR/client.py" <<'EOF'
import errno, sys
import nbd

sock, mode = sys.argv[1], sys.argv[2]
bad_off, bad_len, good_off, good_len, good_byte = (int(x, 0) for x in sys.argv[3:8])

h = nbd.NBD()
h.connect_unix(sock)

def check_good(when):
    data = h.pread(good_len, good_off)
    if data != bytes([good_byte]) * good_len:
        sys.exit("read of the unaffected range at 0x%x returned wrong data %s"
                 % (good_off, when))

def expect_eio(what, fn):
    try:
        fn()
    except nbd.Error as e:
        # libnbd's Error.errno is the symbolic name; errnum is the number.
        if e.errnum != errno.EIO:
            sys.exit("%s failed with %s, expected EIO" % (what, e.string))
        return
    sys.exit("%s succeeded, expected EIO" % what)

check_good("before the bad read")
expect_eio("read at 0x%x" % bad_off, lambda: h.pread(bad_len, bad_off))
check_good("after the bad read")
if mode == "rw":
    expect_eio("write at 0x%x" % bad_off,
               lambda: h.pwrite(b"\x99" * bad_len, bad_off))
    check_good("after the bad write")
h.shutdown()
EOF

hex() { printf '0x%x' "$1"; }


# size_and_cluster FILE OFFSET CLUSTER-SIZE: the file size and a checksum of
# the cluster at OFFSET (of nothing, when OFFSET is past the end).
size_and_cluster() {
    echo "size $(stat -c %s "$1") cluster $(dd if="$1" bs="$3" skip=$(($2 / $3)) count=1 status=none |
        md5sum | cut -c1-32)"
}

# check_case DESCRIPTION IMAGE BAD-HOST-OFFSET GUEST-BAD GUEST-GOOD GOOD-BYTE
# IMAGE is already patched; serve a fresh copy of it once read-only and once
# read-write.
check_case() {
    local desc=$1 img=$2 bad=$3 guest_bad=$4 guest_good=$5 good_byte=$6
    local mode copy sock=$DIR/s log pid bad_hex csize before after
    bad_hex=$(hex "$bad")
    csize=$("$PYTHON" "$PATCH" header "$img" cluster_size)
    for mode in ro rw; do
        copy=$DIR/serve-$mode.qcow2
        log=$DIR/log-$mode
        cp "$img" "$copy"
        # What must not change: the whole file read-only; the size and the
        # cluster at the bad offset read-write (the header may legitimately
        # gain the corrupt bit, as QEMU does).
        if [ "$mode" = ro ]; then
            before=$(md5sum <"$copy")
            start_server "$sock" "$log" file="$copy" readonly=true
        else
            before=$(size_and_cluster "$copy" "$bad" "$csize")
            start_server "$sock" "$log" file="$copy"
        fi
        pid=$LAST_SERVER_PID
        if ! timeout 20 "$PYTHON" "$DIR/client.py" "$sock" "$mode" \
            "$guest_bad" 65536 "$guest_good" 1048576 "$good_byte"; then
            stop_server "$pid"
            grep -v ': debug: ' "$log" >&2 || true
            fail "$desc ($mode): client checks failed"
        fi
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; fail "$desc ($mode): the server died"; }
        # One message must name both, or an administrator with several
        # images cannot tell which one is damaged where.
        if ! grep -F -- "$copy" "$log" | grep -qE -- "$bad_hex([^0-9a-fA-F]|\$)"; then
            stop_server "$pid"
            grep -v ': debug: ' "$log" >&2 || true
            fail "$desc ($mode): no log line names both $copy and $bad_hex"
        fi
        stop_server "$pid"
        if [ "$mode" = ro ]; then
            after=$(md5sum <"$copy")
            [ "$after" = "$before" ] || fail "$desc (ro): the image was modified"
        else
            after=$(size_and_cluster "$copy" "$bad" "$csize")
            [ "$after" = "$before" ] ||
                fail "$desc (rw): file size or the cluster at $bad_hex changed ($before -> $after)"
        fi
    done
    echo "ok: $desc: EIO at guest $(hex "$guest_bad"), $bad_hex logged, rest readable (ro and rw)"
}

# --- L2 entries: a 16 MiB image has a single L2 table ------------------------
small=$DIR/small.qcow2
qemu-img create -q -f qcow2 -o cluster_size=64k "$small" 16M
qemu-io -c 'write -P 0x11 0 1M' -c 'write -P 0x22 8M 1M' "$small" >/dev/null
rt_off=$("$PYTHON" "$PATCH" header "$small" refcount_table_offset)
l1_off=$("$PYTHON" "$PATCH" header "$small" l1_table_offset)
rb_off=$(( $("$PYTHON" "$PATCH" refcount-table "$small" 0) & 0xfffffffffffffe00 ))
l2_off=$(( $("$PYTHON" "$PATCH" l1 "$small" 0) & 0x00fffffffffffe00 ))
[ "$(stat -c %s "$small")" -lt $((FAR)) ] || fail "test image unexpectedly large"

# The COPIED bit says "refcount 1, write in place": exactly the entry a
# careless write path would trust.
l2_case() {
    local desc=$1 target=$2 img=$DIR/l2-patched.qcow2
    cp "$small" "$img"
    "$PYTHON" "$PATCH" l2 "$img" 0 "$(hex $((COPIED | target)))" >/dev/null
    check_case "$desc" "$img" "$target" 0 0x800000 0x22
}
run_case l2_case "L2 entry beyond the end of the file" $((FAR))
run_case l2_case "L2 entry at the L1 table" "$l1_off"
run_case l2_case "L2 entry at the refcount table" "$rt_off"
run_case l2_case "L2 entry at its own L2 table" "$l2_off"
run_case l2_case "L2 entry at a refcount block" "$rb_off"

# --- L1 entries: 1 GiB gives two L2 tables, so the data at 512M sits behind
# a different L1 entry than the damaged one ---------------------------------
big=$DIR/big.qcow2
qemu-img create -q -f qcow2 -o cluster_size=64k "$big" 1G
qemu-io -c 'write -P 0x11 0 1M' -c 'write -P 0x22 512M 1M' "$big" >/dev/null
big_rt=$("$PYTHON" "$PATCH" header "$big" refcount_table_offset)
big_l1=$("$PYTHON" "$PATCH" header "$big" l1_table_offset)
big_rb=$(( $("$PYTHON" "$PATCH" refcount-table "$big" 0) & 0xfffffffffffffe00 ))
[ "$("$PYTHON" "$PATCH" header "$big" l1_size)" -ge 2 ] || fail "test image has a single L1 entry"

l1_case() {
    local desc=$1 target=$2 img=$DIR/l1-patched.qcow2
    cp "$big" "$img"
    "$PYTHON" "$PATCH" l1 "$img" 0 "$(hex $((COPIED | target)))" >/dev/null
    check_case "$desc" "$img" "$target" 0 0x20000000 0x22
}
run_case l1_case "L1 entry beyond the end of the file" $((FAR))
run_case l1_case "L1 entry at the refcount table" "$big_rt"
run_case l1_case "L1 entry at its own L1 table" "$big_l1"
run_case l1_case "L1 entry at a refcount block" "$big_rb"

[ "$FAILED" -eq 0 ] || fail "$FAILED case(s) failed"
