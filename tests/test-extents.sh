#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# Block status must say what qemu says, or copies of our exports are no longer
# sparse (data reported for holes) or silently lose data (holes reported for
# data).  For each image the reference is qemu-nbd serving the same file; the
# maps are compared after merging adjacent ranges of one type, because how a
# server splits its replies is its own business.  Then the two sparse copiers
# users actually run, nbdcopy and qemu-img convert, must produce a copy with
# the right content and the right allocation.
#
# SERVER=qemu-nbd runs everything against qemu-nbd (harness validation only).
set -eu
srcdir=${srcdir:-$(cd "$(dirname "$0")" && pwd)}
SERVER=${SERVER:-nbdkit}
[ "$SERVER" = qemu-nbd ] && : "${PLUGIN:=unused}"
. "$srcdir/functions.sh"

requires qemu-img --version
requires qemu-io --version
requires qemu-nbd --version
requires nbdinfo --version
requires nbdcopy --version
requires "$PYTHON" -c 'import nbd'
if [ "$SERVER" != qemu-nbd ]; then
    requires nbdkit --version
fi
started=$(date +%s)
FAILURES=0
# A mismatch in one image should not hide what happens with the others.
soft_fail() { echo "FAIL: $*" >&2; FAILURES=$((FAILURES + 1)); }

# Small python helpers, kept here because only this test uses them.
LIB=$(cat <<'EOF'
import json, random, sys

def load_ranges(path):
    out = []
    for line in open(path):
        f = line.split()
        if f:
            out.append([int(f[0]), int(f[1]), int(f[2])])
    return out

def merge(ranges):
    out = []
    for s, l, t in ranges:
        if l == 0:
            continue
        if out and out[-1][2] == t and out[-1][0] + out[-1][1] == s:
            out[-1][1] += l
        else:
            if out and out[-1][0] + out[-1][1] != s:
                sys.exit("ranges not contiguous at %d" % s)
            out.append([s, l, t])
    return out

def show(ranges):
    for s, l, t in ranges:
        print(s, l, t)

def nbdinfo_map(path):
    # nbdinfo --map: "start length type description"
    show(merge([[int(f[0]), int(f[1]), int(f[2])]
                for f in (l.split() for l in open(path)) if f]))

def qemu_map(path):
    # The NBD bits qemu's own server derives from the same block status:
    # HOLE unless data, ZERO if it reads as zeros.
    rs = []
    for e in json.load(open(path)):
        t = (0 if e["data"] else 1) | (2 if e["zero"] else 0)
        rs.append([e["start"], e["length"], t])
    show(merge(rs))

def qemu_data(path):
    # Data ranges of a qemu-img map (the copy's allocation).
    rs = [[e["start"], e["length"], 1 if e["data"] else 0] for e in json.load(open(path))]
    show([r for r in merge(rs) if r[2] == 1])

def ref_data(path, cluster):
    # Where a copy must hold data: every range not reading as zeros, widened
    # to whole clusters of the copy.
    out = []
    for s, l, t in load_ranges(path):
        if t & 2:
            continue
        a = s // cluster * cluster
        b = -(-(s + l) // cluster) * cluster
        if out and out[-1][0] + out[-1][1] >= a:
            out[-1][1] = max(out[-1][0] + out[-1][1], b) - out[-1][0]
        else:
            out.append([a, b - a, 1])
    size = sum(l for s, l, t in load_ranges(path))
    if out and out[-1][0] + out[-1][1] > size:
        out[-1][1] = size - out[-1][0]
    show(out)

def data_bytes(path):
    print(sum(l for s, l, t in load_ranges(path) if not t & 2))

def probe(sock, refpath, seed, count):
    # Block status from arbitrary (unaligned) starting points, with and
    # without REQ_ONE: every extent returned must lie within reference ranges
    # of its own type, start where asked, and be contiguous.
    import nbd
    ref = load_ranges(refpath)
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(sock)
    size = h.get_size()
    rng = random.Random(seed)
    bad = 0
    def type_at(off):
        lo, hi = 0, len(ref) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ref[mid][0] <= off:
                lo = mid
            else:
                hi = mid - 1
        return ref[lo]
    for n in range(count):
        off = rng.randrange(0, size)
        if rng.random() < 0.5:
            off = off // 512 * 512
        ln = min(size - off, rng.choice([1, 512, 4096, 65536, 1 << 20, 64 << 20]))
        flags = nbd.CMD_FLAG_REQ_ONE if rng.random() < 0.3 else 0
        got = []
        def cb(ctx, o, entries, err):
            if ctx == nbd.CONTEXT_BASE_ALLOCATION:
                got.append((o, list(entries)))
            return 0
        h.block_status(ln, off, cb, flags)
        if len(got) != 1:
            print("FAIL: block_status(%d, %d): %d base:allocation replies" % (off, ln, len(got)))
            bad += 1
            continue
        pos = off
        ents = got[0][1]
        if flags and len(ents) != 2:
            print("FAIL: block_status(%d, %d, REQ_ONE) returned %d extents" % (off, ln, len(ents) // 2))
            bad += 1
        for i in range(0, len(ents), 2):
            el, et = ents[i], ents[i + 1]
            if el == 0 or pos + el > size:
                print("FAIL: block_status(%d, %d): extent [%d, +%d) is empty or past the end" % (off, ln, pos, el))
                bad += 1
                break
            p = pos
            while p < pos + el:
                rs, rl, rt = type_at(p)
                if rt != et:
                    print("FAIL: block_status(%d, %d%s): extent [%d, %d) type %d, but [%d, %d) is type %d"
                          % (off, ln, ", REQ_ONE" if flags else "", pos, pos + el, et,
                             max(rs, pos), min(rs + rl, pos + el), rt))
                    bad += 1
                    break
                p = rs + rl
            pos += el
        if bad >= 10:
            break
    h.shutdown()
    sys.exit(1 if bad else 0)

def compare(refpath, gotpath, who):
    # Walk both maps together and name each disagreement by its effect.
    # Exit 0 equal, 1 only the hole bit differs on zero ranges (copies come
    # out the same), 2 something a copier would get wrong.
    ref, got = load_ranges(refpath), load_ranges(gotpath)
    rend = sum(l for s, l, t in ref)
    gend = sum(l for s, l, t in got)
    worst = 0
    if rend != gend:
        print("  maps cover %d bytes (qemu-nbd) and %d bytes (%s)" % (rend, gend, who))
        worst = 2
    i = j = 0
    pos = 0
    diffs = []
    while i < len(ref) and j < len(got):
        rs, rl, rt = ref[i]
        gs, gl, gt = got[j]
        end = min(rs + rl, gs + gl)
        if rt != gt:
            if diffs and diffs[-1][1] == pos and diffs[-1][2:] == [rt, gt]:
                diffs[-1][1] = end
            else:
                diffs.append([pos, end, rt, gt])
        pos = end
        if rs + rl == end:
            i += 1
        if gs + gl == end:
            j += 1
    names = {0: "data", 1: "hole", 2: "zero", 3: "hole,zero"}
    for a, b, rt, gt in diffs:
        if (rt & 2) and (gt & 2):
            why = "both read as zeros, only the hole bit differs"
            worst = max(worst, 1)
        elif rt & 2:
            why = "NOT SPARSE: data reported where qemu reports zeros"
            worst = 2
        else:
            why = "DATA LOSS for sparse copies: zeros reported where there is data"
            worst = 2
        print("  [%d, %d) length %d: qemu-nbd %d (%s), %s %d (%s): %s"
              % (a, b, b - a, rt, names[rt], who, gt, names[gt], why))
    sys.exit(worst)

cmd = sys.argv[1]
args = sys.argv[2:]
if cmd == "probe":
    probe(args[0], args[1], int(args[2]), int(args[3]))
elif cmd in ("ref_data",):
    ref_data(args[0], int(args[1]))
else:
    globals()[cmd](*args)
EOF
)
py() { "$PYTHON" -c "$LIB" "$@"; }

# serve_ref SOCK LOG IMAGE: qemu-nbd, read-only, persistent (several clients).
serve_ref() { start_qemu_nbd "$1" "$2" "$3" -r; }

# serve_test SOCK LOG IMAGE: the server under test, read-only.
serve_test() {
    if [ "$SERVER" = qemu-nbd ]; then
        serve_ref "$@"
    else
        start_server "$1" "$2" file="$3" readonly=true
    fi
}

qio() { local img=$1; shift; local a=(); for c in "$@"; do a+=(-c "$c"); done
        qemu-io -f qcow2 "${a[@]}" "$img" >"$TMP/qemu-io.out" 2>&1 ||
            { cat "$TMP/qemu-io.out" >&2; fail "qemu-io on $img"; }
        ! grep -q 'failed' "$TMP/qemu-io.out" || { cat "$TMP/qemu-io.out" >&2; fail "qemu-io on $img"; }; }
mk() { qemu-img create -q -f qcow2 "$@"; }

# check_image NAME IMAGE: all comparisons for one image.
check_image() {
    local name=$1 image=$2 d=$TMP/$1
    local t0 sock=$TMP/$1.sock rsock=$TMP/$1-ref.sock cluster
    t0=$(date +%s)
    mkdir -p "$d"
    cluster=$(qemu-img info --output=json "$image" | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["cluster-size"])')
    check_clean "$image"

    # The reference, and what qemu-img map says about the same file.
    serve_ref "$rsock" "$d/ref.log" "$image"
    nbdinfo --map "nbd+unix:///?socket=$rsock" >"$d/ref.raw"
    stop_server "$LAST_SERVER_PID"
    py nbdinfo_map "$d/ref.raw" >"$d/ref"
    qemu-img map --output=json "$image" >"$d/map.json"
    py qemu_map "$d/map.json" >"$d/qmap"
    if ! cmp -s "$d/ref" "$d/qmap"; then
        # Not our bug, but then we cannot say which one we should follow.
        echo "note: $name: qemu-nbd and qemu-img map disagree (< qemu-nbd, > qemu-img map):" >&2
        diff "$d/ref" "$d/qmap" >&2 || true
    fi

    serve_test "$sock" "$d/test.log" "$image"
    local server=$LAST_SERVER_PID
    if ! nbdinfo --map "nbd+unix:///?socket=$sock" >"$d/got.raw"; then
        soft_fail "$name: nbdinfo --map failed"
    else
        py nbdinfo_map "$d/got.raw" >"$d/got"
        local rc=0
        py compare "$d/ref" "$d/got" "$SERVER" >"$d/compare" || rc=$?
        case $rc in
        0) ;;
        1) echo "note: $name: block status differs from qemu-nbd only in the hole bit of zero ranges:" >&2
           cat "$d/compare" >&2 ;;
        *) soft_fail "$name: block status differs from qemu-nbd (merged ranges):"
           cat "$d/compare" >&2
           if cmp -s "$d/qmap" "$d/got"; then echo "  (but it agrees with qemu-img map)" >&2; fi ;;
        esac
        # Queries from arbitrary offsets must agree with the server's own
        # map from offset 0; the map itself was judged just above.
        py probe "$sock" "$d/got" "${#name}" 150 >&2 ||
            soft_fail "$name: block status from unaligned offsets or with REQ_ONE is inconsistent (above)"
    fi

    # nbdcopy with zero detection off, so that any sparseness comes from
    # block status alone.
    rm -f "$d/copy.raw"
    if ! nbdcopy -S 0 "nbd+unix:///?socket=$sock" "$d/copy.raw"; then
        soft_fail "$name: nbdcopy failed"
    else
        if ! qemu-img compare -q -f raw -F qcow2 "$d/copy.raw" "$image"; then
            soft_fail "$name: nbdcopy's copy differs from the image:"
            qemu-img compare -f raw -F qcow2 "$d/copy.raw" "$image" >&2 || true
        fi
        local want alloc nranges
        want=$(py data_bytes "$d/ref")
        nranges=$(wc -l <"$d/ref")
        alloc=$(( $(stat -c %b "$d/copy.raw") * 512 ))
        # Each range may cost up to a file system block at each end.
        if [ "$alloc" -gt $((want + want / 8 + nranges * 8192 + 1048576)) ]; then
            soft_fail "$name: nbdcopy's copy is not sparse: $alloc bytes allocated for $want bytes of data (virtual size $(stat -c %s "$d/copy.raw"))"
        fi
    fi
    rm -f "$d/copy.raw"

    # qemu-img convert as a client: the copy's data clusters must be exactly
    # the source's non-zero ranges, widened to the copy's clusters.
    if ! qemu-img convert -O qcow2 -o cluster_size="$cluster" \
            "nbd+unix:///?socket=$sock" "$d/copy.qcow2" 2>"$d/convert.err"; then
        cat "$d/convert.err" >&2
        soft_fail "$name: qemu-img convert from the export failed"
    else
        if ! qemu-img compare -q "$d/copy.qcow2" "$image"; then
            soft_fail "$name: qemu-img convert's copy differs from the image"
        fi
        qemu-img map --output=json "$d/copy.qcow2" >"$d/copy.json"
        py qemu_data "$d/copy.json" >"$d/copy.data"
        py ref_data "$d/ref" "$cluster" >"$d/ref.data"
        if ! cmp -s "$d/ref.data" "$d/copy.data"; then
            soft_fail "$name: qemu-img convert's copy has data in other places than the source (start length; < expected, > copy):"
            diff "$d/ref.data" "$d/copy.data" >&2 || true
        fi
    fi
    rm -f "$d/copy.qcow2"

    stop_server "$server"
    # For looking at the maps of a run after the fact.
    [ -z "${EXTENTS_KEEP:-}" ] || { mkdir -p "$EXTENTS_KEEP"; cp -r "$d" "$EXTENTS_KEEP/"; }
    echo "checked: $name ($(( $(date +%s) - t0 ))s)"
}

cd "$TMP"
M=$((1024 * 1024))

# Every kind of L2 entry in one v3 image whose size is not a whole number
# of clusters.
mk -o cluster_size=64k mixed.qcow2 $((64 * M + 4096))
qio mixed.qcow2 \
    'write -P 0x11 0 1M' \
    'write -P 0x12 1049088 100' \
    'write -z 2M 1M' \
    'write -P 0x13 4M 1M' 'write -z 4M 512k' 'write -z -u 4718592 256k' \
    'write -c -P 0x14 8M 256k' 'write -c -P 0x15 9M 64k' 'write -P 0x16 9437284 1000' \
    'write -P 0x17 16M 2M' 'discard 16M 1M' 'discard 17891328 4096' \
    'write -P 0x18 30M 64k' 'write -P 0x19 31M 64k' 'write -P 0x1a 32M 64k' \
    'write -P 0x1b 64M 4096'
check_image mixed mixed.qcow2

# 4 KiB clusters: L2 tables cover 2 MiB, so ranges run across tables.
mk -o cluster_size=4k small.qcow2 $((40 * M))
qio small.qcow2 \
    'write -P 0x21 0 12k' 'write -P 0x22 20k 1' 'write -z 24k 8k' \
    'write -P 0x23 2093056 8k' 'write -z 4M 2M' \
    'write -P 0x24 6M 4M' 'write -z 7M 4k' 'write -z -u 8M 512k' 'write -z 9M 100' \
    'write -c -P 0x25 12M 64k' 'write -P 0x26 41934848 8k'
check_image small small.qcow2

# Version 2: no zero flag, so zeroing can only deallocate or write zeros.
mk -o compat=0.10,cluster_size=64k v2.qcow2 $((32 * M))
qio v2.qcow2 \
    'write -P 0x31 0 1M' 'write -z -u 512k 128k' 'write -c -P 0x32 2M 128k' \
    'write -P 0x33 5M 100' 'write -P 0x34 31M 1M'
check_image v2 v2.qcow2

# Large and sparse: L2 tables (512 MiB each) missing between the data.
mk -o cluster_size=64k big.qcow2 8G
qio big.qcow2 \
    'write -P 0x41 0 64k' 'write -P 0x42 536805376 128k' 'write -P 0x43 4G 1M' \
    'write -z 5G 64M' 'write -P 0x44 8589869056 64k'
check_image big big.qcow2

# 2 MiB clusters: a one-byte write makes a whole 2 MiB data cluster.
mk -o cluster_size=2M huge.qcow2 $((64 * M))
qio huge.qcow2 'write -P 0x51 3M 1' 'write -z 8M 4M' 'write -P 0x52 20M 6M' 'write -c -P 0x53 40M 2M'
check_image huge huge.qcow2

# zstd compression.
if qemu-img create -q -f qcow2 -o compression_type=zstd zstd.qcow2 $((16 * M)) 2>/dev/null; then
    qio zstd.qcow2 'write -c -P 0x61 0 1M' 'write -P 0x62 4M 64k' 'write -c -P 0x63 8M 64k'
    check_image zstd zstd.qcow2
fi

# An internal snapshot: shared clusters are still just data.
mk -o cluster_size=64k snap.qcow2 $((16 * M))
qio snap.qcow2 'write -P 0x71 0 4M'
qemu-img snapshot -c s1 snap.qcow2
qio snap.qcow2 'write -P 0x72 1M 64k' 'write -z 2M 512k' 'discard 3M 1M'
check_image snap snap.qcow2

# A backing chain with different cluster sizes: top clusters that are
# unallocated show the backing file's finer-grained data and holes; zero
# clusters in the top hide backing data; the backing's own zero clusters.
mk -o cluster_size=4k base4k.qcow2 $((32 * M))
qio base4k.qcow2 \
    'write -P 0x81 0 4k' 'write -P 0x82 12k 8k' 'write -P 0x83 1M 1M' 'write -z 1536k 64k' \
    'write -P 0x84 4M 4M' 'write -c -P 0x85 12M 64k' 'write -P 0x86 20M 40k'
mk -o cluster_size=64k -b base4k.qcow2 -F qcow2 chain.qcow2
qio chain.qcow2 \
    'write -P 0x91 8k 1' 'write -z 4M 1M' 'write -z 6M 64k' 'write -P 0x92 16M 1M' \
    'discard 7M 64k'
check_image chain chain.qcow2

# Three levels: a zero cluster in the middle hides the bottom's data even
# though the top does not map the cluster.
mk -o cluster_size=64k bottom.qcow2 $((8 * M))
qio bottom.qcow2 'write -P 0xa1 0 8M'
mk -o cluster_size=64k -b bottom.qcow2 -F qcow2 middle.qcow2
qio middle.qcow2 'write -z 1M 1M' 'write -P 0xa2 3M 64k'
mk -o cluster_size=64k -b middle.qcow2 -F qcow2 top3.qcow2
qio top3.qcow2 'write -P 0xa3 1M 4k' 'write -z 5M 64k'
check_image three top3.qcow2

# A backing file shorter than the top, ending in the middle of a cluster:
# beyond its end the top reads as zeros, which is a hole, not data.
mk -o cluster_size=64k shortbase.qcow2 $((16 * M + 512))
qio shortbase.qcow2 'write -P 0xb1 15M 1049088'
mk -o cluster_size=64k -b shortbase.qcow2 -F qcow2 short.qcow2 $((48 * M))
qio short.qcow2 'write -P 0xb2 32M 64k' 'write -z 40M 1M'
check_image short short.qcow2

# A raw backing file, sparse and shorter than the top: its holes are holes.
truncate -s $((8 * M)) rawbase.raw
qemu-io -f raw -c 'write -P 0xc1 0 2M' -c 'write -P 0xc2 6M 1M' rawbase.raw >/dev/null
mk -o cluster_size=64k -b rawbase.raw -F raw rawtop.qcow2 $((16 * M))
qio rawtop.qcow2 'write -P 0xc3 1M 64k' 'write -z 6M 64k' 'write -P 0xc4 12M 64k'
check_image rawback rawtop.qcow2

echo "test-extents: $FAILURES failure(s) in $(( $(date +%s) - started ))s"
[ "$FAILURES" -eq 0 ] || exit 1
