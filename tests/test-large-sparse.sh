#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Huge sparse disks: offsets that only exist far from the start (past 4 GiB,
# the last byte of a 1 TiB disk) and table boundaries (L2 tables, refcount
# blocks, refcount table growth) must work without the host file growing
# beyond what was written.
#
#   1 TiB, 64 KiB clusters: an L2 table maps 512 MiB; scattered writes hit
#     many L1 entries and straddle L2 boundaries; the host file must stay
#     a few MiB.
#   512-byte clusters at the largest size qemu-img accepts (128 GiB, a
#     32 MiB L1 table): an L2 table maps 32 KiB and a refcount block counts
#     128 KiB of host file, so a few MiB of writes cross hundreds of L2
#     tables and dozens of refcount blocks.
#   512-byte clusters with 64-bit refcounts: the refcount table must grow.
#
# Afterwards QEMU checks the image (qemu-img check, which must also count
# exactly the clusters the writes touched as allocated), reads every
# written range and the zeros around it (qemu-io), and for the 1 TiB disk
# compares everything with an image QEMU wrote itself (qemu-img compare).
#
# SERVER=qemu-nbd serves with qemu-nbd instead of the plugin (harness check).

set -eu
SERVER=${SERVER:-nbdkit}
[ "$SERVER" = qemu-nbd ] && : "${PLUGIN:=unused-with-qemu-nbd}"
srcdir=$(cd "${srcdir:-$(dirname "$0")}" && pwd)
. "$srcdir/functions.sh"

requires qemu-img --version
requires qemu-io --version
requires "$PYTHON" -c 'import nbd'
case $SERVER in
    nbdkit) requires nbdkit --version ;;
    qemu-nbd) requires qemu-nbd --version ;;
    *) fail "SERVER must be nbdkit or qemu-nbd, not $SERVER" ;;
esac

# serve SOCK LOG IMAGE: as test-differential.sh.
serve() {
    if [ "$SERVER" = nbdkit ]; then
        start_server "$1" "$2" file="$3"
    else
        start_qemu_nbd "$1" "$2" "$3" --discard=unmap
    fi
}

# The plan (which ranges, which pattern byte), the NBD side and the qemu-io
# command lists all come from one helper so they cannot disagree.
HELPER=$TMP/sparse_helper.py
cat >"$HELPER" <<'EOF'
import random, sys

GUARD = 4096


def plan(size, cs, seed):
    """Non-overlapping (offset, length) ranges, fixed ones first."""
    l2_span = cs * (cs // 8)
    mib = 1 << 20
    fixed = [
        (0, min(4096, cs - 200)),               # first bytes
        (cs - 100, 200),                        # cluster boundary
        (l2_span - 100, 200),                   # first L2 table boundary
        (2 * l2_span - 1, 2),                   # next one, two bytes
        (size // 4 // l2_span * l2_span - cs, 2 * cs),
        (size // 3 + 12345, 300000),            # unaligned, many clusters
        (size // 2 + 7, 1),                     # a single byte
        (size // 2 // l2_span * l2_span + l2_span - cs, 2 * cs),
        (size * 3 // 4 + 512, mib),             # sector aligned, 1 MiB
        (size - mib - 3, 5000),
        (size - 8192, 4095),
        (size - 4097, 4096),                    # up to one byte before
        (size - 1, 1),                          # the very last byte
    ]
    extra = []
    rng = random.Random(seed)
    if cs <= 4096:
        # Many scattered small writes: each needs its own L2 table, so the
        # host file grows through many refcount blocks.
        for _ in range(100):
            extra.append((rng.randrange(0, size - 4096), rng.randint(1, 3000)))
        # One long run: thousands of clusters in a row.
        extra.append((size // 8 + 333, 3 * mib + 777))
    else:
        for _ in range(8):
            extra.append((rng.randrange(0, size - mib), rng.randint(1, 70000)))
    for i, (o, n) in enumerate(fixed):
        assert all(o + n <= p or p + m <= o for p, m in fixed[i + 1:]), (o, n)
    chosen = []
    for off, n in fixed + extra:
        assert 0 <= off and off + n <= size, (off, n)
        # Keep ranges apart (fixed ones are built not to overlap) so that
        # each can be checked with one pattern and has zeros around it.
        if any(off < o + m + GUARD and o < off + n + GUARD
               for o, m in chosen) and (off, n) not in fixed:
            continue
        chosen.append((off, n))
    return [(off, n, (i % 250) + 1) for i, (off, n) in enumerate(chosen)]


def zero_gaps(ranges, size):
    """The bytes within GUARD of each range that no range covers."""
    spans = sorted((o, o + n) for o, n, _ in ranges)
    want = []
    for o, e in spans:
        want.append((max(0, o - GUARD), o))
        want.append((e, min(size, e + GUARD)))
    gaps = []
    for a, b in want:
        for o, e in spans:
            if o <= a < e:
                a = e
            if a < o < b:
                b = o
        if a < b:
            gaps.append((a, b - a))
    return sorted(set(gaps))


def touched(ranges, cs):
    """Guest clusters and L2 tables the ranges touch."""
    data, l2 = set(), set()
    l2_span = cs * (cs // 8)
    for off, n, _ in ranges:
        data.update(range(off // cs, (off + n - 1) // cs + 1))
        l2.update(range(off // l2_span, (off + n - 1) // l2_span + 1))
    return data, l2


def budget(ranges, cs, refcount_bits):
    """Most host bytes the writes may add: the data clusters, one L2
    table per L1 entry touched, refcount blocks to count them, and slack
    for refcount table growth and allocation order."""
    data, l2 = touched(ranges, cs)
    new = len(data) + len(l2)
    refblocks = new // (cs * 8 // refcount_bits) + 2
    return int((new + refblocks + 8) * cs * 1.1) + 65536


def read_plan(path):
    with open(path) as f:
        return [tuple(int(x, 0) for x in line.split()) for line in f]


def nbd_run(uri, path, size):
    import nbd
    ranges = read_plan(path)
    h = nbd.NBD()
    h.connect_uri(uri)
    if h.get_size() != size:
        sys.exit("export size %d, expected %d" % (h.get_size(), size))
    for off, n, pat in ranges:
        try:
            h.pwrite(bytes((pat,)) * n, off)
        except nbd.Error as e:
            sys.exit("write off=%d len=%d failed: %s" % (off, n, e))
    h.flush()
    checks = [(o, n, p) for o, n, p in ranges] + \
             [(o, n, 0) for o, n in zero_gaps(ranges, size)]
    bad = 0
    for off, n, pat in checks:
        try:
            got = h.pread(n, off)
        except nbd.Error as e:
            sys.exit("read off=%d len=%d failed: %s" % (off, n, e))
        if got != bytes((pat,)) * n:
            i = next(i for i in range(n) if got[i] != pat)
            print("MISMATCH at offset %d (0x%x): expected 0x%02x, got 0x%02x "
                  "(range off=%d len=%d)" % (off + i, off + i, pat, got[i],
                                            off, n), file=sys.stderr)
            bad += 1
    h.shutdown()
    if bad:
        sys.exit(1)
    print("%d ranges written, %d ranges read back" % (len(ranges), len(checks)))


cmd = sys.argv[1]
if cmd == "plan":
    for off, n, pat in plan(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])):
        print(off, n, pat)
elif cmd == "nbd":
    nbd_run(sys.argv[2], sys.argv[3], int(sys.argv[4]))
elif cmd == "budget":
    print(budget(read_plan(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
elif cmd == "clusters":
    print(len(touched(read_plan(sys.argv[2]), int(sys.argv[3]))[0]))
elif cmd == "qemu-io-write":
    for off, n, pat in read_plan(sys.argv[2]):
        print("write -P %d %d %d" % (pat, off, n))
elif cmd == "qemu-io-read":
    ranges = read_plan(sys.argv[2])
    for off, n, pat in ranges:
        print("read -P %d %d %d" % (pat, off, n))
    for off, n in zero_gaps(ranges, int(sys.argv[3])):
        print("read -P 0 %d %d" % (off, n))
EOF

# qemu_io_file IMAGE CMDFILE [-r]: run the commands listed in CMDFILE, one
# qemu-io process for all of them; any failed command fails the test.
qemu_io_file() {
    local img=$1 cmds=$2; shift 2
    local args=() line out
    while IFS= read -r line; do args+=(-c "$line"); done <"$cmds"
    out=$(qemu-io "$@" -f qcow2 "${args[@]}" "$img" 2>&1) ||
        { echo "$out" | grep -v -e '^wrote ' -e '^read ' -e ' ops; ' >&2
          fail "qemu-io on $img failed"; }
    if echo "$out" | grep -q -i -e 'fail' -e 'error'; then
        echo "$out" | grep -i -e 'fail' -e 'error' >&2
        fail "qemu-io on $img reported failures"
    fi
}

blocks() { echo $(( $(stat -c %b "$1") * 512 )); }
# Refcount table clusters (header bytes 56-59), to show whether it grew.
rt_clusters() { od -An -tu1 -j56 -N4 "$1" | awk '{print $1*16777216+$2*65536+$3*256+$4}'; }

run_image() {
    local name=$1 cs=$2 rbits=$3 seed=$4 max_total=$5; shift 5
    local dir=$TMP/$name start=$SECONDS
    mkdir "$dir"
    local img=$dir/img.qcow2 size=
    # Sizes are tried largest first; the first one qemu-img accepts is used.
    for size in "$@" ""; do
        [ -n "$size" ] || fail "$name: qemu-img refused every size ($*)"
        qemu-img create -q -f qcow2 -o cluster_size="$cs",refcount_bits="$rbits" \
            "$img" "$size" 2>/dev/null && break
    done
    local before rt_before
    before=$(blocks "$img")
    rt_before=$(rt_clusters "$img")

    "$PYTHON" "$HELPER" plan "$size" "$cs" "$seed" >"$dir/plan"
    local max_growth
    max_growth=$("$PYTHON" "$HELPER" budget "$dir/plan" "$cs" "$rbits")
    local sock=$dir/nbd.sock rc=0
    serve "$sock" "$dir/server.log" "$img"
    local pid=$LAST_SERVER_PID
    "$PYTHON" "$HELPER" nbd "nbd+unix:///?socket=$sock" "$dir/plan" "$size" \
        >"$dir/nbd.out" 2>&1 || rc=$?
    stop_server "$pid"
    if [ $rc -ne 0 ]; then
        cat "$dir/nbd.out" >&2
        tail -n 30 "$dir/server.log" >&2
        fail "$name: NBD writes or read-back failed"
    fi

    check_clean "$img"
    # Exactly the touched clusters are allocated: nothing was written
    # anywhere else.  Cheap, unlike reading or comparing the whole disk.
    local want_alloc got_alloc
    want_alloc=$("$PYTHON" "$HELPER" clusters "$dir/plan" "$cs")
    got_alloc=$(qemu-img check "$img" | sed -n 's|^\([0-9]*\)/[0-9]* = .* allocated.*|\1|p')
    [ "$got_alloc" = "$want_alloc" ] ||
        fail "$name: $got_alloc guest clusters allocated, the writes touched $want_alloc"
    "$PYTHON" "$HELPER" qemu-io-read "$dir/plan" "$size" >"$dir/verify.cmds"
    qemu_io_file "$img" "$dir/verify.cmds" -r

    # The same writes done by QEMU itself must give an identical disk,
    # including everything between the ranges.  qemu-img compare asks for
    # block status once per L2 table, which for 512-byte clusters means
    # millions of calls (a minute), so it is done for large clusters only.
    if [ "$cs" -ge 65536 ]; then
        local expected=$dir/expected.qcow2
        qemu-img create -q -f qcow2 "$expected" "$size"
        "$PYTHON" "$HELPER" qemu-io-write "$dir/plan" >"$dir/write.cmds"
        qemu_io_file "$expected" "$dir/write.cmds"
        local cmp_out
        cmp_out=$(qemu-img compare -f qcow2 -F qcow2 "$img" "$expected" 2>&1) ||
            { echo "$cmp_out" >&2; fail "$name: qemu-img compare found a difference"; }
    fi

    local after growth
    after=$(blocks "$img")
    growth=$((after - before))
    [ "$growth" -le "$max_growth" ] ||
        fail "$name: host file grew by $growth bytes (limit $max_growth)"
    [ -z "$max_total" ] || [ "$after" -le "$max_total" ] ||
        fail "$name: host file has $after bytes allocated (limit $max_total)"

    printf '%-5s size=%dG cluster=%s ranges=%d: host grew %d KiB (limit %d KiB), %d KiB allocated, refcount table %s->%s clusters, %ds\n' \
        "$name" $((size >> 30)) "$cs" "$(wc -l <"$dir/plan")" $((growth / 1024)) \
        $((max_growth / 1024)) $((after / 1024)) "$rt_before" "$(rt_clusters "$img")" \
        $((SECONDS - start))
    rm -rf "$dir"
}

echo "test-large-sparse: server=$SERVER"

# Growth is limited by what the writes need (see budget()); the 1 TiB file
# must also stay a few MiB in total.
run_image big 65536 16 11 $((8 * 1024 * 1024)) $((1 << 40))

# The largest 512-byte-cluster image qemu-img accepts has a 32 MiB L1 table
# (128 GiB); older or stricter builds may stop lower.  That L1 table is
# allocated up front, so only the growth is limited.
run_image c512 512 16 12 "" $((128 << 30)) $((64 << 30)) $((32 << 30))

# 64-bit refcounts in 512-byte clusters: a refcount block counts only 32 KiB
# and the first refcount table cluster covers 2 MiB of host file, so the
# same writes force the refcount table to move and grow.
run_image rt64 512 64 13 "" $((4 << 30))

echo "test-large-sparse: passed"
