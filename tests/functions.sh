# SPDX-License-Identifier: BSD-3-Clause
# Shared by the shell tests: temporary directory, cleanup at exit, server
# start/stop, skips.
# Source it with: . "$srcdir/functions.sh"
set -eu
: "${PLUGIN:?PLUGIN must name the built plugin (run the tests through make check)}"
# The python3 with libnbd's nbd module, found by configure; run by hand, the
# one Debian's python3-libnbd is for.  Every python the tests run is this
# one: nbdsh too, as "$PYTHON -m nbd" (nbdsh itself runs the first python3
# on PATH, which may have no nbd module).
: "${PYTHON:=/usr/bin/python3}"
export PYTHON

TMP=$(mktemp -d "${TMPDIR:-/tmp}/q2r-test.XXXXXX")
SERVER_PIDS=
TOOL=$top_builddir/tools/qcow2reclaim
# Waits for a server or a client scale with this: 1, or 10 under valgrind.
SLOW=1
# A server has STOP_TIMEOUT seconds (times SLOW) to exit after SIGTERM:
# nbdkit writes back its metadata first, which takes well under a second
# here, or seconds under valgrind.  Waiting longer would only turn a server
# that hangs on exit into a test that hangs.
STOP_TIMEOUT=${STOP_TIMEOUT:-30}
# The name the kernel gives a running server (/proc/PID/comm).
SERVER_COMM=nbdkit

# ---- cleanup at exit ----------------------------------------------------------
# cleanup_fn CMD ARGS...: run CMD ARGS... when the test exits, whichever way
# it exits (pass, fail, skip, signal).  The last one registered runs first,
# so a teardown undoes what was set up after it.  A hook must not exit; one
# that fails is reported and the others still run.  After the hooks, one
# EXIT trap stops the servers still running, takes valgrind's verdict and
# removes $TMP, and the test keeps its own exit status (or fails, when
# valgrind found something in a test that had passed).
#
# ( ... ) and $( ... ) run in a subshell, which does not run the test's EXIT
# trap, and the test cannot see what a subshell registers or starts: a
# subshell that does either gets an EXIT trap of its own, for those alone
# (no valgrind verdict, no rm -rf $TMP: they belong to the test).
_CLEANUP_HOOKS=()
_CLEANUP_SHELL=$BASHPID
_CLEANUP_SUBSHELL=
_cleanup_traps() {
    trap _cleanup_at_exit EXIT
    # A signal ends the test through the EXIT trap, with the usual status.
    trap 'exit 129' HUP
    trap 'exit 130' INT
    trap 'exit 143' TERM
}
_cleanup_in_this_shell() {
    [ "$BASHPID" != "$_CLEANUP_SHELL" ] || return 0
    _CLEANUP_SHELL=$BASHPID
    _CLEANUP_SUBSHELL=1
    _CLEANUP_HOOKS=()
    SERVER_PIDS=
    _cleanup_traps
}
cleanup_fn() {
    local cmd
    _cleanup_in_this_shell
    printf -v cmd '%q ' "$@"
    _CLEANUP_HOOKS+=("$cmd")
}
_cleanup_at_exit() {
    local rc=$? i p leaky= ours=
    set +e
    trap '' HUP INT TERM
    for ((i = ${#_CLEANUP_HOOKS[@]} - 1; i >= 0; i--)); do
        eval "${_CLEANUP_HOOKS[i]}" ||
            echo "cleanup: '${_CLEANUP_HOOKS[i]% }' failed (exit $?)" >&2
    done
    # Only servers that are still this shell's children: a pid the test
    # ended without forget_server may already belong to someone else.
    for p in $SERVER_PIDS; do ! _our_child "$p" || ours="$ours $p"; done
    if [ -n "$ours" ]; then
        _terminate $((STOP_TIMEOUT * SLOW)) $ours
        if [ -n "$_LATE" ]; then
            echo "FAIL: server(s)$_LATE did not exit within $((STOP_TIMEOUT * SLOW)) s after SIGTERM at exit (sent SIGKILL)${_STUCK:+;$_STUCK still running}" >&2
            [ "$rc" -ne 0 ] || rc=1
        fi
        _reap $ours
    fi
    if [ -z "$_CLEANUP_SUBSHELL" ]; then
        [ -z "${VALGRIND:-}" ] || valgrind_verdict || leaky=1
        rm -rf "$TMP"
    fi
    [ -z "$leaky" ] || rc=1
    exit "$rc"
}
_cleanup_traps

# A test that cannot run here says why and exits with automake's skip code.
skip() { echo "SKIP: $*"; exit 77; }
# requires CMD ARGS...: run CMD ARGS... (no input, output thrown away) and
# skip the test unless it succeeds: what a test needs must be there and
# work, e.g. requires qemu-img --version, requires "$PYTHON" -c 'import nbd'.
# Under valgrind it runs without memcheck, which is for the test's own work.
# log_errors LOG: print the server's error lines (nbdkit errors, failed
# asserts, sanitizer reports) and succeed when there are any.  Notices
# are nbdkit errors too (nbdkit 1.32 has no notice level), "error: notice:",
# and are not errors.
log_errors() {
    grep -E ' error: |Assertion|Sanitizer' "$1" | grep -v ' error: notice: '
}

requires() {
    local rc=0
    ( [ -z "${VG_BIN:-}" ] || PATH=${PATH//"$VG_BIN:"/}; "$@" ) </dev/null >/dev/null 2>&1 || rc=$?
    [ "$rc" -eq 0 ] || skip "requires: '$*' failed (exit $rc): missing or not working"
}
fail() { echo "FAIL: $*" >&2; exit 1; }

# make check-valgrind: the servers and the tool run under memcheck.
[ -z "${VALGRIND:-}" ] || . "$srcdir/valgrind.sh"

# SERVER=qemu-nbd runs some tests against qemu-nbd, to check the harness itself.
[ "${SERVER:-nbdkit}" = qemu-nbd ] || [ -f "$PLUGIN" ] || fail "plugin $PLUGIN is not built"

# ---- stopping processes, with a bound -------------------------------------------
# _running PID: PID is a process that has not exited (a zombie has).  Not
# kill -0, which also succeeds for a zombie.
_running() {
    local s
    { read -r s <"/proc/$1/stat"; } 2>/dev/null || return 1
    s=${s##*) }
    [ "${s%% *}" != Z ]
}
# _our_child PID: PID is a child of this shell, running or not yet reaped.
_our_child() {
    local s
    { read -r s <"/proc/$1/stat"; } 2>/dev/null || return 1
    s=${s##*) }
    s=${s#* }
    [ "${s%% *}" = "$BASHPID" ]
}
# _terminate SECONDS PID...: SIGTERM to each PID, up to SECONDS for all of
# them to exit, then SIGKILL to the rest.  Sets _LATE to the pids that had
# to be killed, and _STUCK to those still there 5 s after SIGKILL (asleep
# in the kernel, on a dead FUSE mount say): nothing here waits for them.
_terminate() {
    local limit=$1 t0=$SECONDS p; shift
    _LATE= _STUCK=
    for p; do kill "$p" 2>/dev/null || true; done
    _left "$@"
    while [ -n "$_LEFT" ] && [ $((SECONDS - t0)) -le "$limit" ]; do
        sleep 0.05
        _left $_LEFT
    done
    _LATE=$_LEFT
    [ -n "$_LATE" ] || return 0
    for p in $_LATE; do kill -KILL "$p" 2>/dev/null || true; done
    t0=$SECONDS
    _left $_LATE
    while [ -n "$_LEFT" ] && [ $((SECONDS - t0)) -le 5 ]; do
        sleep 0.05
        _left $_LEFT
    done
    _STUCK=$_LEFT
}
_left() { local p; _LEFT=; for p; do ! _running "$p" || _LEFT="$_LEFT $p"; done; }
# _reap PID...: collect the exit status of those that have exited.
_reap() { local p; for p; do _running "$p" || wait "$p" 2>/dev/null || true; done; }

# track_pid PID: a server (or what stands for one) started in the background
# by the test itself, to be stopped at exit unless the test stops it first.
track_pid() {
    _cleanup_in_this_shell
    SERVER_PIDS="$SERVER_PIDS $1"
}
# forget_server PID: the test ended this server itself (and reaped it):
# cleanup must not signal the number, which may be reused.
forget_server() {
    local p out=
    for p in $SERVER_PIDS; do [ "$p" = "$1" ] || out="$out $p"; done
    SERVER_PIDS=$out
}

# track_server PID SOCKET LOGFILE NAME: record a server just started in the
# background for cleanup, and wait until its socket exists.
track_server() {
    local pid=$1 sock=$2 log=$3 name=$4 i
    track_pid "$pid"
    LAST_SERVER_PID=$pid
    for i in $(seq 1 $((300 * SLOW))); do
        [ -S "$sock" ] && return 0
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; fail "$name exited before serving"; }
        sleep 0.05
    done
    cat "$log" >&2; fail "$name did not create $sock"
}

# start_server SOCKET LOGFILE PARAMS...: serve with nbdkit on a Unix socket,
# wait until it accepts connections; the pid is recorded for cleanup.
start_server() {
    local sock=$1 log=$2; shift 2
    rm -f "$sock"
    nbdkit -f -v -U "$sock" "$PLUGIN" "$@" >"$log" 2>&1 &
    track_server $! "$sock" "$log" nbdkit
}

# start_qemu_nbd SOCKET LOGFILE IMAGE [OPTIONS...]: the same with qemu-nbd,
# the reference the plugin is compared with; -t keeps it up while clients
# come and go.
start_qemu_nbd() {
    local sock=$1 log=$2 img=$3; shift 3
    rm -f "$sock"
    qemu-nbd -t -f qcow2 -k "$sock" "$@" "$img" >"$log" 2>&1 &
    track_server $! "$sock" "$log" qemu-nbd
}

# stop_server PID: ask a server to finish with SIGTERM (nbdkit writes back
# its metadata on exit) and wait until it has; its exit status is left in
# SERVER_STATUS.  One still running after the bound is killed and fails
# the test: a server that does not stop when told to is a bug.
stop_server() {
    local pid=$1 limit=$((STOP_TIMEOUT * SLOW))
    _terminate "$limit" "$pid"
    forget_server "$pid"
    SERVER_STATUS=
    if [ -z "$_STUCK" ]; then
        wait "$pid" 2>/dev/null && SERVER_STATUS=0 || SERVER_STATUS=$?
    fi
    [ -z "$_LATE" ] ||
        fail "server $pid did not exit within $limit s after SIGTERM (sent SIGKILL${_STUCK:+, and it is still running})"
}

# run_case CMD...: run one case in a subshell, so that a failure is counted
# in FAILED and the remaining cases still run: a report listing every broken
# case is worth more than the first one alone.
FAILED=0
run_case() {
    set +e
    (set -e; "$@")
    local rc=$?
    set -e
    [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
}

# qemu-img check must report no errors and no leaks (exit 0).
check_clean() {
    local out
    out=$(qemu-img check "$1" 2>&1) || { echo "$out" >&2; fail "qemu-img check $1 is not clean"; }
}
