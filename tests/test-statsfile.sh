#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The stats file follows the server: it exists as soon as the server
# serves; a relative statsfile= lands where it was given, not in / where a
# background nbdkit runs; and after a burst of trims (more than ten a
# second, the rate the file is rewritten at) it ends up showing all of
# them, with no flush and no further request, with dir= too, and so do the
# punches its worker runs after the TRIMs were answered.  Its gauges: what went back
# to the host, each byte once, and where the image ends; and why trims gave
# nothing back, by reason.
set -eu
: "${srcdir:=$(cd "$(dirname "$0")" && pwd)}"
. "$srcdir/functions.sh"

requires nbdkit --version
requires qemu-img --version
requires qemu-io --version
requires "$PYTHON" -c 'import nbd'

# stat_of FILE NAME: the value of NAME= in a stats file.
stat_of() { sed -n "s/^$2=//p" "$1"; }

img=$TMP/disk.qcow2
qemu-img create -q -f qcow2 "$img" 64M
qemu-io -f qcow2 -c 'write -P 0x11 0 8M' "$img" >/dev/null

sock=$TMP/nbd.sock

# ---- written at open ----------------------------------------------------------
at_open() {
    local stats=$TMP/open.stats
    start_server "$sock" "$TMP/open.log" file="$img" statsfile="$stats" compact=off
    [ -f "$stats" ] || fail "no stats file while the server serves and before any request"
    [ "$(stat_of "$stats" file_length)" = "$(stat -c %s "$img")" ] ||
        { cat "$stats" >&2; fail "the stats file at open does not show the file's length"; }
    echo "ok: the stats file is there before the first request (file_length=$(stat_of "$stats" file_length))"
    stop_server "$LAST_SERVER_PID"
}

# ---- the last trim of a burst -----------------------------------------------------
# 32 trims of one cluster each, as fast as they go: one rewrite lets most of
# them through, and nothing comes after the last to write it.
burst() {
    local stats=$TMP/burst.stats punched
    cp "$img" "$TMP/burst.qcow2"
    start_server "$sock" "$TMP/burst.log" file="$TMP/burst.qcow2" statsfile="$stats" compact=off
    "$PYTHON" -m nbd -u "nbd+unix:///?socket=$sock" -c '
for i in range(32):
    h.trim(65536, i * 65536)
'
    sleep $((1 * SLOW))
    punched=$(stat_of "$stats" bytes_punched 2>/dev/null || true)
    [ "$punched" = $((32 * 65536)) ] ||
        fail "1 s after 32 trims of 64 KiB: bytes_punched=${punched:-nothing}, want $((32 * 65536))"
    echo "ok: after a burst of 32 trims and no flush, bytes_punched=$punched"
    stop_server "$LAST_SERVER_PID"
}

# ---- what the worker of deferred punches does after the burst --------------------
# 4,096 trims of 4 KiB inside clusters, on data that is on disk (punching
# it costs the host filesystem more): the TRIMs are answered before their
# punches run, so the worker is still punching when the burst's last
# rewrite is over.  The file must follow it, with no flush.
deferred() {
    local stats=$TMP/deferred.stats punched= want=$((4096 * 4096))
    cp "$img" "$TMP/deferred.qcow2"
    qemu-io -f qcow2 -c 'write -P 0x22 8M 56M' "$TMP/deferred.qcow2" >/dev/null
    sync "$TMP/deferred.qcow2"
    start_server "$sock" "$TMP/deferred.log" file="$TMP/deferred.qcow2" statsfile="$stats" compact=off
    "$PYTHON" -m nbd -u "nbd+unix:///?socket=$sock" -c '
for c in range(1024):
    for k in (4096, 20480, 36864, 53248):
        h.trim(4096, c * 65536 + k)
'
    for _ in $(seq 1 $((50 * SLOW))); do
        punched=$(stat_of "$stats" bytes_punched 2>/dev/null || true)
        [ "$punched" = "$want" ] && break
        sleep 0.1
    done
    [ "$punched" = "$want" ] ||
        fail "5 s after 4,096 trims of 4 KiB and no flush: bytes_punched=${punched:-nothing}, want $want"
    echo "ok: after 4,096 deferred punches and no flush, the file shows bytes_punched=$punched"
    stop_server "$LAST_SERVER_PID"
}

# ---- the last trim of a burst, with dir= -------------------------------------------
# The same burst on one image of a folder, while another image of it is
# open too: the writer thread must know each image's stats file, and
# write NAME.stats of the one that had the burst.  The other is opened
# first and closed last, so the thread's list holds two files and keeps
# one after the burst's image is gone.
dir_burst() {
    local d=$TMP/folder sdir=$TMP/folder-stats punched
    mkdir "$d"
    cp "$img" "$d/a.qcow2"
    cp "$img" "$d/b.qcow2"
    start_server "$sock" "$TMP/dir-burst.log" dir="$d" statsfile="$sdir" compact=off
    [ -f "$sdir/b.qcow2.stats" ] && fail "b.qcow2.stats is there before b.qcow2 was opened"
    # Read while both connections are open: closing b.qcow2 writes its
    # file anyway.
    punched=$("$PYTHON" - "$sock" "$sdir/b.qcow2.stats" "$SLOW" <<'PY'
import nbd, sys, time
a = nbd.NBD(); a.set_export_name("a.qcow2"); a.connect_unix(sys.argv[1])
b = nbd.NBD(); b.set_export_name("b.qcow2"); b.connect_unix(sys.argv[1])
for i in range(32):
    b.trim(65536, i * 65536)
time.sleep(1 * int(sys.argv[3]))
try:
    for line in open(sys.argv[2]):
        if line.startswith("bytes_punched="):
            print(line.split("=")[1].strip())
except OSError:
    pass
b.shutdown()
a.shutdown()
PY
)
    [ "$punched" = $((32 * 65536)) ] ||
        fail "dir=: 1 s after 32 trims of 64 KiB on b.qcow2: bytes_punched=${punched:-nothing} in b.qcow2.stats, want $((32 * 65536))"
    [ "$(stat_of "$sdir/a.qcow2.stats" bytes_punched)" = 0 ] ||
        fail "dir=: a.qcow2.stats counts the trims of b.qcow2"
    echo "ok: dir=: after a burst of 32 trims on b.qcow2 and no flush, b.qcow2.stats has bytes_punched=$punched"
    stop_server "$LAST_SERVER_PID"
}

# ---- a relative statsfile=, in the background ---------------------------------------
# nbdkit changes to / once it forks: the name must be resolved before.
# rel and pidfile are global: the cleanup hook reads them after the
# function has returned.
background() {
    local run=$TMP/run pid punched i
    rel=q2r-statsfile-$$.stats pidfile=$TMP/nbdkit.pid
    mkdir "$run"
    [ ! -e "/$rel" ] || fail "/$rel exists before the test"
    # The daemon writes the file once more as it exits: stopped first.
    stop_daemon() {
        local pid i
        if pid=$(cat "$pidfile" 2>/dev/null) &&
           [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$SERVER_COMM" ]; then
            kill "$pid" 2>/dev/null || true
            for i in $(seq 1 $((STOP_TIMEOUT * SLOW * 20))); do
                [ -d "/proc/$pid" ] || break
                sleep 0.05
            done
        fi
        rm -f "/$rel" "/$rel.tmp"
    }
    cleanup_fn stop_daemon
    rm -f "$sock"
    (cd "$run" && nbdkit -U "$sock" -P "$pidfile" "$PLUGIN" file="$img" statsfile="$rel" compact=off) ||
        fail "nbdkit did not start in the background"
    for i in $(seq 1 $((100 * SLOW))); do [ -s "$pidfile" ] && break; sleep 0.05; done
    pid=$(cat "$pidfile") || fail "nbdkit wrote no pid file"
    "$PYTHON" -m nbd -u "nbd+unix:///?socket=$sock" -c 'h.trim(1 << 20, 4 << 20); h.flush()'
    punched=$(stat_of "$run/$rel" bytes_punched 2>/dev/null || true)
    [ "$punched" = $((1 << 20)) ] ||
        fail "after a trim and a flush $run/$rel shows bytes_punched=${punched:-nothing}$([ -e "/$rel" ] && echo "; /$rel was written instead")"
    kill "$pid"
    for i in $(seq 1 $((STOP_TIMEOUT * SLOW * 20))); do
        [ -d "/proc/$pid" ] || break
        sleep 0.05
    done
    [ ! -d "/proc/$pid" ] || fail "nbdkit $pid did not exit after SIGTERM"
    [ ! -e "/$rel" ] || fail "a background nbdkit wrote statsfile=$rel to /$rel"
    echo "ok: statsfile=$rel given in $run is written there by a background nbdkit"
}

# ---- what went back to the host, counted once; the image end offset ------------------
# 1 MiB of junk past the last cluster: the image ends before the file does.
# Trimming the last 2 MiB of data and flushing punches it and then cuts it
# off: 2 MiB go back, though bytes_punched and bytes_truncated both count
# them.  A 4 KiB trim done twice punches twice and gives back once.
given_back() {
    local g=$TMP/gauges.qcow2 stats=$TMP/gauges.stats end
    qemu-img create -q -f qcow2 "$g" 64M
    qemu-io -f qcow2 -c 'write -P 0x11 0 8M' "$g" >/dev/null
    truncate -s +1M "$g"
    end=$(qemu-img check --output=json "$g" | sed -n 's/.*"image-end-offset": \([0-9]*\).*/\1/p')
    start_server "$sock" "$TMP/gauges.log" file="$g" statsfile="$stats" compact=off
    [ "$(stat_of "$stats" image_end_offset)" = "$end" ] ||
        fail "at open image_end_offset=$(stat_of "$stats" image_end_offset), qemu-img check says $end (file length $(stat -c %s "$g"))"
    echo "ok: at open image_end_offset=$end, as qemu-img check says; file_length=$(stat_of "$stats" file_length)"
    "$PYTHON" -m nbd -u "nbd+unix:///?socket=$sock" -c '
h.trim(2 << 20, 6 << 20)
h.flush()
h.trim(4096, 1 << 20)
h.trim(4096, 1 << 20)
h.flush()
'
    local punched truncated back
    punched=$(stat_of "$stats" bytes_punched) truncated=$(stat_of "$stats" bytes_truncated)
    back=$(stat_of "$stats" bytes_given_back)
    [ "$back" = $(((2 << 20) + 4096)) ] ||
        { cat "$stats" >&2; fail "bytes_given_back=$back, want $(((2 << 20) + 4096)) (bytes_punched=$punched, bytes_truncated=$truncated)"; }
    [ "$((punched + truncated))" -gt "$((back + (2 << 20)))" ] ||
        { cat "$stats" >&2; fail "bytes_punched + bytes_truncated do not count the cut-off holes again: the case tests nothing"; }
    [ "$(stat_of "$stats" image_end_offset)" = "$(stat -c %s "$g")" ] ||
        { cat "$stats" >&2; fail "after the cut image_end_offset is not the file's length $(stat -c %s "$g")"; }
    echo "ok: bytes_given_back=$back where bytes_punched=$punched and bytes_truncated=$truncated; image_end_offset=$(stat_of "$stats" image_end_offset)"
    stop_server "$LAST_SERVER_PID"
}

# ---- why a trim gave nothing back ---------------------------------------------------
# Each trim lands where one reason holds: clusters an internal snapshot
# shares, 1 KiB inside an unshared cluster (less than a host block), space
# never allocated, part of a compressed cluster, and (second image) space a
# backing file shows through.
reasons() {
    local r=$TMP/reasons.qcow2 base=$TMP/base.qcow2 top=$TMP/top.qcow2
    local stats=$TMP/reasons.stats log=$TMP/reasons.log k want got
    qemu-img create -q -f qcow2 "$r" 64M
    qemu-io -f qcow2 -c 'write -P 0x11 0 1M' -c 'write -c -P 0x33 5M 64k' "$r" >/dev/null
    qemu-img snapshot -c S "$r"
    qemu-io -f qcow2 -c 'write -P 0x22 2M 1M' "$r" >/dev/null
    start_server "$sock" "$log" file="$r" statsfile="$stats" compact=off
    "$PYTHON" -m nbd -u "nbd+unix:///?socket=$sock" -c '
h.trim(1 << 20, 0)
h.trim(1024, (2 << 20) + 512)
h.trim(65536, 10 << 20)
h.trim(4096, 5 << 20)
h.flush()
'
    for k in bytes_trimmed=$(((1 << 20) + 1024 + 65536 + 4096)) not_freed_snapshot=$((1 << 20)) \
             not_freed_small=1024 not_freed_already_free=65536 not_freed_compressed=4096 \
             not_freed_backing=0; do
        want=${k#*=} got=$(stat_of "$stats" "${k%%=*}")
        [ "$got" = "$want" ] || { cat "$stats" >&2; fail "${k%%=*}=$got, want $want"; }
    done
    stop_server "$LAST_SERVER_PID"
    grep -q 'reclaim totals: .* not_freed_snapshot=1048576 not_freed_backing=0 not_freed_small=1024' "$log" ||
        { grep 'reclaim totals' "$log" >&2; fail "the totals line at exit does not give the reasons"; }
    echo "ok: snapshot-shared, sub-4 KiB, unallocated and compressed trims counted by reason: $(grep -o 'bytes_trimmed=.*' "$log")"

    qemu-img create -q -f qcow2 "$base" 64M
    qemu-io -f qcow2 -c 'write -P 0x44 0 4M' "$base" >/dev/null
    qemu-img create -q -f qcow2 -b "$base" -F qcow2 "$top"
    start_server "$sock" "$TMP/top.log" file="$top" statsfile="$stats" compact=off
    "$PYTHON" -m nbd -u "nbd+unix:///?socket=$sock" -c 'h.trim(1 << 20, 0); h.flush()'
    got=$(stat_of "$stats" not_freed_backing)
    [ "$got" = $((1 << 20)) ] || { cat "$stats" >&2; fail "over a backing file: not_freed_backing=$got, want $((1 << 20))"; }
    stop_server "$LAST_SERVER_PID"
    echo "ok: a trim where the backing file shows through: not_freed_backing=$got"
}

run_case at_open
run_case reasons
run_case given_back
run_case burst
run_case deferred
run_case dir_burst
run_case background
[ "$FAILED" -eq 0 ] || fail "$FAILED case(s) failed"
