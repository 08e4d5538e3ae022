#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# backing=FILE replaces the backing file the image names; writes copy up
# from the replacement, and the image's own header is left alone.
. "$srcdir/functions.sh"
requires qemu-img --version
requires "$PYTHON" -c 'import nbd'
cd "$TMP"

qemu-img create -q -f qcow2 base1.qcow2 16M
qemu-io -f qcow2 -c 'write -P 0x11 0 1M' base1.qcow2 >/dev/null
qemu-img create -q -f raw base2.raw 16M
qemu-io -f raw -c 'write -P 0x22 0 1M' base2.raw >/dev/null
qemu-img create -q -f qcow2 -b base1.qcow2 -F qcow2 top.qcow2

# read_first SOCK: the first byte the guest sees, and of a partial write's
# copied-up neighbour.
read_first() {
    "$PYTHON" - "$1" <<'PY'
import sys, nbd
h = nbd.NBD(); h.connect_unix(sys.argv[1])
first = h.pread(1, 0)[0]
h.pwrite(b"\x33", 65536)          # copy-up of the rest of this cluster
print("%02x %02x" % (first, h.pread(1, 65537)[0]))
h.flush(); h.shutdown()
PY
}

start_server s1 log1 file="$TMP/top.qcow2"
got=$(read_first "$TMP/s1"); stop_server "$LAST_SERVER_PID"
[ "$got" = "11 11" ] || fail "the image's own backing file: read $got, want 11 11"
echo "ok: the backing file the image names shows through ($got)"

start_server s2 log2 file="$TMP/top.qcow2" backing="$TMP/base2.raw"
got=$(read_first "$TMP/s2"); stop_server "$LAST_SERVER_PID"
[ "$got" = "22 11" ] || fail "backing=base2.raw: read $got, want 22 (override) and 11 (copied up before)"
echo "ok: backing= override shows through ($got)"
check_clean top.qcow2
[ "$(qemu-img info --output=json top.qcow2 | grep -c '"backing-filename": "base1.qcow2"')" -eq 1 ] ||
    fail "the header's backing file name changed"
echo "ok: the header still names base1.qcow2"
