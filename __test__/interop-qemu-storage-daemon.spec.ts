// Interop with a virtio-blk backend we did not write: qemu-storage-daemon (QEMU 7.2 in Debian
// bookworm, package qemu-system-common, installed by scripts/setup-system.sh) exporting a raw
// image file as vhost-user-blk. The Controller connects with { type: 'blk' }, scans the one disk,
// moves verified data both ways (through the initiator and straight from the image file), from
// worker threads on queues of their own too, and meets what that backend does:
//
// - 512-byte blocks, the capacity of the image, "vhost_user_blk" as GET ID;
// - FLUSH, DISCARD and WRITE ZEROES of at most 32768 sectors and one range each (the initiator
//   splits larger ones); DISCARD on a file node with discard=unmap punches a hole into the file;
//   WRITE ZEROES without the may-unmap flag;
// - writable=off offers VIRTIO_BLK_F_RO, yet still DISCARD and WRITE ZEROES (it fails them);
// - its export keeps the capacity it had when it was added: a block_resize reaches a client only
//   through a new export (7.2 has no resize callback for vhost-user-blk exports);
// - on SIGTERM it closes the connection and removes its socket file.
// The command line's bench runs against it as well (--type blk --verify).
import test, { type ExecutionContext } from 'ava';
import { statSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { Worker } from 'node:worker_threads';

import {
  type BlockDevice,
  ConnectError,
  Controller,
  type ControllerOptions,
  ControllerFailedError,
  type Geometry,
  InitiatorError,
  NotSupportedError,
  RequestRefusedError,
} from '../ts/index.js';
import { nativeUnavailableReason } from '../ts/native.js';
import { cli, type Run } from './helpers/cli.js';
import { requireFile, testWhen, type Requirement } from './helpers/env.js';
import { pattern as workerPattern } from './helpers/initiator-bodies.js';
import { DISK_NODE, Qmp, type Qsd, qsdBinary, type QsdOptions, startQsd } from './helpers/qsd.js';
import type { WorkerJob, WorkerReport } from './helpers/worker-io.js';
import { fromDisk, isZero, pattern, sameBytes, toDisk } from './helpers/image.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BS = 512;
/** The most sectors qemu-storage-daemon takes in one DISCARD or WRITE ZEROES. */
const QSD_MAX_SECTORS = 32768;
const DISK = 'VirtioBlk0';

const requirements: Requirement[] = [
  requireFile(qsdBinary, 'run scripts/setup-system.sh'),
  () => nativeUnavailableReason(),
];

/** `p`, or an error naming `what` after `ms`. */
async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  const ac = new AbortController();
  try {
    return await Promise.race([
      p,
      sleep(ms, undefined, { signal: ac.signal }).then(() => {
        throw new Error(`${what}: nothing within ${ms} ms`);
      }),
    ]);
  } finally {
    ac.abort();
  }
}

/** Starts qemu-storage-daemon for this test; its output goes to the log when the test fails. */
async function startBackend(t: ExecutionContext, opts: QsdOptions): Promise<Qsd> {
  const q = await startQsd(opts);
  t.teardown(async () => {
    await q.cleanUp();
    if (!t.passed) t.log(`qemu-storage-daemon output:\n${q.process.log || '(none)'}`);
  });
  return q;
}

async function connect(t: ExecutionContext, q: Qsd, options: ControllerOptions = {}): Promise<Controller> {
  // The socket file appears at bind(), a moment before the daemon listens on it: a refused
  // connection then means "not yet", for a little while.
  const deadline = Date.now() + 5000;
  for (;;) {
    try {
      const controller = await Controller.connect(q.socket, { type: 'blk', memoryBytes: 16 * MiB, ...options });
      t.teardown(() => controller.close());
      return controller;
    } catch (e) {
      if (!(e instanceof ConnectError && e.errno === 'ECONNREFUSED') || Date.now() > deadline) throw e;
      await sleep(20);
    }
  }
}

async function openQmp(t: ExecutionContext, q: Qsd): Promise<Qmp> {
  const qmp = await Qmp.connect(q.qmpSocket);
  t.teardown(() => qmp.close());
  return qmp;
}

testWhen(
  test.serial,
  'scan finds one disk of the image size with 512-byte blocks and its GET ID serial; data round-trips to the file',
  requirements,
  async (t) => {
    t.timeout(60_000);
    const size = 64 * MiB;
    const blocks = size / BS;
    const last = blocks - 1;
    // Data in the image before the daemon opens it: the initiator must read the file's bytes.
    const presetLba = 100_000;
    const preset = pattern(101, presetLba, 4096);
    const q = await startBackend(t, { sizeBytes: size, init: (image) => toDisk(image, presetLba * BS, preset) });
    const c = await connect(t, q);

    t.is(c.deviceType, 'blk');
    const info = c.info;
    t.is(info.deviceType, 'blk');
    t.is(info.requestQueues, 2, 'num-queues=2');
    t.is(info.blk?.capacitySectors, size / 512);
    t.is(info.blk?.readOnly, false);
    t.is(info.blk?.flush, true);

    const added: string[] = [];
    c.on('device-added', (d) => added.push(d.name));
    const result = await c.scan();
    t.deepEqual(result.luns, [], 'a virtio-blk scan lists no SCSI LUNs');
    t.deepEqual(result.problems, []);
    t.deepEqual(added, [DISK]);
    t.deepEqual(
      c.devices.map((d) => d.name),
      [DISK],
      'exactly one disk, named after the controller',
    );
    const dev = c.device(DISK);
    t.is(dev.deviceType, 'blk');
    t.is(dev.info.deviceType, 'blk');
    t.is(dev.info.blockSize, BS);
    t.is(dev.info.blockCount, BigInt(blocks));
    t.is(dev.info.sizeBytes, BigInt(size));
    t.is(dev.info.serial, 'vhost_user_blk', 'the ID qemu-storage-daemon answers GET ID with');

    // File to initiator.
    sameBytes(t, await dev.read(presetLba, preset.length / BS), preset, 'preset data read through the initiator');

    // Initiator to file: the first and the last block, the blocks just before the last, a
    // transfer of several MiB at an odd LBA (split at the transfer limit), and a DMA buffer.
    const bigBlocks = (6 * MiB) / BS + 3;
    t.true(bigBlocks > dev.info.limits.maxTransferBlocks, 'the large transfer takes several requests');
    const dma = c.allocBuffer(256 * KiB);
    pattern(1, 60_001, dma.length / BS).copy(dma);
    const writes: Array<{ lba: number; data: Buffer }> = [
      { lba: 0, data: pattern(1, 0, 1) },
      { lba: last, data: pattern(1, last, 1) },
      { lba: last - 16, data: pattern(1, last - 16, 16) },
      { lba: 4097, data: pattern(1, 4097, bigBlocks) },
      { lba: 60_001, data: Buffer.from(dma) },
    ];
    await Promise.all([...writes.slice(0, 4).map((w) => dev.write(w.lba, w.data)), dev.write(60_001, dma)]);
    const flushes = dev.iostat.flushOps;
    await dev.flush();
    t.is(dev.iostat.flushOps, flushes + 1, 'FLUSH counted');
    for (const w of writes) {
      sameBytes(t, await dev.read(w.lba, w.data.length / BS), w.data, `lba ${w.lba} read back`);
      sameBytes(t, fromDisk(q.image, w.lba * BS, w.data.length), w.data, `lba ${w.lba} in the image file`);
    }
    const into = Buffer.alloc(bigBlocks * BS);
    await dev.read(4097, into);
    sameBytes(t, into, writes[3]!.data, 'large read into a caller buffer');
    dma.fill(0);
    await dev.read(60_001, dma);
    sameBytes(t, dma, writes[4]!.data, 'read into a DMA buffer');
    const written = writes.reduce((n, w) => n + w.data.length, 0);
    t.is(dev.iostat.writeBytes, written, 'iostat counts every byte written');
    t.true(dev.iostat.writeOps >= writes.length);

    // Nothing strayed: the preset is intact, and the blocks between the writes are still zero.
    sameBytes(t, fromDisk(q.image, presetLba * BS, preset.length), preset, 'preset in the image file');
    t.true(isZero(fromDisk(q.image, BS, 4096 * BS)), 'blocks 1..4096 still zero in the image file');
    t.true(isZero(await dev.read(last - 17, 1)), 'the block before the written tail still reads zero');

    // Out of range: refused before anything reaches the device.
    await t.throwsAsync(dev.read(blocks, 1), { instanceOf: RangeError });
    await t.throwsAsync(dev.write(last, pattern(2, last, 2)), { instanceOf: RangeError });
    sameBytes(t, fromDisk(q.image, last * BS, BS), pattern(1, last, 1), 'the refused write left the last block alone');
    t.is(statSync(q.image).size, size, 'the image did not grow');
    t.is(c.failure, null);
  },
);

testWhen(
  test.serial,
  'discard and write zeroes: split at the 32768-sector limit, zeros after write zeroes, a hole punched by discard',
  requirements,
  async (t) => {
    t.timeout(60_000);
    const size = 64 * MiB;
    // Every block of the first 45 MiB holds data, written into the file before the daemon starts.
    const presetBlocks = (45 * MiB) / BS;
    const preset = pattern(3, 0, presetBlocks);
    const q = await startBackend(t, { sizeBytes: size, init: (image) => toDisk(image, 0, preset) });
    const c = await connect(t, q);
    await c.scan();
    const dev = c.device(DISK);
    const block = (lba: number): Buffer => preset.subarray(lba * BS, (lba + 1) * BS);

    t.true(dev.info.unmap, 'DISCARD offered');
    t.is(dev.info.limits.maxUnmapBlocks, QSD_MAX_SECTORS);
    t.is(dev.info.limits.maxUnmapDescriptors, 1);
    t.is(dev.info.limits.maxWriteSameBlocks, QSD_MAX_SECTORS);
    t.false(dev.info.writeSameUnmap, 'WRITE ZEROES without may-unmap');
    t.false(dev.info.unmappedReadsZero, 'virtio-blk promises nothing about discarded blocks');

    // WRITE ZEROES over more blocks than one request takes, at an odd LBA.
    const wz = { lba: 1001, blocks: 40_000 };
    t.true(wz.blocks > QSD_MAX_SECTORS);
    await dev.writeZeroes(wz.lba, wz.blocks);
    t.true(isZero(await dev.read(wz.lba, wz.blocks)), 'zeroed blocks read back as zeros');
    t.true(isZero(fromDisk(q.image, wz.lba * BS, wz.blocks * BS)), 'zeroed blocks are zeros in the image file');
    for (const lba of [wz.lba - 1, wz.lba + wz.blocks]) {
      sameBytes(t, await dev.read(lba, 1), block(lba), `block ${lba} next to the zeroed range`);
      sameBytes(t, fromDisk(q.image, lba * BS, BS), block(lba), `block ${lba} next to the zeroed range, in the file`);
    }

    // DISCARD over more blocks than one request takes, 4 KiB aligned: qemu-storage-daemon punches
    // a hole into the image (discard=unmap), so the file loses the allocation of the whole range.
    const dc = { lba: 49_152, blocks: 40_960 };
    const allocated = statSync(q.image).blocks;
    const unmaps = dev.iostat.unmapOps;
    await dev.unmap(dc);
    t.is(dev.iostat.unmapOps, unmaps + 1);
    t.is(dev.iostat.unmapBytes, dc.blocks * BS);
    const freed = allocated - statSync(q.image).blocks;
    t.true(freed >= dc.blocks, `the image file gave back ${freed} of ${dc.blocks} 512-byte blocks`);
    // What a discarded range reads is the device's business; it must agree with the file.
    const afterDiscard = await dev.read(dc.lba, dc.blocks);
    sameBytes(t, afterDiscard, fromDisk(q.image, dc.lba * BS, dc.blocks * BS), 'discarded range: initiator and file agree');
    for (const lba of [dc.lba - 1, dc.lba + dc.blocks]) {
      sameBytes(t, await dev.read(lba, 1), block(lba), `block ${lba} next to the discarded range`);
      sameBytes(t, fromDisk(q.image, lba * BS, BS), block(lba), `block ${lba} in the image file`);
    }

    // Several ranges at once: one DISCARD each; the blocks between them keep their data.
    await dev.unmap([
      { lba: 42_000, blocks: 8 },
      { lba: 42_016, blocks: 8 },
    ]);
    sameBytes(t, await dev.read(42_008, 8), preset.subarray(42_008 * BS, 42_016 * BS), 'blocks between two discarded ranges');

    // The device still takes data where it discarded and zeroed.
    const again = pattern(4, dc.lba, 64);
    await dev.write(dc.lba, again);
    await dev.flush();
    sameBytes(t, await dev.read(dc.lba, 64), again, 'written after the discard');
    sameBytes(t, fromDisk(q.image, dc.lba * BS, again.length), again, 'written after the discard, in the file');
    t.is(c.failure, null);
  },
);

// ---- worker threads ----------------------------------------------------------------------------

const WORKER = new URL('./helpers/worker-io.ts', import.meta.url);

interface Running {
  worker: Worker;
  report: Promise<WorkerReport>;
}

function startWorker(job: WorkerJob): Running {
  // A worker thread registers the TypeScript loader for itself before loading the script.
  const boot = `import('tsx/esm/api').then((m) => { m.register(); return import(${JSON.stringify(WORKER.href)}); })`;
  const worker = new Worker(boot, { eval: true, workerData: job });
  const report = new Promise<WorkerReport>((resolve, reject) => {
    worker.on('message', (m: WorkerReport | { started: true }) => {
      if (!('started' in m)) resolve(m);
    });
    worker.on('error', reject);
    worker.on('exit', (code) => reject(new Error(`worker exited with code ${code} before reporting`)));
  });
  return { worker, report };
}

testWhen(
  test.serial,
  'two worker threads, each on a request queue of its own, move verified data on disjoint ranges',
  requirements,
  async (t) => {
    t.timeout(60_000);
    // Three queues: the main thread's (it scanned) and one for each worker.
    const q = await startBackend(t, { sizeBytes: 64 * MiB, numQueues: 3 });
    const c = await connect(t, q);
    t.is(c.info.requestQueues, 3);
    await c.scan();
    const rounds = 3;
    // Both hold their queues before either runs: a quick one would otherwise give its queue
    // back before the other opens one.
    const gate = { buffer: new SharedArrayBuffer(4), parties: 2 };
    const jobs: WorkerJob[] = [0, 1].map((i) => ({
      handle: c.share(),
      device: DISK,
      lba: 8 + i * 16_384,
      blocks: 2048,
      depth: 8,
      rounds,
      seed: 200 + i,
      gate,
    }));
    const running = jobs.map(startWorker);
    t.teardown(() => Promise.all(running.map((r) => r.worker.terminate())));
    const reports = await within(Promise.all(running.map((r) => r.report)), 45_000, 'worker reports');
    for (const [i, r] of reports.entries()) {
      t.is(r.error, undefined, `worker ${i}: ${JSON.stringify(r.error)}`);
      t.true(r.ok, `worker ${i}`);
      t.is(r.mismatches, 0);
      t.is(r.verified, rounds * (2048 / 8), `worker ${i}: every 8-block unit of every round read back`);
      t.false(r.shared, `worker ${i}: a queue of its own`);
    }
    const queues = new Set([...reports.map((r) => r.queueIndex), c.queueStats!.queueIndex]);
    t.is(queues.size, 3, `queues ${[...reports.map((r) => r.queueIndex), c.queueStats!.queueIndex].join(', ')}: one per thread`);

    // What each worker wrote last is in the image file, and the main thread reads it too.
    const dev = c.device(DISK);
    for (const job of jobs) {
      const last = job.seed + rounds - 1;
      const expected = Buffer.concat(
        Array.from({ length: job.blocks / 8 }, (_, k) => workerPattern(last * 1_000_003 + job.lba + k * 8, 8 * BS)),
      );
      sameBytes(t, fromDisk(q.image, job.lba * BS, expected.length), expected, `worker seed ${job.seed} in the image file`);
      sameBytes(t, await dev.read(job.lba, job.blocks), expected, `worker seed ${job.seed} read by the main thread`);
    }
    t.true(isZero(fromDisk(q.image, (8 + 2048) * BS, (16_384 - 2048) * BS)), 'nothing written between the two ranges');
    t.is(c.failure, null);
  },
);

// ---- capacity ----------------------------------------------------------------------------------

testWhen(
  test.serial,
  'a block_resize reaches the controller with the export added again: capacity-changed, I/O at the new end, RangeError beyond',
  requirements,
  async (t) => {
    t.timeout(60_000);
    const oldSize = 16 * MiB;
    const newSize = 19 * MiB + 7 * BS;
    const oldBlocks = oldSize / BS;
    const newBlocks = newSize / BS;
    const q = await startBackend(t, { sizeBytes: oldSize });
    const c = await connect(t, q, { reconnect: { retries: 50, delayMs: 50, maxDelayMs: 200 } });
    await c.scan();
    const dev = c.device(DISK);
    t.is(dev.blockCount, BigInt(oldBlocks));
    const oldTail = pattern(5, oldBlocks - 8, 8);
    await dev.write(oldBlocks - 8, oldTail);
    await t.throwsAsync(dev.read(oldBlocks, 1), { instanceOf: RangeError }, 'beyond the end before the resize');

    const changes: Array<{ device: BlockDevice; before: Geometry; after: bigint }> = [];
    const changed = new Promise<void>((resolve) =>
      c.on('capacity-changed', (device, before) => {
        changes.push({ device, before, after: device.blockCount });
        resolve();
      }),
    );
    const reconnected = new Promise<number>((resolve) => c.once('reconnected', resolve));
    const failed = new Promise<Error>((resolve) => c.once('failed', resolve));

    const qmp = await openQmp(t, q);
    await qmp.execute('block_resize', { 'node-name': DISK_NODE, size: newSize });
    t.is(statSync(q.image).size, newSize, 'block_resize grew the image file');
    // The export serves the capacity it was created with: replace it by one on the grown disk, at
    // the same socket. Deleting it closes the connection; the controller connects again.
    await qmp.execute('block-export-del', { id: 'exp0' });
    await qmp.event('BLOCK_EXPORT_DELETED');
    await qmp.execute('block-export-add', q.exportArguments('exp1'));
    const attempts = await within(
      Promise.race([
        Promise.all([changed, reconnected]).then(([, n]) => n),
        failed.then((e) => {
          throw e;
        }),
      ]),
      20_000,
      'capacity-changed and reconnected',
    );
    t.true(attempts >= 1);
    t.is(changes.length, 1, 'one capacity change');
    t.is(changes[0]!.device, dev, 'the same BlockDevice, updated in place');
    t.is(changes[0]!.before.blockCount, BigInt(oldBlocks));
    t.is(changes[0]!.before.blockSize, BS);
    t.is(changes[0]!.after, BigInt(newBlocks));
    t.is(dev.blockCount, BigInt(newBlocks));
    t.is(dev.info.sizeBytes, BigInt(newSize));
    t.is(c.device(DISK), dev);
    t.is(c.failure, null);

    // The data of the old end is still there; I/O reaches the new end, also across the old one.
    sameBytes(t, await dev.read(oldBlocks - 8, 8), oldTail, 'the old tail after the resize');
    const newLast = newBlocks - 1;
    const tail = pattern(6, newLast, 1);
    await dev.write(newLast, tail);
    const across = pattern(6, oldBlocks - 4, 8);
    await dev.write(oldBlocks - 4, across);
    await dev.flush();
    sameBytes(t, await dev.read(newLast, 1), tail, 'the new last block read back');
    sameBytes(t, fromDisk(q.image, newLast * BS, BS), tail, 'the new last block in the image file');
    sameBytes(t, await dev.read(oldBlocks - 4, 8), across, 'across the old end');
    sameBytes(t, fromDisk(q.image, (oldBlocks - 4) * BS, across.length), across, 'across the old end, in the file');
    await t.throwsAsync(dev.read(newBlocks, 1), { instanceOf: RangeError }, 'beyond the new end');
    await t.throwsAsync(dev.write(newLast, pattern(7, newLast, 2)), { instanceOf: RangeError }, 'a write running past the new end');
    await dev.refresh();
    t.is(dev.blockCount, BigInt(newBlocks), 'refresh reads the same capacity');
    t.is(changes.length, 1, 'no further change');
  },
);

// ---- read-only ---------------------------------------------------------------------------------

testWhen(
  test.serial,
  'a read-only export (writable=off): reads work, writes are refused as read-only, the image stays as it was',
  requirements,
  async (t) => {
    t.timeout(60_000);
    const size = 8 * MiB;
    const preset = pattern(9, 0, 2048);
    const q = await startBackend(t, { sizeBytes: size, writable: false, init: (image) => toDisk(image, 0, preset) });
    const image = fromDisk(q.image, 0, size);
    const c = await connect(t, q);
    t.is(c.info.blk?.readOnly, true, 'VIRTIO_BLK_F_RO offered');
    await c.scan();
    const dev = c.device(DISK);
    sameBytes(t, await dev.read(0, 2048), preset, 'preset read through the initiator');

    // Writes end at the initiator, before the device: plain, with FUA, and one of several requests.
    const refusals: Array<[string, () => Promise<unknown>]> = [
      ['write', () => dev.write(0, pattern(10, 0, 8))],
      ['write with fua', () => dev.write(16, pattern(10, 16, 8), { fua: true })],
      ['large write', () => dev.write(0, pattern(10, 0, (4 * MiB) / BS))],
    ];
    for (const [what, call] of refusals) {
      const e = await t.throwsAsync(call(), { instanceOf: RequestRefusedError }, what);
      t.is(e?.code, 'ERR_VIRTIO_REQUEST_REFUSED', what);
      t.regex(e?.message ?? '', /read-only/, what);
    }
    t.is(dev.iostat.writeOps, 0, 'no write completed');
    // DISCARD and WRITE ZEROES, which the device still offers, fail too.
    // Refused before they reach the device, as writes are.
    await t.throwsAsync(dev.writeZeroes(0, 8), { instanceOf: RequestRefusedError, message: /read-only/ }, 'write zeroes on a read-only disk');
    await t.throwsAsync(dev.unmap({ lba: 0, blocks: 8 }), { instanceOf: NotSupportedError, message: /read-only/ }, 'discard on a read-only disk');
    t.false(dev.info.unmap);
    await dev.flush();

    sameBytes(t, fromDisk(q.image, 0, size), image, 'the image file is unchanged');
    sameBytes(t, await dev.read(0, 2048), preset, 'reads after the refusals');
    t.is(c.failure, null, 'refusals do not fail the controller');
  },
);

// ---- the daemon going away ---------------------------------------------------------------------

testWhen(
  test.serial,
  'when qemu-storage-daemon exits the open controller fails, and connecting to its socket is a ConnectError',
  requirements,
  async (t) => {
    t.timeout(60_000);
    const q = await startBackend(t, { sizeBytes: 8 * MiB });
    const c = await connect(t, q);
    await c.scan();
    const dev = c.device(DISK);
    const data = pattern(11, 77, 8);
    await dev.write(77, data);
    await dev.flush();

    const failed = new Promise<Error>((resolve) => c.once('failed', resolve));
    const status = await q.stop();
    t.true(status.code !== null || status.signal !== null, 'the daemon is gone');
    const e = await within(failed, 10_000, "the controller's 'failed' event");
    t.true(e instanceof ControllerFailedError, `failed with ${String(e)}`);
    t.truthy(c.failure, 'the controller says why it failed');
    await t.throwsAsync(dev.read(77, 8), { instanceOf: ControllerFailedError });
    sameBytes(t, fromDisk(q.image, 77 * BS, data.length), data, 'what was written before is in the image file');

    const refused = await t.throwsAsync(Controller.connect(q.socket, { type: 'blk' }), { instanceOf: ConnectError });
    t.is(refused?.code, 'ERR_VIRTIO_CONNECT');
    t.true(refused?.errno === 'ENOENT' || refused?.errno === 'ECONNREFUSED', `errno ${refused?.errno}`);
  },
);

// ---- the command line --------------------------------------------------------------------------

interface BenchJson {
  device: string;
  ios: number;
  iops: number;
  reads: number;
  writes: number;
  errors: number;
  mismatches: number;
  mismatchLbas: number[];
  workers: Array<{ queue: number; iops: number; shared: boolean }>;
}

function describe(r: Run): string {
  return `exit ${r.code} (signal ${r.signal})\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`;
}

/** Runs a short verified randrw bench against a fresh daemon; the JSON result, checked. */
async function benchAgainstQsd(t: ExecutionContext, extra: string[]): Promise<BenchJson | undefined> {
  const q = await startBackend(t, { sizeBytes: 64 * MiB });
  const args = ['bench', '--socket', q.socket, '--type', 'blk', '--verify', '--rw', 'randrw', '--bs', '4k', '--time', '2', '--json'];
  const r = await cli([...args, ...extra], { timeoutMs: 45_000 });
  t.is(r.code, 0, describe(r));
  let j: BenchJson;
  try {
    const lines = r.stdout.trimEnd().split('\n');
    j = JSON.parse(lines[lines.length - 1]!) as BenchJson;
  } catch {
    t.fail(`no JSON on the last line of stdout\n${describe(r)}`);
    return undefined;
  }
  t.is(j.device, DISK);
  t.is(j.errors, 0);
  t.is(j.mismatches, 0);
  t.deepEqual(j.mismatchLbas, []);
  t.true(j.ios > 0, `${j.ios} requests completed`);
  t.true(j.reads > 0 && j.writes > 0, `${j.reads} reads, ${j.writes} writes`);
  t.true(statSync(q.image).blocks > 0, "the bench's writes reached the image file");
  return j;
}

testWhen(
  test.serial,
  'virtio-initiator bench --type blk --verify runs against qemu-storage-daemon without errors or mismatches',
  requirements,
  async (t) => {
    t.timeout(60_000);
    const j = await benchAgainstQsd(t, ['--qd', '16']);
    t.is(j?.workers.length, 1);
  },
);

testWhen(
  test.serial,
  'virtio-initiator bench --type blk --verify --workers 2 loads both queues of qemu-storage-daemon',
  requirements,
  async (t) => {
    t.timeout(60_000);
    const j = await benchAgainstQsd(t, ['--qd', '8', '--workers', '2']);
    if (j === undefined) return;
    t.is(j.workers.length, 2);
    t.is(new Set(j.workers.map((w) => w.queue)).size, 2, `queues ${j.workers.map((w) => w.queue).join(', ')}`);
    for (const w of j.workers) {
      t.false(w.shared, `queue ${w.queue} is the worker's own`);
      t.true(w.iops > 0, `queue ${w.queue} did I/O`);
    }
  },
);
