#!/usr/bin/env bash
# setup-zig.sh - install zig and cargo-zigbuild (both PyPI wheels) at pinned versions into a
# project-local Python virtual environment. The release build links through zig so that the
# addon and the bundled target need no newer glibc than 2.28, whatever the build machine has.
# Idempotent: silent when the pinned versions are installed, one line per action otherwise.
#
# Usage: scripts/setup-zig.sh [--root DIR] [--force]
#
#   --root DIR   virtual environment (default $ZIG_ROOT or <repo>/.cache/zig); scripts/build.sh
#                puts DIR/bin on PATH (cargo-zigbuild finds zig through `python3 -m ziglang`)
#   --force      recreate the environment even when the pinned versions are there
#
# Needs python3 (3.9 or later) with its venv module, and PyPI.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=${ZIG_ROOT:-$REPO/.cache/zig}
ZIG_VERSION=0.17.1
ZIGBUILD_VERSION=0.24.1
NAME=setup-zig
source "$REPO/scripts/lib/setup-args.sh"
source "$REPO/scripts/lib/venv.sh"

PY=$ROOT/bin/python
installed() {
  [ -x "$ROOT/bin/cargo-zigbuild" ] && venv_has "$PY" ziglang "$ZIG_VERSION" &&
    venv_has "$PY" cargo-zigbuild "$ZIGBUILD_VERSION"
}

if [ "$FORCE" = 0 ] && installed; then
  exit 0
fi

start=$SECONDS
LOG=$(dirname "$ROOT")/install-zig.log
venv_create "$ROOT" "$LOG" "the release build cannot link for glibc 2.28 without them" \
  "ziglang==$ZIG_VERSION" "cargo-zigbuild==$ZIGBUILD_VERSION"
installed || die "pip finished but cargo-zigbuild or ziglang is not there; see $LOG"
"$PY" -m ziglang version >/dev/null 2>&1 || die "zig does not run (try --force); see $LOG"
say "installed zig $ZIG_VERSION and cargo-zigbuild $ZIGBUILD_VERSION in $((SECONDS - start)) s"
