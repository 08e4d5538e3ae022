#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Seed corpus for tests/fuzz/fuzz-image: small but real qcow2 images in the
# shapes users have (made by qemu-img, so every field starts out valid), plus
# named regression images that damage one structure each, the way a bug or
# a hostile image would (made with tests/qcow2_patch.py).
#
#   tests/fuzz/make-corpus.sh OUT-DIR
#
# Every image stays at most ~256 KiB: the fuzzer runs with -max_len=262144
# and cuts longer inputs, which would drop the very tables that make a seed
# interesting.  That rules out data in 64 KiB-cluster images (an L2 table
# and one data cluster already take them past 256 KiB), so those seeds are
# empty images; the fuzz requests allocate in them.
#
# reg-backing-loop/ holds two images naming each other as backing file; it
# only means something as a folder, so test-fuzz.sh serves it from a copy.
set -eu
# The python3 for qcow2_patch.py and the helpers below (tests/functions.sh).
: "${PYTHON:=/usr/bin/python3}"

here=$(cd "$(dirname "$0")" && pwd)
PATCH=${PATCH:-$here/../qcow2_patch.py}
out=${1:?usage: make-corpus.sh OUT-DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/q2r-corpus.XXXXXX")
trap 'rm -rf "$work"' EXIT

COPIED=0x8000000000000000
COMPRESSED=0x4000000000000000
hex() { printf '0x%x' "$1"; }
q() { qemu-io -f qcow2 "$@" >/dev/null; }

# new NAME SIZE [qemu-img create options...]
new() {
    local name=$1 size=$2; shift 2
    qemu-img create -q -f qcow2 "$@" "$out/$name.qcow2" "$size"
}

# A spread of partial, whole and zeroed clusters, so that the fuzz requests
# start from mixed mappings; offsets fit any size from 256 KiB.
scatter() {
    q -c 'write -P 0x11 0 8k' -c 'write -P 0x22 5000 3000' \
      -c 'write -z 64k 16k' -c 'write -P 0x33 200k 4k' "$1"
}

# --- shapes ------------------------------------------------------------------
new v3-c4k 1M -o cluster_size=4096
scatter "$out/v3-c4k.qcow2"
new v2-c4k 1M -o cluster_size=4096,compat=0.10
scatter "$out/v2-c4k.qcow2"
# 512 B clusters: an L2 table covers 32 KiB, so 256 KiB needs 8 L1 entries.
new v3-c512 256K -o cluster_size=512
scatter "$out/v3-c512.qcow2"
new v2-c512 256K -o cluster_size=512,compat=0.10
scatter "$out/v2-c512.qcow2"
new v3-c64k 1M -o cluster_size=65536
# Extended L2 entries at the smallest cluster they allow: 512 B subclusters
# allocated, zeroed and unallocated side by side.
new v3-extl2-c16k 1M -o cluster_size=16384,extended_l2=on
scatter "$out/v3-extl2-c16k.qcow2"
new v2-c64k 1M -o cluster_size=65536,compat=0.10

# Refcount widths: sub-byte, the default 16 and the full 64 bits.
for bits in 1 64; do
    new "v3-c4k-rc$bits" 1M -o cluster_size=4096,refcount_bits=$bits
    scatter "$out/v3-c4k-rc$bits.qcow2"
done
new v3-c512-rc1 256K -o cluster_size=512,refcount_bits=1
scatter "$out/v3-c512-rc1.qcow2"
# 64-bit counts in 512 B blocks: a refcount block covers only 32 KiB of the
# file, so the first few allocations already need new refcount blocks.
new v3-c512-rc64 256K -o cluster_size=512,refcount_bits=64
scatter "$out/v3-c512-rc64.qcow2"
# Many small L2 tables (each maps 32 KiB): requests spread over them
# overflow the fuzz target's 16-table cache, so eviction writes back.
new v3-c512-spread 64M -o cluster_size=512
args=()
for i in $(seq 0 47); do args+=(-c "write -P $((i + 1)) $((i * 1331 * 1024)) 512"); done
q "${args[@]}" "$out/v3-c512-spread.qcow2"

# Compressed clusters: deflate and zstd, from compressible and random data.
raw=$work/data.raw
"$PYTHON" - "$raw" <<'EOF'
import os, sys
with open(sys.argv[1], "wb") as f:
    for i in range(32):
        f.write(bytes([i]) * 2048 + os.urandom(64) + bytes(2048 - 64))
    f.write(os.urandom(8192))
EOF
qemu-img convert -c -f raw -O qcow2 -o cluster_size=4096 "$raw" "$out/compressed-zlib.qcow2"
qemu-img convert -c -f raw -O qcow2 -o cluster_size=4096,compression_type=zstd \
    "$raw" "$out/compressed-zstd.qcow2"
qemu-img convert -c -f raw -O qcow2 -o cluster_size=512 "$raw" "$out/compressed-c512.qcow2"
qemu-img convert -c -f raw -O qcow2 -o cluster_size=4096,compat=0.10 "$raw" \
    "$out/compressed-v2.qcow2"

# Internal snapshots: shared clusters (refcount 2, no COPIED), then a
# rewrite so that some are no longer shared.
for v in v3 v2; do
    opt=cluster_size=4096
    [ "$v" = v2 ] && opt=$opt,compat=0.10
    new "snapshot-$v" 1M -o "$opt"
    scatter "$out/snapshot-$v.qcow2"
    qemu-img snapshot -c snap1 "$out/snapshot-$v.qcow2"
    q -c 'write -P 0x44 0 4k' -c 'write -P 0x55 300k 8k' "$out/snapshot-$v.qcow2"
done

# Backing file names: data first, then the name, since qemu-io cannot
# open an image whose backing file is missing.  "image.qcow2" is the name
# the fuzz target gives its own file: a backing chain that loops at once.
for b in abs:/nonexistent/q2r-missing-base.qcow2 rel:missing-base.qcow2 self:image.qcow2; do
    name=backing-${b%%:*}
    new "$name" 1M -o cluster_size=4096
    q -c 'write -P 0x66 0 4k' "$out/$name.qcow2"
    qemu-img rebase -u -f qcow2 -b "${b#*:}" -F qcow2 "$out/$name.qcow2"
done
new backing-raw 1M -o cluster_size=4096
q -c 'write -P 0x66 0 4k' "$out/backing-raw.qcow2"
qemu-img rebase -u -f qcow2 -b missing-base.raw -F raw "$out/backing-raw.qcow2"

# Header features the engine must refuse or clear before writing.
new lazy-dirty 1M -o cluster_size=4096,lazy_refcounts=on
scatter "$out/lazy-dirty.qcow2"
"$PYTHON" "$PATCH" set-bit "$out/lazy-dirty.qcow2" incompatible_features 0
new bitmap 1M -o cluster_size=4096
scatter "$out/bitmap.qcow2"
qemu-img bitmap --add "$out/bitmap.qcow2" b0
new prealloc-metadata 128K -o cluster_size=4096,preallocation=metadata

# --- regression images ---------------------------------------------------------
# 4 MiB at 4 KiB clusters: two L2 tables (each maps 2 MiB), both in use.
base=$work/two-l2.qcow2
qemu-img create -q -f qcow2 -o cluster_size=4096 "$base" 4M
q -c 'write -P 0x11 0 8k' -c 'write -P 0x22 2M 8k' "$base"

# Two L1 entries sharing one L2 table: a write through one changes the
# other's data, and freeing the table through one leaves the other dangling.
cp "$base" "$out/reg-l2-loop.qcow2"
"$PYTHON" "$PATCH" l1 "$out/reg-l2-loop.qcow2" 1 "$("$PYTHON" "$PATCH" l1 "$base" 0)" >/dev/null

# The L1 table on top of the refcount table: every table write corrupts
# the other.
cp "$base" "$out/reg-l1-overlaps-reftable.qcow2"
"$PYTHON" "$PATCH" set-header "$out/reg-l1-overlaps-reftable.qcow2" l1_table_offset \
    "$("$PYTHON" "$PATCH" header "$base" refcount_table_offset)"

# A data cluster that is the L1 table: an in-place guest write would
# overwrite the L1 table (COPIED says "write in place").
cp "$base" "$out/reg-l2-entry-at-l1.qcow2"
"$PYTHON" "$PATCH" l2 "$out/reg-l2-entry-at-l1.qcow2" 0 \
    "$(hex $((COPIED | $("$PYTHON" "$PATCH" header "$base" l1_table_offset))))" >/dev/null

# Table sizes that would make the engine allocate gigabytes if believed.
cp "$base" "$out/reg-giant-l1-size.qcow2"
"$PYTHON" "$PATCH" set-header "$out/reg-giant-l1-size.qcow2" l1_size 0xffffffff
cp "$base" "$out/reg-l1-size-at-limit.qcow2"
"$PYTHON" "$PATCH" set-header "$out/reg-l1-size-at-limit.qcow2" l1_size 4194304
cp "$base" "$out/reg-giant-reftable.qcow2"
"$PYTHON" "$PATCH" set-header "$out/reg-giant-reftable.qcow2" refcount_table_clusters 0xffffffff

# A compressed cluster whose stored length runs past the end of the file:
# the last compressed cluster gets the largest sector count, and the file
# is cut just after its first bytes (dropping the random clusters stored
# uncompressed behind it: their entries then point past the end, too).
img=$out/reg-compressed-past-eof.qcow2
cp "$out/compressed-zlib.qcow2" "$img"
last=$((31 * 4096))     # the last compressible cluster of data.raw
entry=$("$PYTHON" "$PATCH" l2 "$img" "$last" --json)
hostoff=$("$PYTHON" -c 'import json,sys; e=json.loads(sys.argv[1]); assert e["type"]=="compressed", e; print(e["host_offset"])' "$entry")
cbits=$("$PYTHON" "$PATCH" header "$img" cluster_bits)
shift_=$((62 - (cbits - 8)))
mask=$(( (1 << (cbits - 8)) - 1 ))
"$PYTHON" "$PATCH" l2 "$img" "$last" "$(hex $((COMPRESSED | (mask << shift_) | hostoff)))" >/dev/null
"$PYTHON" "$PATCH" truncate "$img" $((hostoff + 16))

# a.qcow2 -> b.qcow2 -> a.qcow2: opening must stop with a message, not
# recurse until the stack or the file descriptors run out.
loop=$out/reg-backing-loop
mkdir -p "$loop"
for n in a b; do
    qemu-img create -q -f qcow2 -o cluster_size=4096 "$loop/$n.qcow2" 1M
    q -c "write -P 0x77 0 4k" "$loop/$n.qcow2"
done
qemu-img rebase -u -f qcow2 -b b.qcow2 -F qcow2 "$loop/a.qcow2"
qemu-img rebase -u -f qcow2 -b a.qcow2 -F qcow2 "$loop/b.qcow2"

# The limit is the point of the corpus: fail loudly rather than seed the
# fuzzer with inputs it will cut.
big=$(find "$out" -type f -size +264k)
[ -z "$big" ] || { echo "make-corpus.sh: images over 264 KiB: $big" >&2; exit 1; }
echo "make-corpus.sh: $(find "$out" -type f | wc -l) images in $out"
