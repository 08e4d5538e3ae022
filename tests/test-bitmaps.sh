#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Persistent dirty bitmaps are kept current, as QEMU keeps them: on images
# with bitmaps qemu-img added (already dirty in places, of several
# granularities), seeded random writes, trims and write-zeroes through the
# plugin, with compaction moving clusters meanwhile; once the server has
# stopped, qemu-img info shows every bitmap without the in-use flag,
# qemu-img check and qcow2reclaim check are clean, and the bitmap qemu-nbd
# exports has exactly the granules that changed dirty: those the workload
# touched, and those QEMU's own writes had touched before.
#
# A bitmap already in use (inconsistent) at open, or of a kind we do not
# know, stays byte for byte as it was, said once in the log; one that
# records changes but cannot be kept (a granularity we do not keep) makes
# the server clear the autoclear bit, as before.
. "$srcdir/functions.sh"
requires qemu-img --version
requires qemu-nbd --version
requires "$PYTHON" -c 'import nbd'
[ -x "$TOOL" ] || fail "$TOOL was not built"
PATCH=$srcdir/qcow2_patch.py
DB=$srcdir/dirty_bitmaps.py
cd "$TMP"
SIZE=$((256 << 20))
SEED=${SEED:-$RANDOM}
echo "seed $SEED"

# granularity IMG NAME: the bitmap's granularity, as qemu-img info says it.
granularity() {
    qemu-img info --output=json "$1" | "$PYTHON" -c '
import json, sys
for b in json.load(sys.stdin)["format-specific"]["data"].get("bitmaps", []):
    if b["name"] == sys.argv[1]:
        print(b["granularity"])' "$2"
}

# flags IMG NAME: the bitmap's flags, as qemu-img info says them.
flags() {
    qemu-img info --output=json "$1" | "$PYTHON" -c '
import json, sys
for b in json.load(sys.stdin)["format-specific"]["data"].get("bitmaps", []):
    if b["name"] == sys.argv[1]:
        print(",".join(b["flags"]))' "$2"
}

# exported IMG NAME OUT: the dirty ranges of bitmap NAME, as qemu-nbd
# exports them.
exported() {
    start_qemu_nbd "$TMP/q.sock" "$TMP/q.log" "$1" -r -B "$2"
    local pid=$LAST_SERVER_PID
    "$PYTHON" "$DB" dirty "$TMP/q.sock" "$2" >"$3"
    stop_server "$pid"
}

# serve IMG LOG SEED: the workload through the plugin, compaction eager.
serve() {
    QCOW2RECLAIM_COMPACT_EAGER=1 start_server "$TMP/s.sock" "$2" file="$1"
    local pid=$LAST_SERVER_PID
    "$PYTHON" "$DB" workload "$TMP/s.sock" "$SIZE" "$3" 300 "$1.touched" ||
        { cat "$2"; fail "$1: the workload failed"; }
    stop_server "$pid"
    [ "$SERVER_STATUS" = 0 ] || { cat "$2"; fail "$1: the server exited with $SERVER_STATUS"; }
}

# kept IMG NAME...: each bitmap is whole, not in use, and says what changed.
kept() {
    local img=$1 name g f
    shift
    check_clean "$img"
    "$TOOL" check "$img" >tool-check.out 2>&1 ||
        { cat tool-check.out; fail "$img: qcow2reclaim check is not clean"; }
    for name; do
        f=$(flags "$img" "$name")
        [ "$f" = auto ] || fail "$img: bitmap $name has flags '$f' after the server stopped"
        g=$(granularity "$img" "$name")
        exported "$img" "$name" "$img.$name.dirty"
        "$PYTHON" "$DB" compare "$g" "$SIZE" "$img.$name.dirty" "$img.touched" \
            "$img.before" || fail "$img: bitmap $name does not say what changed"
    done
    echo "ok: $img: bitmaps $* kept, clean, and dirty where the guest changed data"
}

# An image QEMU wrote to with the bitmaps enabled: they are dirty there.
make_image() {
    local img=$1 cs=$2
    shift 2
    qemu-img create -q -f qcow2 -o cluster_size="$cs" "$img" "$SIZE"
    qemu-io -f qcow2 -c 'write -P 1 0 8M' "$img" >/dev/null
    "$@"
    qemu-io -f qcow2 -c 'write -P 2 100M 3M' -c 'write -z 200M 1M' "$img" >/dev/null
    printf '%d %d\n%d %d\n' $((100 << 20)) $((3 << 20)) $((200 << 20)) $((1 << 20)) \
        >"$img.before"
}

make_image a.qcow2 65536 eval 'qemu-img bitmap --add a.qcow2 b0 &&
    qemu-img bitmap --add --granularity 4k a.qcow2 b4k'
make_image b.qcow2 4096 eval 'qemu-img bitmap --add --granularity 64k b.qcow2 b0 &&
    qemu-img bitmap --add --granularity 1M b.qcow2 b1m'
serve a.qcow2 a.log "$SEED"
kept a.qcow2 b0 b4k
serve b.qcow2 b.log $((SEED + 1))
kept b.qcow2 b0 b1m

# Served again: what the first run recorded stays, the second adds.
cat a.qcow2.touched >a.first
serve a.qcow2 a2.log $((SEED + 2))
cat a.first >>a.qcow2.before
kept a.qcow2 b0 b4k

# bitmap_bytes IMG NAME: the bitmap's directory entry, table and data
# clusters, as bytes in hex.
bitmap_bytes() {
    "$PYTHON" - "$PATCH" "$1" "$2" <<'EOF'
import importlib.util, struct, sys
spec = importlib.util.spec_from_file_location("qp", sys.argv[1])
qp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qp)
img = qp.Image(sys.argv[2])
for loc, e in qp.bitmap_entries(img):
    if e["name"] != sys.argv[3]:
        continue
    print(img.pread(loc, 24).hex())
    table = img.pread(e["table_offset"], 8 * e["table_size"])
    print(table.hex())
    for i in range(e["table_size"]):
        off = struct.unpack_from(">Q", table, 8 * i)[0] & 0x00fffffffffffe00
        if off:
            print(img.pread(off, img.cluster_size).hex())
EOF
}

# left IMG NAME WHY: NAME is left as it was, and the log says so once.
left() {
    local img=$1 name=$2 why=$3 n
    bitmap_bytes "$img" "$name" >"$img.$name.before"
    serve "$img" "$img.log" "$SEED"
    bitmap_bytes "$img" "$name" >"$img.$name.after"
    cmp -s "$img.$name.before" "$img.$name.after" ||
        fail "$img: bitmap $name ($why) was changed"
    n=$(grep -c "$TMP/$img: persistent bitmap '$name' .*$why" "$img.log" || true)
    [ "$n" = 1 ] || { cat "$img.log"; fail "$img: bitmap $name ($why) said $n times"; }
    echo "ok: $img: bitmap $name ($why) left byte for byte as it was, said once"
}

# In use at open: a program stopped without saving it.  The other bitmap
# is kept current all the same.
make_image u.qcow2 65536 eval 'qemu-img bitmap --add u.qcow2 b0 &&
    qemu-img bitmap --add u.qcow2 stale'
"$PYTHON" "$PATCH" bitmap u.qcow2 stale flags 3 >/dev/null
left u.qcow2 stale 'is marked in use'
[ "$(flags u.qcow2 stale)" = in-use,auto ] || fail "u.qcow2: the stale bitmap lost its in-use flag"
kept u.qcow2 b0

# Of a kind we do not know (an unknown flag).
make_image k.qcow2 65536 qemu-img bitmap --add k.qcow2 odd
"$PYTHON" "$PATCH" bitmap k.qcow2 odd flags 0x12 >/dev/null
left k.qcow2 odd 'is of a kind this version does not know'

# A bitmap that records changes at a granularity we do not keep (256
# bytes): it cannot stay valid, so the autoclear bit goes, as before.
make_image g.qcow2 65536 qemu-img bitmap --add g.qcow2 fine
"$PYTHON" "$PATCH" bitmap g.qcow2 fine granularity_bits 8 >/dev/null
serve g.qcow2 g.log "$SEED"
grep -q "persistent bitmap 'fine' has a granularity of 2^8 bytes" g.log ||
    { cat g.log; fail "g.qcow2: no word of the granularity"; }
grep -q 'cleared autoclear feature bits 0x1 (persistent bitmaps are no longer valid' g.log ||
    { cat g.log; fail "g.qcow2: the autoclear bit was not cleared"; }
[ "$("$PYTHON" "$PATCH" header g.qcow2 autoclear_features)" = 0 ] ||
    fail "g.qcow2: the autoclear bit is still set"
echo "ok: a bitmap we cannot keep clears the autoclear bit, said"

# Compaction moves the bitmaps it keeps like other metadata, and sets no
# bit: it changes no guest data.  The bitmap's directory, table and data
# come after 64 MiB of data that the plugin then trims (QEMU would move
# them into the freed space when it saves them), so they lie at the end
# of the file; compaction, offline (qcow2reclaim compact) and by the
# server's worker (compact=auto), must still shorten the file to within
# 1.1 x its allocation + 1 MiB, and leave the bitmap whole, not in use,
# with the same bits, and the check clean.
MiB=$((1 << 20))
length() { stat -c %s "$1"; }
within_bound() {
    [ "$(length "$1")" -le $(( $(stat -c %b "$1") * 512 * 11 / 10 + MiB )) ]
}
# bitmap_at_end IMG [CLUSTER-SIZE [BITMAP-OPTION...]]: b0 added after
# 64 MiB of data, more data written, the 64 MiB trimmed through the plugin
# (which sets their bits), b0's bits kept in IMG.before.
bitmap_at_end() {
    local img=$1 cs=${2:-65536}
    shift $(( $# < 2 ? $# : 2 ))
    set -- "$img" "$@"
    qemu-img create -q -f qcow2 -o cluster_size="$cs" "$1" "$SIZE"
    qemu-io -f qcow2 -c 'write -P 3 0 64M' "$1" >/dev/null
    qemu-img bitmap --add "${@:2}" "$1" b0
    qemu-io -f qcow2 -c 'write -P 4 70M 1M' "$1" >/dev/null
    start_server "$TMP/s.sock" "$1.log" file="$1" compact=off
    local pid=$LAST_SERVER_PID
    "$PYTHON" -c 'import nbd, sys
h = nbd.NBD(); h.connect_unix(sys.argv[1]); h.trim(64 << 20, 0); h.flush(); h.shutdown()' \
        "$TMP/s.sock"
    stop_server "$pid"
    ! within_bound "$1" || fail "$1: the file is already short: this test shows nothing"
    exported "$1" b0 "$1.before"
}
# moved IMG HOW: the file is short, and b0 as it was.
moved() {
    within_bound "$1" ||
        fail "$1: $2 left it $(length "$1") bytes long for $(( $(stat -c %b "$1") * 512 )) allocated"
    check_clean "$1"
    "$TOOL" check "$1" >tool-check.out 2>&1 ||
        { cat tool-check.out; fail "$1: qcow2reclaim check is not clean after $2"; }
    [ "$(flags "$1" b0)" = auto ] || fail "$1: $2 left b0 with flags $(flags "$1" b0)"
    exported "$1" b0 "$1.after"
    cmp -s "$1.before" "$1.after" || fail "$1: $2 changed the bitmap"
    echo "ok: $1: $2 moved the bitmap down ($(length "$1") bytes), whole and unchanged"
}

bitmap_at_end c.qcow2
"$TOOL" compact --dry-run --output=json c.qcow2 >c.plan ||
    { cat c.plan; fail "c.qcow2: the compaction plan failed"; }
"$PYTHON" - c.plan <<'PY' || fail "c.qcow2: a kept bitmap is counted as pinned"
import json, sys
p = json.load(open(sys.argv[1]))["pinned"]
sys.exit(0 if p.get("bitmaps", 0) == 0 and p["unreferenced"] == 0 else "pinned: %r" % p)
PY
"$TOOL" compact c.qcow2 >c.compact || { cat c.compact; fail "c.qcow2: compaction failed"; }
moved c.qcow2 'qcow2reclaim compact'

# 512-byte clusters and granules: 128 data clusters, a table of two
# clusters.
bitmap_at_end e.qcow2 512 -g 512
"$TOOL" compact e.qcow2 >e.compact || { cat e.compact; fail "e.qcow2: compaction failed"; }
moved e.qcow2 'qcow2reclaim compact'

bitmap_at_end d.qcow2
start_server "$TMP/s.sock" d.log file=d.qcow2 compact=auto
pid=$LAST_SERVER_PID
for i in $(seq 100); do within_bound d.qcow2 && break; sleep 0.1; done
stop_server "$pid"
[ "$SERVER_STATUS" = 0 ] || { cat d.log; fail "d.qcow2: the server exited with $SERVER_STATUS"; }
moved d.qcow2 'the compaction worker'

# A bitmap left as it is (disabled: it records nothing) stays where it
# is, counted as pinned by bitmaps, not as a leak.
bitmap_at_end p.qcow2 65536 --disable
"$TOOL" compact --output=json p.qcow2 >p.plan || [ $? = 2 ] ||
    { cat p.plan; fail "p.qcow2: compaction failed"; }
"$PYTHON" - p.plan <<'PY' || fail "p.qcow2: a disabled bitmap is not counted as pinned by bitmaps"
import json, sys
p = json.load(open(sys.argv[1]))["pinned"]
sys.exit(0 if p.get("bitmaps", 0) > 0 and p["unreferenced"] == 0 else "pinned: %r" % p)
PY
check_clean p.qcow2
exported p.qcow2 b0 p.qcow2.after
cmp -s p.qcow2.before p.qcow2.after || fail "p.qcow2: compaction changed the disabled bitmap"
echo "ok: a bitmap left as it is stays in place, counted as pinned by bitmaps"
