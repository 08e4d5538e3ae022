#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# How long from starting a server to the answer of its first read, for a
# 1 TiB image with 100 GiB allocated: qemu-nbd against the qcow2reclaim
# plugin (and nbdkit's file plugin on a sparse raw file of the same size,
# the start-up of nbdkit itself), with the host page cache dropped before each start (cold) and
# kept (warm).  See bench/README.md.
set -eu

usage() {
    cat <<EOF
Usage: $0 [-d DIR] [-R ROUNDS] [-s SIZE] [-a ALLOCATED] [-k]

  -d DIR        where the image goes (default \$BENCH_DIR, else /var/tmp)
  -R ROUNDS     starts per server and cache state; medians are reported
                (default 5)
  -s SIZE       virtual disk size (default 1T)
  -a ALLOCATED  how much of it is allocated, with preallocation=metadata
                (default 100G)
  -k            keep the work directory

Cold starts drop the page cache (echo 3 > /proc/sys/vm/drop_caches),
which needs root; without it only warm starts are measured.
Environment: PLUGIN, BENCH_DIR, PYTHON.
EOF
}

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parent=${BENCH_DIR:-/var/tmp}
rounds=5
size=1T
allocated=100G
while getopts d:R:s:a:kh opt; do
    case $opt in
        d) parent=$OPTARG ;;
        R) rounds=$OPTARG ;;
        s) size=$OPTARG ;;
        a) allocated=$OPTARG ;;
        k) BENCH_KEEP=1 ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || { usage >&2; exit 2; }
bench_count -R "$rounds"
size_bytes=$(bench_size_bytes "$size")
alloc_bytes=$(bench_size_bytes "$allocated")
[ "$alloc_bytes" -le "$size_bytes" ] || bench_die "-a $allocated is more than -s $size"
bench_require_tools qemu-nbd qemu-img nbdkit "$PYTHON"
plugin_available || bench_die "the qcow2reclaim plugin is not built: $PLUGIN"
"$PYTHON" -c 'import nbd' 2>/dev/null || bench_die "$PYTHON has no nbd module (Debian: python3-libnbd)"
cold=1
if [ "$(id -u)" != 0 ] || ! [ -w /proc/sys/vm/drop_caches ]; then
    bench_msg "not root: cold starts (dropped page cache) are left out"
    cold=0
fi

bench_workdir_create "$parent"
bench_install_trap
W=$BENCH_WORK
cp "$PLUGIN" "$W/plugin.so" || bench_die "cannot copy $PLUGIN"
PLUGIN=$W/plugin.so
bench_msg "creating a $size image with $allocated allocated (preallocation=metadata, then resized)"
qemu-img create -q -f qcow2 -o preallocation=metadata,cluster_size=64k "$W/image.qcow2" "$alloc_bytes"
qemu-img resize -q "$W/image.qcow2" "$size_bytes"
cp --sparse=always "$W/image.qcow2" "$W/qemu.qcow2"
truncate -s "$size_bytes" "$W/image.raw"

# first_read.py STATE SOCK OFFSET LOG CMD...: with the client already
# loaded, drop the page cache (cold), start CMD, connect as soon as the
# socket answers and read 4 KiB at OFFSET; print the milliseconds from
# starting CMD to the answer, then stop CMD.
cat >"$W/first_read.py" <<'EOF'
import nbd, os, signal, subprocess, sys, time
state, sock, off, log, cmd = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:]
if os.path.exists(sock):
    os.unlink(sock)
if state == "cold":
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
t0 = time.monotonic()
p = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
while True:
    h = nbd.NBD()
    try:
        h.connect_unix(sock)
        break
    except nbd.Error:
        if p.poll() is not None or time.monotonic() - t0 > 30:
            sys.exit("no server on %s (log: %s)" % (sock, log))
        time.sleep(0.001)
h.pread(4096, off)
ms = (time.monotonic() - t0) * 1000
h.shutdown()
p.send_signal(signal.SIGTERM)
p.wait(60)
print("%.1f" % ms)
EOF

# one SERVER STATE: start, first read, stop; prints the milliseconds.
one() {
    local s=$1 state=$2 cmd
    case $s in
        plugin) cmd=(nbdkit -f -U "$W/sock" "$PLUGIN" file="$W/image.qcow2") ;;
        qemu)   cmd=(qemu-nbd -t -f qcow2 -k "$W/sock" "$W/qemu.qcow2") ;;
        file)   cmd=(nbdkit -f -U "$W/sock" file file="$W/image.raw") ;;
    esac
    "$PYTHON" "$W/first_read.py" "$state" "$W/sock" $((alloc_bytes / 2)) "$W/$s.log" "${cmd[@]}" ||
        { cat "$W/$s.log" >&2; bench_die "$s did not answer a first read"; }
}

declare -A LABEL=([plugin]=qcow2reclaim [qemu]=qemu-nbd [file]=nbdkit-file) RES
states=(warm)
[ "$cold" = 1 ] && states=(cold warm)
for state in "${states[@]}"; do
    for s in qemu plugin file; do
        figs=
        for ((r = 0; r < rounds; r++)); do figs="$figs $(one "$s" "$state")"; done
        # shellcheck disable=SC2086 # separate words
        RES[$s.$state]=$(bench_median $figs)
        bench_msg "${LABEL[$s]} $state:$figs ms"
    done
done

echo
echo "Start to first 4 KiB read answered, ms (median of $rounds), $size image with $allocated allocated:"
echo
echo "| page cache | qemu-nbd | qcow2reclaim | nbdkit-file (sparse raw) |"
echo "|---|---|---|---|"
for state in "${states[@]}"; do
    echo "| $state | ${RES[qemu.$state]} | ${RES[plugin.$state]} | ${RES[file.$state]} |"
done
