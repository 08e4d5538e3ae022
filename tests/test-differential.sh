#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Differential test: a seeded random workload runs through the server against
# many kinds of qcow2 image while every operation is mirrored into a raw
# reference.  Afterwards QEMU itself must read the image back identical to the
# reference, and qemu-img check must find it clean.
#
# Environment:
#   SEED=N       base seed (variant i uses N+i); default fixed so failures
#                reproduce.  The seed of each variant is printed.
#   OPS=N        operations per variant (default 2000)
#   OPS_MIX=...  passed to nbd_random_ops.py --ops-mix (default: writes,
#                reads, flushes; the data file and extended L2 variants
#                add zeroes and trims); with trim in the mix, variants without a
#                backing file check that trimmed whole clusters read as
#                zeros
#   VARIANTS="v2 chain ..."  run only these variants
#   SERVER=qemu-nbd  serve with qemu-nbd instead of the plugin, to check the
#                harness itself
#   KEEP=1       keep the work directory of a failed variant

set -eu
SERVER=${SERVER:-nbdkit}
# qemu-nbd needs no plugin, but functions.sh insists on the variable.
[ "$SERVER" = qemu-nbd ] && : "${PLUGIN:=unused-with-qemu-nbd}"
srcdir=$(cd "${srcdir:-$(dirname "$0")}" && pwd)
. "$srcdir/functions.sh"
# Servers run from a directory that holds no images, so relative backing
# names can only resolve against the image's own directory.
cd /

requires qemu-img --version
requires qemu-io --version
requires "$PYTHON" -c 'import nbd'
case $SERVER in
    nbdkit) requires nbdkit --version ;;
    qemu-nbd) requires qemu-nbd --version ;;
    *) fail "SERVER must be nbdkit or qemu-nbd, not $SERVER" ;;
esac

SEED=${SEED:-4217}
OPS=${OPS:-2000}
OPS_MIX=${OPS_MIX:-}
ALL_VARIANTS="v2 v3 c4k c64k c2m rc1 rc64 zlib zstd chain rawback snap datafile dataraw lazy extl2 extl2back extl2snap extl2data extl2raw prealloc conv"
VARIANTS=${VARIANTS:-$ALL_VARIANTS}
SIZE=64M
DRIVER=$srcdir/nbd_random_ops.py

# serve SOCK LOG IMAGE: the plugin through start_server, or qemu-nbd with
# the same socket, log and pid bookkeeping (so cleanup kills it too).
serve() {
    if [ "$SERVER" = nbdkit ]; then
        start_server "$1" "$2" file="$3"
    else
        # discard=unmap is the closest QEMU gets to our plugin's default.
        start_qemu_nbd "$1" "$2" "$3" --discard=unmap
    fi
}

# qio IMAGE FORMAT CMD...: run qemu-io commands, quietly unless they fail.
qio() {
    local img=$1 fmt=$2 out; shift 2
    local args=()
    local c
    for c in "$@"; do args+=(-c "$c"); done
    out=$(qemu-io -f "$fmt" "${args[@]}" "$img" 2>&1) ||
        { echo "$out" >&2; fail "qemu-io on $img failed"; }
    if echo "$out" | grep -q -e 'failed' -e 'error'; then
        echo "$out" >&2; fail "qemu-io on $img reported a failure"
    fi
}

# Prefill touches the start, an unaligned run, a large run, zeroed clusters
# (zero flag in v3), a discarded range, and the last megabyte, so the
# workload meets every kind of existing entry.
prefill() {
    local img=$1
    qio "$img" qcow2 \
        'write -P 0x11 0 1M' \
        'write -P 0x22 5243392 300K' \
        'write -P 0x33 20M 4M' \
        'write -z 21M 1M' \
        'discard 23M 512K' \
        'write -P 0x44 30M 2M' \
        'write -z 30208K 64K' \
        'write -P 0x55 40000000 70000' \
        'write -P 0x66 63M 1M'
}

# Compressible and incompressible clusters mixed, so compressed lengths vary
# from a few sectors to nearly a cluster and straddle host clusters.
make_mixed_raw() {
    local out=$1 seed=$2
    "$PYTHON" - "$out" "$seed" <<'EOF'
import random, sys
out, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
cs = 65536
size = 64 << 20
text = b"qcow2reclaim compressed cluster test line %d\n"
with open(out, "wb") as f:
    f.truncate(size)
    for i in range((48 << 20) // cs):
        kind = rng.random()
        if kind < 0.15:
            continue                        # leave a hole
        frac = rng.choice((0.0, 0.05, 0.3, 0.6, 0.9, 1.0))
        nrand = int(cs * frac)
        filler = b"".join(text % (i * 1000 + j) for j in range(cs // 40 + 1))
        f.seek(i * cs)
        f.write((rng.randbytes(nrand) + filler)[:cs])
EOF
}

# run_tables IMG: how many of IMG's L2 tables are one run, the tables
# whose entries the server computes instead of loading (server/l2.c).
run_tables() { "$PYTHON" "$srcdir/qcow2_patch.py" run-tables "$1"; }

# Tables that are one run (preallocated, or converted from a full raw
# image), with 4 KiB clusters so that a 64 MiB disk has 32 whole tables:
# the server computes their entries, and the prefill, the trims and the
# zeroes must end a table's run wherever they change an entry.
prepare_runs() {
    [ "$(run_tables "$IMG")" -gt 8 ] || fail "$IMG has too few L2 tables that are one run"
    prefill "$IMG"
    [ "$(run_tables "$IMG")" -gt 0 ] || fail "the prefill left no L2 table that is one run"
    MIX=write:45,read:30,flush:5,zero:10,trim:10
}
prepare_prealloc() {
    prepare_plain "$1" -o preallocation=metadata,cluster_size=4096; CS=4096
    prepare_runs
}
prepare_conv() {
    local dir=$1
    IMG=$dir/img.qcow2 CS=4096
    head -c $((64 << 20)) /dev/urandom >"$dir/src.raw"
    qemu-img convert -O qcow2 -o cluster_size=4096 "$dir/src.raw" "$IMG"
    rm -f "$dir/src.raw"
    prepare_runs
}

# Each prepare_* sets IMG (absolute path), CS (cluster size), TRIM_ARG, and
# optionally SNAP and BACKING_FILES, working inside directory $1.
prepare_plain() {
    local dir=$1; shift
    IMG=$dir/img.qcow2
    qemu-img create -q -f qcow2 "$@" "$IMG" $SIZE
}

prepare_v2()   { prepare_plain "$1" -o compat=0.10; prefill "$IMG"; }
prepare_v3()   { prepare_plain "$1"; prefill "$IMG"; }
prepare_c4k()  { prepare_plain "$1" -o cluster_size=4096; CS=4096; prefill "$IMG"; }
# Left empty on purpose: every cluster is allocated by the server.
prepare_c64k() { prepare_plain "$1" -o cluster_size=65536; }
prepare_c2m()  { prepare_plain "$1" -o cluster_size=2097152; CS=2097152; prefill "$IMG"; }
prepare_rc1()  { prepare_plain "$1" -o refcount_bits=1; prefill "$IMG"; }
prepare_rc64() { prepare_plain "$1" -o refcount_bits=64; prefill "$IMG"; }

prepare_compressed() {
    local dir=$1 seed=$2; shift 2
    IMG=$dir/img.qcow2
    make_mixed_raw "$dir/src.raw" "$seed"
    qemu-img convert -c -O qcow2 "$@" "$dir/src.raw" "$IMG"
    rm -f "$dir/src.raw"
    # Without compressed clusters this variant would test nothing new.
    qemu-img check "$IMG" | grep -q ' [1-9][0-9.]*% compressed clusters' ||
        fail "$IMG has no compressed clusters"
}
prepare_zlib() { prepare_compressed "$1" "$2"; }
prepare_zstd() { prepare_compressed "$1" "$2" -o compression_type=zstd; }

# base <- mid <- top with relative backing names, created from inside the
# directory; the server runs elsewhere, so it must resolve the names
# relative to the image, as QEMU does.  The base is shorter than the top so
# reads and copy-on-write past its end must produce zeros.
prepare_chain() {
    local dir=$1
    (
        cd "$dir"
        qemu-img create -q -f qcow2 base.qcow2 40M
        qio base.qcow2 qcow2 \
            'write -P 0xa1 0 8M' \
            'write -P 0xa2 20M 1M' \
            'write -P 0xa3 39M 1M'
        qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 $SIZE
        qio mid.qcow2 qcow2 \
            'write -P 0xb1 4M 2M' \
            'write -P 0xb2 6291968 1000' \
            'write -z 20M 256K' \
            'write -P 0xb3 50M 1M'
        qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 $SIZE
        qio top.qcow2 qcow2 'write -P 0xc1 7M 64K' 'write -P 0xc2 62M 3000'
    )
    IMG=$dir/top.qcow2
    BACKING_FILES="$dir/base.qcow2 $dir/mid.qcow2"
}

# A raw backing file that is not a whole number of clusters long.
prepare_rawback() {
    local dir=$1 seed=$2
    (
        cd "$dir"
        head -c $((50 * 1024 * 1024 + 1536)) /dev/urandom >base.raw
        qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2 $SIZE
        qio top.qcow2 qcow2 'write -P 0xd1 1M 1M' 'write -P 0xd2 49M 2M'
    )
    IMG=$dir/top.qcow2
    BACKING_FILES=$dir/base.raw
}

# Clusters shared with an internal snapshot must be copied, never
# overwritten, and the snapshot table must survive.
prepare_snap() {
    local dir=$1
    prepare_plain "$dir"
    prefill "$IMG"
    qemu-img snapshot -c snap1 "$IMG"
    qio "$IMG" qcow2 'write -P 0x77 512K 1M' 'write -P 0x78 21M 3M'
    SNAP=snap1
}

# An external data file (named absolutely: qemu-io, run from elsewhere,
# would look for a relative name in its own folder).  Trims and zeroes
# are in the mix (unless OPS_MIX says otherwise): what they do to the data
# file is what this variant is about.
prepare_datafile() {
    local dir=$1
    qemu-img create -q -f qcow2 -o data_file="$dir/img.data" "$dir/img.qcow2" $SIZE
    IMG=$dir/img.qcow2
    MIX=write:45,read:30,flush:5,zero:10,trim:10
    prefill "$IMG"
}

# data_file_raw: the data file is the disk, byte for byte, at all times;
# RAW_DATA has it compared with the reference afterwards.
prepare_dataraw() {
    local dir=$1
    qemu-img create -q -f qcow2 -o data_file="$dir/img.data",data_file_raw=on "$dir/img.qcow2" $SIZE
    IMG=$dir/img.qcow2
    RAW_DATA=$dir/img.data
    MIX=write:45,read:30,flush:5,zero:10,trim:10
    prefill "$IMG"
}

# lazy_refcounts with the dirty bit: QEMU killed after writing leaves the
# counts of its clusters at 0, and the server must rebuild them at open.
prepare_lazy() {
    local dir=$1
    prepare_plain "$dir" -o lazy_refcounts=on
    prefill "$IMG"
    (qemu-io -f qcow2 -c 'write -P 0x99 8M 3M' -c 'write -P 0x9a 50M 64K' -c 'sigraise 9' "$IMG" ||
         true) >/dev/null 2>&1
    qemu-img info "$IMG" | grep -q '^cleanly shut down: no' || fail "lazy: qemu-io left no dirty bit"
}

# Extended L2 entries (32 subclusters of 4 KiB), prefilled so that clusters
# hold allocated, zero and unallocated subclusters side by side; and the
# same over a backing file, which must show through the unallocated ones.
EXTL2_OPTS=extended_l2=on,cluster_size=131072
prepare_extl2() {
    prepare_plain "$1" -o $EXTL2_OPTS; CS=131072; prefill "$IMG"
    qio "$IMG" qcow2 'write -z 1028K 8K' 'write -P 0x67 2052K 4K' 'write -z -u 20484K 12K'
}
prepare_extl2back() {
    local dir=$1
    (
        cd "$dir"
        qemu-img create -q -f qcow2 base.qcow2 $SIZE
        qio base.qcow2 qcow2 'write -P 0xa1 0 24M' 'write -P 0xa2 40M 8M'
        qemu-img create -q -f qcow2 -o $EXTL2_OPTS -b base.qcow2 -F qcow2 top.qcow2 $SIZE
    )
    IMG=$dir/top.qcow2 CS=131072 BACKING_FILES=$dir/base.qcow2
    prefill "$IMG"
    qio "$IMG" qcow2 'write -P 0xd1 1028K 4K' 'write -z 2052K 8K' 'discard 20M 256K'
}
# Compressed clusters and an internal snapshot sharing the rest: writes
# copy the allocated subclusters, trims only drop this layer's reference.
prepare_extl2snap() {
    prepare_compressed "$1" "$2" -o $EXTL2_OPTS
    CS=131072
    qio "$IMG" qcow2 'write -P 0x71 52M 4K' 'write -z 53M 8K' 'write -P 0x72 54M 132K'
    qemu-img snapshot -c snap1 "$IMG"
    qio "$IMG" qcow2 'write -P 0x73 56M 4K'
    SNAP=snap1
}

# Extended L2 entries with an external data file over a backing file (QEMU
# allows the pair): guest clusters at their guest offsets in the data file,
# the bitmaps saying what shows through.
prepare_extl2data() {
    local dir=$1
    (
        cd "$dir"
        qemu-img create -q -f qcow2 base.qcow2 $SIZE
        qio base.qcow2 qcow2 'write -P 0xa1 0 24M' 'write -P 0xa2 40M 8M'
        qemu-img create -q -f qcow2 -o $EXTL2_OPTS,data_file="$dir/img.data" \
            -b base.qcow2 -F qcow2 img.qcow2 $SIZE
    )
    IMG=$dir/img.qcow2 CS=131072 BACKING_FILES=$dir/base.qcow2
    MIX=write:45,read:30,flush:5,zero:10,trim:10
    prefill "$IMG"
    qio "$IMG" qcow2 'write -P 0xd1 1028K 4K' 'write -z 2052K 8K' 'discard 20M 256K'
}
# ... and raw, with 64 KiB clusters: subclusters of 2 KiB, so that what a
# trim or zero clears is often part of a host block, which must read
# zeros in the raw file all the same.
prepare_extl2raw() {
    local dir=$1
    qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=65536 \
        -o data_file="$dir/img.data",data_file_raw=on "$dir/img.qcow2" $SIZE
    IMG=$dir/img.qcow2
    RAW_DATA=$dir/img.data
    MIX=write:45,read:30,flush:5,zero:10,trim:10
    prefill "$IMG"
    qio "$IMG" qcow2 'write -z 1028K 6K' 'write -P 0x67 2050K 2K' 'write -z -u 20482K 12K'
}

variant_failed() {
    local v=$1 seed=$2 dir=$3; shift 3
    echo "FAIL: variant $v seed $seed: $*" >&2
    if [ -f "$dir/server.log" ]; then
        echo "--- last lines of the server log ($dir/server.log):" >&2
        tail -n 40 "$dir/server.log" >&2
    fi
    echo "reproduce: SEED=$SEED VARIANTS=$v $0" >&2
    if [ "${KEEP:-}" = 1 ]; then
        cp -a "$dir" "${TMPDIR:-/tmp}/q2r-failed-$v.$$"
        echo "kept ${TMPDIR:-/tmp}/q2r-failed-$v.$$" >&2
    fi
    exit 1
}

run_variant() {
    local v=$1 seed=$2
    local dir=$TMP/$v start=$SECONDS
    mkdir "$dir"
    IMG= CS=65536 SNAP= BACKING_FILES= MIX= RAW_DATA=
    "prepare_$v" "$dir" "$seed"

    qemu-img convert -O raw "$IMG" "$dir/ref.raw"
    if [ -n "$SNAP" ]; then
        qemu-img convert -l snapshot.name="$SNAP" -O raw "$IMG" "$dir/snap-before.raw"
    fi
    local f sums=
    for f in $BACKING_FILES; do sums="$sums $(md5sum <"$f")"; done
    local compat
    compat=$(qemu-img info --output=json "$IMG" | grep '"compat"')

    local mix_args=() mix=${OPS_MIX:-$MIX}
    # Subclusters are mostly about what zeroes and trims leave.
    case $v in extl2*) mix=${mix:-write:45,read:30,flush:5,zero:10,trim:10}
    esac
    if [ -n "$mix" ]; then
        mix_args=(--ops-mix "$mix")
        case $mix in
            *trim*)
                # Without a backing file, discarded whole clusters read as
                # zeros (partial ones may keep data: the plugin only punches
                # whole host blocks, QEMU ignores them); with a backing file
                # the contents are the server's choice.
                if [ -z "$BACKING_FILES" ]; then mix_args+=(--trim-zero-clusters)
                else mix_args+=(--trim-undefined); fi ;;
        esac
    fi

    local sock=$dir/nbd.sock out rc=0
    serve "$sock" "$dir/server.log" "$IMG"
    local pid=$LAST_SERVER_PID
    out=$("$PYTHON" "$DRIVER" --uri "nbd+unix:///?socket=$sock" \
            --ref "$dir/ref.raw" --seed "$seed" --ops "$OPS" \
            --cluster-size "$CS" --verify-all ${mix_args[@]+"${mix_args[@]}"} 2>&1) || rc=$?
    stop_server "$pid"
    if [ $rc -ne 0 ]; then
        echo "$out" >&2
        variant_failed "$v" "$seed" "$dir" "workload failed (exit $rc)"
    fi

    qemu-img convert -O raw "$IMG" "$dir/out.raw"
    cmp "$dir/ref.raw" "$dir/out.raw" >&2 ||
        variant_failed "$v" "$seed" "$dir" \
            "qemu-img reads the image differently from what NBD returned"
    check_clean "$IMG"
    if [ -n "$RAW_DATA" ]; then
        cmp -n "$(stat -c %s "$dir/ref.raw")" "$dir/ref.raw" "$RAW_DATA" >&2 ||
            variant_failed "$v" "$seed" "$dir" "the raw data file differs from the disk"
    fi

    local now=
    for f in $BACKING_FILES; do now="$now $(md5sum <"$f")"; done
    [ "$now" = "$sums" ] ||
        variant_failed "$v" "$seed" "$dir" "a backing file was modified"
    [ "$(qemu-img info --output=json "$IMG" | grep '"compat"')" = "$compat" ] ||
        variant_failed "$v" "$seed" "$dir" "the image version changed"

    if [ -n "$SNAP" ]; then
        qemu-img snapshot -l "$IMG" | grep -qw "$SNAP" ||
            variant_failed "$v" "$seed" "$dir" "snapshot $SNAP is gone"
        qemu-img convert -l snapshot.name="$SNAP" -O raw "$IMG" "$dir/snap-after.raw"
        cmp "$dir/snap-before.raw" "$dir/snap-after.raw" >&2 ||
            variant_failed "$v" "$seed" "$dir" "snapshot $SNAP contents changed"
    fi

    printf '%-8s seed=%-6s %3ds  %s\n' "$v" "$seed" $((SECONDS - start)) \
        "$(echo "$out" | sed -n 's/^nbd_random_ops: //p' | tail -n 1)"
    rm -rf "$dir"
}

for v in $VARIANTS; do
    case " $ALL_VARIANTS " in *" $v "*) ;; *) fail "unknown variant $v" ;; esac
done
echo "test-differential: server=$SERVER seed=$SEED ops=$OPS${OPS_MIX:+ mix=$OPS_MIX} (datafile, dataraw, extl2*: trims and zeroes unless OPS_MIX is given)"
# The seed of a variant depends on its place in ALL_VARIANTS, not on which
# variants run, so VARIANTS=x reproduces a failure of x in a full run.
IDX=0
for v in $ALL_VARIANTS; do
    case " $VARIANTS " in
        *" $v "*) run_variant "$v" $((SEED + IDX)) ;;
    esac
    IDX=$((IDX + 1))
done
echo "test-differential: all variants passed"
