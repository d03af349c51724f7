# shellcheck shell=bash
# guest-kernel.sh - locate, fetch and prepare the kernel that the QEMU test
# guests boot.  Sourced by scripts/setup-system.sh and run-in-guest.sh; not a
# command of its own.
#
# The guest kernel is Debian's stock amd64 kernel package, extracted with
# dpkg -x into one cache directory holding exactly one version:
#   $GUEST_KERNEL_DIR/boot/vmlinuz-VER       bzImage (fallback boot)
#   $GUEST_KERNEL_DIR/boot/vmlinux-VER       uncompressed ELF (fast PVH boot)
#   $GUEST_KERNEL_DIR/lib/modules/VER/...    modules + depmod output
#   $GUEST_KERNEL_DIR/version                VER
#
# Knobs: GUEST_KERNEL_DIR (default ~/.cache/virtio-initiator/guest-kernel),
# GUEST_KVER (force a version), GUEST_KERNEL_DEB_URL + GUEST_KERNEL_DEB_SHA256
# (where to fetch from when apt does not know the package, e.g. on Ubuntu).

# Used when apt cannot tell us what linux-image-amd64 depends on (non-Debian
# hosts, which then also need GUEST_KERNEL_DEB_URL).
GK_PINNED_VER=6.1.0-56-amd64

gk_dir() {
  echo "${GUEST_KERNEL_DIR:-${HOME:-/root}/.cache/virtio-initiator/guest-kernel}"
}

# Version already prepared in $1, or nothing.
gk_installed_version() {
  local dir=$1 v
  if [ -f "$dir/version" ]; then
    v=$(cat "$dir/version")
    if [ -f "$dir/boot/vmlinuz-$v" ] && [ -f "$dir/lib/modules/$v/modules.dep" ]; then
      echo "$v"
    fi
  fi
}

# Version to use: forced, else already prepared, else what apt's
# linux-image-amd64 pulls in, else the pinned one.
gk_wanted_version() {
  local dir=$1 v
  if [ -n "${GUEST_KVER:-}" ]; then echo "$GUEST_KVER"; return; fi
  v=$(gk_installed_version "$dir")
  if [ -n "$v" ]; then echo "$v"; return; fi
  v=$(apt-cache depends linux-image-amd64 2>/dev/null |
      sed -n 's/.*Depends: linux-image-\([0-9][^ ]*\)$/\1/p' | head -n 1) || true
  echo "${v:-$GK_PINNED_VER}"
}

# Find the compressed payload inside a bzImage and decompress it to an ELF.
# $1 bzImage, $2 output.  Returns 1 if no known compressor yields an ELF.
gk_extract_vmlinux() {
  local img=$1 out=$2 tmp="$2.tmp.$$" magic cmd off
  for pair in '\xfd\x37\x7a\x58\x5a\x00:xz -dc --single-stream' \
              '\x28\xb5\x2f\xfd:zstd -qdc' '\x1f\x8b\x08:gzip -dc' '\x04\x22\x4d\x18:lz4 -dc'; do
    magic=${pair%%:*}; cmd=${pair#*:}
    command -v "${cmd%% *}" >/dev/null 2>&1 || continue
    # every occurrence of the magic: the first may be a false match
    for off in $(LC_ALL=C grep -obUaP "$magic" "$img" 2>/dev/null | cut -d: -f1 | head -n 8); do
      tail -c +$((off + 1)) "$img" | $cmd > "$tmp" 2>/dev/null || true
      if [ "$(head -c 4 "$tmp" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
        mv "$tmp" "$out"
        return 0
      fi
    done
  done
  rm -f "$tmp"
  return 1
}

# Download the linux-image .deb for version $1 into directory $2.
gk_download_deb() {
  local ver=$1 dest=$2 url sum
  chmod 777 "$dest"   # apt-get download runs as the _apt user when root
  if (cd "$dest" && apt-get download "linux-image-$ver" >/dev/null 2>&1); then
    return 0
  fi
  if [ -n "${GUEST_KERNEL_DEB_URL:-}" ]; then
    url=$GUEST_KERNEL_DEB_URL; sum=${GUEST_KERNEL_DEB_SHA256:-}
  else
    echo "apt-get download linux-image-$ver failed and no GUEST_KERNEL_DEB_URL is set" >&2
    return 1
  fi
  if command -v curl >/dev/null 2>&1; then
    curl -fsSL --retry 3 -o "$dest/kernel.deb" "$url" || return 1
  elif command -v wget >/dev/null 2>&1; then
    wget -q -O "$dest/kernel.deb" "$url" || return 1
  else
    echo "neither curl nor wget is installed to fetch $url" >&2
    return 1
  fi
  if [ -n "$sum" ] && ! echo "$sum  $dest/kernel.deb" | sha256sum -c --status; then
    echo "checksum mismatch for $url" >&2
    return 1
  fi
}

# Make sure kernel version $2 is prepared in $1.  Prints one line per step it
# performs on stdout (nothing when all is in place); errors go to stderr.
gk_prepare() {
  local dir=$1 ver=$2 parent new old deb
  if [ "$(gk_installed_version "$dir")" = "$ver" ] && [ -f "$dir/boot/vmlinux-$ver" ]; then
    return 0
  fi
  parent=$(dirname "$dir")
  mkdir -p "$parent" || return 1
  # Concurrent test runs may all find the kernel missing: one prepares it.
  exec 9>"$dir.lock" || return 1
  flock 9 || return 1
  if [ "$(gk_installed_version "$dir")" != "$ver" ]; then
    new=$(mktemp -d "$dir.new.XXXXXX") || return 1
    if ! gk_download_deb "$ver" "$new"; then
      rm -rf "$new"; exec 9>&-; return 1
    fi
    deb=$(find "$new" -maxdepth 1 -name '*.deb' | head -n 1)
    if ! dpkg -x "$deb" "$new"; then
      echo "dpkg -x $deb failed" >&2; rm -rf "$new"; exec 9>&-; return 1
    fi
    rm -f "$new"/*.deb
    if [ ! -f "$new/boot/vmlinuz-$ver" ] || [ ! -d "$new/lib/modules/$ver" ]; then
      echo "package linux-image-$ver has no boot/vmlinuz-$ver or lib/modules/$ver" >&2
      rm -rf "$new"; exec 9>&-; return 1
    fi
    echo "fetched linux-image-$ver into $dir"
    if ! depmod -b "$new" "$ver"; then
      echo "depmod -b $new $ver failed" >&2; rm -rf "$new"; exec 9>&-; return 1
    fi
    echo "ran depmod for $ver"
    echo "$ver" > "$new/version"
    chmod 755 "$new"
    if [ -e "$dir" ]; then
      old="$dir.old.$$"
      mv "$dir" "$old" && mv "$new" "$dir" && rm -rf "$old"
    else
      mv "$new" "$dir"
    fi
  fi
  if [ ! -f "$dir/boot/vmlinux-$ver" ]; then
    if gk_extract_vmlinux "$dir/boot/vmlinuz-$ver" "$dir/boot/vmlinux-$ver"; then
      echo "extracted vmlinux-$ver for PVH boot"
    else
      echo "could not extract vmlinux from vmlinuz-$ver (guests boot the bzImage, slower)" >&2
    fi
  fi
  exec 9>&-
  return 0
}
