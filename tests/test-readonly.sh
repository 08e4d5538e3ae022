#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# nbdkit -r opens the image read-only, as nbdkit's file plugin does: an
# image no one may write (chattr +i: not even root) is served and reads
# back, however -r is spelled and wherever it stands on nbdkit's command
# line; and a readable, writable image served with -r takes only the
# shared lock, so qemu-img info can open it meanwhile.  An -r that is the
# value of another option (-e -r) is not read as -r.  Without -r, an image
# the server cannot write (immutable; or a mode that keeps its user out) is
# refused with the way to serve it: readonly=true.  All of it holds for
# the images of a dir= folder too.
set -eu
: "${srcdir:=$(cd "$(dirname "$0")" && pwd)}"
. "$srcdir/functions.sh"

requires nbdkit --version
requires qemu-img --version
requires qemu-io --version
requires "$PYTHON" -c 'import nbd'
requires setpriv --reuid=65534 --regid=65534 --clear-groups true

img=$TMP/immutable.qcow2 plain=$TMP/plain.qcow2
qemu-img create -q -f qcow2 "$img" 16M
qemu-io -f qcow2 -c 'write -P 0x5a 0 64k' "$img" >/dev/null
cp "$img" "$plain"
: >"$TMP/probe"
chattr +i "$TMP/probe" 2>/dev/null ||
    skip "chattr +i does not work on $TMP's filesystem"
chattr -i "$TMP/probe"
# Before anything else, so that the cleanup can remove the file.
cleanup_fn chattr -i "$img"
chattr +i "$img"
sum=$(md5sum <"$img")

sock=$TMP/nbd.sock log=$TMP/server.log

# serves DESCRIPTION IMAGE NBDKIT-ARGS...: nbdkit with these arguments
# (the plugin among them) serves the image, and its first sector reads back.
serves() {
    local desc=$1 image=$2; shift 2
    rm -f "$sock"
    nbdkit -f -U "$sock" "$@" >"$log" 2>&1 &
    track_server $! "$sock" "$log" nbdkit
    "$PYTHON" -m nbd -u "nbd+unix:///?socket=$sock" -c '
import sys
sys.exit(0 if h.pread(512, 0) == b"\x5a" * 512 and h.is_read_only() else 1)
' || { stop_server "$LAST_SERVER_PID"; cat "$log" >&2; fail "$desc: the first sector did not read back read-only"; }
}

for form in "-r PLUGIN" "--readonly PLUGIN" "--read-only PLUGIN" "--read PLUGIN" \
            "-vr PLUGIN" "PLUGIN -r" "-t 4 -r PLUGIN"; do
    args=()
    for w in $form; do
        [ "$w" = PLUGIN ] && args+=("$PLUGIN" file="$img") || args+=("$w")
    done
    serves "nbdkit $form, immutable image" "$img" "${args[@]}"
    stop_server "$LAST_SERVER_PID"
    echo "ok: nbdkit ${form/PLUGIN/plugin file=IMAGE} serves an immutable image"
done
[ "$(md5sum <"$img")" = "$sum" ] || fail "the immutable image changed"

# The shared lock: qemu-img info opens an image only a reader holds.
serves "nbdkit -r, plain image" "$plain" -r "$PLUGIN" file="$plain"
out=$(qemu-img info "$plain" 2>&1) ||
    { stop_server "$LAST_SERVER_PID"; echo "$out" >&2; fail "qemu-img info cannot open an image nbdkit -r serves"; }
stop_server "$LAST_SERVER_PID"
echo "ok: while nbdkit -r serves an image, qemu-img info opens it"

# refused DESCRIPTION PHRASE NBDKIT-ARGS...: nbdkit exits without serving,
# saying PHRASE.
refused() {
    local desc=$1 phrase=$2; shift 2
    rm -f "$sock"
    if timeout 20 "$@" >"$log" 2>&1; then
        fail "$desc: served the image"
    fi
    grep -qF -- "$phrase" "$log" ||
        { cat "$log" >&2; fail "$desc: the refusal does not say \"$phrase\""; }
    echo "ok: $desc: $(grep -m1 -F -- "$phrase" "$log")"
}

# dir=: nbdkit -r opens every image of the folder read-only (the immutable
# one, through a link, and a plain one, which qemu-img info can open
# meanwhile); without -r the immutable one's connection is refused with
# the way out, and the server goes on.
folder=$TMP/folder
mkdir "$folder"
ln -s "$img" "$folder/immutable.qcow2"
cp "$plain" "$folder/plain.qcow2"
dir_reads() {
    local export=$1
    "$PYTHON" - "$sock" "$export" <<'PY'
import nbd, sys
h = nbd.NBD(); h.set_export_name(sys.argv[2]); h.connect_unix(sys.argv[1])
sys.exit(0 if h.pread(512, 0) == b"\x5a" * 512 and h.is_read_only() else 1)
PY
}
rm -f "$sock"
nbdkit -f -U "$sock" -r "$PLUGIN" dir="$folder" >"$log" 2>&1 &
track_server $! "$sock" "$log" nbdkit
dir_reads immutable.qcow2 ||
    { stop_server "$LAST_SERVER_PID"; cat "$log" >&2; fail "nbdkit -r dir=: the immutable image did not read back read-only"; }
"$PYTHON" - "$sock" "$folder/plain.qcow2" <<'PY' ||
import nbd, subprocess, sys
h = nbd.NBD(); h.set_export_name("plain.qcow2"); h.connect_unix(sys.argv[1])
assert h.is_read_only()
r = subprocess.run(["qemu-img", "info", sys.argv[2]], capture_output=True, text=True)
sys.stderr.write(r.stderr)
sys.exit(r.returncode)
PY
    { stop_server "$LAST_SERVER_PID"; cat "$log" >&2; fail "nbdkit -r dir=: qemu-img info cannot open an image it serves"; }
stop_server "$LAST_SERVER_PID"
echo "ok: nbdkit -r dir= serves an immutable image, and takes only the shared lock on another"

rm -f "$sock"
nbdkit -f -U "$sock" "$PLUGIN" dir="$folder" >"$log" 2>&1 &
track_server $! "$sock" "$log" nbdkit
if dir_reads immutable.qcow2 2>/dev/null; then
    stop_server "$LAST_SERVER_PID"; fail "dir= without -r served an image it cannot write"
fi
"$PYTHON" - "$sock" <<'PY' ||
import nbd, sys
h = nbd.NBD(); h.set_export_name("plain.qcow2"); h.connect_unix(sys.argv[1])
sys.exit(0 if h.pread(512, 0) == b"\x5a" * 512 and not h.is_read_only() else 1)
PY
    { stop_server "$LAST_SERVER_PID"; cat "$log" >&2; fail "dir=: after the refusal, plain.qcow2 is not served for writing"; }
stop_server "$LAST_SERVER_PID"
phrase="dir=$folder: export 'immutable.qcow2': cannot open it for writing: Operation not permitted; to serve it read-only, add readonly=true"
grep -qF -- "$phrase" "$log" || { cat "$log" >&2; fail "dir=: the refusal does not say \"$phrase\""; }
echo "ok: dir= without -r: the immutable image's connection is refused with the way out, and the server goes on"

# -e takes the next word as its value: that -r is an export name.  And an
# image that cannot be written is refused with the way to serve it anyway.
refused "nbdkit -e -r (an export name), immutable image" \
    "file=$img: cannot open it for writing: Operation not permitted; to serve it read-only, add readonly=true" \
    nbdkit -f -U "$sock" -e -r "$PLUGIN" file="$img"

# Not writable by the user nbdkit runs as (root passes every mode bit).
# That user gets a copy of the plugin: the build tree may be closed to it.
chmod 0711 "$TMP"
mkdir -m 0755 "$TMP/nobody"
mkdir -m 0777 "$TMP/nobody/run"
cp "$PLUGIN" "$TMP/nobody/plugin.so"
cp "$plain" "$TMP/nobody/root-only.qcow2"
chmod 0644 "$TMP/nobody/root-only.qcow2" "$TMP/nobody/plugin.so"
# Under valgrind, that user's server writes its report there too.
[ -z "${VALGRIND:-}" ] || chmod 1777 "$VG_LOGS"
sock=$TMP/nobody/run/nbd.sock
refused "an image the server's user cannot write" \
    "file=$TMP/nobody/root-only.qcow2: cannot open it for writing: Permission denied; to serve it read-only, add readonly=true" \
    setpriv --reuid=65534 --regid=65534 --clear-groups \
    nbdkit -f -U "$sock" "$TMP/nobody/plugin.so" file="$TMP/nobody/root-only.qcow2"
