#!/usr/bin/env bash
# Fuzzes the Rust parsers of hostile input (used ring, virtio-scsi and virtio-blk responses,
# configuration space, vhost-user replies, the target's request path) on stable Rust:
#   scripts/fuzz-native.sh [--count N] [--seed S] [TARGET]
# TARGET is one of used-ring, scsi-response, blk-response, config-space, vhost-user-reply,
# target-request, or all (the default); N defaults to 100000 executions per target. One line
# per target; a crash prints the input and how to reproduce it, and the script exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

count=100000
seed=0
target=all
while [ $# -gt 0 ]; do
  case "$1" in
    --count) count="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    -*) echo "fuzz-native.sh: unknown option $1" >&2; exit 2 ;;
    *) target="$1"; shift ;;
  esac
done

# Optimised, but with arithmetic overflow checks and debug assertions, so that an overflow is a
# crash rather than a silent wrap; in a target directory of its own, away from shipped builds.
dir="${CARGO_TARGET_DIR:-target}/fuzz-native"
CARGO_TARGET_DIR="$dir" CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true \
  CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true cargo build --release --quiet -p virtio-fuzz
exec "$dir/release/virtio-fuzz" "$target" --count "$count" --seed "$seed"
