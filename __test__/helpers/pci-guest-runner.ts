// Runs inside the QEMU guest (through scripts/guest/pci-check.sh): opens a virtio-scsi PCI
// function through VFIO with the native binding, runs the shared initiator bodies on it, and
// checks the bad-input errors and the driver binding; then opens a virtio-blk function through
// the facade and runs the virtio-blk bodies on its disk. Everything it finds is printed as marker
// lines (`@@NAME subject key=value ...`) that __test__/pci-initiator.spec.ts asserts on; failed
// assertions follow their marker as lines starting with "!! ".
//
// usage: node --import tsx pci-guest-runner.ts BASE64(JSON RunnerSpec)

import { spawnSync } from 'node:child_process';
import { closeSync, openSync, readdirSync, readFileSync, readSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { isDeepStrictEqual, inspect } from 'node:util';

import { loadNative, type Native, type NativeController, type NativeControllerOptions } from '../../ts/native.js';
import { BLK_BODIES, BODIES, RawChannel, lunId, pattern, refuses, type BlkDiskSpec, type Check, type LunSpec } from './initiator-bodies.js';
import { Controller, ConnectError, type ControllerOptions } from '../../ts/index.js';
import { Direction } from '../../ts/records.js';
import { read10, write10 } from '../../ts/scsi/index.js';

export interface RunnerSpec {
  /** The function to test; default the first of $VFIO_BDFS. */
  address?: string;
  /** How the device reaches memory: through the IOMMU, or by physical address. */
  expectDma: 'iommu' | 'physical';
  luns: LunSpec[];
  options: NativeControllerOptions;
  /** Run the bad-input and binding checks (they need the transitional devices of the spec). */
  badInput: boolean;
  /** LUN of the first transitional device (behind a PCI bridge) for the binding checks. */
  transitionalLun?: LunSpec;
  /** Scatter the pages of the DMA pool in physical memory (VIRTIO_INITIATOR_SCATTER_PAGES,
   * plain memory only); the POOL marker passes when at most `maxAdjacentShare` of its
   * consecutive pages are physically adjacent. Without it, the marker only informs. */
  scatterPool?: { maxAdjacentShare: number };
  /** A virtio-blk function, also on vfio-pci, driven through the facade after the virtio-scsi one
   * is closed (same options, same way of reaching memory). */
  blk?: {
    /** Its vendor:device id (1af4:1042 modern, 1af4:1001 transitional). */
    id: string;
    disk: BlkDiskSpec;
    /** Check that each function, told the other's type, is refused. */
    typeMismatch: boolean;
  };
}

/** vendor:device ids of the functions openPci takes. */
const STORAGE_IDS = ['1af4:1001', '1af4:1004', '1af4:1042', '1af4:1048'];

/** The core's testing knob that scatters the pages of plain-memory DMA pools (see
 * crates/virtio-initiator-core/src/memory/pool.rs). */
const SCATTER_PAGES_ENV = 'VIRTIO_INITIATOR_SCATTER_PAGES';

const nativePath = fileURLToPath(new URL('../../native/index.cjs', import.meta.url));

const out = (line: string): void => {
  process.stdout.write(`${line}\n`);
};
const fmt = (v: unknown): string => inspect(v, { depth: 4, breakLength: Infinity });

/** Check that records failures instead of throwing, so one body reports all of them; its
 * log lines follow the body's marker. */
class Recorder implements Check {
  readonly failures: string[] = [];
  readonly logs: string[] = [];
  passed = 0;

  private record(ok: boolean, text: () => string): boolean {
    if (ok) this.passed++;
    else this.failures.push(text());
    return ok;
  }

  is(actual: unknown, expected: unknown, message = 'is'): boolean {
    return this.record(Object.is(actual, expected), () => `${message}: expected ${fmt(expected)}, got ${fmt(actual)}`);
  }

  true(actual: boolean, message = 'true'): boolean {
    return this.record(actual === true, () => message);
  }

  deepEqual(actual: unknown, expected: unknown, message = 'deepEqual'): boolean {
    return this.record(isDeepStrictEqual(actual, expected), () => `${message}: expected ${fmt(expected)}, got ${fmt(actual)}`);
  }

  log(...values: unknown[]): void {
    this.logs.push(values.map((v) => (typeof v === 'string' ? v : fmt(v))).join(' '));
  }
}

function report(kind: 'BODY' | 'CHECK', name: string, r: Recorder, ms: number): boolean {
  const ok = r.failures.length === 0;
  out(`@@${kind} ${name} status=${ok ? 'pass' : 'fail'} assertions=${r.passed + r.failures.length} ms=${ms}`);
  for (const f of r.failures) out(`!! ${f.replace(/\n/g, ' ')}`);
  for (const l of r.logs) out(`   ${l.replace(/\n/g, ' ')}`);
  return ok;
}

/** Runs one body or check of the guest and reports it as a BODY or CHECK marker (a body's
 * start is announced too); true when it passed. */
async function runReported(kind: 'BODY' | 'CHECK', name: string, check: (t: Recorder) => Promise<void>): Promise<boolean> {
  const r = new Recorder();
  const start = Date.now();
  if (kind === 'BODY') out(`@@BODY_START ${name}`);
  try {
    await check(r);
  } catch (e) {
    r.failures.push(`threw: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
  }
  return report(kind, name, r, Date.now() - start);
}

function message(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** Opens a PCI function through the addon (off the event loop); its failure as an Error. */
async function openPci(native: Native, address: string, options?: NativeControllerOptions): Promise<NativeController> {
  const opened = await native.Controller.openPci(address, options);
  if (!(opened instanceof native.Controller)) throw new Error(opened.message);
  return opened;
}

/** Where the DMA pool's pages are in physical memory, from /proc/self/maps (its memfd
 * mappings) and /proc/self/pagemap (frame numbers, shown to root only). */
interface PoolLayout {
  mappings: number;
  pages: number;
  /** Consecutive pages inside one mapping, and those of them that are physically adjacent. */
  pairs: number;
  adjacent: number;
  /** Pages without a frame number (not present, or hidden). */
  unresolved: number;
}

function poolLayout(): PoolLayout {
  const PAGE = 4096;
  const layout: PoolLayout = { mappings: 0, pages: 0, pairs: 0, adjacent: 0, unresolved: 0 };
  const maps = readFileSync('/proc/self/maps', 'utf8').split('\n').filter((l) => l.includes('/memfd:virtio-initiator-dma'));
  const fd = openSync('/proc/self/pagemap', 'r');
  try {
    for (const line of maps) {
      const [start, end] = line.split(' ')[0]!.split('-').map((h) => parseInt(h, 16)) as [number, number];
      const pages = (end - start) / PAGE;
      const entries = Buffer.alloc(pages * 8);
      const got = readSync(fd, entries, 0, entries.length, (start / PAGE) * 8);
      if (got !== entries.length) throw new Error(`pagemap: ${got} of ${entries.length} bytes at ${start.toString(16)}`);
      layout.mappings++;
      layout.pages += pages;
      let prev = -1n;
      for (let i = 0; i < pages; i++) {
        const e = entries.readBigUInt64LE(i * 8);
        const pfn = e >> 63n === 1n ? e & ((1n << 55n) - 1n) : 0n;
        if (pfn === 0n) layout.unresolved++;
        if (i > 0) {
          layout.pairs++;
          if (pfn !== 0n && prev !== 0n && pfn === prev + 1n) layout.adjacent++;
        }
        prev = pfn;
      }
    }
  } finally {
    closeSync(fd);
  }
  return layout;
}

/** Prints the POOL marker `name` for the pool of the open controller. Asked to be scattered,
 * it passes when the pages cover the pool's size, every one has a frame number, and at most
 * `maxAdjacentShare` of the consecutive ones are physically adjacent: otherwise the bodies
 * would not test what they are meant to. Otherwise it only informs. */
function reportPool(name: string, spec: RunnerSpec): boolean {
  const scatter = spec.scatterPool;
  try {
    const p = poolLayout();
    const share = p.pairs > 0 ? p.adjacent / p.pairs : 1;
    const scattered = p.pages * 4096 >= (spec.options.memoryBytes ?? 0) && p.unresolved === 0 && share <= (scatter?.maxAdjacentShare ?? 0);
    const status = scatter ? (scattered ? 'pass' : 'fail') : 'info';
    out(
      `@@POOL ${name} mappings=${p.mappings} pages=${p.pages} pairs=${p.pairs} adjacent=${p.adjacent} ` +
        `adjacent_share=${share.toFixed(3)} unresolved=${p.unresolved} scatter=${scatter ? 1 : 0} status=${status}`,
    );
    if (status === 'fail') {
      out(`!! pool not scattered: ${p.adjacent} of ${p.pairs} consecutive pages physically adjacent, ${p.unresolved} of ${p.pages} unresolved`);
    }
    return status !== 'fail';
  } catch (e) {
    out(`@@POOL ${name} status=${scatter ? 'fail' : 'info'}`);
    out(`!! ${message(e)}`);
    return !scatter;
  }
}

/** PCI functions from sysfs: address and vendor:device. */
function pciFunctions(): Array<{ address: string; id: string }> {
  const dir = '/sys/bus/pci/devices';
  return readdirSync(dir)
    .sort()
    .map((address) => {
      const rd = (f: string) => readFileSync(`${dir}/${address}/${f}`, 'utf8').trim().replace(/^0x/, '');
      return { address, id: `${rd('vendor')}:${rd('device')}` };
    });
}

async function smallIo(t: Check, controller: NativeController, l: LunSpec, seed: number): Promise<void> {
  const ch = new RawChannel(controller);
  try {
    const data = pattern(seed, l.blockSize * 4);
    const w = await ch.exec({ target: l.target, lun: l.lun, cdb: write10({ lba: 8, blocks: 4 }), dir: Direction.OUT, buffer: data });
    t.deepEqual([w.response, w.status], [0, 0], `WRITE to ${lunId(l)}`);
    const back = Buffer.alloc(data.length);
    const r = await ch.exec({ target: l.target, lun: l.lun, cdb: read10({ lba: 8, blocks: 4 }), dir: Direction.IN, buffer: back });
    t.deepEqual([r.response, r.status], [0, 0], `READ from ${lunId(l)}`);
    t.true(back.equals(data), `data of ${lunId(l)} reads back`);
  } finally {
    ch.close();
  }
}

/** Bad input, binding through driver_override, a non-viable IOMMU group, and a transitional
 * device driven through its modern interface (physical addresses: no ACCESS_PLATFORM). */
async function bindingChecks(native: Native, main: string, open: NativeController, spec: RunnerSpec): Promise<boolean> {
  let ok = true;
  const check = async (name: string, f: (t: Recorder) => void | Promise<void>) => {
    const r = new Recorder();
    const t0 = Date.now();
    try {
      await f(r);
    } catch (e) {
      r.failures.push(`threw: ${message(e)}`);
    }
    ok = report('CHECK', name, r, Date.now() - t0) && ok;
  };
  const all = pciFunctions();
  const transitional = all.filter((f) => f.id === '1af4:1004').map((f) => f.address);
  const otherVirtio = all.find((f) => f.id.startsWith('1af4:') && !STORAGE_IDS.includes(f.id));
  const nonVirtio = all.find((f) => !f.id.startsWith('1af4:'));

  await check('bad-addresses', async (t) => {
    await refuses(t, 'malformed address', () => openPci(native, 'not-a-bdf'), /'not-a-bdf' is not a PCI address/);
    await refuses(t, 'nonexistent address', () => openPci(native, '0000:3f:1f.7'), /no PCI device at 0000:3f:1f\.7/);
    t.true(nonVirtio !== undefined, 'a non-virtio function exists');
    if (nonVirtio) {
      await refuses(t, `non-virtio ${nonVirtio.id}`, () => openPci(native, nonVirtio.address), /is not a virtio device/);
      await refuses(t, `binding non-virtio ${nonVirtio.id}`, () => native.bindVfioPci(nonVirtio.address), /is not a virtio device/);
    }
    t.true(otherVirtio !== undefined, 'a virtio function of another type exists');
    if (otherVirtio) {
      await refuses(t, `virtio ${otherVirtio.id}`, () => openPci(native, otherVirtio.address), /is a virtio device but neither virtio-scsi \(.*\) nor virtio-blk/);
    }
    await refuses(t, 'the open function again', () => openPci(native, main), /is in use/);
    // vfio-pci's unbind would wait for this very process to let the device go: refused.
    await refuses(t, 'unbinding the open function', () => native.unbindVfioPci(main), /is in use/);
    // Without root the group node cannot be opened.
    const asNobody = spawnSync(
      process.execPath,
      [
        '-e',
        `require(${JSON.stringify(nativePath)}).Controller.openPci(${JSON.stringify(main)})` +
          `.then((r) => console.log(r.message ?? 'opened'), (e) => console.log(e.message))`,
      ],
      { uid: 65534, gid: 65534, encoding: 'utf8', timeout: 30_000 },
    );
    const said = `${asNobody.stdout ?? ''}${asNobody.stderr ?? ''}`.trim();
    t.true(/permission denied on \/dev\/vfio\/\d+/.test(said), `opening as nobody: ${said}`);
    t.log(`opening as nobody: ${said}`);
    t.true(open.failure === null, 'the open controller is not disturbed');
  });

  await check('binding', async (t) => {
    t.is(transitional.length, 2, `two transitional virtio-scsi functions behind the bridge: ${transitional.join(' ')}`);
    const [a, b] = transitional;
    if (!a || !b || !spec.transitionalLun) return;
    const listed = native.listPciDevices();
    t.deepEqual(
      listed.filter((d) => transitional.includes(d.address)).map((d) => [d.driver, d.interface]),
      [['virtio-pci', 'transitional'], ['virtio-pci', 'transitional']],
      'transitional functions listed with their driver',
    );
    await refuses(t, 'function on virtio-pci', () => openPci(native, a), /bound to virtio-pci, not to vfio-pci/);
    const bound = native.bindVfioPci(a);
    t.is(bound.driver, 'vfio-pci', `${a} moved to vfio-pci`);
    // Its bridge mate still belongs to virtio-pci: VFIO cannot use the group.
    await refuses(t, 'half-bound IOMMU group', () => openPci(native, a), new RegExp(`IOMMU group \\d+ of ${a.replace(/\./g, '\\.')} also holds ${b.replace(/\./g, '\\.')} \\(virtio-pci\\)`));
    t.is(native.bindVfioPci(b).driver, 'vfio-pci', `${b} moved to vfio-pci`);
    await refuses(
      t,
      'physical addresses without hugepages',
      () => openPci(native, a, { hugepages: 'never', memoryBytes: 4 << 20 }),
      /takes physical addresses/,
    );
    const c = await openPci(native, a, { memoryBytes: 8 << 20, queueSize: 64 });
    try {
      t.true(c.info.transport.includes('physical addresses'), `transitional device: ${c.info.transport}`);
      await smallIo(t, c, spec.transitionalLun, 4242);
    } finally {
      await c.close();
    }
    for (const x of [a, b]) t.is(native.unbindVfioPci(x).driver, 'virtio-pci', `${x} given back to virtio-pci`);
  });
  return ok;
}

/**
 * Recovery's last step, and what a function reporting DEVICE_NEEDS_RESET gets: the device is
 * reset and set up again in place. A channel of before fails; a new one reads the preset data.
 */
async function resetCheck(t: Check, controller: NativeController, spec: RunnerSpec): Promise<void> {
  const l = spec.luns.find((x) => x.preset !== undefined);
  if (!l?.preset) throw new Error('no LUN with preset data');
  const { offset, bytes, seed } = l.preset;
  const read = () => read10({ lba: offset / l.blockSize, blocks: Math.min(bytes, 16 * 1024) / l.blockSize });
  const into = () => Buffer.alloc(Math.min(bytes, 16 * 1024));
  const expected = pattern(seed, bytes).subarray(0, Math.min(bytes, 16 * 1024));
  const before = new RawChannel(controller);
  const first = into();
  const r0 = await before.exec({ target: l.target, lun: l.lun, cdb: read(), dir: Direction.IN, buffer: first });
  t.deepEqual([r0.response, r0.status, first.equals(expected)], [0, 0, true], `preset data of ${lunId(l)} before the reset`);

  const failure = await controller.resetPci('reset check');
  t.is(failure?.message ?? null, null, 'reset and set up again');
  t.is(controller.failure, null, 'the controller works after the reset');
  let stale = '';
  try {
    await before.exec({ target: l.target, lun: l.lun, cdb: read(), dir: Direction.IN, buffer: into() });
  } catch (e) {
    stale = message(e);
  }
  t.true(/reconnected/.test(stale), `a channel of before fails: ${stale}`);
  before.close();

  const after = new RawChannel(controller);
  try {
    const back = into();
    const r = await after.exec({ target: l.target, lun: l.lun, cdb: read(), dir: Direction.IN, buffer: back });
    t.deepEqual([r.response, r.status], [0, 0], `READ from ${lunId(l)} after the reset`);
    t.true(back.equals(expected), `preset data of ${lunId(l)} after the reset`);
  } finally {
    after.close();
  }
}

/** The TypeScript facade over the same function: scan, then block I/O on each disk. */
async function facadeCheck(t: Check, address: string, spec: RunnerSpec): Promise<void> {
  const c = await Controller.openPci(address, facadeOptions(spec, 'Pci0'));
  try {
    const result = await c.scan();
    t.deepEqual(result.problems, [], 'scan problems');
    const found = c.devices.map((d) => ({ name: d.info.name, blockSize: d.blockSize, blocks: Number(d.blockCount) }));
    const expected = spec.luns.map((l) => ({
      name: l.lun === 0 ? `Pci0t${l.target}` : `Pci0t${l.target}l${l.lun}`,
      blockSize: l.blockSize,
      blocks: l.blocks,
    }));
    t.deepEqual(found, expected, 'block devices found by the facade');
    for (const [i, d] of c.devices.entries()) {
      const data = pattern(3000 + i, 16 * d.blockSize);
      const lba = BigInt(10 * 1024 * 1024) / BigInt(d.blockSize);
      await d.write(lba, data);
      await d.flush();
      const back = await d.read(lba, 16);
      t.true(Buffer.from(back).equals(data), `${d.info.name}: facade write and read back`);
    }
  } finally {
    await c.close();
  }
}

/** The facade's options of the spec. */
function facadeOptions(spec: RunnerSpec, name?: string): ControllerOptions {
  const opts: ControllerOptions = name === undefined ? {} : { name };
  if (spec.options.memoryBytes != null) opts.memoryBytes = spec.options.memoryBytes;
  if (spec.options.hugepages != null) opts.hugepages = spec.options.hugepages as ControllerOptions['hugepages'];
  return opts;
}

/**
 * The virtio-blk function of the spec: listed as such and on vfio-pci; each function told the
 * other's type is refused by name (blk-type-mismatch); opened without a type it is found to be
 * virtio-blk and reaches memory as the spec expects; scanned, it has one disk (blk-open). Then
 * every virtio-blk body runs on that disk.
 */
async function blkRun(native: Native, scsiAddress: string, spec: RunnerSpec): Promise<boolean> {
  const blk = spec.blk!;
  const onVfio = (process.env.VFIO_BDFS ?? '').split(' ');
  const address = pciFunctions().find((f) => f.id === blk.id && onVfio.includes(f.address))?.address;
  let ok = true;
  if (blk.typeMismatch) {
    ok = (await runReported('CHECK', 'blk-type-mismatch', async (t) => {
      if (!address) throw new Error(`no ${blk.id} function on vfio-pci`);
      await refuses(t, 'virtio-blk opened as virtio-scsi', () => Controller.openPci(address, { ...facadeOptions(spec), type: 'scsi' }), /is a virtio-blk device, not virtio-scsi/, ConnectError);
      await refuses(t, 'virtio-scsi opened as virtio-blk', () => Controller.openPci(scsiAddress, { ...facadeOptions(spec), type: 'blk' }), /is a virtio-scsi device, not virtio-blk/, ConnectError);
    })) && ok;
  }
  const opened: { controller?: Controller } = {};
  ok = (await runReported('CHECK', 'blk-open', async (t) => {
    if (!address) throw new Error(`no ${blk.id} function on vfio-pci (VFIO_BDFS: ${process.env.VFIO_BDFS ?? ''})`);
    const listed = native.listPciDevices().find((d) => d.address === address);
    t.deepEqual([listed?.deviceType, listed?.driver], ['blk', 'vfio-pci'], `${address} listed as virtio-blk on vfio-pci`);
    const t0 = Date.now();
    const controller = (opened.controller = await Controller.openPci(address, facadeOptions(spec)));
    t.log(`opened in ${Date.now() - t0} ms: ${controller.info.transport}; ${controller.info.requestQueues} queues of ${controller.info.queueSize}`);
    t.is(controller.name, 'VirtioBlk0', 'the default name of a virtio-blk controller');
    t.is(controller.info.deviceType, 'blk', 'the type told by the PCI id');
    const dma = spec.expectDma === 'iommu' ? 'through the IOMMU' : 'physical addresses';
    t.true(controller.info.transport.includes(dma), `the device reaches memory ${dma}: ${controller.info.transport}`);
    t.deepEqual(await controller.scan(), { luns: [], problems: [] }, 'scan result');
    t.is(controller.devices.length, 1, 'one disk');
  })) && ok;
  const controller = opened.controller;
  if (!controller) return false;
  try {
    const ctx = { controller, disk: blk.disk };
    for (const [name, body] of BLK_BODIES) ok = (await runReported('BODY', name, (r) => body(r, ctx))) && ok;
    if (controller.failure !== null) {
      out(`!! virtio-blk controller failed: ${controller.failure}`);
      ok = false;
    }
  } finally {
    await controller.close();
  }
  return ok;
}

async function main(): Promise<number> {
  const spec = JSON.parse(Buffer.from(process.argv[2] ?? '', 'base64').toString('utf8')) as RunnerSpec;
  // Read by the core whenever it makes a DMA pool: it must be set before the first one.
  if (spec.scatterPool) process.env[SCATTER_PAGES_ENV] = '1';
  const native = loadNative();
  const address = spec.address ?? (process.env.VFIO_BDFS ?? '').split(' ')[0] ?? '';
  for (const d of native.listPciDevices()) {
    out(`@@PCI ${d.address} type=${d.deviceType} driver=${d.driver ?? 'none'} group=${d.iommuGroup ?? 'none'} interface=${d.interface}`);
  }
  const t0 = Date.now();
  let controller: NativeController;
  try {
    controller = await openPci(native, address, spec.options);
  } catch (e) {
    out(`@@OPEN ${address} status=fail`);
    out(`!! ${message(e)}`);
    return 1;
  }
  const info = controller.info;
  out(
    `@@OPEN ${address} status=pass ms=${Date.now() - t0} queues=${info.requestQueues} queue_size=${info.queueSize} ` +
      `hugepages=${info.hugepages} memory=${info.memoryBytes}`,
  );
  out(`@@TRANSPORT ${info.transport}`);
  let ok = true;
  const dmaOk = info.transport.includes(spec.expectDma === 'iommu' ? 'through the IOMMU' : 'physical addresses');
  out(`@@DMA ${spec.expectDma} status=${dmaOk ? 'pass' : 'fail'}`);
  ok &&= dmaOk;
  // The pool the bodies use, as it lies in physical memory, before and after them (it may
  // have grown meanwhile).
  ok = reportPool('layout', spec) && ok;
  for (const [name, body] of BODIES) ok = (await runReported('BODY', name, (r) => body(r, { controller, luns: spec.luns }))) && ok;
  ok = reportPool('after-bodies', spec) && ok;
  ok = (await runReported('CHECK', 'device-reset', (r) => resetCheck(r, controller, spec))) && ok;
  if (spec.badInput) ok = (await bindingChecks(native, address, controller, spec)) && ok;
  const failure = controller.failure;
  if (failure !== null) {
    out(`!! controller failed: ${failure}`);
    ok = false;
  }
  await controller.close();
  // Closing let the device go: the facade can open it again at once.
  ok = (await runReported('CHECK', 'facade', (r) => facadeCheck(r, address, spec))) && ok;
  if (spec.blk) ok = (await blkRun(native, address, spec)) && ok;
  out(`@@RESULT ${ok ? 'PASS' : 'FAIL'}`);
  return ok ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (e: unknown) => {
    out(`!! runner crashed: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
    out('@@RESULT FAIL');
    process.exit(1);
  },
);
