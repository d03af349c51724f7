#!/usr/bin/env bash
# Release build: the Rust workspace (the bundled target binary among it), the Node addon into
# native/, and the TypeScript into dist/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d node_modules ] || npm install --no-audit --no-fund
cargo build --release --workspace --quiet
npx napi build --platform --release --manifest-path crates/virtio-initiator-napi/Cargo.toml \
  --package-json-path package.json --output-dir native --js index.cjs --dts index.d.cts >/dev/null
npx tsc -p tsconfig.json
