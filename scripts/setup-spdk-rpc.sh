#!/usr/bin/env bash
# setup-spdk-rpc.sh - install SPDK's own JSON-RPC client (the PyPI package "spdk", command
# spdk-rpc) at a pinned version into a project-local Python virtual environment, so that
# __test__/rpc.spec.ts drives the management RPC server with the client SPDK users have.
# Idempotent: silent when the pinned version is already installed, one line per action
# otherwise, and the install log's tail plus a hint when something fails.
#
# Usage: scripts/setup-spdk-rpc.sh [--root DIR] [--force]
#
#   --root DIR   virtual environment (default $SPDK_RPC_ROOT or <repo>/.cache/spdk-rpc); the
#                command lands in DIR/bin/spdk-rpc, where __test__/rpc.spec.ts looks
#   --force      recreate the environment even when the pinned version is there
#
# Needs python3 (3.9 or later) with its venv module, and PyPI.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=${SPDK_RPC_ROOT:-$REPO/.cache/spdk-rpc}
PACKAGE=spdk
VERSION=26.9
NAME=setup-spdk-rpc
source "$REPO/scripts/lib/setup-args.sh"

source "$REPO/scripts/lib/venv.sh"

BIN=$ROOT/bin/spdk-rpc
PY=$ROOT/bin/python
installed() { [ -x "$BIN" ] && venv_has "$PY" "$PACKAGE" "$VERSION"; }

if [ "$FORCE" = 0 ] && installed; then
  exit 0
fi

start=$SECONDS
venv_create "$ROOT" "$(dirname "$ROOT")/install-spdk-rpc.log" \
  "the SPDK client tests skip without it (and fail under CI=true)" "$PACKAGE==$VERSION"
installed || die "pip finished but $BIN ($PACKAGE $VERSION) is not there; see $(dirname "$ROOT")/install-spdk-rpc.log"
# The command must start: its --help parses every subcommand's arguments.
"$BIN" --help >/dev/null 2>&1 || die "$BIN does not run (try --force)"
say "installed $BIN ($PACKAGE $VERSION) in $((SECONDS - start)) s"
