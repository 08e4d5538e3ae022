#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# SIGKILL under load.  Four client processes write, trim, zero and flush
# on their own regions of one image while the server is killed at a random
# moment; then the image must pass qemu-img check with at most leaks, every
# byte a client was told is durable (a FUA reply, or a flush reply after the
# request's own reply) must read back, and the same image is served again
# for the next round.  A kill keeps the page cache, so this is not a power
# cut (test-crash.sh is): it catches metadata written back in an unsafe
# order by the cache, by evictions and by reclaim, at any instant, with
# many requests in flight, and it checks that a leaky image is served
# and written to correctly afterwards.
#
# KILLS (default 200, 20 under valgrind) rounds in total, shared by five
# images: 64 KiB clusters; 4 KiB clusters with a metadata cache too small
# for the image, so that evictions write L2 tables and refcount blocks back
# in the middle of the load; one that compaction keeps moving, so that
# kills land in the middle of moves; extended L2 entries; and a
# LUKS-encrypted one (passphrase=+FILE; qemu-img checks it with the key),
# where requests below its 512-byte sectors read, decrypt and rewrite them.  KILL_SEED varies the load and the
# kill times; KILL_KEEP=DIR keeps the image and journals of a failing round.
set -eu
srcdir=${srcdir:-$(cd "$(dirname "$0")" && pwd)}
. "$srcdir/functions.sh"

requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires "$PYTHON" -c 'import nbd'

SEED=${KILL_SEED:-1}
KEEP=${KILL_KEEP:-}
# Short bursts keep 200 rounds within a few minutes; most of the time is
# the load itself.  Under valgrind (SLOW) a server needs longer to answer
# at all, and a killed one reports nothing, so fewer, longer rounds.
if [ "$SLOW" -gt 1 ]; then
    KILLS=${KILLS:-20}
else
    KILLS=${KILLS:-200}
fi
MIN_TIME=${KILL_MIN_TIME:-$(awk -v s="$SLOW" 'BEGIN { print 0.2 * s }')}
MAX_TIME=${KILL_MAX_TIME:-$(awk -v s="$SLOW" 'BEGIN { print 0.6 * s }')}
SIZE=32M
helper="$srcdir/crash_replay.py"
started=$(date +%s)

# Five images: the second is where evictions happen during the load; on
# the third, compaction moves clusters all the time (the eager test hook:
# it looks every 50 ms and compacts past any free cluster), so kills land
# in the middle of moves; the fourth has extended L2 entries (subclusters);
# the fifth is encrypted.
NAMES="c64k c4k compact extl2 luks"
declare -A CS PARAMS EAGER OPTS
CS[c64k]=65536 PARAMS[c64k]= EAGER[c64k]=
CS[c4k]=4096 PARAMS[c4k]=cache-size=32k EAGER[c4k]=
CS[compact]=65536 PARAMS[compact]=compact-rate=16M EAGER[compact]=1
CS[extl2]=131072 PARAMS[extl2]= EAGER[extl2]= OPTS[extl2]=,extended_l2=on
# The passphrase in a file without a final newline: QEMU's secret file=
# takes its bytes as they are, nbdkit's +FILE drops a final newline.
PASSFILE=$TMP/luks.pass
printf %s kill-round-passphrase >"$PASSFILE"
SECRET=(--object "secret,id=s0,file=$PASSFILE")
CS[luks]=65536 PARAMS[luks]=passphrase=+$PASSFILE EAGER[luks]=
OPTS[luks]=,encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100

# image_args NAME: sets IMG_ARGS, how qemu-img and qemu-io name NAME's
# image: with the key when it is encrypted.
image_args() {
    if [ "$1" = luks ]; then
        IMG_ARGS=("${SECRET[@]}" --image-opts
                  "driver=qcow2,file.filename=$TMP/$1.qcow2,encrypt.key-secret=s0")
    else
        IMG_ARGS=(-f qcow2 "$TMP/$1.qcow2")
    fi
}

for name in $NAMES; do
    img=$TMP/$name.qcow2
    # QEMU's PBKDF calibration can fail at a short iter-time on a loaded
    # machine ("Unable to get accurate CPU usage"): one more try.
    qemu-img create -q -f qcow2 "${SECRET[@]}" -o cluster_size=${CS[$name]}${OPTS[$name]:-} "$img" $SIZE ||
        qemu-img create -q -f qcow2 "${SECRET[@]}" -o cluster_size=${CS[$name]}${OPTS[$name]:-} "$img" $SIZE
    # Some data from the start, some of it compressed, so that the clients
    # also overwrite in place and COW from compressed clusters.
    image_args $name
    out=$(qemu-io "${IMG_ARGS[@]}" -c 'write -P 0x11 0 3M' -c 'write -c -P 0x22 8M 1M' \
        -c 'write -P 0x33 17M 2M' -c 'write -c -P 0x44 25M 1M' 2>&1) ||
        { echo "$out" >&2; fail "$name: qemu-io failed"; }
    ! echo "$out" | grep -q failed || { echo "$out" >&2; fail "$name: a qemu-io write failed"; }
    mkdir -p "$TMP/$name.state"
done
# The compacting image starts long: written whole, most of it discarded.
trims=()
for c in $(seq 0 3 511); do trims+=(-c "discard $((c << 16)) 128k"); done
qemu-io -f qcow2 -c 'write -P 0x55 0 32M' "${trims[@]}" "$TMP/compact.qcow2" >/dev/null

# serve NAME: start the server on NAME's image; sets SERVER.
serve() {
    QCOW2RECLAIM_COMPACT_EAGER=${EAGER[$1]} \
        start_server "$TMP/$1.sock" "$TMP/$1.log" file="$TMP/$1.qcow2" ${PARAMS[$1]}
    SERVER=$LAST_SERVER_PID
}

# keep_round NAME ROUND: save what a failing round leaves for a replay.
keep_round() {
    [ -n "$KEEP" ] || return 0
    mkdir -p "$KEEP"
    cp --sparse=always "$TMP/$1.qcow2" "$KEEP/$1-round$2.qcow2"
    cp "$TMP/$1.log" "$KEEP/$1-round$2.server.log" 2>/dev/null || true
}

failures=0 leaky=0 leaked=0 rounds=0 moving=0
for round in $(seq 1 "$KILLS"); do
    # Take the images in turn; each keeps its own state between its rounds.
    case $((round % 5)) in 1) name=c64k ;; 2) name=c4k ;; 3) name=extl2 ;; 4) name=luks ;; *) name=compact ;; esac
    img=$TMP/$name.qcow2
    serve $name
    rc=0
    # bash reports the killed job ("Killed ...") on its own stderr at the
    # next command; the braces catch that, and the file keeps real errors.
    {
        "$PYTHON" "$helper" kill-round --sock "$TMP/$name.sock" --pid "$SERVER" \
            --state "$TMP/$name.state" --round "$round" \
            --seed $((SEED * 100000 + round)) --cluster-size ${CS[$name]} \
            --min-time "$MIN_TIME" --max-time "$MAX_TIME" ${KEEP:+--keep "$KEEP"} \
            >>"$TMP/rounds.log" || rc=$?
        # A round that failed its check returns before the kill; the pid
        # cannot have been reused, as it is not reaped yet.
        kill -KILL "$SERVER" 2>/dev/null || true
        wait "$SERVER" || true
    } 2>"$TMP/round.err"
    grep -v ' Killed ' "$TMP/round.err" >&2 || true
    # Gone: cleanup must not signal the number (it may be reused).
    forget_server "$SERVER"
    rounds=$((rounds + 1))
    grep -q 'compaction moved' "$TMP/$name.log" && moving=$((moving + 1))
    if [ $rc -ne 0 ]; then
        failures=$((failures + 1))
        tail -n 3 "$TMP/rounds.log" >&2
        log_errors "$TMP/$name.log" | tail -n 5 >&2 || true
        echo "round $round ($name, seed $((SEED * 100000 + round))) failed" >&2
        keep_round $name "$round"
        break
    fi
    # A kill may leak clusters; it may never corrupt.
    crc=0
    image_args $name
    out=$(qemu-img check "${IMG_ARGS[@]}" 2>&1) || crc=$?
    case $crc in
    0) ;;
    3)
        leaky=$((leaky + 1))
        n=$(echo "$out" | sed -n 's/^\([0-9]*\) leaked clusters were found.*/\1/p')
        leaked=$((leaked + ${n:-0}))
        qemu-img check -q -r leaks "${IMG_ARGS[@]}" >/dev/null 2>&1 || true
        out=$(qemu-img check "${IMG_ARGS[@]}" 2>&1) || {
            echo "$out" >&2
            keep_round $name "$round"
            fail "round $round ($name): not clean after qemu-img check -r leaks"
        } ;;
    *)
        echo "$out" | tail -n 30 >&2
        keep_round $name "$round"
        fail "round $round ($name, seed $((SEED * 100000 + round))): qemu-img check exit $crc after SIGKILL: corruption"
        ;;
    esac
done

# A last look at each image: the durable data of its last round, then a
# clean shutdown must leave no leaks at all.
if [ $failures -eq 0 ]; then
    for name in $NAMES; do
        serve $name
        "$PYTHON" "$helper" kill-round --sock "$TMP/$name.sock" --pid "$SERVER" \
            --state "$TMP/$name.state" --round $((KILLS + 1)) --verify-only \
            --cluster-size ${CS[$name]} >>"$TMP/rounds.log" ||
            { tail -n 3 "$TMP/rounds.log" >&2; failures=$((failures + 1)); }
        stop_server "$SERVER"
        image_args $name
        out=$(qemu-img check "${IMG_ARGS[@]}" 2>&1) ||
            { echo "$out" >&2; fail "qemu-img check $TMP/$name.qcow2 is not clean"; }
    done
fi

sent=$(awk '/^kill-round [0-9]*: previous round/ { s += $6; a += $8; d += $10; f += $12 } END { printf "%d requests sent, %d acknowledged, %d durable, %d flushes", s, a, d, f }' "$TMP/rounds.log")
echo "test-kill: $rounds kills ($moving while compaction was moving clusters), $failures failed, $leaky left leaks ($leaked clusters, repaired); $sent; seed $SEED, $(( $(date +%s) - started ))s"
[ $failures -ne 0 ] || [ "$rounds" -lt 3 ] || [ "$moving" -gt 0 ] ||
    fail "no round saw compaction move anything: the compacting image does not test moves"
[ $failures -eq 0 ] || fail "durable data lost or a request failed after a kill (details above)"
