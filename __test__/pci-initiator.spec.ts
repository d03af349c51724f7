// PCI mode end to end: inside a QEMU guest (TCG, emulated Intel IOMMU) a virtio-scsi PCI
// function is handed to vfio-pci and driven from userspace by the addon, running the same
// initiator bodies (__test__/helpers/initiator-bodies.ts) that run here on the host over
// vhost-user; then a virtio-blk function of the same guest, on vfio-pci too, is opened through
// the facade and runs the virtio-blk bodies (BLK_BODIES), which also run here on the host over
// vhost-user-blk. Two guests:
//
//  - "pci/iommu": QEMU's own virtio-scsi-pci (iommu_platform=on, modern only) with scsi-hd
//    LUNs of 512- and 4096-byte blocks on image files; the device reaches the DMA pool
//    through the IOMMU. The pool is plain memory whose pages are scattered in physical memory
//    on purpose (the core's VIRTIO_INITIATOR_SCATTER_PAGES), and the guest proves it from
//    /proc/self/pagemap: pages adjacent in IOVA space are not adjacent behind the IOMMU, so
//    anything the device must see in one piece but that crosses a page (a request header, a
//    response) fails every time, not only in a guest whose free memory happens to be
//    fragmented. This guest also checks bad input, driver binding through driver_override, a
//    non-viable IOMMU group, and a transitional function (1af4:1004) behind a PCI bridge driven
//    through its modern interface with physical addresses. Its virtio-blk function is QEMU's
//    virtio-blk-pci (iommu_platform=on, modern only) with 4096-byte blocks and a serial
//    number; opening each function as the other's type is refused.
//  - "pci/physical": vhost-user-scsi-pci served by the bundled target on the host; no
//    ACCESS_PLATFORM, so descriptors carry guest-physical addresses of pinned hugepages. Its
//    virtio-blk function is a transitional vhost-user-blk-pci (1af4:1001) served by a second
//    bundled target (--type blk) with 512-byte blocks.
//
// After each guest the host checks the image files for the bytes the guest wrote. The guests
// run once each; every body is its own test, asserted from the guest's marker lines.
import test, { type ExecutionContext } from 'ava';
import { mkdtempSync, openSync, readSync, closeSync, rmSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { Controller } from '../ts/index.js';
import { loadNative, nativeUnavailableReason } from '../ts/native.js';
import { repoRoot, requireCommands, requireGuestKernel, requireRoot, requireTargetBinary, testWhen, type Requirement } from './helpers/env.js';
import { markers, runGuest, type GuestResult } from './helpers/guest.js';
import {
  BLK_BODIES,
  BODIES,
  blkDisk,
  blkImageAfterBodies,
  lunId,
  pattern,
  regionsFor,
  type BlkDiskSpec,
  type LunSpec,
  type PatternRegion,
} from './helpers/initiator-bodies.js';
import type { RunnerSpec } from './helpers/pci-guest-runner.js';
import { startTarget, type TargetProcess } from './helpers/target.js';

const MiB = 1024 * 1024;
/** Most of the scattered pool's consecutive pages that may be physically adjacent. */
const MAX_ADJACENT_SHARE = 0.1;

const requireAddon: Requirement = () => {
  const why = nativeUnavailableReason();
  return why === undefined ? undefined : `${why} (npm run build:napi)`;
};

const guestRequirements = [requireRoot, requireCommands('qemu-system-x86_64'), requireGuestKernel, requireAddon];

/** Two LUNs on target 0: 64 MiB of 512-byte blocks and 32 MiB of 4096-byte blocks. */
function lunSpecs(): LunSpec[] {
  return [
    { target: 0, lun: 0, blockSize: 512, blocks: (64 * MiB) / 512, ...regionsFor(0, 0) },
    { target: 0, lun: 1, blockSize: 4096, blocks: (32 * MiB) / 4096, ...regionsFor(0, 1) },
  ];
}

/** The serial number of QEMU's virtio-blk-pci: all 20 bytes of a virtio-blk ID, no NUL. */
const QEMU_BLK_SERIAL = 'PCI-BLK-IOMMU-012345';

/** A sparse image with the LUN's (or disk's) preset bytes in place. */
function makeImage(path: string, l: { blockSize: number; blocks: number; preset?: PatternRegion }): void {
  writeFileSync(path, '');
  truncateSync(path, l.blocks * l.blockSize);
  if (l.preset) {
    const fd = openSync(path, 'r+');
    try {
      writeSync(fd, pattern(l.preset.seed, l.preset.bytes), 0, l.preset.bytes, l.preset.offset);
    } finally {
      closeSync(fd);
    }
  }
}

function readImage(path: string, offset: number, bytes: number): Buffer {
  const buf = Buffer.alloc(bytes);
  const fd = openSync(path, 'r');
  try {
    readSync(fd, buf, 0, bytes, offset);
  } finally {
    closeSync(fd);
  }
  return buf;
}

/** A disk on a file of the bundled target (--type blk): the image made, and the serial number
 * GET ID reports for it (the target names a file disk after the file's inode). */
function targetBlkDisk(image: string, blockSize: number, bytes: number): BlkDiskSpec {
  const layout = blkDisk({ blockSize, blocks: bytes / blockSize, serial: '', discard: true });
  makeImage(image, layout);
  return { ...layout, serial: `VIRTINIT-${statSync(image, { bigint: true }).ino.toString(16)}`.slice(0, 20) };
}

/** Compares the image's bytes with what must be there. */
function checkImage(t: ExecutionContext, image: string, expected: Array<{ offset: number; bytes: Buffer; what: string }>, label: string): void {
  for (const e of expected) t.true(readImage(image, e.offset, e.bytes.length).equals(e.bytes), `${label}: ${e.what}`);
}

interface Run {
  result: GuestResult;
  images: Map<string, string>;
  luns: LunSpec[];
  blk: { image: string; disk: BlkDiskSpec };
  backendLog: string;
}

function guestCommand(spec: RunnerSpec): string {
  const b64 = Buffer.from(JSON.stringify(spec)).toString('base64');
  return `bash ${join(repoRoot, 'scripts', 'guest', 'pci-check.sh')} ${b64}`;
}

function dir(prefix: string): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  process.on('exit', () => rmSync(d, { recursive: true, force: true }));
  return d;
}

/** QEMU's emulated virtio-scsi-pci behind the IOMMU, plus two transitional functions behind a
 * PCI bridge (one IOMMU group) for the binding checks. */
async function iommuRun(): Promise<Run> {
  const d = dir('pci-iommu-');
  const luns = lunSpecs();
  const images = new Map<string, string>();
  const qemu = ['-device', 'virtio-scsi-pci,id=s0,disable-legacy=on,iommu_platform=on'];
  for (const l of luns) {
    const img = join(d, `lun-${l.target}-${l.lun}.img`);
    makeImage(img, l);
    images.set(lunId(l), img);
    const id = `d${l.target}_${l.lun}`;
    qemu.push(
      '-drive',
      `if=none,id=${id},file=${img},format=raw,discard=unmap,cache=directsync`,
      '-device',
      `scsi-hd,bus=s0.0,scsi-id=${l.target},lun=${l.lun},drive=${id},logical_block_size=${l.blockSize},physical_block_size=${l.blockSize}`,
    );
  }
  const transitionalLun: LunSpec = { target: 0, lun: 0, blockSize: 512, blocks: (16 * MiB) / 512 };
  const small = join(d, 'transitional.img');
  makeImage(small, transitionalLun);
  qemu.push(
    '-device', 'pcie-pci-bridge,id=br0',
    '-device', 'virtio-scsi-pci,id=t1,bus=br0,addr=1',
    '-drive', `if=none,id=dt,file=${small},format=raw`,
    '-device', 'scsi-hd,bus=t1.0,scsi-id=0,lun=0,drive=dt',
    '-device', 'virtio-scsi-pci,id=t2,bus=br0,addr=2',
  );
  const blkImage = join(d, 'blk.img');
  const disk = blkDisk({ blockSize: 4096, blocks: (32 * MiB) / 4096, serial: QEMU_BLK_SERIAL, discard: true });
  makeImage(blkImage, disk);
  qemu.push(
    '-drive', `if=none,id=b0,file=${blkImage},format=raw,discard=unmap,cache=directsync`,
    '-device', `virtio-blk-pci,drive=b0,disable-legacy=on,iommu_platform=on,serial=${disk.serial},logical_block_size=4096,physical_block_size=4096`,
  );
  const spec: RunnerSpec = {
    expectDma: 'iommu',
    luns,
    // No hugepages: the IOMMU maps ordinary shared memory just as well, and its pages are
    // scattered so that IOVA-adjacent pages are never physically adjacent.
    options: { memoryBytes: 32 * MiB, hugepages: 'never' },
    badInput: true,
    transitionalLun,
    scatterPool: { maxAdjacentShare: MAX_ADJACENT_SHARE },
    // The split transfer goes down at the default cap of a pool of ordinary pages (2 MiB): QEMU
    // maps a descriptor through the IOMMU page by page and takes at most 1024 pieces per request.
    blk: { id: '1af4:1042', disk, typeMismatch: true },
  };
  const result = await runGuest({
    command: guestCommand(spec),
    qemuArgs: qemu,
    // Modern functions only: the transitional ones stay on virtio-pci for the binding checks.
    env: { GUEST_VFIO_BIND: '1af4:1048 1af4:1042', GUEST_HUGEPAGES: '8', GUEST_TIMEOUT: '600' },
  }).done;
  return { result, images, luns, blk: { image: blkImage, disk }, backendLog: '' };
}

/** vhost-user-scsi-pci and vhost-user-blk-pci served by the bundled target: physical addresses. */
async function physicalRun(): Promise<Run> {
  const d = dir('pci-physical-');
  const luns = lunSpecs();
  const images = new Map<string, string>();
  for (const l of luns) {
    const img = join(d, `lun-${l.target}-${l.lun}.img`);
    makeImage(img, l);
    images.set(lunId(l), img);
  }
  const socket = join(d, 'vhost.sock');
  const blkImage = join(d, 'blk.img');
  const disk = targetBlkDisk(blkImage, 512, 64 * MiB);
  const blkSocket = join(d, 'vhost-blk.sock');
  const targets: TargetProcess[] = [];
  try {
    targets.push(
      await startTarget({
        socket,
        luns: luns.map((l) => `${l.target}:${l.lun}:file:${images.get(lunId(l))}:${l.blockSize}`),
        queues: 2,
      }),
    );
    targets.push(await startTarget({ socket: blkSocket, luns: [`0:0:file:${blkImage}:${disk.blockSize}`], queues: 2, type: 'blk' }));
    const spec: RunnerSpec = {
      expectDma: 'physical',
      luns,
      options: { memoryBytes: 32 * MiB },
      badInput: false,
      blk: { id: '1af4:1001', disk, typeMismatch: false },
    };
    const guest = runGuest({
      command: guestCommand(spec),
      qemuArgs: [
        '-chardev', `socket,id=vus,path=${socket}`,
        '-device', 'vhost-user-scsi-pci,chardev=vus,num_queues=2,disable-legacy=on',
        // Transitional (1af4:1001): driven through its modern interface.
        '-chardev', `socket,id=vub,path=${blkSocket}`,
        '-device', 'vhost-user-blk-pci,chardev=vub,num-queues=2',
      ],
      // Three pools of 32 MiB one after the other: a closed controller's hugepages stay taken
      // until the garbage collector frees the DMA buffers the bodies held.
      env: { GUEST_VFIO_BIND: '1af4:1048 1af4:1001', GUEST_HUGEPAGES: '48', GUEST_MEMFD: '1', GUEST_TIMEOUT: '600' },
    });
    // A target that dies would leave the guest polling until its timeouts.
    for (const target of targets) void target.exited.then(() => guest.kill());
    const result = await guest.done;
    return { result, images, luns, blk: { image: blkImage, disk }, backendLog: targets.map((x) => x.log).join('\n') };
  } finally {
    for (const target of targets) await target.stop();
  }
}

function once<T>(f: () => Promise<T>): () => Promise<T> {
  let p: Promise<T> | undefined;
  return () => (p ??= f());
}

/** Lines that belong to the marker at `index`: the "!! " lines right after it. */
function failuresAfter(lines: string[], index: number): string[] {
  const out: string[] = [];
  for (let i = index + 1; i < lines.length && !lines[i]!.startsWith('@@'); i++) {
    if (lines[i]!.startsWith('!! ')) out.push(lines[i]!.slice(3));
  }
  return out;
}

function guestReport(run: Run): string {
  const r = run.result;
  const timing = r.stderr.split('\n').find((l) => l.startsWith('run-in-guest: rc='));
  return [
    `guest exit ${r.code} after ${r.seconds.toFixed(1)} s (${timing ?? 'no timing line'})`,
    '--- guest output ---',
    ...r.lines,
    '--- harness stderr ---',
    r.stderr.trim(),
    '--- guest console (tail) ---',
    r.consoleLog.split('\n').slice(-40).join('\n'),
    ...(run.backendLog ? ['--- target ---', run.backendLog] : []),
  ].join('\n');
}

/** Asserts that the marker `@@KIND name status=...` passed, showing its failures if not. */
function assertMarker(t: ExecutionContext, run: Run, kind: string, name: string): void {
  const lines = run.result.lines;
  const index = lines.findIndex((l) => l.startsWith(`@@${kind} ${name} `));
  if (index < 0) {
    t.log(guestReport(run));
    t.fail(`the guest reported no ${kind} ${name}`);
    return;
  }
  const failures = failuresAfter(lines, index);
  for (let i = index + 1; i < lines.length && !lines[i]!.startsWith('@@'); i++) {
    if (lines[i]!.startsWith('   ')) t.log(lines[i]!.trim());
  }
  t.deepEqual(failures, [], `${kind} ${name}: ${lines[index]}`);
  t.regex(lines[index]!, /status=pass/);
}

function registerRun(label: string, run: () => Promise<Run>, extraChecks: string[], opts: { scattered?: boolean } = {}): void {
  testWhen(test.serial, `${label}: the guest opens the function and finishes`, guestRequirements, async (t) => {
    t.timeout(15 * 60_000);
    const r = await run();
    const open = markers(r.result.lines, 'OPEN')[0];
    t.log(`${open?.line ?? 'no OPEN line'}; ${markers(r.result.lines, 'TRANSPORT')[0]?.line ?? ''}`);
    t.log(`guest run ${r.result.seconds.toFixed(1)} s; ${markers(r.result.lines, 'TIME')[0]?.line ?? ''}`);
    if (r.result.code !== 0 || !r.result.lines.includes('@@RESULT PASS')) t.log(guestReport(r));
    t.is(open?.fields.status, 'pass', open ? failuresAfter(r.result.lines, r.result.lines.indexOf(open.line)).join('; ') : 'no OPEN');
    t.is(markers(r.result.lines, 'DMA')[0]?.fields.status, 'pass', 'the device reached memory the expected way');
    t.true(r.result.lines.includes('@@RESULT PASS'), 'every guest check passed');
    t.is(r.result.code, 0);
  });
  if (opts.scattered) {
    // The pool as the bodies found it (right after the controller opened) and as they left it.
    for (const when of ['layout', 'after-bodies']) {
      testWhen(test.serial, `${label}: the DMA pool is scattered in physical memory (${when})`, guestRequirements, async (t) => {
        const r = await run();
        const pool = markers(r.result.lines, 'POOL').find((m) => m.subject === when);
        t.log(pool?.line ?? `no POOL ${when} line`);
        assertMarker(t, r, 'POOL', when);
        if (!pool) return;
        const n = (k: string) => Number(pool.fields[k]);
        t.is(n('scatter'), 1);
        t.true(n('pages') * 4096 >= 32 * MiB, `the whole pool was looked at: ${n('pages')} pages`);
        t.is(n('unresolved'), 0, 'every page has a frame number');
        t.true(n('adjacent') <= n('pairs') * MAX_ADJACENT_SHARE, `${n('adjacent')} of ${n('pairs')} consecutive pages physically adjacent`);
      });
    }
  }
  for (const [name] of BODIES) {
    testWhen(test.serial, `${label}: ${name}`, guestRequirements, async (t) => {
      assertMarker(t, await run(), 'BODY', name);
    });
  }
  for (const name of extraChecks) {
    testWhen(test.serial, `${label}: ${name}`, guestRequirements, async (t) => {
      assertMarker(t, await run(), 'CHECK', name);
    });
  }
  for (const [name] of BLK_BODIES) {
    testWhen(test.serial, `${label}: ${name}`, guestRequirements, async (t) => {
      assertMarker(t, await run(), 'BODY', name);
    });
  }
  testWhen(test.serial, `${label}: the host finds the guest's data in the images`, guestRequirements, async (t) => {
    const r = await run();
    for (const l of r.luns) {
      const hc = l.hostCheck!;
      const preset = l.preset!;
      checkImage(
        t,
        r.images.get(lunId(l))!,
        [
          { offset: hc.offset, bytes: pattern(hc.seed, hc.bytes), what: 'the host-check region holds what the guest wrote' },
          { offset: preset.offset, bytes: pattern(preset.seed, preset.bytes), what: 'the preset region untouched' },
        ],
        lunId(l),
      );
    }
    checkImage(t, r.blk.image, blkImageAfterBodies(r.blk.disk), 'virtio-blk disk');
  });
}

registerRun(
  'pci/iommu (QEMU virtio-scsi-pci and virtio-blk-pci, scattered pool)',
  once(iommuRun),
  ['device-reset', 'bad-addresses', 'binding', 'facade', 'blk-type-mismatch', 'blk-open'],
  { scattered: true },
);
registerRun('pci/physical (vhost-user-scsi-pci and vhost-user-blk-pci, bundled targets)', once(physicalRun), ['device-reset', 'facade', 'blk-open']);

// The same bodies on the host over vhost-user: the transport is the only difference, and this
// keeps the bodies themselves honest without a guest.
let host: { target: TargetProcess; close(): void } | undefined;
const hostRun = once(async () => {
  const d = dir('pci-bodies-host-');
  const luns = lunSpecs();
  const images = luns.map((l) => {
    const img = join(d, `lun-${l.target}-${l.lun}.img`);
    makeImage(img, l);
    return img;
  });
  const socket = join(d, 'vhost.sock');
  const target = await startTarget({ socket, luns: luns.map((l, i) => `${l.target}:${l.lun}:file:${images[i]}:${l.blockSize}`) });
  const native = loadNative();
  const controller = await native.Controller.connectVhostUser(socket, { memoryBytes: 32 * MiB });
  if (!(controller instanceof native.Controller)) throw new Error(controller.message);
  host = { target, close: () => controller.close() };
  return { controller, luns };
});

for (const [name, body] of BODIES) {
  testWhen(test.serial, `vhost-user (host, same bodies): ${name}`, [requireAddon, requireTargetBinary], async (t) => {
    const { controller, luns } = await hostRun();
    await body(t, { controller, luns });
  });
}

let hostBlk: { target: TargetProcess; controller?: Controller } | undefined;
const hostBlkRun = once(async () => {
  const d = dir('pci-blk-bodies-host-');
  const image = join(d, 'blk.img');
  const disk = targetBlkDisk(image, 4096, 32 * MiB);
  const socket = join(d, 'vhost-blk.sock');
  const target = await startTarget({ socket, luns: [`0:0:file:${image}:${disk.blockSize}`], type: 'blk' });
  hostBlk = { target };
  const controller = (hostBlk.controller = await Controller.connect(socket, { type: 'blk', memoryBytes: 32 * MiB }));
  await controller.scan();
  return { controller, disk, image };
});

for (const [name, body] of BLK_BODIES) {
  testWhen(test.serial, `vhost-user-blk (host, same bodies): ${name}`, [requireAddon, requireTargetBinary], async (t) => {
    const { controller, disk } = await hostBlkRun();
    await body(t, { controller, disk });
  });
}

testWhen(test.serial, 'vhost-user-blk (host, same bodies): the image holds what the bodies wrote', [requireAddon, requireTargetBinary], async (t) => {
  const { disk, image } = await hostBlkRun();
  checkImage(t, image, blkImageAfterBodies(disk), 'virtio-blk disk');
});

test.after.always(async () => {
  if (host) {
    host.close();
    await host.target.stop();
  }
  if (hostBlk) {
    await hostBlk.controller?.close();
    await hostBlk.target.stop();
  }
});
