#!/bin/bash
# pci-check.sh - guest side of __test__/pci-initiator.spec.ts: runs inside a QEMU guest made by
# run-in-guest.sh (GUEST_VFIO_BIND set, so the function under test is already on vfio-pci and
# named in $VFIO_BDFS), reports what the guest offers, then drives the function from
# userspace with __test__/helpers/pci-guest-runner.ts.
#
# Usage: scripts/guest/pci-check.sh SPEC   (SPEC: base64 of the runner's JSON spec)
#
# Output: marker lines "@@NAME subject key=value ..." (see the runner), failures as "!! ...".
# Exit status: 0 when every check passed.
set -uo pipefail

[ $# -eq 1 ] || { echo "usage: $0 BASE64_SPEC" >&2; exit 2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

fail() { echo "!! $*"; echo "@@RESULT FAIL"; exit 1; }

[ "$(id -u)" = 0 ] || fail "not root: VFIO and driver binding need root"
[ -e /dev/vfio/vfio ] || fail "/dev/vfio/vfio is missing (vfio-pci not loaded?)"
[ -n "${VFIO_BDFS:-}" ] || fail "no function was bound to vfio-pci (GUEST_VFIO_BIND)"
command -v node >/dev/null || fail "node is not on PATH in the guest"

groups=$(ls /sys/kernel/iommu_groups 2>/dev/null | wc -l)
free=$(awk '$1 == "HugePages_Free:" { print $2 }' /proc/meminfo)
echo "@@ENV guest iommu_groups=$groups hugepages_free=${free:-0} vfio=${VFIO_BDFS// /,} kernel=$(uname -r)"

cd "$ROOT" || fail "cannot enter $ROOT"
start=$(date +%s.%N)
node --import tsx "$ROOT/__test__/helpers/pci-guest-runner.ts" "$1"
rc=$?
awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "@@TIME runner seconds=%.1f\n", b - a }'
exit $rc
