// virtio-blk against the bundled target in its blk mode (`--type blk`): the one disk and its
// configuration, verified I/O through the fast path and split transfers, FLUSH, DISCARD, WRITE
// ZEROES and GET ID, the device's status byte as typed errors, a request held past its deadline
// (straight to a device reset: virtio-blk has no task management), a target killed and started
// again, a capacity change found in the configuration space, and a device type that does not
// match the backend.
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import test, { type ExecutionContext } from 'ava';

import {
  BlkIoError,
  type BlockDevice,
  ConnectError,
  Controller,
  type ControllerOptions,
  NotSupportedError,
  RequestRefusedError,
  RequestTimeoutError,
  type RecoveryStep,
} from '../ts/index.js';
import { testWhen } from './helpers/env.js';
import { initiatorRequirements, pattern, startTestTarget, type TargetSetup } from './helpers/initiator.js';
import { type ControlClient, startTarget } from './helpers/target.js';

const MiB = 1 << 20;

interface Blk {
  s: TargetSetup;
  c: Controller;
  d: BlockDevice;
  ctl: ControlClient;
}

async function blkTarget(t: ExecutionContext, lun = '0:0:ram:64M:4096', options: ControllerOptions = {}): Promise<Blk> {
  const s = await startTestTarget({ type: 'blk', luns: [lun], queues: 2 });
  t.teardown(() => s.cleanup());
  const c = await Controller.connect(s.socket, { type: 'blk', memoryBytes: 32 * MiB, ...options });
  t.teardown(() => c.close());
  await c.scan();
  const ctl = await s.target.control();
  t.teardown(() => ctl.close());
  return { s, c, d: c.devices[0]!, ctl };
}

/** Requests the target took, over all its queues. */
async function requestsSeen(ctl: ControlClient): Promise<number> {
  const { queues } = (await ctl.stats()) as unknown as { queues: Array<{ requests: number }> };
  return queues.reduce((n, q) => n + q.requests, 0);
}

async function until(check: () => boolean, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

const blk = (title: string, impl: (t: ExecutionContext) => Promise<void>) => testWhen(test, title, initiatorRequirements, impl);

blk('one disk named after the controller, with the configuration, serial and limits the device states', async (t) => {
  const { c, d } = await blkTarget(t, '0:0:ram:64M:4096', { name: 'Blk7' });
  t.is(c.deviceType, 'blk');
  const info = c.info;
  t.like(info, { deviceType: 'blk', requestQueues: 2, maxTarget: 0, maxLun: 0, hotplug: false });
  t.like(info.blk, { capacitySectors: (64 * MiB) / 512, blockSize: 4096, flush: true, discard: true, writeZeroes: true, readOnly: false });
  t.deepEqual(
    c.devices.map((x) => x.name),
    ['Blk7'],
  );
  t.is(c.device('Blk7'), d);
  t.deepEqual(c.luns, [], 'no SCSI logical units');
  t.like(d.info, {
    name: 'Blk7',
    deviceType: 'blk',
    target: 0,
    lun: 0,
    blockSize: 4096,
    blockCount: 16384n,
    sizeBytes: BigInt(64 * MiB),
    serial: 'VIRTINIT-ram',
    unmap: true,
    writeCache: true,
  });
  t.like(d.info.limits, { maxUnmapDescriptors: 1, unmapGranularity: 1 });
  // Without a name, a virtio-blk controller is VirtioBlk0.
  const s2 = await startTestTarget({ type: 'blk', luns: ['0:0:null:1G:512'] });
  t.teardown(() => s2.cleanup());
  const c2 = await Controller.connect(s2.socket, { type: 'blk' });
  t.teardown(() => c2.close());
  await c2.scan();
  t.like(c2.device('VirtioBlk0').info, { blockSize: 512, blockCount: 2n * 1024n * 1024n, serial: 'VIRTINIT-null' });
});

blk('verified I/O at both ends, through DMA and plain buffers, and split at the transfer limit', async (t) => {
  const { c, d, ctl } = await blkTarget(t, '0:0:ram:64M:4096', { maxTransferBytes: 64 * 1024 });
  const last = Number(d.blockCount) - 2;
  const dma = c.allocBuffer(2 * 4096);
  pattern(dma.length, 1).copy(dma);
  await d.write(0, dma);
  const plain = new Uint8Array(pattern(2 * 4096, 2));
  await d.write(last, plain);
  t.true((await d.read(0, 2)).equals(dma));
  t.true((await d.read(last, 2)).equals(Buffer.from(plain)));
  t.true((await d.read(BigInt(last), new Uint8Array(2 * 4096))).equals(Buffer.from(plain)), 'a bigint LBA and a caller buffer');

  // 1 MiB at 64 KiB per request: 16 requests each way.
  const before = await requestsSeen(ctl);
  const big = pattern(MiB, 3);
  await d.write(100, big);
  t.true((await d.read(100, MiB / 4096)).equals(big));
  t.is((await requestsSeen(ctl)) - before, 32);
  t.is(d.info.limits.maxTransferBlocks, 16);
  t.like(d.iostat, { writeOps: 2 + 16, readOps: 3 + 16 });

  await t.throwsAsync(d.read(last + 1, 2), { instanceOf: RangeError, message: /exceeds the capacity of 16384 blocks/ });
  await t.throwsAsync(d.write(0, Buffer.alloc(100)), { instanceOf: RangeError, message: /block size 4096/ });
});

blk('FLUSH, WRITE ZEROES and DISCARD reach the device; forced unit access is a write and a flush', async (t) => {
  const { d, ctl } = await blkTarget(t);
  const data = pattern(8 * 4096, 4);
  await d.write(10, data);

  let before = await requestsSeen(ctl);
  await d.flush();
  t.is((await requestsSeen(ctl)) - before, 1);
  t.is(d.iostat.flushOps, 1);

  before = await requestsSeen(ctl);
  await d.write(30, pattern(4096, 5), { fua: true });
  t.is((await requestsSeen(ctl)) - before, 2, 'the write, then a flush');
  t.is(d.iostat.flushOps, 2);

  await d.writeZeroes(11, 2);
  const back = await d.read(10, 8);
  t.true(back.subarray(0, 4096).equals(data.subarray(0, 4096)), 'the block before is kept');
  t.true(back.subarray(4096, 3 * 4096).every((b) => b === 0), 'zeroed');
  t.true(back.subarray(3 * 4096).equals(data.subarray(3 * 4096)), 'the blocks after are kept');

  await d.unmap([
    { lba: 14, blocks: 1 },
    { lba: 16, blocks: 2 },
  ]);
  const after = await d.read(10, 8);
  t.true(after.subarray(4 * 4096, 5 * 4096).every((b) => b === 0), 'a RAM disk reads zeros where it was discarded');
  t.true(after.subarray(5 * 4096, 6 * 4096).equals(data.subarray(5 * 4096, 6 * 4096)), 'between the ranges, kept');
  t.like(d.iostat, { unmapOps: 1, unmapBytes: 3 * 4096 });
  await t.throwsAsync(d.unmap({ lba: 16383, blocks: 2 }), { instanceOf: RangeError });
});

blk('the status byte as typed errors; SCSI-only calls and writes to a read-only disk are refused by name', async (t) => {
  const { d, ctl } = await blkTarget(t);
  await ctl.inject(0, 0, 'io_error', 1);
  const e = await t.throwsAsync(d.read(5, 1), { instanceOf: BlkIoError, message: /VirtioBlk0: READ of 4096 bytes failed \(VIRTIO_BLK_S_IOERR\)/ });
  t.is(e?.code, 'ERR_VIRTIO_BLK_IOERR');
  await ctl.inject(0, 0, 'io_error', 1);
  await t.throwsAsync(d.flush(), { instanceOf: BlkIoError, message: /FLUSH failed/ });
  t.is((await d.read(5, 1)).length, 4096, 'the fault is used up');
  await t.throwsAsync(d.passthrough(Uint8Array.of(0, 0, 0, 0, 0, 0)), { instanceOf: NotSupportedError, message: /passthrough is for SCSI devices; VirtioBlk0 is a virtio-blk disk/ });
  await t.throwsAsync(d.reset(), { instanceOf: NotSupportedError, message: /reset is for SCSI devices/ });

  const ro = await blkTarget(t, '0:0:ram:4M:512:ro');
  t.true(ro.c.info.blk!.readOnly);
  t.is((await ro.d.read(0, 1)).length, 512);
  const before = await requestsSeen(ro.ctl);
  await t.throwsAsync(ro.d.write(0, Buffer.alloc(512)), { instanceOf: RequestRefusedError, message: /the device is read-only/ });
  await t.throwsAsync(ro.d.writeZeroes(0, 1), { instanceOf: RequestRefusedError, message: /the device is read-only/ });
  await t.throwsAsync(ro.d.unmap({ lba: 0, blocks: 1 }), { instanceOf: NotSupportedError, message: /does not support DISCARD \(the device is read-only\)/ });
  await ro.d.flush();
  t.is((await requestsSeen(ro.ctl)) - before, 1, 'only the flush reached the device');
});

blk('a request held past its deadline: no task management, the device is reset, and the disk works after', async (t) => {
  const { c, d, ctl } = await blkTarget(t, '0:0:ram:64M:4096', { timeoutMs: 300 });
  const steps: RecoveryStep[] = [];
  c.on('recovery', (step) => steps.push(step));
  const data = pattern(4096, 6);
  await d.write(7, data);
  await ctl.inject(0, 0, 'never', 1);
  await t.throwsAsync(d.read(7, 1), { instanceOf: RequestTimeoutError, message: /READ of 1 blocks at LBA 7/ });
  await until(() => steps.length > 0, 10_000, 'the recovery step');
  t.like(steps[0], { device: 'VirtioBlk0', action: 'device-reset', why: 'timeout', returned: true, request: 'READ of 1 blocks at LBA 7' });
  t.is(steps.length, 1, 'no task management steps');
  t.is(c.failure, null);
  t.true((await d.read(7, 1)).equals(data));
});

blk('a target killed and started again on the same socket and file: reconnected, the data is there', async (t) => {
  t.timeout(30_000);
  const dir = mkdtempSync(join(tmpdir(), 'vi-blk-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const image = join(dir, 'disk.img');
  writeFileSync(image, '');
  truncateSync(image, 8 * MiB);
  const socket = join(dir, 'vhost.sock');
  const luns = [`0:0:file:${image}:512`];
  let target = await startTarget({ socket, luns, type: 'blk' });
  t.teardown(() => target.stop());
  const c = await Controller.connect(socket, { type: 'blk', reconnect: { delayMs: 20, maxDelayMs: 200, retries: 200 } });
  t.teardown(() => c.close());
  await c.scan();
  const d = c.device('VirtioBlk0');
  const serial = d.info.serial;
  t.regex(serial ?? '', /^VIRTINIT-/);
  const data = pattern(16 * 512, 7);
  await d.write(40, data);
  const reconnected = new Promise<number>((resolve) => c.once('reconnected', resolve));
  target.child.kill('SIGKILL');
  await new Promise((r) => target.child.once('exit', r));
  rmSync(socket, { force: true });
  target = await startTarget({ socket, luns, type: 'blk' });
  await reconnected;
  t.is(c.device('VirtioBlk0'), d, 'the same disk (same ID) keeps its object');
  t.is(d.info.serial, serial);
  t.true((await d.read(40, 16)).equals(data));
});

blk('a capacity change is found in the configuration space: capacity-changed, and I/O up to the new end', async (t) => {
  const { c, d, ctl } = await blkTarget(t, '0:0:ram:4M:4096');
  const changed = new Promise<bigint>((resolve) => c.once('capacity-changed', (_dev, before) => resolve(before.blockCount)));
  await ctl.resizeLun(0, 0, '8M');
  t.is(await changed, 1024n);
  t.is(d.blockCount, 2048n);
  t.is(d.info.sizeBytes, BigInt(8 * MiB));
  const data = pattern(4096, 8);
  await d.write(2047, data);
  t.true((await d.read(2047, 1)).equals(data));
  await t.throwsAsync(d.read(2048, 1), { instanceOf: RangeError });
  // refresh() reads it at once.
  await ctl.resizeLun(0, 0, '2M');
  await d.refresh();
  t.is(d.blockCount, 512n);
});

blk('a device type that does not match the backend is refused at connect, naming it', async (t) => {
  t.timeout(20_000);
  const blkSide = await startTestTarget({ type: 'blk', luns: ['0:0:ram:1M:512'] });
  t.teardown(() => blkSide.cleanup());
  await t.throwsAsync(Controller.connect(blkSide.socket), { instanceOf: ConnectError, message: /device has 1 virtqueues, a virtio-scsi device needs at least 3/ });
  await t.throwsAsync(Controller.connect(blkSide.socket, { type: 'tape' as 'blk' }), { instanceOf: RangeError, message: /type must be 'scsi' or 'blk'/ });
  const scsiSide = await startTestTarget({ luns: ['0:0:ram:1M:512'] });
  t.teardown(() => scsiSide.cleanup());
  // The virtio-scsi backend's configuration space is shorter than virtio-blk's: it answers
  // GET_CONFIG with an empty payload, which is the refusal (not a wait for the reply deadline).
  await t.throwsAsync(Controller.connect(scsiSide.socket, { type: 'blk' }), {
    instanceOf: ConnectError,
    message: /virtio-blk configuration space .*the backend refused to read 60 bytes of configuration space at offset 0/,
  });
  // The connection is closed cleanly: the target serves the next frontend.
  await using scsi = await Controller.connect(scsiSide.socket);
  t.is(scsi.deviceType, 'scsi');
});
