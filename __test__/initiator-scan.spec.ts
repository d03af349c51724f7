// Scan of the bundled target over a real vhost-user socket: several targets with gaps between
// them, several LUNs per target, 512 and 4096 byte blocks, RAM and file LUNs, and a target whose
// only LUN is not LUN 0.
import test from 'ava';
import { mkdtempSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { BlockDevice, Controller } from '../ts/index.js';
import { testWhen } from './helpers/env.js';
import { connectAndScan, initiatorRequirements, startTestTarget } from './helpers/initiator.js';

testWhen(test, 'scan of several targets and LUNs', initiatorRequirements, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vi-scan-'));
  const images = [join(dir, 'a.img'), join(dir, 'b.img')];
  for (const image of images) {
    writeFileSync(image, '');
    truncateSync(image, 8 << 20);
  }
  const setup = await startTestTarget({
    dir,
    luns: [
      '0:0:ram:64M:512',
      '0:1:ram:32M:4096',
      `0:7:file:${images[0]}:4096`,
      `2:0:file:${images[1]}:512:ro`,
      // Target 5 has no LUN 0.
      '5:3:ram:1G:512',
    ],
    maxTarget: 6,
  });
  t.teardown(() => setup.cleanup());
  const ctrl = await connectAndScan(setup, { name: 'Scan0' });
  t.teardown(() => ctrl.close());

  t.is(ctrl.info.maxTarget, 6);
  const expected = [
    { name: 'Scan0t0', target: 0, lun: 0, blockSize: 512, blockCount: (64n << 20n) / 512n, product: 'RAM DISK' },
    { name: 'Scan0t0l1', target: 0, lun: 1, blockSize: 4096, blockCount: (32n << 20n) / 4096n, product: 'RAM DISK' },
    { name: 'Scan0t0l7', target: 0, lun: 7, blockSize: 4096, blockCount: (8n << 20n) / 4096n, product: 'FILE DISK' },
    { name: 'Scan0t2', target: 2, lun: 0, blockSize: 512, blockCount: (8n << 20n) / 512n, product: 'FILE DISK' },
    { name: 'Scan0t5l3', target: 5, lun: 3, blockSize: 512, blockCount: (1n << 30n) / 512n, product: 'RAM DISK' },
  ];
  t.deepEqual(
    ctrl.luns.map((l) => l.name),
    expected.map((e) => e.name),
  );
  t.deepEqual(
    ctrl.devices.map((d) => d.name),
    expected.map((e) => e.name),
  );
  const listed = await (await setup.target.control()).list();
  const serials = new Set<string>();
  for (const e of expected) {
    const dev = ctrl.device(e.name);
    t.true(dev instanceof BlockDevice);
    const info = dev.info;
    t.like(info, {
      name: e.name,
      target: e.target,
      lun: e.lun,
      blockSize: e.blockSize,
      blockCount: e.blockCount,
      sizeBytes: e.blockCount * BigInt(e.blockSize),
      vendor: 'VIRTINIT',
      product: e.product,
      revision: '0001',
    });
    // The target's own view of the same LUN.
    const mine = listed.find((l) => l.target === e.target && l.lun === e.lun);
    t.truthy(mine, `${e.name} listed by the target`);
    t.is(BigInt(mine!.blocks), info.blockCount);
    t.is(mine!.block_size, info.blockSize);
    t.regex(info.serial ?? '', /^[0-9A-F]{18}$/, `${e.name} serial`);
    serials.add(info.serial!);
    t.true(info.identifiers.some((d) => d.typeName === 'NAA'));
    t.true(info.identifiers.some((d) => d.typeName === 'T10 vendor ID' && d.value === `VIRTINIT${info.serial}`));
    t.true(info.unmap, `${e.name} supports UNMAP`);
    t.is(info.writeCache, true, `${e.name} reports its write cache (caching mode page WCE)`);
    t.true(info.limits.maxTransferBlocks * info.blockSize <= 8 << 20);
    t.true(info.limits.maxTransferBlocks > 0);
  }
  t.is(serials.size, expected.length, 'serial numbers are distinct');
  t.throws(() => ctrl.device('Scan0t1'), { instanceOf: RangeError, message: /no block device "Scan0t1" \(known: Scan0t0, / });
});

testWhen(test, 'a rescan keeps surviving devices and finds hot-added LUNs', initiatorRequirements, async (t) => {
  const setup = await startTestTarget({ luns: ['0:0:ram:16M:512', '1:4:ram:16M:4096'], maxTarget: 3 });
  t.teardown(() => setup.cleanup());
  const ctrl: Controller = await connectAndScan(setup);
  t.teardown(() => ctrl.close());
  t.deepEqual(
    ctrl.devices.map((d) => d.name),
    ['VirtioScsi0t0', 'VirtioScsi0t1l4'],
  );
  const before = ctrl.device('VirtioScsi0t1l4');
  const control = await setup.target.control();
  await control.addLun('3:2:ram:8M:512');
  await control.removeLun(0, 0);
  const { problems } = await ctrl.scan();
  t.deepEqual(problems, []);
  t.deepEqual(
    ctrl.devices.map((d) => d.name),
    ['VirtioScsi0t1l4', 'VirtioScsi0t3l2'],
  );
  t.is(ctrl.device('VirtioScsi0t1l4'), before, 'same object after a rescan');
  t.is(ctrl.device('VirtioScsi0t3l2').info.blockCount, (8n << 20n) / 512n);
  // The surviving device still does I/O.
  const buf = Buffer.alloc(4096, 0x5a);
  await before.write(1, buf);
  t.deepEqual(await before.read(1, 1), buf);
});
