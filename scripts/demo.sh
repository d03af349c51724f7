#!/usr/bin/env bash
# The main job on a fresh machine: build everything, then start the bundled target, scan it,
# verify data on every disk and benchmark it (examples/demo.ts).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then
  # Hugepages for the DMA pool; the guest kernel and QEMU are only needed by the tests.
  bash scripts/setup-system.sh --no-kernel
fi
bash scripts/build.sh
exec node --import tsx examples/demo.ts
