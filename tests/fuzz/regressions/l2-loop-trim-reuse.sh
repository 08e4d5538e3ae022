#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Reproducer: an L2 table shared by two L1 entries (a corrupt image, as
# tests/fuzz/make-corpus.sh builds reg-l2-loop.qcow2) is not recognised.
# A trim through L1[1] empties the shared table, which is then freed while
# L1[0] still points at it; the next allocation hands the same cluster out
# as a data cluster, so guest data and an active L2 table share one host
# cluster.  No EIO, no log line: guest offset 0 then reads the L2 table's
# bytes, and qemu-img map shows guest 0 mapped onto its own L2 table.
# (DESIGN.md: an entry pointing at other metadata is corruption, EIO.)
#
# Exit 1 while the bug reproduces, 0 once the engine refuses the image at
# open or fails the requests with EIO.
. "$(dirname "$0")/../regression-lib.sh" l2loop

img=$tmp/l2loop.qcow2
qemu-img create -q -f qcow2 -o cluster_size=4096 "$img" 4M
qemu-io -f qcow2 -c 'write -P 0x11 0 8k' -c 'write -P 0x22 2M 8k' "$img" >/dev/null
"$PYTHON" "$PATCH" l1 "$img" 1 "$("$PYTHON" "$PATCH" l1 "$img" 0)" >/dev/null
l2=$(( $("$PYTHON" "$PATCH" l1 "$img" 0) & 0x00fffffffffffe00 ))

if ! serve "$img" "$tmp/log"; then
    echo "not reproduced: the plugin refused the image: $(grep -m1 error "$tmp/log")"
    exit 0
fi
"$PYTHON" - "$SOCK" <<'EOF' || true
import sys
import nbd
M = 1 << 20
h = nbd.NBD()
h.connect_unix(sys.argv[1])
try:
    h.trim(2 * M, 2 * M)          # empties the L2 table behind L1[1]
    h.flush()                     # frees it: the cluster becomes free
    for i in range(8):            # allocations behind L1[0] reuse it
        h.pwrite(bytes([0x90 + i]) * 4096, i * 65536)
    h.flush()
    print("guest offset 0 reads %s, written as 90 90 90 90"
          % h.pread(4, 0).hex(" "))
except nbd.Error as e:
    print("a request failed: %s" % e)
h.shutdown()
EOF
stop
host0=$(qemu-img map --output=json "$img" | "$PYTHON" -c '
import json, sys
print(next((e.get("offset", -1) for e in json.load(sys.stdin) if e["start"] == 0 and e["data"]), -1))')
if [ "$host0" -eq "$l2" ]; then
    echo "REPRODUCED: guest cluster 0 now lives at host 0x$(printf %x "$host0"), which is L1[0]'s L2 table"
    exit 1
fi
echo "not reproduced: guest cluster 0 is at host offset $host0, the L2 table at $l2"
