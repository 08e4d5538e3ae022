#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# qcow2reclaim info/map/check against qemu-img's own figures on images
# qemu-img made, plus leaks, corruption and the lock while a server writes.
. "$srcdir/functions.sh"
requires qemu-img --version
[ -x "$TOOL" ] || fail "$TOOL was not built"
PATCH=$srcdir/qcow2_patch.py
cd "$TMP"

# The line qemu-img check prints with the allocation figures, and the end.
qemu_figures() { qemu-img check "$1" 2>/dev/null | grep -E 'allocated|Image end offset'; }
tool_figures() { "$TOOL" check "$1" 2>/dev/null | grep -E 'allocated|Image end offset'; }

compare_image() {
    local name=$1 img=$2 q t
    q=$(qemu_figures "$img"); t=$(tool_figures "$img")
    [ "$q" = "$t" ] || fail "$name: check figures differ:
qemu-img: $q
ours:     $t"
    q=$(qemu-img map --output=json "$img" | tr -d ' \n' | sed 's/,"compressed":[a-z]*//g')
    t=$("$TOOL" map --output=json "$img" | tr -d ' \n')
    [ "$q" = "$t" ] || fail "$name: map differs from qemu-img map --output=json:
qemu-img: $q
ours:     $t"
    # qemu-img refuses the human map of compressed images; we list the rest.
    if q=$(qemu-img map "$img" 2>/dev/null); then
        t=$("$TOOL" map "$img")
        [ "$q" = "$t" ] || fail "$name: human map differs from qemu-img map"
    fi
    "$TOOL" info "$img" >info.out || fail "$name: info failed"
    echo "ok: $name: $(grep 'allocated clusters' info.out)"
}

qemu-img create -q -f qcow2 plain.qcow2 256M
qemu-io -f qcow2 -c 'write -P 1 0 8M' -c 'write -P 2 100M 3M' -c 'write -z 50M 2M' plain.qcow2 >/dev/null
compare_image plain plain.qcow2

cp plain.qcow2 snap.qcow2
qemu-img snapshot -c s1 snap.qcow2
qemu-io -f qcow2 -c 'write -P 3 0 2M' snap.qcow2 >/dev/null
compare_image snapshot snap.qcow2
held=$("$TOOL" info --output=json snap.qcow2 | sed -n 's/.*"snapshot-held": \([0-9]*\).*/\1/p')
# 2 MiB of data the top overwrote, plus the snapshot's own L1 and L2 tables.
[ "$held" -ge $((2 << 20)) ] && [ "$held" -le $(((2 << 20) + 3 * 65536)) ] ||
    fail "snapshot: held by the snapshot is $held bytes, want 2 MiB and its tables"
echo "ok: snapshot holds $held bytes only it uses"

# Half random, half repetitive: some clusters compress, some do not.
{ head -c 2M /dev/urandom; yes qcow2reclaim | head -c 2M; } >rnd.raw
qemu-img convert -q -c -O qcow2 rnd.raw comp.qcow2
compare_image compressed comp.qcow2

qemu-img create -q -f qcow2 -o cluster_size=4096,compat=0.10 v2.qcow2 64M
qemu-io -f qcow2 -c 'write -P 4 1M 3M' v2.qcow2 >/dev/null
compare_image v2-4k v2.qcow2

qemu-img create -q -f qcow2 -b plain.qcow2 -F qcow2 top.qcow2
qemu-io -f qcow2 -c 'write -P 5 4M 1M' top.qcow2 >/dev/null
compare_image backing top.qcow2

# A count for a cluster nothing uses is a leak (exit 3); a count below the
# references is a corruption (exit 2); qemu-img agrees on both.
cp plain.qcow2 leak.qcow2
free_off=$(( ($(stat -c %s leak.qcow2) + 65535) / 65536 * 65536 ))
truncate -s $((free_off + 131072)) leak.qcow2   # qemu-img looks only inside the file
"$PYTHON" "$PATCH" refcount leak.qcow2 "$free_off" 1 >/dev/null
set +e; "$TOOL" check leak.qcow2 >out 2>&1; rc=$?; qemu-img check leak.qcow2 >/dev/null 2>&1; qrc=$?; set -e
[ $rc -eq 3 ] && [ $qrc -eq 3 ] || { cat out; fail "leak: exit $rc (qemu-img $qrc), want 3"; }
echo "ok: leak found (exit 3), as qemu-img check"
cp leak.qcow2 leakonly.qcow2
data_off=$("$PYTHON" "$PATCH" l2 leak.qcow2 0 --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["host_offset"])')
"$PYTHON" "$PATCH" refcount leak.qcow2 "$data_off" 0 >/dev/null
set +e; "$TOOL" check leak.qcow2 >out 2>&1; rc=$?; qemu-img check leak.qcow2 >/dev/null 2>&1; qrc=$?; set -e
[ $rc -eq 2 ] && [ $qrc -eq 2 ] || { cat out; fail "corruption: exit $rc (qemu-img $qrc), want 2"; }
grep -q "ERROR cluster" out || fail "corruption: no ERROR line"
echo "ok: corruption found (exit 2), as qemu-img check"

# Damage around the end of the file and in the refcount table is
# reported as qemu-img check reports it: the same summary on stdout and
# the same exit status, with the check going to its end.
same_check() {
    local name=$1 img=$2 want=$3 rc qrc
    set +e
    qemu-img check "$img" >q.out 2>/dev/null; qrc=$?
    "$TOOL" check "$img" >t.out 2>t.err; rc=$?
    set -e
    [ $qrc -eq "$want" ] || fail "$name: qemu-img check exits $qrc, the test wants $want"
    [ $rc -eq "$want" ] || { cat t.out t.err; fail "$name: check exits $rc, qemu-img check $want"; }
    diff -u q.out t.out || fail "$name: check says otherwise than qemu-img check"
    echo "ok: $name: exit $rc and the summary of qemu-img check"
}
same_check leak-inside-the-file leakonly.qcow2 3
same_check leak-and-corruption leak.qcow2 2
cp plain.qcow2 countpast.qcow2
"$PYTHON" "$PATCH" refcount countpast.qcow2 $(( $(stat -c %s countpast.qcow2) + 5 * 65536 )) 1 >/dev/null
same_check count-past-the-end countpast.qcow2 0
cp plain.qcow2 cut.qcow2
truncate -s 1M cut.qcow2
same_check references-past-the-end cut.qcow2 2
grep -q 'Leaked' t.err && fail "cut: counts past the end reported as leaks"
cp plain.qcow2 rbpast.qcow2
"$PYTHON" "$PATCH" refcount-table rbpast.qcow2 1 0x1000000 >/dev/null
same_check refcount-block-past-the-end rbpast.qcow2 2
grep -q 'ERROR refcount block 1 .*past the end of the file' t.err ||
    { cat t.err; fail "rbpast: the block past the end is not named"; }
cp plain.qcow2 rb0past.qcow2
"$PYTHON" "$PATCH" refcount-table rb0past.qcow2 0 0x1000000 >/dev/null
same_check first-refcount-block-past-the-end rb0past.qcow2 2
cp plain.qcow2 rbodd.qcow2
"$PYTHON" "$PATCH" refcount-table rbodd.qcow2 1 0x50200 >/dev/null
same_check refcount-block-unaligned rbodd.qcow2 2
l1=$("$PYTHON" "$PATCH" header plain.qcow2 l1_table_offset)
cp plain.qcow2 rbl1.qcow2
"$PYTHON" "$PATCH" refcount-table rbl1.qcow2 1 "$l1" >/dev/null
same_check refcount-block-on-the-L1-table rbl1.qcow2 2

# Persistent bitmaps hold clusters too: counted while their autoclear bit
# says they are valid, which a writer of ours keeps them.
qemu-img create -q -f qcow2 bitmaps.qcow2 1G
qemu-img bitmap --add bitmaps.qcow2 b0
qemu-img bitmap --add -g 512 bitmaps.qcow2 b1
qemu-io -f qcow2 -c 'write -P 3 0 40M' bitmaps.qcow2 >/dev/null
same_check bitmaps bitmaps.qcow2 0
"$TOOL" compact bitmaps.qcow2 >/dev/null 2>&1
same_check bitmaps-after-our-writer bitmaps.qcow2 0
qemu-img info bitmaps.qcow2 | grep -q 'name: b1' || fail "bitmaps: our writer lost b1"

# Reclaimable space: a cluster freed on disk but not punched counts.
[ "$("$TOOL" info --output=json plain.qcow2 | sed -n 's/.*"reclaimable": \([0-9]*\).*/\1/p')" -eq 0 ] ||
    fail "a fresh image has reclaimable space"
echo "ok: nothing reclaimable in a fresh image"

# One spelling of the output format, qemu-img's, on every command.
"$TOOL" --help >help.out
for cmd in info map check compact; do
    grep -q "qcow2reclaim $cmd .*\[--output=human|json\]" help.out ||
        { cat help.out; fail "--help does not give --output=human|json for $cmd"; }
done
! grep -q -- '--json' help.out || fail "--help still gives --json"
for cmd in info check; do
    "$TOOL" $cmd --output=json plain.qcow2 | "$PYTHON" -c 'import json,sys; json.load(sys.stdin)' ||
        fail "$cmd --output=json is not JSON"
    "$TOOL" $cmd --output=human plain.qcow2 | grep -q 'Image end offset\|image end offset' ||
        fail "$cmd --output=human is not the text form"
done
echo "ok: --output=human|json on every command"

# A file name is a JSON string, escaped, whatever it holds.
cp plain.qcow2 'we"i\rd.qcow2'
for cmd in info check "compact --dry-run"; do
    "$TOOL" $cmd --output=json 'we"i\rd.qcow2' |
        "$PYTHON" -c 'import json,sys; sys.exit(json.load(sys.stdin)["filename"] != sys.argv[1])' 'we"i\rd.qcow2' ||
        fail "$cmd --output=json does not give the file name as a JSON string"
done
echo "ok: file names escaped in JSON"

# No progress noise when stderr is not a terminal.
"$TOOL" check plain.qcow2 2>err >/dev/null
[ ! -s err ] || fail "check printed to a non-terminal stderr: $(cat err)"

# While a server writes the image, the tool refuses it as qemu-img does,
# and says -U reads it anyway; with -U it reads what is on disk, as
# qemu-img -U does, and says the figures may be stale.
cp plain.qcow2 served.qcow2
start_server "$TMP/s" "$TMP/log" file="$TMP/served.qcow2" compact=off
"$PYTHON" -m nbd -u "nbd+unix:///?socket=$TMP/s" \
    -c 'h.pwrite(b"\x07" * (3 << 20), 20 << 20); h.zero(1 << 20, 100 << 20); h.flush()'
for cmd in info map check; do
    set +e; "$TOOL" $cmd served.qcow2 >out 2>&1; rc=$?; set -e
    [ $rc -ne 0 ] && grep -q 'lock' out && grep -q -- '-U' out ||
        { cat out; fail "$cmd on a served image did not fail naming the lock and -U"; }
done
echo "ok: refused while served: $(head -1 out)"
"$TOOL" info -U served.qcow2 >out 2>err || { cat out err; fail "info -U on a served image failed"; }
grep -q 'stale' err || { cat err; fail "info -U did not say the figures may be stale"; }
grep -q '^virtual size' out || { cat out; fail "info -U printed no figures"; }
q=$(qemu-img map -U --output=json served.qcow2 | tr -d ' \n')
t=$("$TOOL" map -U --output=json served.qcow2 2>/dev/null | tr -d ' \n')
[ "$q" = "$t" ] || fail "map -U differs from qemu-img map -U:
qemu-img: $q
ours:     $t"
q=$(qemu-img check -U served.qcow2 2>&1 | grep -E 'allocated|Image end offset')
t=$("$TOOL" check -U served.qcow2 2>/dev/null | grep -E 'allocated|Image end offset') ||
    fail "check -U on a served image is not clean"
[ "$q" = "$t" ] || fail "check -U figures differ from qemu-img check -U:
qemu-img: $q
ours:     $t"
set +e; "$TOOL" compact -U served.qcow2 >out 2>&1; rc=$?; set -e
[ $rc -eq 1 ] && grep -q 'dry-run' out || { cat out; fail "compact -U was not refused"; }
echo "ok: info, map and check -U read a served image as qemu-img -U does"
stop_server "$LAST_SERVER_PID"
