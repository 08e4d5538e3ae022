#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The paths where memory goes astray most easily, again with every nbdkit
# and tool process under valgrind memcheck: refused images, corrupt table
# entries, injected host I/O faults, the reclaim rules, and a quit with a
# client still connected.  An invalid access, a use of uninitialised
# memory or a leak fails the test.
# `make check-valgrind` runs the whole suite this way.
. "$srcdir/functions.sh"
requires valgrind --version

for t in test-refuse.sh test-corrupt-entries.sh test-faults.sh test-reclaim-rules.sh; do
    log=$TMP/${t%.sh}.log
    start=$(date +%s)
    rc=0
    VALGRIND=1 bash "$srcdir/$t" >"$log" 2>&1 || rc=$?
    verdict=$(grep '^valgrind: ' "$log" | tail -1)
    if [ "$rc" -ne 0 ]; then
        grep -v ': debug: ' "$log" | tail -60 >&2
        fail "$t under valgrind: exit $rc"
    fi
    # A run that started no server under valgrind proves nothing.
    case $verdict in
    "valgrind: 0 processes"*|"") fail "$t ran no process under valgrind" ;;
    *", clean") ;;
    *) fail "$t: $verdict" ;;
    esac
    echo "ok: $t under valgrind in $(( $(date +%s) - start )) s: ${verdict#valgrind: }"
done

# A client still connected when nbdkit is told to quit: nbdkit then skips
# .close, so the plugin must free that connection's handle in .unload.
start=$(date +%s)
rc=0
VALGRIND=1 bash -c '
. "$srcdir/functions.sh"
qemu-img create -q -f qcow2 "$TMP/quit.qcow2" 1M
start_server "$TMP/quit.sock" "$TMP/quit.log" file="$TMP/quit.qcow2"
"$PYTHON" -c "
import nbd, os, signal, sys, time
h = nbd.NBD()
h.connect_unix(sys.argv[1])
h.pread(512, 0)
os.kill(int(sys.argv[2]), signal.SIGTERM)
time.sleep(2)
" "$TMP/quit.sock" "$LAST_SERVER_PID"
stop_server "$LAST_SERVER_PID"
' >"$TMP/quit.log" 2>&1 || rc=$?
verdict=$(grep '^valgrind: ' "$TMP/quit.log" | tail -1)
[ "$rc" -eq 0 ] || { grep -v ': debug: ' "$TMP/quit.log" | tail -40 >&2; fail "quit with a client connected: exit $rc"; }
case $verdict in
"valgrind: 1 processes checked, clean") ;;
*) fail "quit with a client connected: ${verdict:-no valgrind verdict}" ;;
esac
echo "ok: quit with a client connected, under valgrind in $(( $(date +%s) - start )) s: ${verdict#valgrind: }"
