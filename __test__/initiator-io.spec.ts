// Data through the initiator to the bundled target and back: both block sizes, the first and
// last LBA, split transfers, DMA and plain buffers, more requests than the ring holds, a file
// LUN checked on disk, unmap / write zeroes / flush / reset, and raw passthrough.
import test, { type ImplementationFn } from 'ava';
import { closeSync, mkdtempSync, openSync, readSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { type BlockDevice, type Controller, scsi, ScsiError } from '../ts/index.js';
import { testWhen, unmet } from './helpers/env.js';
import { connectAndScan, initiatorRequirements, pattern, startTestTarget } from './helpers/initiator.js';

const IMAGE_BYTES = 16 << 20;

interface Ctx {
  ctrl: Controller;
  /** A controller with a 16-entry ring (on a second target: one frontend per target). */
  small: Controller;
  image: string;
}

let ctx: Ctx | undefined;
const cleanups: Array<() => unknown> = [];

test.before(async () => {
  if (unmet(initiatorRequirements).length > 0) return;
  const dir = mkdtempSync(join(tmpdir(), 'vi-io-'));
  const image = join(dir, 'disk.img');
  writeFileSync(image, '');
  truncateSync(image, IMAGE_BYTES);
  const setup = await startTestTarget({
    dir,
    luns: ['0:0:ram:64M:512', '0:1:ram:64M:4096', `1:0:file:${image}:4096`, '1:1:ram:16M:512', '1:2:ram:16M:4096'],
  });
  cleanups.push(() => setup.cleanup());
  const ctrl = await connectAndScan(setup);
  cleanups.push(() => ctrl.close());
  const second = await startTestTarget({ luns: ['0:0:ram:16M:4096'] });
  cleanups.push(() => second.cleanup());
  const small = await connectAndScan(second, { name: 'Small0', queueSize: 16 });
  cleanups.push(() => small.close());
  ctx = { ctrl, small, image };
});

test.after.always(async () => {
  for (const c of cleanups.reverse()) await c();
});

function dev(name: string): BlockDevice {
  if (!ctx) throw new Error('no target');
  return ctx.ctrl.device(name);
}

const io = (title: string, impl: ImplementationFn<[]>) => testWhen(test, title, initiatorRequirements, impl);

io('patterns at the first and last LBA, 512 and 4096 byte blocks', async (t) => {
  for (const name of ['VirtioScsi0t0', 'VirtioScsi0t0l1']) {
    const d = dev(name);
    const bs = d.blockSize;
    const last = d.blockCount - 1n;
    const head = pattern(8 * bs, 1);
    const tail = pattern(8 * bs, 2);
    const lastBlock = pattern(bs, 3);
    await d.write(0, head);
    await d.write(last - 8n, tail);
    await d.write(last, lastBlock);
    t.deepEqual(await d.read(0, 8), head, `${name} first blocks`);
    t.deepEqual(await d.read(last - 8n, 8), tail, `${name} blocks before the last`);
    t.deepEqual(await d.read(last, 1), lastBlock, `${name} last block`);
    // A read across the two writes at the end.
    const both = await d.read(last - 8n, 9);
    t.deepEqual(both, Buffer.concat([tail, lastBlock]));
  }
});

io('a transfer larger than the max transfer length is split and reassembled', async (t) => {
  const d = dev('VirtioScsi0t0');
  const bs = d.blockSize;
  const max = d.info.limits.maxTransferBlocks;
  const blocks = max * 3 + 17;
  const data = pattern(blocks * bs, 4);
  const before = ctx!.ctrl.queueStats!.submitted;
  await d.write(1000, data);
  const written = ctx!.ctrl.queueStats!.submitted - before;
  t.true(written >= 4, `split into ${written} commands`);
  const back = await d.read(1000, blocks);
  t.is(back.length, data.length);
  t.true(back.equals(data));
  // The block just past the transfer is untouched.
  t.false((await d.read(1000 + blocks, 1)).equals(data.subarray(0, bs)));
});

io('DMA buffers and plain buffers carry the same data', async (t) => {
  const d = dev('VirtioScsi0t0l1');
  const bs = d.blockSize;
  const dma = d.allocBuffer(64 * bs);
  pattern(64 * bs, 5).copy(dma);
  await d.write(100, dma);
  const plain = Buffer.alloc(64 * bs);
  t.is(await d.read(100, plain), plain);
  t.true(plain.equals(dma));

  const plainOut = pattern(16 * bs, 6);
  await d.write(300, plainOut);
  const dmaIn = d.allocBuffer(16 * bs);
  await d.read(300, dmaIn);
  t.true(dmaIn.equals(plainOut));

  // A Uint8Array that is not a Buffer, and a subarray of a DMA buffer.
  const u8 = new Uint8Array(pattern(2 * bs, 7));
  await d.write(400, u8);
  const view = d.allocBuffer(8 * bs).subarray(3 * bs, 5 * bs);
  await d.read(400, view);
  t.deepEqual(new Uint8Array(view), u8);
});

io('more concurrent requests than the ring holds go through the JS FIFO', async (t) => {
  const ctrl = ctx!.small;
  t.is(ctrl.info.queueSize, 16);
  const d = ctrl.device('Small0t0');
  const bs = d.blockSize;
  const n = 300;
  const blocks = Array.from({ length: n }, (_, i) => pattern(bs, 1000 + i));
  const stats0 = ctrl.queueStats ?? { submitCalls: 0, submitted: 0 };
  // Issued in one tick: far more than the 16 ring entries.
  await Promise.all(blocks.map((b, i) => d.write(i * 3, b)));
  const back = await Promise.all(blocks.map((_, i) => d.read(i * 3, 1)));
  back.forEach((b, i) => t.true(b.equals(blocks[i]!), `block ${i}`));
  const stats = ctrl.queueStats!;
  t.is(stats.submitted - stats0.submitted, 2 * n);
  t.true(stats.submitCalls - stats0.submitCalls > (2 * n) / 16 - 1, 'resubmitted as slots freed');
  t.like(stats, { queued: 0, inFlight: 0 });
});

io('a file LUN writes through to its image file', async (t) => {
  const d = dev('VirtioScsi0t1');
  t.is(d.blockSize, 4096);
  t.is(d.blockCount, BigInt(IMAGE_BYTES / 4096));
  const data = pattern(3 * 4096, 8);
  await d.write(5, data);
  await d.flush();
  const fd = openSync(ctx!.image, 'r');
  const onDisk = Buffer.alloc(data.length);
  try {
    readSync(fd, onDisk, 0, onDisk.length, 5 * 4096);
  } finally {
    closeSync(fd);
  }
  t.true(onDisk.equals(data));
  const last = pattern(4096, 9);
  await d.write(d.blockCount - 1n, last, { fua: true });
  const fd2 = openSync(ctx!.image, 'r');
  const tail = Buffer.alloc(4096);
  try {
    readSync(fd2, tail, 0, 4096, IMAGE_BYTES - 4096);
  } finally {
    closeSync(fd2);
  }
  t.true(tail.equals(last));
});

io('unmap and writeZeroes read back zeros, neighbours keep their data', async (t) => {
  for (const name of ['VirtioScsi0t1l1', 'VirtioScsi0t1l2']) {
    const d = dev(name);
    const bs = d.blockSize;
    t.true(d.info.unmap);
    const data = pattern(64 * bs, 10);
    await d.write(0, data);
    await d.unmap([
      { lba: 2, blocks: 10 },
      { lba: 20n, blocks: 5 },
    ]);
    await d.writeZeroes(40, 16);
    const back = await d.read(0, 64);
    const zero = (from: number, to: number) => back.subarray(from * bs, to * bs).every((b) => b === 0);
    const same = (from: number, to: number) =>
      back.subarray(from * bs, to * bs).equals(data.subarray(from * bs, to * bs));
    t.true(same(0, 2) && zero(2, 12) && same(12, 20) && zero(20, 25) && same(25, 40), `${name} unmap`);
    t.true(zero(40, 56) && same(56, 64), `${name} writeZeroes`);

    // The whole device, up to its last block.
    await d.write(d.blockCount - 4n, pattern(4 * bs, 11));
    await d.writeZeroes(0, d.blockCount);
    t.true((await d.read(d.blockCount - 4n, 4)).every((b) => b === 0), `${name} zeroed to the end`);
  }
});

io('flush, and reset followed by more I/O', async (t) => {
  const d = dev('VirtioScsi0t0');
  await d.flush();
  const data = pattern(4 * 512, 12);
  await d.write(77, data);
  await d.reset();
  // The UNIT ATTENTION the reset leaves behind is retried transparently.
  t.true((await d.read(77, 4)).equals(data));
  await d.flush();
});

io('passthrough: raw INQUIRY data, and ILLEGAL REQUEST for a vendor-specific opcode', async (t) => {
  const d = dev('VirtioScsi0t0');
  const r = await d.passthrough(scsi.inquiry({ allocationLength: 96 }), { dataIn: 96 });
  t.is(r.status, 0);
  t.is(r.dataLength, 36);
  t.is(scsi.parseInquiry(r.data!).vendor, 'VIRTINIT');

  const e = await t.throwsAsync(d.passthrough(Uint8Array.from([0xc0, 0, 0, 0, 0, 0])), { instanceOf: ScsiError });
  t.is(e?.key, scsi.SenseKey.ILLEGAL_REQUEST);
  t.is(e?.asc, 0x20);
  t.is(e?.ascq, 0);
  t.regex(e!.message, /opcode 0xc0 on VirtioScsi0t0: .*ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE/);

  // Data-out passthrough: WRITE(10) of one block, read back through the block API. The tests of
  // this file run at once: the block lies beyond those the split transfer above uses.
  const block = pattern(512, 13);
  await d.passthrough(scsi.write10({ lba: 60_000, blocks: 1 }), { dataOut: block });
  t.true((await d.read(60_000, 1)).equals(block));
});
