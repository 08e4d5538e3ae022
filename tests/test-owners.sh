#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# One writer per image, as with QEMU: two programs writing one qcow2 file
# each keep their own refcounts and allocation state, and the image is lost
# within seconds.  We take QEMU's OFD byte-range locks (DESIGN.md), so the
# protection works in both directions and the refusal names the lock, which
# is what a user searches for.  Readers may share an image, as long as
# nobody writes it.
set -eu
: "${srcdir:=$(cd "$(dirname "$0")" && pwd)}"
. "$srcdir/functions.sh"

requires nbdkit --version
requires qemu-img --version
requires qemu-nbd --version
requires nbdinfo --version

DIR=$(realpath "$TMP")
IMG=$DIR/disk.qcow2
qemu-img create -q -f qcow2 "$IMG" 64M
qemu-io -f qcow2 -c 'write -P 0x5a 0 1M' "$IMG" >/dev/null

# must_refuse DESCRIPTION COMMAND...: COMMAND exits non-zero, and says why
# in terms of a lock.  timeout: a program that wrongly gets the image would
# serve it forever instead of exiting.
must_refuse() {
    local desc=$1 out rc=0; shift
    out=$(timeout 20 "$@" 2>&1) || rc=$?
    [ "$rc" -ne 124 ] || fail "$desc: it opened the image (still running after 20 s)"
    [ "$rc" -ne 0 ] || { echo "$out" >&2; fail "$desc: it succeeded"; }
    echo "$out" | grep -qi 'lock' ||
        { echo "$out" >&2; fail "$desc: failed (exit $rc) without mentioning the lock"; }
    echo "ok: $desc: refused: $(echo "$out" | grep -i -m1 'lock')"
}

# nbdkit --run: the image is opened before the command runs, so a refusal
# ends nbdkit with the message, and a success ends it at once too.
# (An array, not a function: timeout runs programs only.)
# shellcheck disable=SC2016
PLUGIN_RUN=(nbdkit -U - "$PLUGIN" --run 'nbdinfo --size "$uri"')

# --- the plugin writes: nobody else may open the image -------------------------
start_server "$DIR/s1" "$DIR/s1.log" file="$IMG"
writer=$LAST_SERVER_PID
must_refuse "qemu-img check while the plugin writes" qemu-img check "$IMG"
must_refuse "qemu-img info while the plugin writes" qemu-img info "$IMG"
must_refuse "qemu-nbd while the plugin writes" qemu-nbd -k "$DIR/s2" -f qcow2 "$IMG"
must_refuse "a second plugin instance while the plugin writes" "${PLUGIN_RUN[@]}" file="$IMG"
must_refuse "a readonly plugin instance while the plugin writes" "${PLUGIN_RUN[@]}" file="$IMG" readonly=true
# The escape hatch QEMU documents must still work: -U shares everything.
qemu-img info -U "$IMG" >/dev/null || fail "qemu-img info -U failed while the plugin writes"
echo "ok: qemu-img info -U (force share) still works"
kill -0 "$writer" 2>/dev/null || fail "the serving plugin died"
nbdinfo --size "nbd+unix:///?socket=$DIR/s1" >/dev/null || fail "the serving plugin stopped answering"
stop_server "$writer"
check_clean "$IMG"
echo "ok: qemu-img check works again after the server stopped"

# --- qemu-nbd writes: the plugin refuses, even read-only -------------------
# A format driver never shares "write" of its file: a reader would see
# half-updated tables, so read-only must be refused too.
rm -f "$DIR/q.sock"
qemu-nbd -t -k "$DIR/q.sock" -f qcow2 "$IMG" 2>"$DIR/qemu-nbd.log" &
qnbd=$!
track_pid "$qnbd"
for _ in $(seq 1 200); do
    [ -S "$DIR/q.sock" ] && break
    kill -0 "$qnbd" 2>/dev/null || { cat "$DIR/qemu-nbd.log" >&2; fail "qemu-nbd did not start"; }
    sleep 0.05
done
[ -S "$DIR/q.sock" ] || fail "qemu-nbd did not create its socket"
must_refuse "the plugin while qemu-nbd writes" "${PLUGIN_RUN[@]}" file="$IMG"
must_refuse "the plugin readonly=true while qemu-nbd writes" "${PLUGIN_RUN[@]}" file="$IMG" readonly=true
stop_server "$qnbd"
check_clean "$IMG"

# --- two readers at once -------------------------------------------------------
start_server "$DIR/r1" "$DIR/r1.log" file="$IMG" readonly=true
r1=$LAST_SERVER_PID
start_server "$DIR/r2" "$DIR/r2.log" file="$IMG" readonly=true
r2=$LAST_SERVER_PID
for s in r1 r2; do
    "$PYTHON" - "$DIR/$s" <<'EOF' || fail "reading through the second reader failed"
import sys
import nbd
h = nbd.NBD()
h.connect_unix(sys.argv[1])
if h.pread(1 << 20, 0) != b"\x5a" * (1 << 20):
    sys.exit("%s: wrong data" % sys.argv[1])
if not h.is_read_only():
    sys.exit("%s: a readonly=true server offers writes" % sys.argv[1])
h.shutdown()
EOF
done
echo "ok: two readonly=true plugin instances serve the image at once"
# Readers still keep writers out.
must_refuse "a writing plugin while two readers serve" "${PLUGIN_RUN[@]}" file="$IMG"
stop_server "$r1"
stop_server "$r2"
check_clean "$IMG"
echo "ok: qemu-img check works after the readers stopped"
