#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# dir=DIR: one server for a folder of 20 images, the export name choosing
# the image.  Checked here, all against one running nbdkit:
# - the list (NBD_OPT_LIST, nbdinfo --list) is the folder's regular files,
#   without dot files, folders or FIFOs;
# - random writes, trims and zeroes on six images at once while two
#   connections share a seventh (multi-conn: what one writes, a flush and a
#   read on the other sees), and four clients connect to an eighth over and
#   over (it opens and closes under connections arriving); an image stays
#   open and locked while one of its connections is left;
# - once an image's last connection ended, it is written back and unlocked
#   while the server runs: qemu-img opens it without -U, its check is
#   clean, and it holds what the clients were told;
# - an image is opened again by its next connection, and only it is locked;
# - a trim frees space in that image's file, counted in its NAME.stats;
# - names that are not plain names of regular files in the folder are
#   refused, with a sentence in the log, and the server goes on;
# - file= with dir=, neither, and backing=FILE with dir= are refused.
set -eu
srcdir=${srcdir:-$(cd "$(dirname "$0")" && pwd)}
. "$srcdir/functions.sh"

requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires nbdinfo --version
requires "$PYTHON" -c 'import nbd'

clients=$srcdir/dir_clients.py
driver=$srcdir/nbd_random_ops.py
D=$TMP/images
stats=$TMP/stats
sock=$TMP/dir.sock
log=$TMP/nbdkit.log
SIZE=64M
mkdir "$D"
names=
for i in $(seq -w 1 20); do
    qemu-img create -q -f qcow2 "$D/vm$i.qcow2" "$SIZE"
    names="$names vm$i.qcow2"
done
names=${names# }
# Not exports: a dot file (a qcow2 image all the same), a folder, a FIFO.
qemu-img create -q -f qcow2 "$D/.hidden.qcow2" "$SIZE"
mkdir "$D/sub"
qemu-img create -q -f qcow2 "$D/sub/inner.qcow2" "$SIZE"
mkfifo "$D/fifo"

locked() { ! qemu-img info "$1" >/dev/null 2>&1; }
# wait_unlocked IMAGE: the server lets go of an image once the last
# connection's close has run, a moment after the client left.
wait_unlocked() {
    local i
    for i in $(seq 1 $((200 * SLOW))); do
        locked "$1" || return 0
        sleep 0.05
    done
    qemu-img info "$1" >&2 || true
    fail "$1 is still locked $((10 * SLOW)) s after its last connection ended"
}
alloc_of() { echo $(( $(stat -c %b "$1") * 512 )); }
stat_of() { sed -n "s/^$2=//p" "$stats/$1.stats"; }

start_server "$sock" "$log" dir="$D" statsfile="$stats"
server=$LAST_SERVER_PID

# ---- the list ---------------------------------------------------------------
got=$("$PYTHON" "$clients" list "$sock" | tr '\n' ' ')
[ "${got% }" = "$names" ] ||
    fail "the server lists '${got% }', expected the 20 images '$names'"
out=$(nbdinfo --list "nbd+unix:///?socket=$sock") ||
    { echo "$out" >&2; tail -n 20 "$log" >&2; fail "nbdinfo --list failed"; }
listed=$(echo "$out" | sed -n 's/^export="\(.*\)":$/\1/p' | tr '\n' ' ')
[ "${listed% }" = "$names" ] || fail "nbdinfo --list shows '${listed% }'"
[ "$(echo "$out" | grep -c 'export-size: 67108864')" = 20 ] ||
    { echo "$out" >&2; fail "nbdinfo --list does not give each image's size"; }
for n in $names; do
    locked "$D/$n" && fail "$n is still locked after nbdinfo --list"
done
echo "ok: NBD_OPT_LIST and nbdinfo --list give the 20 images, with their sizes; none is left locked"

# ---- concurrent clients -----------------------------------------------------
mkdir "$TMP/pair"
pids=
for i in 1 2 3 4 5 6; do
    truncate -s "$SIZE" "$TMP/ref$i.raw"
    "$PYTHON" "$driver" --uri "nbd+unix:///vm0$i.qcow2?socket=$sock" \
        --ref "$TMP/ref$i.raw" --seed "$i" --ops 400 --max-zero 4M \
        --ops-mix write:50,read:30,flush:5,zero:10,trim:10 --trim-zero-clusters \
        >"$TMP/ops$i.log" 2>&1 &
    pids="$pids $!"
done
"$PYTHON" "$clients" pair "$sock" vm07.qcow2 "$TMP/pair" >"$TMP/pair.log" 2>&1 &
pair=$!
churners=
for k in 0 1 2 3; do
    "$PYTHON" "$clients" churn "$sock" vm08.qcow2 "$k" 25 >"$TMP/churn$k.log" 2>&1 &
    churners="$churners $!"
done
for _ in $(seq 1 $((1200 * SLOW))); do
    [ -e "$TMP/pair/one-left" ] || ! kill -0 "$pair" 2>/dev/null && break
    sleep 0.05
done
[ -e "$TMP/pair/one-left" ] || { cat "$TMP/pair.log" >&2; fail "the two connections to vm07.qcow2 failed"; }
locked "$D/vm07.qcow2" ||
    fail "vm07.qcow2 is not locked while one of its two connections is still open"
touch "$TMP/pair/go"
rc=0
wait "$pair" || rc=1
[ $rc = 0 ] || { cat "$TMP/pair.log" >&2; fail "the two connections to vm07.qcow2 disagree"; }
echo "ok: two connections to vm07.qcow2: each saw the other's writes and trims after a flush; the image stayed open and locked for the one left"
i=0
for p in $pids; do
    i=$((i + 1))
    wait "$p" || { cat "$TMP/ops$i.log" >&2; grep ' error: ' "$log" | head >&2 || true
                   fail "the random client of vm0$i.qcow2 failed"; }
done
echo "ok: random writes, reads, zeroes and trims on vm01..vm06 at the same time, every read as expected"
k=0
for p in $churners; do
    wait "$p" || { cat "$TMP/churn$k.log" >&2; grep ' error: ' "$log" | head >&2 || true
                   fail "client $k connecting again and again to vm08.qcow2 failed"; }
    k=$((k + 1))
done
wait_unlocked "$D/vm08.qcow2"
check_clean "$D/vm08.qcow2"
for k in 0 1 2 3; do
    qemu-io -f qcow2 -c "read -q -P $((k + 1)) ${k}M 1M" "$D/vm08.qcow2" >/dev/null ||
        fail "vm08.qcow2 does not hold what client $k wrote"
done
opened=$(grep -c "vm08.qcow2: reclaim totals: " "$log")
echo "ok: four clients connected 25 times each to vm08.qcow2 at once: it was opened and closed $opened times, data and check right"

for i in 1 2 3 4 5 6 7; do
    img=$D/vm0$i.qcow2
    wait_unlocked "$img"
    check_clean "$img"
    if [ "$i" -le 6 ]; then
        qemu-img compare -q -f qcow2 -F raw "$img" "$TMP/ref$i.raw" ||
            fail "vm0$i.qcow2 differs from what its client wrote (without a final flush)"
    else
        qemu-io -f qcow2 -c 'read -q -P 0x5a 40M 1M' -c 'read -q -P 0 32M 1M' "$img" >/dev/null ||
            fail "vm07.qcow2 does not hold what its second connection wrote"
    fi
    [ -s "$stats/vm0$i.qcow2.stats" ] || fail "$stats/vm0$i.qcow2.stats was not written"
done
kill -0 "$server" || fail "the server exited"
echo "ok: with the server still up, vm01..vm07 are unlocked once their clients left, check clean and hold what was written; each has its stats file"

# ---- open again, locks per image --------------------------------------------
mkdir "$TMP/again"
"$PYTHON" "$clients" pair "$sock" vm01.qcow2 "$TMP/again" >"$TMP/again.log" 2>&1 &
again=$!
for _ in $(seq 1 $((1200 * SLOW))); do
    [ -e "$TMP/again/one-left" ] || ! kill -0 "$again" 2>/dev/null && break
    sleep 0.05
done
[ -e "$TMP/again/one-left" ] || { cat "$TMP/again.log" >&2; fail "vm01.qcow2 could not be served again"; }
locked "$D/vm01.qcow2" || fail "vm01.qcow2 is not locked while it is served again"
for n in vm02.qcow2 vm08.qcow2; do
    locked "$D/$n" && fail "$n is locked while only vm01.qcow2 is served"
done
touch "$TMP/again/go"
wait "$again" || { cat "$TMP/again.log" >&2; fail "vm01.qcow2 served again misbehaved"; }
wait_unlocked "$D/vm01.qcow2"
check_clean "$D/vm01.qcow2"
echo "ok: vm01.qcow2 opened again by a new connection, locked alone, unlocked when it left"

# ---- reclaim per image ------------------------------------------------------
before11=$(alloc_of "$D/vm11.qcow2")
out=$("$PYTHON" "$clients" reclaim "$sock" vm10.qcow2 "$D/vm10.qcow2") ||
    fail "the reclaim client of vm10.qcow2 failed"
read -r written trimmed <<<"$out"
[ "$trimmed" -le $((written - 16 * 1048576)) ] ||
    fail "trimming 16 MiB of vm10.qcow2 took its allocation from $written to $trimmed bytes only"
[ "$(alloc_of "$D/vm11.qcow2")" = "$before11" ] || fail "vm11.qcow2 changed"
wait_unlocked "$D/vm10.qcow2"
punched=$(stat_of vm10.qcow2 bytes_punched)
[ "${punched:-0}" -ge $((16 * 1048576)) ] ||
    { cat "$stats/vm10.qcow2.stats" >&2; fail "vm10.qcow2.stats says bytes_punched=${punched:-none}"; }
# vm11.qcow2 was only opened by nbdinfo --list.
[ "$(stat_of vm11.qcow2 bytes_punched)" = 0 ] ||
    { cat "$stats/vm11.qcow2.stats" >&2; fail "vm11.qcow2.stats counts punches vm11.qcow2 never had"; }
check_clean "$D/vm10.qcow2"
echo "ok: a 16 MiB trim on vm10.qcow2: its file's allocation $written -> $trimmed bytes, bytes_punched=$punched in vm10.qcow2.stats"

# ---- names that are refused -------------------------------------------------
echo junk >"$D/notes.txt"
bad=("../vm01.qcow2" "sub/inner.qcow2" ".hidden.qcow2" ".." "." "sub" "fifo" \
     "nosuch.qcow2" "" "$D/vm01.qcow2" "notes.txt")
"$PYTHON" "$clients" refused "$sock" "${bad[@]}" >"$TMP/refused.log" 2>&1 ||
    { cat "$TMP/refused.log" >&2; fail "a name that must be refused was served"; }
want=(
    "export name '../vm01.qcow2' is refused: it must be the name of a file in the folder, with no '/'"
    "export name 'sub/inner.qcow2' is refused"
    "export name '.hidden.qcow2' is refused: names starting with '.' are not served"
    "export name '..' is refused"
    "export 'sub' is not a regular file"
    "export 'fifo' is not a regular file"
    "export 'nosuch.qcow2': no such image in the folder"
    "the client asked for the default export (an empty name), and there is none"
    "/notes.txt: is not a qcow2 image"
)
for w in "${want[@]}"; do
    grep -qF -- "$w" "$log" || { grep ' error: ' "$log" >&2 || true; fail "the log does not say: $w"; }
done
kill -0 "$server" || fail "the server exited after the refused names"
"$PYTHON" -m nbd -u "nbd+unix:///vm10.qcow2?socket=$sock" -c 'assert h.pread(4096, 0) == bytes(4096)' ||
    fail "the server does not serve vm10.qcow2 after the refused names"
echo "ok: ${#bad[@]} names refused (escaping the folder, dot files, a folder, a FIFO, a missing file, the default export, a path, a file that is not qcow2), each with its sentence"

# ---- exit -------------------------------------------------------------------
stop_server "$server"
[ "$SERVER_STATUS" = 0 ] || { tail -n 20 "$log" >&2; fail "nbdkit exited with status $SERVER_STATUS"; }
for n in $names; do check_clean "$D/$n"; done
n=$(grep -c "error: notice: $D/vm01.qcow2: reclaim totals: " "$log")
[ "$n" -ge 2 ] || fail "vm01.qcow2's totals were logged as notices through nbdkit's log $n times, expected once each time it closed"
echo "ok: SIGTERM: exit 0, all 20 images check clean; each image logs its totals (a notice) when it closes"

# ---- parameters -------------------------------------------------------------
refused_params() {
    local want=$1 out; shift
    if out=$(timeout $((30 * SLOW)) nbdkit -f -U "$TMP/p.sock" "$PLUGIN" "$@" 2>&1); then
        fail "nbdkit started with $*"
    fi
    echo "$out" | grep -qF -- "$want" || { echo "$out" >&2; fail "nbdkit $*: no '$want'"; }
}
refused_params "file= and dir= cannot be given together" file="$D/vm01.qcow2" dir="$D"
refused_params "or a folder of images with dir=DIR" readonly=true
refused_params "cannot be used with dir=" dir="$D" backing="$D/vm02.qcow2"
refused_params "dir=$D/vm01.qcow2: not a folder" dir="$D/vm01.qcow2"
refused_params "cannot go into the folder of the images" dir="$D" statsfile="$D"
echo "ok: file= with dir=, neither, backing=FILE with dir=, a dir= that is a file and stats in the images' folder are refused"
