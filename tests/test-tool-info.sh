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

# A backing file named relative to an image in another folder: qemu-img
# gives the path it opens too.
mkdir sub
qemu-img create -q -f qcow2 sub/base.qcow2 64M
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 sub/top.qcow2
same_as_qemu backing-in-a-folder sub/top.qcow2

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
grep -q '^cleanly shut down: no' t.out && grep -q '^    plugin: serves it read-only only: the image has the dirty bit' t.out ||
    { cat t.out; fail "dirty: info does not say the dirty bit and the plugin's refusal"; }
grep -q '^    plugin: serves it for reading and writing' <("$TOOL" info plain.qcow2) ||
    fail "plain: info does not say the plugin writes it"
echo "ok: why the plugin would serve an image read-only only"

# An image the plugin refuses altogether: info fails, saying why.
qemu-img create -q -f qcow2 -o extended_l2=on ext.qcow2 16M
set +e; "$TOOL" info ext.qcow2 >out 2>&1; rc=$?; set -e
[ $rc -eq 1 ] && grep -q 'extended L2' out || { cat out; fail "extended L2: info did not refuse it, saying why"; }
echo "ok: refused: $(head -1 out)"
