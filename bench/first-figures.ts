// First benchmark figures (design D13): 4 KiB random reads from the bundled target, measured with
// the real initiator, printed as JSON. Nothing here is asserted anywhere.
//
// The target serves a null LUN (4096-byte blocks: reads return zeroes, no data copied from a
// backing store) and a RAM LUN (512-byte blocks, filled first so reads copy real memory). Each
// LUN is read at several queue depths through two paths:
//
//   batch    the native binding alone: packed request records, one DMA buffer per slot, one
//            submit call per batch of refills, completions reaped in a tight synchronous loop;
//   promise  the TypeScript facade: BlockDevice.read(lba, dmaBuffer) from `depth` async loops.
//
// Per case: IOPS, MB/s (10^6 bytes), mean/p50/p99 latency in microseconds, the target's per-queue
// request statistics (control socket {"op":"stats"}) and the CPU time of the target process and
// of this process, so one can tell which side is the bottleneck. The target's worker thread and
// this process's thread compete for the same cores (two on the project's machines), and with
// whatever else runs there: figures from a busy machine say little.
//
// Usage: node --import tsx bench/first-figures.ts [--seconds S] [--depths 1,32,128]
//                                                  [--luns null,ram] [--apis batch,promise]
// Needs the release target (cargo build --release -p vhost-user-scsi-target) and the addon
// (npm run build:napi). JSON goes to stdout, progress to stderr.

import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { cpus, loadavg, release, tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';

import { targetBinary } from '../__test__/helpers/env.js';
import { startTarget, type TargetProcess } from '../__test__/helpers/target.js';
import { Controller } from '../ts/index.js';
import {
  CompletionRecord,
  Direction,
  loadNative,
  type NativeChannel,
  type NativeController,
  SubmitRecord,
} from '../ts/native.js';
import { Latencies, type LatencySummary, RandomOffsets, randomReads } from '../ts/bench.js';

const IO_BYTES = 4096;
const READ_10 = 0x28;
const WRITE_10 = 0x2a;
/** Ring entries per queue: room for the deepest queue depth with slack. */
const QUEUE_SIZE = 256;
/** Latency samples kept per case (Float64Array, 8 bytes each). */

interface LunDef {
  kind: 'null' | 'ram';
  target: number;
  lun: number;
  blockSize: number;
  bytes: number;
}

const LUNS: LunDef[] = [
  { kind: 'null', target: 0, lun: 0, blockSize: 4096, bytes: 64 * 2 ** 30 },
  { kind: 'ram', target: 0, lun: 1, blockSize: 512, bytes: 256 * 2 ** 20 },
];

interface Options {
  seconds: number;
  warmupSeconds: number;
  depths: number[];
  luns: Array<LunDef['kind']>;
  apis: Array<'batch' | 'promise'>;
}

function usage(msg: string): never {
  process.stderr.write(
    `first-figures: ${msg}\nusage: node --import tsx bench/first-figures.ts ` +
      '[--seconds S] [--depths 1,32,128] [--luns null,ram] [--apis batch,promise]\n',
  );
  process.exit(2);
}

function parseArgs(argv: string[]): Options {
  const o: Options = {
    seconds: 3,
    warmupSeconds: 0.3,
    depths: [1, 32, 128],
    luns: ['null', 'ram'],
    apis: ['batch', 'promise'],
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i]!;
    const value = argv[i + 1];
    if (value === undefined) usage(`${flag} needs a value`);
    i++;
    const list = value.split(',').filter((s) => s !== '');
    switch (flag) {
      case '--seconds':
        o.seconds = Number(value);
        if (!Number.isFinite(o.seconds) || o.seconds <= 0 || o.seconds > 600)
          usage(`--seconds ${value} is not in (0, 600]`);
        break;
      case '--depths':
        o.depths = list.map(Number);
        if (o.depths.length === 0 || o.depths.some((d) => !Number.isInteger(d) || d < 1 || d > QUEUE_SIZE)) {
          usage(`--depths wants integers from 1 to ${QUEUE_SIZE}, got ${value}`);
        }
        break;
      case '--luns':
        if (list.length === 0 || list.some((k) => k !== 'null' && k !== 'ram'))
          usage(`--luns wants null and/or ram, got ${value}`);
        o.luns = list as Options['luns'];
        break;
      case '--apis':
        if (list.length === 0 || list.some((k) => k !== 'batch' && k !== 'promise')) {
          usage(`--apis wants batch and/or promise, got ${value}`);
        }
        o.apis = list as Options['apis'];
        break;
      default:
        usage(`unknown argument ${flag}`);
    }
  }
  return o;
}

const log = (msg: string) => process.stderr.write(`first-figures: ${msg}\n`);

// ---- measurements ------------------------------------------------------------------------

let clockTicks = 100;
try {
  clockTicks = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
} catch {
  // getconf missing: Linux has used 100 on every common architecture for a long time
}

/** utime + stime of a /proc stat file, in seconds; the comm field may hold spaces. */
function cpuSeconds(statPath: string): { name: string; seconds: number } | undefined {
  let text: string;
  try {
    text = readFileSync(statPath, 'utf8');
  } catch {
    return undefined;
  }
  const open = text.indexOf('(');
  const close = text.lastIndexOf(')');
  const fields = text.slice(close + 2).split(' ');
  // fields[0] is field 3 (state); utime and stime are fields 14 and 15
  return { name: text.slice(open + 1, close), seconds: (Number(fields[11]) + Number(fields[12])) / clockTicks };
}

interface CpuSnapshot {
  process: number;
  threads: Map<string, { name: string; seconds: number }>;
}

function targetCpu(pid: number): CpuSnapshot {
  const process = cpuSeconds(`/proc/${pid}/stat`)?.seconds ?? NaN;
  const threads = new Map<string, { name: string; seconds: number }>();
  let tids: string[] = [];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    tids = [];
  }
  for (const tid of tids) {
    const t = cpuSeconds(`/proc/${pid}/task/${tid}/stat`);
    if (t) threads.set(tid, t);
  }
  return { process, threads };
}

function cpuDelta(before: CpuSnapshot, after: CpuSnapshot, wall: number) {
  const threads = [...after.threads.entries()]
    .map(([tid, t]) => ({
      tid: Number(tid),
      name: t.name,
      cpuSeconds: round3(t.seconds - (before.threads.get(tid)?.seconds ?? 0)),
    }))
    .filter((t) => t.cpuSeconds > 0);
  const seconds = after.process - before.process;
  return { cpuSeconds: round3(seconds), cpuPerWallSecond: round3(seconds / wall), threads };
}

const round3 = (x: number) => Math.round(x * 1000) / 1000;

interface QueueStats {
  requests: number;
  bytes_in: number;
  bytes_out: number;
  errors: number;
  malformed: number;
}

async function queueStats(target: TargetProcess): Promise<QueueStats[]> {
  const resp = await (await target.control()).stats();
  if (!Array.isArray(resp.queues)) throw new Error(`stats reply has no queues array: ${JSON.stringify(resp)}`);
  return resp.queues as QueueStats[];
}

function statsDelta(before: QueueStats[], after: QueueStats[]): QueueStats[] {
  return after.map((a, i) => {
    const b = before[i];
    return {
      requests: a.requests - (b?.requests ?? 0),
      bytes_in: a.bytes_in - (b?.bytes_in ?? 0),
      bytes_out: a.bytes_out - (b?.bytes_out ?? 0),
      errors: a.errors - (b?.errors ?? 0),
      malformed: a.malformed - (b?.malformed ?? 0),
    };
  });
}

// ---- workload ----------------------------------------------------------------------------

/** xorshift32: cheap, deterministic offsets. */
interface RunResult {
  ios: number;
  errors: number;
  seconds: number;
  latency: LatencySummary;
}

/** Writes one packed READ(10)/WRITE(10) record at record position `k`. */
function packRecord(
  batch: Buffer,
  k: number,
  token: number,
  lun: LunDef,
  op: number,
  lba: number,
  blocks: number,
  bufferIndex: number,
) {
  const off = k * SubmitRecord.SIZE;
  batch.writeUInt32LE(token, off + SubmitRecord.TOKEN);
  batch[off + SubmitRecord.TARGET] = lun.target;
  batch[off + SubmitRecord.DIRECTION] = op === READ_10 ? Direction.IN : Direction.OUT;
  batch.writeUInt16LE(lun.lun, off + SubmitRecord.LUN);
  batch.writeUInt32LE(bufferIndex, off + SubmitRecord.BUFFER_INDEX);
  batch[off + SubmitRecord.CDB_LENGTH] = 10;
  batch[off + SubmitRecord.TASK_ATTR] = 0;
  const cdb = off + SubmitRecord.CDB;
  batch[cdb] = op;
  batch[cdb + 1] = 0;
  batch.writeUInt32BE(lba, cdb + 2);
  batch[cdb + 6] = 0;
  batch.writeUInt16BE(blocks, cdb + 7);
  batch[cdb + 9] = 0;
}

/** A request that takes this long means the target is stuck or gone. */
const STALL_MS = 5000;

function stalled(ctl: NativeController, inFlight: number): Error {
  const why = ctl.failure;
  return new Error(`no completion for ${STALL_MS / 1000} s with ${inFlight} in flight${why ? `: ${why}` : ''}`);
}

/** Spins on reap until at least one completion arrives. */
function reapSome(ctl: NativeController, channel: NativeChannel, out: Buffer, max: number): number {
  const since = performance.now();
  for (let spins = 1; ; spins++) {
    const n = channel.reap(out, max);
    if (n > 0) return n;
    if ((spins & 0xfff) === 0 && performance.now() - since > STALL_MS) throw stalled(ctl, channel.inFlight);
  }
}

/**
 * The batch path: `depth` slots, each with its own DMA buffer and token. Every reap's
 * completions are refilled in one submit call. Runs synchronously for `seconds`.
 */
function runBatch(
  ctl: NativeController,
  channel: NativeChannel,
  lun: LunDef,
  depth: number,
  seconds: number,
  seed: number,
): RunResult {
  const buffers = Array.from({ length: depth }, () => ctl.allocDmaBuffer(IO_BYTES));
  const batch = Buffer.alloc(depth * SubmitRecord.SIZE);
  const out = Buffer.alloc(depth * CompletionRecord.SIZE);
  const started = new Float64Array(depth);
  const offsets = new RandomOffsets(lun.bytes, lun.blockSize, IO_BYTES, seed);
  const lat = new Latencies();
  const blocks = IO_BYTES / lun.blockSize;
  let errors = 0;
  let inFlight = 0;

  const t0 = performance.now();
  const end = t0 + seconds * 1000;
  for (let s = 0; s < depth; s++) {
    packRecord(batch, s, s + 1, lun, READ_10, offsets.next(), blocks, s);
    started[s] = t0;
  }
  let accepted = channel.submit(batch, depth, buffers);
  if (accepted !== depth) throw new Error(`the ring took ${accepted} of ${depth} initial requests`);
  inFlight = depth;
  let last = t0;
  let empty = 0;
  while (inFlight > 0) {
    const n = channel.reap(out, depth);
    if (n === 0) {
      // the clock is read only now and then: this loop is what is being measured
      if (++empty % 4096 === 0 && performance.now() - last > STALL_MS) throw stalled(ctl, inFlight);
      continue;
    }
    const now = performance.now();
    last = now;
    let k = 0;
    for (let i = 0; i < n; i++) {
      const off = i * CompletionRecord.SIZE;
      const slot = out.readUInt32LE(off + CompletionRecord.TOKEN) - 1;
      if (out[off + CompletionRecord.RESPONSE] !== 0 || out[off + CompletionRecord.STATUS] !== 0) errors++;
      lat.add((now - started[slot]!) * 1000);
      if (now < end) {
        packRecord(batch, k++, slot + 1, lun, READ_10, offsets.next(), blocks, slot);
        started[slot] = now;
      } else {
        inFlight--;
      }
    }
    if (k > 0) {
      accepted = channel.submit(batch, k, buffers);
      if (accepted !== k) throw new Error(`the ring took ${accepted} of ${k} requests with ${inFlight} in flight`);
    }
  }
  return { ios: lat.count, errors, seconds: (last - t0) / 1000, latency: lat.summary() };
}

/**
 * TEST UNIT READY until GOOD: a fresh connection first gets UNIT ATTENTION (power on or reset),
 * which the batch path, having no retry logic, would count as errors.
 */
function settleUnitAttention(ctl: NativeController, channel: NativeChannel, lun: LunDef): void {
  const batch = Buffer.alloc(SubmitRecord.SIZE);
  const out = Buffer.alloc(CompletionRecord.SIZE);
  for (let attempt = 0; attempt < 8; attempt++) {
    batch.fill(0);
    batch.writeUInt32LE(1, SubmitRecord.TOKEN);
    batch[SubmitRecord.TARGET] = lun.target;
    batch[SubmitRecord.DIRECTION] = Direction.NONE;
    batch.writeUInt16LE(lun.lun, SubmitRecord.LUN);
    batch[SubmitRecord.CDB_LENGTH] = 6; // TEST UNIT READY: opcode 0, all zero
    if (channel.submit(batch, 1, []) !== 1) throw new Error('the ring refused TEST UNIT READY');
    reapSome(ctl, channel, out, 1);
    if (out[CompletionRecord.RESPONSE] === 0 && out[CompletionRecord.STATUS] === 0) return;
  }
  throw new Error(`LUN ${lun.target}:${lun.lun} did not become ready (status ${out[CompletionRecord.STATUS]})`);
}

/** Fills the RAM LUN with non-zero data through the batch path, 1 MiB per WRITE(10). */
function fillRam(ctl: NativeController, channel: NativeChannel, lun: LunDef): void {
  const chunk = 1 << 20;
  const depth = 16;
  const buffers = Array.from({ length: depth }, (_, i) => ctl.allocDmaBuffer(chunk).fill(0x41 + i));
  const batch = Buffer.alloc(depth * SubmitRecord.SIZE);
  const out = Buffer.alloc(depth * CompletionRecord.SIZE);
  const chunks = lun.bytes / chunk;
  const blocks = chunk / lun.blockSize;
  for (let first = 0; first < chunks; first += depth) {
    const n = Math.min(depth, chunks - first);
    for (let k = 0; k < n; k++) packRecord(batch, k, k + 1, lun, WRITE_10, (first + k) * blocks, blocks, k);
    if (channel.submit(batch, n, buffers) !== n) throw new Error('the ring refused the fill writes');
    for (let done = 0; done < n;) {
      const got = reapSome(ctl, channel, out, depth);
      for (let i = 0; i < got; i++) {
        const off = i * CompletionRecord.SIZE;
        if (out[off + CompletionRecord.RESPONSE] !== 0 || out[off + CompletionRecord.STATUS] !== 0) {
          const response = out[off + CompletionRecord.RESPONSE];
          throw new Error(
            `filling the RAM LUN failed: response ${response} status ${out[off + CompletionRecord.STATUS]}`,
          );
        }
      }
      done += got;
    }
  }
}

/** The Promise path: `depth` async loops, each reading into its own DMA buffer. */
async function runPromise(
  controller: Controller,
  lun: LunDef,
  depth: number,
  seconds: number,
  seed: number,
): Promise<RunResult> {
  const dev = controller.device(controller.lunName(lun.target, lun.lun));
  const r = await randomReads(dev, { depth, seconds, ioBytes: IO_BYTES, seed });
  if (r.errors > 0) log(`promise path: ${r.errors} errors`);
  return { ios: r.ios, errors: r.errors, seconds: r.seconds, latency: r.latencyUs };
}

// ---- driver ------------------------------------------------------------------------------

interface CaseResult {
  api: 'batch' | 'promise';
  lun: LunDef['kind'];
  blockSize: number;
  depth: number;
  ios: number;
  errors: number;
  seconds: number;
  iops: number;
  mbPerSecond: number;
  latencyUs: RunResult['latency'];
  initiatorCpuPerWallSecond: number;
  target: ReturnType<typeof cpuDelta> & { queues: QueueStats[] };
}

async function measure(
  target: TargetProcess,
  api: CaseResult['api'],
  lun: LunDef,
  depth: number,
  opts: Options,
  run: (seconds: number) => RunResult | Promise<RunResult>,
): Promise<CaseResult> {
  await run(opts.warmupSeconds);
  const pid = target.child.pid!;
  const statsBefore = await queueStats(target);
  const cpuBefore = targetCpu(pid);
  const selfBefore = process.cpuUsage();
  const wall0 = performance.now();
  const r = await run(opts.seconds);
  const wall = (performance.now() - wall0) / 1000;
  const self = process.cpuUsage(selfBefore);
  const cpuAfter = targetCpu(pid);
  const statsAfter = await queueStats(target);
  const result: CaseResult = {
    api,
    lun: lun.kind,
    blockSize: lun.blockSize,
    depth,
    ios: r.ios,
    errors: r.errors,
    seconds: round3(r.seconds),
    iops: Math.round(r.ios / r.seconds),
    mbPerSecond: Math.round(((r.ios * IO_BYTES) / r.seconds / 1e6) * 10) / 10,
    latencyUs: r.latency,
    initiatorCpuPerWallSecond: round3((self.user + self.system) / 1e6 / wall),
    target: { ...cpuDelta(cpuBefore, cpuAfter, wall), queues: statsDelta(statsBefore, statsAfter) },
  };
  log(
    `${api.padEnd(7)} ${lun.kind.padEnd(4)} qd ${String(depth).padStart(3)}: ${result.iops} IOPS, ` +
      `p50 ${result.latencyUs.p50} us, p99 ${result.latencyUs.p99} us, ` +
      `target cpu ${result.target.cpuPerWallSecond}/s, initiator cpu ${result.initiatorCpuPerWallSecond}/s`,
  );
  return result;
}

/** Starts a fresh target for one phase and stops it afterwards. */
async function withTarget<T>(luns: LunDef[], body: (target: TargetProcess, socket: string) => Promise<T>): Promise<T> {
  const dir = mkdtempSync(join(tmpdir(), 'first-figures-'));
  const socket = join(dir, 'vhost.sock');
  try {
    const target = await startTarget({
      socket,
      control: join(dir, 'control.sock'),
      luns: luns.map((l) => `${l.target}:${l.lun}:${l.kind}:${l.bytes}:${l.blockSize}`),
      queues: 1,
      queueSize: QUEUE_SIZE,
    });
    try {
      return await body(target, socket);
    } finally {
      await target.stop();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const opts = parseArgs(process.argv.slice(2));
  // Other work on the machine skews every figure: the load before and after goes into the report.
  const loadBefore = loadavg();
  const binary = targetBinary();
  if (!existsSync(binary)) {
    usage(`${binary} is missing: cargo build --release -p vhost-user-scsi-target (or set VHOST_USER_SCSI_TARGET)`);
  }
  const native = loadNative();
  const luns = LUNS.filter((l) => opts.luns.includes(l.kind));
  const ram = luns.find((l) => l.kind === 'ram');
  const cases: CaseResult[] = [];
  let controllerInfo: unknown;

  // One target per phase: a closed controller keeps its vhost-user connection until it is
  // garbage-collected, and the target serves one frontend at a time.
  if (opts.apis.includes('batch')) {
    await withTarget(luns, async (target, socket) => {
      const ctl = native.Controller.connectVhostUser(socket, { queueSize: QUEUE_SIZE });
      controllerInfo = ctl.info;
      const channel = ctl.openChannel();
      try {
        for (const lun of luns) settleUnitAttention(ctl, channel, lun);
        if (ram) fillRam(ctl, channel, ram);
        for (const lun of luns) {
          for (const depth of opts.depths) {
            let seed = 1;
            cases.push(
              await measure(target, 'batch', lun, depth, opts, (s) => runBatch(ctl, channel, lun, depth, s, seed++)),
            );
          }
        }
      } finally {
        channel.close();
        ctl.close();
      }
    });
  }
  if (opts.apis.includes('promise')) {
    await withTarget(luns, async (target, socket) => {
      const controller = await Controller.connect(socket, { queueSize: QUEUE_SIZE });
      try {
        controllerInfo ??= controller.info;
        await controller.scan();
        if (ram) {
          const dev = controller.device(controller.lunName(ram.target, ram.lun));
          const chunk = controller.allocBuffer(1 << 20).fill(0x41);
          const step = chunk.length / ram.blockSize;
          for (let lba = 0; lba < ram.bytes / ram.blockSize; lba += step) await dev.write(lba, chunk);
        }
        for (const lun of luns) {
          for (const depth of opts.depths) {
            let seed = 1;
            cases.push(
              await measure(target, 'promise', lun, depth, opts, (s) => runPromise(controller, lun, depth, s, seed++)),
            );
          }
        }
      } finally {
        controller.close();
      }
    });
  }
  const report = {
    benchmark: '4 KiB random reads, bundled vhost-user-scsi target, one request queue',
    units: {
      latency: 'microseconds',
      throughput: 'MB/s (10^6 bytes)',
      cpu: 'CPU seconds per wall second (1.0 = one core busy)',
    },
    machine: {
      cpus: cpus().length,
      model: cpus()[0]?.model ?? 'unknown',
      kernel: release(),
      node: process.version,
      loadAverageBefore: loadBefore.map((x) => Math.round(x * 100) / 100),
      loadAverageAfter: loadavg().map((x) => Math.round(x * 100) / 100),
    },
    note:
      'The target worker thread sleeps on the queue notification and wakes per kick; the initiator spins (batch) ' +
      'or polls from setImmediate (promise). Both share this machine with each other and with anything else running.',
    addon: native.nativeVersion(),
    target: { binary, luns: luns.map((l) => ({ ...l })), queues: 1, queueSize: QUEUE_SIZE },
    controller: controllerInfo,
    seconds: opts.seconds,
    warmupSeconds: opts.warmupSeconds,
    cases,
  };
  process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
}

main().catch((e: unknown) => {
  process.stderr.write(`first-figures: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
  process.exit(1);
});
