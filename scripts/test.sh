#!/usr/bin/env bash
# Every test of the project, from a fresh clone: system set-up (packages, guest kernel,
# hugepages), npm packages, Rust format and lint checks, Rust tests, the release build of the
# target and the addon, the TypeScript build, and the ava suites (including the QEMU guest tests).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "system set-up"
bash scripts/setup-system.sh

step "npm packages"
# npm install (not npm ci): npm 11 leaves other platforms' optional packages out of the lock
# file and then refuses it in npm ci.
if [ ! -d node_modules ] || [ package.json -nt node_modules/.package-lock.json ]; then
  npm install --no-audit --no-fund
fi

step "rustfmt"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo test"
cargo test --workspace

step "fuzzing, short pass (scripts/fuzz.sh runs long ones; the parsers' pass is in ava)"
bash scripts/fuzz-native.sh --count 20000

step "release build (target, addon, TypeScript)"
bash scripts/build.sh

step "TypeScript type check of tests, benchmarks and examples"
npx tsc -p tsconfig.test.json

step "interop target (rust-vmm vhost-device-scsi)"
bash scripts/setup-interop.sh

step "SPDK's JSON-RPC client (spdk-rpc, for the management RPC tests)"
bash scripts/setup-spdk-rpc.sh

step "ava"
npx ava
