#!/usr/bin/env bash
# fuzz.sh - every fuzz target at a given count: the native ones (crates/fuzz: used rings,
# virtio-scsi and virtio-blk responses, configuration space, vhost-user replies, the target's
# request path) and the TypeScript SCSI response parsers (fast-check properties). One line per
# target; exits non-zero on the first crash or failed property, with what reproduces it.
#
# Usage: scripts/fuzz.sh [--count N] [--seed S]   (N executions per target, default 100000)
set -euo pipefail
cd "$(dirname "$0")/.."

count=100000
seed=0
while [ $# -gt 0 ]; do
  case "$1" in
    --count) count="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "fuzz.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

bash scripts/fuzz-native.sh --count "$count" --seed "$seed"
node --import tsx scripts/fuzz-parsers.ts --count "$count" --seed "$seed"
