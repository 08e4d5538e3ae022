#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Every source file of the project names its licence (BSD-3-Clause, the
# licence of nbdkit, in LICENSE) in an SPDX line near its top, so that a
# file copied out of the tree still says under what terms.
set -eu
: "${srcdir:=$(cd "$(dirname "$0")" && pwd)}"
: "${top_srcdir:=$(cd "$srcdir/.." && pwd)}"
cd "$top_srcdir"

[ -f LICENSE ] || { echo "FAIL: no LICENSE file" >&2; exit 1; }
grep -q "Redistribution and use in source and binary forms" LICENSE ||
    { echo "FAIL: LICENSE is not the BSD licence" >&2; exit 1; }

missing=0 n=0
while IFS= read -r f; do
    n=$((n + 1))
    head -n 3 "$f" | grep -q "SPDX-License-Identifier: BSD-3-Clause" && continue
    echo "FAIL: $f has no SPDX-License-Identifier line in its first 3 lines" >&2
    missing=$((missing + 1))
done < <(find server plugin tools include tests scripts bench systemd man \
             -type f \( -name '*.c' -o -name '*.h' -o -name '*.sh' -o -name '*.py' \
             -o -name 'Makefile.am' -o -name '*.pod' -o -name '*.syms' -o -name '*.supp' \
             -o -name '*.service' -o -name '*.socket' \) -not -path '*/.deps/*' | sort;
         echo Makefile.am; echo configure.ac; echo .ci/run)
[ "$n" -gt 100 ] || { echo "FAIL: only $n source files found under $top_srcdir" >&2; exit 1; }
[ "$missing" -eq 0 ] || exit 1
echo "ok: $n source files carry the SPDX line"
