#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# fio over NBD on a LUKS-encrypted qcow2 image (aes-256-xts, qemu-img's
# default): qemu-nbd (--object secret --image-opts) against the qcow2reclaim
# plugin (passphrase=), each on its own copy of the same prefilled image.
# See bench/README.md.
set -eu

usage() {
    cat <<EOF
Usage: $0 [-d DIR] [-t SECONDS] [-r SECONDS] [-s SIZE] [-k]

  -d DIR      where the images go (default \$BENCH_DIR, else /var/tmp)
  -t SECONDS  measured time of each fio run (default 20)
  -r SECONDS  ramp time before each run, not measured (default 2)
  -s SIZE     virtual disk size (default 1G); needs about 4 x SIZE free
  -k          keep the work directory (fio JSON, server logs)

Environment: PLUGIN, BENCH_DIR, PYTHON, as for fio-vs-qemu-nbd.sh.
EOF
}

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parent=${BENCH_DIR:-/var/tmp}
runtime=20
ramp=2
size=1G
while getopts d:t:r:s:kh opt; do
    case $opt in
        d) parent=$OPTARG ;;
        t) runtime=$OPTARG ;;
        r) ramp=$OPTARG ;;
        s) size=$OPTARG ;;
        k) BENCH_KEEP=1 ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || { usage >&2; exit 2; }
bench_count -t "$runtime" seconds
bench_count0 -r "$ramp" seconds
size_bytes=$(bench_size_bytes "$size")
bench_require_tools fio qemu-nbd qemu-img nbdkit "$PYTHON"
plugin_available || bench_die "the qcow2reclaim plugin is not built: $PLUGIN"

PASS=bench-passphrase
SECRET=(--object "secret,id=s0,data=$PASS")
TESTS=(
    "randread-4k    randread  4k  16 iops"
    "randwrite-4k   randwrite 4k  16 iops"
    "seqread-1m     read      1m  4  mibs"
    "seqwrite-1m    write     1m  4  mibs"
)

bench_workdir_create "$parent"
bench_install_trap
W=$BENCH_WORK
cp "$PLUGIN" "$W/plugin.so" || bench_die "cannot copy $PLUGIN"
PLUGIN=$W/plugin.so
bench_check_space "$W" $((4 * size_bytes + (64 << 20)))
bench_warn_if_busy

bench_msg "writing a $size LUKS image of random data (aes-256-xts, 64 KiB clusters)"
make_prefilled_images "$size_bytes" "$W/template.raw" "$W/plain.qcow2" 64k
rm -f "$W/plain.qcow2"
qemu-img convert "${SECRET[@]}" -f raw -O qcow2 \
    -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100 \
    "$W/template.raw" "$W/template.qcow2" || bench_die "qemu-img convert to LUKS failed"
rm -f "$W/template.raw"
fresh_copy "$W/template.qcow2" "$W/qemu.qcow2"
fresh_copy "$W/template.qcow2" "$W/plugin.qcow2"
rm -f "$W/template.qcow2"
# Both copies cached in the same shape (bench/README.md, "Fairness: the
# page cache"), and what the host takes back between runs read back first.
page_cache_even "$W/qemu.qcow2" "$W/plugin.qcow2"

opts() { echo "driver=qcow2,file.filename=$1,file.aio=io_uring,encrypt.key-secret=s0"; }
bench_start qemu-nbd "$W/qemu.sock" "$W/qemu.log" \
    qemu-nbd --discard=unmap -t -e 16 -k "$W/qemu.sock" "${SECRET[@]}" \
             --image-opts "$(opts "$W/qemu.qcow2")"
QEMU_PID=$SERVER_PID
serve_plugin "$W/plugin.qcow2" "$W/plugin.sock" "$W/plugin.log" passphrase="$PASS"
PLUGIN_PID=$SERVER_PID

declare -A RESULT
for t in "${TESTS[@]}"; do
    read -r name rw bs depth metric <<<"$t"
    for s in qemu plugin; do
        pid=$([ $s = qemu ] && echo "$QEMU_PID" || echo "$PLUGIN_PID")
        server_check "$pid"
        sync
        page_cache_refill "$W/$s.qcow2" >/dev/null
        json=$W/$name.$s.json
        bench_cpu_mark "$pid"
        run_fio "$(nbd_uri "$W/$s.sock")" "$rw" "$bs" "$depth" "$runtime" "$ramp" "$json"
        busy=$(bench_cpu_other "$pid")
        RESULT[$name.$s]=$(fio_figure "$json" "$metric") || bench_die "cannot read $json"
        bench_msg "$name on $s: ${RESULT[$name.$s]} $metric (other processes: $busy CPUs)"
    done
done

stop_server "$QEMU_PID" || bench_msg "warning: qemu-nbd exited with status $?"
stop_server "$PLUGIN_PID" || bench_msg "warning: the plugin exited with status $?"
for s in qemu plugin; do
    out=$(qemu-img check "${SECRET[@]}" --image-opts \
          "driver=qcow2,file.filename=$W/$s.qcow2,encrypt.key-secret=s0" 2>&1) ||
        { echo "$out" >&2; bench_msg "error: qemu-img check found problems in the $s image"; }
done

printf '%-14s %-6s %12s %13s %8s\n' test metric qemu-nbd qcow2reclaim vs-qemu
for t in "${TESTS[@]}"; do
    read -r name rw bs depth metric <<<"$t"
    unit=$([ "$metric" = iops ] && echo IOPS || echo MiB/s)
    printf '%-14s %-6s %12s %13s %8s\n' "$name" "$unit" "${RESULT[$name.qemu]}" \
        "${RESULT[$name.plugin]}" \
        "$(awk -v a="${RESULT[$name.plugin]}" -v b="${RESULT[$name.qemu]}" \
           'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }')"
done
