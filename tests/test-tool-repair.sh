#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# qcow2reclaim check -r leaks|all: what qemu-img check -r repairs, repaired
# by our engine, so that qemu-img check finds the image clean after it and
# the guest sees the same bytes; what a count cannot mend, refused with
# nothing changed; and power cuts in the middle of a repair, replayed from
# the I/O log, never leaving more errors than there were.
. "$srcdir/functions.sh"
requires qemu-img --version
requires qemu-io --version
[ -x "$TOOL" ] || fail "$TOOL was not built"
PATCH=$srcdir/qcow2_patch.py
cd "$TMP"

host_offset() { "$PYTHON" "$PATCH" l2 "$1" "$2" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["host_offset"])'; }
qemu_check_json() { qemu-img check --output=json "$1" 2>/dev/null || true; }
json_num() { "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin).get(sys.argv[1], 0))' "$1"; }

# repair NAME IMG MODE WANT: check -r MODE exits WANT; the guest's bytes
# are those of IMG before the repair.
repair() {
    local name=$1 img=$2 mode=$3 want=$4 rc
    cp "$img" "$img.before"
    set +e; "$TOOL" check -r "$mode" "$img" >out 2>err; rc=$?; set -e
    [ $rc -eq "$want" ] || { cat out err; fail "$name: check -r $mode exited $rc, want $want"; }
    qemu-img compare -q "$img.before" "$img" || fail "$name: the repair changed what the guest reads"
}

qemu-img create -q -f qcow2 base.qcow2 64M
qemu-io -f qcow2 -c 'write -P 1 0 3M' -c 'write -P 2 8M 1M' -c 'write -z 16M 1M' base.qcow2 >/dev/null

# A leak at the end of the file, holding host space: freed and cut off.
cp base.qcow2 leak-end.qcow2
size=$(stat -c %s leak-end.qcow2)
head -c 65536 /dev/urandom | dd of=leak-end.qcow2 bs=65536 seek=$((size / 65536)) conv=notrunc status=none
"$PYTHON" "$PATCH" refcount leak-end.qcow2 "$size" 1 >/dev/null
repair leak-at-the-end leak-end.qcow2 leaks 0
check_clean leak-end.qcow2
grep -q "^Repairing cluster $((size / 65536)) refcount=1 reference=0" <(sed 's/^qcow2reclaim: [^:]*: //' err) ||
    { cat err; fail "leak-at-the-end: the repair did not say which cluster it repaired"; }
diff -u - out <<EOF || fail "leak-at-the-end: the report is not qemu-img check -r's"
The following inconsistencies were found and repaired:

    1 leaked clusters
    0 corruptions

Double checking the fixed image now...
$(qemu-img check base.qcow2)
EOF
[ "$(stat -c %s leak-end.qcow2)" -eq "$size" ] ||
    fail "leak-at-the-end: the file is $(stat -c %s leak-end.qcow2) bytes, want $size again"
echo "ok: a leak at the end: repaired as qemu-img says it, and the file cut"

# A leak in the middle, holding host space: punched.
cp base.qcow2 leak-mid.qcow2
qemu-io -f qcow2 -c 'discard 1M 64k' leak-mid.qcow2 >/dev/null
mid=$(( $(host_offset base.qcow2 1M) ))
head -c 65536 /dev/urandom | dd of=leak-mid.qcow2 bs=65536 seek=$((mid / 65536)) conv=notrunc status=none
"$PYTHON" "$PATCH" refcount leak-mid.qcow2 "$mid" 1 >/dev/null
[ "$(qemu_check_json leak-mid.qcow2 | json_num leaks)" -eq 1 ] || fail "leak-mid: qemu-img sees no leak"
repair leak-in-the-middle leak-mid.qcow2 leaks 0
check_clean leak-mid.qcow2
[ "$("$TOOL" info --output=json leak-mid.qcow2 | json_num reclaimable)" -eq 0 ] ||
    fail "leak-in-the-middle: the freed cluster still holds host space"
echo "ok: a leak in the middle: repaired and punched"

# A leaked count near 2^64 (64-bit refcounts) is mended at once, not one
# decrement at a time (the fuzzer's repair-leak-huge-count.qcow2).
qemu-img create -q -f qcow2 -o refcount_bits=64 wide.qcow2 64M
qemu-io -f qcow2 -c 'write -P 3 0 1M' wide.qcow2 >/dev/null
"$PYTHON" "$PATCH" refcount wide.qcow2 "$(host_offset wide.qcow2 0)" $(((1 << 62) + 1)) >/dev/null
cp wide.qcow2 wide.qcow2.before
timeout $((20 * SLOW)) "$TOOL" check -r leaks wide.qcow2 >out 2>err ||
    { cat out err; fail "a leak of 2^62 was not repaired within $((20 * SLOW)) s"; }
check_clean wide.qcow2
qemu-img compare -q wide.qcow2.before wide.qcow2 || fail "wide: the repair changed what the guest reads"
echo "ok: a leaked count of 2^62 repaired at once"

# JSON: qemu-img check's members, and what was fixed.
cp base.qcow2 leak-json.qcow2
size=$(stat -c %s leak-json.qcow2)
truncate -s $((size + 65536)) leak-json.qcow2
"$PYTHON" "$PATCH" refcount leak-json.qcow2 "$size" 1 >/dev/null
"$TOOL" check -r leaks --output=json leak-json.qcow2 >j.out 2>/dev/null
[ "$(json_num leaks-fixed <j.out)" -eq 1 ] && [ "$(json_num leaks <j.out)" -eq 0 ] &&
    [ "$(json_num corruptions-fixed <j.out)" -eq 0 ] ||
    { cat j.out; fail "check -r leaks --output=json does not say one leak fixed"; }
echo "ok: check -r --output=json says what was fixed"

# Killed with lazy refcounts: the dirty bit, counts of 0 under data.  As
# qemu-img: -r leaks leaves the errors (exit 2, still dirty), -r all mends
# them and clears the dirty bit.
qemu-img create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 64M
# (In a subshell, which says "Killed" to /dev/null.)
(qemu-io -f qcow2 -c 'write -P 5 0 1M' -c 'write -P 6 10M 1M' -c 'sigraise 9' lazy.qcow2 || true) \
    >/dev/null 2>&1
qemu-img info lazy.qcow2 | grep -q '^cleanly shut down: no' || fail "lazy: qemu-io left no dirty bit"
cp lazy.qcow2 lazy-initial.qcow2
q=$(qemu_check_json lazy.qcow2 | json_num corruptions)
[ "$q" -gt 0 ] || fail "lazy: qemu-img check finds no errors in the killed image"
repair lazy-leaks lazy.qcow2 leaks 2
qemu-img info lazy.qcow2 | grep -q '^cleanly shut down: no' || fail "lazy: -r leaks cleared the dirty bit"
repair lazy-all lazy.qcow2 all 0
check_clean lazy.qcow2
! qemu-img info lazy.qcow2 | grep -q '^cleanly shut down' || fail "lazy: -r all left the dirty bit"
qemu-io -f qcow2 -c 'read -P 5 0 1M' -c 'read -P 6 10M 1M' lazy.qcow2 | grep -q 'read 1048576' ||
    fail "lazy: the data written before the kill does not read back"
grep -q '^    0 leaked clusters$' out && grep -q "^    [1-9][0-9]* corruptions\$" out ||
    { cat out; fail "lazy: the report does not count the corruptions repaired"; }
echo "ok: killed with lazy refcounts: $q errors, -r leaks keeps them, -r all mends them and the dirty bit"

# A snapshot's shared cluster counted once: "refcount=1 reference=2".
cp base.qcow2 snap.qcow2
qemu-img snapshot -c s1 snap.qcow2
qemu-io -f qcow2 -c 'write -P 7 2M 64k' snap.qcow2 >/dev/null
shared=$(host_offset snap.qcow2 0)
"$PYTHON" "$PATCH" refcount snap.qcow2 "$shared" 1 >/dev/null
qemu-img check snap.qcow2 2>&1 | grep -q "ERROR cluster $((shared / 65536)) refcount=1 reference=2" ||
    fail "snapshot: qemu-img check does not see refcount=1 reference=2"
repair refcount-below-references snap.qcow2 all 0
check_clean snap.qcow2
[ "$("$PYTHON" "$PATCH" refcount snap.qcow2 "$shared")" -eq 2 ] || fail "snapshot: the count is not 2"
qemu-img convert -l snapshot.name=s1 -O raw snap.qcow2.before s1-before.raw
qemu-img convert -l snapshot.name=s1 -O raw snap.qcow2 s1-after.raw
cmp -s s1-before.raw s1-after.raw || fail "snapshot: the snapshot reads otherwise after the repair"
echo "ok: refcount=1 reference=2 under a snapshot: repaired, the snapshot unchanged"

# COPIED lost where a leak kept the count at 2: -r leaks mends both, as
# qemu-img does when nothing else is wrong.
cp base.qcow2 copied.qcow2
off=$(host_offset copied.qcow2 0)
e=$("$PYTHON" "$PATCH" l2 copied.qcow2 0)
"$PYTHON" "$PATCH" l2 copied.qcow2 0 "$(printf '0x%x' $((e & ~(1 << 63))))" >/dev/null
"$PYTHON" "$PATCH" refcount copied.qcow2 "$off" 2 >/dev/null
repair leak-and-copied copied.qcow2 leaks 0
check_clean copied.qcow2
[ "$("$PYTHON" "$PATCH" l2 copied.qcow2 0)" = "$e" ] || fail "copied: COPIED is not back on the entry"
echo "ok: a leak and a lost COPIED flag: both mended by -r leaks"

# A refcount block named past the end of the file, counting the file's
# clusters: -r all gives them a new block.
cp base.qcow2 rbpast.qcow2
"$PYTHON" "$PATCH" refcount-table rbpast.qcow2 0 0x10000000 >/dev/null
repair refcount-block-past-the-end rbpast.qcow2 all 0
check_clean rbpast.qcow2
echo "ok: a refcount block past the end of the file: its counts rebuilt in a new one"

# Marked corrupt, with a leak: the mark goes once nothing is wrong.
cp base.qcow2 marked.qcow2
size=$(stat -c %s marked.qcow2)
truncate -s $((size + 65536)) marked.qcow2
"$PYTHON" "$PATCH" refcount marked.qcow2 "$size" 1 >/dev/null
"$PYTHON" "$PATCH" set-bit marked.qcow2 incompatible_features 1 >/dev/null
repair marked-corrupt marked.qcow2 leaks 0
check_clean marked.qcow2
qemu-img info marked.qcow2 | grep -q '^    corrupt: false' || fail "marked: the corrupt mark is still there"
echo "ok: the corrupt mark cleared once the image is clean"

# Persistent bitmaps stay: the repair counts their clusters and keeps the
# autoclear bit (it changes no guest data).
cp base.qcow2 bitmaps.qcow2
qemu-img bitmap --add bitmaps.qcow2 b0
qemu-io -f qcow2 -c 'write -P 8 4M 1M' bitmaps.qcow2 >/dev/null
size=$(stat -c %s bitmaps.qcow2)
truncate -s $((size + 65536)) bitmaps.qcow2
"$PYTHON" "$PATCH" refcount bitmaps.qcow2 "$size" 1 >/dev/null
repair with-bitmaps bitmaps.qcow2 leaks 0
check_clean bitmaps.qcow2
qemu-img info bitmaps.qcow2 | grep -q 'name: b0' || fail "bitmaps: the bitmap is gone"
echo "ok: a repair keeps persistent bitmaps"

# What counts cannot mend is refused, and nothing changes.
refused() {
    local name=$1 img=$2 why=$3 rc
    cp "$img" "$img.before"
    set +e; "$TOOL" check -r all "$img" >out 2>err; rc=$?; set -e
    [ $rc -eq 1 ] && grep -q "cannot repair safely: .*$why.*nothing was changed" err ||
        { cat out err; fail "$name: check -r all did not refuse (exit $rc)"; }
    cmp -s "$img.before" "$img" || fail "$name: the refused repair changed the file"
    echo "ok: refused: $(grep 'cannot repair' err | sed 's/^qcow2reclaim: //')"
}
cp base.qcow2 past.qcow2
"$PYTHON" "$PATCH" l2 past.qcow2 1M 0x8000000010000000 >/dev/null
refused entry-past-the-end past.qcow2 'tables, refcount blocks or bitmaps'
cp base.qcow2 twice.qcow2
"$PYTHON" "$PATCH" l2 twice.qcow2 1M "$(printf '0x%x' $((0x8000000000000000 | $("$PYTHON" "$PATCH" header twice.qcow2 l1_table_offset))))" >/dev/null
refused data-on-the-L1-table twice.qcow2 'holds two things'

# No repair without the image to itself.
set +e; "$TOOL" check -r leaks -U base.qcow2 >out 2>&1; rc=$?; set -e
[ $rc -eq 1 ] && grep -q 'needs the image to itself' out || { cat out; fail "-r with -U was not refused"; }
cp base.qcow2 served.qcow2
start_server "$TMP/s" "$TMP/log" file="$TMP/served.qcow2" compact=off
set +e; "$TOOL" check -r leaks served.qcow2 >out 2>&1; rc=$?; set -e
[ $rc -eq 1 ] && grep -q 'lock' out || { cat out; fail "-r on a served image was not refused"; }
stop_server "$LAST_SERVER_PID"
echo "ok: no repair with -U or while a server holds the image"

# Power cuts during a repair, from its I/O log: at every point, as much of
# what followed the last sync as the disk may have kept, the last write
# torn or not.  No point may have an error the image did not have before
# (but one: an entry without COPIED whose count just fell to 1, the
# window the commit sequence has too, DESIGN.md, Invariant 4: it only makes
# a write copy), nor lose the dirty mark while errors are left, nor read
# otherwise; and a second repair makes every point clean.
# The image has all a repair does: counts of 0 under data (killed with lazy
# refcounts), a refcount block named past the end of the file (a new block
# and a refcount table sector), a leak and a lost COPIED flag (an L2 sector
# after the counts), and the dirty mark to clear last.
qemu-img create -q -f qcow2 -o cluster_size=4096,lazy_refcounts=on crash-initial.qcow2 64M
(qemu-io -f qcow2 -c 'write -P 5 0 4M' -c 'write -P 6 20M 4M' -c 'write -P 7 40M 4M' \
    -c 'sigraise 9' crash-initial.qcow2 || true) >/dev/null 2>&1
off=$(host_offset crash-initial.qcow2 0)
e=$("$PYTHON" "$PATCH" l2 crash-initial.qcow2 0)
"$PYTHON" "$PATCH" l2 crash-initial.qcow2 0 "$(printf '0x%x' $((e & ~(1 << 63))))" >/dev/null
"$PYTHON" "$PATCH" refcount crash-initial.qcow2 "$off" 2 >/dev/null
"$PYTHON" "$PATCH" refcount-table crash-initial.qcow2 1 0x10000000 >/dev/null
cp crash-initial.qcow2 crash.qcow2
QCOW2RECLAIM_IOLOG=$TMP/repair.iolog "$TOOL" check -r all crash.qcow2 >out 2>&1 ||
    { cat out; fail "the logged repair failed"; }
check_clean crash.qcow2
qemu-img check crash-initial.qcow2 2>&1 | grep '^ERROR' | sort >errors.before || true
TOOL=$TOOL "$PYTHON" - crash-initial.qcow2 "$TMP/repair.iolog" <<'PY' || fail "a power cut during the repair left it worse"
import os, re, shutil, struct, subprocess, sys
initial, log = sys.argv[1], sys.argv[2]
REC = struct.Struct("=B7xQQ")
buf = open(log, "rb").read()
recs, pos = [], 0
while pos + REC.size <= len(buf):
    op, off, ln = REC.unpack_from(buf, pos)
    data = buf[pos + REC.size:pos + REC.size + ln] if op == 1 else b""
    recs.append((op, off, ln, data))
    pos += REC.size + len(data)
assert recs, "empty I/O log"
before = set(open("errors.before").read().split("\n")) - {""}

def build(keep, torn=None):
    shutil.copyfile(initial, "point.qcow2")
    fd = os.open("point.qcow2", os.O_WRONLY)
    for i in keep:
        op, off, ln, data = recs[i]
        if op == 1:
            os.pwrite(fd, data if i != torn else data[:len(data) // 2 // 512 * 512], off)
        elif op in (2, 3):
            # A punch or a zeroed range reads as zeros, which is all the
            # checks look at.
            os.pwrite(fd, bytes(ln), off)
        elif op == 4:
            os.ftruncate(fd, off)
    os.close(fd)

def copied_missing(line):
    m = re.match(r"ERROR OFLAG_COPIED data cluster: l2_entry=([0-9a-f]+) refcount=1$", line)
    return m and not int(m.group(1), 16) >> 63

def verify(what):
    r = subprocess.run(["qemu-img", "check", "point.qcow2"], capture_output=True, text=True)
    errors = {l for l in r.stderr.split("\n") if l.startswith("ERROR")}
    new = {l for l in errors - before if not copied_missing(l)}
    if new:
        sys.exit("%s: new errors: %s" % (what, sorted(new)[:3]))
    info = subprocess.run(["qemu-img", "info", "point.qcow2"], capture_output=True,
                          text=True).stdout
    if errors and "cleanly shut down: no" not in info:
        sys.exit("%s: the dirty mark is gone with errors left" % what)
    if subprocess.run(["qemu-img", "compare", "-q", initial, "point.qcow2"]).returncode:
        sys.exit("%s: the guest reads otherwise" % what)
    r = subprocess.run([os.environ["TOOL"], "check", "-r", "all", "point.qcow2"],
                       capture_output=True, text=True)
    if r.returncode or subprocess.run(["qemu-img", "check", "point.qcow2"],
                                      capture_output=True).returncode:
        sys.exit("%s: a second repair does not make it clean:\n%s%s" % (what, r.stdout,
                                                                         r.stderr))

syncs = [i for i, r in enumerate(recs) if r[0] == 5]
points = 0
for k in range(len(recs)):
    last = max([s for s in syncs if s <= k], default=-1)
    pending = list(range(last + 1, k + 1))
    # Everything up to k; only k after the sync; everything but one.
    subsets = [list(range(k + 1)), list(range(last + 1)) + [k]]
    subsets += [list(range(last + 1)) + [p for p in pending if p != d] for d in pending[:-1]]
    for keep in subsets:
        build(keep)
        verify("record %d, keeping %d of %d after the last sync" % (k, len(keep) - last - 1, len(pending)))
        points += 1
    if recs[k][0] == 1 and recs[k][2] >= 1024:
        build(list(range(k + 1)), torn=k)
        verify("record %d torn" % k)
        points += 1
print("ok: %d power cuts during the repair (%d records, %d syncs): no new error, "
      "and a second repair makes each clean" % (points, len(recs), len(syncs)))
for op, off, ln, _ in recs:
    print("    %s 0x%x+%d" % ({1: "write", 2: "punch", 3: "zero", 4: "truncate",
                                5: "sync"}[op], off, ln))
PY
