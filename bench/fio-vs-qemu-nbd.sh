#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# fio over NBD: qemu-nbd against the qcow2reclaim nbdkit plugin on the same
# prefilled qcow2 image, with nbdkit's file plugin on the raw image as a
# reference.  See bench/README.md.
set -eu

usage() {
    cat <<EOF
Usage: $0 [-d DIR] [-t SECONDS] [-r SECONDS] [-R ROUNDS] [-S PERCENT] [-s SIZE] [-o FILE] [-B SO] [-T TESTS] [-n] [-k]

  -d DIR      where the images go (default \$BENCH_DIR, else /var/tmp); a
              private directory is made under it and removed at the end
  -t SECONDS  measured time of each fio run (default 20)
  -r SECONDS  ramp time before each run, not measured (default 2)
  -R ROUNDS   run every test ROUNDS times per server and report the median
              (default 1)
  -S PERCENT  run again (twice at most) a run during which the hypervisor
              stole more than PERCENT of the CPUs' time, keeping the try
              with the least steal (default 3; 100: never)
  -s SIZE     virtual disk size (default 2G); needs about (2 + servers) x SIZE
              of free space
  -o FILE     also write the results table as CSV to FILE
  -B SO       also serve with this other build of the plugin (say, of an
              earlier commit), as a column of its own with the ratio of
              this build to it: before and after in one run
  -T TESTS    only these tests, comma-separated (randread-4k, randwrite-4k,
              seqread-1m, seqwrite-1m, randrw-64k, randread-4k-x4), to
              look closer at one row
  -n          no nbdkit file plugin reference column
  -k          keep the work directory (fio JSON, server logs)

Environment: PLUGIN (default ../plugin/.libs/nbdkit-qcow2reclaim-plugin.so
next to this script), PLUGIN_ARGS (extra KEY=VALUE parameters for it),
BENCH_DIR, PYTHON.
EOF
}

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parent=${BENCH_DIR:-/var/tmp}
runtime=20
ramp=2
rounds=1
max_steal=3
size=2G
csv=
with_file=1
other=
only=
while getopts d:t:r:R:S:s:o:B:T:nkh opt; do
    case $opt in
        d) parent=$OPTARG ;;
        t) runtime=$OPTARG ;;
        r) ramp=$OPTARG ;;
        R) rounds=$OPTARG ;;
        S) max_steal=$OPTARG ;;
        s) size=$OPTARG ;;
        o) csv=$OPTARG ;;
        B) other=$OPTARG ;;
        T) only=$OPTARG ;;
        n) with_file=0 ;;
        k) BENCH_KEEP=1 ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || { usage >&2; exit 2; }
bench_count -t "$runtime" seconds
bench_count0 -r "$ramp" seconds
bench_count -R "$rounds"
bench_count0 -S "$max_steal" percent
size_bytes=$(bench_size_bytes "$size")
if [ $((size_bytes % 1048576)) -ne 0 ] || [ "$size_bytes" -lt $((64 << 20)) ]; then
    bench_die "-s wants a whole number of MiB, at least 64M"
fi
if [ -n "$csv" ]; then
    { : >"$csv"; } 2>/dev/null || bench_die "cannot write the CSV file $csv"
fi

bench_require_tools fio qemu-nbd qemu-img nbdkit "$PYTHON"

# The tests: name, fio rw, block size, queue depth per connection,
# connections (fio jobs, one NBD connection each), figure reported.  The
# 1 MiB tests use depth 4: with 2 cores deeper queues only add latency, and
# the depth is the same for every server.
TESTS=(
    "randread-4k    randread  4k  16 1 iops"
    "randwrite-4k   randwrite 4k  16 1 iops"
    "seqread-1m     read      1m  4  1 mibs"
    "seqwrite-1m    write     1m  4  1 mibs"
    "randrw-64k     randrw    64k 8  1 iops"
    "randread-4k-x4 randread  4k  8  4 iops"
)
if [ -n "$only" ]; then
    chosen=()
    for t in "${TESTS[@]}"; do
        case ",$only," in *",${t%% *},"*) chosen+=("$t") ;; esac
    done
    [ ${#chosen[@]} -gt 0 ] || bench_die "-T $only: no such test (randread-4k, randwrite-4k, seqread-1m, seqwrite-1m, randrw-64k, randread-4k-x4)"
    TESTS=("${chosen[@]}")
fi

# The servers to run; the table always has a column for each.
declare -A LABEL=([qemu]=qemu-nbd [plugin]=qcow2reclaim [other]=other-build [file]=nbdkit-file)
RUN=(qemu)
if plugin_available; then
    nbdkit "$PLUGIN" --dump-plugin >/dev/null 2>&1 ||
        bench_die "nbdkit cannot load the plugin $PLUGIN (try: nbdkit $PLUGIN --dump-plugin)"
    RUN+=(plugin)
else
    bench_msg "qcow2reclaim plugin not found at $PLUGIN: skipping its column (build it, or set PLUGIN=)"
fi
if [ -n "$other" ]; then
    bench_check_other "$other"
    RUN+=(other)
fi
if [ "$with_file" = 1 ]; then RUN+=(file); fi

bench_workdir_create "$parent"
bench_install_trap
W=$BENCH_WORK
if plugin_available; then
    # Serve a private copy, so a rebuild during the run changes nothing.
    cp "$PLUGIN" "$W/plugin.so" || bench_die "cannot copy $PLUGIN"
    bench_msg "qcow2reclaim plugin: $PLUGIN ($(date -r "$PLUGIN" '+built %F %T'))"
    PLUGIN=$W/plugin.so
fi
if [ -n "$other" ]; then
    cp "$other" "$W/other.so" || bench_die "cannot copy $other"
    bench_msg "other build: $other ($(date -r "$other" '+built %F %T'))"
    other=$W/other.so
fi
# Templates, one copy per server, and slack for fio's logs.
bench_check_space "$W" $(((2 + ${#RUN[@]}) * size_bytes + (64 << 20)))

runs=$((${#TESTS[@]} * rounds * ${#RUN[@]}))
bench_warn_if_busy
bench_msg "work directory $W; $runs fio runs of ${ramp}+${runtime}s, about $(((runs * (runtime + ramp + 3) + 60) / 60)) min"

bench_msg "writing a $size image of random data (raw and qcow2, 64 KiB clusters)"
make_prefilled_images "$size_bytes" "$W/template.raw" "$W/template.qcow2" 64k

# Each server has its own copy, so no write test sees another server's writes.
declare -A IMAGE SOCK
for s in "${RUN[@]}"; do
    SOCK[$s]=$W/$s.sock
    case $s in
        file) IMAGE[$s]=$W/$s.raw; fresh_copy "$W/template.raw" "${IMAGE[$s]}" ;;
        *)    IMAGE[$s]=$W/$s.qcow2; fresh_copy "$W/template.qcow2" "${IMAGE[$s]}" ;;
    esac
done
rm -f "$W/template.raw" "$W/template.qcow2"
# Every copy's pages in the same shape, so the write rows measure servers.
bench_msg "reading the images back into the page cache in single pages"
page_cache_even "${IMAGE[@]}"

declare -A PID
read -r -a plugin_args <<<"${PLUGIN_ARGS:-}"
for s in "${RUN[@]}"; do
    case $s in
        qemu)   serve_qemu "${IMAGE[$s]}" "${SOCK[$s]}" "$W/$s.log" ;;
        plugin) serve_plugin "${IMAGE[$s]}" "${SOCK[$s]}" "$W/$s.log" "${plugin_args[@]}" ;;
        other)  PLUGIN=$other serve_plugin "${IMAGE[$s]}" "${SOCK[$s]}" "$W/$s.log" "${plugin_args[@]}" ;;
        file)   serve_file "${IMAGE[$s]}" "${SOCK[$s]}" "$W/$s.log" ;;
    esac
    PID[$s]=$SERVER_PID
    bench_msg "${LABEL[$s]} is serving ${IMAGE[$s]##*/} (pid $SERVER_PID)"
done

# Run j (test i, round r) starts with server j (mod n), so no server always
# runs first or right after another server's writes.
declare -A RESULT FIGURES P99 P99S
n=${#RUN[@]}
done_runs=0
busy_runs=0
retried_runs=0
stolen_runs=0
refilled=0
bench_warn_cpu_speed "before the runs"
for ((i = 0; i < ${#TESTS[@]}; i++)); do
    read -r name rw bs depth jobs metric <<<"${TESTS[$i]}"
    unit=$([ "$metric" = iops ] && echo IOPS || echo MiB/s)
    for ((r = 0; r < rounds; r++)); do
        for ((k = 0; k < n; k++)); do
            s=${RUN[$(((i * rounds + r + k) % n))]}
            server_check "${PID[$s]}"
            # A run the hypervisor stole from measures the neighbours: try
            # again and keep the try with the least steal.
            best=
            for try in 1 2 3; do
                sync    # earlier writes reach the disk before, not during, this run
                refilled=$((refilled + $(page_cache_refill "${IMAGE[$s]}")))
                json=$W/$name.$s.$r.$try.json
                bench_cpu_mark "${PID[$s]}"
                run_fio "$(nbd_uri "${SOCK[$s]}")" "$rw" "$bs" "$depth" "$runtime" "$ramp" "$json" \
                    --numjobs="$jobs" --group_reporting=1
                busy=$(bench_cpu_other "${PID[$s]}")
                steal=$(bench_cpu_steal)
                if [ -z "$best" ] || [ "$steal" -lt "$best_steal" ]; then
                    best=$json best_busy=$busy best_steal=$steal
                fi
                if [ "$steal" -le "$max_steal" ] || [ "$try" = 3 ]; then break; fi
                bench_msg "$name on ${LABEL[$s]}: the hypervisor stole ${steal}% of the CPU time; running it again"
                retried_runs=$((retried_runs + 1))
            done
            json=$best busy=$best_busy steal=$best_steal
            fig=$(fio_figure "$json" "$metric") || bench_die "cannot read the fio report $json"
            FIGURES[$name.$s]="${FIGURES[$name.$s]:-} $fig"
            p99=$(fio_figure "$json" p99) || bench_die "cannot read the fio report $json"
            P99S[$name.$s]="${P99S[$name.$s]:-} $p99"
            done_runs=$((done_runs + 1))
            note=
            if awk -v o="$busy" 'BEGIN { exit !(o >= 0.2) }'; then
                note=" (other processes used $busy CPUs meanwhile)"
                busy_runs=$((busy_runs + 1))
            fi
            if [ "$steal" -gt "$max_steal" ]; then
                note="$note (over -S $max_steal after three tries)"
                stolen_runs=$((stolen_runs + 1))
            fi
            bench_msg "[$done_runs/$runs] $name on ${LABEL[$s]}: $fig $unit, p99 $p99 us, steal ${steal}%$note"
        done
    done
    for s in "${RUN[@]}"; do
        # shellcheck disable=SC2086 # the figures are separate words
        RESULT[$name.$s]=$(bench_median ${FIGURES[$name.$s]})
        # shellcheck disable=SC2086
        P99[$name.$s]=$(bench_median ${P99S[$name.$s]})
    done
done
bench_warn_cpu_speed "after the runs"
[ "$refilled" = 0 ] ||
    bench_msg "$((refilled / 1048576)) MiB of the images had left the page cache between runs and were read back before the runs that needed them"
[ "$busy_runs" = 0 ] ||
    bench_msg "warning: other processes took CPU time during $busy_runs of $runs runs: those figures are low; rerun on a quiet machine"
[ "$retried_runs" = 0 ] ||
    bench_msg "$retried_runs fio runs were run again because of steal time"
[ "$stolen_runs" = 0 ] ||
    bench_msg "warning: the hypervisor stole more than ${max_steal}% of the CPU time in $stolen_runs of $runs runs, after three tries each: those figures are low; rerun when the host is quieter"

# Stop the servers before reading the images back: the plugin writes its
# metadata on exit, and qemu-img check must find both qcow2 images clean.
for s in "${RUN[@]}"; do
    stop_server "${PID[$s]}" || bench_msg "warning: ${LABEL[$s]} exited with status $? (log: $W/$s.log)"
done
bad_images=
for s in "${RUN[@]}"; do
    [ "$s" != file ] || continue
    if ! out=$(qemu-img check -f qcow2 "${IMAGE[$s]}" 2>&1); then
        echo "$out" >&2
        bench_msg "error: qemu-img check found problems in the ${LABEL[$s]} image"
        bad_images="$bad_images ${LABEL[$s]}"
    fi
done

# The table, and the same rows as CSV: each server's figure and p99
# completion latency (us, the larger of read and write), and the plugin's
# ratios to qemu-nbd, to the other build (-B) and to nbdkit-file.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "" && b > 0) printf "%.2f", a / b; else printf "-" }'; }
cols=(qemu plugin)
[ -n "$other" ] && cols+=(other)
[ "$with_file" = 1 ] && cols+=(file)
declare -A SHORT=([qemu]=qemu-nbd [plugin]=qcow2reclaim [other]=other [file]=nbdkit-file)
header="test           metric"
csvh="test,metric"
for s in "${cols[@]}"; do
    header=$(printf '%s %13s %8s' "$header" "${SHORT[$s]}" "p99-us")
    csvh="$csvh,${SHORT[$s]//-/_},${SHORT[$s]//-/_}_p99_us"
done
header=$(printf '%s %8s' "$header" vs-qemu)
csvh="$csvh,vs_qemu"
[ -n "$other" ] && { header=$(printf '%s %8s' "$header" vs-other); csvh="$csvh,vs_other"; }
[ "$with_file" = 1 ] && { header=$(printf '%s %8s' "$header" vs-file); csvh="$csvh,vs_file"; }
echo "$header"
[ -z "$csv" ] || echo "$csvh" >"$csv"
for t in "${TESTS[@]}"; do
    read -r name rw bs depth jobs metric <<<"$t"
    unit=$([ "$metric" = iops ] && echo IOPS || echo MiB/s)
    line=$(printf '%-14s %-6s' "$name" "$unit")
    csvl="$name,$unit"
    for s in "${cols[@]}"; do
        line=$(printf '%s %13s %8s' "$line" "${RESULT[$name.$s]:--}" "${P99[$name.$s]:--}")
        csvl="$csvl,${RESULT[$name.$s]:-},${P99[$name.$s]:-}"
    done
    p=${RESULT[$name.plugin]:-}
    for s in qemu other file; do
        case $s in
            other) [ -n "$other" ] || continue ;;
            file) [ "$with_file" = 1 ] || continue ;;
        esac
        r=$(ratio "$p" "${RESULT[$name.$s]:-}")
        line=$(printf '%s %8s' "$line" "$r")
        csvl="$csvl,${r#-}"
    done
    echo "$line"
    [ -z "$csv" ] || echo "$csvl" >>"$csv"
done
[ -z "$csv" ] || bench_msg "results written to $csv"
# A server that damages its image has no meaningful figures.
[ -z "$bad_images" ] || bench_die "the image served by$bad_images failed qemu-img check"
