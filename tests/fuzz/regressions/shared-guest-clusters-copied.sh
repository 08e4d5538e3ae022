#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Reproducer: two guest clusters on one host cluster (refcount 2, neither
# entry COPIED).  QEMU never writes this, but qemu-img check finds nothing
# wrong with it.  When a trim or a write takes one guest cluster away, the
# host cluster's count falls to 1, and the other entry must get COPIED
# (DESIGN.md: COPIED equals "refcount is 1"); without it, qemu-img check
# reports "ERROR OFLAG_COPIED data cluster".  The same holds for a normal
# cluster over compressed bytes (the fuzzer found that case first:
# the regression image copied-flag-lost-compressed.qcow2).
#
# Exit 1 while the bug reproduces, 0 once both cases leave a clean image.
. "$(dirname "$0")/../regression-lib.sh" shared

# Guest clusters 0 and 1 (4 KiB) both on guest 0's host cluster.
make_image () {
    qemu-img create -q -f qcow2 -o cluster_size=4096 "$1" 1M
    qemu-io -f qcow2 -c 'write -P 0x11 0 4k' -c 'write -P 0x22 4k 4k' "$1" >/dev/null
    local data0=$(( $("$PYTHON" "$PATCH" l2 "$1" 0) & 0x00fffffffffffe00 ))
    local data1=$(( $("$PYTHON" "$PATCH" l2 "$1" 4096) & 0x00fffffffffffe00 ))
    "$PYTHON" "$PATCH" l2 "$1" 0 "$data0" >/dev/null
    "$PYTHON" "$PATCH" l2 "$1" 4096 "$data0" >/dev/null
    "$PYTHON" "$PATCH" refcount "$1" "$data0" 2 >/dev/null
    "$PYTHON" "$PATCH" refcount "$1" "$data1" 0 >/dev/null
    qemu-img check -q "$1" || { echo "the prepared image is not clean"; exit 2; }
}

# $1: python statements on h (an nbd handle); then the image must be clean.
run_case () {
    local name=$1 ops=$2 img=$tmp/$1.qcow2 rc=0
    make_image "$img"
    serve "$img" "$tmp/$name.log" || { cat "$tmp/$name.log"; exit 2; }
    "$PYTHON" - "$SOCK" <<PY || rc=$?
import sys
import nbd
h = nbd.NBD()
h.connect_unix(sys.argv[1])
$ops
assert h.pread(4096, 0) == b"\x11" * 4096, "guest cluster 0 changed"
h.shutdown()
PY
    stop
    [ "$rc" -eq 0 ] || { echo "$name: the requests failed"; cat "$tmp/$name.log"; exit 2; }
    if ! qemu-img check "$img" >"$tmp/$name.check" 2>&1; then
        echo "REPRODUCED ($name): $(grep -m1 ERROR "$tmp/$name.check")"
        exit 1
    fi
    # The man page promises a notice when such entries are found.
    grep -q 'guest clusters share a host cluster' "$tmp/$name.log" ||
        { echo "$name: no notice about the shared cluster in the log"; exit 1; }
    echo "$name: clean"
}

run_case trim 'h.trim(4096, 4096); h.flush()'
run_case write 'h.pwrite(b"\x33" * 512, 4096); h.flush(); assert h.pread(4096, 4096) == b"\x33" * 512 + b"\x11" * 3584'
