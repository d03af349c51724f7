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

BIN=$ROOT/bin/spdk-rpc
PY=$ROOT/bin/python

# The environment's own pip metadata says which version is installed; the script alone could
# be left over from another one.
installed() {
  [ -x "$BIN" ] && [ -x "$PY" ] &&
    [ "$("$PY" -c "import importlib.metadata as m; print(m.version('$PACKAGE'))" 2>/dev/null)" = "$VERSION" ]
}

if [ "$FORCE" = 0 ] && installed; then
  exit 0
fi

command -v python3 >/dev/null 2>&1 ||
  die "python3 is not on PATH: install Python 3.9 or later (Debian: apt-get install python3 python3-venv)"
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' ||
  die "$PACKAGE $VERSION needs Python 3.9 or later; python3 is $(python3 --version 2>&1)"

mkdir -p "$(dirname "$ROOT")" || die "cannot create $(dirname "$ROOT")"
LOG=$(dirname "$ROOT")/install-spdk-rpc.log
say "installing $PACKAGE $VERSION into $ROOT (log: $LOG)"
start=$SECONDS
rm -rf "$ROOT"
if ! python3 -m venv "$ROOT" >"$LOG" 2>&1; then
  tail -n 10 "$LOG" >&2
  die "python3 -m venv failed (Debian: apt-get install python3-venv); the SPDK client tests skip without it (and fail under CI=true)"
fi
if ! "$PY" -m pip install --disable-pip-version-check --no-input "$PACKAGE==$VERSION" >>"$LOG" 2>&1; then
  echo "setup-spdk-rpc: pip install $PACKAGE==$VERSION failed; last lines of $LOG:" >&2
  tail -n 25 "$LOG" >&2
  die "the SPDK client tests skip without it (and fail under CI=true); PyPI must be reachable"
fi

installed || die "pip finished but $BIN ($PACKAGE $VERSION) is not there; see $LOG"
# The command must start: its --help parses every subcommand's arguments.
"$BIN" --help >/dev/null 2>&1 || die "$BIN does not run (try --force); see $LOG"
say "installed $BIN ($PACKAGE $VERSION) in $((SECONDS - start)) s"
