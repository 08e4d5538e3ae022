#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# What the plugin says while it serves must reach nbdkit's log in nbdkit's
# default mode, in the background (no -f): there stderr is /dev/null and
# nbdkit's own messages go to syslog.  The notice that snapshots keep the
# space of a trim, and the reclaim totals logged at exit, must be in
# syslog then.
#
# The test's syslog is a datagram socket of its own: nbdkit runs in a
# mount namespace where /dev is a folder holding that socket as /dev/log
# (and the device nodes nbdkit opens), so nothing of the host's logging
# is touched.
set -eu
: "${srcdir:=$(cd "$(dirname "$0")" && pwd)}"
. "$srcdir/functions.sh"

requires nbdkit --version
requires qemu-img --version
requires qemu-io --version
requires "$PYTHON" -c 'import nbd'
requires unshare --mount --propagation private true

img=$TMP/disk.qcow2
qemu-img create -q -f qcow2 "$img" 16M
qemu-io -f qcow2 -c 'write -P 0x11 0 1M' "$img" >/dev/null
qemu-img snapshot -c S "$img"

# /dev for the namespace: the nodes nbdkit and the C library open, and the
# socket the test reads as syslog.
dev=$TMP/dev
mkdir "$dev"
for n in null zero full random urandom; do cp -a "/dev/$n" "$dev/$n"; done
syslog=$TMP/syslog.txt
: >"$syslog"
"$PYTHON" - "$dev/log" "$syslog" <<'EOF' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
with open(sys.argv[2], "ab", buffering=0) as f:
    while True:
        f.write(s.recv(65536) + b"\n")
EOF
track_pid $!
for i in $(seq 1 100); do [ -S "$dev/log" ] && break; sleep 0.05; done
[ -S "$dev/log" ] || fail "the syslog socket was not created"

sock=$TMP/nbd.sock pidfile=$TMP/nbdkit.pid err=$TMP/nbdkit.err
# The daemon is not this shell's child: the cleanup stops it by the pid it
# wrote, if that pid is still an nbdkit.
stop_daemon() {
    local pid
    pid=$(cat "$pidfile" 2>/dev/null) || return 0
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$SERVER_COMM" ] || return 0
    kill "$pid" 2>/dev/null || true
}
cleanup_fn stop_daemon

# Without -f the first nbdkit exits once its child serves.
unshare --mount --propagation private -- \
    sh -c 'mount --bind "$1" /dev && shift && exec "$@"' sh "$dev" \
    nbdkit -U "$sock" -P "$pidfile" "$PLUGIN" file="$img" compact=off 2>"$err" ||
    { cat "$err" >&2; fail "nbdkit did not start in the background"; }
for i in $(seq 1 $((100 * SLOW))); do [ -s "$pidfile" ] && break; sleep 0.05; done
pid=$(cat "$pidfile") || fail "nbdkit wrote no pid file"

# The cluster at 0 is shared with the snapshot: trimming it frees nothing.
"$PYTHON" -m nbd -u "nbd+unix:///?socket=$sock" -c 'h.trim(65536, 0); h.flush()'

kill "$pid"
for i in $(seq 1 $((STOP_TIMEOUT * SLOW * 20))); do
    [ -d "/proc/$pid" ] || break
    sleep 0.05
done
[ ! -d "/proc/$pid" ] || fail "nbdkit $pid did not exit after SIGTERM"

for phrase in "internal snapshots share some of the discarded clusters" \
              "$img: reclaim totals: bytes_punched="; do
    grep -qF -- "$phrase" "$syslog" || {
        echo "syslog:" >&2; cat "$syslog" >&2
        fail "nothing in syslog says \"$phrase\""
    }
    echo "ok: in syslog: $(grep -oF -m1 -- "$phrase" "$syslog")"
done
