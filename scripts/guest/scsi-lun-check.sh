#!/bin/bash
# scsi-lun-check.sh - in-guest check of a virtio-scsi controller through the
# guest kernel's own drivers (virtio_scsi + sd).  Runs inside a run-in-guest.sh
# guest (host tools are available through the chroot).  It overwrites the
# disks it checks, so it refuses to run without HARNESS_GUEST=1 (set by
# run-in-guest.sh).
#
# Per disk it writes fresh random data at the first blocks, a 1 MiB aligned
# middle range and the last blocks (O_DIRECT, several I/O sizes, alternating
# CPUs so every virtqueue carries requests), reads each back and compares.
#
# Usage: scsi-lun-check.sh --expect T:L:SIZE:BS [--expect ...] [--discard T:L]
#          [--hash T:L:OFF:LEN] [--hotplug T:L:SIZE:BS] [--queues N] [--scan-timeout S]
#          [--hotplug-timeout S] [--rescan-after S]
#
#   --expect T:L:SIZE:BS  a LUN that must be found (SIZE in bytes or with a
#                         K/M/G suffix, BS the logical block size); LUNs that
#                         are found but not expected are an error
#   --hash T:L:OFF:LEN    before writing anything, read LEN bytes at OFF and
#                         print their sha256 (lets the host check that reads
#                         return what its backing store holds)
#   --discard T:L         LUN on which discarding a written range must read back zeros
#   --hotplug T:L:SIZE:BS after the static checks print "@@HOTPLUG_ADD T:L",
#                         wait for that LUN to appear (rescanning the host
#                         after --rescan-after seconds if no event added it),
#                         check and exercise it, print "@@HOTPLUG_REMOVE T:L"
#                         and wait until it is gone
#   --queues N            request queues the device offers: each disk must get
#                         min(N, online CPUs) blk-mq hardware queues, all used
#
# Every finding is one "@@..." line on stdout:
#   @@LUN T:L dev=sdX size=BYTES lbs=BS vendor=... model=...
#   @@MQ T:L dev=sdX hw_queues=N
#   @@VQ hostN virtioM request_irqs=A,B         (completions per request queue)
#   @@HASH T:L off=BYTES len=BYTES sha256=HEX    (--hash, read before any write)
#   @@DATA T:L off=BYTES len=BYTES sha256=HEX    (data written and read back)
#   @@DISCARD T:L off=BYTES len=BYTES zeroes=ok
#   @@HOTPLUG_ADD T:L / @@HOTPLUG_ADDED T:L via=event|rescan seconds=N
#   @@HOTPLUG_LUN ... (like @@LUN) / @@HOTPLUG_REMOVE T:L / @@HOTPLUG_REMOVED T:L seconds=N
#   @@HOTPLUG_STRAY T:L lun_hex=0xNNNN   (a LUN that appeared instead of the added one)
#   @@RESULT PASS        or   @@FAIL reason   (then dmesg, exit 1)
set -uo pipefail

SCAN_TIMEOUT=120
HOTPLUG_TIMEOUT=60
RESCAN_AFTER=20
QUEUES=0
EXPECT=()
HASHES=()
DISCARD=
HOTPLUG=
WORKDIR=${TMPDIR:-/tmp}/scsi-lun-check.$$

fail() {
  echo "@@FAIL $*"
  echo "---- guest dmesg (tail) ----"
  dmesg 2>/dev/null | tail -n 80
  exit 1
}

# bad arguments: no point in a dmesg dump
arg_error() { echo "@@FAIL $*"; exit 2; }

usage() { sed -n '2,/^set -uo/p' "$0" | sed -n 's/^# \{0,1\}//p' >&2; exit 2; }

while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || usage
  case $1 in
    --expect) EXPECT+=("$2") ;;
    --discard) DISCARD=$2 ;;
    --hash) HASHES+=("$2") ;;
    --hotplug) HOTPLUG=$2 ;;
    --queues) QUEUES=$2 ;;
    --scan-timeout) SCAN_TIMEOUT=$2 ;;
    --hotplug-timeout) HOTPLUG_TIMEOUT=$2 ;;
    --rescan-after) RESCAN_AFTER=$2 ;;
    *) usage ;;
  esac
  shift 2
done
[ ${#EXPECT[@]} -gt 0 ] || usage

is_number() { case $1 in ''|*[!0-9]*) return 1 ;; esac; }

to_bytes() {  # 64M -> 67108864; fails on anything else
  local n=${1%[KkMmGg]} mult=1
  case $1 in
    *[Kk]) mult=1024 ;;
    *[Mm]) mult=$((1024 * 1024)) ;;
    *[Gg]) mult=$((1024 * 1024 * 1024)) ;;
  esac
  is_number "$n" || return 1
  echo $((n * mult))
}

# parse_lun_spec T:L:SIZE:BS -> sets SPEC_T SPEC_L SPEC_SIZE SPEC_BS
parse_lun_spec() {
  local spec=$1 IFS=:
  # shellcheck disable=SC2086
  set -- $spec
  if ! { [ $# -eq 4 ] && is_number "$1" && is_number "$2" && is_number "$4" &&
          SPEC_SIZE=$(to_bytes "$3"); }; then
    arg_error "bad LUN spec '$spec' (want T:L:SIZE:BS, e.g. 0:1:64M:512)"
  fi
  SPEC_T=$1 SPEC_L=$2 SPEC_BS=$4
}

now() { date +%s; }
sysread() { cat "$1" 2>/dev/null; }

# SCSI hosts driven by virtio_scsi, e.g. "host0"
virtio_hosts() {
  local h
  for h in /sys/class/scsi_host/host*; do
    [ "$(sysread "$h/proc_name")" = virtio_scsi ] && echo "${h##*/}"
  done
}

# scsi_device sysfs name (H:C:T:L) of target T LUN L, if present
scsi_dev_of() {
  local h
  for h in $(virtio_hosts); do
    if [ -e "/sys/class/scsi_device/${h#host}:0:$1:$2" ]; then
      echo "${h#host}:0:$1:$2"
      return 0
    fi
  done
  return 1
}

# sd block device name of target T LUN L once it has a non-zero capacity
block_of() {
  local sd b
  sd=$(scsi_dev_of "$1" "$2") || return 1
  for b in "/sys/class/scsi_device/$sd/device/block/"*; do
    [ -e "$b" ] || return 1
    [ "$(sysread "$b/size")" -gt 0 ] 2>/dev/null || return 1
    echo "${b##*/}"
    return 0
  done
  return 1
}

# T:L of every LUN on the virtio hosts
found_luns() {
  local h d n
  for h in $(virtio_hosts); do
    for d in /sys/class/scsi_device/"${h#host}":*; do
      [ -e "$d" ] || continue
      n=${d##*/}                         # H:C:T:L
      n=${n#*:}; n=${n#*:}               # T:L
      echo "$n"
    done
  done | sort -t: -k1,1n -k2,2n
}

# check_lun KIND T L SIZE BS: size and logical block size as expected
check_lun() {
  local kind=$1 t=$2 l=$3 size=$4 bs=$5 dev got_size got_bs sd
  dev=$(block_of "$t" "$l") || fail "LUN $t:$l has no sd block device"
  sd=$(scsi_dev_of "$t" "$l")
  got_size=$(blockdev --getsize64 "/dev/$dev") || fail "blockdev --getsize64 /dev/$dev failed"
  got_bs=$(sysread "/sys/block/$dev/queue/logical_block_size")
  echo "@@$kind $t:$l dev=$dev size=$got_size lbs=$got_bs" \
    "vendor=$(sysread "/sys/class/scsi_device/$sd/device/vendor" | tr -d ' ')" \
    "model=$(sysread "/sys/class/scsi_device/$sd/device/model" | tr -d ' ')"
  [ "$got_size" = "$size" ] || fail "LUN $t:$l (/dev/$dev): size $got_size bytes, expected $size"
  [ "$got_bs" = "$bs" ] || fail "LUN $t:$l (/dev/$dev): logical block size $got_bs, expected $bs"
}

CPUS=$(nproc)
on_cpu() {  # on_cpu N CMD...: run pinned to CPU N mod online CPUs
  local cpu=$(($1 % CPUS)); shift
  if command -v taskset >/dev/null 2>&1; then taskset -c "$cpu" "$@"; else "$@"; fi
}

# write_region DEV OFF LEN WRITE_BS CPU FILE: fresh random data, written with
# O_DIRECT (so it reaches the device, not the page cache) and flushed
write_region() {
  local dev=$1 off=$2 len=$3 bs=$4 cpu=$5 file=$6
  head -c "$len" /dev/urandom > "$file" || fail "cannot create pattern $file"
  on_cpu "$cpu" dd if="$file" of="/dev/$dev" bs="$bs" seek="$off" \
    oflag=direct,seek_bytes conv=notrunc,fsync status=none ||
    fail "write of $len bytes at $off to /dev/$dev failed"
}

# verify_region DEV OFF LEN READ_BS CPU FILE WHAT: O_DIRECT read-back equals FILE
verify_region() {
  local dev=$1 off=$2 len=$3 bs=$4 cpu=$5 file=$6 what=$7 rb="$WORKDIR/readback"
  on_cpu "$cpu" dd if="/dev/$dev" of="$rb" bs="$bs" skip="$off" count="$len" \
    iflag=direct,skip_bytes,count_bytes status=none ||
    fail "read of $len bytes at $off from /dev/$dev failed ($what)"
  cmp -s "$rb" "$file" ||
    fail "data mismatch on /dev/$dev at offset $off, $len bytes ($what): $(cmp "$rb" "$file" 2>&1 | head -n 1)"
}

# data_test T L: first blocks, a 1 MiB aligned middle range, the last blocks;
# each written and read with different I/O sizes, alternating CPUs (so every
# blk-mq hardware queue carries requests), then all re-read together
data_test() {
  local t=$1 l=$2 dev size bs mid i
  dev=$(block_of "$t" "$l") || fail "LUN $t:$l vanished"
  size=$(blockdev --getsize64 "/dev/$dev")
  bs=$(sysread "/sys/block/$dev/queue/logical_block_size")
  [ "$size" -ge $((4 * 1024 * 1024)) ] || fail "LUN $t:$l is too small for the data test ($size bytes)"
  mid=$(( (size / 2) / (1024 * 1024) * (1024 * 1024) ))
  # off len write_bs read_bs cpu
  REGIONS_OFF=(0 "$mid" $((size - 128 * 1024)))
  REGIONS_LEN=(65536 1048576 131072)
  local wbs=("$bs" 1048576 65536) rbs=(65536 "$((bs * 8))" 131072)
  for i in 0 1 2; do
    write_region "$dev" "${REGIONS_OFF[$i]}" "${REGIONS_LEN[$i]}" "${wbs[$i]}" "$i" "$WORKDIR/pat.$t.$l.$i"
    verify_region "$dev" "${REGIONS_OFF[$i]}" "${REGIONS_LEN[$i]}" "${rbs[$i]}" $((i + 1)) \
      "$WORKDIR/pat.$t.$l.$i" "right after writing"
  done
  # a write that landed on the wrong LBA would show up here
  for i in 0 1 2; do
    verify_region "$dev" "${REGIONS_OFF[$i]}" "${REGIONS_LEN[$i]}" 1048576 "$i" \
      "$WORKDIR/pat.$t.$l.$i" "after all regions were written"
    echo "@@DATA $t:$l off=${REGIONS_OFF[$i]} len=${REGIONS_LEN[$i]}" \
      "sha256=$(sha256sum < "$WORKDIR/pat.$t.$l.$i" | cut -d' ' -f1)"
  done
}

# mq_check T L: the disk got one blk-mq hardware queue per usable virtqueue
mq_check() {
  local t=$1 l=$2 dev want n
  [ "$QUEUES" -gt 0 ] || return 0
  dev=$(block_of "$t" "$l") || fail "LUN $t:$l vanished"
  want=$(( QUEUES < CPUS ? QUEUES : CPUS ))
  n=$(find "/sys/block/$dev/mq" -mindepth 1 -maxdepth 1 -type d | wc -l)
  echo "@@MQ $t:$l dev=$dev hw_queues=$n"
  [ "$n" = "$want" ] || fail "LUN $t:$l: /dev/$dev has $n blk-mq hardware queues, expected $want"
}

# vq_check: every request virtqueue of each virtio_scsi device completed
# requests (its MSI-X vector, "virtioN-request", fired)
vq_check() {
  local h vdev counts want n
  [ "$QUEUES" -gt 0 ] || return 0
  want=$(( QUEUES < CPUS ? QUEUES : CPUS ))
  for h in $(virtio_hosts); do
    vdev=$(basename "$(dirname "$(readlink -f "/sys/class/scsi_host/$h/device")")")
    # one line per request queue, in queue order; sum the per-CPU columns
    counts=$(awk -v name="$vdev-request" -v ncpu="$CPUS" '
      $NF == name { s = 0; for (i = 2; i <= ncpu + 1; i++) s += $i; print s }' /proc/interrupts |
      paste -sd, -)
    n=$(echo "$counts" | awk -F, '{ print ($0 == "" ? 0 : NF) }')
    echo "@@VQ $h $vdev request_irqs=${counts:-none}"
    if [ "$n" -gt 1 ]; then
      [ "$n" = "$want" ] || fail "$h ($vdev): $n request virtqueue interrupts, expected $want"
      case ",$counts," in *,0,*) fail "$h ($vdev): a request virtqueue completed nothing (interrupts per queue: $counts)" ;; esac
    elif [ "$want" -gt 1 ]; then
      # a single shared vector (no per-queue MSI-X) cannot tell the queues apart
      echo "$h ($vdev): no per-queue interrupt vectors, request queue use not checked"
    fi
  done
}

discard_test() {
  local t=$1 l=$2 dev off len maxb
  dev=$(block_of "$t" "$l") || fail "LUN $t:$l vanished"
  off=${REGIONS_OFF[1]} len=${REGIONS_LEN[1]}
  maxb=$(sysread "/sys/block/$dev/queue/discard_max_bytes")
  [ "${maxb:-0}" -gt 0 ] ||
    fail "LUN $t:$l: /dev/$dev does not support discard (discard_max_bytes=${maxb:-?}, provisioning_mode=$(sysread /sys/class/scsi_disk/"$(scsi_dev_of "$t" "$l")"/provisioning_mode))"
  blkdiscard -o "$off" -l "$len" "/dev/$dev" || fail "blkdiscard -o $off -l $len /dev/$dev failed"
  head -c "$len" /dev/zero > "$WORKDIR/zeros"
  verify_region "$dev" "$off" "$len" 65536 0 "$WORKDIR/zeros" "discarded range must read as zeros"
  # neighbours untouched
  verify_region "$dev" "${REGIONS_OFF[0]}" "${REGIONS_LEN[0]}" 65536 1 "$WORKDIR/pat.$t.$l.0" "before the discarded range"
  verify_region "$dev" "${REGIONS_OFF[2]}" "${REGIONS_LEN[2]}" 65536 1 "$WORKDIR/pat.$t.$l.2" "after the discarded range"
  echo "@@DISCARD $t:$l off=$off len=$len zeroes=ok"
}

# parse_hash_spec T:L:OFF:LEN -> sets HASH_T HASH_L HASH_OFF HASH_LEN
parse_hash_spec() {
  local spec=$1 IFS=:
  # shellcheck disable=SC2086
  set -- $spec
  if ! { [ $# -eq 4 ] && is_number "$1" && is_number "$2" && is_number "$3" && is_number "$4"; }; then
    arg_error "bad --hash spec '$spec' (want T:L:OFF:LEN)"
  fi
  HASH_T=$1 HASH_L=$2 HASH_OFF=$3 HASH_LEN=$4
}

hash_region() {
  local dev
  parse_hash_spec "$1"
  dev=$(block_of "$HASH_T" "$HASH_L") || fail "--hash: no disk for LUN $HASH_T:$HASH_L"
  on_cpu 0 dd if="/dev/$dev" of="$WORKDIR/hash" bs=65536 skip="$HASH_OFF" count="$HASH_LEN" \
    iflag=direct,skip_bytes,count_bytes status=none ||
    fail "read of $HASH_LEN bytes at $HASH_OFF from /dev/$dev failed"
  [ "$(stat -c %s "$WORKDIR/hash")" = "$HASH_LEN" ] ||
    fail "short read of $HASH_LEN bytes at $HASH_OFF from /dev/$dev"
  echo "@@HASH $HASH_T:$HASH_L off=$HASH_OFF len=$HASH_LEN" \
    "sha256=$(sha256sum < "$WORKDIR/hash" | cut -d' ' -f1)"
}

rescan_hosts() {
  local h
  for h in $(virtio_hosts); do echo '- - -' > "/sys/class/scsi_host/$h/scan"; done
}

# LUNs present now that are not in the space-separated list $1
new_luns() {
  local n
  for n in $(found_luns); do
    case " $1 " in *" $n "*) ;; *) echo "$n" ;; esac
  done
}

hotplug_test() {
  local t l size bs start via=event waited before n strays="" problems=""
  parse_lun_spec "$HOTPLUG"; t=$SPEC_T l=$SPEC_L size=$SPEC_SIZE bs=$SPEC_BS
  scsi_dev_of "$t" "$l" >/dev/null && fail "hotplug LUN $t:$l exists before it was added"
  before=$(found_luns | tr '\n' ' ')
  echo "@@HOTPLUG_ADD $t:$l"
  start=$(now)
  until block_of "$t" "$l" >/dev/null; do
    # a LUN other than the one added: the event named the wrong LUN
    for n in $(new_luns "$before $t:$l $strays"); do
      strays="$strays $n"
      echo "@@HOTPLUG_STRAY $n lun_hex=$(printf '0x%04x' "${n#*:}")"
      problems="$problems; LUN $n (LUN $(printf '0x%04x' "${n#*:}")) appeared instead of $t:$l"
    done
    waited=$(( $(now) - start ))
    [ "$waited" -lt "$HOTPLUG_TIMEOUT" ] ||
      fail "hotplug LUN $t:$l did not appear within ${HOTPLUG_TIMEOUT}s (via=$via)${problems}"
    if [ "$via" = event ] && [ "$waited" -ge "$RESCAN_AFTER" ] && ! scsi_dev_of "$t" "$l" >/dev/null; then
      echo "no LUN $t:$l after ${waited}s: no hotplug event added it, rescanning the host"
      via=rescan
      rescan_hosts
    fi
    sleep 0.5
  done
  echo "@@HOTPLUG_ADDED $t:$l via=$via seconds=$(( $(now) - start ))"
  check_lun HOTPLUG_LUN "$t" "$l" "$size" "$bs"
  data_test "$t" "$l"
  echo "@@HOTPLUG_REMOVE $t:$l"
  start=$(now)
  while scsi_dev_of "$t" "$l" >/dev/null; do
    if [ $(( $(now) - start )) -ge "$HOTPLUG_TIMEOUT" ]; then
      problems="$problems; LUN $t:$l still present ${HOTPLUG_TIMEOUT}s after it was removed"
      break
    fi
    sleep 0.5
  done
  scsi_dev_of "$t" "$l" >/dev/null || echo "@@HOTPLUG_REMOVED $t:$l seconds=$(( $(now) - start ))"
  for n in $strays; do
    if scsi_dev_of "${n%:*}" "${n#*:}" >/dev/null; then
      problems="$problems; stray LUN $n is still present"
    else
      problems="$problems; stray LUN $n went away on the remove event"
    fi
  done
  [ -z "$problems" ] || fail "hotplug of $t:$l: ${problems#; }"
}

main() {
  local spec start missing want have v
  # it overwrites every disk it checks: never on a host
  [ "${HARNESS_GUEST:-}" = 1 ] ||
    arg_error "refusing to run outside a run-in-guest.sh guest (HARNESS_GUEST=1): it overwrites the disks it checks"
  # validate every argument before touching a disk
  for spec in "${EXPECT[@]}"; do parse_lun_spec "$spec"; done
  [ -z "$HOTPLUG" ] || parse_lun_spec "$HOTPLUG"
  for spec in ${HASHES[@]+"${HASHES[@]}"}; do parse_hash_spec "$spec"; done
  for v in "$QUEUES" "$SCAN_TIMEOUT" "$HOTPLUG_TIMEOUT" "$RESCAN_AFTER"; do
    is_number "$v" || arg_error "bad number '$v' in the arguments"
  done
  if [ -n "$DISCARD" ]; then
    case " ${EXPECT[*]} " in *" $DISCARD:"*) ;; *) arg_error "--discard $DISCARD is not one of the --expect LUNs" ;; esac
  fi
  mkdir -p "$WORKDIR" || fail "cannot create $WORKDIR"
  [ -n "$(virtio_hosts)" ] || {
    sleep 2
    [ -n "$(virtio_hosts)" ] || fail "no virtio_scsi SCSI host (is the virtio_scsi module loaded and the device present?)"
  }
  echo "virtio_scsi hosts: $(virtio_hosts | tr '\n' ' ')cpus=$CPUS"

  # wait for the asynchronous scan to bring up every expected disk
  start=$(now)
  while :; do
    missing=
    for spec in "${EXPECT[@]}"; do
      parse_lun_spec "$spec"
      block_of "$SPEC_T" "$SPEC_L" >/dev/null || missing="$missing $SPEC_T:$SPEC_L"
    done
    [ -z "$missing" ] && break
    [ $(( $(now) - start )) -lt "$SCAN_TIMEOUT" ] ||
      fail "after ${SCAN_TIMEOUT}s still missing LUN(s):$missing; found: $(found_luns | tr '\n' ' ')"
    sleep 0.5
  done
  sleep 2   # let the scan finish, so that extra LUNs would show up too
  echo "scan done after $(( $(now) - start ))s"

  want=$(for spec in "${EXPECT[@]}"; do parse_lun_spec "$spec"; echo "$SPEC_T:$SPEC_L"; done |
         sort -t: -k1,1n -k2,2n | tr '\n' ' ')
  have=$(found_luns | tr '\n' ' ')
  for spec in "${EXPECT[@]}"; do
    parse_lun_spec "$spec"
    check_lun LUN "$SPEC_T" "$SPEC_L" "$SPEC_SIZE" "$SPEC_BS"
  done
  [ "$have" = "$want" ] || fail "found LUNs [${have% }], expected exactly [${want% }]"
  for spec in ${HASHES[@]+"${HASHES[@]}"}; do hash_region "$spec"; done

  for spec in "${EXPECT[@]}"; do
    parse_lun_spec "$spec"
    data_test "$SPEC_T" "$SPEC_L"
    mq_check "$SPEC_T" "$SPEC_L"
    if [ "$DISCARD" = "$SPEC_T:$SPEC_L" ]; then
      discard_test "$SPEC_T" "$SPEC_L"
    fi
  done
  vq_check
  [ -z "$HOTPLUG" ] || hotplug_test
  rm -rf "$WORKDIR"
  echo "@@RESULT PASS"
}

main
