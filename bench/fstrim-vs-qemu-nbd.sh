#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# Giving space back to the host: qemu-nbd against the qcow2reclaim nbdkit
# plugin, with a real ext4 filesystem on the served disk and fstrim, and
# with one huge NBD trim request.  See bench/README.md.
#
# There is no /dev/nbd* here, so the disk reaches the kernel the way the
# tests/test-fstrim-*.sh tests do it: nbdfuse makes the NBD export a file in
# a FUSE mount, and a loop device on that file carries ext4.  The loop
# device turns a discard into fallocate(PUNCH_HOLE) on the FUSE file, which
# nbdfuse sends as NBD TRIM: the request a guest's virtio-blk discard or
# nbd-client would send.
set -eu
export LC_ALL=C         # a '.' in $EPOCHREALTIME and in awk's numbers

usage() {
    cat <<EOF
Usage: $0 [-d DIR] [-o FILE] [-s SCENARIOS] [-n FILES] [-R ROUNDS] [-m] [-B SO] [-k]

  -d DIR        where the images go (default \$BENCH_DIR, else /var/tmp); a
                private directory is made under it and removed at the end.
                Needs about 13 GiB free for scenario c.
  -o FILE       also write the results table as CSV to FILE
  -s SCENARIOS  which scenarios to run, any of the letters a, b, c
                (default abc):
                  a  ext4: 1 GiB of mixed-size files written, deleted, fstrim
                  b  fragmented ext4: small files, every other one deleted,
                     fstrim
                  c  one NBD trim of 4 GiB - 64 KiB on a fully written image
  -n FILES      number of small files in scenario b (default 12000)
  -R ROUNDS     run every scenario ROUNDS times per server and report the
                medians (default 1)
  -m            also nbdkit's memory plugin in scenarios a and b: the same
                requests through nbdkit's own request path with a plugin
                that does no disk work, the floor of any nbdkit plugin
  -B SO         also serve with this other build of the plugin (say, of an
                earlier commit), as a column of its own: before and after
                in one run
  -k            keep the work directory (server logs, nbdfuse logs)

Needs root (mount, losetup) and /dev/fuse.  Environment: PLUGIN (default
../plugin/.libs/nbdkit-qcow2reclaim-plugin.so next to this script),
BENCH_DIR, PYTHON (scenario c uses /usr/bin/python3 when present).
EOF
}

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parent=${BENCH_DIR:-/var/tmp}
csv=
scenarios=abc
nfiles=12000
rounds=1
with_memory=0
other=
while getopts d:o:s:n:R:mB:kh opt; do
    case $opt in
        d) parent=$OPTARG ;;
        o) csv=$OPTARG ;;
        s) scenarios=$OPTARG ;;
        n) nfiles=$OPTARG ;;
        R) rounds=$OPTARG ;;
        m) with_memory=1 ;;
        B) other=$OPTARG ;;
        k) BENCH_KEEP=1 ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || { usage >&2; exit 2; }
case $scenarios in ''|*[!abc]*) bench_die "-s wants letters among a, b, c, not '$scenarios'" ;; esac
bench_count -n "$nfiles"
bench_count -R "$rounds"
[ "$nfiles" -le 200000 ] || bench_die "-n: at most 200000 files fit the 4 GiB filesystem"
if [ -n "$csv" ]; then
    { : >"$csv"; } 2>/dev/null || bench_die "cannot write the CSV file $csv"
fi

[ "$(id -u)" = 0 ] || bench_die "needs root (losetup, mount)"
[ -c /dev/fuse ] || bench_die "/dev/fuse is missing (modprobe fuse)"
bench_require_tools qemu-nbd qemu-img nbdkit "$PYTHON"
case $scenarios in
    *[ab]*)
        for t in nbdfuse fusermount3 losetup mount umount mountpoint fstrim mkfs.ext4 df; do
            command -v "$t" >/dev/null 2>&1 || case $t in
                nbdfuse) bench_die "nbdfuse not found (apt-get install nbdfuse)" ;;
                fusermount3) bench_die "fusermount3 not found (apt-get install fuse3)" ;;
                mkfs.ext4) bench_die "mkfs.ext4 not found (apt-get install e2fsprogs)" ;;
                *) bench_die "$t not found (apt-get install util-linux)" ;;
            esac
        done
        losetup -f >/dev/null 2>&1 || bench_die "no free loop device (losetup -f)"
        ;;
esac
case $scenarios in
    *c*)
        bench_require_tools fio
        "$PYTHON" -c 'import nbd' 2>/dev/null ||
            bench_die "$PYTHON has no nbd module (apt-get install python3-libnbd)"
        ;;
esac
plugin_available || bench_die "the qcow2reclaim plugin is not built: $PLUGIN"
[ -z "$other" ] || bench_check_other "$other"

GiB=$((1 << 30))
IMAGE_SIZE=4G

# ---------------------------------------------------------------------------
# Teardown, also when something fails half way: a mounted filesystem, a
# loop device or a FUSE mount left behind would outlive the run, and the
# work directory must never be removed while a live FUSE mount is in it.
MOUNTS=() LOOPS=() FUSE_DIRS=() FUSE_PIDS=()
fs_cleanup() {
    local m l d p back
    for m in "${MOUNTS[@]}"; do
        mountpoint -q "$m" 2>/dev/null || continue
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    # Only devices still backed by our files: a number we detached may
    # already belong to someone else.
    for l in "${LOOPS[@]}"; do
        back=$(losetup -n -O BACK-FILE "$l" 2>/dev/null) || continue
        case $back in "$BENCH_WORK"/*) losetup -d "$l" 2>/dev/null || true ;; esac
    done
    for d in "${FUSE_DIRS[@]}"; do
        mountpoint -q "$d" 2>/dev/null || continue
        fusermount3 -u "$d" 2>/dev/null || umount -l "$d" 2>/dev/null || true
    done
    for p in "${FUSE_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${FUSE_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    for d in "${FUSE_DIRS[@]}"; do
        if mountpoint -q "$d" 2>/dev/null; then
            bench_msg "warning: $d is still mounted; keeping the work directory"
            BENCH_KEEP=1
        fi
    done
}
trap 'fs_cleanup; bench_cleanup' EXIT
trap 'bench_msg interrupted; exit 130' INT
trap 'bench_msg terminated; exit 143' TERM
trap 'bench_msg hangup; exit 129' HUP

# without WORD ARRAY-ELEMENTS...: the elements other than WORD.
without() { local w=$1 x; shift; for x in "$@"; do [ "$x" = "$w" ] || printf '%s\n' "$x"; done; }

alloc() { stat -c '%b %B' "$1" | awk '{ print $1 * $2 }'; }
used() { df --output=used -B1 "$1" | tail -n 1 | tr -d ' '; }
to_mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="${2:-$EPOCHREALTIME}" 'BEGIN { printf "%.2f", b - a }'; }

# fuse_attach SOCK DIR: the export as DIR/disk, and LOOP on top of it.
fuse_attach() {
    local sock=$1 dir=$2 i
    mkdir -p "$dir"
    nbdfuse "$dir/disk" "$(nbd_uri "$sock")" >"$dir.log" 2>&1 &
    FUSE_PID=$!
    FUSE_PIDS+=("$FUSE_PID")
    FUSE_DIRS+=("$dir")
    for ((i = 0; i < 200; i++)); do
        [ -e "$dir/disk" ] && break
        kill -0 "$FUSE_PID" 2>/dev/null || { cat "$dir.log" >&2; bench_die "nbdfuse exited"; }
        sleep 0.05
    done
    [ -e "$dir/disk" ] || { cat "$dir.log" >&2; bench_die "nbdfuse did not mount $dir"; }
    LOOP=$(losetup -f --show "$dir/disk")
    LOOPS+=("$LOOP")
}

# fuse_detach DIR: undo fuse_attach; nbdfuse exits once unmounted.
fuse_detach() {
    local dir=$1 i
    losetup -d "$LOOP"
    # The kernel may only set autoclear while something (udev, blkid) still
    # holds the device; the FUSE file stays busy until the loop lets go.
    for ((i = 0; i < 100; i++)); do
        [ -z "$(losetup -n -j "$dir/disk" 2>/dev/null)" ] && break
        sleep 0.1
    done
    mapfile -t LOOPS < <(without "$LOOP" "${LOOPS[@]}")
    fusermount3 -u "$dir"
    for ((i = 0; i < 100; i++)); do
        kill -0 "$FUSE_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill "$FUSE_PID" 2>/dev/null && bench_msg "note: nbdfuse had to be killed"
    wait "$FUSE_PID" 2>/dev/null || true
    mapfile -t FUSE_PIDS < <(without "$FUSE_PID" "${FUSE_PIDS[@]}")
    mapfile -t FUSE_DIRS < <(without "$dir" "${FUSE_DIRS[@]}")
}

# serve KIND IMAGE DIR: start KIND (qemu or plugin) on IMAGE with its socket
# and log in DIR; sets SERVER_PID, SOCK, LOG.
serve() {
    local kind=$1 img=$2 dir=$3
    SOCK=$dir/nbd.sock LOG=$dir/server.log
    case $kind in
        qemu) serve_qemu "$img" "$SOCK" "$LOG" ;;
        plugin) serve_plugin "$img" "$SOCK" "$LOG" ;;
        other) PLUGIN=$other serve_plugin "$img" "$SOCK" "$LOG" ;;
        memory) bench_start nbdkit-memory "$SOCK" "$LOG" \
                    nbdkit -f --exit-with-parent -U "$SOCK" memory "$IMAGE_SIZE" ;;
    esac
}

# unserve KIND IMAGE: stop the server, then qemu-img check; warnings only.
unserve() {
    local kind=$1 img=$2 out
    stop_server "$SERVER_PID" ||
        bench_msg "warning: ${LABEL[$kind]} exited with an error (log: $LOG)"
    if bench_log_problems "$LOG"; then
        bench_msg "warning: (the messages above are from ${LABEL[$kind]}'s log $LOG)"
    fi
    [ "$kind" != memory ] || return 0
    if [ "$kind" = plugin ] || [ "$kind" = other ]; then
        out=$(grep -o 'reclaim totals: .*' "$LOG" || true)
        [ -z "$out" ] || bench_msg "  ${LABEL[$kind]} $out"
    fi
    if ! out=$(qemu-img check "$img" 2>&1); then
        printf '%s\n' "$out" >&2
        bench_msg "warning: qemu-img check finds $img (${LABEL[$kind]}) not clean"
        CHECK_FAILED="$CHECK_FAILED ${LABEL[$kind]}"
    fi
}

# fs_up KIND DIR: a fresh 4 GiB qcow2 in DIR served by KIND, through
# nbdfuse and a loop device, with a new ext4 mounted on DIR/mnt.  Sets IMG,
# MNT, FUSE, SERVER_PID, LOOP.
fs_up() {
    local kind=$1 dir=$2
    IMG=$dir/disk.qcow2 MNT=$dir/mnt FUSE=$dir/fuse
    mkdir -p "$dir" "$MNT"
    qemu-img create -q -f qcow2 "$IMG" "$IMAGE_SIZE"
    serve "$kind" "$IMG" "$dir"
    fuse_attach "$SOCK" "$FUSE"
    mkfs.ext4 -q -F "$LOOP"
    # noinit_itable: no ext4lazyinit thread zeroing inode tables in the
    # background while the figures are taken.
    mount -t ext4 -o noinit_itable "$LOOP" "$MNT"
    MOUNTS+=("$MNT")
    sync
}

fs_down() {
    local kind=$1
    umount "$MNT"
    mapfile -t MOUNTS < <(without "$MNT" "${MOUNTS[@]}")
    fuse_detach "$FUSE"
    unserve "$kind" "$IMG"
}

# settle_df MNT: wait until a deletion is really finished (df stops
# moving), then sync so the frees are committed and the blocks no longer
# busy.  ext4 is done at the first sync; other filesystems (xfs) free
# deleted files' blocks later, in background work.
settle_df() {
    local prev=-1 cur t=$SECONDS
    sync
    cur=$(used "$1")
    while [ "$cur" != "$prev" ] && [ $((SECONDS - t)) -lt 30 ]; do
        sleep 0.3
        prev=$cur
        cur=$(used "$1")
    done
    sync
}

# settle_alloc IMAGE T0 T1: after a request started at T0 returned at T1,
# watch the host file's allocation until it has not changed for 2 s (at
# most 60 s).  Prints the settled allocated bytes and the seconds from T0
# to the last change seen (T1 if none).
settle_alloc() {
    local img=$1 t0=$2 last=$3 prev cur
    prev=$(alloc "$img")
    while :; do
        sleep 0.1
        cur=$(alloc "$img")
        if [ "$cur" != "$prev" ]; then
            prev=$cur last=$EPOCHREALTIME
        elif awk -v a="$last" -v b="$EPOCHREALTIME" 'BEGIN { exit !(b - a >= 2) }'; then
            break
        fi
        if awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { exit !(b - a >= 60) }'; then
            bench_msg "warning: the allocation of $img was still changing 60 s on"
            break
        fi
    done
    echo "$prev $(since "$t0" "$last")"
}

# ---------------------------------------------------------------------------
# Results: RES[scenario/metric/kind] = figure.
# A key gets one figure per round; the table shows their median.  The
# memory plugin has no host file: it gets only the rows that do not
# measure one.
declare -A LABEL=([qemu]=qemu-nbd [plugin]=qcow2reclaim [other]=other-build [memory]=nbdkit-memory)
declare -A RES=()
ROWS=()     # "key|scenario|metric|unit" in table order
CHECK_FAILED=
row() { ROWS+=("$1|$2|$3|$4"); }
put() { RES[$1]="${RES[$1]:-} $2"; }

# The servers' order turns by one from round to round and scenario to
# scenario, so none always goes first.
KINDS=(qemu plugin)
[ -z "$other" ] || KINDS+=(other)
[ "$with_memory" = 0 ] || KINDS+=(memory)
ORDER=("${KINDS[@]}")
next_order() {
    ORDER=("${ORDER[@]:1}" "${ORDER[0]}")
}
# each SCENARIO-FUNCTION [KIND...]: every round, every kind named (default
# all), in the turning order.
each() {
    local f=$1 r kind; shift
    local only=" ${*:-${KINDS[*]}} "
    for ((r = 0; r < rounds; r++)); do
        for kind in "${ORDER[@]}"; do
            case $only in *" $kind "*) "$f" "$kind" ;; esac
        done
        next_order
    done
}

# (a) 1 GiB of mixed-size files (16 KiB to 16 MiB, not block multiples),
# all deleted, then fstrim.
scenario_a() {
    local kind=$1 dir=$BENCH_WORK/a-$1 base before after n out t0 t1 settled st
    bench_msg "[a] ${LABEL[$kind]}: mkfs, write 1 GiB of mixed-size files"
    fs_up "$kind" "$dir"
    base=$(alloc "$IMG")
    t0=$(now)
    n=$("$PYTHON" - "$MNT/data" "$GiB" <<'EOF'
import os, random, sys
d, left = sys.argv[1], int(sys.argv[2])
r = random.Random(1024)          # the same files for every server
pool = os.urandom(20 << 20)      # random bytes, nothing compresses
view = memoryview(pool)
os.mkdir(d)
n = 0
while left > 0:
    k = r.randrange(4)
    if k == 0:
        size = r.randint(16, 255) * 1024
    elif k == 1:
        size = r.randint(256, 2047) * 1024
    elif k == 2:
        size = r.randint(2 << 20, 8 << 20)
    else:
        size = r.randint(8 << 20, 16 << 20)
    size = min(size + r.randrange(4096), left)
    off = r.randrange(len(pool) - size + 1)
    with open(f"{d}/f{n:04d}", "wb") as f:
        f.write(view[off:off + size])
    left -= size
    n += 1
print(n)
EOF
)
    sync
    bench_msg "    $n files written in $(since "$t0")s"
    rm -rf "$MNT/data"
    settle_df "$MNT"
    before=$(alloc "$IMG")
    t0=$(now)
    out=$(fstrim -v "$MNT")
    t1=$(now)
    st=$(since "$t0" "$t1")
    put "a/fstrim/$kind" "$st"
    if [ "$kind" = memory ]; then
        bench_msg "    fstrim ${st}s: ${out#*: }"
    else
        read -r after settled <<<"$(settle_alloc "$IMG" "$t0" "$t1")"
        bench_msg "    host file: $(to_mib "$base") MiB after mkfs, $(to_mib "$before") MiB before fstrim, $(to_mib "$after") MiB after; fstrim ${st}s, settled at ${settled}s: ${out#*: }"
        put "a/before/$kind" "$(to_mib "$before")"
        put "a/after/$kind" "$(to_mib "$after")"
        put "a/settle/$kind" "$settled"
    fi
    fs_down "$kind"
    rm -f "$IMG"
}

# (b) many small files, every other one deleted: free extents far smaller
# than a 64 KiB cluster.
scenario_b() {
    local kind=$1 dir=$BENCH_WORK/b-$1 a1 a2 u1 u2 freed back out t0 t1 settled st
    bench_msg "[b] ${LABEL[$kind]}: mkfs, write $nfiles files of 4-16 KiB"
    fs_up "$kind" "$dir"
    t0=$(now)
    "$PYTHON" - "$MNT/d" "$nfiles" <<'EOF'
import os, random, sys
d, n = sys.argv[1], int(sys.argv[2])
r = random.Random(12000)         # the same layout for every server
pool = os.urandom(1 << 20)
os.mkdir(d)
for i in range(n):
    size = r.randint(4096, 16384)
    off = r.randrange(len(pool) - size)
    with open(f"{d}/f{i:06d}", "wb") as f:
        f.write(pool[off:off + size])
EOF
    sync
    bench_msg "    written in $(since "$t0")s"
    a1=$(alloc "$IMG")
    u1=$(used "$MNT")
    "$PYTHON" - "$MNT/d" "$nfiles" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(0, n, 2):
    os.unlink(f"{d}/f{i:06d}")
EOF
    settle_df "$MNT"
    u2=$(used "$MNT")
    freed=$((u1 - u2))
    t0=$(now)
    out=$(fstrim -v "$MNT")
    t1=$(now)
    st=$(since "$t0" "$t1")
    put "b/freed/$kind" "$(to_mib "$freed")"
    put "b/fstrim/$kind" "$st"
    if [ "$kind" = memory ]; then
        bench_msg "    df freed $(to_mib "$freed") MiB; fstrim ${st}s: ${out#*: }"
    else
        read -r a2 settled <<<"$(settle_alloc "$IMG" "$t0" "$t1")"
        back=$((a1 - a2))
        bench_msg "    df freed $(to_mib "$freed") MiB; host file $(to_mib "$a1") MiB before deleting, $(to_mib "$a2") MiB after fstrim: gave back $(to_mib "$back") MiB; fstrim ${st}s, settled at ${settled}s: ${out#*: }"
        put "b/back/$kind" "$(to_mib "$back")"
        put "b/pct/$kind" "$(awk -v b="$back" -v f="$freed" 'BEGIN { printf "%.1f", (f > 0 ? 100 * b / f : 0) }')"
        put "b/settle/$kind" "$settled"
    fi
    fs_down "$kind"
    rm -f "$IMG"
}

# (c) one NBD trim of 4 GiB - 64 KiB (the largest 64 KiB-aligned length an
# NBD request can carry) at offset 0 of a fully written 4 GiB image, then a
# flush, each timed from the client.
PREFILLED=
scenario_c() {
    local kind=$1 dir=$BENCH_WORK/c-$1 img before after trim flush t0 settled
    if [ -z "$PREFILLED" ]; then
        bench_msg "[c] writing a 4 GiB image full of random data (once, then copied for each server)"
        PREFILLED=$BENCH_WORK/prefilled.qcow2
        make_prefilled_images "$IMAGE_SIZE" "$BENCH_WORK/prefilled.raw" "$PREFILLED"
        rm -f "$BENCH_WORK/prefilled.raw"
    fi
    mkdir -p "$dir"
    img=$dir/disk.qcow2
    fresh_copy "$PREFILLED" "$img"
    # Nothing dirty left for the kernel to write back meanwhile.
    sync
    serve "$kind" "$img" "$dir"
    before=$(alloc "$img")
    bench_msg "[c] ${LABEL[$kind]}: trim 4 GiB - 64 KiB, flush"
    t0=$(now)
    read -r trim flush <<<"$(timeout 600 "$PYTHON" - "$(nbd_uri "$SOCK")" <<'EOF'
import sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
if not h.can_trim():
    sys.exit("the server does not accept trim requests")
length = (4 << 30) - (64 << 10)
length = min(length, h.get_size())
t0 = time.monotonic()
h.trim(length, 0)
t1 = time.monotonic()
h.flush()
t2 = time.monotonic()
print("%.3f %.3f" % (t1 - t0, t2 - t1))
h.shutdown()
EOF
)" || bench_die "the trim request to ${LABEL[$kind]} failed (log: $LOG)"
    [ -n "${flush:-}" ] || bench_die "the trim request to ${LABEL[$kind]} failed (log: $LOG)"
    read -r after settled <<<"$(settle_alloc "$img" "$t0" "$(now)")"
    bench_msg "    trim ${trim}s, flush ${flush}s; host file $(to_mib "$before") MiB -> $(to_mib "$after") MiB allocated (settled ${settled}s after the trim was sent), size $(to_mib "$(stat -c %s "$img")") MiB"
    put "c/before/$kind" "$(to_mib "$before")"
    put "c/trim/$kind" "$trim"
    put "c/flush/$kind" "$flush"
    put "c/after/$kind" "$(to_mib "$after")"
    unserve "$kind" "$img"
    rm -f "$img"
}

# ---------------------------------------------------------------------------
bench_workdir_create "$parent"
case $scenarios in
    *c*) bench_check_space "$BENCH_WORK" $((13 * GiB)) ;;
    *)   bench_check_space "$BENCH_WORK" $((3 * GiB)) ;;
esac
# Serve a copy of the plugin, so a rebuild during the run does not disturb it.
cp "$PLUGIN" "$BENCH_WORK/plugin.so"
PLUGIN=$BENCH_WORK/plugin.so
if [ -n "$other" ]; then
    cp "$other" "$BENCH_WORK/other.so"
    other=$BENCH_WORK/other.so
fi
bench_warn_if_busy
started=$SECONDS

case $scenarios in *a*)
    each scenario_a
    row a/before "a ext4 1 GiB" "allocated before fstrim" MiB
    row a/after  "a ext4 1 GiB" "allocated after fstrim" MiB
    row a/fstrim "a ext4 1 GiB" "fstrim" s
    row a/settle "a ext4 1 GiB" "fstrim until settled" s
esac
case $scenarios in *b*)
    each scenario_b
    row b/freed  "b fragmented" "freed in ext4 (df)" MiB
    row b/back   "b fragmented" "left host allocation" MiB
    row b/pct    "b fragmented" "left host allocation" "%"
    row b/fstrim "b fragmented" "fstrim" s
    row b/settle "b fragmented" "fstrim until settled" s
esac
case $scenarios in *c*)
    each scenario_c qemu plugin other
    row c/before "c 4 GiB trim" "allocated before" MiB
    row c/trim   "c 4 GiB trim" "trim request" s
    row c/flush  "c 4 GiB trim" "flush" s
    row c/after  "c 4 GiB trim" "allocated after" MiB
esac
bench_msg "done in $((SECONDS - started))s"

[ "$rounds" = 1 ] || echo "medians of $rounds rounds"
line=$(printf '%-14s %-24s %-4s' scenario metric unit)
head=scenario,metric,unit
for kind in "${KINDS[@]}"; do
    line+=$(printf ' %14s' "${LABEL[$kind]}")
    head+=,${LABEL[$kind]//-/_}
done
echo "$line"
[ -z "$csv" ] || echo "$head" >"$csv"
for r in "${ROWS[@]}"; do
    IFS='|' read -r key scen metric unit <<<"$r"
    line=$(printf '%-14s %-24s %-4s' "$scen" "$metric" "$unit")
    cells="$scen,$metric,$unit"
    for kind in "${KINDS[@]}"; do
        v=-
        # shellcheck disable=SC2086 # one word per round
        [ -z "${RES[$key/$kind]:-}" ] || v=$(bench_median ${RES[$key/$kind]})
        line+=$(printf ' %14s' "$v")
        cells+=,${v#-}
    done
    echo "$line"
    [ -z "$csv" ] || echo "$cells" >>"$csv"
done
[ -z "$CHECK_FAILED" ] ||
    bench_msg "warning: qemu-img check was not clean after:$CHECK_FAILED"
