#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Reproducer: a compressed L2 entry whose stored length runs from the last
# sector of a data cluster into the next cluster, an active L2 table (one
# damaged entry; qemu-img check: "cluster 6 refcount=1 reference=2").
# classify() checks only the first byte of the compressed range, so the
# entry is accepted.  A trim of that guest cluster drops the refcount of
# every host cluster the range touches, the L2 table's too: it is freed
# while L1[1] still points at it, and the next allocation writes guest data
# over it.  The guest's data at 2 MiB is gone, and the L2 table now holds
# whatever the guest wrote (here 0x9191...), with no EIO on the trim or
# the write.  (DESIGN.md: an entry pointing at other metadata is
# corruption, EIO; never write there.)
#
# Exit 1 while the bug reproduces, 0 once the trim (or the open) refuses.
. "$(dirname "$0")/../regression-lib.sh" cspan

# 4 KiB clusters, 4 MiB: guest 0's data cluster is followed on the host by
# the L2 table qemu-io allocates for the write at 2 MiB.
img=$tmp/cspan.qcow2
qemu-img create -q -f qcow2 -o cluster_size=4096 "$img" 4M
qemu-io -f qcow2 -c 'write -P 0x11 0 4k' -c 'write -P 0x22 2M 4k' "$img" >/dev/null
data0=$(( $("$PYTHON" "$PATCH" l2 "$img" 0) & 0x00fffffffffffe00 ))
l2=$(( $("$PYTHON" "$PATCH" l1 "$img" 1) & 0x00fffffffffffe00 ))
[ "$l2" -eq $((data0 + 4096)) ] || { echo "unexpected layout: data at $data0, L2 at $l2"; exit 2; }
# Compressed, 2 sectors (1 additional), starting in the last sector of data0.
"$PYTHON" "$PATCH" l2 "$img" 0 "$(printf 0x%x $(( (1 << 62) | (1 << 58) | (data0 + 4096 - 512) )))" >/dev/null

if ! serve "$img" "$tmp/log"; then
    echo "not reproduced: the plugin refused the image: $(grep -m1 error "$tmp/log")"
    exit 0
fi
rc=0
"$PYTHON" - "$SOCK" <<'EOF' || rc=$?
import sys
import nbd
M = 1 << 20
h = nbd.NBD()
h.connect_unix(sys.argv[1])
try:
    h.trim(4096, 0)
except nbd.Error as e:
    print("not reproduced: the trim failed: %s" % e)
    sys.exit(0)
h.flush()
for i in range(4):
    h.pwrite(bytes([0x90 + i]) * 4096, M + i * 4096)
h.flush()
try:
    got = h.pread(4096, 2 * M)
    print("guest 2 MiB reads %s..., written by qemu-io as 22 22 22 22" % got[:4].hex(" "))
except nbd.Error as e:
    print("guest 2 MiB, written by qemu-io, now fails: %s" % e)
sys.exit(1)
EOF
stop
if [ "$rc" -eq 1 ]; then
    echo "REPRODUCED: $(grep -m1 -o 'L2 entry 0x[0-9a-f]* for guest offset 0x200000.*' "$tmp/log" || echo 'the data at 2 MiB was lost')"
    exit 1
fi
exit "$rc"
