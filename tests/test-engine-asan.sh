#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The engine under ASan and UBSan, without nbdkit: random operations with a
# small metadata cache on several image shapes; then qemu-img check.
. "$srcdir/functions.sh"
requires qemu-img --version
[ -x "$ENGINE_OPS_ASAN" ] || fail "$ENGINE_OPS_ASAN was not built"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

run() {
    local name=$1 seed=$2; shift 2
    qemu-img create -q -f qcow2 "$@" "$TMP/$name.qcow2" 48M
    qemu-io -f qcow2 -c 'write -P 0x5a 1M 3M' "$TMP/$name.qcow2" >/dev/null
    "$ENGINE_OPS_ASAN" "$TMP/$name.qcow2" "$seed" 1500 || fail "$name: engine-ops failed"
    check_clean "$TMP/$name.qcow2"
    echo "PASS: $name"
}

run v3-64k 11
run v2 12 -o compat=0.10
run c512-rc1 13 -o cluster_size=512,refcount_bits=1
run c4k-rc64 14 -o cluster_size=4096,refcount_bits=64
run c2m 15 -o cluster_size=2M
