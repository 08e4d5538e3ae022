#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# qcow2reclaim compact: offline compaction in place.  On images with data
# scattered over the disk and most of it discarded (as qemu-io leaves them:
# holes punched, but the file as long as ever), with 64 KiB, 4 KiB and
# 512-byte clusters, v2, 1-bit refcounts, an internal snapshot, a backing
# file, compressed clusters, and the L1 and refcount tables at the end of
# the file: the length comes within the bound, the guest sees the same
# bytes (qemu-img compare against a raw copy taken before, and every
# snapshot too), qemu-img check is clean, and a backing file is never
# touched.  Then --dry-run, the lock, and what is pinned.
. "$srcdir/functions.sh"
requires qemu-img --version
requires qemu-io --version
[ -x "$TOOL" ] || fail "$TOOL was not built"
cd "$TMP"

json_field() { sed -n "s/.*\"$2\": \([0-9]*\).*/\1/p" "$1" | head -n 1; }
length() { stat -c %s "$1"; }

# scatter IMG SIZE-MIB PIECE: writes pieces of PIECE bytes all over the
# disk, then discards all but every fifth, as a guest that deleted most
# of its files and trimmed would.
scatter() {
    local img=$1 mib=$2 piece=$3 i off args=() trims=()
    for ((i = 0; i < 80; i++)); do
        off=$(((i * 7919 % 97) * (mib << 20) / 100 / piece * piece))
        args+=(-c "write -P $((i % 250 + 1)) $off $piece")
        [ $((i % 5)) -eq 4 ] || trims+=(-c "discard $off $piece")
    done
    qemu-io -f qcow2 "${args[@]}" "$img" >/dev/null
    qemu-io -f qcow2 "${trims[@]}" "$img" >/dev/null
}

# compacts NAME IMG [PINNED-OK]: compact, then the length within the bound,
# the same bytes, a clean check.  With PINNED-OK, clusters that cannot
# move (shared with a snapshot, compressed) may keep it longer: the exit
# status is then 2, the report names them, and the file ends where the
# last of them does.
compacts() {
    local name=$1 img=$2 pinned_ok=${3:-} before after bound pinned reach rc=0
    qemu-img convert -O raw "$img" "$name.before.raw"
    before=$(length "$img")
    "$TOOL" compact --output=json "$img" >"$name.json" 2>"$name.err" || rc=$?
    after=$(length "$img")
    bound=$(json_field "$name.json" bound)
    pinned=$(sed -n 's/.*"pinned": {\(.*\)}.*/\1/p' "$name.json" | grep -o '[0-9][0-9]*' |
             awk '{ s += $1 } END { print s + 0 }')
    if [ -n "$pinned_ok" ] && [ "$rc" -eq 2 ]; then
        reach=$(json_field "$name.json" reachable-length)
        [ "$after" -gt "$bound" ] || fail "$name: exit 2, but length $after is within the bound $bound"
        [ "$pinned" -gt 0 ] || fail "$name: exit 2, but nothing is reported pinned"
        [ "$after" -le "$reach" ] ||
            fail "$name: length $after is past $reach, where the last pinned cluster ends"
    else
        [ "$rc" -eq 0 ] || { cat "$name.json" "$name.err" >&2; fail "$name: compact exited $rc"; }
        [ "$after" -le "$bound" ] || fail "$name: length $after is past the bound $bound"
    fi
    [ "$(json_field "$name.json" length-after)" = "$after" ] ||
        fail "$name: the report says length $(json_field "$name.json" length-after), the file is $after"
    qemu-img compare -q -f qcow2 -F raw "$img" "$name.before.raw" ||
        fail "$name: the guest no longer reads what it read before"
    check_clean "$img"
    echo "ok: $name: $before -> $after bytes (bound $bound, $pinned pinned), $(json_field "$name.json" clusters-moved) clusters moved, content and check unchanged"
    rm -f "$name.before.raw"
}

qemu-img create -q -f qcow2 c64k.qcow2 1G
scatter c64k.qcow2 1024 $((1 << 20))
compacts "64 KiB clusters" c64k.qcow2

qemu-img create -q -f qcow2 -o cluster_size=4096 c4k.qcow2 256M
scatter c4k.qcow2 256 $((256 << 10))
compacts "4 KiB clusters" c4k.qcow2

# Extended L2 entries: clusters with only some subclusters allocated, one
# with a zero subcluster, written last so that they lie at the end of the
# file; each must move with its bitmap.
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k extl2.qcow2 256M
scatter extl2.qcow2 256 $((512 << 10))
qemu-io -f qcow2 -c 'write -P 0x5e 255M 4k' -c 'write -P 0x5f 261188k 8k' \
    -c 'write -P 0x60 253M 128k' -c 'write -z 259076k 4k' extl2.qcow2 >/dev/null
compacts "extended L2 entries, 128 KiB clusters" extl2.qcow2

# 512-byte clusters: the refcount table outgrows its first place within a
# few MiB and moves to the end of the file, so it must move back.
qemu-img create -q -f qcow2 -o cluster_size=512 c512.qcow2 64M
scatter c512.qcow2 64 $((64 << 10))
compacts "512-byte clusters, refcount table at the end" c512.qcow2

qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 512M
scatter v2.qcow2 512 $((512 << 10))
compacts "v2" v2.qcow2

qemu-img create -q -f qcow2 -o refcount_bits=1 r1.qcow2 512M
scatter r1.qcow2 512 $((512 << 10))
compacts "1-bit refcounts" r1.qcow2

# Growing the virtual size past what one L1 cluster maps puts a new L1
# table at the end of the file; the data before it is then discarded.
qemu-img create -q -f qcow2 l1end.qcow2 256M
qemu-io -f qcow2 -c 'write -P 8 0 20M' -c 'write -P 9 200M 1M' l1end.qcow2 >/dev/null
qemu-img resize -q l1end.qcow2 5T
qemu-io -f qcow2 -c 'write -P 9 4500G 64k' -c 'discard 0 20M' l1end.qcow2 >/dev/null
l1before=$(od -An -j40 -N8 -t x1 l1end.qcow2 | tr -d ' ')
compacts "L1 table at the end" l1end.qcow2
l1after=$(od -An -j40 -N8 -t x1 l1end.qcow2 | tr -d ' ')
[ "$l1before" != "$l1after" ] || fail "L1 table at the end: it did not move (header still 0x$l1before)"
echo "ok: the L1 table moved (header: 0x$l1before -> 0x$l1after)"

# A backing file is only read: its bytes stay as they were.
qemu-img create -q -f qcow2 base.qcow2 512M
qemu-io -f qcow2 -c 'write -P 7 0 64M' base.qcow2 >/dev/null
sum=$(md5sum <base.qcow2)
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
scatter overlay.qcow2 512 $((512 << 10))
compacts "overlay over a backing file" overlay.qcow2
[ "$(md5sum <base.qcow2)" = "$sum" ] || fail "the backing file changed"
echo "ok: the backing file is untouched"

# An internal snapshot: what it shares stays where it is (and is reported
# as what keeps the file longer), the rest moves, and the snapshot reads
# the same.
qemu-img create -q -f qcow2 snap.qcow2 512M
scatter snap.qcow2 512 $((512 << 10))
qemu-img snapshot -c s1 snap.qcow2
qemu-io -f qcow2 -c 'write -P 200 100M 8M' -c 'discard 300M 100M' snap.qcow2 >/dev/null
qemu-img convert -O raw -l snapshot.name=s1 snap.qcow2 s1.before.raw
compacts "internal snapshot" snap.qcow2 pinned-ok
qemu-img convert -O raw -l snapshot.name=s1 snap.qcow2 s1.after.raw
cmp -s s1.before.raw s1.after.raw || fail "internal snapshot: the snapshot reads differently"
qemu-img snapshot -l snap.qcow2 | grep -qw s1 || fail "internal snapshot: s1 is gone"
echo "ok: the snapshot reads as before"
rm -f s1.before.raw s1.after.raw

# Compressed clusters stay where they are, and say so; exit 2 when they
# keep the file past the bound.
{ head -c 24M /dev/urandom; yes compact | head -c 40M; } >comp.raw
qemu-img convert -q -c -O qcow2 comp.raw comp.qcow2
qemu-io -f qcow2 -c 'discard 0 40M' comp.qcow2 >/dev/null
qemu-img convert -O raw comp.qcow2 comp.before.raw
rc=0
"$TOOL" compact --output=json comp.qcow2 >comp.json || rc=$?
pinned=$(json_field comp.json compressed)
[ "${pinned:-0}" -gt 0 ] || { cat comp.json >&2; fail "compressed: no compressed clusters reported as pinned"; }
if [ "$(json_field comp.json length-after)" -gt "$(json_field comp.json bound)" ]; then
    [ "$rc" -eq 2 ] || fail "compressed: past the bound, but exit $rc instead of 2"
else
    [ "$rc" -eq 0 ] || fail "compressed: within the bound, but exit $rc"
fi
qemu-img compare -q -f qcow2 -F raw comp.qcow2 comp.before.raw || fail "compressed: content changed"
check_clean comp.qcow2
echo "ok: compressed: $pinned bytes pinned and reported, exit $rc, content unchanged"

# --dry-run changes nothing and says what it would reach.
qemu-img create -q -f qcow2 dry.qcow2 1G
scatter dry.qcow2 1024 $((1 << 20))
sum=$(md5sum <dry.qcow2)
"$TOOL" compact --dry-run dry.qcow2 >dry.out
[ "$(md5sum <dry.qcow2)" = "$sum" ] || fail "--dry-run changed the image"
grep -q "reachable" dry.out || { cat dry.out >&2; fail "--dry-run does not say the length it would reach"; }
"$TOOL" compact --dry-run --output=json dry.qcow2 >dry.json
reach=$(json_field dry.json reachable-length)
"$TOOL" compact --output=json dry.qcow2 >real.json
[ "$(length dry.qcow2)" -le "$reach" ] ||
    fail "--dry-run promised $reach bytes, compact reached $(length dry.qcow2)"
echo "ok: --dry-run: unchanged image, promised $reach bytes, compact reached $(length dry.qcow2)"

# The image must not be in use: a server holding it makes compact refuse.
qemu-img create -q -f qcow2 busy.qcow2 64M
start_server "$TMP/busy.sock" "$TMP/busy.log" file="$TMP/busy.qcow2"
rc=0
"$TOOL" compact busy.qcow2 >busy.out 2>&1 || rc=$?
[ "$rc" -eq 1 ] && grep -qi lock busy.out || { cat busy.out >&2; fail "compact on a served image: exit $rc"; }
echo "ok: compact refuses an image in use: $(head -n 1 busy.out)"

# Free clusters that still hold host space: a copy made without --sparse.
# The tool's info calls it reclaimable; compact gives it back, and so does
# the plugin's worker, by itself, soon after it starts serving.
qemu-img create -q -f qcow2 hold.qcow2 256M
qemu-io -f qcow2 -c 'write -P 3 0 64M' -c 'discard 0 48M' hold.qcow2 >/dev/null
cp --sparse=never hold.qcow2 dense.qcow2
cp --sparse=never hold.qcow2 served.qcow2
rec=$("$TOOL" info --output=json dense.qcow2 | sed -n 's/.*"reclaimable": \([0-9]*\).*/\1/p')
[ "$rec" -ge $((40 << 20)) ] || fail "a non-sparse copy: info calls only $rec bytes reclaimable"
"$TOOL" compact --output=json dense.qcow2 >dense.json
punched=$(json_field dense.json free-bytes-punched)
rec2=$("$TOOL" info --output=json dense.qcow2 | sed -n 's/.*"reclaimable": \([0-9]*\).*/\1/p')
[ "$punched" -ge $((40 << 20)) ] && [ "$rec2" -lt $((1 << 20)) ] ||
    fail "a non-sparse copy: compact punched $punched bytes, info still calls $rec2 reclaimable"
check_clean dense.qcow2
echo "ok: a non-sparse copy: info called $rec bytes reclaimable, compact punched $punched, $rec2 left"

# The copy's pages are written out first: on a loaded machine a punch
# over dirty pages waits for their writeback, which is not the worker's
# time.  Then the stats file says when the worker's first pass is over
# (no client ever connects, so only the worker can have written it), and
# only then is the allocation read: a deadline on the allocation alone
# measured the machine's load (CI once read it before the pass ended).
sync served.qcow2
start_server "$TMP/served.sock" "$TMP/served.log" file="$TMP/served.qcow2" \
    statsfile="$TMP/served.stats"
worker_pass_shown() {
    grep -qx "file_length=$(length served.qcow2)" served.stats 2>/dev/null &&
        grep -q '^free_bytes_punched=[1-9]' served.stats
}
for i in $(seq 1 300); do
    worker_pass_shown && break
    sleep 0.1
done
worker_pass_shown ||
    { cat served.stats >&2 2>/dev/null || true; fail "a non-sparse copy served: the stats file does not show the worker's work after 30 s (length $(length served.qcow2))"; }
after=$(( $(stat -c %b served.qcow2) * 512 ))
stop_server "$LAST_SERVER_PID"
[ "$after" -lt $((24 << 20)) ] ||
    fail "a non-sparse copy served: the worker's pass is over and $after bytes are still allocated"
check_clean served.qcow2
echo "ok: a non-sparse copy served: allocation fell to $after bytes, pass over within $((i / 10)).$((i % 10)) s"

# The largest clusters and the widest refcounts.
qemu-img create -q -f qcow2 -o cluster_size=2M,refcount_bits=64 c2m.qcow2 1G
scatter c2m.qcow2 1024 $((4 << 20))
compacts "2 MiB clusters, 64-bit refcounts" c2m.qcow2

# An idle worker sleeps: a served image with nothing to compact costs next
# to no CPU (a worker whose timed waits returned at once spun a core).
if [ "$SLOW" -eq 1 ]; then
    qemu-img create -q -f qcow2 idle.qcow2 64M
    start_server "$TMP/idle.sock" "$TMP/idle.log" file="$TMP/idle.qcow2"
    sleep 2
    ticks=$(awk '{ print $14 + $15 }' "/proc/$LAST_SERVER_PID/stat")
    stop_server "$LAST_SERVER_PID"
    [ "$ticks" -lt 50 ] || fail "an idle server used $ticks clock ticks of CPU in 2 s"
    echo "ok: an idle server used $ticks clock ticks of CPU in 2 s"
fi
