# SPDX-License-Identifier: BSD-3-Clause
# Shared by the tests that put a real kernel filesystem on the server:
# the export becomes a file through nbdfuse, a loop device goes on top.
# Source after functions.sh; it registers a teardown with cleanup_fn that
# unmounts, detaches and stops nbdfuse before functions.sh stops the servers.

# Teardown must also happen when a check fails half way: a mounted
# filesystem, a loop device or a FUSE mount left behind would outlive the
# test (and rm -rf $TMP must never walk into a live FUSE mount).
MOUNTS='' LOOPS='' FUSE_DIRS='' FUSE_PIDS=''
fs_cleanup() {
    local m l d p back
    for m in $MOUNTS; do
        mountpoint -q "$m" 2>/dev/null || continue
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    # Only devices still backed by our files: a number we detached may
    # already belong to someone else.
    for l in $LOOPS; do
        back=$(losetup -n -O BACK-FILE "$l" 2>/dev/null) || continue
        case $back in "$TMP"/*) losetup -d "$l" 2>/dev/null || true ;; esac
    done
    for d in $FUSE_DIRS; do
        mountpoint -q "$d" 2>/dev/null || continue
        fusermount3 -u "$d" 2>/dev/null || umount -l "$d" 2>/dev/null || true
    done
    if [ -n "$FUSE_PIDS" ]; then
        _terminate 10 $FUSE_PIDS
        [ -z "$_LATE" ] || echo "note: nbdfuse$_LATE had to be killed${_STUCK:+;$_STUCK still running}" >&2
        _reap $FUSE_PIDS
    fi
}
cleanup_fn fs_cleanup

drop_word() { local w=$1; shift; local x out=; for x in "$@"; do [ "$x" = "$w" ] || out="$out $x"; done; echo "$out"; }

alloc() { stat -c '%b %B' "$1" | awk '{ print $1 * $2 }'; }
used() { df --output=used -B1 "$1" | tail -n 1 | tr -d ' '; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

# fuse_attach SOCK DIR: the export as DIR/disk, and LOOP on top of it.
fuse_attach() {
    local sock=$1 dir=$2
    mkdir -p "$dir"
    nbdfuse "$dir/disk" "nbd+unix:///?socket=$sock" >"$dir.log" 2>&1 &
    FUSE_PID=$!
    FUSE_PIDS="$FUSE_PIDS $FUSE_PID"
    FUSE_DIRS="$FUSE_DIRS $dir"
    for _ in $(seq 1 200); do
        [ -e "$dir/disk" ] && break
        kill -0 "$FUSE_PID" 2>/dev/null || { cat "$dir.log" >&2; fail "nbdfuse exited"; }
        sleep 0.05
    done
    [ -e "$dir/disk" ] || { cat "$dir.log" >&2; fail "nbdfuse did not mount $dir"; }
    LOOP=$(losetup -f --show "$dir/disk")
    LOOPS="$LOOPS $LOOP"
}

# fuse_detach DIR: undo fuse_attach; nbdfuse exits once unmounted.
fuse_detach() {
    local dir=$1
    losetup -d "$LOOP"
    # The kernel may only set autoclear while something (udev, blkid) still
    # holds the device; the FUSE file stays busy until the loop lets go.
    for _ in $(seq 1 100); do
        [ -z "$(losetup -n -j "$dir/disk" 2>/dev/null)" ] && break
        sleep 0.1
    done
    LOOPS=$(drop_word "$LOOP" $LOOPS)
    fusermount3 -u "$dir"
    for _ in $(seq 1 100); do
        _running "$FUSE_PID" || break
        sleep 0.1
    done
    if _running "$FUSE_PID"; then
        echo "note: nbdfuse had to be stopped" >&2
        _terminate 10 "$FUSE_PID"
    fi
    _reap "$FUSE_PID"
    FUSE_PIDS=$(drop_word "$FUSE_PID" $FUSE_PIDS)
}

