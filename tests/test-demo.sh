#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# scripts/serve-demo.sh is what the README's first command ends with, so
# what it prints is pasted by people trying this out on their own images.
# Its commands are run here as printed:
#
#   refused   a file that is not qcow2: nbdkit's refusal, a non-zero exit
#             and no banner (the image is opened before anything is said);
#   user      an ext4 whose deleted file still holds 32 MiB: the banner
#             offers no whole-disk trim, nothing listens on a TCP address
#             other than loopback, the socket is private; "Look at it"
#             works; "Give space back" (FUSE + loop device + fstrim) gives
#             the 32 MiB back and keeps the other file; SIGINT to the
#             script stops it cleanly; "Check it" passes;
#   demo      no argument: the demo image is made, its whole-disk trim is
#             offered and gives the 256 MiB back; Ctrl-C (SIGINT to the
#             process group, as a terminal sends it) stops it cleanly;
#             "Check it" passes.
set -eu
: "${srcdir:=$(cd "$(dirname "$0")" && pwd)}"
: "${top_srcdir:=$srcdir/..}"
: "${top_builddir:=$top_srcdir}"
. "$srcdir/functions.sh"

SCRIPT=$top_srcdir/scripts/serve-demo.sh
[ -f "$SCRIPT" ] || fail "$SCRIPT is missing"
for c in nbdkit qemu-img qemu-io nbdinfo; do requires "$c" --version; done
requires "$PYTHON" -c 'import nbd'
requires ss -ltn
requires mkfs.ext4 -V
requires debugfs -V

# The script runs from the source tree, which distcheck makes read-only:
# the plugin and tool come from the build tree, the demo image and the
# socket directories go to $TMP.
export QCOW2RECLAIM_BUILDDIR=$top_builddir
export QCOW2RECLAIM_DEMO=$TMP/demo.qcow2
export TMPDIR=$TMP/run
mkdir -p "$TMPDIR"
# nbdsh runs the first python3 on PATH: make it the one with the nbd module.
mkdir -p "$TMP/bin"
ln -s "$PYTHON" "$TMP/bin/python3"
export PATH=$TMP/bin:$PATH

MiB=$((1024 * 1024))
alloc() { stat -c '%b %B' "$1" | awk '{ print $1 * $2 }'; }

# What pasting "Give space back" may leave behind when a check fails half
# way: a mount, a loop device, a FUSE mount, all under $TMPDIR.
demo_fs_cleanup() {
    local d l back
    for d in "$TMPDIR"/qcow2reclaim-demo.*; do
        [ -d "$d" ] || continue
        ! mountpoint -q "$d/mnt" 2>/dev/null || umount -l "$d/mnt" 2>/dev/null || true
        for l in $(losetup -n -O NAME -j "$d/fuse/disk" 2>/dev/null); do
            back=$(losetup -n -O BACK-FILE "$l" 2>/dev/null) || continue
            case $back in "$TMPDIR"/*) losetup -d "$l" 2>/dev/null || true ;; esac
        done
        ! mountpoint -q "$d/fuse" 2>/dev/null || fusermount3 -u -z "$d/fuse" 2>/dev/null || true
    done
}

# section OUT HEADING: the commands (lines indented by four spaces) under
# the heading that starts with HEADING.
section() {
    awk -v h="$2" '/^[^ ]/ { sec = (index($0, h) == 1) } sec && /^    / { print substr($0, 5) }' "$1"
}

# start_demo NAME ARGS...: the script in the background, in a process
# group of its own as a terminal's job would be (and so without SIGINT
# ignored, which a job of a shell without job control would have).  A
# suite started under nohup or in the background of a script has SIGINT
# ignored already, which no shell can undo for its children (and the
# script's trap would never run): env puts it back to the default.
# Waits for the banner's last section; SPID is the script.
start_demo() {
    local name=$1 i; shift
    OUT=$TMP/$name.out ERR=$TMP/$name.err
    set -m
    env --default-signal=INT "$SCRIPT" "$@" >"$OUT" 2>"$ERR" &
    SPID=$!
    set +m
    track_pid "$SPID"
    for i in $(seq 1 $((600 * SLOW))); do
        grep -q '^Check it' "$OUT" && return 0
        _running "$SPID" || break
        sleep 0.1
    done
    return 1
}

# The script and its children (nbdkit).
family() {
    local f s pids=$1
    for f in /proc/[0-9]*/stat; do
        { read -r s <"$f"; } 2>/dev/null || continue
        s=${s##*) }
        s=${s#* }
        [ "${s%% *}" != "$1" ] || { f=${f#/proc/}; pids="$pids ${f%/stat}"; }
    done
    echo "$pids"
}

# no_remote_listener: no TCP socket of the script or nbdkit listens on an
# address other than 127.0.0.1 or ::1.
no_remote_listener() {
    local p bad=
    for p in $(family "$SPID"); do
        bad=$bad$(ss -Hltnp | grep "pid=$p," | awk '$4 !~ /^(127\.0\.0\.1|\[::1\]):/' || true)
    done
    [ -z "$bad" ] || { echo "$bad" >&2; fail "$1: the demo listens on a non-local address"; }
    echo "ok: $1: nothing listens on a non-local address"
}

# banner_checks NAME: the banner names the image and a private socket
# that nbdkit listens on.
banner_checks() {
    local name=$1 image=$2 sock
    grep -q "^Serving $image\$" "$OUT" || { cat "$OUT" >&2; fail "$name: the banner does not name $image"; }
    sock=$(sed -n 's/^  on the Unix socket \(.*\),$/\1/p' "$OUT")
    [ -S "$sock" ] || { cat "$OUT" >&2; fail "$name: the banner's socket '$sock' is not a socket"; }
    [ "$(stat -c %a "$(dirname "$sock")")" = 700 ] ||
        fail "$name: $(dirname "$sock") is open to others (mode $(stat -c %a "$(dirname "$sock")"))"
    section "$OUT" "Look at it" | grep -q . || fail "$name: no 'Look at it' command"
    section "$OUT" "Check it after Ctrl-C" | grep -q 'qemu-img check' ||
        fail "$name: the banner does not say how to check the image afterwards"
    echo "ok: $name: the banner names the image and a private socket"
}

# run_section NAME HEADING: run the commands under HEADING as pasted.
run_section() {
    local name=$1 heading=$2 log
    log=$TMP/$1.$(echo "$2" | tr -c 'A-Za-z\n' _).log
    section "$OUT" "$heading" >"$log.sh"
    [ -s "$log.sh" ] || fail "$name: no commands under '$heading'"
    bash -e "$log.sh" >"$log" 2>&1 ||
        { cat "$log.sh" "$log" >&2; fail "$name: the '$heading' commands failed"; }
    echo "ok: $name: the '$heading' commands work as printed"
}

# stop_demo NAME SIGNAL-TARGET: SIGINT, then the script must exit 0 within
# the bound, with nbdkit gone and its socket directory removed.
stop_demo() {
    local name=$1 target=$2 kids i sock
    sock=$(sed -n 's/^  on the Unix socket \(.*\),$/\1/p' "$OUT")
    kids=$(family "$SPID")
    kill -INT -- "$target"
    for i in $(seq 1 $((300 * SLOW))); do _running "$SPID" || break; sleep 0.1; done
    if _running "$SPID"; then
        # What still runs and why: a signal ignored since the suite
        # started (SigIgn bit 1 is SIGINT) never reaches the trap, and a
        # client still connected (nbdfuse behind a loop device the kernel
        # has not let go) keeps nbdkit serving after its SIGTERM.
        ps -o pid,ppid,stat,wchan:20,etime,args -p "$(echo "$kids" | tr -s ' \n' ',' | sed 's/,$//')" >&2 || true
        grep -H SigIgn "/proc/$SPID/status" >&2 || true
        pgrep -a nbdfuse >&2 || true
        losetup -a >&2 || true
        cat "$ERR" >&2
        fail "$name: the script did not exit after SIGINT"
    fi
    forget_server "$SPID"
    local rc=0
    wait "$SPID" || rc=$?
    [ "$rc" = 0 ] || { cat "$ERR" >&2; fail "$name: the script exited $rc after SIGINT"; }
    for i in $kids; do ! _running "$i" || fail "$name: process $i outlived the script"; done
    [ ! -e "$(dirname "$sock")" ] || fail "$name: $(dirname "$sock") was left behind"
    echo "ok: $name: SIGINT stops the server, the script exits 0"
}

refused() {
    local rc=0
    head -c 1M /dev/zero >"$TMP/raw.img"
    "$SCRIPT" "$TMP/raw.img" >"$TMP/refused.out" 2>"$TMP/refused.err" || rc=$?
    [ "$rc" != 0 ] || fail "refused: the script exited 0 on a file that is not qcow2"
    ! grep -q . "$TMP/refused.out" || { cat "$TMP/refused.out" >&2; fail "refused: a banner was printed for an image that was refused"; }
    grep -q 'raw.img' "$TMP/refused.err" || { cat "$TMP/refused.err" >&2; fail "refused: the refusal does not name the image"; }
    [ -z "$(ls -A "$TMPDIR")" ] || fail "refused: $(ls "$TMPDIR") left in $TMPDIR"
    echo "ok: refused: no banner, exit $rc, the refusal names the image"
}

user() {
    local img=$TMP/user.qcow2 before after fuse=
    mkdir -p "$TMP/root"
    head -c $((32 * MiB)) /dev/urandom >"$TMP/root/big"
    echo "this one stays" >"$TMP/root/keep"
    mkfs.ext4 -q -F -E nodiscard -d "$TMP/root" "$TMP/user.raw" 128M >/dev/null 2>&1
    # Deleted the way a guest deletes: the blocks still hold the data.
    debugfs -w -R 'rm big' "$TMP/user.raw" >/dev/null 2>&1
    qemu-img convert -O qcow2 "$TMP/user.raw" "$img"
    rm -f "$TMP/user.raw"
    before=$(alloc "$img")
    # Registered in this case's subshell, so it runs before the subshell
    # stops the script it starts.
    cleanup_fn demo_fs_cleanup

    local ok=0
    start_demo user "$img" || ok=$?
    no_remote_listener user
    [ "$ok" = 0 ] || { cat "$OUT" "$ERR" >&2; fail "user: no complete banner"; }
    banner_checks user "$img"
    if grep -E -q 'trim\(|blkdiscard|nbdsh|zero\(' "$OUT"; then
        cat "$OUT" >&2
        fail "user: a whole-disk trim is offered for a user's image"
    fi
    echo "ok: user: no whole-disk trim offered"
    run_section user "Look at it"

    if [ "$(id -u)" = 0 ] && [ -c /dev/fuse ] && losetup -f >/dev/null 2>&1 &&
       command -v nbdfuse >/dev/null && command -v fstrim >/dev/null; then
        fuse=1
        run_section user "Give space back"
        grep -q 'trimmed' "$TMP/user.Give_space_back.log" ||
            { cat "$TMP/user.Give_space_back.log" >&2; fail "user: fstrim did not run"; }
    else
        echo "note: user: no root, /dev/fuse, loop device, nbdfuse or fstrim: the fstrim commands are not run"
    fi
    stop_demo user "$SPID"
    run_section user "Check it after Ctrl-C"

    after=$(alloc "$img")
    if [ -n "$fuse" ]; then
        [ "$after" -le $((before - 28 * MiB)) ] ||
            fail "user: host allocation went from $before to $after bytes: the 32 MiB deleted did not come back"
        echo "ok: user: fstrim through the printed commands gave $(( (before - after) / MiB )) MiB back"
    fi
    qemu-img convert -O raw "$img" "$TMP/user.raw"
    [ "$(debugfs -R 'cat keep' "$TMP/user.raw" 2>/dev/null)" = "this one stays" ] ||
        fail "user: the file that was kept does not read back"
    echo "ok: user: the kept file reads back"
}

demo() {
    local img=$QCOW2RECLAIM_DEMO before after ok=0
    start_demo demo || ok=$?
    no_remote_listener demo
    [ "$ok" = 0 ] || { cat "$OUT" "$ERR" >&2; fail "demo: no complete banner"; }
    [ -f "$img" ] || fail "demo: no demo image at $img"
    before=$(alloc "$img")
    [ "$before" -ge $((256 * MiB)) ] || fail "demo: the demo image holds only $before bytes"
    banner_checks demo "$img"
    section "$OUT" "Give space back" | grep -q 'h.trim' ||
        fail "demo: the whole-disk trim is not offered for the demo image"
    run_section demo "Look at it"
    run_section demo "Give space back"
    # Ctrl-C from a terminal: the whole foreground process group.
    stop_demo demo "-$SPID"
    run_section demo "Check it after Ctrl-C"
    after=$(alloc "$img")
    [ "$after" -le $((8 * MiB)) ] ||
        fail "demo: $after bytes still allocated after the whole-disk trim"
    echo "ok: demo: the whole-disk trim left $((after / 1024)) KiB allocated"
}

run_case refused
run_case user
run_case demo
[ "$FAILED" = 0 ] || fail "$FAILED case(s) failed"
