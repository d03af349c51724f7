// The main job on the embedded default: start the bundled target, scan it, verify data on every
// disk, and benchmark it with the load generator of `virtio-initiator bench` (4 KiB random reads
// through the Promise API and the batch binding, and a verified random read/write mix). Run with
// `npm run demo` (which builds everything first) or `node --import tsx examples/demo.ts`.
import { randomBytes } from 'node:crypto';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { type Api, type ReadWrite, runWorkload } from '../ts/bench.js';
import { startTarget } from '../ts/bundled-target.js';
import { progressText, report } from '../ts/cli/bench.js';
import { ProgressLine } from '../ts/cli/output.js';
import { Controller, type BlockDevice } from '../ts/index.js';

const BENCH_SECONDS = Number(process.env.DEMO_BENCH_SECONDS ?? 3);

function size(bytes: bigint): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = Number(bytes);
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${v.toFixed(v < 10 && u > 0 ? 1 : 0)} ${units[u]}`;
}

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows.map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd()).join('\n');
}

/** Writes a distinct pattern at the first, a middle and the last blocks, reads it back, compares,
 *  then unmaps it and expects zeros. Returns a one-line account. */
async function verify(disk: BlockDevice): Promise<string> {
  const bs = disk.blockSize;
  const blocks = Number(disk.blockCount);
  const span = Math.min(64, blocks);
  const places = [0, Math.floor(blocks / 2), blocks - span];
  for (const [i, lba] of places.entries()) {
    // Alternate the zero-copy DMA path and the plain-Buffer (bounce) path.
    const data = i % 2 === 0 ? disk.allocBuffer(span * bs) : Buffer.alloc(span * bs);
    randomBytes(data.length).copy(data);
    await disk.write(lba, data);
    const back = await disk.read(lba, span);
    if (!back.equals(data)) throw new Error(`${disk.info.name}: data at LBA ${lba} read back different`);
  }
  let zeros = 'no unmap';
  if (disk.info.unmap) {
    await disk.unmap({ lba: places[1]!, blocks: span });
    const back = await disk.read(places[1]!, span);
    if (back.some((b) => b !== 0)) throw new Error(`${disk.info.name}: unmapped blocks do not read as zeros`);
    zeros = 'unmap reads zeros';
  }
  await disk.flush();
  return `${places.length} x ${span} blocks written and read back, ${zeros}, flushed`;
}

interface BenchCase {
  disk: BlockDevice;
  api: Api;
  rw: ReadWrite;
  depth: number;
  verify: boolean;
}

/** One case of `virtio-initiator bench`, with its progress line on a terminal. */
async function bench(ctrl: Controller, c: BenchCase, seconds: number) {
  const progress = new ProgressLine();
  const last = { phase: undefined, ios: 0, bytes: 0, at: 0 };
  const result = await runWorkload(ctrl, c.disk, {
    api: c.api,
    rw: c.rw,
    ioBytes: 4096,
    queueDepth: c.depth,
    seconds,
    verify: c.verify,
    ...(progress.enabled
      ? { onProgress: (p) => progress.update(`  ${c.disk.info.name} ${c.api} qd ${c.depth}: ${progressText(p, last)}`) }
      : {}),
  });
  progress.clear();
  return report(result, c.disk, ctrl.info.transport, null);
}

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'virtio-initiator-demo-'));
  const image = join(dir, 'disk.img');
  const fh = await open(image, 'w');
  await fh.truncate(64 << 20);
  await fh.close();
  const socket = join(dir, 'vhost-scsi.sock');
  const luns = ['0:0:ram:256M:512', `0:1:file:${image}:4096`, '1:0:null:4G:4096'];
  console.log(`starting the bundled target on ${socket}`);
  for (const l of luns) console.log(`  --lun ${l}`);
  const target = await startTarget({ socket, control: join(dir, 'control.sock'), luns });
  try {
    await using ctrl = await Controller.connect(socket);
    const info = ctrl.info;
    console.log(
      `\nconnected: ${info.transport}, ${info.requestQueues} request queue(s) of ${info.queueSize}, ` +
        `${size(BigInt(info.memoryBytes))} DMA memory${info.hugepages ? ' in hugepages' : ''}`,
    );

    const scan = await ctrl.scan();
    console.log(`\nscan: ${scan.luns.length} LUN(s)`);
    const rows = [['name', 'target', 'lun', 'type', 'vendor', 'product', 'block', 'blocks', 'size', 'serial']];
    for (const l of scan.luns) {
      rows.push([
        l.name,
        String(l.target),
        String(l.lun),
        l.deviceTypeName,
        l.vendor,
        l.product,
        String(l.geometry?.blockSize ?? '-'),
        String(l.geometry?.blockCount ?? '-'),
        l.geometry ? size(BigInt(l.geometry.blockSize) * BigInt(l.geometry.blockCount)) : '-',
        l.serial ?? '-',
      ]);
    }
    console.log(table(rows));
    for (const p of scan.problems) console.log(`  note: ${JSON.stringify(p)}`);

    console.log('\nverify:');
    for (const disk of ctrl.devices) {
      if (disk.info.product.includes('NULL')) continue; // discards writes by design
      console.log(`  ${disk.info.name}: ${await verify(disk)}`);
    }

    const nullDisk = ctrl.devices.find((d) => d.info.product.includes('NULL'));
    const ramDisk = ctrl.devices.find((d) => d.info.product.includes('RAM'));
    console.log(`\nbenchmark (virtio-initiator bench): 4 KiB requests, ${BENCH_SECONDS} s each`);
    const cases: BenchCase[] = [];
    if (nullDisk) {
      for (const depth of [1, 32]) cases.push({ disk: nullDisk, api: 'promise', rw: 'randread', depth, verify: false });
      cases.push({ disk: nullDisk, api: 'batch', rw: 'randread', depth: 32, verify: false });
    }
    if (ramDisk) cases.push({ disk: ramDisk, api: 'promise', rw: 'randrw', depth: 32, verify: true });
    const results = [];
    for (const c of cases) results.push(await bench(ctrl, c, BENCH_SECONDS));
    console.log(
      table([
        ['device', 'api', 'rw', 'qd', 'IOPS', 'MB/s', 'mean us', 'p50 us', 'p99 us', 'p99.9 us', 'errors', 'mismatches'],
        ...results.map((r) => [
          r.device,
          r.api,
          r.rw,
          String(r.qd),
          String(r.iops),
          String(r.mbPerSecond),
          String(r.latencyUs.mean),
          String(r.latencyUs.p50),
          String(r.latencyUs.p99),
          String(r.latencyUs.p999),
          String(r.errors),
          r.verify ? String(r.mismatches) : '-',
        ]),
      ]),
    );
    console.log(JSON.stringify({ benchmark: results }));
    const bad = results.filter((r) => r.errors > 0 || r.mismatches > 0);
    if (bad.length > 0) throw new Error(`${bad.length} benchmark case(s) had errors or data mismatches`);
  } finally {
    await target.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(`demo failed: ${e instanceof Error ? e.message : String(e)}`);
  process.exitCode = 1;
});
