#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# The real-guest measurement: how much of the space a Linux guest frees
# with fstrim comes back to the host, and how long the qcow2 file stays,
# with the qcow2reclaim plugin (compact=off and compact=auto) and with
# qemu-nbd as the reference.  See bench/README.md.
#
# A Linux guest under QEMU (TCG, no KVM needed) gets a 4 GiB disk over NBD
# (QEMU's nbd block driver on a Unix socket, virtio-scsi, discard=unmap),
# ext4 made on the host beforehand through the same server.  In the guest,
# from a busybox initramfs built here: SIZE of random files, then KEPT
# more ("the kept files", written last, so they lie at the end of the
# qcow2 file), sync, everything but the kept files deleted, sync,
# fstrim -v, sync, WAIT seconds, poweroff.  The host records the qcow2
# file's length and allocation after the writing, right after fstrim and
# WAIT seconds later, checks the kept files' checksums (taken in the
# guest before the deletion, after fstrim and after the wait, each time
# with the page cache dropped) and runs qemu-img check on every image.
set -eu
export LC_ALL=C

usage() {
    cat <<EOF
Usage: $0 [-d DIR] [-s SIZE] [-K SIZE] [-w SECONDS] [-S SERVERS] [-T SECONDS] [-k]

  -d DIR        parent of the work directory (default \$BENCH_DIR, else
                /var/tmp); a private directory is made under it and removed
                at the end.  Needs about 1 GiB free.
  -s SIZE       random data written in the guest and deleted again
                (default 240M; whole MiB)
  -K SIZE       kept data, written last and not deleted (default 16M)
  -w SECONDS    how long the guest waits after fstrim before powering off,
                and when the host takes its last figures (default 30)
  -S SERVERS    comma-separated, in this order, among off, auto, qemu-nbd
                (default off,auto,qemu-nbd): the plugin with compact=off,
                the plugin with compact=auto, qemu-nbd
  -T SECONDS    time limit for each guest run (default 600)
  -A ACCEL      QEMU accelerator (default tcg)
  -k            keep the work directory (images, console and server logs)

Needs root (losetup, mknod), /dev/fuse and the Debian packages
qemu-system-x86, qemu-utils, nbdkit, libnbd-bin (nbdfuse), fuse3, mount,
e2fsprogs, cpio, kmod, busybox-static and linux-image-amd64; a missing one
is named and the script exits with status 2.  Environment: PLUGIN (default
../plugin/.libs/nbdkit-qcow2reclaim-plugin.so next to this script; a copy
taken at start is served), KERNEL (default: the newest /boot/vmlinuz-*
whose /lib/modules directory exists), BENCH_DIR.
EOF
}

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parent=${BENCH_DIR:-/var/tmp}
data_size=240M
kept_size=16M
wait_s=30
servers=off,auto,qemu-nbd
guest_limit=600
accel=tcg
while getopts d:s:K:w:S:T:A:kh opt; do
    case $opt in
        d) parent=$OPTARG ;;
        s) data_size=$OPTARG ;;
        K) kept_size=$OPTARG ;;
        w) wait_s=$OPTARG ;;
        S) servers=$OPTARG ;;
        T) guest_limit=$OPTARG ;;
        A) accel=$OPTARG ;;
        k) BENCH_KEEP=1 ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || { usage >&2; exit 2; }

MiB=$((1 << 20))
to_mib_whole() {        # SIZE -> whole MiB, or die
    local b
    b=$(bench_size_bytes "$1")
    [ $((b % MiB)) -eq 0 ] || bench_die "$2 wants whole MiB, not $1"
    echo $((b / MiB))
}
data_mib=$(to_mib_whole "$data_size" -s)
kept_mib=$(to_mib_whole "$kept_size" -K)
[ "$kept_mib" -ge 1 ] || bench_die "-K must be at least 1M"
[ $((data_mib + kept_mib)) -le 3584 ] || bench_die "-s and -K together must fit the 4 GiB disk (at most 3584M)"
bench_count0 -w "$wait_s" seconds
bench_count -T "$guest_limit" seconds
IFS=, read -r -a SERVERS <<<"$servers"
[ ${#SERVERS[@]} -gt 0 ] || bench_die "-S names no server"
for s in "${SERVERS[@]}"; do
    case $s in off|auto|qemu-nbd) ;; *) bench_die "-S: unknown server '$s' (off, auto, qemu-nbd)" ;; esac
done

# ---------------------------------------------------------------------------
# What this needs, with the Debian package to install: exit 2 if missing.
missing() { printf 'bench: error: %s\n' "$*" >&2; exit 2; }
need() {        # need TOOL PACKAGE
    command -v "$1" >/dev/null 2>&1 || missing "$1 not found (apt-get install $2)"
}
[ "$(id -u)" = 0 ] || bench_die "needs root (losetup, mknod for the initramfs)"
need qemu-system-x86_64 qemu-system-x86
need qemu-img qemu-utils
need qemu-nbd qemu-utils
need nbdkit nbdkit
need nbdfuse libnbd-bin
need fusermount3 fuse3
need losetup mount
need mkfs.ext4 e2fsprogs
need cpio cpio
need gzip gzip
need modprobe kmod
need mountpoint util-linux
need timeout coreutils
[ -c /dev/fuse ] || bench_die "/dev/fuse is missing (modprobe fuse)"
[ -x /bin/busybox ] || missing "/bin/busybox not found (apt-get install busybox-static)"
# The initramfs has no libraries: busybox must be the static build.
if ldd /bin/busybox >/dev/null 2>&1; then
    missing "/bin/busybox is dynamically linked (apt-get install busybox-static, which replaces busybox)"
fi
if [ -z "${KERNEL:-}" ]; then
    for k in $(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V -r); do
        [ -d "/lib/modules/${k#/boot/vmlinuz-}" ] && { KERNEL=$k; break; }
    done
    [ -n "${KERNEL:-}" ] || missing "no kernel in /boot/vmlinuz-* with its modules in /lib/modules (apt-get install linux-image-amd64)"
fi
[ -r "$KERNEL" ] || bench_die "cannot read the kernel $KERNEL"
KVER=${KERNEL##*/vmlinuz-}
[ -d "/lib/modules/$KVER" ] || missing "no /lib/modules/$KVER for $KERNEL (apt-get install linux-image-amd64)"
losetup -f >/dev/null 2>&1 || bench_die "no free loop device (losetup -f)"
for s in "${SERVERS[@]}"; do
    case $s in off|auto) plugin_available || bench_die "the qcow2reclaim plugin is not built: $PLUGIN" ;; esac
done
if [ "$accel" = kvm ] && ! [ -w /dev/kvm ]; then bench_die "-A kvm: /dev/kvm is not usable"; fi

bench_workdir_create "$parent"
bench_check_space "$BENCH_WORK" $(((data_mib + kept_mib + 512) * MiB))
W=$BENCH_WORK
if plugin_available; then
    cp "$PLUGIN" "$W/plugin.so"
    PLUGIN=$W/plugin.so
fi

# ---------------------------------------------------------------------------
# Teardown however the script ends: the guest, then the loop device and
# the FUSE mount of the host-side mkfs, then (bench_cleanup) the servers
# and the work directory.
QEMU_PID='' LOOP='' FUSE_PID='' FUSE_DIR=''
guest_cleanup() {
    local back i
    if [ -n "$QEMU_PID" ]; then
        kill "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    if [ -n "$LOOP" ]; then
        back=$(losetup -n -O BACK-FILE "$LOOP" 2>/dev/null) || back=
        case $back in "$W"/*) losetup -d "$LOOP" 2>/dev/null || true ;; esac
    fi
    if [ -n "$FUSE_DIR" ] && mountpoint -q "$FUSE_DIR" 2>/dev/null; then
        fusermount3 -u "$FUSE_DIR" 2>/dev/null || umount -l "$FUSE_DIR" 2>/dev/null || true
    fi
    if [ -n "$FUSE_PID" ]; then
        kill "$FUSE_PID" 2>/dev/null || true
        wait "$FUSE_PID" 2>/dev/null || true
    fi
    if [ -n "$FUSE_DIR" ] && mountpoint -q "$FUSE_DIR" 2>/dev/null; then
        bench_msg "warning: $FUSE_DIR is still mounted; keeping the work directory"
        BENCH_KEEP=1
    fi
}
trap 'guest_cleanup; bench_cleanup' EXIT
trap 'bench_msg interrupted; exit 130' INT
trap 'bench_msg terminated; exit 143' TERM
trap 'bench_msg hangup; exit 129' HUP

flen() { stat -c %s "$1"; }
falloc() { stat -c '%b %B' "$1" | awk '{ print $1 * $2 }'; }
to_mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
since() { awk -v a="$1" -v b="${2:-$EPOCHREALTIME}" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------------------
# The initramfs: static busybox, the modules for virtio-scsi, sd and ext4
# in load order, and /init, the workload.
build_initramfs() {
    local root=$W/initramfs m line ko mods=() seen=" " a
    mkdir -p "$root"/{bin,dev,proc,sys,mnt,tmp,lib/modules}
    cp /bin/busybox "$root/bin/busybox"
    for a in $(/bin/busybox --list); do
        [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"
    done
    # modprobe --show-depends gives each module's dependencies (and softdeps,
    # such as ext4's crc32c) before it, as insmod lines.
    for m in virtio_pci virtio_scsi sd_mod crc32c_generic crc32c_intel ext4; do
        line=$(modprobe -S "$KVER" --show-depends "$m" 2>&1) ||
            bench_die "module $m not found for kernel $KVER: $line"
        while read -r a ko _; do
            [ "$a" = insmod ] || continue       # "builtin NAME": nothing to load
            case $seen in *" $ko "*) continue ;; esac
            seen="$seen$ko "
            mods+=("$ko")
        done <<<"$line"
    done
    : >"$root/lib/modules/load.list"
    for ko in "${mods[@]}"; do
        case $ko in
            *.ko) cp "$ko" "$root/lib/modules/" ;;
            *.ko.xz) xz -dc "$ko" >"$root/lib/modules/$(basename "${ko%.xz}")" ;;
            *.ko.zst) zstd -qdc "$ko" >"$root/lib/modules/$(basename "${ko%.zst}")" ;;
            *.ko.gz) gzip -dc "$ko" >"$root/lib/modules/$(basename "${ko%.gz}")" ;;
            *) bench_die "unknown module file $ko" ;;
        esac
        m=$(basename "$ko"); m=${m%%.ko*}
        echo "$m.ko" >>"$root/lib/modules/load.list"
    done
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3

    cat >"$root/init" <<EOF
#!/bin/sh
# The guest side of bench/guest-fstrim.sh.  Lines starting Q2R- are read by
# the host: Q2R-MARK NAME (a point the host takes figures at), Q2R-SUM WHEN
# MD5 FILE, Q2R-FSTRIM (fstrim's output), Q2R-FAIL (the run is void).
DATA_MIB=$data_mib
KEPT_MIB=$kept_mib
WAIT=$wait_s
EOF
    cat >>"$root/init" <<'EOF'
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec </dev/null >/dev/console 2>&1
fail() { echo "Q2R-FAIL $*"; sync; poweroff -f; sleep 10; }
msg() { echo "Q2R: $*"; }
for m in $(cat /lib/modules/load.list); do
    # The accelerated crc modules refuse a CPU without the instructions;
    # the generic ones are loaded too.
    insmod /lib/modules/$m 2>/dev/null || msg "insmod $m failed (ignored)"
done
i=0
while [ ! -b /dev/sda ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/sda ] || fail "no /dev/sda"
q=/sys/block/sda/queue
msg "disk: $(($(cat /sys/block/sda/size) / 2048)) MiB, discard_granularity=$(cat $q/discard_granularity) discard_max_bytes=$(cat $q/discard_max_bytes)"
# noinit_itable: no lazy inode table zeroing behind the figures' backs.
mount -t ext4 -o noinit_itable /dev/sda /mnt || fail "mount /dev/sda"
mkdir -p /mnt/data /mnt/kept || fail "mkdir"
# write DIR PREFIX MIB CHUNK: MIB of random data in files of CHUNK MiB.
write() {
    local dir=$1 prefix=$2 left=$3 chunk=$4 n i=0
    while [ "$left" -gt 0 ]; do
        n=$chunk; [ "$n" -le "$left" ] || n=$left
        dd if=/dev/urandom of=$dir/$prefix$i bs=1M count=$n 2>/dev/null ||
            fail "dd $dir/$prefix$i"
        left=$((left - n)); i=$((i + 1))
    done
}
sums() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    (cd /mnt/kept && md5sum *) | while read -r s f; do echo "Q2R-SUM $1 $s $f"; done
}
t=$(date +%s)
write /mnt/data data $DATA_MIB 8
write /mnt/kept kept $KEPT_MIB 4
sync
msg "wrote $DATA_MIB + $KEPT_MIB MiB in $(($(date +%s) - t)) s"
sums written
echo "Q2R-MARK written"
sleep 2
rm -rf /mnt/data || fail "rm"
sync
msg "$(df -k /mnt | tail -n 1)"
echo "Q2R-MARK deleted"
fstrim -v /mnt >/tmp/fstrim.out 2>&1 || { cat /tmp/fstrim.out; fail "fstrim"; }
sync
echo "Q2R-MARK fstrimmed"
t=$(date +%s)
echo "Q2R-FSTRIM $(cat /tmp/fstrim.out)"
sleep 1
sums trimmed
# The host takes its last figures WAIT s after the mark; check the kept
# files again a little later, after whatever the server did meanwhile.
while [ $(($(date +%s) - t)) -lt $((WAIT + 2)) ]; do sleep 1; done
sums waited
umount /mnt || fail "umount"
echo "Q2R-MARK end"
poweroff -f
EOF
    chmod 755 "$root/init"
    (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$W/initramfs.gz" ||
        bench_die "cpio failed making the initramfs"
}

# ---------------------------------------------------------------------------
# mkfs.ext4 on the host, through the server: nbdfuse makes the export a
# file, a loop device goes on it.
host_mkfs() {
    local sock=$1 dir=$2 i
    FUSE_DIR=$dir
    mkdir -p "$dir"
    nbdfuse "$dir/disk" "$(nbd_uri "$sock")" >"$dir.log" 2>&1 &
    FUSE_PID=$!
    for ((i = 0; i < 200; i++)); do
        [ -e "$dir/disk" ] && break
        kill -0 "$FUSE_PID" 2>/dev/null || { cat "$dir.log" >&2; bench_die "nbdfuse exited"; }
        sleep 0.05
    done
    [ -e "$dir/disk" ] || { cat "$dir.log" >&2; bench_die "nbdfuse did not mount $dir"; }
    LOOP=$(losetup -f --show "$dir/disk")
    mkfs.ext4 -q -F "$LOOP" || bench_die "mkfs.ext4 on $LOOP failed"
    losetup -d "$LOOP"
    # The FUSE file stays busy until the loop device lets go of it.
    for ((i = 0; i < 100; i++)); do
        [ -z "$(losetup -n -j "$dir/disk" 2>/dev/null)" ] && break
        sleep 0.1
    done
    LOOP=
    fusermount3 -u "$dir"
    for ((i = 0; i < 100; i++)); do
        kill -0 "$FUSE_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill "$FUSE_PID" 2>/dev/null && bench_msg "note: nbdfuse had to be killed"
    wait "$FUSE_PID" 2>/dev/null || true
    FUSE_PID='' FUSE_DIR=''
}

# ---------------------------------------------------------------------------
declare -A LABEL=([off]="qcow2reclaim compact=off" [auto]="qcow2reclaim compact=auto"
                  [qemu-nbd]="qemu-nbd")
declare -A R=()         # R[server,point,len|alloc], R[server,trimmed], ...
status=0

# run_one SERVER: one guest run; fills R[SERVER,...].
run_one() {
    local s=$1 d=$W/$1 img sock log con qcmd t0 t_mark=0 tw='' marks=" " m rc=0 line last='' now=''
    local t_start=$EPOCHREALTIME
    mkdir -p "$d"
    img=$d/disk.qcow2 sock=$d/nbd.sock log=$d/server.log con=$d/console.log
    qemu-img create -q -f qcow2 -o cluster_size=64k "$img" 4G
    case $s in
        qemu-nbd) serve_qemu "$img" "$sock" "$log" ;;
        *) serve_plugin "$img" "$sock" "$log" compact="$s" ;;
    esac
    local server=$SERVER_PID
    host_mkfs "$sock" "$d/fuse"
    bench_msg "  ext4 made on the host: file $(to_mib "$(flen "$img")") MiB, allocated $(to_mib "$(falloc "$img")") MiB"

    # shellcheck disable=SC2054 # the commas are QEMU's
    qcmd=(qemu-system-x86_64 -nodefaults -no-user-config -machine q35 -accel "$accel"
          -cpu max -smp 1 -m 512 -display none -monitor none -no-reboot
          -serial "file:$con"
          -kernel "$KERNEL" -initrd "$W/initramfs.gz"
          -append "console=ttyS0 panic=-1 loglevel=4"
          -blockdev "driver=nbd,server.type=unix,server.path=$sock,node-name=d0,discard=unmap"
          -device virtio-scsi-pci,id=scsi0 -device scsi-hd,drive=d0,bus=scsi0.0)
    printf '%q ' "${qcmd[@]}" >"$d/qemu.cmd"
    : >"$con"
    t0=$EPOCHREALTIME
    timeout -k 10 "$guest_limit" "${qcmd[@]}" >"$d/qemu.log" 2>&1 &
    QEMU_PID=$!

    # Follow the console; take the figures at each mark.
    point() {   # point NAME: the file's length and allocation now
        R[$s,$1,len]=$(flen "$img")
        R[$s,$1,alloc]=$(falloc "$img")
    }
    while :; do
        local alive=1
        kill -0 "$QEMU_PID" 2>/dev/null || alive=0
        for m in written deleted fstrimmed end; do
            case $marks in *" $m "*) continue ;; esac
            grep -q "^Q2R-MARK $m" "$con" 2>/dev/null || continue
            marks="$marks$m "
            case $m in
                written) point written
                         bench_msg "  $(since "$t0") s: written, file $(to_mib "${R[$s,written,len]}") MiB, allocated $(to_mib "${R[$s,written,alloc]}") MiB" ;;
                deleted) tw=$EPOCHREALTIME ;;
                fstrimmed) point fstrim
                           t_mark=$EPOCHREALTIME
                           last="${R[$s,fstrim,len]} ${R[$s,fstrim,alloc]}"
                           R[$s,settled]=0.0
                           bench_msg "  $(since "$t0") s: fstrim done (fstrim and sync took about $(since "$tw") s), file $(to_mib "${R[$s,fstrim,len]}") MiB, allocated $(to_mib "${R[$s,fstrim,alloc]}") MiB" ;;
                end) ;;
            esac
        done
        # Until the last figures: when did the file last change?
        if [ "$t_mark" != 0 ] && [ -z "${R[$s,wait,len]:-}" ]; then
            now="$(flen "$img") $(falloc "$img")"
            if [ "$now" != "$last" ]; then
                last=$now
                R[$s,settled]=$(since "$t_mark")
            fi
        fi
        if [ "$t_mark" != 0 ] && [ -z "${R[$s,wait,len]:-}" ] &&
           awk -v a="$t_mark" -v b="$EPOCHREALTIME" -v w="$wait_s" 'BEGIN { exit !(b - a >= w) }'; then
            point wait
            bench_msg "  $(since "$t0") s: ${wait_s} s after fstrim, file $(to_mib "${R[$s,wait,len]}") MiB, allocated $(to_mib "${R[$s,wait,alloc]}") MiB; last change ${R[$s,settled]} s after fstrim"
        fi
        [ "$alive" = 1 ] || break
        sleep 0.1
    done
    wait "$QEMU_PID" || rc=$?
    QEMU_PID=
    tr -d '\r' <"$con" >"$con.txt"
    grep '^Q2R: ' "$con.txt" | sed 's/^Q2R: /  guest: /' >&2 || true
    [ "$rc" != 124 ] || bench_msg "  warning: the guest did not finish within ${guest_limit}s (-T); console: $con"
    if grep '^Q2R-FAIL' "$con.txt" >&2; then
        bench_msg "  warning: the guest failed (console: $con)"
        status=1
    fi
    case $marks in
        *" end "*) ;;
        *) bench_msg "  warning: the guest did not finish its work (qemu exit status $rc); last console lines:"
           tail -n 15 "$con.txt" >&2
           [ "$BENCH_KEEP" = 1 ] || { BENCH_KEEP=1; bench_msg "  keeping the work directory for a look"; }
           status=1 ;;
    esac
    [ -n "${R[$s,wait,len]:-}" ] || { [ -z "${R[$s,fstrim,len]:-}" ] || point wait; }
    bench_msg "  guest ran $(since "$t0") s"

    stop_server "$server" || { bench_msg "  warning: ${LABEL[$s]} exited with an error (log: $log)"; status=1; }
    point stopped
    line=$(grep -o 'reclaim totals: .*' "$log" || true)
    [ -z "$line" ] || bench_msg "  $line"
    if bench_log_problems "$log"; then
        bench_msg "  warning: (the messages above are from ${LABEL[$s]}'s log $log)"
    fi
    R[$s,trimmed]=$(sed -n 's/^Q2R-FSTRIM .*(\([0-9]*\) bytes) trimmed.*/\1/p' "$con.txt")
    [ -n "${R[$s,trimmed]}" ] ||
        R[$s,trimmed]=$(sed -n 's/^Q2R-FSTRIM .*: \([0-9]*\) bytes trimmed.*/\1/p' "$con.txt")

    # The kept files: the same sums before the deletion, after fstrim, after
    # the wait.
    local w t x
    w=$(awk '$1 == "Q2R-SUM" && $2 == "written" { print $4, $3 }' "$con.txt" | sort)
    R[$s,sums]=ok
    if [ -z "$w" ]; then
        R[$s,sums]=none; status=1
    else
        for x in trimmed waited; do
            t=$(awk -v x="$x" '$1 == "Q2R-SUM" && $2 == x { print $4, $3 }' "$con.txt" | sort)
            if [ "$t" != "$w" ]; then
                R[$s,sums]=BAD; status=1
                bench_msg "  warning: the kept files' checksums $x differ from those written:"
                diff <(echo "$w") <(echo "$t") >&2 || true
            fi
        done
    fi
    if qemu-img check -q "$img" >"$d/check.log" 2>&1; then
        R[$s,check]=clean
    else
        R[$s,check]=BAD; status=1
        bench_msg "  warning: qemu-img check does not find $img clean:"
        cat "$d/check.log" >&2
    fi
    bench_msg "  ${LABEL[$s]} done in $(since "$t_start") s: kept files $([ "${R[$s,sums]}" = ok ] && echo intact || echo "${R[$s,sums]}"), qemu-img check ${R[$s,check]}"
    # The image is not needed any more unless it is kept.
    [ "$BENCH_KEEP" = 1 ] || rm -f "$img"
}

t_all=$SECONDS
bench_msg "kernel $KERNEL, accelerator $accel, writing $data_mib MiB + $kept_mib MiB kept, waiting ${wait_s} s after fstrim"
build_initramfs
bench_msg "initramfs: $(wc -l <"$W/initramfs/lib/modules/load.list") modules, $(($(stat -c %s "$W/initramfs.gz") >> 10)) KiB"
n=0
for s in "${SERVERS[@]}"; do
    n=$((n + 1))
    bench_msg "[$n/${#SERVERS[@]}] ${LABEL[$s]}"
    run_one "$s"
done

cell() {        # cell SERVER POINT: "LEN ALLOC" in MiB, or "- -"
    if [ -n "${R[$1,$2,len]:-}" ]; then
        printf '%9s %9s' "$(to_mib "${R[$1,$2,len]}")" "$(to_mib "${R[$1,$2,alloc]}")"
    else
        printf '%9s %9s' - -
    fi
}
echo
echo "MiB (2^20 bytes) of the 4 GiB qcow2 image: file length (stat %s) and host allocation (stat %b blocks)"
printf '%-26s  %-19s  %-19s  %-19s  %-19s  %7s  %9s  %-5s  %-5s\n' \
    "" "after writing" "after fstrim" "${wait_s} s after fstrim" "server stopped" "settled" "fstrim" "kept" "check"
printf '%-26s  %9s %9s  %9s %9s  %9s %9s  %9s %9s  %7s  %9s  %-5s  %-5s\n' \
    server length alloc length alloc length alloc length alloc "s" trimmed files image
for s in "${SERVERS[@]}"; do
    tr=${R[$s,trimmed]:-}
    [ -z "$tr" ] || tr=$(to_mib "$tr")
    printf '%-26s  %s  %s  %s  %s  %7s  %9s  %-5s  %-5s\n' "${LABEL[$s]}" \
        "$(cell "$s" written)" "$(cell "$s" fstrim)" "$(cell "$s" wait)" "$(cell "$s" stopped)" \
        "${R[$s,settled]:--}" "${tr:--}" "${R[$s,sums]:--}" "${R[$s,check]:--}"
done
bench_msg "total $((SECONDS - t_all)) s"
exit "$status"
