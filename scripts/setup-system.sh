#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# setup-system.sh - prepare a host for the QEMU guest tests, the qemu-storage-daemon
# interop tests and for PCI/hugepage work: host tools, the guest kernel, 2 MiB
# hugepages.  Idempotent; silent when everything is already in place, one line
# per action otherwise.
#
# Usage: scripts/setup-system.sh [--kernel-dir DIR] [--hugepages N] [--no-kernel] [--no-hugepages]
#
#   --kernel-dir DIR   guest kernel cache (default $GUEST_KERNEL_DIR or
#                      ~/.cache/virtio-initiator/guest-kernel)
#   --hugepages N      free 2 MiB hugepages to guarantee (default 512 = 1 GiB)
#
# Meant to run as root.  Without root it still prepares the guest kernel (that
# needs no privileges), reports what it could not do, and exits 0 so that the
# tests then skip.  Exit status is non-zero only when something that should
# have worked failed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=guest/guest-kernel.sh
. "$HERE/guest/guest-kernel.sh"

HUGEPAGES=512
DO_KERNEL=1
DO_HUGEPAGES=1
while [ $# -gt 0 ]; do
  case $1 in
    --kernel-dir) [ $# -ge 2 ] || { echo "setup-system: --kernel-dir needs a value" >&2; exit 2; }
                  export GUEST_KERNEL_DIR=$2; shift 2 ;;
    --hugepages)  [ $# -ge 2 ] || { echo "setup-system: --hugepages needs a value" >&2; exit 2; }
                  HUGEPAGES=$2; shift 2 ;;
    --no-kernel)    DO_KERNEL=0; shift ;;
    --no-hugepages) DO_HUGEPAGES=0; shift ;;
    -h|--help) sed -n '3,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'; exit 0 ;;
    *) echo "setup-system: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $HUGEPAGES in ''|*[!0-9]*) echo "setup-system: --hugepages wants a number, got '$HUGEPAGES'" >&2; exit 2 ;; esac

say() { echo "setup-system: $*"; }
FAILED=0
fail() { echo "setup-system: FAILED: $*" >&2; FAILED=1; }
IS_ROOT=0
[ "$(id -u)" = 0 ] && IS_ROOT=1

# ------------------------------------------------------------ packages
# package -> a file it must provide (busybox must be the static build: it is
# copied into the guest initramfs, which has no libc)
PKGS="qemu-system-x86:/usr/bin/qemu-system-x86_64 busybox-static:/bin/busybox kmod:/sbin/depmod
cpio:/usr/bin/cpio xz-utils:/usr/bin/xz file:/usr/bin/file util-linux:/usr/bin/flock
python3-venv:/usr/share/doc/python3-venv binutils:/usr/bin/objdump
qemu-system-common:/usr/bin/qemu-storage-daemon"
pkg_installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}
MISSING=()
for entry in $PKGS; do
  pkg=${entry%%:*}
  if command -v dpkg-query >/dev/null 2>&1; then
    pkg_installed "$pkg" || MISSING+=("$pkg")
  else
    [ -e "${entry#*:}" ] || MISSING+=("$pkg")
  fi
done
APT_UPDATED=0
apt_update_once() {
  [ "$APT_UPDATED" = 1 ] && return 0
  APT_UPDATED=1
  if apt-get update -qq >/dev/null 2>&1; then say "ran apt-get update"; else fail "apt-get update"; fi
}
if [ ${#MISSING[@]} -gt 0 ]; then
  if [ "$IS_ROOT" != 1 ]; then
    say "not root: cannot install ${MISSING[*]}"
  elif ! command -v apt-get >/dev/null 2>&1; then
    fail "no apt-get to install ${MISSING[*]}; install them with the system's package manager"
  else
    apt_update_once
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${MISSING[@]}" >/dev/null 2>&1; then
      say "installed ${MISSING[*]}"
    else
      fail "apt-get install ${MISSING[*]}"
    fi
  fi
fi

# ------------------------------------------------------------ guest kernel
if [ "$DO_KERNEL" = 1 ]; then
  if ! command -v dpkg >/dev/null 2>&1 || ! command -v depmod >/dev/null 2>&1; then
    say "cannot prepare the guest kernel: dpkg and depmod (kmod) are needed"
    [ "$IS_ROOT" = 1 ] && FAILED=1
  else
    KDIR=$(gk_dir)
    KVER=$(gk_wanted_version "$KDIR")
    # A fresh machine may have no package lists yet; refresh once, as root.
    if [ -z "$(gk_installed_version "$KDIR")" ] && [ "$IS_ROOT" = 1 ] &&
       command -v apt-get >/dev/null 2>&1 &&
       ! apt-cache show "linux-image-$KVER" >/dev/null 2>&1; then
      apt_update_once
      [ -n "${GUEST_KVER:-}" ] || KVER=$(gk_wanted_version "$KDIR")
    fi
    if ! out=$(gk_prepare "$KDIR" "$KVER"); then
      if [ "$IS_ROOT" = 1 ]; then fail "preparing guest kernel $KVER in $KDIR"
      else say "not root: could not prepare guest kernel $KVER in $KDIR (see above)"; fi
    fi
    [ -n "$out" ] && printf '%s\n' "$out" | sed 's/^/setup-system: /'
  fi
fi

# ------------------------------------------------------------ hugepages
meminfo() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }
if [ "$DO_HUGEPAGES" = 1 ] && [ "$HUGEPAGES" -gt 0 ]; then
  if [ "$(meminfo Hugepagesize)" != 2048 ]; then
    say "default hugepage size is $(meminfo Hugepagesize) kB, not 2048: leaving hugepages alone"
  else
    free=$(meminfo HugePages_Free)
    if [ "$free" -lt "$HUGEPAGES" ]; then
      if [ "$IS_ROOT" != 1 ]; then
        say "not root: cannot reserve hugepages ($free of $HUGEPAGES 2 MiB pages free)"
      else
        total=$(cat /proc/sys/vm/nr_hugepages)
        want=$((total + HUGEPAGES - free))
        echo "$want" > /proc/sys/vm/nr_hugepages || true
        free=$(meminfo HugePages_Free)
        if [ "$free" -ge "$HUGEPAGES" ]; then
          say "reserved 2 MiB hugepages: nr_hugepages $total -> $want ($free free)"
        else
          fail "asked for $want 2 MiB hugepages, the kernel gave $(cat /proc/sys/vm/nr_hugepages) ($free free, need $HUGEPAGES)"
        fi
      fi
    fi
  fi
  if ! awk '$2 == "/dev/hugepages" && $3 == "hugetlbfs" { found = 1 } END { exit !found }' /proc/mounts; then
    if [ "$IS_ROOT" != 1 ]; then
      say "not root: cannot mount hugetlbfs at /dev/hugepages"
    elif mkdir -p /dev/hugepages && mount -t hugetlbfs -o pagesize=2M hugetlbfs /dev/hugepages; then
      say "mounted hugetlbfs at /dev/hugepages"
    else
      fail "mount -t hugetlbfs hugetlbfs /dev/hugepages"
    fi
  fi
fi

exit "$FAILED"
