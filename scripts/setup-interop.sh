#!/usr/bin/env bash
# setup-interop.sh - install the third-party vhost-user-scsi backends the interop tests run
# against, into a project-local root (nothing system-wide).  Today that is rust-vmm's
# vhost-device-scsi, built from crates.io at a pinned version with its own lock file.
# Idempotent: silent when the pinned version is already installed, one line per action
# otherwise, and the build log's tail plus a hint when something fails.
#
# Usage: scripts/setup-interop.sh [--root DIR] [--force]
#
#   --root DIR   install root (default $INTEROP_ROOT or <repo>/.cache/interop); the binary
#                lands in DIR/bin/vhost-device-scsi, where __test__/interop-*.spec.ts look
#   --force      rebuild even when the pinned version is already there
#
# Building takes about 1.5 minutes of two cores and needs crates.io.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=${INTEROP_ROOT:-$REPO/.cache/interop}
# 0.1.0 is the only release on crates.io; its Cargo.lock pins vhost 0.8 / vhost-user-backend 0.10.
CRATE=vhost-device-scsi
VERSION=0.1.0
NAME=setup-interop
source "$REPO/scripts/lib/setup-args.sh"

BIN=$ROOT/bin/$CRATE

# cargo install records what it installed in .crates.toml; the binary alone could be stale.
installed() {
  [ -x "$BIN" ] && [ -f "$ROOT/.crates.toml" ] &&
    grep -q "^\"$CRATE $VERSION (registry+" "$ROOT/.crates.toml"
}

if [ "$FORCE" = 0 ] && installed; then
  exit 0
fi

command -v cargo >/dev/null 2>&1 ||
  die "cargo is not on PATH: install a Rust toolchain (rustup or the distribution's cargo)"

mkdir -p "$ROOT" || die "cannot create $ROOT"
LOG=$ROOT/install-$CRATE.log
say "building $CRATE $VERSION into $ROOT (log: $LOG)"
start=$SECONDS
force_flag=()
[ "$FORCE" = 1 ] && force_flag=(--force)
# A private target dir: a shared CARGO_TARGET_DIR would mix this build's old dependency
# versions into the workspace's build directory.
if ! CARGO_TARGET_DIR=$ROOT/build cargo install --locked --root "$ROOT" "${force_flag[@]}" \
  "$CRATE@$VERSION" >"$LOG" 2>&1; then
  echo "setup-interop: cargo install $CRATE@$VERSION failed; last lines of $LOG:" >&2
  tail -n 25 "$LOG" >&2
  die "the interop tests skip without it (and fail under CI=true); crates.io must be reachable"
fi
rm -rf "$ROOT/build"

installed || die "cargo install finished but $BIN (version $VERSION) is not there; see $LOG"
# The binary must start: a clap usage error would mean a different program under that name.
"$BIN" --help >/dev/null 2>&1 || die "$BIN does not run (try --force); see $LOG"
say "installed $BIN ($CRATE $VERSION) in $((SECONDS - start)) s"
