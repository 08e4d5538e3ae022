#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# What `make install` puts in place must be what users run: the plugin in
# nbdkit's plugin directory, the man pages, the systemd templates, and the
# qcow2reclaim tool (once it is built).  The installed plugin must serve an image by its full path,
# and, when this runs as root and nbdkit's own plugin directory is free, by
# the short name `nbdkit qcow2reclaim`.  `make uninstall` must then remove
# every file the install created.
set -eu
: "${srcdir:=$(cd "$(dirname "$0")" && pwd)}"
: "${top_srcdir:=$srcdir/..}"
: "${top_builddir:=$top_srcdir}"
. "$srcdir/functions.sh"

requires make --version
requires nbdkit --version
requires qemu-img --version
requires qemu-io --version
requires "$PYTHON" -c 'import nbd'

BUILT_PLUGIN=$PLUGIN
[ -f "$BUILT_PLUGIN" ] || fail "the built plugin $BUILT_PLUGIN is missing (run make)"
[ -f "$top_builddir/Makefile" ] || fail "$top_builddir/Makefile is missing (run configure)"

# This script may run under `make check`, whose MAKEFLAGS (jobserver file
# descriptors among them) mean nothing to the make started here.
unset MAKEFLAGS MFLAGS MAKELEVEL MAKEOVERRIDES GNUMAKEFLAGS

# A copy of the plugin put into nbdkit's own plugin directory by this
# test, removed on any exit.  It is removed only if it is still the copy
# made here, so a plugin someone installs meanwhile is left alone.
SYSTEM_COPY=
SYSTEM_COPY_SUM=
SYSTEM_COPY_TMP=
cleanup_install() {
    [ -z "$SYSTEM_COPY_TMP" ] || rm -f "$SYSTEM_COPY_TMP"
    if [ -n "$SYSTEM_COPY" ] && [ -f "$SYSTEM_COPY" ] &&
       [ "$(sha256sum <"$SYSTEM_COPY")" = "$SYSTEM_COPY_SUM" ]; then
        rm -f "$SYSTEM_COPY"
    fi
}
cleanup_fn cleanup_install

# The directories configure chose, from the top Makefile, expanded the way
# make would: "${var}" and "$(var)" are replaced by the value of that
# variable in the same Makefile, until none is left.
makevar() {
    sed -n "s/^$1 = //p" "$top_builddir/Makefile" | head -n 1
}
expand() {
    local v=$1 n name val
    for n in 1 2 3 4 5 6 7 8 9 10; do
        name=$(printf '%s\n' "$v" |
               sed -n 's/.*\$[{(]\([A-Za-z_][A-Za-z0-9_]*\)[})].*/\1/p')
        [ -n "$name" ] || break
        val=$(makevar "$name")
        v=${v//"\${$name}"/$val}
        v=${v//"\$($name)"/$val}
    done
    case $v in
        *'$'*|'') fail "cannot expand '$1' from $top_builddir/Makefile" ;;
    esac
    printf '%s\n' "$v"
}
prefix=$(expand "$(makevar prefix)")
bindir=$(expand "$(makevar bindir)")
mandir=$(expand "$(makevar mandir)")
plugindir=$(expand "$(makevar plugindir)")
unitdir=$(expand "$(makevar systemdsystemunitdir)")
[ -n "$prefix" ] && [ -n "$mandir" ] && [ -n "$bindir" ] && [ -n "$plugindir" ] &&
    [ -n "$unitdir" ] ||
    fail "cannot read prefix, bindir, mandir, plugindir and systemdsystemunitdir from $top_builddir/Makefile"
pc_plugindir=$(pkg-config --variable=plugindir nbdkit 2>/dev/null || true)
if [ -n "$pc_plugindir" ] && [ "$pc_plugindir" != "$plugindir" ]; then
    echo "note: configured plugindir $plugindir differs from nbdkit's $pc_plugindir"
fi
echo "prefix=$prefix bindir=$bindir mandir=$mandir plugindir=$plugindir"

# A small image with known contents: 0x5a in the first 64 KiB, zeros after.
IMG=$TMP/small.qcow2
qemu-img create -q -f qcow2 "$IMG" 16M
qemu-io -f qcow2 -c 'write -q -P 0x5a 0 64k' "$IMG" >/dev/null

# serve_and_read PLUGIN: serve the image with that plugin (path or short
# name) and read back the known contents.
serve_and_read() {
    local saved=$PLUGIN sock=$TMP/serve.sock log=$TMP/serve.log
    PLUGIN=$1
    start_server "$sock" "$log" file="$IMG"
    PLUGIN=$saved
    if ! "$PYTHON" -m nbd -u "nbd+unix:///?socket=$sock" \
         -c 'assert h.get_size() == 16 << 20, h.get_size()' \
         -c 'assert h.pread(65536, 0) == b"\x5a" * 65536' \
         -c 'assert h.pread(65536, 65536) == bytes(65536)'; then
        stop_server "$LAST_SERVER_PID"
        grep -v ': debug: ' "$log" >&2 || true
        fail "reading the image served by $1 returned wrong data"
    fi
    stop_server "$LAST_SERVER_PID"
}

# ---- make install ------------------------------------------------------
DEST=$TMP/dest
mkdir -p "$DEST"
if ! make -C "$top_builddir" install DESTDIR="$DEST" >"$TMP/install.log" 2>&1; then
    cat "$TMP/install.log" >&2
    fail "make install DESTDIR=$DEST failed"
fi
echo "installed files:"
(cd "$DEST" && find . ! -type d | sort | sed 's/^\./    /')

so=$DEST$plugindir/nbdkit-qcow2reclaim-plugin.so
[ -f "$so" ] || fail "the plugin is not installed as $plugindir/nbdkit-qcow2reclaim-plugin.so"
nbdkit "$so" --dump-plugin | grep -q '^qcow2reclaim_version=' ||
    fail "nbdkit cannot load the installed plugin $so"
echo "ok: plugin installed in $plugindir"

for page in nbdkit-qcow2reclaim-plugin.1 qcow2reclaim.1; do
    inst=$DEST$mandir/man1/$page
    [ -f "$inst" ] ||
        fail "man page $page is not installed in $mandir/man1 (is man in SUBDIRS and man/Makefile in configure.ac?)"
    if [ -f "$top_builddir/man/$page" ] && ! cmp -s "$inst" "$top_builddir/man/$page"; then
        fail "the installed $page differs from $top_builddir/man/$page"
    fi
    MANWIDTH=80 man -l "$inst" 2>/dev/null | grep -q 'qcow2reclaim' ||
        fail "the installed $page does not render"
done
echo "ok: man pages installed in $mandir/man1"

# The templates for one image and for a folder of images.
for unit in qcow2reclaim@.socket qcow2reclaim@.service \
            qcow2reclaim-dir@.socket qcow2reclaim-dir@.service; do
    cmp -s "$DEST$unitdir/$unit" "$top_srcdir/systemd/$unit" ||
        fail "the systemd unit $unit is not installed in $unitdir as it is in systemd/"
done
echo "ok: systemd units installed in $unitdir"

if [ -e "$top_builddir/tools/qcow2reclaim" ]; then
    tool=$DEST$bindir/qcow2reclaim
    [ -f "$tool" ] && [ -x "$tool" ] || fail "the tool is not installed as $bindir/qcow2reclaim"
    "$tool" --version | grep -q '^qcow2reclaim ' ||
        fail "the installed $bindir/qcow2reclaim does not run"
    echo "ok: qcow2reclaim installed in $bindir"
else
    echo "skipped: $top_builddir/tools/qcow2reclaim is not built, so its installation is not checked"
fi

serve_and_read "$so"
echo "ok: the installed plugin serves an image by its full path"

# ---- make uninstall ----------------------------------------------------
if ! make -C "$top_builddir" uninstall DESTDIR="$DEST" >"$TMP/uninstall.log" 2>&1; then
    cat "$TMP/uninstall.log" >&2
    fail "make uninstall DESTDIR=$DEST failed"
fi
left=$(cd "$DEST" && find . ! -type d | sort)
if [ -n "$left" ]; then
    echo "$left" >&2
    fail "make uninstall left files behind in $DEST"
fi
echo "ok: make uninstall removed every installed file"

# ---- the short name ----------------------------------------------------
# nbdkit finds `nbdkit qcow2reclaim` only in the plugin directory it was
# compiled with, so this part needs that directory, and root to write it.
sysdir=$(nbdkit --dump-config | sed -n 's/^plugindir=//p')
sysso=$sysdir/nbdkit-qcow2reclaim-plugin.so
built_sum=$(sha256sum <"$BUILT_PLUGIN")
if [ -z "$sysdir" ] || [ ! -d "$sysdir" ]; then
    echo "skipped: nbdkit --dump-config names no plugin directory that exists"
    exit 0
elif [ -e "$sysso" ] || [ -L "$sysso" ]; then
    if [ -f "$sysso" ] && [ "$(sha256sum <"$sysso")" = "$built_sum" ]; then
        echo "note: $sysso is already installed and identical to this build; using it"
    else
        echo "skipped: short name not tested: $sysso exists and is not this build (left alone)"
        exit 0
    fi
elif [ "$(id -u)" -ne 0 ]; then
    echo "skipped: short name not tested: copying the plugin into $sysdir needs root"
    exit 0
else
    # Copy under a temporary name and rename, so nbdkit never sees half a file.
    SYSTEM_COPY_TMP=$sysso.q2r-test.$$
    cp "$BUILT_PLUGIN" "$SYSTEM_COPY_TMP"
    SYSTEM_COPY=$sysso
    SYSTEM_COPY_SUM=$built_sum
    mv "$SYSTEM_COPY_TMP" "$sysso"
    SYSTEM_COPY_TMP=
    echo "note: copied the plugin to $sysso for this test; it is removed on exit"
fi

ver=$(nbdkit qcow2reclaim --version 2>&1) || { echo "$ver" >&2; fail "nbdkit qcow2reclaim --version failed"; }
echo "$ver" | grep -q '^qcow2reclaim ' ||
    { echo "$ver" >&2; fail "nbdkit qcow2reclaim --version does not name the plugin"; }
serve_and_read qcow2reclaim
echo "ok: nbdkit qcow2reclaim serves an image by its short name"
