# SPDX-License-Identifier: BSD-3-Clause
# Sourced by functions.sh when VALGRIND is set (make check-valgrind): every
# nbdkit and every qcow2reclaim tool a test starts runs under memcheck, and
# the test fails if any of them reported an error or leaked.  The server
# lives for months on end, so a leak per request is an outage in waiting.
requires valgrind --version

VG_LOGS=$TMP/valgrind
VG_BIN=$TMP/vgbin
mkdir -p "$VG_LOGS" "$VG_BIN"
real_nbdkit=$(command -v nbdkit) || skip "nbdkit is not installed"

# nbdkit unloads the plugin before valgrind looks for leaks: keep its debug
# information so a leak names our function, not "???".  A child that nbdkit
# forks for --run is not our code until it execs, and then is not ours.
VG_CMD="valgrind --quiet --leak-check=full \
--show-leak-kinds=definite,indirect,possible \
--errors-for-leak-kinds=definite,indirect,possible \
--keep-debuginfo=yes --child-silent-after-fork=yes --error-exitcode=99 \
--suppressions=$srcdir/valgrind.supp --log-file=$VG_LOGS/%p.log"

for prog in nbdkit:"$real_nbdkit" qcow2reclaim:"$TOOL"; do
    printf '#!/bin/sh\nexec %s "%s" "$@"\n' "$VG_CMD" "${prog#*:}" >"$VG_BIN/${prog%%:*}"
    chmod +x "$VG_BIN/${prog%%:*}"
done
export PATH=$VG_BIN:$PATH
TOOL=$VG_BIN/qcow2reclaim
SLOW=10
SERVER_COMM=memcheck-amd64-

# valgrind_verdict: print every non-empty log; false if there was one.
valgrind_verdict() {
    local f n=0 bad=0
    for f in "$VG_LOGS"/*.log; do
        [ -e "$f" ] || continue
        n=$((n + 1))
        [ -s "$f" ] || continue
        echo "valgrind: process ${f##*/} reported:" >&2
        cat "$f" >&2
        bad=1
    done
    echo "valgrind: $n processes checked, $([ $bad = 0 ] && echo clean || echo NOT clean)"
    return $bad
}
