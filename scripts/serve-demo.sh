#!/bin/sh
# SPDX-License-Identifier: BSD-3-Clause
# Serves IMAGE (or a demo image made on the spot) with the freshly built
# plugin on nbd://localhost:10809, until Ctrl-C.
#   scripts/serve-demo.sh [IMAGE.qcow2] [more nbdkit plugin parameters]
set -e
top=$(cd "$(dirname "$0")/.." && pwd)
plugin=$top/plugin/.libs/nbdkit-qcow2reclaim-plugin.so
[ -f "$plugin" ] || { echo "$plugin is not built: run ./configure && make first" >&2; exit 1; }
image=${1:-}
if [ -z "$image" ]; then
    image=$top/demo.qcow2
    if [ ! -f "$image" ]; then
        echo "Creating a 4 GiB demo image with 256 MiB of data: $image"
        qemu-img create -q -f qcow2 "$image" 4G
        qemu-io -f qcow2 -c 'write -P 0xab 0 256M' "$image" >/dev/null
    fi
else
    shift
fi
cat <<MSG
Serving $image on nbd://localhost:10809 (Ctrl-C stops and writes back).
  Look at it:      nbdinfo --map nbd://localhost:10809
  Give space back: nbdsh -u nbd://localhost:10809 -c 'for o in range(0, h.get_size(), 1 << 30): h.trim(min(1 << 30, h.get_size() - o), o)' -c 'h.flush()'
  Then compare:    du -h $image ; qemu-img check $image
MSG
exec nbdkit -f -p 10809 "$plugin" file="$image" "$@"
