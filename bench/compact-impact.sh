#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# What compaction costs the guest: fio IOPS and p99 latency on an image
# whose hot data must move, with compaction running (compact=auto at the
# given rate) and without it (compact=off), and how fast it moves.
# See bench/README.md.
set -eu

usage() {
    cat <<EOF
Usage: $0 [-d DIR] [-t SECONDS] [-R ROUNDS] [-s SIZE] [-c RATE] [-o FILE] [-k]

  -d DIR      where the images go (default \$BENCH_DIR, else /var/tmp)
  -t SECONDS  measured time of each fio run (default 10)
  -R ROUNDS   rounds of each test and mode; medians are reported (default 3)
  -s SIZE     the region fio works on (default 512M); the image is 4 x SIZE
  -c RATE     compact-rate of the compacting runs (default 64M)
  -o FILE     also write the results table as CSV to FILE
  -k          keep the work directory

Environment: PLUGIN, PYTHON, BENCH_DIR (see bench/README.md).
EOF
}

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parent=${BENCH_DIR:-/var/tmp}
runtime=10
rounds=3
size=512M
rate=64M
csv=
while getopts d:t:R:s:c:o:kh opt; do
    case $opt in
        d) parent=$OPTARG ;;
        t) runtime=$OPTARG ;;
        R) rounds=$OPTARG ;;
        s) size=$OPTARG ;;
        c) rate=$OPTARG ;;
        o) csv=$OPTARG ;;
        k) BENCH_KEEP=1 ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || { usage >&2; exit 2; }
bench_count -t "$runtime" seconds
bench_count -R "$rounds"
hot=$(bench_size_bytes "$size")
[ $((hot % (64 << 20))) -eq 0 ] || bench_die "-s wants a multiple of 64M"
bench_require_tools fio qemu-img qemu-io nbdkit "$PYTHON"
plugin_available || bench_die "the qcow2reclaim plugin is not built: $PLUGIN"

bench_workdir_create "$parent"
bench_install_trap
W=$BENCH_WORK
cp "$PLUGIN" "$W/plugin.so"
PLUGIN=$W/plugin.so
bench_check_space "$W" $((6 * hot + (64 << 20)))
bench_warn_if_busy

# The template: the cold region (guest 1 x SIZE .. 4 x SIZE) is written
# first, so it takes the low host clusters; then the hot region fio uses
# (guest 0 .. SIZE), which lands at the end of the file; then three
# quarters of the cold region is discarded in 64 KiB pieces.  The hot data
# then sits past the target and compaction must move it, under fio.
bench_msg "making a $((4 * hot >> 20)) MiB image whose hot $((hot >> 20)) MiB sits at the end"
qemu-img create -q -f qcow2 "$W/template.qcow2" $((4 * hot))
fio --name=fill --ioengine=psync --rw=write --bs=1M --size=$((3 * hot)) \
    --offset=$hot --filename="$W/fill.raw" --refill_buffers=1 \
    --buffer_compress_percentage=0 --output="$W/fill.log" >/dev/null 2>&1 ||
    bench_die "fio could not write the fill data"
"$PYTHON" - "$W/template.qcow2" "$W/fill.raw" "$hot" <<'EOF'
import subprocess, sys
img, raw, hot = sys.argv[1], sys.argv[2], int(sys.argv[3])
def qio(cmds):
    args = []
    for c in cmds:
        args += ["-c", c]
    subprocess.run(["qemu-io", "-f", "qcow2"] + args + [img], check=True,
                   stdout=subprocess.DEVNULL)
qio(["write -P 0x21 %d %d" % (off, 64 << 20) for off in range(hot, 4 * hot, 64 << 20)])
qio(["write -P 0x42 %d %d" % (off, 64 << 20) for off in range(0, hot, 64 << 20)])
qio(["discard %d 65536" % off for off in range(hot, 4 * hot, 65536) if (off >> 16) % 4])
EOF
rm -f "$W/fill.raw"
bench_msg "template: $(( $(stat -c %s "$W/template.qcow2") >> 20 )) MiB long, $(( $(stat -c %b "$W/template.qcow2") * 512 >> 20 )) MiB allocated"

# p99 completion latency in microseconds, over the directions that ran.
fio_p99() {
    "$PYTHON" - "$1" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.find('{'):])['jobs'][0]
worst = 0
for d in ('read', 'write'):
    p = job[d].get('clat_ns', {}).get('percentile', {})
    if job[d]['total_ios'] and '99.000000' in p:
        worst = max(worst, p['99.000000'])
print('%.0f' % (worst / 1000))
EOF
}

TESTS=("randread 4k 16" "randwrite 4k 16")
declare -A IOPS P99 MOVED
runs=$((${#TESTS[@]} * rounds * 2)) n=0
for t in "${TESTS[@]}"; do
    read -r rw bs depth <<<"$t"
    for ((r = 0; r < rounds; r++)); do
        # Alternate which mode goes first, so neither always follows the other.
        for mode in $([ $((r % 2)) = 0 ] && echo "off auto" || echo "auto off"); do
            n=$((n + 1))
            img=$W/$mode.qcow2
            fresh_copy "$W/template.qcow2" "$img"
            sync
            serve_plugin "$img" "$W/$mode.sock" "$W/$mode.log" compact=$mode \
                compact-rate="$rate" statsfile="$W/$mode.stats"
            pid=$SERVER_PID
            json=$W/$rw.$mode.$r.json
            run_fio "$(nbd_uri "$W/$mode.sock")" "$rw" "$bs" "$depth" "$runtime" 0 "$json" \
                --size=$hot
            iops=$(fio_figure "$json" iops)
            p99=$(fio_p99 "$json")
            stop_server "$pid" || true
            moved=$(grep -o 'bytes_moved=[0-9]*' "$W/$mode.log" | tail -n 1)
            moved=${moved#*=}
            IOPS[$rw.$mode]="${IOPS[$rw.$mode]:-} $iops"
            P99[$rw.$mode]="${P99[$rw.$mode]:-} $p99"
            MOVED[$rw.$mode]="${MOVED[$rw.$mode]:-} ${moved:-0}"
            qemu-img check -q "$img" || bench_die "qemu-img check found problems after $rw with compact=$mode"
            bench_msg "[$n/$runs] $rw $bs compact=$mode: $iops IOPS, p99 ${p99} us, moved $(( ${moved:-0} >> 20 )) MiB during the run"
            rm -f "$img"
        done
    done
done

row() { printf '%-10s %12s %12s %7s %10s %10s %14s\n' "$@"; }
row test "IOPS idle" "compacting" ratio "p99 idle" "compacting" "moved (MiB/s)"
[ -z "$csv" ] || echo "test,iops_idle,iops_compacting,ratio,p99_us_idle,p99_us_compacting,moved_mib_per_s" >"$csv"
for t in "${TESTS[@]}"; do
    read -r rw bs depth <<<"$t"
    # shellcheck disable=SC2086 # figures are separate words
    i0=$(bench_median ${IOPS[$rw.off]}) i1=$(bench_median ${IOPS[$rw.auto]})
    # shellcheck disable=SC2086
    p0=$(bench_median ${P99[$rw.off]}) p1=$(bench_median ${P99[$rw.auto]})
    # shellcheck disable=SC2086
    m=$(bench_median ${MOVED[$rw.auto]})
    ratio=$(awk -v a="$i1" -v b="$i0" 'BEGIN { printf "%.2f", b ? a / b : 0 }')
    mps=$(awk -v m="$m" -v t="$runtime" 'BEGIN { printf "%.1f", m / 1048576 / t }')
    row "$rw-$bs" "$i0" "$i1" "$ratio" "${p0}us" "${p1}us" "$mps"
    [ -z "$csv" ] || echo "$rw-$bs,$i0,$i1,$ratio,$p0,$p1,$mps" >>"$csv"
done
bench_msg "moved (MiB/s) is what compaction moved during the measured time, per second: at most the rate, $rate/s"
