#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# What README.md tells users to type must work and print what it says:
#
#   quick start  the commands of "Quick start: serving on a Unix socket", run
#                as written but with the built plugin and tool for the
#                installed ones (as the README says to do in a build tree)
#                and $TMP for /tmp and /vm; and, where dpkg can say, every
#                program they run and every library the plugin and the tool
#                load come from the packages the section lists (or from
#                what those packages bring, or from coreutils and libc6);
#   man pages    every page man/Makefile.am installs is named, with how to
#                read it from the build tree;
#   examples     the commands of "How much can I get back?" make an image on
#                which `qcow2reclaim info` and `qcow2reclaim compact` print
#                every line the README shows (the host allocation's value
#                aside, which depends on the host's filesystem).
set -eu
: "${srcdir:=$(cd "$(dirname "$0")" && pwd)}"
: "${top_srcdir:=$srcdir/..}"
: "${top_builddir:=$top_srcdir}"
. "$srcdir/functions.sh"

README=$top_srcdir/README.md
[ -f "$README" ] || fail "$README is missing"
for c in nbdkit nbdinfo qemu-img qemu-io; do requires "$c" --version; done
[ -x "$TOOL" ] || fail "$TOOL is not built"

# section HEADING: the README's text from the "## HEADING" line to the next
# "## " heading.
section() {
    awk -v h="## $1" '/^## / { on = ($0 == h); next } on' "$README"
}
# commands HEADING: the indented lines of that section, without comments.
commands() {
    section "$1" | sed -n 's/^    //p' | grep -v '^#' || true
}

# stop_pidfile FILE: the server whose pid FILE holds, if it still runs.
stop_pidfile() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 0
    ! _running "$pid" || _terminate $((STOP_TIMEOUT * SLOW)) "$pid"
}

quick_start() {
    local h="Quick start: serving on a Unix socket" dir=$TMP/qs
    section "$h" | grep -q . || fail "quick start: README.md has no section '## $h'"
    mkdir -p "$dir"
    # nbdkit goes into the background on its own, so the harness does not
    # know it: if the commands fail before they stop it, this does.
    cleanup_fn stop_pidfile "$dir/disk.pid"
    qemu-img create -q -f qcow2 "$dir/disk.qcow2" 64M
    qemu-io -f qcow2 -c 'write -q -P 0x5a 0 4M' "$dir/disk.qcow2"
    commands "$h" | grep -v '^apt-get' |
        sed -e "s|/tmp/|$dir/|g" -e "s|/vm/|$dir/|g" \
            -e "s| qcow2reclaim file=| $PLUGIN file=|" \
            -e "s|qcow2reclaim info |$TOOL info |" >"$dir/run.sh"
    grep -q "nbdkit -U $dir/" "$dir/run.sh" ||
        { cat "$dir/run.sh" >&2; fail "quick start: no nbdkit on a Unix socket"; }
    if ! (cd "$dir" && bash -e ./run.sh) >"$dir/out" 2>&1; then
        cat "$dir/run.sh" "$dir/out" >&2
        fail "quick start: the commands failed"
    fi
    grep -q '4194304 *0 *data' "$dir/out" || { cat "$dir/out" >&2; fail "quick start: nbdinfo --map does not show the 4 MiB written"; }
    grep -q 'No errors were found' "$dir/out" || { cat "$dir/out" >&2; fail "quick start: qemu-img check did not pass"; }
    grep -q '^ *reclaimable: ' "$dir/out" || { cat "$dir/out" >&2; fail "quick start: qcow2reclaim info printed nothing"; }
    ! _running "$(cat "$dir/disk.pid")" || fail "quick start: nbdkit still runs after the stop command"
    echo "ok: quick start: the commands work as written"
}

# pkg_of FILE: the Debian package that installed FILE (merged /usr or not).
pkg_of() {
    local f p
    for f in "$1" "$(readlink -f "$1")" "/usr${1#/usr}" "${1#/usr}"; do
        p=$(dpkg -S "$f" 2>/dev/null | head -n 1 | cut -d: -f1) && [ -n "$p" ] && { echo "$p"; return; }
    done
}

runtime_packages() {
    local h="Quick start: serving on a Unix socket" listed ok deps c f p bad=
    command -v dpkg >/dev/null && dpkg -s nbdkit >/dev/null 2>&1 ||
        { echo "note: runtime packages: no dpkg or no nbdkit package here: not checked"; return 0; }
    listed=$(commands "$h" | sed -n 's/^apt-get install //p')
    [ -n "$listed" ] || fail "runtime packages: the quick start lists no apt-get install"
    deps=$(dpkg-query -W -f='${Depends}, ${Pre-Depends}\n' $listed 2>/dev/null |
           tr ',|' '\n\n' | sed 's/([^)]*)//g; s/:any//; s/ //g' | sort -u)
    ok=" $listed coreutils libc6 $(echo $deps) "
    for c in $(commands "$h" | grep -v '^apt-get' | tr ';|&$()"' '\n' | awk '{ print $1 }' | sort -u); do
        case $c in
            qcow2reclaim|kill|while|do|done|sleep|cat|''|\'*|-*|/*|[0-9]*) continue ;;
        esac
        f=$(command -v "$c") || fail "runtime packages: '$c' is not installed here"
        p=$(pkg_of "$f")
        case $ok in *" $p "*) ;; *) bad="$bad $c (from ${p:-no package})" ;; esac
    done
    for f in $(ldd "$PLUGIN" "$top_builddir/tools/qcow2reclaim" | awk '/=> \// { print $3 }' | sort -u); do
        p=$(pkg_of "$f")
        case $ok in *" $p "*) ;; *) bad="$bad $f (from ${p:-no package})" ;; esac
    done
    [ -z "$bad" ] || fail "runtime packages: not from '$listed' or what they bring:$bad"
    echo "ok: runtime packages: '$listed' bring what the quick start runs and loads"
}

man_pages() {
    local pages p
    pages=$(sed -n 's/^man_MANS = //p' "$top_srcdir/man/Makefile.am")
    [ -n "$pages" ] || fail "man pages: none in man/Makefile.am"
    for p in $pages; do
        grep -qF "\`man ${p%.1}\`" "$README" || fail "man pages: README.md does not name \`man ${p%.1}\`"
        grep -qF "\`man -l man/$p\`" "$README" || fail "man pages: README.md does not say \`man -l man/$p\`"
    done
    echo "ok: man pages: README.md names$(printf ' %s' $pages)"
}

# shown NAME: the lines between "<!-- NAME example: begin/end -->".
shown() {
    awk -v b="<!-- $1 example: begin -->" -v e="<!-- $1 example: end -->" \
        '$0 == e { on = 0 } on { sub(/^    /, ""); print } $0 == b { on = 1 }' "$README"
}
# same NAME OUTPUT: every line shown for NAME is a line of OUTPUT.
same() {
    local line label missing=
    [ -n "$(shown "$1")" ] || fail "examples: README.md shows no $1 output"
    while IFS= read -r line; do
        case $line in
            "disk size: "*)
                # What the host's filesystem allocates varies with it.
                grep -q "^disk size: " "$2" || missing="$missing
$line" ;;
            *) grep -qxF "$line" "$2" || missing="$missing
$line" ;;
        esac
    done < <(shown "$1")
    [ -z "$missing" ] || { echo "printed:" >&2; cat "$2" >&2; fail "examples: qcow2reclaim $1 does not print what README.md shows:$missing"; }
}

examples() {
    local h="How much can I get back?" dir=$TMP/ex
    section "$h" | grep -q . || fail "examples: README.md has no section '## $h'"
    mkdir -p "$dir"
    commands "$h" | awk '/^qcow2reclaim info / { exit } { print }' >"$dir/make.sh"
    grep -q . "$dir/make.sh" || fail "examples: no commands make the example's image"
    (cd "$dir" && bash -e ./make.sh) >"$dir/make.out" 2>&1 ||
        { cat "$dir/make.sh" "$dir/make.out" >&2; fail "examples: the commands that make the image failed"; }
    (cd "$dir" && "$TOOL" info disk.qcow2) >"$dir/info.out" 2>&1 ||
        { cat "$dir/info.out" >&2; fail "examples: qcow2reclaim info failed"; }
    same info "$dir/info.out"
    (cd "$dir" && "$TOOL" compact disk.qcow2) >"$dir/compact.out" 2>&1 ||
        { cat "$dir/compact.out" >&2; fail "examples: qcow2reclaim compact failed"; }
    same compact "$dir/compact.out"
    echo "ok: examples: info and compact print what README.md shows"
}

run_case quick_start
run_case runtime_packages
run_case man_pages
run_case examples
[ "$FAILED" = 0 ] || fail "$FAILED case(s) failed"
