#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# Several NBD connections writing at once into one image.  The server
# advertises multi-conn, so clients (nbdcopy, qemu, the kernel) will do this;
# it is only safe if every connection sees one shared metadata cache and the
# allocator and COW fills are properly serialised.  Each writer owns
# interleaved stripes, so neighbours allocate neighbouring (or, with the
# unaligned stripes, the same) clusters in the same L2 tables and refcount
# blocks, while each can still check its own data exactly.
#
# SERVER=qemu-nbd runs the same workload against qemu-nbd: that is only for
# validating the test itself.
set -eu
srcdir=${srcdir:-$(cd "$(dirname "$0")" && pwd)}
SERVER=${SERVER:-nbdkit}
[ "$SERVER" = qemu-nbd ] && : "${PLUGIN:=unused}"
. "$srcdir/functions.sh"

requires qemu-img --version
requires qemu-io --version
requires "$PYTHON" -c 'import nbd'
if [ "$SERVER" = qemu-nbd ]; then
    requires qemu-nbd --version
else
    requires nbdkit --version
fi

WRITERS=${MULTICONN_WRITERS:-4}
OPS=${MULTICONN_OPS:-2500}
# Fixed by default so that a failure replays; vary it to hunt for races.
SEED_BASE=$(( ${MULTICONN_SEED:-0} * 10000 ))
SIZE=$((256 * 1024 * 1024))
helper="$srcdir/multiconn_writers.py"
started=$(date +%s)

# serve SOCK LOG IMAGE: a read-write export of IMAGE on a Unix socket,
# with the plugin parameters in SERVER_ARGS.
SERVER_ARGS=
serve() {
    if [ "$SERVER" = qemu-nbd ]; then
        # -e: more than one client, which is also what makes qemu-nbd
        # advertise multi-conn.
        start_qemu_nbd "$1" "$2" "$3" -e 16 --discard=unmap
    else
        # shellcheck disable=SC2086 # parameters, one word each
        start_server "$1" "$2" file="$3" $SERVER_ARGS
    fi
}

# multiconn_case SEED NAME IMAGE STRIPE CLUSTER [BASE_RAW]
multiconn_case() {
    local seed=$1 name=$2 image=$3 stripe=$4 cluster=$5 base=${6:-}
    local sock=$TMP/$name.sock log=$TMP/$name.log dir=$TMP/$name
    local t0 k pids='' rc=0 pid
    t0=$(date +%s)
    mkdir -p "$dir"
    serve "$sock" "$log" "$image"
    local server=$LAST_SERVER_PID

    "$PYTHON" "$helper" probe "$sock" || fail "$name: export flags"

    for k in $(seq 0 $((WRITERS - 1))); do
        # A fixed seed per case and writer, so a failure can be replayed.
        "$PYTHON" "$helper" writer "$sock" "$k" "$WRITERS" "$stripe" --cluster "$cluster" \
            --seed $((SEED_BASE + seed * 100 + k)) --ops "$OPS" \
            --go "$dir/go" --out "$dir/w$k.raw" ${base:+--base "$base"} &
        pids="$pids $!"
    done
    touch "$dir/go"
    for pid in $pids; do wait "$pid" || rc=1; done
    if [ $rc -ne 0 ]; then
        log_errors "$log" | head -n 20 >&2 || true
        fail "$name: a writer failed (details above)"
    fi

    local outs=()
    for k in $(seq 0 $((WRITERS - 1))); do outs+=("$dir/w$k.raw"); done
    "$PYTHON" "$helper" combine "$SIZE" "$WRITERS" "$stripe" "$dir/expected.raw" "${outs[@]}"
    "$PYTHON" "$helper" verify "$sock" "$dir/expected.raw" "$WRITERS" "$stripe" ||
        fail "$name: a fresh connection does not read what the writers wrote"

    stop_server "$server"
    log_errors "$log" >&2 && echo "($name: messages above are from the server log)" >&2
    check_clean "$image"
    qemu-img convert -O raw "$image" "$dir/after.raw"
    if ! cmp "$dir/after.raw" "$dir/expected.raw"; then
        cmp -l "$dir/after.raw" "$dir/expected.raw" | head -n 5 >&2 || true
        fail "$name: after the server exited, the image does not hold what was written"
    fi
    rm -f "$dir"/*.raw
    echo "ok: $name ($WRITERS writers x $OPS ops, stripe $stripe, $(( $(date +%s) - t0 ))s)"
}

# 1. A fresh image: every write allocates; stripes are cluster aligned, so
#    neighbours allocate adjacent clusters in the one L2 table.
qemu-img create -q -f qcow2 -o cluster_size=64k "$TMP/fresh.qcow2" $SIZE
multiconn_case 1 fresh "$TMP/fresh.qcow2" $((192 * 1024)) 65536

# 2. Over a backing file: partial writes must fill from the backing data,
#    and zeroing must hide it.  The backing has data only in part of the disk
#    (and a different cluster size) so both kinds of fill are exercised.
"$PYTHON" - "$TMP/backing.raw" <<'EOF'
import random, sys
r = random.Random(7)
with open(sys.argv[1], "wb") as f:
    f.truncate(256 << 20)
    for start in range(0, 256 << 20, 8 << 20):
        if r.random() < 0.6:
            f.seek(start)
            f.write(r.randbytes(5 << 20))
EOF
qemu-img convert -q -f raw -O qcow2 -o cluster_size=32k "$TMP/backing.raw" "$TMP/backing.qcow2"
rm -f "$TMP/backing.raw"
qemu-img create -q -f qcow2 -o cluster_size=64k -b backing.qcow2 -F qcow2 "$TMP/overlay.qcow2"
qemu-img convert -O raw "$TMP/overlay.qcow2" "$TMP/overlay-base.raw"
backing_sum=$(md5sum <"$TMP/backing.qcow2")
multiconn_case 2 overlay "$TMP/overlay.qcow2" $((192 * 1024)) 65536 "$TMP/overlay-base.raw"

# 3. 4 KiB clusters: many L2 tables (2 MiB each) and refcount blocks
#    (8 MiB each), so requests cross table boundaries and several tables
#    are allocated at once.
qemu-img create -q -f qcow2 -o cluster_size=4k "$TMP/small.qcow2" $SIZE
multiconn_case 3 small "$TMP/small.qcow2" $((192 * 1024)) 4096

# 4. Stripes that are not cluster aligned: several writers write different
#    bytes of the same unallocated cluster at the same time, over a backing
#    file.  Only one allocation may win, and no COW fill may overwrite a
#    neighbour's bytes.
qemu-img create -q -f qcow2 -o cluster_size=64k -b backing.qcow2 -F qcow2 "$TMP/shared.qcow2"
multiconn_case 4 shared "$TMP/shared.qcow2" $((20 * 1024)) 65536 "$TMP/overlay-base.raw"
# The backing file is read-only to the server, whatever happened above it.
[ "$(md5sum <"$TMP/backing.qcow2")" = "$backing_sum" ] || fail "the backing file was modified"
check_clean "$TMP/backing.qcow2"

# 5. Compaction moving clusters under the writers (DESIGN.md, "Compaction").
#    The image is written whole, then most of it discarded in scattered
#    pieces, so the file is four times as long as its data; the worker
#    starts moving at once (compact-rate=1G), and the writers' own trims
#    and sweeps keep freeing more.  Every read is checked.
if [ "$SERVER" = nbdkit ]; then
    qemu-img create -q -f qcow2 -o cluster_size=64k "$TMP/frag.qcow2" $SIZE
    qemu-io -f qcow2 -c "write -P 0x5a 0 $SIZE" "$TMP/frag.qcow2" >/dev/null
    "$PYTHON" - "$TMP/frag.qcow2" <<'EOF'
import random, subprocess, sys
r = random.Random(11)
cmds = []
for c in range(256 * 16):
    if r.random() < 0.75:
        cmds += ["-c", "discard %d 65536" % (c * 65536)]
subprocess.run(["qemu-io", "-f", "qcow2"] + cmds + [sys.argv[1]], check=True,
               stdout=subprocess.DEVNULL)
EOF
    qemu-img convert -O raw "$TMP/frag.qcow2" "$TMP/frag-base.raw"
    SERVER_ARGS="compact=auto compact-rate=1G"
    multiconn_case 5 compacting "$TMP/frag.qcow2" $((192 * 1024)) 65536 "$TMP/frag-base.raw"
    SERVER_ARGS=
    moved=$(grep -o 'clusters_moved=[0-9]*' "$TMP/compacting.log" | tail -n 1)
    [ "${moved#*=}" -gt 0 ] || fail "compacting: compaction moved nothing while the writers ran"
    echo "ok: compacting: $moved under the writers; the image ends at $(( $(stat -c %s "$TMP/frag.qcow2") >> 20 )) MiB"
fi

echo "test-multiconn: all cases passed in $(( $(date +%s) - started ))s"
