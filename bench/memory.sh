#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# Resident memory over time while fio runs: the qcow2reclaim plugin at one
# or more cache sizes, qemu-nbd and nbdkit's file plugin, each serving a
# 1 TiB image whose L2 tables all exist, so that random requests keep the
# metadata cache evicting.  Exits 1 when a plugin column passes
# cache-size + 16 MiB beside nbdkit's own request buffers.  See
# bench/README.md.
set -eu

usage() {
    cat <<EOF
Usage: $0 [-d DIR] [-t SECONDS] [-s SIZE] [-c SIZES] [-o FILE] [-B SO] [-n] [-k]

  -d DIR      where the images go (default \$BENCH_DIR, else /var/tmp); a
              private directory is made under it and removed at the end
  -t SECONDS  length of each fio phase (default 15)
  -s SIZE     virtual disk size (default 1T); the qcow2 image is created
              with preallocation=metadata: SIZE / 8192 of L2 tables
  -c SIZES    cache-size values to serve the plugin with, comma-separated
              (default 8M,32M): one column each
  -o FILE     also write every sample as CSV to FILE
              (server,phase,seconds,vmrss_kib,rssanon_kib)
  -B SO       also serve with this other build of the plugin at the first
              cache size: before and after in one run
  -n          leave out qemu-nbd and nbdkit's file plugin
  -k          keep the work directory (fio JSON, server logs, samples)

Environment: PLUGIN (default ../plugin/.libs/nbdkit-qcow2reclaim-plugin.so
next to this script), BENCH_DIR, PYTHON.
EOF
}

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parent=${BENCH_DIR:-/var/tmp}
phase_secs=15
size=1T
caches=8M,32M
csv=
other=
refs=1
while getopts d:t:s:c:o:B:nkh opt; do
    case $opt in
        d) parent=$OPTARG ;;
        t) phase_secs=$OPTARG ;;
        s) size=$OPTARG ;;
        c) caches=$OPTARG ;;
        o) csv=$OPTARG ;;
        B) other=$OPTARG ;;
        n) refs=0 ;;
        k) BENCH_KEEP=1 ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || { usage >&2; exit 2; }
bench_count -t "$phase_secs" seconds
size_bytes=$(bench_size_bytes "$size")
[ "$size_bytes" -ge $((1 << 30)) ] || bench_die "-s wants at least 1G"
IFS=, read -r -a CACHES <<<"$caches"
for c in "${CACHES[@]}"; do
    bench_size_bytes "$c" >/dev/null 2>&1 || bench_die "-c: '$c' is not a size"
done
if [ -n "$csv" ]; then
    { : >"$csv"; } 2>/dev/null || bench_die "cannot write the CSV file $csv"
fi
bench_require_tools fio qemu-nbd qemu-img nbdkit "$PYTHON"
plugin_available || bench_die "the qcow2reclaim plugin is not built: $PLUGIN"
[ -z "$other" ] || bench_check_other "$other"

# The phases: name, fio rw, block size, depth, jobs (one NBD connection
# each), region.  Sequential phases stay in the first 4 GiB, so that a
# write phase does not fill the host disk; random ones cover the disk.
PHASES=(
    "randread-4k   randread  4k  16 1 all"
    "randwrite-4k  randwrite 4k  16 1 all"
    "read-1m-x4    read      1m  4  4 4g"
    "write-1m-x4   write     1m  4  4 4g"
    "randrw-64k-x4 randrw    64k 8  4 all"
)

# nbdkit's worker threads a connection, given to both nbdkit servers
# (nbdkit's default, said here so the bound below uses what was served).
NBDKIT_THREADS=16

declare -A LABEL KIND ARGS
RUN=()
for c in "${CACHES[@]}"; do
    s=plugin-$c; RUN+=("$s"); LABEL[$s]="qcow2reclaim cache-size=$c"; KIND[$s]=plugin
    ARGS[$s]="cache-size=$c compact=off"
done
if [ -n "$other" ]; then
    s=other; RUN+=("$s"); LABEL[$s]="other build cache-size=${CACHES[0]}"; KIND[$s]=other
    ARGS[$s]="cache-size=${CACHES[0]} compact=off"
fi
if [ "$refs" = 1 ]; then
    RUN+=(qemu file); LABEL[qemu]=qemu-nbd; KIND[qemu]=qemu
    LABEL[file]="nbdkit-file (raw)"; KIND[file]=file
fi

bench_workdir_create "$parent"
bench_install_trap
W=$BENCH_WORK
cp "$PLUGIN" "$W/plugin.so" || bench_die "cannot copy $PLUGIN"
bench_msg "qcow2reclaim plugin: $PLUGIN ($(date -r "$PLUGIN" '+built %F %T'))"
PLUGIN=$W/plugin.so
if [ -n "$other" ]; then
    cp "$other" "$W/other.so" || bench_die "cannot copy $other"
    other=$W/other.so
fi
# Random 4k writes over the disk and 4 GiB of sequential ones, per server.
bench_check_space "$W" $((${#RUN[@]} * (6 << 30)))
bench_warn_if_busy
bench_msg "work directory $W; ${#RUN[@]} servers x ${#PHASES[@]} phases of ${phase_secs}s, about $(((${#RUN[@]} * ${#PHASES[@]} * (phase_secs + 2) + 60) / 60)) min"

bench_msg "creating a $size qcow2 image with preallocation=metadata"
qemu-img create -q -f qcow2 -o preallocation=metadata,cluster_size=64k \
    "$W/template.qcow2" "$size_bytes" || bench_die "qemu-img create failed"

# sample PID OUT PHASEFILE: every 0.2 s, the time, the phase being run and
# VmRSS/RssAnon in KiB, until PID exits or the sampler is killed.
sample() {
    local pid=$1 out=$2 phasefile=$3 t0 now rss anon
    t0=$(date +%s.%N)
    while kill -0 "$pid" 2>/dev/null; do
        read -r rss anon < <(awk '/^VmRSS/ { r = $2 } /^RssAnon/ { a = $2 }
                                  END { print r + 0, a + 0 }' "/proc/$pid/status" 2>/dev/null) || break
        now=$(date +%s.%N)
        printf '%s %.1f %s %s\n' "$(cat "$phasefile")" \
            "$(awk -v a="$now" -v b="$t0" 'BEGIN { print a - b }')" "$rss" "$anon" >>"$out"
        sleep 0.2
    done
}

declare -A PEAK PEAKANON
for s in "${RUN[@]}"; do
    sock=$W/$s.sock log=$W/$s.log
    read -r -a extra <<<"${ARGS[$s]:-}"
    case ${KIND[$s]} in
        plugin|other|qemu)
            cp --sparse=always "$W/template.qcow2" "$W/$s.qcow2"
            img=$W/$s.qcow2 ;;
        file)
            truncate -s "$size_bytes" "$W/$s.raw"
            img=$W/$s.raw ;;
    esac
    case ${KIND[$s]} in
        plugin) serve_plugin "$img" "$sock" "$log" "${extra[@]}" ;;
        other)  PLUGIN=$other serve_plugin "$img" "$sock" "$log" "${extra[@]}" ;;
        qemu)   serve_qemu "$img" "$sock" "$log" ;;
        file)   serve_file "$img" "$sock" "$log" ;;
    esac
    pid=$SERVER_PID
    echo idle >"$W/$s.phase"
    sample "$pid" "$W/$s.samples" "$W/$s.phase" &
    sampler=$!
    sleep 1
    for p in "${PHASES[@]}"; do
        read -r name rw bs depth jobs region <<<"$p"
        echo "$name" >"$W/$s.phase"
        sizearg=()
        [ "$region" = all ] || sizearg=(--size="$region")
        server_check "$pid"
        run_fio "$(nbd_uri "$sock")" "$rw" "$bs" "$depth" "$phase_secs" 0 \
            "$W/$name.$s.json" --numjobs="$jobs" --group_reporting=1 "${sizearg[@]}"
        bench_msg "${LABEL[$s]}: $name: $(fio_figure "$W/$name.$s.json" iops) IOPS"
    done
    echo after >"$W/$s.phase"
    sleep 2
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    stop_server "$pid" || bench_msg "${LABEL[$s]} exited with an error (log: $log)"
    rm -f "$W/$s.qcow2" "$W/$s.raw"
    if [ -n "$csv" ]; then
        awk -v s="$s" '{ print s "," $1 "," $2 "," $3 "," $4 }' "$W/$s.samples" >>"$csv"
    fi
    for p in "${PHASES[@]}" "after" "all"; do
        name=${p%% *}
        PEAK[$name.$s]=$(awk -v n="$name" '(n == "all" || $1 == n) && $3 > m { m = $3 }
                                          END { printf "%.1f", m / 1024 }' "$W/$s.samples")
        PEAKANON[$name.$s]=$(awk -v n="$name" '(n == "all" || $1 == n) && $4 > m { m = $4 }
                                              END { printf "%.1f", m / 1024 }' "$W/$s.samples")
    done
done

echo
echo "Peak resident memory (VmRSS, MiB; anonymous part in brackets) of each server"
echo "while fio ran each phase for ${phase_secs}s against a $size image with all its L2 tables:"
echo
printf '| %-14s |' phase
for s in "${RUN[@]}"; do printf ' %s |' "${LABEL[$s]}"; done
echo
printf '|%s|' "----------------"
for s in "${RUN[@]}"; do printf '%s|' "---"; done
echo
for p in "${PHASES[@]}" "after" "all"; do
    name=${p%% *}
    [ "$name" = all ] && label="whole run" || label=$name
    [ "$name" = after ] && label="idle after"
    printf '| %-14s |' "$label"
    for s in "${RUN[@]}"; do printf ' %s (%s) |' "${PEAK[$name.$s]}" "${PEAKANON[$name.$s]}"; done
    echo
done
echo
# The bound a plugin column is held to, phase by phase: cache-size + 16 MiB,
# plus what nbdkit's core holds for the phase's requests in any plugin (one
# buffer per worker thread, NBDKIT_THREADS a connection, as large as the
# largest request); nothing more once the connections are gone.
status=0
for s in "${RUN[@]}"; do
    case ${KIND[$s]} in plugin|other) ;; *) continue ;; esac
    c=${ARGS[$s]%% *}; c=${c#cache-size=}
    limit=$(( $(bench_size_bytes "$c") / 1048576 + 16 ))
    over=
    for p in "${PHASES[@]}" after; do
        read -r name _ bs _ jobs _ <<<"$p"
        core=0
        [ "$name" = after ] ||
            core=$(( NBDKIT_THREADS * jobs * $(bench_size_bytes "$bs") / 1048576 ))
        if awk -v p="${PEAK[$name.$s]}" -v l="$((limit + core))" 'BEGIN { exit !(p > l) }'; then
            over+=" $name: ${PEAK[$name.$s]} MiB > $((limit + core)) MiB;"
        fi
    done
    if [ -n "$over" ]; then
        echo "${LABEL[$s]}: over cache-size + 16 MiB = $limit MiB (+ nbdkit's request buffers):$over"
        status=1
    else
        echo "${LABEL[$s]}: within cache-size + 16 MiB = $limit MiB in every phase, beside nbdkit's request buffers ($NBDKIT_THREADS threads x connections x request size; none once idle)"
    fi
done
exit $status
