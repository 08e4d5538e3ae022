#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# The file's length follows what the guest uses.  A real ext4 on the served
# disk (nbdfuse + loop, as test-fstrim-fs.sh): 256 MiB of files, then the
# 16 MiB kept written last, the rest deleted and trimmed.  The kept data
# lies at the end of the file, so only moving it makes the file shorter:
# within 30 s the length must be at most 1.1 x the host allocation + 1 MiB,
# the kept files must read back, qemu-img check must be clean.  The same
# with compact=off shows the file staying long, so the check can fail.
set -eu
srcdir=${srcdir:-$(cd "$(dirname "$0")" && pwd)}
. "$srcdir/functions.sh"

[ "$(id -u)" = 0 ] || skip "needs root (losetup, mount)"
[ -c /dev/fuse ] || skip "/dev/fuse is missing"
for c in nbdkit nbdfuse fusermount3 losetup mountpoint fstrim qemu-img md5sum; do
    requires "$c" --version
done
requires mkfs.ext4 -V
requires losetup -f
. "$srcdir/fuse-functions.sh"

MiB=$((1024 * 1024))
started=$(date +%s)
length() { stat -c %s "$1"; }
within_bound() { [ "$(length "$1")" -le $(( $(alloc "$1") * 11 / 10 + MiB )) ]; }

run() {
    local mode=$1 dir=$TMP/$1 i waited limit
    IMG=$dir/disk.qcow2 SOCK=$dir/nbd.sock LOG=$dir/nbdkit.log MNT=$dir/mnt FUSE=$dir/fuse
    mkdir -p "$MNT"
    qemu-img create -q -f qcow2 "$IMG" 4G
    start_server "$SOCK" "$LOG" file="$IMG" compact="$mode" statsfile="$dir/stats"
    SERVER=$LAST_SERVER_PID
    fuse_attach "$SOCK" "$FUSE"
    mkfs.ext4 -q -F "$LOOP"
    mount -t ext4 "$LOOP" "$MNT"
    MOUNTS="$MOUNTS $MNT"
    mkdir "$MNT/old" "$MNT/keep"
    for i in $(seq 1 60); do
        head -c $((4 * MiB + i * 4096)) /dev/urandom >"$MNT/old/f$i"
    done
    sync
    for i in 1 2 3 4; do
        head -c $((4 * MiB)) /dev/urandom >"$MNT/keep/k$i"
    done
    sync
    (cd "$MNT/keep" && md5sum k*) >"$dir/kept.md5"
    echo "$mode: written: length $(mib "$(length "$IMG")"), allocated $(mib "$(alloc "$IMG")")"
    rm -rf "$MNT/old"
    sync
    fstrim "$MNT"
    sync
    # compact=off gets a few seconds: nothing will move there.
    waited=0 limit=$([ "$mode" = off ] && echo 5 || echo 30)
    while ! within_bound "$IMG" && [ "$waited" -lt "$limit" ]; do
        sleep 1
        waited=$((waited + 1))
    done
    RESULT_LEN=$(length "$IMG") RESULT_ALLOC=$(alloc "$IMG") RESULT_WAIT=$waited
    echo "$mode: after fstrim and ${waited}s: length $(mib "$RESULT_LEN"), allocated $(mib "$RESULT_ALLOC")"
    (cd "$MNT/keep" && for f in k*; do
         echo "$(dd if="$f" iflag=direct bs=1M status=none | md5sum | cut -d' ' -f1)  $f"
     done) | diff - "$dir/kept.md5" >/dev/null || fail "$mode: the kept files read back differently"
    umount "$MNT"
    MOUNTS=$(drop_word "$MNT" $MOUNTS)
    fuse_detach "$FUSE"
    stop_server "$SERVER"
    log_errors "$LOG" >&2 && fail "$mode: errors in the server log"
    check_clean "$IMG"
    echo "ok: $mode: kept files intact, qemu-img check clean; $(grep -o 'reclaim totals: .*' "$LOG")"
}

run off
off_len=$RESULT_LEN off_alloc=$RESULT_ALLOC
[ "$off_len" -gt $(( off_alloc * 11 / 10 + MiB )) ] ||
    fail "compact=off: the file is already short ($(mib "$off_len") for $(mib "$off_alloc")): this test shows nothing"
echo "ok: compact=off: the file stays $(mib "$off_len") long for $(mib "$off_alloc") of data"

run auto
[ "$RESULT_LEN" -le $(( RESULT_ALLOC * 11 / 10 + MiB )) ] ||
    fail "compact=auto: length $(mib "$RESULT_LEN") after 30 s, more than 1.1 x $(mib "$RESULT_ALLOC") + 1 MiB"
echo "ok: compact=auto: length $(mib "$RESULT_LEN") <= 1.1 x allocation $(mib "$RESULT_ALLOC") + 1 MiB within ${RESULT_WAIT}s (compact=off: $(mib "$off_len"))"
echo "test-compact-fs: passed in $(( $(date +%s) - started ))s"
