#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# Do reads wait behind flushes?  fio reads 4 KiB at random over a prefilled
# image on one connection while a second connection flushes every 10 ms:
# with nothing else (flush), or after an allocating 4 KiB write each time
# (write+flush), so that every flush has metadata to write and sync.  The
# read IOPS and p99 latency of each mode against reads alone, for qemu-nbd,
# the qcow2reclaim plugin and nbdkit's file plugin.  See bench/README.md.
set -eu

usage() {
    cat <<EOF
Usage: $0 [-d DIR] [-t SECONDS] [-R ROUNDS] [-s SIZE] [-i MS] [-B SO] [-n] [-k]

  -d DIR      where the images go (default \$BENCH_DIR, else /var/tmp)
  -t SECONDS  length of each fio run (default 15)
  -R ROUNDS   runs per server and mode; medians are reported (default 1)
  -s SIZE     size of the prefilled part the reads cover (default 1G); the
              disk has as much again, unallocated, for the writes
  -i MS       flush interval in milliseconds (default 10)
  -B SO       also another build of the plugin: before and after
  -n          leave out qemu-nbd and nbdkit-file
  -k          keep the work directory

Environment: PLUGIN, PLUGIN_ARGS, BENCH_DIR, PYTHON.
EOF
}

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parent=${BENCH_DIR:-/var/tmp}
runtime=15
rounds=1
size=1G
interval=10
other=
refs=1
while getopts d:t:R:s:i:B:nkh opt; do
    case $opt in
        d) parent=$OPTARG ;;
        t) runtime=$OPTARG ;;
        R) rounds=$OPTARG ;;
        s) size=$OPTARG ;;
        i) interval=$OPTARG ;;
        B) other=$OPTARG ;;
        n) refs=0 ;;
        k) BENCH_KEEP=1 ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || { usage >&2; exit 2; }
bench_count -t "$runtime" seconds
bench_count -R "$rounds"
bench_count -i "$interval" milliseconds
size_bytes=$(bench_size_bytes "$size")
[ $((size_bytes % 1048576)) -eq 0 ] && [ "$size_bytes" -ge $((64 << 20)) ] ||
    bench_die "-s wants a whole number of MiB, at least 64M"
bench_require_tools fio qemu-nbd qemu-img nbdkit "$PYTHON"
plugin_available || bench_die "the qcow2reclaim plugin is not built: $PLUGIN"
"$PYTHON" -c 'import nbd' 2>/dev/null || bench_die "$PYTHON has no nbd module (Debian: python3-libnbd)"
[ -z "$other" ] || bench_check_other "$other"

RUN=(plugin)
declare -A LABEL=([plugin]=qcow2reclaim [other]=other-build [qemu]=qemu-nbd [file]=nbdkit-file)
[ -n "$other" ] && RUN+=(other)
[ "$refs" = 1 ] && RUN+=(qemu file)
MODES=(none flush write+flush)

bench_workdir_create "$parent"
bench_install_trap
W=$BENCH_WORK
cp "$PLUGIN" "$W/plugin.so" || bench_die "cannot copy $PLUGIN"
PLUGIN=$W/plugin.so
if [ -n "$other" ]; then cp "$other" "$W/other.so"; other=$W/other.so; fi
bench_check_space "$W" $(((2 + ${#RUN[@]}) * 2 * size_bytes + (64 << 20)))
bench_warn_if_busy

bench_msg "writing a $size image of random data, then as much again unallocated"
make_prefilled_images "$size_bytes" "$W/template.raw" "$W/template.qcow2" 64k
qemu-img resize -q -f qcow2 "$W/template.qcow2" $((2 * size_bytes))
truncate -s $((2 * size_bytes)) "$W/template.raw"

# flusher.py SOCK MODE INTERVAL_MS STOPFILE FIRST LIMIT: until STOPFILE
# exists, every INTERVAL_MS: (write+flush) write 4 KiB at the start of the
# next unallocated cluster from FIRST, then flush.  Prints flushes done and
# their mean and largest latency in ms.
cat >"$W/flusher.py" <<'EOF'
import nbd, os, sys, time
sock, mode, interval, stopfile, first, limit = sys.argv[1], sys.argv[2], float(sys.argv[3]) / 1000, sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
h = nbd.NBD()
h.connect_unix(sock)
buf = b"\x5a" * 4096
off, n, total, worst = first, 0, 0.0, 0.0
nxt = time.monotonic()
while not os.path.exists(stopfile):
    if mode == "write+flush":
        h.pwrite(buf, off)
        off += 65536
        if off >= limit:
            off = first
    t = time.monotonic()
    h.flush()
    d = time.monotonic() - t
    n, total, worst = n + 1, total + d, max(worst, d)
    nxt += interval
    time.sleep(max(0, nxt - time.monotonic()))
h.shutdown()
print("%d %.2f %.2f" % (n, total / max(n, 1) * 1000, worst * 1000))
EOF

declare -A IOPS P99 FL
for s in "${RUN[@]}"; do
    sock=$W/$s.sock log=$W/$s.log
    case $s in
        file) img=$W/$s.raw; fresh_copy "$W/template.raw" "$img" ;;
        *)    img=$W/$s.qcow2; fresh_copy "$W/template.qcow2" "$img" ;;
    esac
    read -r -a plugin_args <<<"${PLUGIN_ARGS:-}"
    case $s in
        plugin) serve_plugin "$img" "$sock" "$log" "${plugin_args[@]}" ;;
        other)  PLUGIN=$other serve_plugin "$img" "$sock" "$log" "${plugin_args[@]}" ;;
        qemu)   serve_qemu "$img" "$sock" "$log" ;;
        file)   serve_file "$img" "$sock" "$log" ;;
    esac
    pid=$SERVER_PID
    for mode in "${MODES[@]}"; do
        figs= p99s= fls=
        for ((r = 0; r < rounds; r++)); do
            sync
            json=$W/$s.$mode.$r.json
            fpid= stopfile=$W/stop
            rm -f "$stopfile"
            if [ "$mode" != none ]; then
                "$PYTHON" "$W/flusher.py" "$sock" "$mode" "$interval" "$stopfile" \
                    "$size_bytes" $((2 * size_bytes)) >"$W/flusher.out" 2>&1 &
                fpid=$!
            fi
            run_fio "$(nbd_uri "$sock")" randread 4k 16 "$runtime" 1 "$json" --size="$size_bytes"
            if [ -n "$fpid" ]; then
                touch "$stopfile"
                wait "$fpid" || { cat "$W/flusher.out" >&2; bench_die "the flusher failed against ${LABEL[$s]}"; }
                read -r nfl mean worst <"$W/flusher.out"
                fls="$fls $mean"
                FL[$s.$mode]="$nfl flushes, mean $mean ms, worst $worst ms"
            fi
            figs="$figs $(fio_figure "$json" iops)"
            p99s="$p99s $(fio_figure "$json" p99)"
        done
        # shellcheck disable=SC2086 # separate words
        IOPS[$s.$mode]=$(bench_median $figs)
        # shellcheck disable=SC2086
        P99[$s.$mode]=$(bench_median $p99s)
        bench_msg "${LABEL[$s]} $mode: ${IOPS[$s.$mode]} IOPS, p99 ${P99[$s.$mode]} us${FL[$s.$mode]:+ (${FL[$s.$mode]})}"
    done
    stop_server "$pid" || bench_msg "warning: ${LABEL[$s]} exited with an error (log: $log)"
    if [ "$s" != file ] && ! qemu-img check -q -f qcow2 "$img"; then
        bench_die "the image served by ${LABEL[$s]} failed qemu-img check"
    fi
    rm -f "$img"
done

echo
echo "4 KiB random reads (depth 16) while another connection flushes every $interval ms,"
echo "IOPS (p99 us) and the share of the IOPS without flushes:"
echo
printf '| %-12s |' server
for mode in "${MODES[@]}"; do printf ' %s |' "$mode"; done
echo
printf '|%s|' "--------------"
for mode in "${MODES[@]}"; do printf '%s|' "---"; done
echo
for s in "${RUN[@]}"; do
    printf '| %-12s |' "${LABEL[$s]}"
    for mode in "${MODES[@]}"; do
        share=$(awk -v a="${IOPS[$s.$mode]}" -v b="${IOPS[$s.none]}" 'BEGIN { if (b > 0) printf "%.2f", a / b }')
        if [ "$mode" = none ]; then
            printf ' %s (%s) |' "${IOPS[$s.$mode]}" "${P99[$s.$mode]}"
        else
            printf ' %s (%s) %s |' "${IOPS[$s.$mode]}" "${P99[$s.$mode]}" "$share"
        fi
    done
    echo
done
