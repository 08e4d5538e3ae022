#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The man pages must be clean POD and must render without a single warning:
# podchecker (with its extra warnings) on the sources, then man(1) and
# groff with every warning enabled on the pages make built.  A warning here
# is usually a broken link, a list without =back, or a line too long to
# fit an 80-column terminal.
set -eu
: "${srcdir:=$(cd "$(dirname "$0")" && pwd)}"
: "${top_srcdir:=$srcdir/..}"
: "${top_builddir:=$top_srcdir}"
. "$srcdir/functions.sh"

# podchecker has no --version; a page of its own shows it runs.
printf '=head1 NAME\n\nprobe - podchecker works\n' >"$TMP/probe.pod"
requires podchecker "$TMP/probe.pod"

PAGES="nbdkit-qcow2reclaim-plugin qcow2reclaim"

# podchecker exits 0 even when it warns, so its output is what counts: the
# one "pod syntax OK." line and nothing else.
for p in $PAGES; do
    pod=$top_srcdir/man/$p.pod
    [ -f "$pod" ] || fail "$pod is missing"
    out=$(podchecker -warnings -warnings "$pod" 2>&1) ||
        { echo "$out" >&2; fail "podchecker found errors in $p.pod"; }
    if [ "$out" != "$pod pod syntax OK." ]; then
        echo "$out" >&2
        fail "podchecker is not silent about $p.pod"
    fi
    echo "ok: podchecker $p.pod"
done

# The rendered pages come from make (man/Makefile.am); a tree where they
# were not built cannot be checked.
for p in $PAGES; do
    [ -f "$top_builddir/man/$p.1" ] ||
        skip "$top_builddir/man/$p.1 is not built (run make in $top_builddir/man)"
done

# A page older than its source means make did not rebuild it: the check
# would pass on stale text.
for p in $PAGES; do
    if [ "$top_srcdir/man/$p.pod" -nt "$top_builddir/man/$p.1" ]; then
        fail "$top_builddir/man/$p.1 is older than $p.pod (run make)"
    fi
done

# man --warnings=w hands -ww (all warnings) to groff through man-db's own
# pipeline (preconv, tbl, the an macros) at the width of an 80-column
# terminal; without --warnings, man-db throws groff's warnings away.
# groff -ww on its own also catches what man's pipeline hides (unknown
# fonts, for one).  Output goes to /dev/null; only warnings are kept.
requires man --version
export MANWIDTH=80 LC_ALL=C.UTF-8
for p in $PAGES; do
    page=$top_builddir/man/$p.1
    warn=$(man --warnings=w -E UTF-8 -l "$page" 2>&1 >/dev/null) ||
        { echo "$warn" >&2; fail "man could not render $p.1"; }
    if [ -n "$warn" ]; then
        echo "$warn" >&2
        fail "man reports warnings for $p.1"
    fi
    if command -v groff >/dev/null 2>&1; then
        warn=$(groff -k -ww -z -man -Tutf8 -rLL=78n "$page" 2>&1) ||
            { echo "$warn" >&2; fail "groff could not render $p.1"; }
        if [ -n "$warn" ]; then
            echo "$warn" >&2
            fail "groff reports warnings for $p.1"
        fi
    fi
    # Nothing may run past the right edge of an 80-column terminal, in
    # verbatim examples included (groff does not warn about those).
    long=$(man -E ascii -l "$page" 2>/dev/null | sed 's/.\x08//g' |
           awk 'length($0) > 80 { print NR ": " $0 }')
    if [ -n "$long" ]; then
        echo "$long" >&2
        fail "$p.1 has lines wider than 80 columns"
    fi
    echo "ok: man and groff render $p.1 without warnings"
done
