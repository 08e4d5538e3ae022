#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# LUKS-encrypted images (qemu-img create -o encrypt.format=luks), served
# with passphrase=: a seeded random workload of writes, reads, trims and
# zeroes at any alignment, mirrored into a raw reference that QEMU must
# then read back from the image (with the key); qemu-img check clean; no
# guest data in clear text in the file.  The passphrase as nbdkit reads
# secrets (SECRET, +FILE, -FD); a wrong one, or none, refused with a
# sentence; trims give host space back; compaction (the tool, and
# compact=auto) re-encrypts what it moves so that QEMU still reads it;
# qcow2reclaim info and check need no key.
set -eu
: "${srcdir:=$(cd "$(dirname "$0")" && pwd)}"
. "$srcdir/functions.sh"

requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires "$PYTHON" -c 'import nbd'

TOOL=${top_builddir:-$srcdir/..}/tools/qcow2reclaim
PASS=correct-horse-battery
printf '%s\n' "$PASS" >"$TMP/pass"
# QEMU takes a secret file byte for byte; nbdkit (and the tool) drop its
# final newline.
SECRET=(--object "secret,id=s0,data=$PASS")
FAILED=0
# Clear text that must never reach the host file.
CANARY=QCOW2RECLAIM-LUKS-CLEARTEXT-CANARY

opts() { echo "driver=qcow2,file.filename=$1,encrypt.key-secret=s0"; }

# QEMU's PBKDF calibration can fail at a short iter-time on a loaded
# machine ("Unable to get accurate CPU usage"), twice in a row in one CI
# run, where the case then ended without a word: up to five tries, a
# second apart, and a failure that says what it was.
luks_create() {
    local img=$1 size=$2 try; shift 2
    local o=encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100
    for try in 1 2 3 4 5; do
        qemu-img create -q -f qcow2 "${SECRET[@]}" -o "$o" "$@" "$img" "$size" && return 0
        [ "$try" -eq 5 ] || sleep 1
    done
    fail "qemu-img could not create the encrypted image $img in five tries"
}

to_raw() { qemu-img convert "${SECRET[@]}" --image-opts "$(opts "$1")" -O raw "$2"; }

qio() {
    local img=$1 out c; shift
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    out=$(qemu-io "${SECRET[@]}" "${args[@]}" --image-opts "$(opts "$img")" 2>&1) ||
        { echo "$out" >&2; fail "qemu-io on $img failed"; }
    if echo "$out" | grep -q -e 'failed' -e 'error'; then
        echo "$out" >&2; fail "qemu-io on $img reported a failure"
    fi
}

check_luks_clean() {
    local out
    out=$(qemu-img check "${SECRET[@]}" --image-opts "$(opts "$1")" 2>&1) ||
        { echo "$out" >&2; fail "qemu-img check $1 is not clean"; }
}

no_cleartext() {
    if grep -q "$CANARY" "$1"; then
        fail "$1 holds guest data in clear text"
    fi
}

# write_canary SOCK OFFSET LEN: the canary, repeated, at OFFSET (any alignment).
write_canary() {
    "$PYTHON" - "$1" "$2" "$3" "$CANARY" <<'EOF'
import sys, nbd
sock, off, n, canary = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
h = nbd.NBD()
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
h.connect_unix(sock)
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512, h.get_block_size(nbd.SIZE_MINIMUM)
h.pwrite((canary * (n // len(canary) + 1))[:n], off)
h.flush()
h.shutdown()
EOF
}

stat_of() { sed -n "s/^$2=//p" "$1"; }

# --- Random requests, against a reference and then QEMU ----------------------
# case_differential NAME [CREATE-OPTIONS...]: v3; extended L2 entries, whose
# subclusters are read, written and copied through the cipher too; and v2, which has no zero
# flag, so that whole-cluster write-zeroes there write encrypted zeros.
case_differential() {
    local name=$1; shift
    local img=$TMP/diff.qcow2 sock=$TMP/diff.sock rc=0 out
    rm -f "$img"
    luks_create "$img" 64M "$@"
    qio "$img" 'write -P 0x11 0 1M' 'write -P 0x22 5243392 300K' 'write -P 0x33 20M 4M' \
        'write -z 21M 1M' 'discard 23M 512K' 'write -P 0x66 63M 1M'
    to_raw "$img" "$TMP/ref.raw"
    start_server "$sock" "$TMP/diff.log" file="$img" passphrase="$PASS"
    local pid=$LAST_SERVER_PID
    out=$("$PYTHON" "$srcdir/nbd_random_ops.py" --uri "nbd+unix:///?socket=$sock" \
            --ref "$TMP/ref.raw" --seed 1414 --ops "${OPS:-1500}" --unaligned \
            --ops-mix write,read,flush,zero,trim,fastzero --trim-zero-clusters \
            --verify-all 2>&1) || rc=$?
    write_canary "$sock" 40000001 300000
    stop_server "$pid"
    [ $rc -eq 0 ] || { echo "$out" >&2; tail -n 30 "$TMP/diff.log" >&2; fail "the workload failed (exit $rc)"; }
    ! log_errors "$TMP/diff.log" || fail "the server logged errors"
    "$PYTHON" - "$TMP/ref.raw" 40000001 300000 "$CANARY" <<'EOF'
import sys
ref, off, n, canary = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
with open(ref, "r+b") as f:
    f.seek(off)
    f.write((canary * (n // len(canary) + 1))[:n])
EOF
    to_raw "$img" "$TMP/out.raw"
    cmp "$TMP/ref.raw" "$TMP/out.raw" >&2 || fail "QEMU reads the image differently from what NBD returned"
    check_luks_clean "$img"
    grep -q "$CANARY" "$TMP/out.raw" || fail "the canary is not in the guest's data"
    no_cleartext "$img"
    echo "ok: $name: random requests: QEMU reads what was served, check clean, no clear text"
    echo "$out" | sed -n 's/^nbd_random_ops: /    /p' | tail -n 1
}

# --- The passphrase, as nbdkit users give secrets ----------------------------
expect_refused() {
    local desc=$1 img=$2 phrase=$3; shift 3
    local sum rc=0
    sum=$(md5sum <"$img")
    timeout 60 nbdkit -f -U "$TMP/refused.sock" "$PLUGIN" file="$img" "$@" \
        >/dev/null 2>"$TMP/refused.err" || rc=$?
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || { cat "$TMP/refused.err" >&2; fail "$desc: not refused (exit $rc)"; }
    grep -qF -- "$phrase" "$TMP/refused.err" ||
        { cat "$TMP/refused.err" >&2; fail "$desc: the refusal does not say '$phrase'"; }
    grep -qF -- "$img" "$TMP/refused.err" ||
        { cat "$TMP/refused.err" >&2; fail "$desc: the refusal does not name the image"; }
    [ "$(md5sum <"$img")" = "$sum" ] || fail "$desc: the image changed"
    echo "ok: $desc: $(grep -F -- "$phrase" "$TMP/refused.err" | head -n 1)"
}

case_passphrase_forms() {
    local img=$TMP/forms.qcow2 sock=$TMP/forms.sock
    luks_create "$img" 16M
    expect_refused "a wrong passphrase" "$img" "no key slot accepts the passphrase" \
        passphrase=wrong
    expect_refused "no passphrase" "$img" "passphrase=" readonly=true
    qemu-img create -q -f qcow2 "$TMP/base.qcow2" 16M
    luks_create "$TMP/over.qcow2" 16M -b "$TMP/base.qcow2" -F qcow2
    expect_refused "an encrypted image with a backing file" "$TMP/over.qcow2" \
        "is encrypted and has a backing file; that is not supported" passphrase="$PASS"

    start_server "$sock" "$TMP/forms.log" file="$img" passphrase=+"$TMP/pass"
    write_canary "$sock" 1000 70000
    stop_server "$LAST_SERVER_PID"
    echo "ok: passphrase=+FILE"
    start_server "$sock" "$TMP/forms.log" file="$img" passphrase=-3 readonly=true 3<"$TMP/pass"
    "$PYTHON" - "$sock" "$CANARY" <<'EOF'
import sys, nbd
h = nbd.NBD()
h.connect_unix(sys.argv[1])
canary = sys.argv[2].encode()
got = h.pread(71680, 512)[1000 - 512:1000 - 512 + 70000]
assert got == (canary * (70000 // len(canary) + 1))[:70000], "passphrase=-3 reads other bytes"
EOF
    stop_server "$LAST_SERVER_PID"
    echo "ok: passphrase=-FD (3<FILE) reads what passphrase=+FILE wrote"
    # passphrase=- asks on the terminal: script(1) gives nbdkit one.
    if command -v script >/dev/null 2>&1 && command -v nbdcopy >/dev/null 2>&1; then
        (sleep 1; printf '%s\n' "$PASS") |
            timeout 60 script -qec "nbdkit -f -U '$TMP/prompt.sock' '$PLUGIN' file='$img' \
                passphrase=- readonly=true --run 'nbdcopy \$uri $TMP/prompt.raw'" \
                /dev/null >"$TMP/prompt.log" 2>&1 ||
            { cat "$TMP/prompt.log" >&2; fail "passphrase=-: nbdkit or nbdcopy failed"; }
        to_raw "$img" "$TMP/forms.raw"
        cmp "$TMP/prompt.raw" "$TMP/forms.raw" >&2 || fail "passphrase=-: other bytes than QEMU reads"
        echo "ok: passphrase=- (typed on a terminal)"
    else
        echo "skipped: passphrase=- (needs script(1) and nbdcopy)"
    fi
    qio "$img" "read -P 0 0 1000"
    no_cleartext "$img"
}

# --- Trims give space back; compaction re-encrypts -------------------------
case_discard_and_compact() {
    local img=$TMP/reclaim.qcow2 sock=$TMP/reclaim.sock stats=$TMP/reclaim.stats
    local before after len
    luks_create "$img" 128M
    qio "$img" 'write -P 0x5a 0 48M' 'write -P 0x6b 60M 4M'
    before=$(stat -c %b "$img")
    start_server "$sock" "$TMP/reclaim.log" file="$img" passphrase="$PASS" \
        compact=off statsfile="$stats"
    "$PYTHON" -m nbd -u "nbd+unix:///?socket=$sock" -c 'h.trim(48 << 20, 0)' -c 'h.flush()'
    stop_server "$LAST_SERVER_PID"
    after=$(stat -c %b "$img")
    [ $((after * 512)) -lt $(((before * 512) - (44 << 20))) ] ||
        fail "a trim of 48 MiB gave back only $(((before - after) * 512)) bytes"
    echo "ok: a trim of 48 MiB on an encrypted image gave back $(((before - after) * 512 >> 20)) MiB"
    qio "$img" 'read -P 0 0 48M' 'read -P 0x6b 60M 4M'
    len=$(stat -c %s "$img")
    [ "$len" -gt $((50 << 20)) ] || fail "the data written last should still lie past 50 MiB of the file"

    to_raw "$img" "$TMP/before-compact.raw"
    "$TOOL" compact "$img" >/dev/null 2>"$TMP/compact.err" &&
        fail "compact without the passphrase did not refuse"
    grep -q "passphrase" "$TMP/compact.err" || { cat "$TMP/compact.err" >&2; fail "compact's refusal does not name the passphrase"; }
    "$TOOL" compact --passphrase-file="$TMP/pass" "$img" >/dev/null
    len=$(stat -c %s "$img")
    [ "$len" -lt $((12 << 20)) ] || fail "the tool's compaction left the file $len bytes long"
    to_raw "$img" "$TMP/after-compact.raw"
    cmp "$TMP/before-compact.raw" "$TMP/after-compact.raw" >&2 ||
        fail "QEMU reads other bytes after the tool's compaction"
    check_luks_clean "$img"
    echo "ok: qcow2reclaim compact --passphrase-file: file down to $((len >> 20)) MiB, same bytes"

    # compact=auto, in the server: 24 MiB written first and trimmed, the
    # 8 MiB written after them move down.
    img=$TMP/auto.qcow2
    luks_create "$img" 64M
    qio "$img" 'write -P 0x11 0 24M' 'write -P 0x7c 40M 8M'
    start_server "$sock" "$TMP/reclaim.log" file="$img" passphrase="$PASS" statsfile="$stats"
    "$PYTHON" -m nbd -u "nbd+unix:///?socket=$sock" -c 'h.trim(24 << 20, 0)' -c 'h.flush()'
    local i
    for i in $(seq 1 $((60 * SLOW))); do
        len=$(stat -c %s "$img")
        [ "$len" -gt $((14 << 20)) ] || break
        sleep 0.5
    done
    stop_server "$LAST_SERVER_PID"
    [ "$len" -le $((14 << 20)) ] || { cat "$stats" >&2; fail "compact=auto left the file $len bytes long"; }
    [ "$(stat_of "$stats" clusters_moved)" -gt 0 ] || fail "compact=auto moved nothing"
    qio "$img" 'read -P 0 0 24M' 'read -P 0x7c 40M 8M' 'read -P 0 48M 16M'
    check_luks_clean "$img"
    echo "ok: compact=auto moved $(stat_of "$stats" clusters_moved) clusters; QEMU reads them"
}

# --- dir=: the passphrase is kept for images opened later ---------------------
case_dir() {
    local d=$TMP/dir sock=$TMP/dir.sock
    mkdir -p "$d"
    luks_create "$d/enc.qcow2" 16M
    qemu-img create -q -f qcow2 "$d/plain.qcow2" 16M
    start_server "$sock" "$TMP/dir.log" dir="$d" passphrase=+"$TMP/pass"
    # Each connection opens its image and, as the last one, closes it: the
    # second round opens both again, after the first connections are gone.
    local round
    for round in 1 2; do
        "$PYTHON" - "$sock" "$round" "$CANARY" <<'EOF'
import sys, nbd
sock, rnd, canary = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
for name in ("enc.qcow2", "plain.qcow2"):
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    if rnd == 1:
        h.pwrite((canary * 300)[:8192], 65536)
        h.flush()
    else:
        assert h.pread(8192, 65536) == (canary * 300)[:8192], name
    h.shutdown()
EOF
    done
    stop_server "$LAST_SERVER_PID"
    ! log_errors "$TMP/dir.log" || fail "dir=: the server logged errors"
    no_cleartext "$d/enc.qcow2"
    grep -q "$CANARY" "$d/plain.qcow2" || fail "dir=: the plain image should hold the canary"
    qio "$d/enc.qcow2" "read -P 0 0 65536"
    check_luks_clean "$d/enc.qcow2"
    echo "ok: dir=: an encrypted image opens again with the kept passphrase, next to a plain one"
}

# --- Partial trims punch nothing; the tool needs no key ------------------------
case_partial_and_tool() {
    local img=$TMP/partial.qcow2 sock=$TMP/partial.sock stats=$TMP/partial.stats
    luks_create "$img" 16M
    qio "$img" 'write -P 0x3c 0 1M'
    start_server "$sock" "$TMP/partial.log" file="$img" passphrase="$PASS" statsfile="$stats"
    "$PYTHON" -m nbd -u "nbd+unix:///?socket=$sock" -c 'h.trim(16384, 4096)' -c 'h.zero(61440, 8192)' -c 'h.flush()'
    stop_server "$LAST_SERVER_PID"
    # The trim, and the write-zeroes (MAY_TRIM, nbdsh's default): 16 + 60 KiB.
    [ "$(stat_of "$stats" not_freed_encrypted)" = 77824 ] ||
        { cat "$stats" >&2; fail "partial trims of an encrypted image: not_freed_encrypted is not 77824"; }
    qio "$img" 'read -P 0x3c 0 8192' 'read -P 0 8192 61440' 'read -P 0x3c 69632 978944'
    echo "ok: a partial trim punches nothing (not_freed_encrypted=77824); partial zeroes read zeros"

    "$TOOL" info "$img" >"$TMP/info.out"
    grep -q '^encrypted: yes' "$TMP/info.out" && grep -q 'format: luks' "$TMP/info.out" ||
        { cat "$TMP/info.out" >&2; fail "qcow2reclaim info does not say the image is encrypted"; }
    "$TOOL" check "$img" >"$TMP/check.out" ||
        { cat "$TMP/check.out" >&2; fail "qcow2reclaim check without the key is not clean"; }
    grep -q "No errors were found" "$TMP/check.out" || fail "check without the key found errors"
    # Not even the LUKS header is read: with its magic gone, check is as clean.
    cp "$img" "$TMP/nomagic.qcow2"
    [ "$(dd if="$img" bs=1 skip=$((0x40000)) count=4 status=none)" = LUKS ] ||
        fail "the LUKS header is not where qemu-img puts it at 64 KiB clusters (0x40000)"
    printf 'XXXXXX' | dd of="$TMP/nomagic.qcow2" bs=1 seek=$((0x40000)) conv=notrunc status=none
    "$TOOL" check "$TMP/nomagic.qcow2" >"$TMP/check.out" ||
        { cat "$TMP/check.out" >&2; fail "check reads the LUKS header"; }
    expect_refused "a LUKS header without its magic" "$TMP/nomagic.qcow2" \
        "is not a LUKS1 header" passphrase="$PASS"
    echo "ok: qcow2reclaim info and check need no key, nor a LUKS header"
}

run_case case_differential v3
run_case case_differential v2 -o compat=0.10
run_case case_differential extl2 -o extended_l2=on,cluster_size=128k
run_case case_dir
run_case case_passphrase_forms
run_case case_discard_and_compact
run_case case_partial_and_tool
[ "$FAILED" -eq 0 ] || fail "$FAILED case(s) failed"
echo "test-luks: all cases passed"
