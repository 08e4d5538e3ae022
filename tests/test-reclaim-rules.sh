#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The reclaim rules, case by case: what TRIM and WRITE_ZEROES do to the
# qcow2 metadata (L1/L2 entries, refcounts), to the host file (holes,
# allocated bytes, length) and to the contents, on the kinds of image users
# have: no backing file (v3, v2), a backing file (v3, v2), an internal
# snapshot, compressed clusters, 4 KiB and 2 MiB clusters, a fresh 100 GiB
# disk; then the write-zeroes flags (MAY_TRIM, NO_HOLE, FAST_ZERO),
# discard=keep and discard=ignore, reuse of the lowest free clusters and the
# statsfile counters.  Finally a random differential with trims and zeros.
#
# Each case: the image is made by qemu-img/qemu-io, the expected contents
# start as `qemu-img convert -O raw` of it; reclaim_checks.py sends the
# case's operations, mirrors each into the raw file and checks metadata,
# host file and contents while the server runs (after flushes); then the
# server is stopped and `qemu-img check` must be clean and `qemu-img
# compare` must find the image equal to the mirror.  One line per case.
#
# All cases run even when one fails; the failing checks and the server's
# own log lines are printed for each failure.
#
# Environment: CASES="v3 snapshot ..." runs only these; OPS=N operations
# per random run (default 2000); SEED=N (default 5310).

set -eu
srcdir=$(cd "${srcdir:-$(dirname "$0")}" && pwd)
. "$srcdir/functions.sh"
# Servers run from a directory that holds no images: relative backing names
# must resolve against the image's own directory.
cd /

requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires "$PYTHON" -c 'import nbd'

HELPER=$srcdir/reclaim_checks.py
DRIVER=$srcdir/nbd_random_ops.py
OPS=${OPS:-2000}
SEED=${SEED:-5310}
ALL_CASES="v3 noalloc-v3 noalloc-v2 huge backing-v3 backing-v2 snapshot
           compressed v2 c4k c2m zeroflags keep ignore reuse
           random-v3 random-v2 random-c4k"
CASES=${CASES:-$ALL_CASES}
FAILED=
T0=$SECONDS

# qio IMAGE CMD...: qemu-io commands on a qcow2 image, quiet unless they fail.
qio() {
    local img=$1 out; shift
    local args=() c
    for c in "$@"; do args+=(-c "$c"); done
    out=$(qemu-io -f qcow2 "${args[@]}" "$img" 2>&1) ||
        { echo "$out" >&2; fail "qemu-io on $img failed"; }
    if echo "$out" | grep -q -i -e 'failed' -e 'error'; then
        echo "$out" >&2; fail "qemu-io on $img reported a failure"
    fi
}

alloc_of() { echo $(( $(stat -c %b "$1") * 512 )); }
size_of() { stat -c %s "$1"; }
kib() { echo "$(( $1 / 1024 ))K"; }

# ---- images ------------------------------------------------------------------
# Each prep_* works in directory $1 and sets IMG; optionally SNAP (internal
# snapshot whose contents must survive), BACKING_FILES (must not change),
# REF=- (no raw mirror: compare with an empty image of the same size).

new_img() { IMG=$1/img.qcow2; shift; qemu-img create -q -f qcow2 "$@" "$IMG" "${SIZE:-64M}"; }

prep_v3() {
    SIZE=1G new_img "$1"
    qio "$IMG" 'write -P 0x11 0 4M' 'write -P 0x22 8M 1M' \
        'write -P 0x33 600M 1M' 'write -P 0x44 1023M 1M'
}
prep_noalloc_v3() { SIZE=1G new_img "$1"; qio "$IMG" 'write -P 0x11 0 1M'; }
prep_noalloc_v2() { SIZE=1G new_img "$1" -o compat=0.10; qio "$IMG" 'write -P 0x11 0 1M'; }
prep_huge() { SIZE=100G new_img "$1"; REF=-; }

prep_backing() {
    local dir=$1 compat=$2
    (
        cd "$dir"
        qemu-img create -q -f qcow2 base.qcow2 64M
        qio base.qcow2 'write -P 0xaa 0 8M' 'write -P 0xab 32M 8M'
        qemu-img create -q -f qcow2 -o compat="$compat" -b base.qcow2 -F qcow2 top.qcow2 64M
        qio top.qcow2 'write -P 0x11 1M 1M' 'write -P 0x12 33M 1M'
    )
    IMG=$dir/top.qcow2
    BACKING_FILES=$dir/base.qcow2
}
prep_backing_v3() { prep_backing "$1" 1.1; }
prep_backing_v2() { prep_backing "$1" 0.10; }

prep_snapshot() {
    new_img "$1"
    qio "$IMG" 'write -P 0x11 0 4M' 'write -P 0x22 8M 1M'
    qemu-img snapshot -c S "$IMG"
    qio "$IMG" 'write -P 0x33 2M 1M' 'write -P 0x44 9M 64K'
    SNAP=S
}

# 0..8M: every cluster compressible to a different length (a few hundred
# bytes to ~20 KiB), so several compressed clusters share a host cluster
# and some straddle two.
prep_compressed() {
    local dir=$1
    IMG=$dir/img.qcow2
    "$PYTHON" - "$dir/src.raw" <<'EOF'
import random, sys
rng = random.Random(77)
cs = 65536
with open(sys.argv[1], "wb") as f:
    f.truncate(16 << 20)
    for i in range((8 << 20) // cs):
        line = b"qcow2reclaim compressed cluster %d line %%d\n" % i
        text = b"".join(line % j for j in range(cs // 30))
        rnd = rng.randbytes(rng.choice((0, 200, 2000, 8000, 20000)))
        f.seek(i * cs)
        f.write((rnd + text)[:cs])
EOF
    qemu-img convert -c -O qcow2 "$dir/src.raw" "$IMG"
    rm -f "$dir/src.raw"
}

prep_v2() {
    new_img "$1" -o compat=0.10
    qio "$IMG" 'write -P 0x11 0 4M' 'write -P 0x22 60M 4M'
}
prep_c4k() {
    new_img "$1" -o cluster_size=4096
    qio "$IMG" 'write -P 0x11 0 1M' 'write -P 0x22 4M 36M'
}
prep_c2m() {
    new_img "$1" -o cluster_size=2M
    qio "$IMG" 'write -P 0x11 0 8M' 'write -P 0x22 20M 2M' 'write -P 0x33 62M 2M'
}
prep_plain4m() { new_img "$1"; qio "$IMG" 'write -P 0x11 0 4M'; }
prep_reuse() { new_img "$1"; qio "$IMG" 'write -P 0x11 0 8M' 'write -P 0x22 16M 4M'; }

# Random runs start from images with every kind of entry (as in
# test-differential.sh's prefill).
prefill() {
    qio "$1" 'write -P 0x11 0 1M' 'write -P 0x22 5243392 300K' \
        'write -P 0x33 20M 4M' 'write -z 21M 1M' 'discard 23M 512K' \
        'write -P 0x44 30M 2M' 'write -P 0x55 40000000 70000' 'write -P 0x66 63M 1M'
}
prep_random_v3() { new_img "$1"; prefill "$IMG"; }
prep_random_v2() { new_img "$1" -o compat=0.10; prefill "$IMG"; }
prep_random_c4k() { new_img "$1" -o cluster_size=4096; prefill "$IMG"; }

# After the reuse case, qemu-img map must show the data written after the
# trim of 0..8M at host offsets inside the freed range (which began at the
# first data cluster, 0x50000, and was 8 MiB long).
post_reuse() {
    local last
    last=$(qemu-img map --output=json "$1" |
        "$PYTHON" -c '
import json, sys
m = json.load(sys.stdin)
ends = [e["offset"] + e["length"] for e in m
        if e.get("data") and "offset" in e and 40 << 20 <= e["start"] < 51 << 20]
print(hex(max(ends)) if ends else "none")')
    case $last in
        none) echo "qemu-img map shows no data at 40M..51M"; return 1 ;;
    esac
    if [ $((last)) -gt $((0x50000 + 8 * 1024 * 1024)) ]; then
        echo "qemu-img map: data written after the trim ends at host $last, beyond the freed range 0x50000..0x850000"
        return 1
    fi
    echo "qemu-img map: new data ends at host $last"
}

# ---- running a case ------------------------------------------------------------

# show_server_log DIR: the server's own lines (not nbdkit's debug chatter).
show_server_log() {
    local log=$1/server.log
    [ -f "$log" ] || return 0
    echo "  --- server log ($log), non-debug lines:" >&2
    grep -v ': debug: ' "$log" | tail -n 20 | sed 's/^/  | /' >&2 || true
    # ENOTSUP replies are the FAST_ZERO refusals the helper asked for.
    if grep -i 'error' "$log" | grep -q -v 'Operation not supported'; then
        echo "  --- lines mentioning errors:" >&2
        grep -i 'error' "$log" | grep -v 'Operation not supported' |
            tail -n 10 | sed 's/^/  | /' >&2
    fi
}

# one_case LABEL HELPER_CASE PREP_FN [server params...]; runs in a subshell.
one_case() {
    local label=$1 hcase=$2 prep=$3; shift 3
    local dir=$TMP/$label problems=
    mkdir -p "$dir"
    IMG= SNAP= BACKING_FILES= REF=$dir/ref.raw
    "$prep" "$dir"
    if [ "$REF" != - ]; then qemu-img convert -O raw "$IMG" "$REF"; fi
    if [ -n "$SNAP" ]; then
        qemu-img convert -l snapshot.name="$SNAP" -O raw "$IMG" "$dir/snap-before.raw"
    fi
    local f sums=
    for f in $BACKING_FILES; do sums="$sums $(md5sum <"$f")"; done
    local a0 s0
    a0=$(alloc_of "$IMG") s0=$(size_of "$IMG")

    local sock=$dir/nbd.sock rc=0 out
    # The rules say where clusters go and which come free; compaction would
    # move them meanwhile (test-compact-*.sh test that), so it is off here.
    start_server "$sock" "$dir/server.log" file="$IMG" statsfile="$dir/stats" compact=off "$@"
    local pid=$LAST_SERVER_PID
    out=$("$PYTHON" "$HELPER" live "$hcase" "nbd+unix:///?socket=$sock" \
            "$IMG" "$REF" --stats "$dir/stats" 2>&1) || rc=$?
    stop_server "$pid"
    [ $rc -eq 0 ] || problems="live checks failed (exit $rc)"

    local chk diag=
    chk=$(qemu-img check "$IMG" 2>&1) ||
        { problems="$problems; qemu-img check is not clean"
          diag="$diag"$'\n'"qemu-img check $IMG:"$'\n'"$chk"; }
    local expected=$REF cmpfmt=raw cmpout
    if [ "$REF" = - ]; then
        expected=$dir/empty.qcow2 cmpfmt=qcow2
        qemu-img create -q -f qcow2 "$expected" "$(qemu-img info --output=json "$IMG" |
            sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p')"
    fi
    cmpout=$(qemu-img compare -f qcow2 -F "$cmpfmt" "$IMG" "$expected" 2>&1) ||
        { problems="$problems; qemu-img compare differs from the expected contents"
          diag="$diag"$'\n'"qemu-img compare: $cmpout"; }
    if [ -n "$SNAP" ]; then
        qemu-img convert -l snapshot.name="$SNAP" -O raw "$IMG" "$dir/snap-after.raw"
        cmp -s "$dir/snap-before.raw" "$dir/snap-after.raw" ||
            problems="$problems; snapshot $SNAP contents changed"
        # Once per connection: the helper trims shared clusters in two.
        local notes
        notes=$(grep -c 'internal snapshots share some of the discarded clusters' \
                    "$dir/server.log" || true)
        [ "$notes" = 2 ] ||
            problems="$problems; snapshot notice: expected 2 log lines (one per connection), got $notes"
        SNAPFIG="; snapshot notice lines=$notes"
    fi
    if [ "$(type -t "post_$hcase")" = function ]; then
        local pmsg
        if pmsg=$("post_$hcase" "$IMG"); then POSTFIG="; $pmsg"
        else problems="$problems; $pmsg"; fi
    fi
    local now=
    for f in $BACKING_FILES; do now="$now $(md5sum <"$f")"; done
    [ "$now" = "$sums" ] || problems="$problems; a backing file was modified"

    local a1 s1
    a1=$(alloc_of "$IMG") s1=$(size_of "$IMG")
    local figs
    figs=$(echo "$out" | tail -n 1)${SNAPFIG:-}${POSTFIG:-}
    if [ -n "$problems" ]; then
        printf 'FAIL %-11s %s\n' "$label" "${problems#; }"
        { echo "$out" | sed '$d'; echo "${diag#$'\n'}"; } | sed '/^$/d; s/^/  /' >&2
        show_server_log "$dir"
        printf '     %-11s allocated %s -> %s, size %s -> %s; %s\n' "$label" \
            "$(kib "$a0")" "$(kib "$a1")" "$(kib "$s0")" "$(kib "$s1")" "$figs"
        return 1
    fi
    printf 'ok   %-11s allocated %s -> %s, size %s -> %s; %s\n' "$label" \
        "$(kib "$a0")" "$(kib "$a1")" "$(kib "$s0")" "$(kib "$s1")" "$figs"
    rm -rf "$dir"
}

# one_random LABEL PREP_FN CLUSTER_SIZE SEED: nbd_random_ops with trims and
# zeros, then QEMU must read the image as the mirror says, and it is clean.
one_random() {
    local label=$1 prep=$2 cs=$3 seed=$4
    local dir=$TMP/$label problems=
    mkdir -p "$dir"
    IMG=
    "$prep" "$dir"
    qemu-img convert -O raw "$IMG" "$dir/ref.raw"
    local a0 s0
    a0=$(alloc_of "$IMG") s0=$(size_of "$IMG")
    local sock=$dir/nbd.sock rc=0 out
    start_server "$sock" "$dir/server.log" file="$IMG"
    local pid=$LAST_SERVER_PID
    out=$("$PYTHON" "$DRIVER" --uri "nbd+unix:///?socket=$sock" \
            --ref "$dir/ref.raw" --seed "$seed" --ops "$OPS" --cluster-size "$cs" \
            --ops-mix write:40,read:25,flush:5,trim:15,zero:12,fastzero:3 \
            --trim-zero-clusters --verify-all 2>&1) || rc=$?
    stop_server "$pid"
    [ $rc -eq 0 ] || problems="nbd_random_ops failed (exit $rc, seed $seed)"
    local chk
    chk=$(qemu-img check "$IMG" 2>&1) ||
        { problems="$problems; qemu-img check is not clean"; out="$out"$'\n'"$chk"; }
    qemu-img convert -O raw "$IMG" "$dir/out.raw"
    cmp "$dir/ref.raw" "$dir/out.raw" >/dev/null 2>&1 ||
        problems="$problems; qemu-img reads the image differently from the mirror ($(cmp "$dir/ref.raw" "$dir/out.raw" 2>&1 | head -n 1))"
    local a1 s1 summary
    a1=$(alloc_of "$IMG") s1=$(size_of "$IMG")
    summary=$(echo "$out" | sed -n 's/^nbd_random_ops: //p' | tail -n 1)
    if [ -n "$problems" ]; then
        printf 'FAIL %-11s %s\n' "$label" "${problems#; }"
        echo "$out" | grep -v '^nbd_random_ops: ' | sed 's/^/  /' >&2
        show_server_log "$dir"
        return 1
    fi
    printf 'ok   %-11s allocated %s -> %s, size %s -> %s; %s\n' "$label" \
        "$(kib "$a0")" "$(kib "$a1")" "$(kib "$s0")" "$(kib "$s1")" "$summary"
    rm -rf "$dir"
}

# run LABEL FUNCTION ARGS...: in a subshell, so that a failing case (fail()
# exits) does not stop the others; functions.sh stops the servers it
# started on the way out.
run() {
    local label=$1; shift
    case " $(echo $CASES) " in *" $label "*) ;; *) return 0 ;; esac
    local rc=0
    set +e
    (
        set -e
        "$@"
    )
    rc=$?
    set -e
    [ $rc -eq 0 ] || FAILED="$FAILED $label"
}

for c in $CASES; do
    case " $(echo $ALL_CASES) " in *" $c "*) ;; *) fail "unknown case $c" ;; esac
done

echo "test-reclaim-rules: plugin=$PLUGIN"
run v3          one_case v3 v3 prep_v3
run noalloc-v3  one_case noalloc-v3 noalloc prep_noalloc_v3
run noalloc-v2  one_case noalloc-v2 noalloc prep_noalloc_v2
run huge        one_case huge huge prep_huge
run backing-v3  one_case backing-v3 backing3 prep_backing_v3
run backing-v2  one_case backing-v2 backing2 prep_backing_v2
run snapshot    one_case snapshot snapshot prep_snapshot
run compressed  one_case compressed compressed prep_compressed
run v2          one_case v2 v2 prep_v2
run c4k         one_case c4k c4k prep_c4k
run c2m         one_case c2m c2m prep_c2m
run zeroflags   one_case zeroflags zeroflags prep_plain4m
run keep        one_case keep keep prep_plain4m discard=keep
run ignore      one_case ignore ignore prep_plain4m discard=ignore
run reuse       one_case reuse reuse prep_reuse
run random-v3   one_random random-v3 prep_random_v3 65536 "$SEED"
run random-v2   one_random random-v2 prep_random_v2 65536 $((SEED + 1))
run random-c4k  one_random random-c4k prep_random_c4k 4096 $((SEED + 2))

echo "test-reclaim-rules: $((SECONDS - T0))s"
[ -z "$FAILED" ] || fail "cases failed:$FAILED"
echo "test-reclaim-rules: all cases passed"
