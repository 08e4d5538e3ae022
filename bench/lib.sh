# SPDX-License-Identifier: BSD-3-Clause
# Shared helpers for the qcow2reclaim benchmarks: tool checks, the work
# directory, the prefilled test image, NBD servers on Unix sockets, fio runs
# and reading fio's JSON.  Source it from a bash script running with set -eu:
#
#   . "$(dirname "$0")/lib.sh"
#   bench_require_tools fio qemu-nbd nbdkit
#   bench_workdir_create "${BENCH_DIR:-/var/tmp}"
#   bench_install_trap
#   serve_qemu "$BENCH_WORK/a.qcow2" "$BENCH_WORK/a.sock" "$BENCH_WORK/a.log"
#   run_fio "$(nbd_uri "$BENCH_WORK/a.sock")" randread 4k 16 20 2 out.json
#   fio_figure out.json iops
#
# The serve_* functions start the server in the background of the calling
# shell and set SERVER_PID; call them directly, never inside $(...), or the
# server is not tracked and not stopped by the exit trap.

BENCH_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The plugin as libtool leaves it in the build tree; override with PLUGIN=.
PLUGIN=${PLUGIN:-$BENCH_LIB_DIR/../plugin/.libs/nbdkit-qcow2reclaim-plugin.so}

if [ -z "${PYTHON:-}" ]; then
    if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3
    else PYTHON=$(command -v python3 || echo python3); fi
fi

BENCH_WORK=           # this run's private directory, removed on exit
BENCH_KEEP=0          # 1: keep BENCH_WORK (fio JSON, server logs) on exit
BENCH_PIDS=()         # servers started by serve_*, stopped on exit
declare -A BENCH_PID_NAME=()
declare -A BENCH_PID_LOG=()
SERVER_PID=

bench_msg() { printf 'bench: %s\n' "$*" >&2; }
bench_die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }

# The Debian package that provides each tool, for the error message.
bench_package_of() {
    case $1 in
        fio) echo fio ;;
        qemu-nbd|qemu-img|qemu-io) echo qemu-utils ;;
        nbdkit) echo nbdkit ;;
        nbdinfo) echo libnbd-bin ;;
        python3|*/python3) echo python3 ;;
        *) echo "$1" ;;
    esac
}

# bench_require_tools TOOL...: exit with a clear message naming the Debian
# package of the first tool that is missing.  fio must have the nbd engine.
bench_require_tools() {
    local t missing=
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 ||
            missing="$missing $t (apt-get install $(bench_package_of "$t"))"
    done
    [ -z "$missing" ] || bench_die "required tool(s) not found:$missing"
    for t in "$@"; do
        if [ "$t" = fio ] && ! fio --enghelp=nbd 2>/dev/null | grep -q '^ *uri'; then
            bench_die "this fio has no nbd ioengine (fio --enghelp=nbd fails); install Debian's fio, which is built with libnbd"
        fi
    done
}

# bench_count OPTION VALUE [UNIT]: VALUE must be a whole number above 0
# (of UNIT, for the message); bench_count0 allows 0.
bench_count() {
    case $2 in ''|*[!0-9]*|0) bench_die "$1 wants a whole number${3:+ of $3} > 0, not '$2'" ;; esac
}
bench_count0() {
    case $2 in ''|*[!0-9]*) bench_die "$1 wants a whole number${3:+ of $3}, not '$2'" ;; esac
}

# bench_size_bytes SIZE: 2G, 512M, 1073741824 -> bytes (powers of 1024).
bench_size_bytes() {
    local s=$1
    case $s in *[kKmMgGtT]) s=${s^^} ;; esac
    numfmt --from=iec "$s" 2>/dev/null || bench_die "not a size: $1 (use e.g. 2G or 512M)"
}

# bench_workdir_create PARENT: a fresh private directory under PARENT, so the
# caller's directory itself is never removed.  Sets BENCH_WORK.
bench_workdir_create() {
    local parent=$1
    [ -d "$parent" ] || bench_die "work directory $parent does not exist"
    [ -w "$parent" ] || bench_die "work directory $parent is not writable"
    BENCH_WORK=$(mktemp -d "$parent/qcow2reclaim-bench.XXXXXX") ||
        bench_die "cannot create a directory under $parent"
}

# bench_check_space DIR BYTES: fail early rather than midway through a copy.
bench_check_space() {
    local avail
    avail=$(df -P -B1 "$1" | awk 'NR == 2 { print $4 }')
    [ -n "$avail" ] || return 0
    [ "$avail" -ge "$2" ] ||
        bench_die "$1 has $((avail >> 20)) MiB free, the benchmark needs $(($2 >> 20)) MiB (choose another directory with -d)"
}

bench_cleanup() {
    stop_all_servers
    if [ -n "$BENCH_WORK" ] && [ -d "$BENCH_WORK" ]; then
        if [ "$BENCH_KEEP" = 1 ]; then
            bench_msg "kept the work directory $BENCH_WORK"
        else
            rm -rf "$BENCH_WORK"
        fi
    fi
}

# Servers are stopped and the work directory removed however the script ends.
bench_install_trap() {
    trap 'bench_cleanup' EXIT
    trap 'bench_msg interrupted; exit 130' INT
    trap 'bench_msg terminated; exit 143' TERM
}

# make_prefilled_images SIZE RAW QCOW2 [CLUSTER]: RAW gets SIZE bytes of
# pseudo-random data (no zero block anywhere, so nothing is left sparse), and
# QCOW2 the same contents with every cluster allocated.  fio writes the random
# data: it is several times faster than /dev/urandom.
make_prefilled_images() {
    local size=$1 raw=$2 qcow2=$3 cluster=${4:-64k}
    fio --name=prefill --filename="$raw" --ioengine=psync --rw=write --bs=1M \
        --size="$size" --refill_buffers=1 --buffer_compress_percentage=0 \
        --randrepeat=0 --output="$raw.fio.log" >/dev/null 2>&1 ||
        { cat "$raw.fio.log" >&2 2>/dev/null; bench_die "fio could not write $raw"; }
    rm -f "$raw.fio.log"
    qemu-img convert -f raw -O qcow2 -o cluster_size="$cluster" "$raw" "$qcow2" ||
        bench_die "qemu-img convert to $qcow2 failed"
}

# page_cache_even FILE...: every FILE in the host page cache in the same
# shape, whatever wrote it.  ext4 on recent kernels caches a file in folios
# as large as the write or readahead that brought the pages in, and a 4 KiB
# write walks every block of the folio it lands in, so images with
# different histories (fio, qemu-img convert, cp) take small writes at
# different speeds whoever serves them (bench/README.md, "Fairness: the
# page cache", has the figures).  The pages are written back, dropped, and
# read again with readahead off, which caches them as single pages.
page_cache_even() {
    sync
    "$PYTHON" - "$@" <<'EOF' || bench_die "cannot read $* back into the page cache"
import os, sys
buf = bytearray(1 << 20)
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    off = 0
    while True:
        n = os.preadv(fd, [buf], off)
        if n <= 0:
            break
        off += n
    os.close(fd)
EOF
}

# page_cache_refill FILE...: reads back, with readahead off, the pages of
# each FILE that have left the page cache since page_cache_even, and prints
# how many bytes that was.  Some hosts reclaim page cache that has not been
# touched for a few seconds even with most of the memory free (the DAMON
# "pageout" scheme of the machines bench/README.md was measured on), so the
# image of a server that sat idle through the other servers' runs loses
# pages, and its next run would pay disk reads the others do not.  Pages
# still cached are left as they are: their shape is page_cache_even's.
page_cache_refill() {
    "$PYTHON" - "$@" <<'EOF' || bench_die "cannot read $* back into the page cache"
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                      ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
page = os.sysconf("SC_PAGE_SIZE")
total = 0
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    pages = (size + page - 1) // page
    if pages == 0:
        os.close(fd)
        continue
    # mincore looks at the pages of a mapping without faulting them in.
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        sys.exit("cannot map %s: %s" % (path, os.strerror(ctypes.get_errno())))
    vec = (ctypes.c_ubyte * pages)()
    if libc.mincore(addr, size, vec) != 0:
        sys.exit("mincore of %s: %s" % (path, os.strerror(ctypes.get_errno())))
    libc.munmap(addr, size)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    i = 0
    while i < pages:
        if vec[i] & 1:
            i += 1
            continue
        j = i
        while j < pages and not vec[j] & 1 and j - i < 256:
            j += 1
        n = os.preadv(fd, [bytearray((j - i) * page)], i * page)
        total += max(n, 0)
        i = j
    os.close(fd)
print(total)
EOF
}

# bench_cpu_speed: the spread of the time one fixed loop takes, ten times,
# as "FASTEST SLOWEST" milliseconds.  Some hosts give a VM's CPUs less speed
# at times without counting it as steal (a busy sibling hyperthread, other
# tenants); on a quiet machine the ten stay within a few percent of each
# other, and a wide spread means single runs differ by as much, whoever they
# measure.
bench_cpu_speed() {
    "$PYTHON" - <<'EOF'
import time
times = []
for _ in range(10):
    t = time.perf_counter()
    x = 0
    for i in range(300000):
        x += i
    times.append((time.perf_counter() - t) * 1000)
print("%.1f %.1f" % (min(times), max(times)))
EOF
}

# bench_warn_cpu_speed WHEN: bench_cpu_speed, said, with a warning when the
# slowest loop took more than 1.25 times the fastest.
bench_warn_cpu_speed() {
    local fast slow
    read -r fast slow <<<"$(bench_cpu_speed)"
    if awk -v f="$fast" -v s="$slow" 'BEGIN { exit !(s > 1.25 * f) }'; then
        bench_msg "warning: $1, the same CPU loop took $fast to $slow ms: the host is changing this VM's CPU speed (not counted as steal), so single runs differ by as much; use more rounds (-R) and trust only large gaps"
    else
        bench_msg "$1, the same CPU loop took $fast to $slow ms (steady)"
    fi
}

# fresh_copy SRC DST: an independent copy, holes kept as holes.
fresh_copy() {
    cp --sparse=always "$1" "$2" || bench_die "cannot copy $1 to $2"
}

nbd_uri() { printf 'nbd+unix:///?socket=%s\n' "$1"; }

# bench_start NAME SOCK LOG CMD...: run CMD in the background with its output
# in LOG, record it for the exit trap, wait until SOCK accepts NBD clients.
bench_start() {
    local name=$1 sock=$2 log=$3; shift 3
    rm -f "$sock"
    "$@" >"$log" 2>&1 &
    SERVER_PID=$!
    BENCH_PIDS+=("$SERVER_PID")
    BENCH_PID_NAME[$SERVER_PID]=$name
    BENCH_PID_LOG[$SERVER_PID]=$log
    wait_for_server "$SERVER_PID" "$sock" 30
}

# wait_for_server PID SOCK [SECONDS]: the socket exists and, when nbdinfo is
# installed, a client completes the NBD handshake on it.
wait_for_server() {
    local pid=$1 sock=$2 limit=${3:-60}
    local deadline=$((SECONDS + limit))
    while [ "$SECONDS" -lt "$deadline" ]; do
        server_check "$pid"
        if [ -S "$sock" ]; then
            if ! command -v nbdinfo >/dev/null 2>&1; then return 0; fi
            # A server can accept and then never answer: bound each probe.
            timeout 5 nbdinfo --size "$(nbd_uri "$sock")" >/dev/null 2>&1 && return 0
        fi
        sleep 0.1
    done
    bench_die "${BENCH_PID_NAME[$pid]:-server} did not serve on $sock within ${limit}s (log: ${BENCH_PID_LOG[$pid]:-none})"
}

# server_check PID: exit with the server's log if it is no longer running.
server_check() {
    local pid=$1 log=${BENCH_PID_LOG[$1]:-}
    kill -0 "$pid" 2>/dev/null && return 0
    wait "$pid" 2>/dev/null || true
    if [ -n "$log" ] && [ -s "$log" ]; then
        bench_msg "last lines of $log:"
        tail -n 20 "$log" >&2
    fi
    bench_die "${BENCH_PID_NAME[$pid]:-server} (pid $pid) is not running"
}

# serve_qemu IMAGE SOCK LOG [ARGS...]: qemu-nbd on a qcow2 image.  Its cache
# mode is left at the default, writeback, i.e. through the host page cache,
# like the nbdkit plugins.
serve_qemu() {
    local image=$1 sock=$2 log=$3; shift 3
    bench_start qemu-nbd "$sock" "$log" \
        qemu-nbd --aio=io_uring --discard=unmap -t -e 16 \
                 -f qcow2 -k "$sock" "$@" "$image"
}

# plugin_available: the qcow2reclaim plugin has been built.
plugin_available() { [ -f "$PLUGIN" ]; }

# bench_check_other SO: the build given with -B exists and nbdkit loads it;
# otherwise the script stops, saying which.
bench_check_other() {
    [ -f "$1" ] || bench_die "-B $1: no such plugin build"
    nbdkit "$1" --dump-plugin >/dev/null 2>&1 ||
        bench_die "-B $1: nbdkit cannot load it (try: nbdkit $1 --dump-plugin)"
}

# bench_log_problems LOG: prints the lines of a server's log that say
# something went wrong (errors, failed asserts, sanitizer reports) to
# stderr; true when there was one.  Our notices reach nbdkit's log as
# 'error: notice:' and are not among them.
bench_log_problems() {
    grep -E ' error: |Assertion|Sanitizer' "$1" | grep -v ' error: notice: ' >&2
}

# serve_plugin IMAGE SOCK LOG [PLUGIN-PARAMS...]: nbdkit with qcow2reclaim.
# NBDKIT_THREADS, when set, is nbdkit's --threads for it and serve_file.
serve_plugin() {
    local image=$1 sock=$2 log=$3; shift 3
    plugin_available || bench_die "the qcow2reclaim plugin is not built: $PLUGIN"
    bench_start qcow2reclaim "$sock" "$log" \
        nbdkit -f --exit-with-parent ${NBDKIT_THREADS:+--threads "$NBDKIT_THREADS"} \
               -U "$sock" "$PLUGIN" file="$image" "$@"
}

# serve_file RAW SOCK LOG [PLUGIN-PARAMS...]: nbdkit's file plugin on a raw
# image, the reference without any image format in the way.
serve_file() {
    local image=$1 sock=$2 log=$3; shift 3
    bench_start nbdkit-file "$sock" "$log" \
        nbdkit -f --exit-with-parent ${NBDKIT_THREADS:+--threads "$NBDKIT_THREADS"} \
               -U "$sock" file file="$image" "$@"
}

# stop_server PID: SIGTERM, then wait (nbdkit writes metadata back on exit);
# SIGKILL only after a minute.  Returns the server's exit status.
stop_server() {
    local pid=$1 i rc=0 p keep=()
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 600; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        bench_msg "${BENCH_PID_NAME[$pid]:-server} (pid $pid) ignored SIGTERM for 60s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    for p in "${BENCH_PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
    BENCH_PIDS=("${keep[@]}")
    return "$rc"
}

stop_all_servers() {
    local p
    for p in "${BENCH_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${BENCH_PIDS[@]}"; do stop_server "$p" || true; done
}

# run_fio URI RW BS IODEPTH SECONDS RAMP JSON [FIO-ARGS...]: one time-based
# fio job with the nbd engine; fio's JSON goes to JSON, its messages to
# JSON.log.  The random sequence is the same on every run (randrepeat), so
# every server sees the same offsets.
run_fio() {
    local uri=$1 rw=$2 bs=$3 depth=$4 secs=$5 ramp=$6 json=$7; shift 7
    if ! fio --name="$rw-$bs" --ioengine=nbd --uri="$uri" \
             --rw="$rw" --bs="$bs" --iodepth="$depth" --numjobs=1 \
             --time_based=1 --runtime="$secs" --ramp_time="$ramp" \
             --randrepeat=1 --norandommap=1 "$@" \
             --output-format=json --output="$json" >"$json.log" 2>&1; then
        cat "$json.log" >&2
        bench_die "fio $rw bs=$bs against $uri failed"
    fi
}

# fio_figure JSON iops|mibs|p99: total IOPS, or MiB/s (2^20 bytes per
# second), over the jobs and directions of one fio JSON report; or the 99th
# percentile of completion latency in microseconds, the larger of the
# directions that ran.
fio_figure() {
    "$PYTHON" - "$1" "$2" <<'EOF'
import json, sys
path, metric = sys.argv[1], sys.argv[2]
with open(path) as f:
    text = f.read()
start = text.find('{')          # fio may print notices before the JSON
if start < 0:
    sys.exit('no JSON in %s' % path)
report = json.loads(text[start:])
iops = bw = 0.0
p99 = 0
for job in report['jobs']:
    if job.get('error'):
        sys.exit('fio job %s failed with error %d' % (job['jobname'], job['error']))
    for direction in ('read', 'write', 'trim'):
        iops += job[direction]['iops']
        bw += job[direction]['bw_bytes']
        pct = job[direction].get('clat_ns', {}).get('percentile', {})
        if job[direction]['total_ios'] and '99.000000' in pct:
            p99 = max(p99, pct['99.000000'])
if metric == 'p99':
    print('%.0f' % (p99 / 1000))
elif metric == 'iops':
    print('%.0f' % iops)
elif metric == 'mibs':
    print('%.1f' % (bw / 1048576))
else:
    sys.exit('unknown metric %s' % metric)
EOF
}

# bench_median NUMBER...: the median (the mean of the middle two for an even
# count), with as many decimals as the most precise of them.
bench_median() {
    printf '%s\n' "$@" | sort -g | awk '
        { v[NR] = $1; d = index($1, ".") ? length($1) - index($1, ".") : 0; if (d > dec) dec = d }
        END {
            if (NR == 0) exit 1
            m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            printf("%." dec "f\n", m)
        }'
}

# bench_warn_if_busy: other work on this small machine skews every figure;
# watch the CPUs for 2 seconds and say so if something else is using them.
bench_warn_if_busy() {
    local other
    bench_cpu_mark $$
    sleep 2
    other=$(bench_cpu_other $$)
    if awk -v o="$other" 'BEGIN { exit !(o >= 0.2) }'; then
        bench_msg "warning: other processes are using $other CPUs of $(nproc): the figures will be low and noisy"
    fi
}

# CPU used by other processes while a benchmark runs: bench_cpu_mark PID
# before a run (in the main shell, not in $(...)), then bench_cpu_other PID
# prints how many CPUs' worth of time went to anything but server PID and
# this shell's waited-for children (fio): about 0.0 on a quiet machine, 0.9
# while a build runs beside the benchmark.
BENCH_HZ=$(getconf CLK_TCK 2>/dev/null || echo 100)
_bench_cpu_sample() {
    local user nice sys idle iowait irq sirq steal line srv self
    read -r _ user nice sys idle iowait irq sirq steal _ </proc/stat
    _BENCH_BUSY=$((user + nice + sys + irq + sirq))
    _BENCH_STEAL=${steal:-0}
    _BENCH_ALL=$((user + nice + sys + idle + iowait + irq + sirq + ${steal:-0}))
    # Fields 14 and 15 of /proc/PID/stat are utime and stime, 16 and 17 the
    # same for waited-for children; counted from 3, after "(comm) ".
    line=$(cat "/proc/$1/stat" 2>/dev/null) || line=
    read -r -a srv <<<"${line##*) }"
    _BENCH_SRV=$((${srv[11]:-0} + ${srv[12]:-0}))
    line=$(cat "/proc/$$/stat")
    read -r -a self <<<"${line##*) }"
    _BENCH_KIDS=$((self[13] + self[14]))
    _BENCH_T=${EPOCHREALTIME/,/.}    # a decimal comma in some locales
}
bench_cpu_mark() {
    _bench_cpu_sample "$1"
    _BENCH_MARK="$_BENCH_BUSY $_BENCH_SRV $_BENCH_KIDS $_BENCH_T $_BENCH_STEAL $_BENCH_ALL"
}
bench_cpu_other() {
    local b0 s0 k0 t0
    read -r b0 s0 k0 t0 _ _ <<<"$_BENCH_MARK"
    _bench_cpu_sample "$1"
    awk -v b=$((_BENCH_BUSY - b0)) -v s=$((_BENCH_SRV - s0)) -v k=$((_BENCH_KIDS - k0)) \
        -v t0="$t0" -v t1="$_BENCH_T" -v hz="$BENCH_HZ" 'BEGIN {
        o = (b - s - k) / hz / (t1 - t0); if (o < 0) o = 0; printf "%.2f\n", o }'
}

# Steal time since the last bench_cpu_mark, as a whole percentage of all
# CPUs' time: the hypervisor ran someone else while this VM's CPUs wanted
# to run.  It comes in bursts, takes from whichever server is being
# measured at the time, and is not seen by bench_cpu_other (bench/README.md,
# "Fairness: steal time").
bench_cpu_steal() {
    local st0 all0
    read -r _ _ _ _ st0 all0 <<<"$_BENCH_MARK"
    _bench_cpu_sample $$
    awk -v st=$((_BENCH_STEAL - st0)) -v all=$((_BENCH_ALL - all0)) 'BEGIN {
        printf "%d\n", (all > 0 ? st * 100 / all + 0.5 : 0) }'
}
