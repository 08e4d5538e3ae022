#!/bin/sh
# SPDX-License-Identifier: BSD-3-Clause
# Installs what qcow2reclaim needs to build, serve and run its tests on
# Debian 12 (as root).  Used by the README's commands and by .ci/run.
set -e
PACKAGES="build-essential autoconf automake libtool pkg-config
  nbdkit nbdkit-plugin-dev libnbd-dev libnbd-bin python3-libnbd nbdfuse
  qemu-utils liburing-dev zlib1g-dev libzstd-dev nettle-dev
  fuse3 e2fsprogs xfsprogs util-linux iproute2 fio openssl strace
  clang libclang-rt-14-dev valgrind"
missing=
for p in $PACKAGES; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi
