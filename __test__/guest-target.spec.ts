// The bundled vhost-user-scsi target, driven by a frontend we did not write:
// the Linux guest kernel's virtio_scsi + sd drivers in a QEMU guest.  The
// guest finds every LUN, checks sizes and block sizes, writes and reads back
// data on each disk, discards, and sees a LUN hot-added and removed through
// the target's control socket.  The host then checks that the data the guest
// wrote to the file-backed LUN really is in the image file.
import test, { type ExecutionContext } from 'ava';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  repoRoot,
  requireCommands,
  requireGuestKernel,
  requireRoot,
  requireTargetBinary,
  testWhen,
  type Requirement,
} from './helpers/env.js';
import { markers, parseMarker, runGuest, type GuestResult } from './helpers/guest.js';
import { startTarget, type TargetProcess } from './helpers/target.js';

const KiB = 1024;
const MiB = 1024 * KiB;

interface Lun {
  target: number;
  lun: number;
  size: number;
  blockSize: number;
}

const id = (l: { target: number; lun: number }) => `${l.target}:${l.lun}`;

// target 2 has LUN 3 but no LUN 0: only REPORT LUNS can find it
const RAM_LUNS: Lun[] = [
  { target: 0, lun: 0, size: 64 * MiB, blockSize: 512 },
  { target: 0, lun: 1, size: 32 * MiB, blockSize: 4096 },
  { target: 2, lun: 3, size: 8 * MiB, blockSize: 4096 },
];
const FILE_LUN: Lun = { target: 1, lun: 0, size: 16 * MiB, blockSize: 512 };
const STATIC_LUNS: Lun[] = [RAM_LUNS[0]!, RAM_LUNS[1]!, FILE_LUN, RAM_LUNS[2]!];
const HOTPLUG_LUN: Lun = { target: 0, lun: 4, size: 8 * MiB, blockSize: 512 };
const DISCARD_LUN = RAM_LUNS[0]!;
const QUEUES = 2;
const GUEST_CPUS = 2; // one blk-mq hardware queue per vCPU: both virtqueues carry I/O
// a range of the file LUN the guest only reads: it must see the image's bytes
const HASH_RANGE = { off: 2 * MiB, len: 64 * KiB };

const checkScript = join(repoRoot, 'scripts', 'guest', 'scsi-lun-check.sh');

function guestCommand(): string {
  const args = STATIC_LUNS.map((l) => `--expect ${id(l)}:${l.size}:${l.blockSize}`);
  args.push(`--discard ${id(DISCARD_LUN)}`);
  args.push(`--hash ${id(FILE_LUN)}:${HASH_RANGE.off}:${HASH_RANGE.len}`);
  args.push(`--hotplug ${id(HOTPLUG_LUN)}:${HOTPLUG_LUN.size}:${HOTPLUG_LUN.blockSize}`);
  args.push(`--queues ${QUEUES}`);
  return `bash ${checkScript} ${args.join(' ')}`;
}

/** Deterministic, non-zero image contents: every 4-byte word differs. */
function imagePattern(size: number): Buffer {
  const buf = Buffer.alloc(size);
  for (let i = 0; i < size; i += 4) buf.writeUInt32LE((Math.imul(i >>> 2, 2654435761) ^ 0x5a5aa5a5) >>> 0, i);
  return buf;
}

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** What serves the guest's virtio-scsi controller. */
interface Backend {
  qemuArgs: string[];
  imagePath: string;
  hotplugAdd(): Promise<void>;
  hotplugRemove(): Promise<void>;
  /** diagnostics for a failure report */
  log(): string;
  /** resolves with a reason if the backend dies while the guest runs */
  died(): Promise<string> | undefined;
  close(): Promise<void>;
}

class BundledTargetBackend implements Backend {
  private constructor(
    readonly target: TargetProcess,
    readonly imagePath: string,
    readonly qemuArgs: string[],
  ) {}

  static async start(dir: string, imagePath: string): Promise<BundledTargetBackend> {
    const socket = join(dir, 'vhost.sock');
    const target = await startTarget({
      socket,
      control: join(dir, 'control.sock'),
      luns: [
        ...RAM_LUNS.map((l) => `${id(l)}:ram:${l.size / MiB}M:${l.blockSize}`),
        `${id(FILE_LUN)}:file:${imagePath}:${FILE_LUN.blockSize}`,
      ],
      queues: QUEUES,
    });
    const qemuArgs = [
      '-chardev',
      `socket,id=vus,path=${socket}`,
      '-device',
      `vhost-user-scsi-pci,chardev=vus,num_queues=${QUEUES}`,
    ];
    return new BundledTargetBackend(target, imagePath, qemuArgs);
  }

  async hotplugAdd(): Promise<void> {
    const ctl = await this.target.control();
    await ctl.addLun(`${id(HOTPLUG_LUN)}:ram:${HOTPLUG_LUN.size / MiB}M:${HOTPLUG_LUN.blockSize}`);
  }

  async hotplugRemove(): Promise<void> {
    const ctl = await this.target.control();
    await ctl.removeLun(HOTPLUG_LUN.target, HOTPLUG_LUN.lun);
  }

  died(): Promise<string> {
    return this.target.exited.then((s) => `target exited (code ${s.code}, signal ${s.signal})`);
  }

  log(): string {
    const s = this.target.status;
    return `target ${s ? `exited (code ${s.code}, signal ${s.signal})` : 'running'}; its output:\n${this.target.log}`;
  }

  async close(): Promise<void> {
    await this.target.stop();
  }
}

/** QEMU's own emulated virtio-scsi + scsi-hd: a self-check of the harness and the guest script. */
class QemuEmulatedBackend implements Backend {
  readonly qemuArgs: string[] = [];
  private readonly monitorPath: string;
  private monitor: Hmp | undefined;

  constructor(
    private readonly dir: string,
    readonly imagePath: string,
  ) {
    this.monitorPath = join(dir, 'monitor.sock');
    this.qemuArgs.push(
      '-chardev',
      `socket,id=mon,path=${this.monitorPath},server=on,wait=off`,
      '-mon',
      'chardev=mon,mode=readline',
      '-device',
      `virtio-scsi-pci,id=s0,num_queues=${QUEUES}`,
    );
    for (const l of STATIC_LUNS) {
      const file = l === FILE_LUN ? imagePath : this.ramImage(l);
      this.qemuArgs.push('-drive', this.drive(`d${l.target}_${l.lun}`, file), '-device', this.disk(l));
    }
  }

  private ramImage(l: Lun): string {
    const file = join(this.dir, `ram-${l.target}-${l.lun}.img`);
    // sparse and zero-filled, like a fresh RAM LUN
    writeFileSync(file, '');
    truncateSync(file, l.size);
    return file;
  }

  private drive(name: string, file: string): string {
    return `if=none,id=${name},file=${file},format=raw,discard=unmap,cache=directsync`;
  }

  private disk(l: Lun): string {
    return (
      `scsi-hd,id=disk${l.target}_${l.lun},bus=s0.0,channel=0,scsi-id=${l.target},lun=${l.lun},` +
      `drive=d${l.target}_${l.lun},logical_block_size=${l.blockSize},physical_block_size=${l.blockSize}`
    );
  }

  private async hmp(): Promise<Hmp> {
    this.monitor ??= await Hmp.connect(this.monitorPath);
    return this.monitor;
  }

  async hotplugAdd(): Promise<void> {
    const file = this.ramImage(HOTPLUG_LUN);
    const m = await this.hmp();
    await m.command(`drive_add 0 ${this.drive('hp', file)}`);
    await m.command(`device_add ${this.disk(HOTPLUG_LUN).replace(/drive=d\d+_\d+/, 'drive=hp')}`);
  }

  async hotplugRemove(): Promise<void> {
    const m = await this.hmp();
    await m.command(`device_del disk${HOTPLUG_LUN.target}_${HOTPLUG_LUN.lun}`);
  }

  died(): undefined {
    return undefined;
  }

  log(): string {
    return this.monitor?.transcript ?? '';
  }

  async close(): Promise<void> {
    this.monitor?.close();
  }
}

/** Minimal QEMU human monitor client: one command at a time, reply ends at the next prompt. */
class Hmp {
  transcript = '';
  private buffer = '';
  private wake: (() => void) | undefined;

  private constructor(private readonly sock: Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buffer += d;
      this.transcript += d;
      this.wake?.();
    });
  }

  static async connect(path: string): Promise<Hmp> {
    const sock = await new Promise<Socket>((resolve, reject) => {
      const s = connect(path);
      s.once('connect', () => resolve(s));
      s.once('error', reject);
    });
    const hmp = new Hmp(sock);
    await hmp.untilPrompt();
    return hmp;
  }

  private async untilPrompt(timeoutMs = 10_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.buffer.indexOf('(qemu) ');
      if (i >= 0) {
        const reply = this.buffer.slice(0, i);
        this.buffer = this.buffer.slice(i + 7);
        return reply;
      }
      if (Date.now() > deadline) throw new Error(`no monitor prompt; got: ${this.buffer}`);
      await new Promise<void>((resolve) => {
        this.wake = resolve;
        setTimeout(resolve, 100);
      });
    }
  }

  async command(cmd: string): Promise<string> {
    this.sock.write(`${cmd}\n`);
    // readline mode echoes the command; the rest up to the prompt is the reply
    const reply = (await this.untilPrompt()).replace(/\x1b\[[0-9;]*[A-Za-z]/g, '');
    if (/error|could not|failed/i.test(reply)) throw new Error(`monitor: ${cmd}: ${reply.trim()}`);
    return reply;
  }

  close(): void {
    this.sock.destroy();
  }
}

/**
 * Host-side view of the file LUN: the guest's read (@@HASH) returned the
 * image's bytes, its writes (@@DATA) are in the image file at their offsets,
 * and nothing else in the image changed.
 */
function checkImage(lines: string[], original: Buffer, imagePath: string): { problems: string[]; notes: string[] } {
  const problems: string[] = [];
  const notes: string[] = [];
  const hash = markers(lines, 'HASH').find((m) => m.subject === id(FILE_LUN));
  const want = sha256(original.subarray(HASH_RANGE.off, HASH_RANGE.off + HASH_RANGE.len));
  if (hash === undefined) problems.push('no @@HASH line for the file LUN');
  else if (hash.fields.sha256 !== want) problems.push(`guest read ${hash.line}, the image holds sha256=${want}`);
  else notes.push(`guest read of ${HASH_RANGE.len} bytes at ${HASH_RANGE.off} matches the image`);

  const image = readFileSync(imagePath);
  if (image.length !== FILE_LUN.size) problems.push(`image is ${image.length} bytes, was ${FILE_LUN.size}`);
  const expected = Buffer.from(original);
  const regions = markers(lines, 'DATA').filter((m) => m.subject === id(FILE_LUN));
  if (regions.length !== 3) problems.push(`${regions.length} @@DATA lines for the file LUN, expected 3`);
  for (const m of regions) {
    const off = Number(m.fields.off);
    const len = Number(m.fields.len);
    const got = sha256(image.subarray(off, off + len));
    if (got !== m.fields.sha256) {
      problems.push(`image at ${off} (+${len}) has sha256=${got}, guest wrote ${m.fields.sha256}`);
    } else {
      notes.push(`guest data at ${off} (+${len}) is in the image file`);
    }
    image.copy(expected, off, off, off + len);
  }
  if (!expected.equals(image)) {
    let first = 0;
    while (first < image.length && image[first] === expected[first]) first++;
    problems.push(`image changed outside the guest's write regions, first at byte ${first}`);
  } else {
    notes.push('rest of the image unchanged');
  }
  return { problems, notes };
}

function report(r: GuestResult, backend: Backend): string {
  const tail = r.consoleLog.split('\n').slice(-80).join('\n');
  return [
    `guest exit: code ${r.code}, signal ${r.signal}, ${r.seconds.toFixed(1)} s`,
    '--- guest output ---',
    ...r.lines,
    '--- harness stderr ---',
    r.stderr.trim(),
    '--- guest console (tail) ---',
    tail,
    '--- backend ---',
    backend.log(),
  ].join('\n');
}

async function guestCheck(t: ExecutionContext, makeBackend: (dir: string, image: string) => Promise<Backend>) {
  t.timeout(20 * 60_000, 'guest test (TCG) took longer than 20 minutes');
  const dir = mkdtempSync(join(tmpdir(), 'guest-target-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const imagePath = join(dir, 'file-lun.img');
  const original = imagePattern(FILE_LUN.size);
  writeFileSync(imagePath, original);

  const t0 = Date.now();
  const backend = await makeBackend(dir, imagePath);
  t.teardown(() => backend.close());

  const hotplugEvents: string[] = [];
  const guest = runGuest({
    command: guestCommand(),
    qemuArgs: backend.qemuArgs,
    env: {
      GUEST_MEMFD: '1',
      GUEST_SMP: String(GUEST_CPUS),
      GUEST_MODULES: 'virtio_scsi sd_mod',
      GUEST_TIMEOUT: '900',
    },
    onLine: async (line) => {
      const m = parseMarker(line);
      if (m?.name === 'HOTPLUG_ADD') {
        t.is(m.subject, id(HOTPLUG_LUN));
        hotplugEvents.push(`add requested after ${((Date.now() - t0) / 1000).toFixed(1)} s`);
        await backend.hotplugAdd();
      } else if (m?.name === 'HOTPLUG_REMOVE') {
        t.is(m.subject, id(HOTPLUG_LUN));
        hotplugEvents.push(`remove requested after ${((Date.now() - t0) / 1000).toFixed(1)} s`);
        await backend.hotplugRemove();
      }
    },
  });
  t.teardown(() => guest.kill());
  // a dead backend would leave the guest retrying I/O until its SCSI timeouts
  let backendDied: string | undefined;
  void backend.died()?.then((why) => {
    backendDied = why;
    guest.kill();
  });
  const r = await guest.done;
  const total = (Date.now() - t0) / 1000;
  const timing = r.stderr.split('\n').find((l) => l.startsWith('run-in-guest: rc='));
  t.log(`whole test ${total.toFixed(1)} s; guest run ${r.seconds.toFixed(1)} s (${timing ?? 'no timing line'})`);

  const guestFailed = r.code !== 0 || !r.lines.includes('@@RESULT PASS');
  if (guestFailed || backendDied !== undefined || r.handlerError !== undefined) {
    // logs first: AVA drops what a test logs after its first failure
    t.log(report(r, backend));
    // what the host can still tell about the file LUN
    const fileCheck = checkImage(r.lines, original, imagePath);
    t.log(`file LUN image check: ${[...fileCheck.problems, ...fileCheck.notes].join('; ')}`);
    if (backendDied !== undefined) t.fail(`${backendDied} while the guest was running`);
    else if (r.handlerError) t.fail(`reacting to a guest marker failed: ${r.handlerError.message}`);
    else {
      const failLine = markers(r.lines, 'FAIL')[0]?.line ?? 'no @@FAIL line, see the log';
      t.fail(`guest check failed (exit ${r.code}): ${failLine}`);
    }
    return;
  }

  // every LUN, with the expected size and logical block size
  const found = Object.fromEntries(
    markers(r.lines, 'LUN').map((m) => [m.subject, { size: Number(m.fields.size), lbs: Number(m.fields.lbs) }]),
  );
  const expected = Object.fromEntries(STATIC_LUNS.map((l) => [id(l), { size: l.size, lbs: l.blockSize }]));
  t.deepEqual(found, expected);
  for (const m of markers(r.lines, 'LUN')) t.log(m.line.slice(2));

  // data on every disk, checked by the guest, at three places each
  const data = markers(r.lines, 'DATA');
  for (const l of [...STATIC_LUNS, HOTPLUG_LUN]) {
    t.is(data.filter((m) => m.subject === id(l)).length, 3, `data regions verified on ${id(l)}`);
  }

  // multiqueue: each disk got two hardware queues, both virtqueues completed requests
  for (const m of markers(r.lines, 'MQ')) t.is(Number(m.fields.hw_queues), Math.min(QUEUES, GUEST_CPUS), m.line);
  t.is(markers(r.lines, 'MQ').length, STATIC_LUNS.length);
  const vq = markers(r.lines, 'VQ');
  t.is(vq.length, 1, 'one virtio_scsi host');
  const irqs = (vq[0]?.fields.request_irqs ?? '').split(',').map(Number);
  t.is(irqs.length, QUEUES, `request queue interrupts: ${vq[0]?.line}`);
  t.true(
    irqs.every((n) => n > 0),
    `every request queue completed requests: ${vq[0]?.line}`,
  );

  // discard reads back zeroes
  t.is(markers(r.lines, 'DISCARD').find((m) => m.subject === id(DISCARD_LUN))?.fields.zeroes, 'ok');

  // hotplug: appeared with the right geometry, then went away
  const added = markers(r.lines, 'HOTPLUG_ADDED')[0];
  t.is(added?.subject, id(HOTPLUG_LUN));
  t.log(`hotplug ${id(HOTPLUG_LUN)}: appeared via ${added?.fields.via} after ${added?.fields.seconds} s`);
  // The target posts TRANSPORT_RESET on its event queue: the guest must not need a manual rescan.
  t.is(added?.fields.via, 'event', 'the new LUN arrived through the event queue');
  t.log(`hotplug requests: ${hotplugEvents.join('; ')}`);
  const hp = markers(r.lines, 'HOTPLUG_LUN')[0];
  t.deepEqual(
    { size: Number(hp?.fields.size), lbs: Number(hp?.fields.lbs) },
    { size: HOTPLUG_LUN.size, lbs: HOTPLUG_LUN.blockSize },
  );
  t.is(markers(r.lines, 'HOTPLUG_REMOVED')[0]?.subject, id(HOTPLUG_LUN));

  const fileCheck = checkImage(r.lines, original, imagePath);
  t.deepEqual(fileCheck.problems, [], 'file LUN image check');
  t.log(`file LUN: ${fileCheck.notes.join('; ')}`);

  if (backend instanceof BundledTargetBackend) {
    const ctl = await backend.target.control();
    const byId = (a: { id: string }, b: { id: string }) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
    const listed = (await ctl.list()).map((l) => ({ id: id(l), bs: l.block_size, bytes: l.blocks * l.block_size }));
    t.deepEqual(
      listed.sort(byId),
      STATIC_LUNS.map((l) => ({ id: id(l), bs: l.blockSize, bytes: l.size })).sort(byId),
      'target LUN list after the hot-removal',
    );
    t.log('target stats:', JSON.stringify(await ctl.stats()));
  }
}

const guestRequirements: Requirement[] = [
  requireRoot,
  requireCommands('qemu-system-x86_64', 'busybox', 'cpio', 'modprobe', 'depmod', 'dpkg', 'flock'),
  requireGuestKernel,
];

testWhen(
  test.serial,
  'bundled target under the Linux virtio_scsi driver in a QEMU guest',
  [...guestRequirements, requireTargetBinary],
  async (t) => {
    await guestCheck(t, (dir, image) => BundledTargetBackend.start(dir, image));
  },
);

// Same checks against QEMU's own emulated virtio-scsi disks: tells harness or
// guest-script trouble apart from target trouble.  Opt-in.
if (process.env.GUEST_SELFCHECK === '1') {
  testWhen(test.serial, 'harness self-check: QEMU emulated virtio-scsi', guestRequirements, async (t) => {
    await guestCheck(t, async (dir, image) => new QemuEmulatedBackend(dir, image));
  });
}
