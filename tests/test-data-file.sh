#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# External data files (data_file=, data_file_raw=on).  A random workload of
# writes, trims and zeroes runs through the server while a raw reference
# follows it; then qemu-img check must be clean and QEMU must read the image
# as the reference.  With data_file_raw the data file itself must equal the
# reference byte for byte, after a first run and at the end.  The data file
# is found relative to the image (the server runs elsewhere), data-file=
# overrides it, it is locked, and trims give its space back, also trims of
# subclusters (extended L2 entries); a raw one reads zeros where they read
# zeros, also after bytes were written into it behind the image's back.
. "$srcdir/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires "$PYTHON" -c 'import nbd'
DRIVER=$srcdir/nbd_random_ops.py
OPS=${OPS:-600}
# The server runs from a folder without images, so the data file's relative
# name can only resolve against the image's folder.  QEMU 7.2 resolves it
# against its working directory: it runs from the image's folder here.
cd /
inside() { (cd "$1" && shift && "$@"); }
nbd_do() {
    "$PYTHON" -c 'import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); exec(sys.argv[2]); h.shutdown()' "$@"
}

# variant NAME OPTIONS: a 64M image whose data file is NAME.raw beside it.
variant() {
    local name=$1 opts=$2 dir=$TMP/$1 seed
    mkdir -p "$dir"
    (cd "$dir" && qemu-img create -q -f qcow2 -o "$opts" img.qcow2 64M &&
         qemu-io -f qcow2 -c 'write -P 0x11 0 1M' -c 'write -P 0x22 20M 4M' \
             -c 'write -z 21M 64K' img.qcow2 >/dev/null)
    inside "$dir" qemu-img convert -O raw img.qcow2 ref.raw
    for seed in 1 2; do
        start_server "$dir/sock" "$dir/log" file="$dir/img.qcow2"
        "$PYTHON" "$DRIVER" --uri "nbd+unix:///?socket=$dir/sock" --ref "$dir/ref.raw" \
            --seed "$seed" --ops "$OPS" --ops-mix write:4,read:2,trim:3,zero:2,flush:1 \
            --trim-zero-clusters --verify-all >"$dir/ops.log" 2>&1 ||
            { cat "$dir/ops.log" "$dir/log" >&2; fail "$name: the workload failed (seed $seed)"; }
        stop_server "$LAST_SERVER_PID"
        inside "$dir" check_clean img.qcow2
        inside "$dir" qemu-img convert -O raw img.qcow2 out.raw
        cmp "$dir/out.raw" "$dir/ref.raw" ||
            fail "$name: QEMU reads the image differently from the reference (seed $seed)"
        if [ "$name" = raw ]; then
            cmp "$dir/data.raw" "$dir/ref.raw" ||
                fail "$name: the raw data file differs from what the image serves (seed $seed)"
        fi
        echo "ok: $name, seed $seed: check clean, convert equal${3:+, raw data file equal}"
    done
}

run_case variant plain data_file=data.raw
run_case variant raw data_file=data.raw,data_file_raw=on yes

# Trims reach the data file: its blocks fall; a raw one reads zeros there.
space() {
    local dir=$TMP/space before after
    mkdir -p "$dir"
    (cd "$dir" && qemu-img create -q -f qcow2 -o data_file=d.raw,data_file_raw=on img.qcow2 64M &&
         qemu-io -f qcow2 -c 'write -P 0x5a 0 16M' img.qcow2 >/dev/null)
    before=$(stat -c %b "$dir/d.raw")
    start_server "$dir/sock" "$dir/log" file="$dir/img.qcow2"
    nbd_do "nbd+unix:///?socket=$dir/sock" 'h.trim(8 << 20, 4 << 20); h.flush()'
    # The data file is locked like the image: QEMU may not write it now.
    if qemu-io -f raw -c 'write 0 512' "$dir/d.raw" >"$dir/qio.log" 2>&1; then
        fail "qemu-io wrote the data file while the server had it open"
    fi
    grep -q -i lock "$dir/qio.log" || { cat "$dir/qio.log" >&2; fail "qemu-io failed, but not on a lock"; }
    stop_server "$LAST_SERVER_PID"
    after=$(stat -c %b "$dir/d.raw")
    [ "$after" -lt "$before" ] || fail "the data file kept its blocks after a trim ($before -> $after)"
    cmp -n 8M -i 4M:0 "$dir/d.raw" /dev/zero || fail "the trimmed range of the raw data file is not zeros"
    inside "$dir" check_clean img.qcow2
    echo "ok: a trim gave back $(( (before - after) / 2 )) KiB of the data file, which is locked while served"
}
run_case space

# Extended L2 entries (128 KiB clusters of 32 x 4 KiB subclusters): every
# other subcluster of 16 MiB trimmed gives host space back in the data
# file, plain or raw; the rest reads back, QEMU reads the same, and a raw
# data file is the disk.
subclusters() {
    local dir=$TMP/sub kind opts before after
    for kind in plain raw; do
        opts=extended_l2=on,cluster_size=128k,data_file=d.raw
        [ $kind = raw ] && opts=$opts,data_file_raw=on
        rm -rf "$dir"; mkdir -p "$dir"
        (cd "$dir" && qemu-img create -q -f qcow2 -o $opts img.qcow2 32M &&
             qemu-io -f qcow2 -c 'write -P 0x5a 0 16M' img.qcow2 >/dev/null)
        before=$(stat -c %b "$dir/d.raw")
        start_server "$dir/sock" "$dir/log" file="$dir/img.qcow2"
        nbd_do "nbd+unix:///?socket=$dir/sock" '
for o in range(0, 16 << 20, 8192):
    h.trim(4096, o)
h.flush()
for o in range(0, 16 << 20, 8192):
    assert h.pread(8192, o) == bytes(4096) + b"\x5a" * 4096, o' ||
            fail "subclusters, $kind: trimmed subclusters do not read zeros, or the others lost data"
        stop_server "$LAST_SERVER_PID"
        after=$(stat -c %b "$dir/d.raw")
        [ $(( (before - after) * 512 )) -ge $((7 << 20)) ] ||
            fail "subclusters, $kind: the data file gave back $(( (before - after) / 2 )) KiB of 8 MiB trimmed"
        inside "$dir" check_clean img.qcow2
        inside "$dir" qemu-img convert -O raw img.qcow2 out.raw
        "$PYTHON" - "$dir/out.raw" <<'PY' || fail "subclusters, $kind: QEMU reads something else"
import sys
raw = open(sys.argv[1], "rb").read()
want = (bytes(4096) + b"\x5a" * 4096) * (2048) + bytes(16 << 20)
assert raw == want
PY
        if [ $kind = raw ]; then
            cmp -n 32M "$dir/d.raw" "$dir/out.raw" ||
                fail "subclusters, raw: the data file differs from the disk"
        fi
        echo "ok: subclusters, $kind data file: every other 4 KiB trimmed gave back $(( (before - after) / 2 )) KiB of it, check clean"
    done
}
run_case subclusters

# A raw data file with bytes written behind the image's back where the
# subclusters are unallocated (they read zeros): a write into one of them
# leaves zeros in the raw file around it, as the disk reads.
stale() {
    local dir=$TMP/stale
    mkdir -p "$dir"
    (cd "$dir" && qemu-img create -q -f qcow2 \
         -o extended_l2=on,cluster_size=128k,data_file=d.raw,data_file_raw=on img.qcow2 16M &&
         qemu-io -f raw -c 'write -P 0x77 0 256K' d.raw >/dev/null)
    start_server "$dir/sock" "$dir/log" file="$dir/img.qcow2"
    nbd_do "nbd+unix:///?socket=$dir/sock" '
h.pwrite(b"\x42" * 4096, 4096); h.pwrite(b"\x43" * 1000, 131072 + 70000); h.flush()'
    stop_server "$LAST_SERVER_PID"
    inside "$dir" check_clean img.qcow2
    inside "$dir" qemu-img convert -O raw img.qcow2 out.raw
    "$PYTHON" - "$dir/out.raw" "$dir/d.raw" <<'PY' || fail "stale: the disk or the raw data file is wrong"
import sys
want = bytearray(16 << 20)
want[4096:8192] = b"\x42" * 4096
want[131072 + 70000:131072 + 71000] = b"\x43" * 1000
for name in sys.argv[1:]:
    got = open(name, "rb").read()
    assert got == want, (name, next(i for i in range(len(want)) if got[i] != want[i]))
PY
    echo "ok: a write into unallocated subclusters of a raw data file leaves zeros around it"
}
run_case stale

# data-file= names the data file when it moved; without it the image is refused.
override() {
    local dir=$TMP/override got
    mkdir -p "$dir"
    (cd "$dir" && qemu-img create -q -f qcow2 -o data_file=d.raw img.qcow2 64M &&
         qemu-io -f qcow2 -c 'write -P 0x6b 64K 64K' img.qcow2 >/dev/null)
    mv "$dir/d.raw" "$dir/moved.raw"
    start_server "$dir/sock" "$dir/log" file="$dir/img.qcow2" data-file="$dir/moved.raw"
    got=$(nbd_do "nbd+unix:///?socket=$dir/sock" 'print(h.pread(1, 65536).hex())')
    stop_server "$LAST_SERVER_PID"
    [ "$got" = 6b ] || fail "data-file=: read $got at 64K, want 6b"
    echo "ok: data-file= overrides the name in the header"
}
run_case override

# The tool sees the data file's clusters at their guest offsets, and no
# refcounts for them.
tool() {
    local dir=$TMP/space out
    out=$("$top_builddir/tools/qcow2reclaim" check "$dir/img.qcow2" 2>&1) ||
        { echo "$out" >&2; fail "qcow2reclaim check on a data file image failed"; }
    out=$("$top_builddir/tools/qcow2reclaim" map "$dir/img.qcow2" 2>&1) ||
        { echo "$out" >&2; fail "qcow2reclaim map on a data file image failed"; }
    echo "$out" | grep -q "d.raw" || { echo "$out" >&2; fail "qcow2reclaim map does not name the data file"; }
    echo "ok: qcow2reclaim check and map"
}
run_case tool

# A flush puts the data file's writes on disk: under strace, the data
# file's descriptor must see fdatasync after a write and a flush.
synced() {
    local dir=$TMP/synced fd=
    requires strace -V
    mkdir -p "$dir"
    (cd "$dir" && qemu-img create -q -f qcow2 -o data_file=d.raw img.qcow2 64M)
    start_server "$dir/sock" "$dir/log" file="$dir/img.qcow2"
    local pid=$LAST_SERVER_PID f t tasks=()
    for f in /proc/"$pid"/fd/*; do
        [ "$(readlink "$f")" = "$dir/d.raw" ] && fd=${f##*/}
    done
    [ -n "$fd" ] || fail "the server has no descriptor for the data file"
    for t in /proc/"$pid"/task/*; do tasks+=(-p "${t##*/}"); done
    strace -qq -f -e trace=fdatasync -o "$dir/trace" "${tasks[@]}" &
    local spid=$!
    sleep 1
    nbd_do "nbd+unix:///?socket=$dir/sock" 'h.pwrite(b"\x42" * 65536, 1 << 20); h.flush()'
    sleep 0.5
    kill "$spid"; wait "$spid" 2>/dev/null || true
    stop_server "$pid"
    grep -q "fdatasync($fd)" "$dir/trace" ||
        { cat "$dir/trace" >&2; fail "the data file (fd $fd) was not synced by a flush"; }
    echo "ok: a flush syncs the data file"
}
run_case synced

# check -r all leaves a data file's entries as QEMU has them (COPIED, no
# refcount): qemu-img check stays clean.
repair() {
    local dir=$TMP/repair out
    mkdir -p "$dir"
    (cd "$dir" && qemu-img create -q -f qcow2 -o data_file=d.raw img.qcow2 64M &&
         qemu-io -f qcow2 -c 'write -P 0x33 0 1M' img.qcow2 >/dev/null)
    out=$("$top_builddir/tools/qcow2reclaim" check -r all "$dir/img.qcow2" 2>&1) ||
        { echo "$out" >&2; fail "qcow2reclaim check -r all on a data file image failed"; }
    out=$(cd "$dir" && qemu-img check img.qcow2 2>&1) ||
        { echo "$out" >&2; fail "qemu-img check after check -r all on a data file image"; }
    echo "ok: check -r all keeps a data file image clean"
}
run_case repair

[ "$FAILED" -eq 0 ] || fail "$FAILED case(s) failed"
