#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The engine's layering (DESIGN.md, "Layers"): every file of server/ is in
# the layer table, includes only headers of lower layers, and its object
# calls only functions of lower layers, each function named with its
# file's prefix.  Then the checker is shown each kind of violation, so a
# checker that has stopped seeing them fails too.
set -eu
: "${srcdir:=$(cd "$(dirname "$0")" && pwd)}"
: "${top_srcdir:=$(cd "$srcdir/.." && pwd)}"
: "${top_builddir:=$top_srcdir}"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/q2r-layers.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

PY=${PYTHON:-python3}
command -v nm >/dev/null || { echo "SKIP: nm (binutils) is not installed"; exit 77; }
CHECK="$PY $srcdir/layers.py"
DESIGN=$top_srcdir/DESIGN.md
OBJS=$top_builddir/server/.libs
ls "$OBJS"/libqcow2engine_la-*.o >/dev/null 2>&1 || fail "no engine objects in $OBJS: build first"

$CHECK "$DESIGN" "$top_srcdir/server" "$OBJS" || fail "the engine breaks its layering (above)"

# expect_violation WHAT PATTERN DESIGN SERVER [OBJDIR]: the checker must
# fail and say PATTERN.
expect_violation() {
    local what=$1 pattern=$2 out; shift 2
    if out=$($CHECK "$@" 2>&1); then
        echo "$out" >&2; fail "the checker did not see $what"
    fi
    grep -q -- "$pattern" <<<"$out" || { echo "$out" >&2; fail "$what: no \"$pattern\" in the report"; }
    echo "ok: the checker sees $what"
}

copy_tree() {
    rm -rf "$TMP/server" && cp -r "$top_srcdir/server" "$TMP/server"
    cp "$DESIGN" "$TMP/DESIGN.md"
}

copy_tree
sed -i '0,/#include "log.h"/s//#include "log.h"\n#include "engine.h"/' "$TMP/server/host.c"
expect_violation "an include of a higher layer" "server/host.c:.*includes engine.h" \
    "$TMP/DESIGN.md" "$TMP/server"

copy_tree
echo '/* SPDX-License-Identifier: BSD-3-Clause */' >"$TMP/server/stray.c"
expect_violation "a file missing from the table" "server/stray.c is not in the layer table" \
    "$TMP/DESIGN.md" "$TMP/server"

copy_tree
sed -i 's/^| 7 | stores | cache |/| 9 | stores | cache |/' "$TMP/DESIGN.md"
expect_violation "two layers using each other (cache moved above refcount)" \
    "server/refcount.c.*includes cache.h\|server/writeback.h.*includes cache.h" \
    "$TMP/DESIGN.md" "$TMP/server"

copy_tree
rm "$TMP/server/read.h"
expect_violation "a .c file without its own header" "server/read.c has no header of its own" \
    "$TMP/DESIGN.md" "$TMP/server"

# Calls the includes do not show: an object calling up, and a function
# without its file's prefix.
mkdir "$TMP/objs"
cp "$OBJS"/libqcow2engine_la-*.o "$TMP/objs/"
cat >"$TMP/up.c" <<'EOC'
int q2_read (void);
int log_msg (void) { return q2_read (); }
int helper (void) { return 0; }
EOC
${CC:-cc} -c "$TMP/up.c" -o "$TMP/objs/libqcow2engine_la-log.o"
copy_tree
expect_violation "a call to a higher layer" "server/log.c (layer 0, base) calls q2_read" \
    "$TMP/DESIGN.md" "$TMP/server" "$TMP/objs"
expect_violation "a function without its file's prefix" "server/log.c defines helper" \
    "$TMP/DESIGN.md" "$TMP/server" "$TMP/objs"
