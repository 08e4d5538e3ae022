#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# What a TRIM of part of a cluster costs the client, the request fstrim
# sends most on a fragmented filesystem: qemu-nbd (which ignores it) against
# the qcow2reclaim plugin (which punches it, deferred) and nbdkit's file
# plugin on the same data raw (which punches it at once), with nbdkit's
# null plugin (which does nothing: nbdkit's own floor).  One client sends
# two TRIMs per 64 KiB cluster (8 KiB and 4 KiB, host-block aligned) over
# the first SIZE of a prefilled image, one request at a time as fstrim
# does, then a flush.  Reported: microseconds per TRIM answered, seconds
# until the flush returned (when the space is back), and the host space
# given back.  See bench/README.md.
set -eu
export LC_ALL=C

usage() {
    cat <<EOF
Usage: $0 [-d DIR] [-R ROUNDS] [-s SIZE] [-k]

  -d DIR        where the images go (default \$BENCH_DIR, else /var/tmp)
  -R ROUNDS     runs per server; medians are reported (default 3)
  -s SIZE       how much of the image is trimmed (default 400M: 12,800
                TRIMs)
  -k            keep the work directory

Environment: PLUGIN, BENCH_DIR, PYTHON.
EOF
}

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parent=${BENCH_DIR:-/var/tmp}
rounds=3
size=400M
while getopts d:R:s:kh opt; do
    case $opt in
        d) parent=$OPTARG ;;
        R) rounds=$OPTARG ;;
        s) size=$OPTARG ;;
        k) BENCH_KEEP=1 ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || { usage >&2; exit 2; }
bench_count -R "$rounds"
size_bytes=$(bench_size_bytes "$size")
bench_require_tools fio qemu-nbd qemu-img nbdkit "$PYTHON"
plugin_available || bench_die "the qcow2reclaim plugin is not built: $PLUGIN"
"$PYTHON" -c 'import nbd' 2>/dev/null || bench_die "$PYTHON has no nbd module (Debian: python3-libnbd)"

bench_workdir_create "$parent"
bench_install_trap
W=$BENCH_WORK
bench_check_space "$W" $((size_bytes * 5))
bench_warn_if_busy
make_prefilled_images "$size_bytes" "$W/template.raw" "$W/template.qcow2" 64k

cat >"$W/trims.py" <<'EOF'
import nbd, sys, time
sock, size = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_unix(sock)
t0 = time.monotonic()
n = 0
for c in range(0, size, 65536):
    h.trim(8192, c + 8192)
    h.trim(4096, c + 40960)
    n += 2
t1 = time.monotonic()
h.flush()
t2 = time.monotonic()
h.shutdown()
print("%.1f %.3f" % ((t1 - t0) / n * 1e6, t2 - t0))
EOF

alloc_of() { echo $(($(stat -c %b "$1") * 512)); }

# nbdkit-null answers every TRIM without doing anything: what is left is
# nbdkit's own request path, the floor of any nbdkit plugin.
declare -A LABEL=([qemu]=qemu-nbd [plugin]=qcow2reclaim [file]=nbdkit-file [null]=nbdkit-null) LAT TOTAL FREED
for ((r = 0; r < rounds; r++)); do
    for s in qemu plugin file null; do
        img=
        case $s in
            file) img=$W/$s.raw; fresh_copy "$W/template.raw" "$img" ;;
            null) ;;
            *)    img=$W/$s.qcow2; fresh_copy "$W/template.qcow2" "$img" ;;
        esac
        sync
        [ -z "$img" ] || before=$(alloc_of "$img")
        case $s in
            qemu)   serve_qemu "$img" "$W/$s.sock" "$W/$s.log" ;;
            plugin) serve_plugin "$img" "$W/$s.sock" "$W/$s.log" compact=off ;;
            file)   serve_file "$img" "$W/$s.sock" "$W/$s.log" ;;
            null)   bench_start nbdkit-null "$W/$s.sock" "$W/$s.log" \
                        nbdkit -f --exit-with-parent -U "$W/$s.sock" null size="$size_bytes" ;;
        esac
        pid=$SERVER_PID
        read -r lat total < <("$PYTHON" "$W/trims.py" "$W/$s.sock" "$size_bytes") ||
            bench_die "the TRIMs to ${LABEL[$s]} failed"
        stop_server "$pid" || bench_die "${LABEL[$s]} exited with an error (log: $W/$s.log)"
        LAT[$s]="${LAT[$s]:-} $lat"
        TOTAL[$s]="${TOTAL[$s]:-} $total"
        if [ -n "$img" ]; then
            freed=$(((before - $(alloc_of "$img")) / 1048576))
            FREED[$s]="${FREED[$s]:-} $freed"
            bench_msg "round $((r + 1)) ${LABEL[$s]}: ${lat} us a TRIM, ${total} s with the flush, $freed MiB given back"
            rm -f "$img"
        else
            bench_msg "round $((r + 1)) ${LABEL[$s]}: ${lat} us a TRIM, ${total} s with the flush"
        fi
    done
done

n=$((size_bytes / 65536 * 2))
echo
echo "$n TRIMs of 8 or 4 KiB inside 64 KiB clusters, one at a time, then a flush (median of $rounds):"
echo
echo "| | qemu-nbd | qcow2reclaim | nbdkit-file (raw) | nbdkit-null |"
echo "|---|---|---|---|---|"
# shellcheck disable=SC2086 # separate words
echo "| µs per TRIM answered | $(bench_median ${LAT[qemu]}) | $(bench_median ${LAT[plugin]}) | $(bench_median ${LAT[file]}) | $(bench_median ${LAT[null]}) |"
# shellcheck disable=SC2086
echo "| s until the flush returned | $(bench_median ${TOTAL[qemu]}) | $(bench_median ${TOTAL[plugin]}) | $(bench_median ${TOTAL[file]}) | $(bench_median ${TOTAL[null]}) |"
# shellcheck disable=SC2086
echo "| MiB given back | $(bench_median ${FREED[qemu]}) | $(bench_median ${FREED[plugin]}) | $(bench_median ${FREED[file]}) | - |"
