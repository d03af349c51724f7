#!/bin/bash
# blk-disk-check.sh - in-guest check of a virtio-blk disk through the guest
# kernel's own virtio_blk driver.  Runs inside a run-in-guest.sh guest (host
# tools are available through the chroot).  It overwrites the disk, so it
# refuses to run without HARNESS_GUEST=1 (set by run-in-guest.sh).
#
# It waits for the one virtio-blk disk, checks its size, logical block size and
# hardware queues, reads a range the host preset (--hash), writes fresh random
# data at the first blocks, a 1 MiB aligned middle range and the last blocks
# (O_DIRECT, alternating CPUs so every virtqueue carries requests), reads each
# back and compares, then discards a written range and reads zeros from it.
#
# Usage: blk-disk-check.sh --expect SIZE:BS [--hash OFF:LEN] [--queues N] [--serial S]
#
# Every finding is one "@@..." line on stdout:
#   @@DISK dev=vdX size=BYTES lbs=BS serial=...
#   @@MQ dev=vdX hw_queues=N
#   @@HASH off=BYTES len=BYTES sha256=HEX      (--hash, read before any write)
#   @@DATA off=BYTES len=BYTES sha256=HEX      (data written and read back)
#   @@DISCARD off=BYTES len=BYTES zeroes=ok
#   @@RESULT PASS        or   @@FAIL reason   (then dmesg, exit 1)
set -uo pipefail

EXPECT= HASH= QUEUES=0 SERIAL=
WORKDIR=${TMPDIR:-/tmp}/blk-disk-check.$$

fail() {
  echo "@@FAIL $*"
  echo "---- guest dmesg (tail) ----"
  dmesg 2>/dev/null | tail -n 60
  exit 1
}

while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || { echo "@@FAIL bad arguments"; exit 2; }
  case $1 in
    --expect) EXPECT=$2 ;;
    --hash) HASH=$2 ;;
    --queues) QUEUES=$2 ;;
    --serial) SERIAL=$2 ;;
    *) echo "@@FAIL unknown argument $1"; exit 2 ;;
  esac
  shift 2
done
[ -n "$EXPECT" ] || { echo "@@FAIL --expect SIZE:BS is required"; exit 2; }
[ "${HARNESS_GUEST:-}" = 1 ] || fail "refusing to overwrite disks outside a run-in-guest.sh guest"
SIZE=${EXPECT%%:*} BS=${EXPECT##*:}
mkdir -p "$WORKDIR" || fail "cannot create $WORKDIR"

# the virtio-blk disk, once it has a capacity
dev=
for _ in $(seq 1 600); do
  for b in /sys/block/vd*; do
    [ -e "$b" ] && [ "$(cat "$b/size")" -gt 0 ] 2>/dev/null && dev=${b##*/} && break
  done
  [ -n "$dev" ] && break
  sleep 0.1
done
[ -n "$dev" ] || fail "no virtio-blk disk appeared"

got_size=$(blockdev --getsize64 "/dev/$dev") || fail "blockdev --getsize64 /dev/$dev failed"
got_bs=$(cat "/sys/block/$dev/queue/logical_block_size")
serial=$(cat "/sys/block/$dev/serial" 2>/dev/null || echo unknown)
echo "@@DISK dev=$dev size=$got_size lbs=$got_bs serial=$serial"
[ "$got_size" = "$SIZE" ] || fail "/dev/$dev: size $got_size bytes, expected $SIZE"
[ "$got_bs" = "$BS" ] || fail "/dev/$dev: logical block size $got_bs, expected $BS"
[ -z "$SERIAL" ] || [ "$serial" = "$SERIAL" ] || fail "/dev/$dev: serial '$serial', expected '$SERIAL'"
hw=$(ls -d "/sys/block/$dev/mq/"* 2>/dev/null | wc -l)
echo "@@MQ dev=$dev hw_queues=$hw"
if [ "$QUEUES" -gt 0 ]; then
  want=$(( QUEUES < $(nproc) ? QUEUES : $(nproc) ))
  [ "$hw" = "$want" ] || fail "/dev/$dev has $hw hardware queues, expected $want"
fi

if [ -n "$HASH" ]; then
  off=${HASH%%:*} len=${HASH##*:}
  sum=$(dd if="/dev/$dev" bs=4096 skip="$off" count="$len" iflag=direct,skip_bytes,count_bytes status=none |
    sha256sum | cut -d' ' -f1) || fail "read of the preset range failed"
  echo "@@HASH off=$off len=$len sha256=$sum"
fi

CPUS=$(nproc)
on_cpu() { local cpu=$(($1 % CPUS)); shift; taskset -c "$cpu" "$@"; }

# region OFF LEN CPU: fresh random data written O_DIRECT, read back, compared
region() {
  local off=$1 len=$2 cpu=$3 file="$WORKDIR/data.$1" rb="$WORKDIR/rb.$1"
  head -c "$len" /dev/urandom > "$file" || fail "cannot create pattern"
  on_cpu "$cpu" dd if="$file" of="/dev/$dev" bs=64K seek="$off" oflag=direct,seek_bytes conv=notrunc,fsync \
    status=none || fail "write of $len bytes at $off failed"
  on_cpu $((cpu + 1)) dd if="/dev/$dev" of="$rb" bs=16K skip="$off" count="$len" \
    iflag=direct,skip_bytes,count_bytes status=none || fail "read of $len bytes at $off failed"
  cmp -s "$rb" "$file" || fail "data mismatch at offset $off, $len bytes: $(cmp "$rb" "$file" 2>&1 | head -n 1)"
  echo "@@DATA off=$off len=$len sha256=$(sha256sum < "$file" | cut -d' ' -f1)"
}
region 0 $((64 * 1024)) 0
region $((SIZE / 2 / 1048576 * 1048576)) $((1024 * 1024)) 1
region $((SIZE - 64 * 1024)) $((64 * 1024)) 0

# discard the middle range: it reads back as zeros
mid=$((SIZE / 2 / 1048576 * 1048576))
blkdiscard -o "$mid" -l $((256 * 1024)) "/dev/$dev" || fail "blkdiscard failed"
dd if="/dev/$dev" of="$WORKDIR/z" bs=64K skip="$mid" count=$((256 * 1024)) iflag=direct,skip_bytes,count_bytes \
  status=none || fail "read after discard failed"
cmp -s "$WORKDIR/z" <(head -c $((256 * 1024)) /dev/zero) || fail "the discarded range does not read as zeros"
echo "@@DISCARD off=$mid len=$((256 * 1024)) zeroes=ok"
rm -rf "$WORKDIR"
echo "@@RESULT PASS"
