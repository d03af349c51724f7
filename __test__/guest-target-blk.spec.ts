// The bundled target's virtio-blk device (`--type blk`), driven by a frontend we did not write:
// the Linux guest kernel's virtio_blk driver in a QEMU guest, through vhost-user-blk-pci. The
// guest checks the disk's size, block size, serial and queues, reads a range the host preset,
// writes and reads back data at three places, and discards a range that then reads as zeros;
// the host then finds what the guest wrote in the image file.
import { createHash } from 'node:crypto';
import { mkdtempSync, openSync, readSync, closeSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import test from 'ava';

import { repoRoot, requireCommands, requireGuestKernel, requireRoot, requireTargetBinary, testWhen } from './helpers/env.js';
import { markers, runGuest } from './helpers/guest.js';
import { startTarget } from './helpers/target.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const BLOCK = 4096;
const QUEUES = 2;
const GUEST_CPUS = 2;
const HASH = { off: 4 * MiB, len: 64 * 1024 };

/** Deterministic, non-zero image contents. */
function imagePattern(size: number): Buffer {
  const buf = Buffer.alloc(size);
  for (let i = 0; i < size; i += 4) buf.writeUInt32LE((Math.imul(i >>> 2, 2246822519) ^ 0x3c3cc3c3) >>> 0, i);
  return buf;
}

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

function readRange(path: string, off: number, len: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(len);
    readSync(fd, b, 0, len, off);
    return b;
  } finally {
    closeSync(fd);
  }
}

testWhen(
  test.serial,
  'bundled target in blk mode under the Linux virtio_blk driver in a QEMU guest',
  [
    requireRoot,
    requireCommands('qemu-system-x86_64', 'busybox', 'cpio', 'modprobe', 'depmod', 'dpkg', 'flock', 'blkdiscard'),
    requireGuestKernel,
    requireTargetBinary,
  ],
  async (t) => {
    t.timeout(20 * 60_000, 'guest test (TCG) took longer than 20 minutes');
    const dir = mkdtempSync(join(tmpdir(), 'guest-blk-'));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
    const image = join(dir, 'disk.img');
    const original = imagePattern(SIZE);
    writeFileSync(image, original);
    const socket = join(dir, 'vhost.sock');
    const target = await startTarget({ socket, luns: [`0:0:file:${image}:${BLOCK}`], queues: QUEUES, type: 'blk' });
    t.teardown(() => target.stop());

    const script = join(repoRoot, 'scripts', 'guest', 'blk-disk-check.sh');
    const guest = runGuest({
      command: `bash ${script} --expect ${SIZE}:${BLOCK} --hash ${HASH.off}:${HASH.len} --queues ${QUEUES}`,
      qemuArgs: ['-chardev', `socket,id=vub,path=${socket}`, '-device', `vhost-user-blk-pci,chardev=vub,num-queues=${QUEUES}`],
      env: { GUEST_MEMFD: '1', GUEST_SMP: String(GUEST_CPUS), GUEST_MODULES: 'virtio_blk', GUEST_TIMEOUT: '900' },
    });
    t.teardown(() => guest.kill());
    const r = await guest.done;
    t.log(`guest run ${r.seconds.toFixed(1)} s`);
    if (r.code !== 0 || !r.lines.includes('@@RESULT PASS')) {
      t.log(r.lines.slice(-40).join('\n'));
      t.log(`target: ${target.log}`);
      t.fail(`guest check failed (exit ${r.code}): ${markers(r.lines, 'FAIL')[0]?.line ?? 'no @@FAIL line'}`);
      return;
    }
    const disk = markers(r.lines, 'DISK')[0]!;
    t.log(disk.line);
    t.is(Number(disk.fields.size), SIZE);
    t.is(Number(disk.fields.lbs), BLOCK);
    t.true(disk.fields.serial?.startsWith('VIRTINIT-') ?? false, `serial from GET_ID: ${disk.fields.serial}`);
    t.is(Number(markers(r.lines, 'MQ')[0]?.fields.hw_queues), Math.min(QUEUES, GUEST_CPUS));
    // What the guest read before writing is what the image holds.
    t.is(markers(r.lines, 'HASH')[0]?.fields.sha256, sha256(original.subarray(HASH.off, HASH.off + HASH.len)));
    // What it wrote (and read back) is in the image file now; the discarded range reads zeros there.
    const data = markers(r.lines, 'DATA');
    t.is(data.length, 3);
    const discard = markers(r.lines, 'DISCARD')[0]!;
    t.is(discard.fields.zeroes, 'ok');
    const dOff = Number(discard.fields.off);
    const dLen = Number(discard.fields.len);
    for (const m of data) {
      const off = Number(m.fields.off);
      const len = Number(m.fields.len);
      if (off === dOff) continue; // overwritten by the discard
      t.is(sha256(readRange(image, off, len)), m.fields.sha256 ?? 'no sha256 field', `image bytes at ${off}`);
    }
    t.true(readRange(image, dOff, dLen).every((b) => b === 0), 'the discarded range is zeros in the image');
  },
);
