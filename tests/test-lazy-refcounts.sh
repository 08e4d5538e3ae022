#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Images with the dirty bit (lazy refcounts not written back): QEMU killed
# while writing a lazy_refcounts image leaves refcounts of 0 under its
# data.  Opening it for writing rebuilds the refcounts, as QEMU does, says
# so with the time it took, and clears the bit; then new writes must not
# land on the old data (they would, with the counts left at 0), and the
# image is clean for qemu-img.  A lazy_refcounts image that was closed
# cleanly is served as any other, and keeps its compat bit.
. "$srcdir/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires "$PYTHON" -c 'import nbd'

img=$TMP/lazy.qcow2
qemu-img create -q -f qcow2 -o lazy_refcounts=on "$img" 64M
(qemu-io -f qcow2 -c 'write -P 5 0 1M' -c 'write -P 6 10M 1M' -c 'sigraise 9' "$img" || true) \
    >/dev/null 2>&1
qemu-img info "$img" | grep -q '^cleanly shut down: no' || fail "qemu-io left no dirty bit"
qemu-img check "$img" >/dev/null 2>&1 && fail "the killed image has no refcount errors to rebuild"

start_server "$TMP/lazy.sock" "$TMP/lazy.log" file="$img"
grep -q 'had the dirty bit set .*refcounts were rebuilt in [0-9.]* s' "$TMP/lazy.log" ||
    { cat "$TMP/lazy.log" >&2; fail "no notice that the refcounts were rebuilt"; }
"$PYTHON" - "$TMP/lazy.sock" <<'PY'
import sys, nbd
h = nbd.NBD(); h.connect_unix(sys.argv[1])
# New clusters: with the counts of the old data left at 0, they would be
# allocated on top of it.
h.pwrite(b"\x07" * (4 << 20), 20 << 20)
h.flush()
for off, b in ((0, 5), (10 << 20, 6), (20 << 20, 7)):
    n = (4 << 20) if b == 7 else (1 << 20)
    if h.pread(n, off) != bytes([b]) * n:
        sys.exit("FAIL: data at %d does not read back after the rebuild" % off)
h.shutdown()
PY
stop_server "$LAST_SERVER_PID"
check_clean "$img"
! qemu-img info "$img" | grep -q '^cleanly shut down' || fail "the dirty bit is still set"
qemu-img info "$img" | grep -q 'lazy refcounts: true' || fail "the lazy_refcounts compat bit was lost"
qemu-io -f qcow2 -c 'read -P 5 0 1M' -c 'read -P 6 10M 1M' -c 'read -P 7 20M 4M' "$img" |
    grep -q -i -e fail -e mismatch && fail "the data does not read back through qemu-io"
echo "ok: the dirty bit: refcounts rebuilt at open, the bit cleared, old and new data intact"

# Cleanly closed, with the compat bit: nothing to rebuild.
qemu-img create -q -f qcow2 -o lazy_refcounts=on "$TMP/clean.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 9 0 1M' "$TMP/clean.qcow2" >/dev/null
start_server "$TMP/clean.sock" "$TMP/clean.log" file="$TMP/clean.qcow2"
"$PYTHON" -m nbd -u "nbd+unix:///?socket=$TMP/clean.sock" -c 'h.pwrite(b"\x0a" * 65536, 1 << 20); h.flush()'
stop_server "$LAST_SERVER_PID"
grep -q 'refcounts were rebuilt' "$TMP/clean.log" && fail "a clean lazy_refcounts image was rebuilt"
check_clean "$TMP/clean.qcow2"
echo "ok: a lazy_refcounts image closed cleanly is served as it is"
