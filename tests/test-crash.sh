#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# Power cuts, replayed.  A random workload runs against the plugin with the
# engine's I/O log on; crash_replay.py then rebuilds the images a power cut
# could have left at many points of that log (everything up to the last
# sync, any subset of what followed, the last write possibly torn) and
# checks that each is only ever leaky, never corrupt, that the plugin opens
# and reads it like qemu does, and that whatever the client had been told
# was durable (flush or FUA reply) is still there.  This is the test of the
# DESIGN.md invariants about write ordering; a normal test never sees them
# broken because the final state after a clean exit is always consistent.
# An encrypted image (the luks shape) is read with its key everywhere:
# qemu-img check, convert and compare through a secret object read from a
# file, the plugin with passphrase=+FILE; there a hole or zeros left under
# an entry that still names them read as garbage, which the check of
# in-flight bytes (old or new, nothing else) catches.
#
# CRASH_POINTS (default 100) crash points in total, spread over the image
# shapes; CRASH_POINTS=1000 is the long run.  CRASH_SEED varies the
# workloads and the crash states; CRASH_OPS the requests per workload;
# CRASH_SHAPES a list of the shapes below to run alone;
# CRASH_KEEP=DIR keeps the inputs and the failing images for replay.
set -eu
srcdir=${srcdir:-$(cd "$(dirname "$0")" && pwd)}
. "$srcdir/functions.sh"

requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires "$PYTHON" -c 'import nbd'

POINTS=${CRASH_POINTS:-100}
SEED=${CRASH_SEED:-1}
OPS=${CRASH_OPS:-300}
KEEP=${CRASH_KEEP:-}
SIZE=48M
helper="$srcdir/crash_replay.py"
started=$(date +%s)

# Each shape reaches different write paths: in-place writes over
# preallocated data, COW from compressed clusters and zero clusters, many
# small L2 tables and refcount blocks that do not fit the cache (so
# eviction write-backs happen between flushes), v2 without zero flags,
# fills from a backing file, clusters shared with an internal snapshot, and
# 512-byte clusters, where the file outgrows the refcount table within a
# few MiB, so the table moves and the header is switched mid-workload; and
# compaction moving clusters while the workload runs; persistent bitmaps
# kept current, each crash state leaving them in use or whole, and moved
# down by compaction meanwhile; and
# extended L2 entries, where subclusters are allocated, zeroed and trimmed
# one by one and clusters whose subclusters all went are freed; and LUKS
# encryption, where a write of part of a sector reads, decrypts and
# rewrites it, copy-on-write writes whole encrypted clusters, zeroes
# inside a cluster are written as ciphertext and whole clusters trimmed
# are punched only once their new entries are synced.
SHAPES=${CRASH_SHAPES:-v3-64k v3-4k v2 backing snapshot v3-512 compact bitmaps extl2 luks}
nshapes=$(echo $SHAPES | wc -w)

# The passphrase of the encrypted shape, in a file, so that it is on no
# command line: QEMU's secret file= takes the file's bytes as they are, and
# nbdkit's +FILE drops a final newline, so it has none.
PASSFILE=$TMP/luks.pass
printf %s crash-replay-passphrase >"$PASSFILE"
# qemu_luks: the options that give qemu-img and qemu-io the key; the image
# is then named by luks_opts IMG.
qemu_luks=(--object "secret,id=s0,file=$PASSFILE" --image-opts)
luks_opts() { echo "driver=qcow2,file.filename=$1,encrypt.key-secret=s0"; }

# check_image IMG: qemu-img check finds no leak and no error, with the key
# when the shape is encrypted.
check_image() {
    if [ -n "$SECRET" ]; then
        local out
        out=$(qemu-img check "${qemu_luks[@]}" "$(luks_opts "$1")" 2>&1) ||
            { echo "$out" >&2; fail "qemu-img check $1 is not clean"; }
    else
        check_clean "$1"
    fi
}

# make_image NAME: creates $TMP/NAME.qcow2 with some data already in it
# (written by qemu-io, so the starting point is not the plugin's work) and
# sets CS, PARAMS (extra plugin parameters), WORKLOAD_ARGS, TRIMZERO
# (trimmed whole clusters must read as zeros: everywhere but v2 over a
# backing file) and SECRET (the passphrase file of an encrypted image).
make_image() {
    local img=$TMP/$1.qcow2
    CS=65536 PARAMS= TRIMZERO=--trim-zero-clusters WORKLOAD_ARGS= COMPACT_EAGER= BITMAPS=
    SECRET=
    case $1 in
    v3-64k)
        qemu-img create -q -f qcow2 -o cluster_size=64k "$img" $SIZE
        qemu-io -f qcow2 -c 'write -P 0x11 0 8M' -c 'write -c -P 0x22 8M 2M' \
            -c 'write -z 12M 1M' -c 'write -P 0x23 40M 3M' "$img" >/dev/null ;;
    v3-4k)
        # 24 L2 tables (2 MiB each) and 6 refcount blocks against a cache
        # of 16 entries (the engine's minimum); a table in every 2 MiB and
        # reads all over make tables and blocks leave the cache between
        # flushes, in any order.
        CS=4096 PARAMS=cache-size=32k
        WORKLOAD_ARGS="--mix read:15,scan:10 --read-recent 0.3"
        qemu-img create -q -f qcow2 -o cluster_size=4k "$img" $SIZE
        local args=() j
        for j in $(seq 0 2 46); do args+=(-c "write -P $((j + 1)) ${j}M 4k"); done
        qemu-io -f qcow2 -c 'write -P 0x33 0 4M' -c 'write -c -P 0x34 6M 512k' \
            -c 'write -P 0x35 30M 2M' "${args[@]}" "$img" >/dev/null ;;
    v2)
        qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=64k "$img" $SIZE
        qemu-io -f qcow2 -c 'write -P 0x44 0 6M' -c 'write -c -P 0x45 16M 1M' \
            "$img" >/dev/null ;;
    backing)
        # v3 over a backing file: trimmed whole clusters get the zero flag,
        # so they read as zeros here too.
        qemu-img create -q -f qcow2 -o cluster_size=32k "$TMP/base.qcow2" $SIZE
        qemu-io -f qcow2 -c 'write -P 0x55 0 24M' -c 'write -P 0x56 30M 4M' \
            "$TMP/base.qcow2" >/dev/null
        qemu-img create -q -f qcow2 -o cluster_size=64k -b "$TMP/base.qcow2" \
            -F qcow2 "$img"
        qemu-io -f qcow2 -c 'write -P 0x57 2M 1M' -c 'write -z 5M 1M' "$img" >/dev/null ;;
    snapshot)
        qemu-img create -q -f qcow2 -o cluster_size=64k "$img" $SIZE
        qemu-io -f qcow2 -c 'write -P 0x66 0 16M' -c 'write -c -P 0x67 20M 1M' \
            "$img" >/dev/null
        qemu-img snapshot -c s1 "$img"
        qemu-io -f qcow2 -c 'write -P 0x68 1M 512k' "$img" >/dev/null ;;
    v3-512)
        # 1024 L2 tables of 32 KiB each, and the smallest cache.
        CS=512 PARAMS=cache-size=8k WORKLOAD_ARGS="--mix scan:5"
        qemu-img create -q -f qcow2 -o cluster_size=512 "$img" 32M
        qemu-io -f qcow2 -c 'write -P 0x77 0 7M' "$img" >/dev/null ;;
    compact)
        # Written whole, then three quarters discarded in scattered pieces:
        # the worker (eager, paced to 16 MiB/s) moves clusters down from the
        # first moment, and again after each of the workload's trims, so
        # copies, switched entries, moved tables, their commits and the
        # truncations are all crash points.
        PARAMS=compact-rate=16M COMPACT_EAGER=1
        qemu-img create -q -f qcow2 -o cluster_size=64k "$img" $SIZE
        local trims=() c
        for c in $(seq 0 $(( (48 << 4) - 1 ))); do
            [ $((c * 2654435761 % 4)) -eq 0 ] || trims+=(-c "discard $((c << 16)) 64k")
        done
        qemu-io -f qcow2 -c "write -P 0x88 0 $SIZE" "$img" >/dev/null
        qemu-io -f qcow2 "${trims[@]}" "$img" >/dev/null ;;
    bitmaps)
        # In use on disk from the open to the close, whose write-back
        # (bitmap data clusters claimed, tables, then the flag cleared) is
        # crash points too; 4 KiB granules make many data clusters.  The
        # bitmaps are added after the first data, and their data is saved
        # after more, so their directory, tables and data lie above it:
        # the worker (eager) moves them down into what the workload
        # trims, and their copies, switched tables and directory are
        # crash points.
        BITMAPS=b0,b4k PARAMS=compact-rate=16M COMPACT_EAGER=1
        qemu-img create -q -f qcow2 -o cluster_size=64k "$img" $SIZE
        qemu-io -f qcow2 -c 'write -P 0x98 0 4M' "$img" >/dev/null
        qemu-img bitmap --add "$img" b0
        qemu-img bitmap --add --granularity 4k "$img" b4k
        qemu-io -f qcow2 -c 'write -P 0x99 4M 2M' -c 'write -z 20M 1M' "$img" >/dev/null ;;
    extl2)
        CS=131072
        qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k "$img" $SIZE
        qemu-io -f qcow2 -c 'write -P 0x91 0 4M' -c 'write -P 0x92 8196k 12k' \
            -c 'write -z 4100k 8k' -c 'write -c -P 0x93 16M 1M' "$img" >/dev/null ;;
    luks)
        # Data, some of it compressed (then encrypted), a zero cluster
        # range, data at an offset that is no cluster's, and a discard.
        SECRET=$PASSFILE PARAMS=passphrase=+$PASSFILE
        local o=encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100
        # QEMU's PBKDF calibration can fail at a short iter-time on a
        # loaded machine ("Unable to get accurate CPU usage"): one more try.
        qemu-img create -q -f qcow2 --object "secret,id=s0,file=$PASSFILE" \
            -o "$o" "$img" $SIZE ||
            qemu-img create -q -f qcow2 --object "secret,id=s0,file=$PASSFILE" \
                -o "$o" "$img" $SIZE
        local out
        out=$(qemu-io "${qemu_luks[@]}" -c 'write -P 0xa1 0 6M' \
            -c 'write -c -P 0xa2 8M 1M' -c 'write -z 12M 1M' \
            -c 'write -P 0xa3 5243392 300k' -c 'write -P 0xa4 40M 3M' \
            -c 'discard 41M 512k' "$(luks_opts "$img")" 2>&1) ||
            { echo "$out" >&2; fail "luks: qemu-io failed"; }
        ! echo "$out" | grep -q failed || { echo "$out" >&2; fail "luks: a qemu-io write failed"; } ;;
    esac
}

total_fail=0 i=0
: >"$TMP/summary"
for shape in $SHAPES; do
    # The points are shared out so that the total is what was asked for.
    n=$(( POINTS / nshapes + (i < POINTS % nshapes ? 1 : 0) ))
    seed=$(( SEED * 100 + i ))
    i=$((i + 1))
    [ "$n" -gt 0 ] || continue
    t0=$(date +%s)
    make_image "$shape"
    img=$TMP/$shape.qcow2
    # The copy is the replay's starting point: it must be taken before the
    # plugin first opens the image (opening may already write).
    cp --sparse=always "$img" "$TMP/$shape.init.qcow2"
    iolog=$TMP/$shape.iolog
    journal=$TMP/$shape.journal
    QCOW2RECLAIM_COMPACT_EAGER=$COMPACT_EAGER QCOW2RECLAIM_IOLOG=$iolog \
        start_server "$TMP/$shape.sock" "$TMP/$shape.log" file="$img" $PARAMS
    server=$LAST_SERVER_PID
    rc=0
    "$PYTHON" "$helper" workload --uri "nbd+unix:///?socket=$TMP/$shape.sock" \
        --iolog "$iolog" --journal "$journal" --seed $seed --ops "$OPS" \
        --cluster-size $CS $TRIMZERO $WORKLOAD_ARGS || rc=$?
    # A clean exit writes back the rest; those records are crash points too.
    stop_server "$server"
    [ $rc -eq 0 ] || fail "$shape: the workload failed (seed $seed, exit $rc)"
    check_image "$img"
    if [ -n "$BITMAPS" ] && qemu-img info "$img" | grep -q 'in-use'; then
        fail "$shape: a bitmap is still in use after the server stopped"
    fi
    [ -s "$iolog" ] || fail "$shape: the I/O log $iolog is empty (test hooks off?)"
    if [ -n "$COMPACT_EAGER" ]; then
        moved=$(grep -o 'clusters_moved=[0-9]*' "$TMP/$shape.log" | tail -n 1)
        [ "${moved#*=}" -gt 0 ] || fail "$shape: compaction moved nothing during the workload"
        echo "$shape: compaction during the workload: $moved"
    fi
    # Where the bitmaps lie above the data, the worker moved them: the
    # directory entry (or the table it names) is somewhere else now.
    if [ -n "$BITMAPS" ] && [ -n "$COMPACT_EAGER" ]; then
        b=${BITMAPS%%,*}
        before=$("$PYTHON" "$srcdir/qcow2_patch.py" bitmap "$TMP/$shape.init.qcow2" "$b")
        after=$("$PYTHON" "$srcdir/qcow2_patch.py" bitmap "$img" "$b")
        [ "$before" != "$after" ] || fail "$shape: compaction moved no bitmap table nor directory"
        echo "$shape: bitmap $b moved: $before -> $after"
    fi

    rc=0
    "$PYTHON" "$helper" replay --initial "$TMP/$shape.init.qcow2" --iolog "$iolog" \
        --journal "$journal" --plugin "$PLUGIN" --workdir "$TMP/$shape.work" \
        --name "$shape" --seed $seed --points "$n" --cluster-size $CS \
        $TRIMZERO ${KEEP:+--keep "$KEEP"} ${BITMAPS:+--bitmaps $BITMAPS} \
        ${SECRET:+--secret-file "$SECRET"} \
        >"$TMP/$shape.replay" || rc=$?
    cat "$TMP/$shape.replay"
    grep '^crash_replay ' "$TMP/$shape.replay" >>"$TMP/summary" ||
        fail "$shape: the replay did not finish (exit $rc)"
    # The state the close leaves (the log's end is always a point) has the
    # bitmaps whole: the check of their bits ran.
    [ -z "$BITMAPS" ] || grep -q 'bitmaps-whole=[1-9]' "$TMP/$shape.replay" ||
        fail "$shape: no crash state had the bitmaps whole"
    if [ $rc -ne 0 ]; then
        total_fail=$((total_fail + 1))
        if [ -n "$KEEP" ] && [ "$shape" = backing ]; then
            cp "$TMP/base.qcow2" "$KEEP/"
            echo "$shape: the kept images name $TMP/base.qcow2 as their backing file; point them at the copy with: qemu-img rebase -u -F qcow2 -b $KEEP/base.qcow2 IMAGE" >&2
        fi
        echo "$shape: failures above (seed $seed)${KEEP:+, inputs and failing images in $KEEP}; CRASH_SEED=$SEED reruns it, CRASH_KEEP=DIR keeps the inputs" >&2
    fi
    rm -rf "$TMP/$shape.work" "$iolog"
    echo "  ($shape: $(( $(date +%s) - t0 ))s)"
done

# One line with the totals over all shapes.
awk '{ for (f = 1; f <= NF; f++) { split($f, kv, "=");
         if (kv[1] in want) sum[kv[1]] += kv[2] + 0 } }
     BEGIN { split("points variants ok leaky failed torn continued records syncs", w, " ");
             for (k in w) want[w[k]] = 1 }
     END { printf "test-crash: %d crash points checked (and %d more crash states of the same points through qemu-img check only): %d ok (%d leaky, repaired), %d failed, %d torn writes, %d continued after the crash; %d host records, %d syncs\n",
             sum["points"], sum["variants"], sum["ok"], sum["leaky"], sum["failed"],
             sum["torn"], sum["continued"], sum["records"], sum["syncs"] }' "$TMP/summary"
echo "test-crash: seed $SEED, $(( $(date +%s) - started ))s"
[ $total_fail -eq 0 ] || fail "crash consistency failures in $total_fail shape(s), details above"
