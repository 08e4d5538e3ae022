#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# detect-zeroes: all-zero writes become write-zeroes (on) or free their
# clusters (unmap); off writes them as data.
. "$srcdir/functions.sh"
requires qemu-img --version

# case MODE: write 2 MiB of data, then zeros over its first MiB; print how
# qemu-img map classifies the first MiB afterwards.
case_map() {
    local mode=$1 img=$TMP/dz-$1.qcow2 sock=$TMP/dz-$1.sock
    qemu-img create -q -f qcow2 "$img" 64M
    start_server "$sock" "$TMP/dz-$mode.log" file="$img" detect-zeroes="$mode"
    "$PYTHON" - "$sock" <<'PY'
import sys, nbd
h = nbd.NBD(); h.connect_unix(sys.argv[1])
h.pwrite(b"\x5a" * (2 << 20), 0)
h.pwrite(bytes(1 << 20), 0)
assert h.pread(1 << 20, 0) == bytes(1 << 20), "zeros did not read back"
assert h.pread(1 << 20, 1 << 20) == b"\x5a" * (1 << 20), "data lost"
h.flush(); h.shutdown()
PY
    stop_server "$LAST_SERVER_PID"
    check_clean "$img"
    qemu-img map --output=json "$img" | "$PYTHON" -c '
import json, sys
first = [e for e in json.load(sys.stdin) if e["start"] == 0][0]
print("data" if first["data"] else ("zero-alloc" if "offset" in first else "zero"))'
}

got=$(case_map off);   [ "$got" = data ] || fail "detect-zeroes=off: first MiB is $got, want data"
echo "ok: detect-zeroes=off writes zeros as data"
got=$(case_map on);    [ "$got" = zero-alloc ] || fail "detect-zeroes=on: first MiB is $got, want zero clusters that keep their allocation"
echo "ok: detect-zeroes=on turns zero writes into zero clusters"
got=$(case_map unmap); [ "$got" = zero ] || fail "detect-zeroes=unmap: first MiB is $got, want unallocated zeros"
echo "ok: detect-zeroes=unmap frees the clusters"
