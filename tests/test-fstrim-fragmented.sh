#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# Fragmented free space: many small files (4-16 KiB) with every other one
# deleted leaves free extents far smaller than a 64 KiB qcow2 cluster, so
# hardly any cluster becomes entirely free.  A server that only frees whole
# clusters (qemu-nbd --discard=unmap) gives almost nothing back after
# fstrim; the plugin punches the discarded parts of clusters on host block
# boundaries, so the host file must shrink by (nearly) what the filesystem
# freed:
#
#   A1 - A2 >= 90% of F
#
# where A1/A2 are the host file's allocated bytes before the deletion and
# after fstrim, and F the filesystem's used space freed by the deletion (df).
# The missing 10% is room for what ext4 writes meanwhile (journal blocks and
# metadata touched for the first time, each costing whole clusters).
#
# The same run is then made with qemu-nbd serving the same kind of image,
# only printed, as a reference (FSTRIM_COMPARE=no leaves it out).
#
# The disk is reached as a user would with no /dev/nbd*: nbdfuse makes the
# export a file, a loop device on it carries ext4, and the loop device turns
# discards into fallocate(PUNCH_HOLE), which nbdfuse sends as NBD TRIM.
set -eu
srcdir=${srcdir:-$(cd "$(dirname "$0")" && pwd)}
. "$srcdir/functions.sh"

[ "$(id -u)" = 0 ] || skip "needs root (losetup, mount)"
[ -c /dev/fuse ] || skip "/dev/fuse is missing"
for c in nbdkit nbdfuse fusermount3 losetup mountpoint fstrim qemu-img df "$PYTHON"; do
    requires "$c" --version
done
requires mkfs.ext4 -V
# A free loop device.
requires losetup -f

NFILES=${FRAGMENTED_FILES:-12000}
started=$(date +%s)

. "$srcdir/fuse-functions.sh"

# serve KIND SOCK LOG IMAGE [STATS]
serve() {
    local kind=$1 sock=$2 log=$3 img=$4 stats=${5:-}
    if [ "$kind" = nbdkit ]; then
        start_server "$sock" "$log" file="$img" statsfile="$stats"
    else
        start_qemu_nbd "$sock" "$log" "$img" --discard=unmap
    fi
}

# settle IMAGE: the allocated bytes once they stop changing.  Discards can
# still be in flight when fstrim returns; ext4 waits for its own, but the
# figure must not depend on that.
settle() {
    local now prev=-1 t=$SECONDS
    now=$(alloc "$1")
    while [ "$now" != "$prev" ] && [ $((SECONDS - t)) -lt 30 ]; do
        sleep 0.5
        prev=$now
        now=$(alloc "$1")
    done
    echo "$now"
}

# run KIND: the whole workload on a fresh 1 GiB image; sets PCT (percent
# of the freed bytes that left the host file, one decimal) and LINE.
run() {
    local kind=$1 dir=$TMP/$1 img sock log stats mnt fuse server
    local a0 a1 a2 u1 u2 freed back out t0 tw tf ts
    t0=$(date +%s)
    img=$dir/disk.qcow2 sock=$dir/nbd.sock log=$dir/server.log stats=$dir/stats
    mnt=$dir/mnt fuse=$dir/fuse
    mkdir -p "$mnt"
    cp "$TMP/pristine.qcow2" "$img"

    serve "$kind" "$sock" "$log" "$img" "$stats"
    server=$LAST_SERVER_PID
    fuse_attach "$sock" "$fuse"
    mkfs.ext4 -q -F "$LOOP"
    mount -t ext4 "$LOOP" "$mnt"
    MOUNTS="$MOUNTS $mnt"
    sync
    a0=$(alloc "$img")

    tw=$SECONDS
    # Sizes from a fixed seed, so both servers see the same layout; the
    # bytes come from one random buffer, which costs nothing to produce.
    "$PYTHON" - "$mnt/d" "$NFILES" <<'EOF'
import os, random, sys
d, n = sys.argv[1], int(sys.argv[2])
r = random.Random(12000)
pool = os.urandom(1 << 20)
os.mkdir(d)
for i in range(n):
    size = r.randint(4096, 16384)
    off = r.randrange(len(pool) - size)
    with open(f"{d}/f{i:05d}", "wb") as f:
        f.write(pool[off:off + size])
EOF
    sync
    tw=$((SECONDS - tw))
    a1=$(alloc "$img")
    u1=$(used "$mnt")

    "$PYTHON" - "$mnt/d" "$NFILES" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(0, n, 2):
    os.unlink(f"{d}/f{i:05d}")
EOF
    # ext4 only releases the blocks of deleted files at the journal commit
    # (sync); other filesystems (xfs) free them later still, in background
    # work that sync does not wait for, so wait until df stops moving.
    sync
    u2=$(used "$mnt")
    ts=$SECONDS
    while [ "$(used "$mnt")" != "$u2" ] && [ $((SECONDS - ts)) -lt 30 ]; do
        sleep 0.3
        u2=$(used "$mnt")
    done
    sync
    freed=$((u1 - u2))
    tf=$SECONDS
    out=$(fstrim -v "$mnt")
    tf=$((SECONDS - tf)) ts=$SECONDS
    a2=$(settle "$img")
    ts=$((SECONDS - ts))
    back=$((a1 - a2))
    PCT=$(awk -v b="$back" -v f="$freed" 'BEGIN { printf "%.1f", (f > 0 ? 100 * b / f : 0) }')
    LINE="$kind: $NFILES files written in ${tw}s (host file $(mib "$a0") after mkfs -> $(mib "$a1"), df used $(mib "$u1")); every other deleted: df freed F=$(mib "$freed"); fstrim (${tf}s): ${out#*: }; host file after fstrim $(mib "$a2") (settled in ${ts}s): gave back $(mib "$back") = $PCT% of F"
    FREED=$freed BACK=$back

    umount "$mnt"
    MOUNTS=$(drop_word "$mnt" $MOUNTS)
    fuse_detach "$fuse"
    stop_server "$server"
    if [ "$kind" = nbdkit ]; then
        log_errors "$log" >&2 &&
            echo "(messages above are from the server log $log)" >&2
        STATS_LINE=$(grep -o 'reclaim totals: .*' "$log" || tr '\n' ' ' <"$stats")
    fi
    check_clean "$img"
    LINE="$LINE; qemu-img check clean; $(( $(date +%s) - t0 ))s"
    rm -f "$img"
}

qemu-img create -q -f qcow2 "$TMP/pristine.qcow2" 1G

run nbdkit
if [ $((BACK * 10)) -lt $((FREED * 9)) ]; then
    echo "$LINE" >&2
    echo "server counters: $STATS_LINE" >&2
    fail "the host file gave back only $PCT% of what the filesystem freed (need >= 90%)"
fi
echo "ok: $LINE"
echo "    server counters: $STATS_LINE"

if [ "${FSTRIM_COMPARE:-yes}" != no ] && command -v qemu-nbd >/dev/null 2>&1; then
    run qemu-nbd
    echo "for comparison (not checked): $LINE"
fi
echo "test-fstrim-fragmented: passed in $(( $(date +%s) - started ))s"
