// Interop with a backend we did not write: rust-vmm's vhost-device-scsi 0.1.0 (crates.io,
// installed by scripts/setup-interop.sh), serving raw image files as LUNs 0..n of target 0.
// The TypeScript Controller connects, scans, moves verified data both ways (through the
// initiator and straight from the image files), and meets what that backend lacks:
//
// - one request queue of at most 128 entries (a larger SET_VRING_NUM ends the connection);
// - 512-byte blocks only, image lengths a multiple of 512;
// - READ/WRITE(10), WRITE SAME(16), SYNCHRONIZE CACHE(10), READ CAPACITY(10/16), INQUIRY
//   (VPD 0x00, 0xB1, 0xB2 only), MODE SENSE(6), REPORT LUNS, TEST UNIT READY, REQUEST SENSE,
//   REPORT SUPPORTED OPERATION CODES, and nothing else: no READ/WRITE(16), no UNMAP (although
//   VPD 0xB2 claims it), no START STOP UNIT, no SYNCHRONIZE CACHE(16), no VPD 0x80/0x83/0xB0;
// - the control queue is never answered, so task management times out;
// - it serves one connection and exits when that ends.
import test, { type ExecutionContext } from 'ava';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { repoRoot, requireFile, testWhen, type Requirement } from './helpers/env.js';
import { TargetProcess } from './helpers/target.js';
import {
  type BlockDevice,
  ConnectError,
  Controller,
  ControllerFailedError,
  InitiatorError,
  scsi,
  ScsiError,
} from '../ts/index.js';
import { nativeUnavailableReason } from '../ts/native.js';
import { fromDisk, isZero, pattern, sameBytes, toDisk } from './helpers/image.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BS = 512;
/** The most ring entries vhost-device-scsi 0.1.0 takes (its max_queue_size). */
const QUEUE_SIZE = 128;
const ILLEGAL_REQUEST = scsi.SenseKey.ILLEGAL_REQUEST;
const ASC_INVALID_OPCODE = 0x20;
const ASC_INVALID_FIELD_IN_CDB = 0x24;

const binary = process.env.VHOST_DEVICE_SCSI ?? join(repoRoot, '.cache', 'interop', 'bin', 'vhost-device-scsi');
const requirements: Requirement[] = [
  requireFile(binary, 'run scripts/setup-interop.sh, or set VHOST_DEVICE_SCSI'),
  () => nativeUnavailableReason(),
];

/** Image sizes of LUN 0, 1, 2; LUN 1 has an odd number of blocks. */
const IMAGE_SIZES = [8 * MiB, 3 * MiB + 7 * BS, 1 * MiB];

interface Backend {
  socket: string;
  images: string[];
  process: TargetProcess;
}

/** Starts vhost-device-scsi on fresh sparse images; `init` may fill them first. */
async function startBackend(t: ExecutionContext, init?: (images: string[]) => void): Promise<Backend> {
  const dir = mkdtempSync(join(tmpdir(), 'interop-vds-'));
  const socket = join(dir, 'vhost.sock');
  const images = IMAGE_SIZES.map((size, i) => {
    const path = join(dir, `lun${i}.img`);
    writeFileSync(path, '');
    truncateSync(path, size);
    return path;
  });
  init?.(images);
  // No -r: in spite of its help text it takes writes (WRITE(10), WRITE SAME(16)).
  const child = spawn(binary, ['--socket-path', socket, ...images], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn' },
  });
  const proc = new TargetProcess(child, socket, undefined);
  const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));
  const cleanUp = async () => {
    await proc.stop();
    rmSync(dir, { recursive: true, force: true });
  };
  t.teardown(async () => {
    await cleanUp();
    if (!t.passed) t.log(`vhost-device-scsi output:\n${proc.log}`);
  });
  const deadline = Date.now() + 10_000;
  for (;;) {
    let listening = false;
    try {
      listening = statSync(socket).isSocket();
    } catch {
      listening = false;
    }
    if (listening) return { socket, images, process: proc };
    const failed = await Promise.race([spawnError, sleep(20).then(() => undefined)]);
    if (failed || proc.status || Date.now() > deadline) {
      throw new Error(`vhost-device-scsi did not start (${failed?.message ?? 'no socket'}):\n${proc.log}`);
    }
  }
}

async function connect(t: ExecutionContext, backend: Backend): Promise<Controller> {
  // The socket file appears at bind(), a moment before the backend listens on it: a refused
  // connection then means "not yet", for a little while.
  const deadline = Date.now() + 5000;
  for (;;) {
    try {
      // Memory enough for the whole test, so that it never grows while the backend serves:
      // vhost-device-scsi 0.1.0 loads its memory map before it reads the available ring, so a
      // request in a region added during that window fails there (INTERNAL TARGET FAILURE).
      const controller = await Controller.connect(backend.socket, { name: 'Vds0', queueSize: QUEUE_SIZE, memoryBytes: 64 << 20 });
      t.teardown(() => controller.close());
      return controller;
    } catch (e) {
      if (!(e instanceof ConnectError && e.errno === 'ECONNREFUSED') || Date.now() > deadline) throw e;
      await sleep(20);
    }
  }
}

/** Expects `p` to reject with ILLEGAL REQUEST and the given ASC, naming the command. */
async function illegalRequest(t: ExecutionContext, p: Promise<unknown>, asc: number, what: string): Promise<void> {
  const e = await t.throwsAsync(p, { instanceOf: ScsiError }, what);
  if (!e) return;
  t.is(e.key, ILLEGAL_REQUEST, `${what}: sense key`);
  t.is(e.asc, asc, `${what}: ASC`);
}

testWhen(
  test.serial,
  'scan finds every image as a LUN of its size, and data round-trips to the files',
  requirements,
  async (t) => {
    t.timeout(60_000);
    // LUN 1 holds data before the target starts: the initiator must read the file's bytes.
    const preset = pattern(101, 0, IMAGE_SIZES[1]! / BS);
    const backend = await startBackend(t, (images) => toDisk(images[1]!, 0, preset));
    const controller = await connect(t, backend);

    const info = controller.info;
    t.is(info.requestQueues, 1);
    t.is(info.queueSize, QUEUE_SIZE);

    const result = await controller.scan();
    t.deepEqual(
      result.problems.map((p) => `${p.target}:${p.lun ?? '-'} ${p.error.message}`),
      [],
      'targets 1..255 answer BAD_TARGET, which is absence, not a problem',
    );
    const disks = result.luns.filter((l) => l.deviceType === 0);
    t.deepEqual(
      disks.map((l) => [l.name, l.target, l.lun]),
      IMAGE_SIZES.map((_, i) => [controller.lunName(0, i), 0, i]),
    );
    for (const [i, size] of IMAGE_SIZES.entries()) {
      const dev = controller.device(controller.lunName(0, i));
      t.is(dev.info.blockSize, BS, `LUN ${i} block size`);
      t.is(dev.info.blockCount, BigInt(size / BS), `LUN ${i} block count`);
      t.is(dev.info.sizeBytes, BigInt(size), `LUN ${i} size`);
      t.is(dev.info.vendor, 'rust-vmm');
    }
    const [lun0, lun1, lun2] = [0, 1, 2].map((i) => controller.device(controller.lunName(0, i))) as [
      BlockDevice,
      BlockDevice,
      BlockDevice,
    ];

    // File to initiator: the whole preset image, in one call (split by the transfer limit).
    sameBytes(t, await lun1.read(0, IMAGE_SIZES[1]! / BS), preset, 'LUN 1 read through the initiator');
    const last = IMAGE_SIZES[1]! / BS - 1;
    sameBytes(t, await lun1.read(last, 1), pattern(101, last, 1), 'LUN 1 last block');

    // Initiator to file: single blocks at both ends, a DMA buffer (zero-copy), and a plain
    // 1 MiB Buffer (bounced) across the middle.
    const blocks0 = IMAGE_SIZES[0]! / BS;
    const writes: Array<{ lba: number; data: Buffer }> = [
      { lba: 0, data: pattern(1, 0, 1) },
      { lba: blocks0 - 1, data: pattern(1, blocks0 - 1, 1) },
      { lba: 777, data: pattern(1, 777, (1 * MiB) / BS) },
    ];
    const dma = controller.allocBuffer(64 * KiB);
    pattern(1, 5000, dma.length / BS).copy(dma);
    writes.push({ lba: 5000, data: Buffer.from(dma) });
    for (const w of writes.slice(0, 3)) await lun0.write(w.lba, w.data);
    await lun0.write(5000, dma);
    await lun0.flush();
    for (const w of writes) {
      sameBytes(t, await lun0.read(w.lba, w.data.length / BS), w.data, `LUN 0 lba ${w.lba} read back`);
      sameBytes(t, fromDisk(backend.images[0]!, w.lba * BS, w.data.length), w.data, `LUN 0 lba ${w.lba} on disk`);
    }
    dma.fill(0);
    await lun0.read(5000, dma);
    sameBytes(t, dma, writes[3]!.data, 'LUN 0 read into a DMA buffer');

    // Many requests at once on the single 128-entry queue: each 4 KiB write is distinct.
    const burst = Array.from({ length: 200 }, (_, k) => ({
      lba: 9000 + k * 8,
      data: pattern(2000 + k, 9000 + k * 8, 8),
    }));
    await Promise.all(burst.map((w) => lun0.write(w.lba, w.data)));
    const back = await Promise.all(burst.map((w) => lun0.read(w.lba, 8)));
    const wrong = burst.filter((w, k) => Buffer.compare(back[k]!, w.data) !== 0).map((w) => w.lba);
    t.deepEqual(wrong, [], 'concurrent 4 KiB writes read back');
    const onDisk = fromDisk(backend.images[0]!, 9000 * BS, burst.length * 8 * BS);
    sameBytes(t, onDisk, Buffer.concat(burst.map((w) => w.data)), 'concurrent writes on disk');

    // Nothing leaked to the LUN nobody wrote, and LUN 1 still holds its preset.
    t.true(isZero(await lun2.read(0, IMAGE_SIZES[2]! / BS)), 'LUN 2 still reads zeroes');
    t.true(isZero(fromDisk(backend.images[2]!, 0, IMAGE_SIZES[2]!)), 'LUN 2 image still zero');
    sameBytes(t, fromDisk(backend.images[1]!, 0, IMAGE_SIZES[1]!), preset, 'LUN 1 image unchanged');

    // Out of range: refused before anything reaches the device.
    await t.throwsAsync(lun2.read(IMAGE_SIZES[2]! / BS, 1), { instanceOf: RangeError });
    t.is(controller.failure, null);
  },
);

testWhen(
  test.serial,
  'what vhost-device-scsi lacks ends in typed errors and the controller keeps working',
  requirements,
  async (t) => {
    t.timeout(60_000);
    const backend = await startBackend(t);
    const controller = await connect(t, backend);
    await controller.scan();
    const lun = controller.lunName(0, 0);
    const dev = controller.device(lun);
    const scanned = controller.luns.find((l) => l.name === lun)!;

    // Scan without the VPD pages it lacks: no serial, no designators, no block limits.
    t.deepEqual(scanned.vpdPages, [0x00, 0xb1, 0xb2]);
    t.is(scanned.serial, undefined);
    t.deepEqual(scanned.identifiers, []);
    t.is(scanned.blockLimits, undefined);
    await illegalRequest(
      t,
      dev.passthrough(scsi.inquiry({ page: 0xb0, allocationLength: 64 }), { dataIn: 64 }),
      ASC_INVALID_FIELD_IN_CDB,
      'VPD 0xB0',
    );

    const data = pattern(7, 64, 16);
    await dev.write(64, data);

    // UNMAP: advertised in VPD 0xB2 (LBPU), rejected as an unknown opcode; the data stays.
    t.true(dev.info.unmap, 'the device claims UNMAP');
    await illegalRequest(t, dev.unmap({ lba: 64, blocks: 16 }), ASC_INVALID_OPCODE, 'UNMAP');
    sameBytes(t, await dev.read(64, 16), data, 'data after the refused UNMAP');

    // Write zeroes goes through WRITE SAME(16), which it has.
    await dev.writeZeroes(64, 8);
    t.true(isZero(await dev.read(64, 8)), 'zeroed blocks read back as zeroes');
    sameBytes(t, await dev.read(72, 8), data.subarray(8 * BS), 'blocks after the zeroed range untouched');
    t.true(isZero(fromDisk(backend.images[0]!, 64 * BS, 8 * BS)), 'zeroed blocks on disk');

    // The 16-byte forms and START STOP UNIT are unknown opcodes, passed through as typed errors.
    const cases: Array<[string, Uint8Array, { dataIn?: number; dataOut?: Uint8Array }]> = [
      ['READ(16)', scsi.read16({ lba: 0n, blocks: 1 }), { dataIn: BS }],
      ['WRITE(16)', scsi.write16({ lba: 0n, blocks: 1 }), { dataOut: Buffer.alloc(BS, 0xee) }],
      ['START STOP UNIT', scsi.startStopUnit({ start: true }), {}],
      ['SYNCHRONIZE CACHE(16)', scsi.synchronizeCache16(), {}],
    ];
    for (const [name, cdb, opts] of cases) {
      await illegalRequest(t, dev.passthrough(cdb, opts), ASC_INVALID_OPCODE, name);
    }
    t.true(isZero(await dev.read(0, 1)), 'the refused WRITE(16) wrote nothing');

    // LOGICAL UNIT RESET: the control queue is never answered, so it gives up after a bound.
    const reset = await t.throwsAsync(dev.reset());
    t.regex(reset?.message ?? '', /timed out/);
    t.is(controller.failure, null, 'an unanswered TMF does not fail the controller');

    // Still working after all of that.
    await dev.write(200, pattern(8, 200, 4));
    await dev.flush();
    sameBytes(t, await dev.read(200, 4), pattern(8, 200, 4), 'I/O after the refusals');
    sameBytes(t, fromDisk(backend.images[0]!, 200 * BS, 4 * BS), pattern(8, 200, 4), 'on disk after the refusals');
  },
);

// vhost-device-scsi never answers its control queue: the reset times out as a typed error.
testWhen(
  test.serial,
  'an unanswered LOGICAL UNIT RESET rejects with a typed InitiatorError',
  requirements,
  async (t) => {
    t.timeout(30_000);
    const backend = await startBackend(t);
    const controller = await connect(t, backend);
    await controller.scan();
    await t.throwsAsync(controller.device(controller.lunName(0, 0)).reset(), { instanceOf: InitiatorError });
  },
);

testWhen(
  test.serial,
  'a queue size above what the backend takes is a typed error, not a crash or a hang',
  requirements,
  async (t) => {
    t.timeout(30_000);
    const backend = await startBackend(t);
    // vhost-user cannot tell the frontend the backend's queue size limit, and without REPLY_ACK
    // (which vhost-device-scsi does not offer) a refused SET_VRING_NUM 256 only shows as the
    // connection closing: during the set-up (ConnectError) or just after it, at the first command
    // (ControllerFailedError). An initiator that learned to fall back must end up within the limit.
    let controller: Controller;
    try {
      controller = await Controller.connect(backend.socket, { queueSize: 256 });
    } catch (e) {
      t.true(e instanceof ConnectError, `rejected with ${String(e)}`);
      t.is((e as ConnectError).code, 'ERR_VIRTIO_CONNECT');
      return;
    }
    try {
      if (controller.info.queueSize <= QUEUE_SIZE) {
        await controller.scan();
        t.is(controller.devices.length, IMAGE_SIZES.length);
        return;
      }
      await t.throwsAsync(controller.scan(), { instanceOf: ControllerFailedError });
      t.regex(controller.failure ?? '', /closed the connection|gone/);
    } finally {
      controller.close();
    }
  },
);
