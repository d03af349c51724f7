#!/usr/bin/env bash
# Release build of the Rust workspace: the bundled target binary and the Node addon.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --quiet
