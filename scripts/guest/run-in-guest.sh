#!/bin/bash
# shellcheck source-path=SCRIPTDIR disable=SC2054  # (qemu options are comma lists)
# run-in-guest.sh - run a shell command inside a throw-away QEMU (TCG) guest
# whose root filesystem is the host's own root, shared read-only over virtio-9p.
#
# Usage: scripts/guest/run-in-guest.sh [--] 'COMMAND' [EXTRA QEMU ARGS...]
#
# COMMAND runs under the host's /bin/sh, chrooted into the 9p-mounted host root
# (cwd $GUEST_CWD), with /proc, /sys, /dev, /dev/pts, /dev/shm, /dev/hugepages
# mounted and fresh tmpfs on /tmp, /run and /var/tmp.  Host binaries (node,
# dd, blkdiscard, ...) therefore run unchanged in the guest.  COMMAND's stdout
# and stderr come out on this script's stdout, as they are produced (guest
# serial port ttyS1); the kernel console (ttyS0) goes to a log file.  Exit
# status: COMMAND's, or 124 on timeout, 125 when the guest died without
# reporting one.  Timing goes to stderr as the last line:
#   run-in-guest: rc=N prep=Xs qemu=Ys total=Zs
#
# Arguments after COMMAND go verbatim to the qemu command line, e.g.
#   -chardev socket,id=vus,path=SOCK -device vhost-user-scsi-pci,chardev=vus
#
# Environment (all optional):
#   GUEST_MEM=1G          RAM size            GUEST_SMP=1   vCPUs
#   GUEST_CPU=max         qemu -cpu model     GUEST_TIMEOUT=600  seconds, then rc 124
#   GUEST_MEMFD=0         1 = guest RAM in a shared memfd (vhost-user devices
#                         need it: the backend maps guest memory)
#   GUEST_MODULES=""      extra kernel modules, loaded with their dependencies
#                         (e.g. "virtio_scsi sd_mod")
#   GUEST_HUGEPAGES=0     2 MiB hugepages to reserve inside the guest
#   GUEST_VFIO_BIND=""    PCI functions to hand to vfio-pci before COMMAND runs:
#                         BDFs (0000:00:03.0) or vendor:device ids (1af4:1048).
#                         COMMAND gets the bound BDFs in $VFIO_BDFS.
#   GUEST_IOMMU=auto      1 = emulated Intel IOMMU + vfio modules (VFIO needs
#                         it: the kernel has no CONFIG_VFIO_NOIOMMU); auto = 1
#                         when GUEST_VFIO_BIND is set
#   GUEST_RO_DIRS=""      host dirs under /tmp to expose (the guest's tmpfs
#                         hides host /tmp); $GUEST_CWD is added when under /tmp
#   GUEST_RW_DIRS=""      host dirs shared read-write (one 9p device each),
#                         mounted at the same path
#   GUEST_CWD=$PWD        working directory of COMMAND
#   GUEST_APPEND=""       extra kernel command line
#   GUEST_CONSOLE_LOG=F   keep the kernel console log in F (else a temp file,
#                         shown on stderr when the guest fails)
#   GUEST_VERBOSE=0       1 = always print the console log to stderr
#   GUEST_KEEP=0          1 = keep the temporary work directory
#   GUEST_FAST_BOOT=1     0 = boot the bzImage through the default BIOS
#   GUEST_KERNEL_DIR, GUEST_KVER   see guest-kernel.sh (fetched when missing)
set -euo pipefail

[ "${1:-}" = "--" ] && shift
if [ $# -lt 1 ]; then
  sed -n '3,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p' >&2
  exit 2
fi
CMD=$1; shift

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=guest-kernel.sh
. "$HERE/guest-kernel.sh"

T0=$(date +%s.%N)
GUEST_MEM=${GUEST_MEM:-1G}
GUEST_SMP=${GUEST_SMP:-1}
GUEST_CPU=${GUEST_CPU:-max}
GUEST_TIMEOUT=${GUEST_TIMEOUT:-600}
GUEST_MEMFD=${GUEST_MEMFD:-0}
GUEST_MODULES=${GUEST_MODULES:-}
GUEST_HUGEPAGES=${GUEST_HUGEPAGES:-0}
GUEST_VFIO_BIND=${GUEST_VFIO_BIND:-}
GUEST_IOMMU=${GUEST_IOMMU:-auto}
GUEST_RO_DIRS=${GUEST_RO_DIRS:-}
GUEST_RW_DIRS=${GUEST_RW_DIRS:-}
GUEST_CWD=${GUEST_CWD:-$PWD}
GUEST_APPEND=${GUEST_APPEND:-}
GUEST_VERBOSE=${GUEST_VERBOSE:-0}
GUEST_KEEP=${GUEST_KEEP:-0}
GUEST_FAST_BOOT=${GUEST_FAST_BOOT:-1}
if [ "$GUEST_IOMMU" = auto ]; then
  [ -n "$GUEST_VFIO_BIND" ] && GUEST_IOMMU=1 || GUEST_IOMMU=0
fi

die() { echo "run-in-guest: $*" >&2; exit 125; }
for t in qemu-system-x86_64 cpio busybox modprobe depmod dpkg timeout flock; do
  command -v "$t" >/dev/null || die "missing $t (run scripts/setup-system.sh as root)"
done
BUSYBOX=$(command -v busybox)
# The initramfs has no libc: busybox must be the static build.
if ! file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' &&
   ! ldd "$BUSYBOX" 2>&1 | grep -q 'not a dynamic'; then
  die "$BUSYBOX is not statically linked (install busybox-static)"
fi

# ---------------------------------------------------------------- kernel
KDIR=$(gk_dir)
KVER=$(gk_wanted_version "$KDIR")
out=$(gk_prepare "$KDIR" "$KVER") || die "cannot prepare guest kernel $KVER in $KDIR"
[ -z "$out" ] || printf '%s\n' "$out" | sed 's/^/run-in-guest: /' >&2
[ "$(gk_installed_version "$KDIR")" = "$KVER" ] || die "guest kernel $KVER is not available in $KDIR"
KERNEL_IMG=$KDIR/boot/vmlinuz-$KVER
BIOS_ARGS=()
# TCG spends ~1.5 s decompressing the bzImage and ~1 s in SeaBIOS; the plain
# ELF vmlinux entered through PVH under the tiny qboot firmware skips both.
if [ "$GUEST_FAST_BOOT" = 1 ] && [ -f "$KDIR/boot/vmlinux-$KVER" ]; then
  KERNEL_IMG=$KDIR/boot/vmlinux-$KVER
  [ -f /usr/share/qemu/qboot.rom ] && BIOS_ARGS=(-bios /usr/share/qemu/qboot.rom)
fi

WORK=$(mktemp -d /tmp/run-in-guest.XXXXXX)
# shellcheck disable=SC2317  # called through the EXIT trap
cleanup() {
  if [ "$GUEST_KEEP" = 1 ]; then echo "run-in-guest: work dir kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT HUP   # run the EXIT trap on kill too
CONSOLE_LOG=${GUEST_CONSOLE_LOG:-$WORK/console.log}
: > "$CONSOLE_LOG"

# ---------------------------------------------------------------- initramfs
R=$WORK/root
mkdir -p "$R"/{bin,dev,proc,sys,host,hostro,mods}
cp "$BUSYBOX" "$R/bin/busybox"
BASE_MODULES="virtio_pci 9pnet_virtio 9p"   # 9p does not pull in its transport
[ "$GUEST_IOMMU" = 1 ] && BASE_MODULES="$BASE_MODULES vfio_iommu_type1 vfio-pci"
# --show-depends lists a module's dependencies before it, as insmod lines
for m in $BASE_MODULES $GUEST_MODULES; do
  modprobe -d "$KDIR" -S "$KVER" --show-depends "$m" || die "unknown kernel module $m"
done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' > "$WORK/ko.list"
: > "$R/mods/order"
while read -r ko; do
  b=$(basename "$ko")
  case $b in
    *.ko.xz)  xz -dc "$ko" > "$R/mods/${b%.xz}"; b=${b%.xz} ;;
    *.ko.zst) zstd -qdc "$ko" > "$R/mods/${b%.zst}"; b=${b%.zst} ;;
    *)        cp "$ko" "$R/mods/$b" ;;
  esac
  echo "$b" >> "$R/mods/order"
done < "$WORK/ko.list"

case $GUEST_CWD in /tmp|/tmp/*) GUEST_RO_DIRS="$GUEST_RO_DIRS $GUEST_CWD" ;; esac
printf '%s\n' "$CMD" > "$R/cmd.sh"
{
  printf 'HUGEPAGES=%q\n' "$GUEST_HUGEPAGES"
  printf 'VFIO_BIND=%q\n' "$GUEST_VFIO_BIND"
  printf 'RO_DIRS=%q\n' "$GUEST_RO_DIRS"
  printf 'RW_DIRS=%q\n' "$GUEST_RW_DIRS"
  printf 'CWD=%q\n' "$GUEST_CWD"
} > "$R/harness.env"

cat > "$R/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
log() { read up _ < /proc/uptime; echo "[harness ${up}s] $*" > /dev/console; }
fail() { log "FATAL: $*"; echo "@@HARNESS_RC=125@@" > /dev/console; poweroff -f; }
log "init started"
. /harness.env
while read -r m; do insmod /mods/$m || log "insmod $m failed"; done < /mods/order
log "modules loaded"
# Host root, read-only.  cache=loose is safe because nothing the guest reads
# is expected to change on the host while it runs.
O=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $O,ro,cache=loose host /hostro || fail "9p mount of the host root failed"
mount --bind /hostro /host
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
# devtmpfs lacks the links udev normally creates
ln -sf /proc/self/fd /host/dev/fd
ln -sf /proc/self/fd/0 /host/dev/stdin
ln -sf /proc/self/fd/1 /host/dev/stdout
ln -sf /proc/self/fd/2 /host/dev/stderr
mkdir -p /host/dev/pts /host/dev/shm /host/dev/hugepages
mount -t devpts -o newinstance,ptmxmode=0666 devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
mount -t hugetlbfs hugetlbfs /host/dev/hugepages
for d in /tmp /run /var/tmp; do mount -t tmpfs -o mode=1777 tmpfs /host$d; done
for d in $RO_DIRS; do
  mkdir -p /host$d && mount --bind /hostro$d /host$d || log "cannot expose $d"
done
i=0
for d in $RW_DIRS; do
  mkdir -p /host$d 2>/dev/null
  mount -t 9p -o $O,cache=mmap rw$i /host$d || fail "9p read-write mount of $d failed"
  i=$((i + 1))
done
if [ "$HUGEPAGES" != 0 ]; then
  echo "$HUGEPAGES" > /proc/sys/vm/nr_hugepages
  log "hugepages: $(grep HugePages_Total /proc/meminfo)"
fi
VFIO_BDFS=
for spec in $VFIO_BIND; do
  for d in /sys/bus/pci/devices/*; do
    bdf=${d##*/}; v=$(cat $d/vendor); dv=$(cat $d/device)
    [ "$spec" = "$bdf" ] || [ "$spec" = "${v#0x}:${dv#0x}" ] || continue
    [ -e $d/driver ] && echo "$bdf" > $d/driver/unbind
    echo vfio-pci > $d/driver_override
    echo "$bdf" > /sys/bus/pci/drivers_probe
    g=$(readlink $d/iommu_group); g=${g##*/}
    log "vfio: $bdf ($v:$dv) -> $(readlink $d/driver | sed 's,.*/,,') iommu_group=$g"
    VFIO_BDFS="$VFIO_BDFS $bdf"
  done
done
cp /cmd.sh /host/dev/shm/.guest-cmd.sh
stty -F /dev/ttyS1 raw -echo 115200 2>/dev/null
log "running command"
chroot /host /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/root TERM=dumb TMPDIR=/tmp VFIO_BDFS="${VFIO_BDFS# }" HARNESS_GUEST=1 \
  /bin/sh -c 'cd "$1" || exit 126; exec /bin/sh /dev/shm/.guest-cmd.sh' sh "$CWD" \
  < /dev/null > /dev/ttyS1 2>&1
rc=$?
log "command exited rc=$rc"
echo "@@HARNESS_RC=$rc@@" > /dev/console
sync
poweroff -f
EOF
chmod +x "$R/init"
(cd "$R" && find . | cpio -o -H newc --quiet) > "$WORK/initrd.cpio"

# ---------------------------------------------------------------- qemu
Q=(qemu-system-x86_64 -machine q35,accel=tcg -cpu "$GUEST_CPU"
   -smp "$GUEST_SMP" -m "$GUEST_MEM" -no-reboot -display none -vga none -monitor none
   -net none -kernel "$KERNEL_IMG" -initrd "$WORK/initrd.cpio" "${BIOS_ARGS[@]}")
# no_timer_check: under TCG on a busy host the kernel's IO-APIC timer check can miss its
# window and panic ("timer doesn't work through Interrupt-remapped IO-APIC").
APPEND="console=ttyS0 panic=-1 quiet no_timer_check"
if [ "$GUEST_IOMMU" = 1 ]; then
  # must precede the PCI devices it translates for
  Q+=(-device intel-iommu,caching-mode=on)
  APPEND="$APPEND intel_iommu=on iommu=pt"
fi
if [ "$GUEST_MEMFD" = 1 ]; then
  Q+=(-object "memory-backend-memfd,id=mem0,size=$GUEST_MEM,share=on" -machine memory-backend=mem0)
fi
Q+=(-fsdev local,id=fsroot,path=/,security_model=none,readonly=on,multidevs=remap
    -device virtio-9p-pci,fsdev=fsroot,mount_tag=host)
i=0
for d in $GUEST_RW_DIRS; do
  [ -d "$d" ] || die "GUEST_RW_DIRS: $d is not a directory"
  Q+=(-fsdev "local,id=fsrw$i,path=$d,security_model=none,multidevs=remap"
      -device "virtio-9p-pci,fsdev=fsrw$i,mount_tag=rw$i")
  i=$((i + 1))
done
Q+=(-serial "file:$CONSOLE_LOG" -serial stdio -append "$APPEND $GUEST_APPEND")
Q+=("$@")

T1=$(date +%s.%N)
set +e
timeout --foreground -k 5 "$GUEST_TIMEOUT" "${Q[@]}" < /dev/null
qrc=$?
set -e
T2=$(date +%s.%N)
rc=$(sed -n 's/.*@@HARNESS_RC=\([0-9]*\)@@.*/\1/p' "$CONSOLE_LOG" | tail -n 1)
if [ -z "$rc" ]; then
  if [ $qrc = 124 ]; then rc=124; else rc=125; fi
  echo "run-in-guest: guest did not report an exit status (qemu rc=$qrc); console log tail:" >&2
  tail -n 60 "$CONSOLE_LOG" >&2
elif [ "$GUEST_VERBOSE" = 1 ]; then
  cat "$CONSOLE_LOG" >&2
fi
awk -v rc="$rc" -v a="$T0" -v b="$T1" -v c="$T2" 'BEGIN {
  printf "run-in-guest: rc=%s prep=%.2fs qemu=%.2fs total=%.2fs\n", rc, b - a, c - b, c - a }' >&2
exit "$rc"
