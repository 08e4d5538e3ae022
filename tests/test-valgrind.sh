#!/usr/bin/env bash
# The paths where memory goes astray most easily, again with every nbdkit
# and tool process under valgrind memcheck: refused images, corrupt table
# entries, injected host I/O faults, and the reclaim rules.  An invalid
# access, a use of uninitialised memory or a leak fails the test.
# `make check-valgrind` runs the whole suite this way.
. "$srcdir/functions.sh"
require valgrind

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
