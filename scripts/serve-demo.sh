#!/bin/sh
# SPDX-License-Identifier: BSD-3-Clause
# Serves IMAGE (or a demo image made on the spot) with the freshly built
# plugin on a Unix socket only its owner can open, until Ctrl-C.
#   scripts/serve-demo.sh [IMAGE.qcow2] [more nbdkit plugin parameters]
#
# The commands it prints are meant to be pasted as they are.  Trimming the
# whole disk is offered for the demo image alone: on anyone's own image it
# would throw away every file.  There, the filesystems are trimmed, which
# frees only what they no longer use.
#
# QCOW2RECLAIM_BUILDDIR (default: this tree) is where the plugin and the
# tool were built, QCOW2RECLAIM_DEMO (default: demo.qcow2 at the top of this
# tree) where the demo image goes; the tests set them to run from a
# read-only source tree.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
build=${QCOW2RECLAIM_BUILDDIR:-$top}
plugin=$build/plugin/.libs/nbdkit-qcow2reclaim-plugin.so
tool=$build/tools/qcow2reclaim
[ -f "$plugin" ] || { echo "$plugin is not built: run ./configure && make first" >&2; exit 1; }

demo='' image=''
if [ $# -gt 0 ]; then
    image=$1
    shift
fi
if [ -z "$image" ]; then
    demo=1
    image=${QCOW2RECLAIM_DEMO:-$top/demo.qcow2}
    # Made under another name first: one interrupted half way is not
    # taken for a demo image by the next run.
    if [ ! -f "$image" ]; then
        echo "Creating a 4 GiB demo image with 256 MiB of data: $image"
        qemu-img create -q -f qcow2 "$image.part" 4G
        qemu-io -f qcow2 -c 'write -P 0xab 0 256M' "$image.part" >/dev/null
        mv "$image.part" "$image"
    fi
fi

# The printed commands name it in full, so they work from any directory.
case $image in /*) ;; *) image=$PWD/$image ;; esac

# alive PID: PID has not exited (kill -0 also succeeds for a zombie).
alive() {
    state=$(sed -n 's/.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null) || state=
    [ -n "$state" ] && [ "$state" != Z ]
}

# WORD as the shell reads it back: bare when it has nothing the shell
# would expand or split, in single quotes otherwise.
quote() {
    case $1 in
        *[!A-Za-z0-9_./:=+@%,-]*|'') printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
        *) printf '%s' "$1" ;;
    esac
}

# The socket's directory is private (mode 0700): nobody else can connect.
# It is removed at exit with rmdir and rm -f only, never rm -r: a FUSE or
# filesystem mount a user left in it must not be walked into.
dir=$(mktemp -d "${TMPDIR:-/tmp}/qcow2reclaim-demo.XXXXXX")
sock=$dir/nbd.sock
uri="nbd+unix:///?socket=$sock"
cleanup() {
    rm -f "$sock"
    rmdir "$dir/mnt" "$dir/fuse" 2>/dev/null || true
    rmdir "$dir" 2>/dev/null || true
}
trap cleanup EXIT

# nbdkit opens the image before it listens and exits at once, with one
# sentence, when the image is refused; so the banner is printed only once
# a client has been answered.
nbdkit -f --exit-with-parent -U "$sock" "$plugin" file="$image" "$@" &
pid=$!
# Ctrl-C reaches nbdkit too when it comes from the terminal; a signal sent
# to this script alone is passed on.  Either way nbdkit writes everything
# back before it exits, and this script waits for that.
stopped='' interrupted=''
trap 'stopped=1 interrupted=1; kill -TERM "$pid" 2>/dev/null || true' INT TERM HUP
until nbdinfo --size "$uri" >/dev/null 2>&1; do
    if ! alive "$pid"; then
        status=0
        wait "$pid" || status=$?
        [ -n "$stopped" ] && exit "$status"
        echo "serve-demo: nbdkit could not serve $image (exit $status)" >&2
        exit 1
    fi
    sleep 0.1
done

qimg=$(quote "$image")
qdir=$(quote "$dir")
cat <<MSG

Serving $image
  on the Unix socket $sock,
  which only $(id -un) can open.  Ctrl-C stops the server after it has
  written everything back to the image.

Look at it:
    nbdinfo --map '$uri'
MSG
if [ -n "$demo" ]; then
    cat <<MSG
Give space back (the demo image only: this trims the whole disk, all of its data):
    nbdsh -u '$uri' -c 'for o in range(0, h.get_size(), 1 << 30): h.trim(min(1 << 30, h.get_size() - o), o)' -c 'h.flush()'
MSG
else
    # The last line waits for nbdfuse to go: nbdkit (1.32) keeps serving
    # a client still connected after Ctrl-C, and nbdfuse stays connected
    # until the loop device lets go of its file, which can take a moment.
    cat <<MSG
Give space back: trim the filesystems on it through a client.  In a VM
  attached to the socket (README.md, "Attaching"), run fstrim -av.  Or, on
  this host as root, through a FUSE file and a loop device:
    d=$qdir; mkdir -p "\$d/fuse" "\$d/mnt"
    nbdfuse "\$d/fuse/disk" --unix "\$d/nbd.sock" & f=\$!
    for i in \$(seq 100); do [ -e "\$d/fuse/disk" ] && break; sleep 0.1; done
    dev=\$(losetup -P -f --show "\$d/fuse/disk"); lsblk -o NAME,FSTYPE,SIZE "\$dev"
    for p in \$(lsblk -lnpo NAME "\$dev"); do mount "\$p" "\$d/mnt" 2>/dev/null || continue; fstrim -v "\$d/mnt"; umount "\$d/mnt"; done
    losetup -d "\$dev"; fusermount3 -u -z "\$d/fuse"; wait \$f
MSG
fi
cat <<MSG
Check it after Ctrl-C (qemu-img check exits 0 when the image is clean):
    qemu-img check $qimg
    ls -ls $qimg
    $(quote "$tool") info $qimg

MSG

# A trapped signal ends the wait early, with 128 + its number, while
# nbdkit may still be writing back; the next wait gives nbdkit's own
# status, also when nbdkit exited just as the signal came.
while :; do
    interrupted=''
    status=0
    wait "$pid" || status=$?
    [ -n "$interrupted" ] || break
done
exit "$status"
