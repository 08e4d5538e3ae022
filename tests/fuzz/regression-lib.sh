# SPDX-License-Identifier: BSD-3-Clause
# Sourced by the reproducer scripts in regressions/: paths, a scratch folder
# removed at exit, and a plugin server on a Unix socket.
#
#   . "$(dirname "$0")/../regression-lib.sh" NAME
#
# Sets top, PLUGIN and PYTHON (from the environment if given), PATCH
# (qcow2_patch.py, run as "$PYTHON" "$PATCH"), tmp (the scratch folder) and
# SOCK.
set -eu
# The python3 with libnbd's nbd module (see tests/functions.sh).
: "${PYTHON:=/usr/bin/python3}"
export PYTHON
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PLUGIN=${PLUGIN:-$top/plugin/.libs/nbdkit-qcow2reclaim-plugin.so}
PATCH=$top/tests/qcow2_patch.py
tmp=$(mktemp -d "${TMPDIR:-/tmp}/q2r-$1.XXXXXX")
SOCK=$tmp/s
pid=
trap '[ -z "$pid" ] || kill "$pid" 2>/dev/null; rm -rf "$tmp"' EXIT

# serve IMAGE LOG: the plugin serving IMAGE on SOCK, log in LOG.  Returns 1
# if it refused the image (the reason is in LOG).
serve() {
    rm -f "$SOCK"
    nbdkit -f -U "$SOCK" "$PLUGIN" file="$1" 2>"$2" &
    pid=$!
    for _ in $(seq 1 100); do
        [ -S "$SOCK" ] && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    [ -S "$SOCK" ]
}

# stop: ask the server to finish (it writes back metadata on exit).
stop() {
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=
}
