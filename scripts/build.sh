#!/usr/bin/env bash
# Release build of what the npm packages ship: the Node addon and the bundled vhost-user-scsi
# target for one platform (the host's by default), stripped and linked through zig for glibc
# 2.28, so that they run on older distributions than the build machine's. Both land in the
# platform package's folder npm/<platform>/, the addon also in native/ for this checkout; then
# the TypeScript into dist/.
#
# Usage: scripts/build.sh [RUST_TARGET]   e.g. aarch64-unknown-linux-gnu, x86_64-unknown-linux-musl
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=build
die() { echo "$NAME: $*" >&2; exit 1; }

target=${1:-$(rustc -vV | sed -n 's/^host: //p')}
case $target in
  x86_64-unknown-linux-gnu) platform=linux-x64-gnu ;;
  aarch64-unknown-linux-gnu) platform=linux-arm64-gnu ;;
  x86_64-unknown-linux-musl) platform=linux-x64-musl ;;
  aarch64-unknown-linux-musl) platform=linux-arm64-musl ;;
  *) die "no npm package for $target (see package.json napi.targets)" ;;
esac
# The glibc baseline is part of the target name for cargo-zigbuild; musl links statically.
case $target in *-gnu) link_target=$target.2.28 ;; *) link_target=$target ;; esac

[ -d node_modules ] || npm install --no-audit --no-fund
bash scripts/setup-zig.sh
export PATH="$PWD/.cache/zig/bin:$PATH"
rustup target list --installed 2>/dev/null | grep -qx "$target" || rustup target add "$target" >/dev/null ||
  die "the Rust target $target is not installed and rustup cannot add it"

cargo zigbuild --release --quiet --target "$link_target" -p vhost-user-scsi-target
npx napi build --platform --release --cross-compile --target "$link_target" \
  --manifest-path crates/virtio-initiator-napi/Cargo.toml --package-json-path package.json \
  --output-dir native --js index.cjs --dts index.d.cts >/dev/null

addon=native/virtio-initiator.$platform.node
[ -f "$addon" ] || die "the addon build left no $addon"
# Copied under a temporary name and renamed: a running target keeps its old file.
place() { cp "$1" "$2.tmp" && mv -f "$2.tmp" "$2"; }
place "$addon" "npm/$platform/virtio-initiator.$platform.node"
place "${CARGO_TARGET_DIR:-target}/$target/release/vhost-user-scsi-target" "npm/$platform/vhost-user-scsi-target"
npx tsc -p tsconfig.json
