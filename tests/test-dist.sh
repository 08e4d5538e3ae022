#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The release tarball must hold what its documents point to: every script
# the README's and bench/README.md's figures come from, every test and its
# helpers and fixtures, the scripts, the systemd units, the man pages'
# sources, DESIGN.md, LICENSE and NEWS.  A file missing from a Makefile.am's
# EXTRA_DIST is left out of `make dist` without a word, and only a user of
# the tarball finds out.
#
# `make distdir` writes the tree `make dist` would pack (no archive, so it
# is quick); then:
#   - every source file under bench/, scripts/, systemd/, tests/, man/,
#     .ci/, plugin/, server/, tools/, include/ of the source tree (scripts,
#     C, Python, Markdown, POD, units, test images) is in it, and README.md,
#     DESIGN.md, LICENSE, NEWS;
#   - every path (dir/file) that README.md, bench/README.md, DESIGN.md or
#     a man page names is in it, except what the build makes (.libs/,
#     man/*.1, tools/qcow2reclaim);
#   - every bare script name (name.sh, name.py) they mention is in it
#     somewhere (bench/README.md says "fio-vs-qemu-nbd.sh" for one).
# In `make distcheck` the source tree is the unpacked tarball, so there
# the second and third checks are the ones that can fail.
set -eu
: "${srcdir:=$(cd "$(dirname "$0")" && pwd)}"
: "${top_srcdir:=$srcdir/..}"
: "${top_builddir:=$top_srcdir}"
. "$srcdir/functions.sh"

requires make --version
[ -f "$top_builddir/Makefile" ] || fail "$top_builddir/Makefile is missing (run configure)"
# This may run under `make check`, whose MAKEFLAGS (jobserver descriptors
# among them) mean nothing to the make started here.
unset MAKEFLAGS MFLAGS MAKELEVEL MAKEOVERRIDES GNUMAKEFLAGS

DIST=$TMP/dist
# automake's distdir must be relative to the top of the build tree (the
# subdirectories prefix it with ../).
rel=$(realpath --relative-to="$top_builddir" "$DIST") || fail "realpath --relative-to does not work here"
if ! make -C "$top_builddir" distdir distdir="$rel" >"$TMP/distdir.log" 2>&1; then
    cat "$TMP/distdir.log" >&2
    fail "make distdir failed"
fi
[ -f "$DIST/configure" ] || fail "make distdir made no tree with a configure script"
top=$(cd "$top_srcdir" && pwd)

missing=
need() { [ -e "$DIST/$1" ] || missing="$missing
  $1${2:+ ($2)}"; }

# Everything in the source tree that is source: what git tracks in a git
# checkout (so a scratch file left in tests/ is not asked for), every file
# otherwise; what the build leaves next to it (objects, logs, programs)
# does not have these names.
source_files() {
    if git -C "$top" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$top" ls-files
    else
        (cd "$top" && find . -type f | sed 's|^\./||')
    fi
}
for f in README.md DESIGN.md LICENSE NEWS; do need "$f"; done
while IFS= read -r f; do
    case $f in
        bench/*|scripts/*|systemd/*|tests/*|man/*|.ci/*|plugin/*|server/*|tools/*|include/*) ;;
        *) continue ;;
    esac
    case $f in
        .ci/*|*.sh|*.py|*.c|*.h|*.md|*.pod|*.supp|*.qcow2|*.socket|*.service|*/Makefile.am) need "$f" ;;
    esac
done < <(source_files | sort)
[ -z "$missing" ] || fail "not in the distribution (add them to EXTRA_DIST):$missing"
echo "ok: the source tree's files are in the distribution"

DOCS="README.md bench/README.md DESIGN.md man/nbdkit-qcow2reclaim-plugin.pod man/qcow2reclaim.pod"
for d in $DOCS; do
    [ -f "$top/$d" ] || fail "$d is missing from the source tree"
    # Paths relative to the top of the tree, not absolute ones (/run/...,
    # /etc/...) nor parts of them.
    for p in $(grep -oE '(^|[^/A-Za-z0-9_.-])(bench|tests|scripts|systemd|man|tools|plugin|server|include|\.ci)/[A-Za-z0-9_.@/-]*[A-Za-z0-9_]' "$top/$d" |
               sed -E 's|^[^a-z.]||' | sort -u); do
        case $p in
            */.libs/*|man/*.1|tools/qcow2reclaim) continue ;;
        esac
        need "$p" "named in $d"
    done
    for n in $(grep -oE '(^|[^/A-Za-z0-9_.-])[A-Za-z0-9_-]+\.(sh|py)\b' "$top/$d" |
               sed -E 's|^[^A-Za-z0-9_-]||' | sort -u); do
        [ -n "$(find "$DIST" -name "$n" -print -quit)" ] || missing="$missing
  $n (named in $d)"
    done
done
[ -z "$missing" ] || fail "not in the distribution (add them to EXTRA_DIST):$missing"
echo "ok: every file README.md, bench/README.md, DESIGN.md and the man pages name is in the distribution"
