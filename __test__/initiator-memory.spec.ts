// The DMA pool end to end, in both of its forms: 2 MiB hugepages and a plain shared memfd, each
// larger than 16 MiB (the seeds' 8-hugepage limit), filled with zero-copy buffers whose data goes
// to the bundled target and back.
import test from 'ava';
import { readFileSync } from 'node:fs';

import { testWhen, type Requirement } from './helpers/env.js';
import { connectAndScan, initiatorRequirements, pattern, startTestTarget } from './helpers/initiator.js';

const POOL = 24 << 20;
const CHUNK = 1 << 20;
/** Leaves room in the pool for rings, headers and event buffers. */
const CHUNKS = 18;

function freeHugepages(): number {
  const m = /HugePages_Free:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'));
  return m ? Number(m[1]) : 0;
}

const requireHugepages: Requirement = () =>
  freeHugepages() >= POOL / (2 << 20)
    ? undefined
    : `fewer than ${POOL / (2 << 20)} free 2 MiB hugepages (run scripts/setup-system.sh as root)`;

for (const mode of ['require', 'never'] as const) {
  const reqs = mode === 'require' ? [...initiatorRequirements, requireHugepages] : initiatorRequirements;
  testWhen(test.serial, `a ${POOL >> 20} MiB pool with hugepages '${mode}' carries data end to end`, reqs, async (t) => {
    const s = await startTestTarget({ luns: ['0:0:ram:64M:4096'] });
    t.teardown(() => s.cleanup());
    const ctrl = await connectAndScan(s, { memoryBytes: POOL, hugepages: mode });
    t.teardown(() => ctrl.close());
    t.is(ctrl.info.hugepages, mode === 'require');
    t.true(ctrl.info.memoryBytes >= POOL);

    const disk = ctrl.device('VirtioScsi0t0');
    const blocks = CHUNK / disk.blockSize;
    // Every buffer lives in the pool at once: most of its 24 MiB is in use.
    const bufs = Array.from({ length: CHUNKS }, (_, i) => {
      const b = disk.allocBuffer(CHUNK);
      pattern(CHUNK, i + 1).copy(b);
      return b;
    });
    await Promise.all(bufs.map((b, i) => disk.write(i * blocks, b)));
    // Read back into the same pool memory, cleared first.
    bufs.forEach((b) => b.fill(0));
    await Promise.all(bufs.map((b, i) => disk.read(i * blocks, b)));
    bufs.forEach((b, i) => t.true(b.equals(pattern(CHUNK, i + 1)), `chunk ${i}`));
  });
}

testWhen(test.serial, 'an exhausted pool is a clear error, not a hang', initiatorRequirements, async (t) => {
  t.timeout(20_000);
  const s = await startTestTarget({ luns: ['0:0:ram:64M:4096'] });
  t.teardown(() => s.cleanup());
  // No room to grow: the limit is the pool's own size.
  const ctrl = await connectAndScan(s, { memoryBytes: 8 << 20, maxMemoryBytes: 8 << 20, hugepages: 'never' });
  t.teardown(() => ctrl.close());
  const disk = ctrl.device('VirtioScsi0t0');
  const held: Buffer[] = [];
  const e = t.throws(() => {
    for (;;) held.push(disk.allocBuffer(CHUNK));
  });
  t.regex(e!.message, /DMA memory exhausted/);
  t.true(held.length >= 4, `${held.length} MiB allocated before exhaustion`);
  // A read that needs pool memory for its data, with nothing in flight to free any.
  await t.throwsAsync(disk.read(0, CHUNK / disk.blockSize), { message: /no DMA memory/ });
  // Memory the caller already holds still works.
  pattern(CHUNK, 7).copy(held[0]!);
  await disk.write(0, held[0]!);
  held[1]!.fill(0);
  await disk.read(0, held[1]!);
  t.true(held[1]!.equals(pattern(CHUNK, 7)));
});

testWhen(test.serial, 'DMA memory grows when it runs dry, and the target uses the new regions', initiatorRequirements, async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:64M:4096'] });
  t.teardown(() => s.cleanup());
  const ctrl = await connectAndScan(s, { memoryBytes: 8 << 20, maxMemoryBytes: 40 << 20, hugepages: 'never' });
  t.teardown(() => ctrl.close());
  t.is(ctrl.info.maxMemoryBytes, 40 << 20);
  const start = ctrl.info.memoryBytes;
  const disk = ctrl.device('VirtioScsi0t0');
  const blocks = CHUNK / disk.blockSize;
  // Three times what the pool started with: most of these buffers live in regions added later,
  // which the target must have mapped for the data to arrive.
  const bufs = Array.from({ length: 24 }, (_, i) => {
    const b = disk.allocBuffer(CHUNK);
    pattern(CHUNK, 100 + i).copy(b);
    return b;
  });
  t.true(ctrl.info.memoryBytes > start, `memory grew from ${start} to ${ctrl.info.memoryBytes} bytes`);
  await Promise.all(bufs.map((b, i) => disk.write(i * blocks, b)));
  bufs.forEach((b) => b.fill(0));
  await Promise.all(bufs.map((b, i) => disk.read(i * blocks, b)));
  bufs.forEach((b, i) => t.true(b.equals(pattern(CHUNK, 100 + i)), `chunk ${i}`));
  // Past the limit: a clear error that names the knob.
  const e = t.throws(() => {
    for (;;) bufs.push(disk.allocBuffer(CHUNK));
  });
  t.regex(e!.message, /maxMemoryBytes/);
  t.true(ctrl.info.memoryBytes <= 40 << 20);
});

testWhen(test.serial, 'DMA memory grows ahead of need in the background once it runs low', initiatorRequirements, async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:64M:4096'] });
  t.teardown(() => s.cleanup());
  // Room for exactly one growth step (64 MiB) beyond the 4 MiB it starts with.
  const ctrl = await connectAndScan(s, { memoryBytes: 4 << 20, maxMemoryBytes: 68 << 20 });
  t.teardown(() => ctrl.close());
  const start = ctrl.info.memoryBytes;
  t.is(start, 4 << 20);
  const disk = ctrl.device('VirtioScsi0t0');
  // Take memory until less than a quarter is free: each allocation returns at once, and the
  // pool has not grown by the time it does (the growth runs off the event loop).
  const held: Buffer[] = [];
  for (let i = 0; i < 3; i++) {
    held.push(disk.allocBuffer(CHUNK));
    t.is(ctrl.info.memoryBytes, start, `allocation ${i} returned before any growth`);
  }
  for (let i = 0; i < 2000 && ctrl.info.memoryBytes === start; i++) await new Promise((r) => setTimeout(r, 5));
  const grown = ctrl.info.memoryBytes;
  t.is(grown, 68 << 20, 'the memory grew by one step in the background');
  // Later allocations find the memory there: no further growth (there is no room for one).
  for (let i = 0; i < 32; i++) held.push(disk.allocBuffer(CHUNK));
  t.is(ctrl.info.memoryBytes, grown);
  // The target maps the new region: data in buffers from it goes there and back.
  const blocks = CHUNK / disk.blockSize;
  const fresh = held.slice(-8);
  fresh.forEach((b, i) => pattern(CHUNK, 200 + i).copy(b));
  await Promise.all(fresh.map((b, i) => disk.write(i * blocks, b)));
  fresh.forEach((b) => b.fill(0));
  await Promise.all(fresh.map((b, i) => disk.read(i * blocks, b)));
  fresh.forEach((b, i) => t.true(b.equals(pattern(CHUNK, 200 + i)), `chunk ${i}`));
});
