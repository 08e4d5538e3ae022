#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Images on block devices (README, "Images on block devices"): LVM volumes,
# iSCSI LUNs and the like hold a qcow2 image with nothing of a file's
# length.  A loop device over a sparse file stands for a thin volume: what
# the image discards must come back as holes in that file.
#
# 1. qemu-img convert writes a qcow2 onto /dev/loopN; the tool's info,
#    check and map read it (map as qemu-img map does).
# 2. Served with file=/dev/loopN: QEMU sees it locked; 200 MiB written, all
#    but 8 MiB trimmed (the 8 MiB kept in the middle, so that compaction has
#    to move it): the sparse file's allocation falls to 16 MiB at most, and
#    so does the image end offset in the stats file, with the device's size
#    and the lvreduce size (the end rounded up to 4 MiB) beside it.
# 3. After the server stops: qemu-img check clean on the device, the data
#    reads back through qemu-io, trimmed ranges read zeros, and the tool
#    shows the same end and lvreduce size.
# 4. A device too small for what the guest writes: ENOSPC to the client,
#    one sentence naming the device in the log, the image still clean.
. "$srcdir/functions.sh"
[ "$(id -u)" = 0 ] || skip "needs root (losetup)"
requires losetup --version
requires qemu-img --version
requires qemu-io --version
requires "$PYTHON" -c 'import nbd'
requires losetup -f

MiB=$((1 << 20))

# new_device SIZE: a loop device over a new sparse file of SIZE bytes,
# detached at exit; sets DEV and BACKING.
new_device() {
    BACKING=$(mktemp "$TMP/backing.XXXXXX")
    truncate -s "$1" "$BACKING"
    DEV=$(losetup -f --show "$BACKING") || skip "no loop device could be set up"
    cleanup_fn losetup -d "$DEV"
}
allocated() { echo $(( $(stat -c %b "$1") * 512 )); }
stat_value() { sed -n "s/^$2=//p" "$1"; }

# ---- 1. the tool on a device -------------------------------------------------
new_device $((512 * MiB))
qemu-img create -q -f qcow2 "$TMP/empty.qcow2" 256M
qemu-img convert -O qcow2 "$TMP/empty.qcow2" "$DEV"
"$TOOL" check "$DEV" >"$TMP/check.out" || { cat "$TMP/check.out" >&2; fail "qcow2reclaim check $DEV failed on a fresh image"; }
"$TOOL" info "$DEV" >"$TMP/info.out" || { cat "$TMP/info.out" >&2; fail "qcow2reclaim info $DEV failed"; }
grep -q "^ *block device: $((512 * MiB)) bytes" "$TMP/info.out" ||
    { cat "$TMP/info.out" >&2; fail "qcow2reclaim info does not give the device's size"; }

# ---- 2. served: written, mostly trimmed ----------------------------------------
sock=$TMP/dev.sock log=$TMP/dev.log stats=$TMP/dev.stats
start_server "$sock" "$log" file="$DEV" statsfile="$stats"
pid=$LAST_SERVER_PID
if out=$(qemu-img info "$DEV" 2>&1); then
    fail "qemu-img info opened $DEV while it is served: the device is not locked"
fi
echo "$out" | grep -q 'lock' || fail "qemu-img info on the served device failed, but not on a lock: $out"

"$PYTHON" - "$sock" <<'PY'
import sys, nbd
MiB = 1 << 20
h = nbd.NBD()
h.connect_unix(sys.argv[1])
# MiB i holds the byte i + 1.
for i in range(200):
    h.pwrite(bytes([i + 1]) * MiB, i * MiB)
h.flush()
# All but MiB 100..107 trimmed, in whole megabytes.
h.trim(100 * MiB, 0)
h.trim(92 * MiB, 108 * MiB)
h.flush()
for i in (0, 99, 108, 199):
    if h.pread(MiB, i * MiB) != bytes(MiB):
        sys.exit("FAIL: trimmed MiB %d does not read zeros" % i)
for i in range(100, 108):
    if h.pread(MiB, i * MiB) != bytes([i + 1]) * MiB:
        sys.exit("FAIL: kept MiB %d does not read back" % i)
h.shutdown()
PY

# Compaction moves the kept 8 MiB down, and the tail is discarded.
limit=$((16 * MiB))
for i in $(seq 1 300); do
    end=$(stat_value "$stats" image_end_offset)
    [ "$(allocated "$BACKING")" -le "$limit" ] && [ -n "$end" ] && [ "$end" -le "$limit" ] && break
    sleep 0.1
done
a=$(allocated "$BACKING")
[ "$a" -le "$limit" ] ||
    fail "the loop device's sparse file still takes $a bytes after all but 8 MiB was trimmed (limit $limit)"
end=$(stat_value "$stats" image_end_offset)
len=$(stat_value "$stats" file_length)
dsize=$(stat_value "$stats" device_size)
lvr=$(stat_value "$stats" lvreduce_size)
[ -n "$end" ] && [ "$end" -le "$limit" ] ||
    { cat "$stats" >&2; fail "image_end_offset is '$end', not at most $limit"; }
[ "$len" = "$end" ] ||
    { cat "$stats" >&2; fail "file_length ($len) is not the image's end ($end) on a device"; }
[ "$dsize" = $((512 * MiB)) ] ||
    { cat "$stats" >&2; fail "device_size is '$dsize', not the loop device's $((512 * MiB))"; }
[ "$lvr" = $(( (end + 4 * MiB - 1) / (4 * MiB) * 4 * MiB )) ] ||
    { cat "$stats" >&2; fail "lvreduce_size is '$lvr', not the end $end rounded up to 4 MiB"; }

echo "ok: sparse file $a bytes, image end $end, device $dsize, lvreduce size $lvr"

stop_server "$pid"
[ "$SERVER_STATUS" = 0 ] || { cat "$log" >&2; fail "the server exited with status $SERVER_STATUS"; }

# ---- 3. after the server: QEMU's view, and the tool's ------------------------
check_clean "$DEV"
for i in $(seq 100 107); do
    qemu-io -f qcow2 -r -c "read -q -P $((i + 1)) $((i * MiB)) $MiB" "$DEV" >"$TMP/io.out" 2>&1 &&
        ! grep -q 'Pattern verification failed' "$TMP/io.out" ||
        { cat "$TMP/io.out" >&2; fail "MiB $i does not read back through qemu-io"; }
done
qemu-io -f qcow2 -r -c "read -q -P 0 0 $((100 * MiB))" -c "read -q -P 0 $((108 * MiB)) $((92 * MiB))" \
        "$DEV" >"$TMP/io.out" 2>&1 && ! grep -q 'Pattern verification failed' "$TMP/io.out" ||
    { cat "$TMP/io.out" >&2; fail "trimmed ranges do not read zeros through qemu-io"; }
"$TOOL" check "$DEV" >"$TMP/check.out" || { cat "$TMP/check.out" >&2; fail "qcow2reclaim check $DEV is not clean"; }
grep -q "^Image end offset: $end\$" "$TMP/check.out" ||
    { cat "$TMP/check.out" >&2; fail "qcow2reclaim check gives another image end offset than the stats ($end)"; }
"$TOOL" info "$DEV" >"$TMP/info.out"
grep -q "^ *block device: $((512 * MiB)) bytes; the image ends at $end\$" "$TMP/info.out" &&
    grep -q "^ *lvreduce size: $lvr bytes" "$TMP/info.out" ||
    { cat "$TMP/info.out" >&2; fail "qcow2reclaim info does not show the image's end $end and lvreduce size $lvr"; }
q=$(qemu-img map "$DEV")
t=$("$TOOL" map "$DEV")
[ "$q" = "$t" ] || fail "qcow2reclaim map differs from qemu-img map on the device:
qemu-img: $q
tool:     $t"
echo "$t" | tail -n +2 | while read -r _ length offset _; do
    [ $((offset + length)) -le "$limit" ] ||
        fail "data is mapped past $limit on the device after compaction: $t"
done

# ---- 4. a device too small -----------------------------------------------------
new_device $((16 * MiB))
qemu-img convert -O qcow2 "$TMP/empty.qcow2" "$DEV"
start_server "$sock" "$log.small" file="$DEV"
pid=$LAST_SERVER_PID
"$PYTHON" - "$sock" <<'PY'
import errno, sys, nbd
MiB = 1 << 20
h = nbd.NBD()
h.connect_unix(sys.argv[1])
try:
    for i in range(32):
        h.pwrite(b"\x5a" * MiB, i * MiB)
    sys.exit("FAIL: 32 MiB were written onto a 16 MiB device")
except nbd.Error as e:
    if e.errnum != errno.ENOSPC:
        sys.exit("FAIL: a write past the device's end failed with %s, not ENOSPC" % e)
h.flush()
h.shutdown()
PY
stop_server "$pid"
grep -q "$DEV: the device is full: .* would end past its $((16 * MiB)) bytes" "$log.small" ||
    { cat "$log.small" >&2; fail "the log does not say the device is full"; }
check_clean "$DEV"
