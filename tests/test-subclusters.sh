#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Subclusters (extended L2 entries, 128 KiB clusters of 32 x 4 KiB): what
# QEMU 7.2 does not give back, we do.
#
# - 16 MiB written, every other 4 KiB subcluster trimmed: at least 7 MiB of
#   host space comes back (stat %b), what was not trimmed reads back, what
#   was reads zeros, qemu-img check is clean and QEMU reads the same.  The
#   same requests through qemu-nbd --discard=unmap give back about nothing;
#   its figure is printed.
# - The other subclusters of some clusters trimmed, of others zeroed with
#   MAY_TRIM, one by one: those clusters are freed (no leak for qemu-img
#   check, unallocated for qemu-img map, the file's allocation falls).
# - Trims of parts of subclusters, punched later, that leave two
#   subclusters all hole with one holding data between them: the data stays.
# - Over a backing file: trimmed subclusters read zeros (zero bits), the
#   others the data or the backing file; clusters with every subcluster
#   trimmed are freed.  Write-zeroes without MAY_TRIM keeps the cluster.
#   qcow2reclaim map says what qemu-img map says, and block status through
#   the plugin what qemu-nbd says, on each image.
# - qcow2reclaim check, and check -r mending a leak, keep such an image
#   clean; the server's compaction (compact=auto) moves its clusters with
#   their bitmaps.
set -eu
: "${srcdir:=$(cd "$(dirname "$0")" && pwd)}"
. "$srcdir/functions.sh"
requires nbdkit --version
requires qemu-img --version
requires qemu-nbd --version
requires nbdinfo --version
requires "$PYTHON" -c 'import nbd'
[ -x "$TOOL" ] || fail "$TOOL was not built"
cd "$TMP"

OPTS=extended_l2=on,cluster_size=131072
MiB=$((1 << 20))
alloc_of() { echo $(( $(stat -c %b "$1") * 512 )); }

# ops URI SCRIPT...: NBD requests through libnbd, from a small language:
#   write OFF LEN SEED | trim OFF LEN | zero OFF LEN [nohole] | flush
#   every START END STEP trim|zero LEN   (a request at START, START+STEP...)
#   expect OFF LEN data SEED | expect OFF LEN zero
# Data of SEED at OFF is the same bytes whichever request reads part of it.
ops() {
    local uri=$1; shift
    "$PYTHON" - "$uri" "$@" <<'EOF'
import nbd, random, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
def data(seed, off, n):
    out = bytearray()
    blk = 4096
    for b in range(off // blk * blk, off + n, blk):
        out += random.Random(seed * 1000003 + b).randbytes(blk)
    start = off % blk
    return bytes(out[start:start + n])
for cmd in sys.argv[2:]:
    w = cmd.split()
    if w[0] == "write":
        off, n, seed = int(w[1]), int(w[2]), int(w[3])
        for o in range(off, off + n, 1 << 20):
            k = min(1 << 20, off + n - o)
            h.pwrite(data(seed, o, k), o)
    elif w[0] == "trim":
        h.trim(int(w[2]), int(w[1]))
    elif w[0] == "zero":
        flags = nbd.CMD_FLAG_NO_HOLE if len(w) > 3 else 0
        h.zero(int(w[2]), int(w[1]), flags)
    elif w[0] == "flush":
        h.flush()
    elif w[0] == "every":
        start, end, step, op, n = int(w[1]), int(w[2]), int(w[3]), w[4], int(w[5])
        for o in range(start, end, step):
            (h.trim if op == "trim" else h.zero)(n, o)
    elif w[0] == "expect":
        off, n = int(w[1]), int(w[2])
        got = h.pread(n, off)
        want = data(int(w[4]), off, n) if w[3] == "data" else bytes(n)
        if got != want:
            bad = next(i for i in range(n) if got[i] != want[i])
            sys.exit("at %d: %s expected, byte %d differs" % (off, w[3], off + bad))
    else:
        sys.exit("unknown op " + cmd)
h.shutdown()
EOF
}

# serve NAME IMG [PARAMS...]: the plugin on IMG; URI and PID for it.
serve() {
    local name=$1 img=$2; shift 2
    start_server "$TMP/$name.sock" "$TMP/$name.log" file="$img" "$@"
    URI="nbd+unix:///?socket=$TMP/$name.sock" PID=$LAST_SERVER_PID
}

# same_map IMG: qcow2reclaim map and qemu-img map agree, and so does block
# status from the plugin and from qemu-nbd.
same_map() {
    local img=$1
    qemu-img map --output=json "$img" >q.map
    "$TOOL" map --output=json "$img" >t.map
    diff -u q.map t.map >&2 || fail "$img: qcow2reclaim map differs from qemu-img map"
    serve status "$img" readonly=true
    nbdinfo --map "$URI" >t.status
    stop_server "$PID"
    start_qemu_nbd "$TMP/qn.sock" "$TMP/qn.log" "$img" -r
    nbdinfo --map "nbd+unix:///?socket=$TMP/qn.sock" >q.status
    stop_server "$LAST_SERVER_PID"
    diff -u q.status t.status >&2 || fail "$img: block status differs from qemu-nbd's"
}

# --- Every other subcluster of 16 MiB --------------------------------------
qemu-img create -q -f qcow2 -o $OPTS half.qcow2 32M
serve half half.qcow2 compact=off
ops "$URI" "write 0 $((16 * MiB)) 1" flush
before=$(alloc_of half.qcow2)
ops "$URI" "every 0 $((16 * MiB)) 8192 trim 4096" flush
after=$(alloc_of half.qcow2)
expects=()
for ((o = 0; o < 16 * MiB; o += 8192)); do
    expects+=("expect $o 4096 zero" "expect $((o + 4096)) 4096 data 1")
done
ops "$URI" "${expects[@]}" || fail "every other subcluster: the contents are wrong"
stop_server "$PID"
back=$((before - after))
[ "$back" -ge $((7 * MiB)) ] ||
    fail "every other subcluster: $back bytes came back of 8 MiB trimmed, want 7 MiB at least"
check_clean half.qcow2
"$PYTHON" - <<'EOF' || fail "every other subcluster: QEMU reads something else"
import random, subprocess
subprocess.run(["qemu-img", "convert", "-O", "raw", "half.qcow2", "half.raw"], check=True)
raw = open("half.raw", "rb").read()
for o in range(0, 16 << 20, 8192):
    assert raw[o:o + 4096] == bytes(4096), o
    want = random.Random(1000003 + o + 4096).randbytes(4096)
    assert raw[o + 4096:o + 8192] == want, o
assert raw[16 << 20:] == bytes(16 << 20)
EOF
echo "ok: every other 4 KiB subcluster of 16 MiB trimmed: $back bytes of $before came back, contents and check clean"

qemu-img create -q -f qcow2 -o $OPTS qhalf.qcow2 32M
start_qemu_nbd "$TMP/qh.sock" "$TMP/qh.log" qhalf.qcow2 --discard=unmap
ops "nbd+unix:///?socket=$TMP/qh.sock" "write 0 $((16 * MiB)) 1" flush
qbefore=$(alloc_of qhalf.qcow2)
ops "nbd+unix:///?socket=$TMP/qh.sock" "every 0 $((16 * MiB)) 8192 trim 4096" flush
stop_server "$LAST_SERVER_PID"
echo "ok: the same with qemu-nbd --discard=unmap ($(qemu-img --version | head -n 1)): $((qbefore - $(alloc_of qhalf.qcow2))) bytes came back"

# --- Clusters whose 32 subclusters all go ------------------------------------
# The first 4 MiB get their odd subclusters trimmed too, the next 4 MiB
# zeroed with MAY_TRIM: 64 clusters with nothing allocated left.
serve half half.qcow2 compact=off
ops "$URI" "every 4096 $((4 * MiB)) 8192 trim 4096" \
    "every $((4 * MiB + 4096)) $((8 * MiB)) 8192 zero 4096" flush \
    "expect 0 $((8 * MiB)) zero" "expect $((8 * MiB + 4096)) 4096 data 1"
stop_server "$PID"
check_clean half.qcow2
"$PYTHON" - <<'EOF' || fail "all subclusters: qemu-img map still shows host clusters below 8 MiB"
import json, subprocess
m = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "half.qcow2"],
                              capture_output=True, check=True).stdout)
for e in m:
    if e["start"] < 8 << 20:
        assert not e["data"] and not e["present"] and "offset" not in e, e
EOF
freed=$((after - $(alloc_of half.qcow2)))
# Half of those 8 MiB was trimmed before: 4 MiB of data is left to go.
[ "$freed" -ge $((31 * MiB / 8)) ] || fail "all subclusters: only $freed bytes of 4 MiB came back"
"$TOOL" check half.qcow2 >chk.out || { cat chk.out; fail "all subclusters: qcow2reclaim check is not clean"; }
same_map half.qcow2
echo "ok: 64 clusters with all 32 subclusters trimmed or zeroed: freed (check leak-free, map unallocated, $freed more bytes back)"

# --- Parts of subclusters ----------------------------------------------------
# 2 MiB clusters have 64 KiB subclusters: trims of 4 KiB (punched later
# by the worker) and write-zeroes of 4 KiB (punched at once) that end up
# covering a subcluster clear it; once all 32 are cleared, the cluster
# goes.
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=2M big.qcow2 8M
serve big big.qcow2 compact=off
ops "$URI" "write 0 $((4 * MiB)) 2" flush \
    "every 0 65536 4096 trim 4096" "every 65536 131072 4096 zero 4096" flush
stop_server "$PID"
qemu-img map --output=json big.qcow2 >big.map
"$PYTHON" - <<'EOF2' || { cat big.map; fail "parts of subclusters: the two subclusters are still allocated"; }
import json
m = json.load(open("big.map"))
assert m[0]["start"] == 0 and m[0]["length"] == 131072 and not m[0]["data"], m[0]
assert m[1]["data"] and m[1]["start"] == 131072, m[1]
EOF2
serve big big.qcow2 compact=off
ops "$URI" "every 131072 $((2 * MiB)) 32768 trim 32768" flush \
    "expect 0 $((2 * MiB)) zero" "expect $((2 * MiB)) $((2 * MiB)) data 2"
stop_server "$PID"
check_clean big.qcow2
qemu-img map --output=json big.qcow2 >big.map
"$PYTHON" - <<'EOF2' || { cat big.map; fail "parts of subclusters: the cluster is still allocated"; }
import json
m = json.load(open("big.map"))
assert m[0]["start"] == 0 and m[0]["length"] == 2 << 20 and "offset" not in m[0], m[0]
EOF2
same_map big.qcow2
echo "ok: 4 KiB trims and zeroes covering 64 KiB subclusters clear them, and then the cluster"

# --- Holes on both sides of data ---------------------------------------------
# 256 KiB clusters have 8 KiB subclusters.  With the punches held until
# the flush, subclusters 0 and 2 are found all hole together while 1
# between them holds data: giving back the first two must leave the one
# in the gap.
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=256k gap.qcow2 8M
QCOW2RECLAIM_PUNCH_HOLD=1 serve gap gap.qcow2 compact=off
ops "$URI" "write 0 24576 8" flush "trim 0 4096" "trim 4096 4096" "trim 16384 4096" \
    "trim 20480 4096" flush \
    "expect 0 8192 zero" "expect 8192 8192 data 8" "expect 16384 8192 zero" ||
    fail "holes on both sides: the subcluster between them lost its data"
stop_server "$PID"
check_clean gap.qcow2
echo "ok: two subclusters found all hole at once leave the data between them"

# --- Over a backing file ----------------------------------------------------
qemu-img create -q -f raw base.raw 32M
"$PYTHON" -c '
import random
with open("base.raw", "r+b") as f:
    f.write(random.Random(7).randbytes(24 << 20))'
qemu-img create -q -f qcow2 -o $OPTS -b base.raw -F raw top.qcow2 32M
base_sum=$(md5sum <base.raw)
serve top top.qcow2 compact=off
# 0-4M written, even subclusters trimmed; 1-2M all of them (clusters go);
# 4-6M never written, trimmed in whole subclusters and in parts; 6-7M
# written, then zeroed without MAY_TRIM in whole subclusters: the cluster
# stays, with zero bits.
ops "$URI" "write 0 $((4 * MiB)) 3" flush \
    "every 0 $((4 * MiB)) 8192 trim 4096" \
    "every $((MiB + 4096)) $((2 * MiB)) 8192 trim 4096" \
    "trim $((4 * MiB)) 12288" "trim $((4 * MiB + 20480)) 100" \
    "write $((6 * MiB)) $((MiB)) 4" "zero $((6 * MiB + 8192)) 16384 nohole" flush
ops "$URI" "expect 0 4096 zero" "expect 4096 4096 data 3" \
    "expect $((MiB)) $((MiB)) zero" "expect $((2 * MiB + 12288)) 4096 data 3" \
    "expect $((4 * MiB)) 12288 zero" "expect $((6 * MiB + 8192)) 16384 zero" \
    "expect $((6 * MiB + 24576)) 4096 data 4"
stop_server "$PID"
check_clean top.qcow2
[ "$(md5sum <base.raw)" = "$base_sum" ] || fail "backing file: it was modified"
"$PYTHON" - <<'EOF' || fail "backing file: QEMU reads something else"
import random, subprocess
subprocess.run(["qemu-img", "convert", "-O", "raw", "top.qcow2", "top.raw"], check=True)
raw = open("top.raw", "rb").read()
base = open("base.raw", "rb").read()
def data(seed, o):
    return random.Random(seed * 1000003 + o).randbytes(4096)
for o in range(0, 4 << 20, 8192):
    assert raw[o:o + 4096] == bytes(4096), o
    odd = bytes(4096) if (1 << 20) <= o < (2 << 20) else data(3, o + 4096)
    assert raw[o + 4096:o + 8192] == odd, o
assert raw[4 << 20:(4 << 20) + 12288] == bytes(12288)
assert raw[(4 << 20) + 12288:6 << 20] == base[(4 << 20) + 12288:6 << 20]
assert raw[(6 << 20) + 8192:(6 << 20) + 24576] == bytes(16384)
assert raw[7 << 20:] == base[7 << 20:]
EOF
"$PYTHON" - <<'EOF' || fail "backing file: the trimmed clusters are not freed, or the zeroed one is"
import json, subprocess
m = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "top.qcow2"],
                              capture_output=True, check=True).stdout)
for e in m:
    if (1 << 20) <= e["start"] < (2 << 20):
        assert e["zero"] and "offset" not in e and e["depth"] == 0, e
    if e["start"] <= (6 << 20) + 8192 < e["start"] + e["length"]:
        assert e["zero"] and "offset" in e, e
EOF
same_map top.qcow2
echo "ok: over a backing file: trimmed subclusters read zeros, whole ones freed, zeroed ones kept; map and block status as QEMU's"

# --- check, check -r, compaction ---------------------------------------------
"$TOOL" check top.qcow2 >chk.out || { cat chk.out; fail "qcow2reclaim check of top.qcow2 is not clean"; }
len=$(stat -c %s top.qcow2)
truncate -s $((len + 131072)) top.qcow2
"$PYTHON" "$srcdir/qcow2_patch.py" refcount top.qcow2 "$len" 1 >/dev/null
set +e; "$TOOL" check top.qcow2 >chk.out 2>&1; rc=$?; set -e
[ $rc -eq 3 ] || { cat chk.out; fail "check of a leak in top.qcow2 exited $rc, want 3"; }
"$TOOL" check -r leaks top.qcow2 >rep.out 2>&1 || { cat rep.out; fail "check -r leaks failed"; }
check_clean top.qcow2
echo "ok: qcow2reclaim check is clean, and check -r mends a leak, on extended L2 entries"

# Data written low, then high, the low part trimmed: the server's
# compaction moves the high clusters, bitmaps and all, down.
qemu-img create -q -f qcow2 -o $OPTS comp.qcow2 64M
serve comp comp.qcow2 compact=off
ops "$URI" "write 0 $((16 * MiB)) 5" "write $((40 * MiB)) $((2 * MiB)) 6" \
    "every $((40 * MiB)) $((42 * MiB)) 8192 trim 4096" \
    "zero $((41 * MiB)) 8192 nohole" flush "trim 0 $((16 * MiB))" flush
stop_server "$PID"
qemu-img convert -O raw comp.qcow2 comp.raw
long=$(stat -c %s comp.qcow2)
QCOW2RECLAIM_COMPACT_EAGER=1 serve comp comp.qcow2
for ((i = 0; i < 100; i++)); do
    [ "$(stat -c %s comp.qcow2)" -le $((4 * MiB)) ] && break
    sleep 0.1
done
ops "$URI" flush
stop_server "$PID"
short=$(stat -c %s comp.qcow2)
[ "$short" -le $((4 * MiB)) ] || fail "compaction: the file is $short bytes long, was $long"
qemu-img compare -q -f qcow2 -F raw comp.qcow2 comp.raw || fail "compaction: the contents changed"
check_clean comp.qcow2
same_map comp.qcow2
echo "ok: compact=auto: $long -> $short bytes, contents, check and map unchanged"
