#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Images the plugin must refuse before it serves anything: opening them
# read-write (or at all) would either return wrong data or damage them;
# and parameters it cannot honour.  Each
# refusal must say why in words a user can act on, and must leave the image
# untouched.  The corrupt and dirty bits only forbid writing, so those images
# must still be readable with readonly=true.
set -eu
: "${srcdir:=$(cd "$(dirname "$0")" && pwd)}"
. "$srcdir/functions.sh"

requires nbdkit --version
requires qemu-img --version
requires qemu-io --version
requires "$PYTHON" -c 'import nbd'

PATCH=$srcdir/qcow2_patch.py

# expect_refused DESCRIPTION NBDKIT-PARAMS... -- PHRASE...
# nbdkit must exit non-zero without ever creating its socket, and its stderr
# must contain every phrase (case-insensitive).
expect_refused() {
    local desc=$1; shift
    local params=()
    while [ "$1" != -- ]; do params+=("$1"); shift; done
    shift

    local sock=$TMP/refuse.sock err=$TMP/refuse.err img='' sum_before='' p
    for p in "${params[@]}"; do
        case $p in file=*) img=${p#file=} ;; esac
    done
    [ -f "$img" ] && sum_before=$(md5sum <"$img")

    rm -f "$sock"
    timeout 20 nbdkit -f -U "$sock" "$PLUGIN" "${params[@]}" >/dev/null 2>"$err" &
    local pid=$!
    track_pid "$pid"
    # Poll rather than wait, so a plugin that wrongly serves is caught as
    # soon as the socket appears instead of after the 20 s timeout.
    while kill -0 "$pid" 2>/dev/null; do
        if [ -S "$sock" ]; then
            stop_server "$pid"
            cat "$err" >&2
            fail "$desc: nbdkit served the image instead of refusing it"
        fi
        sleep 0.02
    done
    local rc=0
    wait "$pid" || rc=$?
    forget_server "$pid"
    if [ "$rc" -eq 0 ]; then
        cat "$err" >&2; fail "$desc: nbdkit exited with status 0"
    fi
    if [ "$rc" -eq 124 ]; then
        cat "$err" >&2; fail "$desc: nbdkit hung for 20 s without serving or exiting"
    fi
    for p in "$@"; do
        if ! grep -qiF -- "$p" "$err"; then
            cat "$err" >&2
            fail "$desc: the error message does not contain \"$p\""
        fi
    done
    if [ -n "$sum_before" ] && [ "$(md5sum <"$img")" != "$sum_before" ]; then
        fail "$desc: the refused image was modified"
    fi
    echo "ok: $desc: $(grep -iF -m1 -- "$1" "$err")"
}

# expect_readonly_serves DESCRIPTION IMAGE BYTE: with readonly=true the image
# must be served, read correctly, and come out byte-for-byte unchanged.
expect_readonly_serves() {
    local desc=$1 img=$2 byte=$3
    local sum_before sock=$TMP/ro.sock log=$TMP/ro.log
    sum_before=$(md5sum <"$img")
    start_server "$sock" "$log" file="$img" readonly=true
    if ! timeout 20 "$PYTHON" -m nbd -u "nbd+unix:///?socket=$sock" -c "
import sys
b = h.pread(512, 0)
sys.exit(0 if b == bytes([$byte]) * 512 else 1)
"; then
        stop_server "$LAST_SERVER_PID"
        cat "$log" >&2
        fail "$desc: reading the first sector read-only failed or returned wrong data"
    fi
    stop_server "$LAST_SERVER_PID"
    [ "$(md5sum <"$img")" = "$sum_before" ] ||
        fail "$desc: serving read-only modified the image"
    echo "ok: $desc: served read-only, first sector correct, image unchanged"
}

# expect_serves DESCRIPTION NBDKIT-PARAMS...: the parameters are taken, and
# the image served (the first sector of good.qcow2 reads back).
expect_serves() {
    local desc=$1 sock=$TMP/serves.sock log=$TMP/serves.log; shift
    start_server "$sock" "$log" "$@"
    if ! timeout 20 "$PYTHON" -m nbd -u "nbd+unix:///?socket=$sock" -c "
import sys
sys.exit(0 if h.pread(512, 0) == bytes([0x5a]) * 512 else 1)
"; then
        stop_server "$LAST_SERVER_PID"
        cat "$log" >&2
        fail "$desc: reading the first sector failed or returned wrong data"
    fi
    stop_server "$LAST_SERVER_PID"
    echo "ok: $desc: served with $*"
}

# A small qcow2 with a known first sector, the base of the patched cases.
new_image() {
    qemu-img create -q -f qcow2 "$@"
}
new_image "$TMP/good.qcow2" 16M
qemu-io -c 'write -P 0x5a 0 64k' -c 'write -P 0x22 8M 64k' "$TMP/good.qcow2" >/dev/null

# --- Not qcow2 at all -------------------------------------------------------
qemu-img create -q -f raw "$TMP/raw.img" 1M
run_case expect_refused "raw image" file="$TMP/raw.img" -- "not a qcow2 image"

head -c 1M /dev/urandom >"$TMP/random.img"
run_case expect_refused "random bytes" file="$TMP/random.img" -- "not a qcow2 image"

# --- Header values we cannot honour ------------------------------------------
cp "$TMP/good.qcow2" "$TMP/v4.qcow2"
"$PYTHON" "$PATCH" set-header "$TMP/v4.qcow2" version 4
run_case expect_refused "version 4 header" file="$TMP/v4.qcow2" -- "version"

# A short iter-time keeps LUKS creation from spending 2 s in PBKDF.  Too
# short (10 ms) and QEMU's PBKDF calibration fails on a loaded machine
# ("Unable to get accurate CPU usage"), so 100 ms, and one more try.
luks() {
    qemu-img create -q -f qcow2 --object secret,id=sec0,data=123456 \
        -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100 \
        "$TMP/luks.qcow2" 16M
}
luks || luks
run_case expect_refused "LUKS encrypted image without a passphrase" file="$TMP/luks.qcow2" \
    -- "encrypted" "passphrase="

# QEMU no longer creates AES images, but old ones exist; the header field
# alone must be enough to refuse.
cp "$TMP/good.qcow2" "$TMP/aes.qcow2"
"$PYTHON" "$PATCH" set-header "$TMP/aes.qcow2" crypt_method 1
run_case expect_refused "AES encrypted image (crypt_method 1)" file="$TMP/aes.qcow2" \
    -- "legacy AES encryption" "not supported"

cp "$TMP/good.qcow2" "$TMP/unknown.qcow2"
"$PYTHON" "$PATCH" set-bit "$TMP/unknown.qcow2" incompatible_features 10
run_case expect_refused "unknown incompatible bit 10" file="$TMP/unknown.qcow2" \
    -- "unknown incompatible feature"

# Extended L2 entries are served (test-subclusters.sh), also with an
# external data file, raw or not (test-data-file.sh), but not with
# subclusters under 512 bytes, which QEMU never creates.
new_image -o cluster_size=4096 "$TMP/extl2.qcow2" 16M
"$PYTHON" "$PATCH" set-bit "$TMP/extl2.qcow2" incompatible_features 4
run_case expect_refused "extended L2 entries with 4 KiB clusters" file="$TMP/extl2.qcow2" \
    -- "extended L2" "at least 16 KiB"
for raw in off on; do
    new_image -o extended_l2=on,cluster_size=65536,data_file="$TMP/extl2-$raw.raw" \
        -o data_file_raw=$raw "$TMP/extl2df-$raw.qcow2" 16M
    qemu-io -c 'write -P 0x5a 0 4k' "$TMP/extl2df-$raw.qcow2" >/dev/null
    run_case expect_serves "extended L2 entries with a data file, data_file_raw=$raw" \
        file="$TMP/extl2df-$raw.qcow2"
done

# External data files are served (test-data-file.sh); what stays refused:
# snapshots need refcounts a data file has none of, a raw data file cannot
# read as the disk where a backing file shows through (QEMU refuses both),
# and a data file that is not there.
new_image -o data_file="$TMP/ext.raw" "$TMP/datafile.qcow2" 16M
cp "$TMP/datafile.qcow2" "$TMP/datasnap.qcow2"
"$PYTHON" "$PATCH" set-header "$TMP/datasnap.qcow2" nb_snapshots 1
run_case expect_refused "external data file with a snapshot" file="$TMP/datasnap.qcow2" \
    -- "internal snapshots and an external data file"
# qemu-img creates no such image: a data file with a backing file, then
# the data_file_raw bit (autoclear bit 1) set by hand.
qemu-img create -q -f qcow2 -o data_file="$TMP/extraw.raw" -b "$TMP/good.qcow2" -F qcow2 \
    "$TMP/dataraw.qcow2" 16M
"$PYTHON" "$PATCH" set-bit "$TMP/dataraw.qcow2" autoclear_features 1
run_case expect_refused "raw data file with a backing file" file="$TMP/dataraw.qcow2" \
    -- "data_file_raw" "backing file"
mv "$TMP/ext.raw" "$TMP/ext-moved.raw"
run_case expect_refused "external data file missing" file="$TMP/datafile.qcow2" \
    -- "cannot open its external data file"

# --- Corrupt: refuse to write, still readable; dirty, read-only ----------------
cp "$TMP/good.qcow2" "$TMP/corrupt.qcow2"
"$PYTHON" "$PATCH" set-bit "$TMP/corrupt.qcow2" incompatible_features 1
run_case expect_refused "corrupt bit" file="$TMP/corrupt.qcow2" -- "corrupt"
run_case expect_readonly_serves "corrupt bit, readonly=true" "$TMP/corrupt.qcow2" 0x5a

# The dirty bit only means something with lazy refcounts: the refcounts on
# disk may be too low.  Writing, the plugin rebuilds them first
# (test-lazy-refcounts.sh); read-only, it leaves the image as it is.
new_image -o lazy_refcounts=on "$TMP/dirty.qcow2" 16M
qemu-io -c 'write -P 0x5a 0 64k' "$TMP/dirty.qcow2" >/dev/null
"$PYTHON" "$PATCH" set-bit "$TMP/dirty.qcow2" incompatible_features 0
run_case expect_readonly_serves "dirty bit, readonly=true" "$TMP/dirty.qcow2" 0x5a

# --- Tables cut short ------------------------------------------------------------
# 4 GiB virtual gives an 8-entry L1 table, so the cut lands inside it.
new_image "$TMP/trunc-l1.qcow2" 4G
qemu-io -c 'write -P 0x11 0 1M' -c 'write -P 0x22 3G 1M' "$TMP/trunc-l1.qcow2" >/dev/null
l1_off=$("$PYTHON" "$PATCH" header "$TMP/trunc-l1.qcow2" l1_table_offset)
"$PYTHON" "$PATCH" truncate "$TMP/trunc-l1.qcow2" $((l1_off + 12))
run_case expect_refused "file truncated inside the L1 table" file="$TMP/trunc-l1.qcow2" -- "truncated"

# QEMU puts the refcount table before the L1 table, so cutting it in place
# would cut the L1 table too.  Move it to the end of the file first, so the
# only thing wrong is the refcount table itself.
cp "$TMP/good.qcow2" "$TMP/trunc-rt.qcow2"
rt_off=$("$PYTHON" "$PATCH" header "$TMP/trunc-rt.qcow2" refcount_table_offset)
rt_clusters=$("$PYTHON" "$PATCH" header "$TMP/trunc-rt.qcow2" refcount_table_clusters)
csize=$("$PYTHON" "$PATCH" header "$TMP/trunc-rt.qcow2" cluster_size)
fsize=$(stat -c %s "$TMP/trunc-rt.qcow2")
new_rt=$(( (fsize + csize - 1) / csize * csize ))
dd if="$TMP/trunc-rt.qcow2" of="$TMP/trunc-rt.qcow2" bs="$csize" conv=notrunc status=none \
    skip=$((rt_off / csize)) seek=$((new_rt / csize)) count="$rt_clusters"
"$PYTHON" "$PATCH" set-header "$TMP/trunc-rt.qcow2" refcount_table_offset "$new_rt"
"$PYTHON" "$PATCH" truncate "$TMP/trunc-rt.qcow2" $((new_rt + 12))
run_case expect_refused "file truncated inside the refcount table" file="$TMP/trunc-rt.qcow2" -- "truncated"

# --- Files that are not there ---------------------------------------------------
run_case expect_refused "missing image file" file="$TMP/no-such-image.qcow2" \
    -- "file=$TMP/no-such-image.qcow2: No such file"
run_case expect_refused "missing backing= file" file="$TMP/good.qcow2" \
    backing="$TMP/no-such-backing.qcow2" -- "backing=$TMP/no-such-backing.qcow2: No such file"

new_image "$TMP/base.qcow2" 16M
new_image -b "$TMP/base.qcow2" -F qcow2 "$TMP/overlay.qcow2"
run_case expect_refused "backing file with backing=none" file="$TMP/overlay.qcow2" backing=none \
    -- "backing file"

run_case expect_refused "backing= on an image without a backing file" file="$TMP/good.qcow2" \
    backing="$TMP/base.qcow2" -- "good.qcow2: the image has no backing file, so backing=$TMP/base.qcow2"

new_image "$TMP/gone-base-q2r.qcow2" 16M
new_image -b "$TMP/gone-base-q2r.qcow2" -F qcow2 "$TMP/orphan.qcow2"
rm "$TMP/gone-base-q2r.qcow2"
run_case expect_refused "missing backing file" file="$TMP/orphan.qcow2" \
    -- "orphan.qcow2: cannot open its backing file $TMP/gone-base-q2r.qcow2: No such file"

# --- Parameter values, each named in its refusal -------------------------------
run_case expect_refused "cache-size not a size" file="$TMP/good.qcow2" cache-size=abc \
    -- "cache-size=abc: not a size"
run_case expect_refused "compact-rate with an unknown suffix" file="$TMP/good.qcow2" \
    compact-rate=1X -- "compact-rate=1X: not a size"
run_case expect_refused "cache-size too large" file="$TMP/good.qcow2" \
    cache-size=99999999999999E -- "cache-size=99999999999999E: too large"
run_case expect_refused "readonly not a boolean" file="$TMP/good.qcow2" readonly=maybe \
    -- "readonly=maybe: expected true or false"

# Given twice, the last one would win without a word.
run_case expect_refused "file= given twice" file="$TMP/good.qcow2" file="$TMP/raw.img" \
    -- "file=$TMP/raw.img: file= is given twice"
mkdir "$TMP/images"
run_case expect_refused "dir= given twice" dir="$TMP/images" dir="$TMP" \
    -- "dir=$TMP: dir= is given twice"
run_case expect_refused "cache-size= given twice" file="$TMP/good.qcow2" cache-size=8M \
    cache-size=64M -- "cache-size=64M: cache-size= is given twice"

# Sizes as users type them: nbdkit 1.32's own parser refuses 64MiB.
run_case expect_serves "sizes 64M, 64MiB, 1G" file="$TMP/good.qcow2" cache-size=64MiB \
    compact-rate=1G
run_case expect_serves "sizes 1GiB, 64M" file="$TMP/good.qcow2" cache-size=64M \
    compact-rate=1GiB

# --- statsfile= that cannot be written ------------------------------------------
# Refused at start, with the parameter named, instead of a server whose
# counters never appear.
mkdir "$TMP/stats-folder"
run_case expect_refused "statsfile in a missing folder" file="$TMP/good.qcow2" \
    statsfile="$TMP/no-such-folder/disk.stats" -- "statsfile=" "no-such-folder"
run_case expect_refused "statsfile naming a folder" file="$TMP/good.qcow2" \
    statsfile="$TMP/stats-folder" -- "statsfile=" "folder"
run_case expect_refused "statsfile under a file" file="$TMP/good.qcow2" \
    statsfile="$TMP/good.qcow2/disk.stats" -- "statsfile=" "not a folder"

[ "$FAILED" -eq 0 ] || fail "$FAILED case(s) failed"
