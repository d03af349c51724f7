// Scan and block-device fallbacks against a scripted target that implements less than the
// bundled one (no REPORT LUNS, no VPD pages, no READ CAPACITY (16), no WRITE SAME). The bundled
// target itself is scanned in initiator-scan.spec.ts.
import test from 'ava';

import { BlockDevice, type DeviceContext } from '../ts/block-device.js';
import { DEFAULT_RETRY_POLICY } from '../ts/command.js';
import { scanTargets } from '../ts/scan.js';
import { ScsiError } from '../ts/scsi/index.js';
import { FakeScsiTarget } from './helpers/fake-scsi.js';

const opts = { controllerName: 'Fake0', maxTarget: 7, maxLun: 0x3fff };

test('a bare SCSI-2 style target: no REPORT LUNS, no VPD, no READ CAPACITY (16)', async (t) => {
  const fake = new FakeScsiTarget({ 0: { luns: { 0: { blocks: 1000n, blockSize: 512, version: 2 } } } });
  const { luns, problems } = await scanTargets(fake, opts);
  t.deepEqual(problems, []);
  t.is(luns.length, 1);
  const lun = luns[0]!;
  t.like(lun, { name: 'Fake0t0', target: 0, lun: 0, vendor: 'FAKE', product: 'TINY DISK', revision: '0042' });
  t.like(lun, { ready: true, vpdPages: [], identifiers: [] });
  t.is(lun.serial, undefined);
  t.deepEqual(lun.geometry, { blockSize: 512, blockCount: 1000n });
  t.is(fake.ops(0x9e).length, 0, 'READ CAPACITY (16) not needed');
  // Targets 1..7 answered BAD_TARGET and were skipped without problems.
  t.deepEqual([...new Set(fake.ops(0xa0).map((c) => c.target))], [0, 1, 2, 3, 4, 5, 6, 7]);
});

test('an SPC-3 disk is sized by READ CAPACITY (16) alone; without it, by READ CAPACITY (10)', async (t) => {
  const fake = new FakeScsiTarget({
    0: { reportLuns: true, luns: { 0: { blocks: 1000n, rc16: true }, 1: { blocks: 2000n, rc16: false } } },
  });
  const { luns, problems } = await scanTargets(fake, opts);
  t.deepEqual(problems, []);
  t.deepEqual(luns.map((l) => l.geometry?.blockCount), [1000n, 2000n]);
  t.deepEqual(fake.ops(0x9e).map((c) => c.lun), [0, 1], 'READ CAPACITY (16) first');
  t.deepEqual(fake.ops(0x25).map((c) => c.lun), [1], 'READ CAPACITY (10) only where (16) is refused');
});

test('a disk too large for READ CAPACITY (10) is sized by READ CAPACITY (16)', async (t) => {
  const fake = new FakeScsiTarget({
    2: { reportLuns: true, luns: { 5: { blocks: 1n << 33n, blockSize: 4096, rc16: true, vpd: true } } },
  });
  const { luns } = await scanTargets(fake, opts);
  t.is(luns.length, 1);
  t.like(luns[0], { name: 'Fake0t2l5', target: 2, lun: 5, serial: 'SERIAL', vpdPages: [0x00, 0x80, 0xb0] });
  t.is(luns[0]!.geometry?.blockCount, 1n << 33n);
  t.is(luns[0]!.geometry?.blockSize, 4096);
});

test('a disk that answers only READ CAPACITY (16)', async (t) => {
  const fake = new FakeScsiTarget({ 0: { luns: { 0: { blocks: 77n, rc10: false, rc16: true } } } });
  const { luns } = await scanTargets(fake, opts);
  t.is(luns[0]!.geometry?.blockCount, 77n);
});

test('a large disk without READ CAPACITY (16) is listed with the problem', async (t) => {
  const fake = new FakeScsiTarget({ 0: { luns: { 0: { blocks: 1n << 33n } } } });
  const { luns } = await scanTargets(fake, opts);
  t.is(luns.length, 1);
  t.is(luns[0]!.geometry, undefined);
  t.regex(luns[0]!.problem ?? '', /READ CAPACITY\(16\) on Fake0t0: .*ILLEGAL REQUEST/);
});

test('unit attentions are retried and a stopped unit is started', async (t) => {
  const fake = new FakeScsiTarget({
    0: { reportLuns: true, luns: { 0: { unitAttentions: 3 }, 1: { needsStart: true } } },
  });
  const { luns, problems } = await scanTargets(fake, opts);
  t.deepEqual(problems, []);
  t.deepEqual(
    luns.map((l) => [l.name, l.ready]),
    [
      ['Fake0t0', true],
      ['Fake0t0l1', true],
    ],
  );
  const ssu = fake.ops(0x1b);
  t.is(ssu.length, 1);
  t.like(ssu[0], { target: 0, lun: 1 });
  t.is(ssu[0]!.cdb[4]! & 1, 1, 'START bit set');
});

test('a unit that stays not ready is listed, not ready, with the sense', async (t) => {
  const fake = new FakeScsiTarget({ 0: { luns: { 0: { stuck: [0x04, 0x03] } } } });
  const { luns } = await scanTargets(fake, opts);
  t.false(luns[0]!.ready);
  t.regex(luns[0]!.problem ?? '', /not ready: READ CAPACITY\(16\) on Fake0t0: .*MANUAL INTERVENTION REQUIRED/);
  t.is(luns[0]!.geometry, undefined);
});

test('LUN 0 missing, a non-disk device listed without geometry', async (t) => {
  const fake = new FakeScsiTarget({ 3: { reportLuns: true, luns: { 9: { type: 5 }, 300: {} } } });
  const { luns } = await scanTargets(fake, opts);
  t.deepEqual(
    luns.map((l) => [l.name, l.deviceType, l.geometry?.blockCount]),
    [
      ['Fake0t3l9', 5, undefined],
      ['Fake0t3l300', 0, 2048n],
    ],
  );
  t.false(fake.ops(0x9e).some((c) => c.lun === 9) || fake.ops(0x25).some((c) => c.lun === 9), 'no READ CAPACITY for the CD device');
});

function device(fake: FakeScsiTarget, lun: Awaited<ReturnType<typeof scanTargets>>['luns'][number]): BlockDevice {
  const ctx: DeviceContext = {
    controllerName: 'Fake0',
    executor: () => fake,
    allocBuffer: (n) => Buffer.alloc(n),
    taskManagement: () => Promise.resolve(0),
    maxSectors: 0,
    maxTransferBytes: 0,
    policy: DEFAULT_RETRY_POLICY,
  };
  return new BlockDevice(ctx, lun);
}

test('transfers are split at the max transfer length and land in LBA order', async (t) => {
  const fake = new FakeScsiTarget({ 0: { luns: { 0: { vpd: true, maxTransfer: 8, blocks: 100n } } } });
  const { luns } = await scanTargets(fake, opts);
  const dev = device(fake, luns[0]!);
  t.is(dev.info.limits.maxTransferBlocks, 8);
  const data = Buffer.alloc(30 * 512);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (i >> 9)) & 0xff;
  await dev.write(50, data);
  const writes = fake.ops(0x2a).map((c) => [Buffer.from(c.cdb).readUInt32BE(2), Buffer.from(c.cdb).readUInt16BE(7)]);
  t.deepEqual(writes, [
    [50, 8],
    [58, 8],
    [66, 8],
    [74, 6],
  ]);
  t.deepEqual(await dev.read(50, 30), data);
  await t.throwsAsync(dev.read(71, 30), {
    instanceOf: RangeError,
    message: 'Fake0t0: request lba 71 + blocks 30 exceeds the capacity of 100 blocks',
  });
});

test('fua reaches the READ and WRITE commands, split or not; a unit without the caching page has no writeCache', async (t) => {
  const fake = new FakeScsiTarget({ 0: { luns: { 0: { vpd: true, maxTransfer: 8, blocks: 100n } } } });
  const { luns } = await scanTargets(fake, opts);
  const dev = device(fake, luns[0]!);
  t.is(dev.info.writeCache, undefined);
  const fuaOf = (op: number) => fake.ops(op).map((c) => (c.cdb[1]! & 0x08) !== 0);
  await dev.write(0, Buffer.alloc(512 * 4), { fua: true });
  await dev.write(10, Buffer.alloc(512 * 12), { fua: true });
  await dev.write(30, Buffer.alloc(512));
  t.deepEqual(fuaOf(0x2a), [true, true, true, false]);
  await dev.read(0, 4, { fua: true });
  await dev.read(10, 12, { fua: true });
  await dev.read(30, 1);
  t.deepEqual(fuaOf(0x28), [true, true, true, false]);
});

test('writeZeroes falls back to plain writes when WRITE SAME is not implemented', async (t) => {
  const fake = new FakeScsiTarget({ 0: { luns: { 0: { blocks: 5000n } } } });
  const { luns } = await scanTargets(fake, opts);
  const dev = device(fake, luns[0]!);
  await dev.write(10, Buffer.alloc(4096 * 2, 0xab));
  await dev.writeZeroes(11, 4000);
  t.is(fake.ops(0x93).length, 1, 'WRITE SAME tried once');
  t.true(fake.ops(0x2a).length > 1);
  const back = await dev.read(10, 16);
  t.true(back.subarray(0, 512).every((b) => b === 0xab), 'block before the range kept');
  t.true(back.subarray(512).every((b) => b === 0));
  await dev.writeZeroes(0, 1);
  t.is(fake.ops(0x93).length, 1, 'not tried again');
});

test('passthrough returns raw data and throws ScsiError on CHECK CONDITION', async (t) => {
  const fake = new FakeScsiTarget({ 0: { luns: { 0: {} } } });
  const { luns } = await scanTargets(fake, opts);
  const dev = device(fake, luns[0]!);
  const r = await dev.passthrough(Uint8Array.from([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]), { dataIn: 16 });
  t.is(r.dataLength, 8);
  t.deepEqual([...r.data!], [0, 0, 7, 0xff, 0, 0, 2, 0]);
  const e = await t.throwsAsync(dev.passthrough(Uint8Array.from([0xc0, 0, 0, 0, 0, 0])), { instanceOf: ScsiError });
  t.is(e?.key, 5);
  t.is(e?.asc, 0x20);
  t.regex(e?.message ?? '', /^opcode 0xc0 on Fake0t0: SCSI CHECK CONDITION: ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE/);
});

test('UNMAP and WRITE SAME are split by the block limits the device reports', async (t) => {
  const fake = new FakeScsiTarget({
    0: {
      luns: {
        0: {
          vpd: true,
          unmap: true,
          writeSame: true,
          rc16: true,
          blocks: 1000n,
          maxUnmapBlocks: 100,
          maxUnmapDescriptors: 2,
          maxWriteSame: 64,
        },
      },
    },
  });
  const { luns } = await scanTargets(fake, opts);
  const dev = device(fake, luns[0]!);
  t.like(dev.info, { unmap: true, writeSameUnmap: true, unmappedReadsZero: true });
  t.like(dev.info.limits, { maxUnmapBlocks: 100, maxUnmapDescriptors: 2, maxWriteSameBlocks: 64 });

  await dev.write(0, Buffer.alloc(300 * 512, 0x11));
  await dev.unmap([
    { lba: 0, blocks: 250 },
    { lba: 260, blocks: 10 },
  ]);
  const unmaps = fake.ops(0x42).map((c) => Buffer.from(c.cdb).readUInt16BE(7));
  // Pieces 0+100, 100+100, 200+50, 260+10: two commands of two descriptors each.
  t.deepEqual(unmaps, [8 + 32, 8 + 32]);
  const back = await dev.read(0, 300);
  t.true(back.subarray(0, 250 * 512).every((b) => b === 0));
  t.true(back.subarray(250 * 512, 260 * 512).every((b) => b === 0x11));
  t.true(back.subarray(260 * 512, 270 * 512).every((b) => b === 0));
  t.true(back.subarray(270 * 512).every((b) => b === 0x11));

  await dev.write(500, Buffer.alloc(200 * 512, 0x22));
  await dev.writeZeroes(510, 150);
  const ws = fake.ops(0x93).map((c) => {
    const b = Buffer.from(c.cdb);
    return [Number(b.readBigUInt64BE(2)), b.readUInt32BE(10), (b[1]! & 0x08) !== 0];
  });
  t.deepEqual(ws, [
    [510, 64, true],
    [574, 64, true],
    [638, 22, true],
  ]);
  const z = await dev.read(500, 200);
  t.true(z.subarray(0, 10 * 512).every((b) => b === 0x22));
  t.true(z.subarray(10 * 512, 160 * 512).every((b) => b === 0));
  t.true(z.subarray(160 * 512).every((b) => b === 0x22));
});
