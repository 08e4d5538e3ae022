#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Socket activation, the way systemd/qcow2reclaim@.socket runs us, without
# needing systemd as PID 1: a small Python launcher plays systemd's part.
# It owns the listening Unix socket, waits until a client is queued on it
# (systemd starts the service on the first connection), then execs nbdkit
# with the socket as fd 3 and LISTEN_FDS/LISTEN_PID set.  Exec'ing in place
# keeps the pid, so LISTEN_PID is simply the launcher's own pid.
#
# Then a client writes, trims and flushes through that socket and the host
# file's allocation must drop; the statsfile must show it; SIGTERM must
# write back and exit cleanly; qemu-img check must be clean.
#
# Then the folder template's own command (qcow2reclaim-dir@.service's
# ExecStart, on qcow2reclaim-dir@.socket's path, /run moved under $TMP)
# must list and serve two images and write each one's counters where the
# unit's comments say.
#
# When systemd-analyze is installed, the unit files in systemd/ (both
# templates) are also checked with `systemd-analyze verify` on an
# instantiated copy.
set -eu
srcdir=$(cd "${srcdir:-$(dirname "$0")}" && pwd)
. "$srcdir/functions.sh"

requires qemu-img --version
requires nbdkit --version
requires "$PYTHON" -c 'import nbd'

alloc_of() { echo $(( $(stat -c %b "$1") * 512 )); }
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }

# ---- the unit files ----------------------------------------------------------
units=${top_srcdir:-$srcdir/..}/systemd
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "note: systemd-analyze is not installed; unit files not verified"
elif [ ! -f "$units/qcow2reclaim@.service" ]; then
    echo "note: $units/qcow2reclaim@.service not found; unit files not verified"
else
    # verify wants a concrete instance: the template names it as the real
    # commands do, from an escaped path with a '-' (\x2d) in it.
    mkdir "$TMP/units"
    for t in qcow2reclaim@:/var/lib/images/vm-1.qcow2 qcow2reclaim-dir@:/var/lib/vm-images; do
        unit=${t%%:*}
        inst=$(systemd-escape --path "${t#*:}")
        [ -f "$units/$unit.service" ] || fail "$units/$unit.service is missing"
        cp "$units/$unit.socket" "$TMP/units/$unit$inst.socket"
        cp "$units/$unit.service" "$TMP/units/$unit$inst.service"
        # Warnings (unknown keys, bad specifiers, missing binaries) make it fail.
        out=$(cd "$TMP/units" && systemd-analyze verify --man=no \
                  "./$unit$inst.socket" "./$unit$inst.service" 2>&1) ||
            { echo "$out" >&2; fail "systemd-analyze verify rejects the unit files $unit"; }
        [ -z "$out" ] || { echo "$out" >&2; fail "systemd-analyze verify warns about the unit files $unit"; }
        echo "ok: systemd-analyze verify: $unit$inst.socket and .service, no warnings"
    done
fi

# ---- the launcher --------------------------------------------------------------
cat >"$TMP/activate.py" <<'PY'
import os, select, socket, sys
path, argv = sys.argv[1], sys.argv[2:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
s.listen(16)
# Like systemd: nothing runs until a client is waiting on the socket.
select.select([s], [], [])
# The socket may already be fd 3; dup2 onto itself would leave it close-on-exec.
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
env.pop("LISTEN_FDNAMES", None)
os.execvpe(argv[0], argv, env)
PY

img=$TMP/disk.qcow2
sock=$TMP/activated.sock
stats=$TMP/disk.stats
log=$TMP/nbdkit.log
qemu-img create -q -f qcow2 "$img" 1G

# No -f/-U/-p: with LISTEN_FDS nbdkit stays in the foreground by itself and
# refuses listening options.
"$PYTHON" "$TMP/activate.py" "$sock" nbdkit -v "$PLUGIN" file="$img" statsfile="$stats" >"$log" 2>&1 &
pid=$!
track_pid "$pid"
for _ in $(seq 1 200); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { cat "$log" >&2; fail "the launcher did not create $sock"; }
[ "$(cat /proc/$pid/comm)" != "$SERVER_COMM" ] ||
    fail "nbdkit started before any client connected"

# The client connects while only the launcher exists; its handshake is
# answered once nbdkit has taken over the socket.
alloc0=$(alloc_of "$img")
out=$("$PYTHON" - "$sock" "$img" <<'PY'
import os, sys, time, nbd
sock, img = sys.argv[1:]
alloc = lambda: os.stat(img).st_blocks * 512
n = 32 << 20
t0 = time.monotonic()
h = nbd.NBD()
h.connect_unix(sock)
connect_ms = (time.monotonic() - t0) * 1000
h.pwrite(b"\x5a" * n, 0)
h.flush()
written = alloc()
h.trim(n, 0)
h.flush()
trimmed = alloc()
zeros = h.pread(n, 0) == bytes(n)
h.shutdown()
print(connect_ms, written, trimmed, int(zeros))
PY
) || { cat "$log" >&2; fail "the first client failed"; }
read -r connect_ms written trimmed zeros <<<"$out"
[ "$(cat /proc/$pid/comm 2>/dev/null)" = "$SERVER_COMM" ] ||
    { cat "$log" >&2; fail "pid $pid is not nbdkit after the first connection"; }
grep -q "socket activation" "$log" ||
    { cat "$log" >&2; fail "nbdkit did not report socket activation"; }
printf 'ok: first client, queued before nbdkit existed, served by nbdkit pid %s on the inherited socket (handshake %.0f ms)\n' \
    "$pid" "$connect_ms"

[ "$written" -ge $(( alloc0 + 32 * 1048576 )) ] ||
    fail "allocation after writing 32 MiB is $(mib "$written") (was $(mib "$alloc0"))"
echo "ok: write 32 MiB + flush: host allocation $(mib "$alloc0") -> $(mib "$written")"

[ "$trimmed" -le $(( written - 32 * 1048576 )) ] ||
    fail "allocation after trimming 32 MiB is $(mib "$trimmed") (was $(mib "$written"))"
[ "$zeros" = 1 ] || fail "the trimmed range does not read back as zeros"
echo "ok: trim 32 MiB + flush: host allocation $(mib "$written") -> $(mib "$trimmed"), reads back as zeros"

punched=$(sed -n 's/^bytes_punched=//p' "$stats")
if [ -z "$punched" ] || [ "$punched" -lt $(( 32 * 1048576 )) ]; then
    cat "$stats" >&2; fail "statsfile shows bytes_punched=${punched:-none}, want >= 32 MiB"
fi
echo "ok: statsfile while serving: bytes_punched=$punched ($(mib "$punched"))"

# A socket-activated server is started once and serves every later client
# (systemd's Accept=no), so a second connection must reach the same process.
"$PYTHON" - "$sock" <<'PY' || fail "a second client was not served"
import sys, nbd
h = nbd.NBD()
h.connect_unix(sys.argv[1])
h.pwrite(b"\xa5" * 65536, 1 << 20)
assert h.pread(65536, 1 << 20) == b"\xa5" * 65536
h.flush()
h.shutdown()
PY
[ "$(cat /proc/$pid/comm)" = "$SERVER_COMM" ] || fail "nbdkit did not survive the first client"
echo "ok: second client served by the same nbdkit pid $pid"

# systemctl stop sends SIGTERM: metadata is written back, exit status 0.
t0=$(date +%s%N)
stop_server "$pid"
rc=$SERVER_STATUS
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
[ "$rc" = 0 ] || { cat "$log" >&2; fail "nbdkit exited with status $rc on SIGTERM"; }
totals=$(grep -o 'reclaim totals: .*' "$log") ||
    { cat "$log" >&2; fail "nbdkit did not log its reclaim totals on exit"; }
echo "ok: SIGTERM: exit 0 after $ms ms, logged '$totals'"

check_clean "$img"
echo "ok: qemu-img check clean; host file $(stat -c %s "$img") bytes, $(mib "$(alloc_of "$img")") allocated"

# ---- the folder template's own command ---------------------------------------
# qcow2reclaim-dir@.service's ExecStart and qcow2reclaim-dir@.socket's
# ListenStream for the folder $TMP/vm, with /run/qcow2reclaim moved to
# $TMP/run: the parameters the template passes must serve the folder and
# put each image's counters where the comments say.
dir_unit=$units/qcow2reclaim-dir@.service
[ -f "$dir_unit" ] || fail "$dir_unit is missing"
folder=$TMP/vm
run=$TMP/run
mkdir "$folder"
qemu-img create -q -f qcow2 "$folder/a.qcow2" 64M
qemu-img create -q -f qcow2 "$folder/b.qcow2" 64M
spec() { local v=${1//%f/$folder}; printf '%s\n' "${v//\/run\/qcow2reclaim/$run}"; }
dsock=$(spec "$(sed -n 's/^ListenStream=//p' "$units/qcow2reclaim-dir@.socket")")
read -r -a words <<<"$(spec "$(sed -n 's/^ExecStart=//p' "$dir_unit")")"
[ "${words[0]}" = nbdkit ] || fail "$dir_unit: ExecStart does not start nbdkit"
argv=()
for w in "${words[@]}"; do
    case $w in
        '$'*) ;;                        # $NBDKIT_ARGS, $QCOW2RECLAIM_ARGS: empty
        qcow2reclaim) argv+=("$PLUGIN") ;;
        *) argv+=("$w") ;;
    esac
done
# systemd creates the socket's folder; the plugin, the stats folder in it.
mkdir -p "$(dirname "$dsock")"
dlog=$TMP/nbdkit-dir.log
"$PYTHON" "$TMP/activate.py" "$dsock" "${argv[@]}" >"$dlog" 2>&1 &
dpid=$!
track_pid "$dpid"
for _ in $(seq 1 200); do [ -S "$dsock" ] && break; sleep 0.05; done
[ -S "$dsock" ] || { cat "$dlog" >&2; fail "the launcher did not create $dsock"; }
"$PYTHON" - "$dsock" <<'PY' || { cat "$dlog" >&2; fail "a client of the folder's socket failed"; }
import sys, nbd
names = []
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(sys.argv[1])
h.opt_list(lambda n, d: names.append(n))
h.opt_abort()
assert names == ["a.qcow2", "b.qcow2"], names
for name in names:
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sys.argv[1])
    h.pwrite(b"\x5a" * (8 << 20), 0)
    h.flush()
    h.trim(8 << 20, 0)
    h.flush()
    h.shutdown()
PY
for n in a.qcow2 b.qcow2; do
    st=$(spec "/run/qcow2reclaim%f")/$n.stats
    for _ in $(seq 1 200); do ! qemu-img info "$folder/$n" >/dev/null 2>&1 || break; sleep 0.05; done
    p=$(sed -n 's/^bytes_punched=//p' "$st" 2>/dev/null)
    [ "${p:-0}" -ge $((8 << 20)) ] || { cat "$dlog" >&2; fail "$st says bytes_punched=${p:-none}"; }
    check_clean "$folder/$n"
done
stop_server "$dpid"
[ "$SERVER_STATUS" = 0 ] || { cat "$dlog" >&2; fail "nbdkit dir= exited with status $SERVER_STATUS on SIGTERM"; }
echo "ok: qcow2reclaim-dir@.service's command, socket-activated on ${dsock#"$run"}: both images listed and served, counters in ${st#"$run"}, clean after their clients left"
