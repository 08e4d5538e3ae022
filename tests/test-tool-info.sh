#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# qcow2reclaim info against qemu-img info: the same lines for the facts
# qemu-img shows, the same JSON members, and what we add (the space each
# snapshot holds alone, measured by deleting it; why the plugin would
# refuse to write an image).
. "$srcdir/functions.sh"
requires qemu-img --version
[ -x "$TOOL" ] || fail "$TOOL was not built"
PATCH=$srcdir/qcow2_patch.py
cd "$TMP"
# Snapshot dates are local time in both.
export TZ=UTC

# qemu-img info's whole output must be where ours starts, line for line.
same_as_qemu() {
    local name=$1 img=$2 n
    qemu-img info "$img" >q.out
    "$TOOL" info "$img" >t.out 2>t.err || { cat t.err; fail "$name: info failed"; }
    n=$(wc -l <q.out)
    head -n "$n" t.out | diff -u q.out - >diff.out ||
        { cat diff.out; fail "$name: info does not start with what qemu-img info says"; }
    [ "$(sed -n "$((n + 1))p" t.out)" = "Reclaim information:" ] ||
        fail "$name: no reclaim information after qemu-img's part"
    # Every member of qemu-img's JSON, with its value; ours may have more.
    qemu-img info --output=json "$img" >q.json
    "$TOOL" info --output=json "$img" >t.json
    "$PYTHON" - q.json t.json <<'EOF' || fail "$name: JSON differs from qemu-img info's"
import json, sys
q = json.load(open(sys.argv[1])); t = json.load(open(sys.argv[2]))
def within(a, b, path):
    if isinstance(a, dict):
        if not isinstance(b, dict):
            sys.exit("%s: qemu-img has an object, we have %r" % (path, b))
        for k in a:
            if k not in b:
                sys.exit("%s.%s: missing" % (path, k))
            within(a[k], b[k], path + "." + k)
    elif isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            sys.exit("%s: qemu-img has %r, we have %r" % (path, a, b))
        for i, (x, y) in enumerate(zip(a, b)):
            within(x, y, "%s[%d]" % (path, i))
    elif a != b:
        sys.exit("%s: qemu-img says %r, we say %r" % (path, a, b))
within(q, t, "")
EOF
    echo "ok: $name: info says what qemu-img info says, $(wc -l <t.out) lines"
}

qemu-img create -q -f qcow2 plain.qcow2 64M
qemu-io -f qcow2 -c 'write -P 1 0 3M' -c 'write -z 8M 1M' plain.qcow2 >/dev/null
same_as_qemu plain plain.qcow2

qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k extl2.qcow2 64M
qemu-io -f qcow2 -c 'write -P 1 4k 1M' -c 'write -z 8M 12k' extl2.qcow2 >/dev/null
same_as_qemu extended-l2 extl2.qcow2
grep -q '^    extended l2: true' t.out || fail "extended-l2: info does not say extended l2: true"

{ head -c 1M /dev/urandom; yes qcow2reclaim | head -c 1M; } >rnd.raw
qemu-img convert -q -c -O qcow2 rnd.raw comp.qcow2
same_as_qemu compressed comp.qcow2

qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4096 v2.qcow2 16M
qemu-io -f qcow2 -c 'write -P 2 0 1M' v2.qcow2 >/dev/null
qemu-img snapshot -c first v2.qcow2
same_as_qemu v2-snapshot v2.qcow2

qemu-img create -q -f qcow2 -o compression_type=zstd,lazy_refcounts=on,refcount_bits=8 \
    zstd.qcow2 32M
same_as_qemu zstd-lazy-8bit zstd.qcow2

# Persistent bitmaps: enabled, disabled with another granularity, and one
# left in use by a program that did not save it.
qemu-img create -q -f qcow2 bitmaps.qcow2 64M
qemu-img bitmap --add bitmaps.qcow2 b0
qemu-img bitmap --add --disable -g 4k bitmaps.qcow2 'off "quoted"'
qemu-img bitmap --add bitmaps.qcow2 stale
"$PYTHON" "$PATCH" bitmap bitmaps.qcow2 stale flags 3 >/dev/null
same_as_qemu bitmaps bitmaps.qcow2

# A backing file named relative to an image in another folder: qemu-img
# gives the path it opens too.
mkdir sub
qemu-img create -q -f qcow2 sub/base.qcow2 64M
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 sub/top.qcow2
same_as_qemu backing-in-a-folder sub/top.qcow2

# External data files, plain and raw: qemu-img's two lines, and ours with
# the file the plugin opens (relative to the image's folder).
(cd sub && qemu-img create -q -f qcow2 -o data_file=ext.data ext.qcow2 16M &&
     qemu-img create -q -f qcow2 -o data_file=extraw.data,data_file_raw=on extraw.qcow2 16M)
(cd sub && same_as_qemu data-file ext.qcow2 && same_as_qemu data-file-raw extraw.qcow2)
"$TOOL" info sub/ext.qcow2 | grep -qx "    data file path: sub/ext.data" ||
    { "$TOOL" info sub/ext.qcow2; fail "data-file: info does not give the data file's path"; }
echo "ok: data-file: info gives the path of the data file it opens"

# Two snapshots with a long name, each holding data of its own.
qemu-img create -q -f qcow2 snap.qcow2 64M
qemu-io -f qcow2 -c 'write -P 1 0 2M' snap.qcow2 >/dev/null
qemu-img snapshot -c s1 snap.qcow2
qemu-io -f qcow2 -c 'write -P 2 0 2M' snap.qcow2 >/dev/null
qemu-img snapshot -c "a snapshot with a name longer than the column" snap.qcow2
qemu-io -f qcow2 -c 'write -P 3 0 1M' snap.qcow2 >/dev/null
same_as_qemu two-snapshots snap.qcow2

# What a snapshot holds alone is what deleting it frees: the clusters with
# a count (compact --dry-run's "used") go down by that much.
json_field() { sed -n "s/.*\"$2\": \([0-9]*\).*/\1/p" "$1" | head -n 1; }
"$TOOL" info --output=json snap.qcow2 >snap.json
"$TOOL" compact --dry-run --output=json snap.qcow2 >before.json
snapshot_field() {
    "$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["snapshots"][int(sys.argv[2])][sys.argv[3]])' snap.json $(($1 - 1)) "$2"
}
for i in 1 2; do
    held=$(snapshot_field $i held-alone)
    cp snap.qcow2 del.qcow2
    qemu-img snapshot -d "$(snapshot_field $i name)" del.qcow2
    check_clean del.qcow2
    "$TOOL" compact --dry-run --output=json del.qcow2 >after.json
    freed=$(( $(json_field before.json used) - $(json_field after.json used) ))
    [ "$held" -eq "$freed" ] ||
        fail "snapshot $i: info says it holds $held bytes alone, deleting it freed $freed"
    [ "$held" -gt $((1 << 20)) ] || fail "snapshot $i holds only $held bytes alone"
    grep -q "^        snapshot $i (.*) alone: .* ($held bytes)\$" <("$TOOL" info snap.qcow2) ||
        fail "snapshot $i: the human form does not say $held bytes alone"
    echo "ok: snapshot $i holds $held bytes alone, what deleting it frees"
done

# Images the plugin serves read-only only: info says so, and why.
cp plain.qcow2 corrupt.qcow2
"$PYTHON" "$PATCH" set-bit corrupt.qcow2 incompatible_features 1 >/dev/null
same_as_qemu marked-corrupt corrupt.qcow2
grep -q '^    plugin: serves it read-only only: the image is marked corrupt' t.out ||
    { cat t.out; fail "corrupt: info does not say the plugin serves it read-only only"; }
"$PYTHON" -c 'import json,sys; p = json.load(open("t.json"))["plugin"]; sys.exit(p["writable"] or "corrupt" not in p["refusal"])' ||
    fail "corrupt: the JSON does not say the plugin would not write it"
cp zstd.qcow2 dirty.qcow2
"$PYTHON" "$PATCH" set-bit dirty.qcow2 incompatible_features 0 >/dev/null
same_as_qemu dirty dirty.qcow2
grep -q '^cleanly shut down: no' t.out && grep -q '^    plugin: rebuilds its refcounts when it opens it (the dirty bit' t.out ||
    { cat t.out; fail "dirty: info does not say the dirty bit and that the plugin rebuilds the refcounts"; }
grep -q '^    plugin: serves it for reading and writing' <("$TOOL" info plain.qcow2) ||
    fail "plain: info does not say the plugin writes it"
echo "ok: why the plugin would serve an image read-only only"

# An image the plugin refuses altogether (extended L2 entries with
# subclusters under 512 bytes): info fails, saying why.
qemu-img create -q -f qcow2 -o cluster_size=4096 ext.qcow2 16M
"$PYTHON" "$PATCH" set-bit ext.qcow2 incompatible_features 4 >/dev/null
set +e; "$TOOL" info ext.qcow2 >out 2>&1; rc=$?; set -e
[ $rc -eq 1 ] && grep -q 'extended L2' out || { cat out; fail "extended L2: info did not refuse it, saying why"; }
echo "ok: refused: $(head -1 out)"

# Several images at once: each in full, one after the other (an array in
# JSON), or one line each with --summary; an image that fails does not
# stop the others, and makes the exit status 1.
cp plain.qcow2 leak.qcow2
free_off=$(( ($(stat -c %s leak.qcow2) + 65535) / 65536 * 65536 ))
truncate -s $((free_off + 65536)) leak.qcow2
"$PYTHON" "$PATCH" refcount leak.qcow2 "$free_off" 1 >/dev/null
"$TOOL" info plain.qcow2 snap.qcow2 >two.out
[ "$(grep '^image: ' two.out)" = "image: plain.qcow2
image: snap.qcow2" ] || { cat two.out; fail "info of two images does not show both, in order"; }
{ "$TOOL" info plain.qcow2; echo; "$TOOL" info snap.qcow2; } | diff -u - two.out ||
    fail "info of two images is not the two infos, a blank line apart"
"$TOOL" info --output=json plain.qcow2 snap.qcow2 >two.json
"$TOOL" info --output=json plain.qcow2 >p.json
"$TOOL" info --output=json snap.qcow2 >s.json
"$PYTHON" -c 'import json,sys; a = json.load(open("two.json")); sys.exit(a != [json.load(open("p.json")), json.load(open("s.json"))])' ||
    fail "info --output=json of two images is not the array of their objects"
echo "ok: info of several images, in full"

set +e
"$TOOL" info --summary plain.qcow2 snap.qcow2 leak.qcow2 ext.qcow2 missing.qcow2 >sum.out 2>sum.err
rc=$?
"$TOOL" info --summary --output=json plain.qcow2 snap.qcow2 leak.qcow2 ext.qcow2 missing.qcow2 >sum.json 2>/dev/null
jrc=$?
set -e
cat sum.out
[ $rc -eq 1 ] && [ $jrc -eq 1 ] || fail "--summary with failing images exited $rc and $jrc, want 1"
[ "$(wc -l <sum.out)" -eq 6 ] || fail "--summary of five images is not a header and five lines"
[ "$(awk 'NR > 1 { print $NF ":" $(NF - 1) }' sum.out | tr '\n' ' ')" = \
  "plain.qcow2:ok snap.qcow2:ok leak.qcow2:leaks ext.qcow2:refused missing.qcow2:failed " ] ||
    fail "--summary does not give each image its state"
grep -q 'extended L2' sum.err && grep -q 'missing.qcow2' sum.err ||
    { cat sum.err; fail "--summary did not say why two images failed"; }
# The human sizes of a line are qemu-img's for the same bytes.
virt=$(qemu-img info plain.qcow2 | sed -n 's/^virtual size: \(.*\) (.*/\1/p')
[ "$(awk '$NF == "snap.qcow2" { print $1, $2 }' sum.out)" = "$virt" ] ||
    fail "--summary's virtual size is not '$virt' as qemu-img says"
TOOL=$TOOL "$PYTHON" - sum.json <<'PY' || fail "--summary --output=json disagrees with info --output=json"
import json, os, subprocess, sys
rows = json.load(open(sys.argv[1]))
assert [r["filename"] for r in rows] == ["plain.qcow2", "snap.qcow2", "leak.qcow2",
                                         "ext.qcow2", "missing.qcow2"], rows
assert [r["state"] for r in rows] == ["ok", "ok", "leaks", "refused", "failed"], rows
assert "extended L2" in rows[3]["error"], rows[3]
for r in rows[:3]:
    full = json.loads(subprocess.run([os.environ["TOOL"], "info", "--output=json",
                                      r["filename"]], capture_output=True, check=True).stdout)
    for k in ("virtual-size", "file-size", "actual-size", "reclaimable",
              "compactable-length", "snapshot-held", "corruptions", "leaks"):
        assert r[k] == full[k], (r["filename"], k, r[k], full[k])
    assert r["snapshot-count"] == len(full["snapshots"])
PY
echo "ok: info --summary, one line each, in both forms"
