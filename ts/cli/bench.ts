// `virtio-initiator bench`: a fio/bdevperf-like load on one block device, through the Promise
// API, the batch binding or the native load loop (ts/bench.ts), against a vhost-user socket, a
// PCI function, or the bundled target started for the run (virtio-scsi, or virtio-blk with
// --type blk); in this thread, or in worker threads with a request queue each (--workers,
// workers.ts).

import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import {
  APIS,
  type Api,
  type Progress,
  READ_WRITE_MODES,
  type ReadWrite,
  readPercentOf,
  runWorkload,
  type WorkloadOptions,
  workloadProblem,
  type WorkloadResult,
} from '../bench.js';
import type { BlockDevice } from '../block-device.js';
import { startTarget, type TargetProcess } from '../bundled-target.js';
import { attachAll, loadConfig } from '../config/index.js';
import type { Controller } from '../controller.js';
import { type LogLevel, setLogLevel } from '../log.js';
import type { DeviceType } from '../device-type.js';
import {
  bad,
  DEVICE_OPTIONS,
  deviceArgs,
  formatSize,
  HELP_OPTION,
  LOG_LEVEL_OPTION,
  logLevelOf,
  type OptionSpec,
  optionsHelp,
  parseArgs,
  type Subcommand,
  UsageError,
} from './args.js';
import { openController } from './open.js';
import { compact, printEvents, ProgressLine, table, writeJsonLine } from './output.js';
import { runWorkers, type WorkerSummary } from './workers.js';

/** Worker threads at most: the bundled target's request queues at most. */
const MAX_WORKERS = 64;

const OPTIONS: readonly OptionSpec[] = [
  ...DEVICE_OPTIONS,
  { name: 'target-queues', kind: 'value', metavar: 'N', help: 'bundled target: request queues (default: one per worker)' },
  { name: 'target-poll', kind: 'flag', help: 'bundled target: busy-poll its request queues (--poll)' },
  {
    name: 'target-lun',
    kind: 'list',
    metavar: 'SPEC',
    help: 'bundled target: a LUN (default 0:0:null:1G:512; 0:0:ram:256M:512 when writing or verifying); with --type blk its one disk, 0:0:...',
  },
  { name: 'device', kind: 'value', metavar: 'NAME', help: 'block device to load (default: the first disk found; a virtio-blk device has one)' },
  { name: 'api', kind: 'value', metavar: 'API', help: `request path: ${APIS.join(', ')} (default promise)` },
  { name: 'rw', kind: 'value', metavar: 'MODE', help: `access pattern: ${READ_WRITE_MODES.join(', ')} (default randread)` },
  { name: 'mix', kind: 'value', metavar: 'PCT', help: 'share of reads for randrw (default 50)' },
  { name: 'bs', kind: 'value', metavar: 'SIZE', help: 'bytes per request, a multiple of the block size (default 4k)' },
  { name: 'qd', kind: 'value', metavar: 'N', help: 'requests in flight, up to the queue size (default 32)' },
  { name: 'time', kind: 'value', metavar: 'S', help: 'seconds to run (default 5, or unlimited with --ios)' },
  { name: 'ios', kind: 'value', metavar: 'N', help: 'requests to run (with --time: whichever ends first)' },
  { name: 'size', kind: 'value', metavar: 'SIZE', help: 'bytes of the device, from LBA 0, to use (default all)' },
  { name: 'seed', kind: 'value', metavar: 'N', help: 'seed of offsets, read/write choices and verify data (default 1)' },
  {
    name: 'interrupts',
    kind: 'flag',
    help: 'wait for completions on the queue interrupt instead of polling (promise API, vhost-user)',
  },
  { name: 'verify', kind: 'flag', help: 'stamp written blocks and check every read of them (promise, batch)' },
  {
    name: 'reconnect',
    kind: 'flag',
    help: 'when the target goes away, connect again (for at least 30 s) and go on (vhost-user; promise, batch)',
  },
  { name: 'json', kind: 'flag', help: 'print the result as one JSON object on the last line of stdout' },
  {
    name: 'workers',
    kind: 'value',
    metavar: 'N',
    help: `threads running the load, a request queue and a region each (default 1: this thread; at most ${MAX_WORKERS})`,
  },
  LOG_LEVEL_OPTION,
  HELP_OPTION,
];

const HELP = `usage: virtio-initiator bench [options]

Runs a load on one block device and reports IOPS, MB/s, latency percentiles, errors, data
mismatches (--verify) and CPU use. Without --socket, --pci or --config it starts the bundled
target (serving virtio-blk with --type blk).

options:
${optionsHelp(OPTIONS)}

exit status: 0 the run completed without errors or mismatches, 1 it had some (or failed),
2 bad arguments, 130/143 stopped by SIGINT/SIGTERM (what ran is still reported).
`;

const DEFAULT_NULL_LUN = '0:0:null:1G:512';
const DEFAULT_RAM_LUN = '0:0:ram:256M:512';
const LUN_SPEC = /^[0-9]+:[0-9]+:(ram|null|file):[^:]+(:[^:]*)*$/;
/** The one disk of the bundled target serving virtio-blk. */
const BLK_LUN_SPEC = /^0+:0+:/;
/** Largest ring a virtio queue here can have. */
const MAX_QUEUE_DEPTH = 1024;
const MAX_BS = 16 * 2 ** 20;
/** Buffers in flight at most (queue depth times request size). */
const MAX_IN_FLIGHT_BYTES = 2 ** 30;
const DEFAULT_MEMORY = 64 * 2 ** 20;
const HUGEPAGE = 2 * 2 ** 20;
/** `--reconnect`: attempts at growing intervals up to 1 s, 37 s in all before giving up. */
const BENCH_RECONNECT = Object.freeze({ retries: 40, delayMs: 100, maxDelayMs: 1000 });
/** Lines of mismatches in the human summary, and LBAs in the JSON. */
const HUMAN_MISMATCHES = 20;
const JSON_MISMATCHES = 100;

interface BenchConfig {
  socket: string | undefined;
  pci: string | undefined;
  config: string | undefined;
  /** As given; the bundled target serves this type (default scsi). */
  type: DeviceType | undefined;
  targetQueues: number;
  targetPoll: boolean;
  targetLuns: string[];
  device: string | undefined;
  api: Api;
  rw: ReadWrite;
  mix: number;
  bs: number;
  qd: number;
  seconds: number | undefined;
  ios: number | undefined;
  size: number | undefined;
  seed: number;
  verify: boolean;
  /** Interrupt mode (Controller option `poll: false`). */
  interrupts: boolean;
  reconnect: boolean;
  logLevel: LogLevel | undefined;
  json: boolean;
  workers: number;
}

/** Everything that can be checked before anything is started. */
export function parseBenchArgs(argv: readonly string[]): BenchConfig | 'help' {
  const a = parseArgs(argv, OPTIONS);
  if (a.flag('help')) return 'help';
  const workers = a.integer('workers', { min: 1, max: MAX_WORKERS }, 1);
  const { socket, pci, config, type } = deviceArgs(a);
  if (socket !== undefined || pci !== undefined || config !== undefined) {
    const given = ['target-queues', 'target-poll', 'target-lun'].find((n) => a.has(n));
    if (given !== undefined) {
      const instead = socket !== undefined ? 'socket' : pci !== undefined ? 'pci' : 'config';
      throw new UsageError(`--${given} is for the bundled target, which is not started with --${instead}`);
    }
  }
  const targetLuns = a.strings('target-lun');
  for (const spec of targetLuns) {
    if (!LUN_SPEC.test(spec)) throw bad('target-lun', spec, 'T:L:ram|null|file:SIZE-or-PATH[:BS] (like 0:0:ram:256M:512)');
  }
  if (type === 'blk') {
    // The target's own checks, made before anything is started.
    if (targetLuns.length > 1) throw new UsageError('--type blk: the bundled target serves one disk (give --target-lun once)');
    const spec = targetLuns[0];
    if (spec !== undefined && !BLK_LUN_SPEC.test(spec)) {
      throw bad('target-lun', spec, 'the one disk of --type blk, 0:0:KIND:... (like 0:0:ram:256M:512)');
    }
  }
  const api = a.choice('api', APIS, 'promise');
  const rw = a.choice('rw', READ_WRITE_MODES, 'randread');
  const mix = a.percent('mix');
  if (mix !== undefined && rw !== 'randrw') throw new UsageError(`--mix applies to --rw randrw only (not ${rw})`);
  const bs = a.size('bs', { min: 512, max: MAX_BS }) ?? 4096;
  if (bs % 512 !== 0) throw bad('bs', a.string('bs')!, 'a multiple of 512 bytes, the smallest block size');
  const qd = a.integer('qd', { min: 1, max: MAX_QUEUE_DEPTH }, 32);
  if (qd * bs * workers > MAX_IN_FLIGHT_BYTES) {
    const most = formatSize(MAX_IN_FLIGHT_BYTES);
    const each = workers > 1 ? ` on each of ${workers} workers` : '';
    throw new UsageError(`--qd ${qd} with --bs ${formatSize(bs)}${each}: expected at most ${most} of buffers in flight`);
  }
  const ios = a.integer('ios', { min: 1, max: 1e15 });
  if (ios !== undefined && ios < workers) {
    throw new UsageError(`--ios ${ios} with --workers ${workers}: expected at least one request per worker`);
  }
  const seconds = a.positive('time', 86_400) ?? (ios === undefined ? 5 : undefined);
  const size = a.size('size', { min: 512, max: Number.MAX_SAFE_INTEGER });
  const seed = a.integer('seed', { min: 0, max: 0xffffffff }, 1);
  const verify = a.flag('verify');
  if (verify && api === 'native') throw new UsageError('--verify is not supported with --api native (use promise or batch)');
  const interrupts = a.flag('interrupts');
  if (interrupts && api !== 'promise') {
    throw new UsageError(`--interrupts applies to --api promise only (the ${api} path polls by design)`);
  }
  if (interrupts && pci !== undefined) throw new UsageError('--interrupts is for vhost-user (PCI functions are polled)');
  const reconnect = a.flag('reconnect');
  if (reconnect) {
    if (pci !== undefined || config !== undefined) throw new UsageError('--reconnect is for a vhost-user --socket or the bundled target');
    if (api === 'native') throw new UsageError('--reconnect applies to --api promise and batch (not native)');
  }
  return {
    socket,
    pci,
    config,
    type,
    // One queue per worker: the main thread gives back the one the scan opened (see run()).
    targetQueues: a.integer('target-queues', { min: 1, max: 64 }, workers),
    targetPoll: a.flag('target-poll'),
    targetLuns,
    device: a.string('device'),
    api,
    rw,
    mix: mix ?? 50,
    bs,
    qd,
    seconds,
    ios,
    size,
    seed,
    verify,
    interrupts,
    reconnect,
    logLevel: logLevelOf(a),
    json: a.flag('json'),
    workers,
  };
}

// ---- CPU time of the target process --------------------------------------------------------------

let clockTicks: number | undefined;

function ticksPerSecond(): number {
  if (clockTicks === undefined) {
    try {
      clockTicks = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      clockTicks = 100; // every common Linux architecture
    }
  }
  return clockTicks;
}

/** utime + stime of a process in seconds, or undefined when it cannot be read. */
function processCpuSeconds(pid: number): number | undefined {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may hold spaces and parentheses: count from its closing one.
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / ticksPerSecond();
  } catch {
    return undefined;
  }
}

// ---- output ----------------------------------------------------------------------------------

export interface BenchReport {
  api: Api;
  rw: ReadWrite;
  readPercent: number;
  bs: number;
  qd: number;
  device: string;
  blockSize: number;
  transport: string;
  seconds: number;
  ios: number;
  reads: number;
  writes: number;
  iops: number;
  mbPerSecond: number;
  latencyUs: WorkloadResult['latencyUs'];
  errors: number;
  firstError: string | null;
  verify: boolean;
  mismatches: number;
  mismatchLbas: number[];
  seed: number;
  cpu: { initiator: number; target: number | null };
  workers: WorkerSummary[];
  interrupted: boolean;
  /** Completions were waited for on the queue interrupt (`--interrupts`), not polled. */
  interrupts: boolean;
  /** With `--reconnect`: times the target went away and the controller connected again. */
  reconnects: number;
  /** Requests that ended because the target went away (not errors). */
  lost: number;
}

const round3 = (x: number) => Math.round(x * 1000) / 1000;

function roundLatency(l: WorkloadResult['latencyUs']): WorkloadResult['latencyUs'] {
  const r = (x: number) => Math.round(x * 10) / 10;
  return { mean: r(l.mean), p50: r(l.p50), p99: r(l.p99), p999: r(l.p999), max: r(l.max) };
}

/** The report of a run; `workers` lists the worker threads' parts (default: the run's own queue). */
export function report(
  r: WorkloadResult,
  dev: BlockDevice,
  transport: string,
  targetCpu: number | null,
  workers: readonly WorkerSummary[] = [{ queue: r.queue, iops: r.iops, shared: r.shared }],
  interrupts = false,
  reconnects = 0,
): BenchReport {
  return {
    api: r.api,
    rw: r.rw,
    readPercent: r.readPercent,
    bs: r.ioBytes,
    qd: r.queueDepth,
    device: dev.name,
    blockSize: dev.blockSize,
    transport,
    seconds: round3(r.seconds),
    ios: r.ios,
    reads: r.reads,
    writes: r.writes,
    iops: r.iops,
    mbPerSecond: r.mbPerSecond,
    latencyUs: roundLatency(r.latencyUs),
    errors: r.errors,
    firstError: r.firstError ?? null,
    verify: r.verify,
    mismatches: r.mismatches,
    mismatchLbas: r.mismatchList.slice(0, JSON_MISMATCHES).map((m) => m.lba),
    seed: r.seed,
    cpu: { initiator: round3(r.cpuSeconds / r.seconds), target: targetCpu === null ? null : round3(targetCpu / r.seconds) },
    workers: workers.map((w) => ({ ...w })),
    interrupted: r.interrupted,
    interrupts,
    reconnects,
    lost: r.lost,
  };
}

/** The human summary of a run. */
export function summary(rep: BenchReport, r: WorkloadResult): string {
  const l = rep.latencyUs;
  const rwText = rep.rw === 'randrw' ? `randrw (${rep.readPercent}% reads)` : rep.rw;
  const several = rep.workers.length > 1;
  const queues = several
    ? `${rep.workers.length} workers on queues ${[...new Set(rep.workers.map((w) => w.queue))].sort((a, b) => a - b).join(', ')}`
    : `queue ${rep.workers[0]?.queue ?? 0}`;
  const waiting = rep.interrupts ? ', completions by interrupt' : '';
  const lines = [
    `${rep.device} (${rep.blockSize}-byte blocks) over ${rep.transport}, ${queues}${waiting}` +
      (rep.interrupted ? ' - interrupted' : ''),
    table([
      ['api', rep.api, 'rw', rwText, 'bs', formatSize(rep.bs), 'qd', String(rep.qd)],
    ]),
    table(
      [
        ['ios', String(rep.ios), `${rep.reads} reads, ${rep.writes} writes in ${rep.seconds.toFixed(3)} s`],
        ['IOPS', String(rep.iops), ''],
        ['MB/s', rep.mbPerSecond.toFixed(2), ''],
        ['latency', '', `mean ${l.mean}  p50 ${l.p50}  p99 ${l.p99}  p99.9 ${l.p999}  max ${l.max} (us)`],
        ['errors', String(rep.errors), rep.firstError === null ? '' : `first: ${rep.firstError}`],
        ...(rep.reconnects > 0 || rep.lost > 0
          ? [['reconnects', String(rep.reconnects), `${rep.lost} requests lost with the connection (not errors)`]]
          : []),
        ['mismatches', rep.verify ? String(rep.mismatches) : '-', rep.verify ? '' : 'not verified (--verify)'],
        [
          'CPU',
          '',
          `initiator ${rep.cpu.initiator.toFixed(2)} s/s, ` +
            `target ${rep.cpu.target === null ? 'not measured' : `${rep.cpu.target.toFixed(2)} s/s`}`,
        ],
      ],
      new Set([1]),
    ),
  ];
  if (several) {
    lines.push(
      table(
        [
          ['worker', 'queue', 'IOPS', ''],
          ...rep.workers.map((w, i) => [String(i), String(w.queue), String(w.iops), w.shared ? 'shared queue' : '']),
        ],
        new Set([0, 1, 2]),
      ),
    );
  }
  if (r.mismatches > 0) {
    const list = r.mismatchList;
    const shown = list.length > HUMAN_MISMATCHES ? `, first ${HUMAN_MISMATCHES}` : '';
    lines.push(`mismatching units by LBA (${list.length} distinct${shown}):`);
    for (const m of list.slice(0, HUMAN_MISMATCHES)) lines.push(`  LBA ${m.lba}: ${m.detail}`);
  }
  return `${lines.join('\n')}\n`;
}

interface LastProgress {
  phase: Progress['phase'] | undefined;
  ios: number;
  bytes: number;
  at: number;
}

export function progressText(p: Progress, last: LastProgress): string {
  if (p.phase !== last.phase) {
    last.phase = p.phase;
    last.ios = 0;
    last.bytes = 0;
    last.at = 0;
  }
  // Rates over the last interval: what the device does now, not the average so far.
  const dt = p.elapsedSeconds - last.at;
  const iops = dt > 0 ? (p.ios - last.ios) / dt : 0;
  const mbs = dt > 0 ? (p.bytes - last.bytes) / dt / 1e6 : 0;
  last.ios = p.ios;
  last.bytes = p.bytes;
  last.at = p.elapsedSeconds;
  const when =
    p.remainingSeconds !== undefined
      ? `${p.elapsedSeconds.toFixed(1)} s, ${p.remainingSeconds.toFixed(1)} s left`
      : p.fraction !== undefined
        ? `${p.elapsedSeconds.toFixed(1)} s, ${Math.floor(p.fraction * 100)}%`
        : `${p.elapsedSeconds.toFixed(1)} s`;
  if (p.phase !== 'run') return `${p.phase}: ${mbs.toFixed(1)} MB/s, ${when}`;
  return `run: ${compact(iops)} IOPS, ${mbs.toFixed(1)} MB/s, ${compact(p.ios)} ios, ${when}`;
}

// ---- the subcommand ----------------------------------------------------------------------------

function memoryFor(cfg: BenchConfig): { memoryBytes: number; maxMemoryBytes: number } {
  // Every thread's in-flight and fill/read-back buffers (one pool for all of them), plus the
  // queues' own bounce space.
  const need = cfg.workers * (cfg.qd * cfg.bs + 2 * 2 ** 20) + 16 * 2 ** 20;
  const memoryBytes = Math.max(DEFAULT_MEMORY, Math.ceil(need / HUGEPAGE) * HUGEPAGE);
  return { memoryBytes, maxMemoryBytes: memoryBytes * 4 };
}

/** What a second Ctrl-C must not leave behind when it ends the process at once. */
interface Leftovers {
  target?: TargetProcess;
  dir?: string;
}

async function run(cfg: BenchConfig, stop: AbortController, leftovers: Leftovers): Promise<number> {
  let dir: string | undefined;
  let targetProcess: TargetProcess | undefined;
  let ctrl: Controller | undefined;
  /** With --config: every controller the file names (ctrl is the one with the device). */
  let attached: Controller[] = [];
  const progress = new ProgressLine();
  try {
    if (cfg.socket === undefined && cfg.pci === undefined && cfg.config === undefined) {
      dir = mkdtempSync(join(tmpdir(), 'virtio-initiator-bench-'));
      leftovers.dir = dir;
      const writes = cfg.verify || readPercentOf(cfg.rw, cfg.mix) < 100;
      const luns = cfg.targetLuns.length > 0 ? cfg.targetLuns : [writes ? DEFAULT_RAM_LUN : DEFAULT_NULL_LUN];
      progress.update(`starting the bundled target (${luns.join(', ')})`);
      targetProcess = await startTarget({
        socket: join(dir, 'vhost.sock'),
        ...(cfg.type !== undefined ? { type: cfg.type } : {}),
        luns,
        queues: cfg.targetQueues,
        poll: cfg.targetPoll,
        // Its own process group: a Ctrl-C stops the run here, and the target after it.
        detached: true,
      });
      leftovers.target = targetProcess;
    }
    const memory = memoryFor(cfg);
    // Every queue of the bundled target, even beyond the 16 a controller sets up by default.
    const queues = targetProcess !== undefined ? { requestQueues: cfg.targetQueues } : {};
    let problems: string[];
    let devices: BlockDevice[];
    if (cfg.config !== undefined) {
      const config = await loadConfig(cfg.config);
      for (const w of config.warnings) process.stderr.write(`virtio-initiator bench: ${w}\n`);
      attached = await attachAll(config, { defaults: { ...memory, poll: !cfg.interrupts } });
      devices = attached.flatMap((c) => [...c.devices]);
      problems = [];
    } else {
      ctrl =
        cfg.pci !== undefined
          ? await openController(cfg, memory)
          : await openController(
              { ...cfg, socket: cfg.socket ?? targetProcess!.socket },
              { ...memory, ...queues, poll: !cfg.interrupts, ...(cfg.reconnect ? { reconnect: BENCH_RECONNECT } : {}) },
            );
      attached = [ctrl];
      const scan = await ctrl.scan();
      devices = [...ctrl.devices];
      problems = scan.problems.map((p) => p.error.message);
    }
    let dev: BlockDevice;
    if (cfg.device !== undefined) {
      const found = devices.find((d) => d.name === cfg.device);
      if (found === undefined) {
        const known = devices.map((d) => d.name).join(', ');
        throw bad('device', cfg.device, known !== '' ? `one of ${known}` : 'a disk, but the scan found none');
      }
      dev = found;
    } else {
      const first = devices[0];
      if (first === undefined) {
        const why = problems.join('; ');
        throw new Error(`the scan found no disk${why ? ` (${why})` : ''}`);
      }
      dev = first;
    }
    ctrl = attached.find((c) => c.devices.includes(dev))!;
    // Hot-plug, capacity changes and a target that goes away show up as they happen.
    printEvents('bench', attached);
    let reconnects = 0;
    ctrl.on('reconnected', () => reconnects++);

    const pid = targetProcess?.child.pid;
    let targetCpu0: number | undefined;
    let targetCpu: number | null = null;
    const last: LastProgress = { phase: undefined, ios: 0, bytes: 0, at: 0 };
    const options: WorkloadOptions = {
      api: cfg.api,
      rw: cfg.rw,
      mix: cfg.mix,
      ioBytes: cfg.bs,
      queueDepth: cfg.qd,
      seed: cfg.seed,
      verify: cfg.verify,
      reconnect: cfg.reconnect,
      signal: stop.signal,
      onMeasure: (edge) => {
        if (pid === undefined) return;
        const now = processCpuSeconds(pid);
        if (edge === 'start') targetCpu0 = now;
        else if (now !== undefined && targetCpu0 !== undefined) targetCpu = now - targetCpu0;
      },
    };
    if (cfg.seconds !== undefined) options.seconds = cfg.seconds;
    if (cfg.ios !== undefined) options.ios = cfg.ios;
    if (cfg.size !== undefined) options.regionBytes = cfg.size;
    checkAgainstDevice(cfg, ctrl, dev, options);
    if (progress.enabled) {
      options.onProgress = (p) => progress.update(progressText(p, last));
      if (cfg.api === 'native') {
        const limit = cfg.seconds !== undefined ? `${cfg.seconds} s` : `${cfg.ios} requests`;
        progress.update(`run: native load for ${limit} (no progress until it ends)`);
      }
    }
    let result: WorkloadResult;
    let workers: WorkerSummary[] | undefined;
    if (cfg.workers === 1) {
      result = await runWorkload(ctrl, dev, options);
    } else {
      // The scan opened this thread's request queue, and it does no I/O from now on: giving it
      // back leaves the target's queues (one per worker by default) to the workers.
      ctrl.rawChannel().channel.close();
      ({ result, workers } = await runWorkers(ctrl, dev, options, cfg.workers));
    }
    progress.clear();
    const rep = report(result, dev, ctrl.info.transport, targetCpu, workers, cfg.interrupts, reconnects);
    if (cfg.json) writeJsonLine(rep);
    else process.stdout.write(summary(rep, result));
    if (result.interrupted) return 128 + (stop.signal.reason === 'SIGTERM' ? 15 : 2);
    return result.errors > 0 || result.mismatches > 0 ? 1 : 0;
  } finally {
    progress.clear();
    await Promise.all(attached.map((c) => c.close()));
    if (targetProcess) {
      // A target that ended on its own during the run is worth knowing about.
      const early = targetProcess.status;
      if (early !== undefined) {
        process.stderr.write(
          `the bundled target ended during the run (code ${early.code}, signal ${early.signal}):\n${targetProcess.log}\n`,
        );
      }
      await targetProcess.stop();
    }
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  }
}

/** What depends on the device and the controller is still a bad argument (exit 2). */
function checkAgainstDevice(cfg: BenchConfig, ctrl: Controller, dev: BlockDevice, o: WorkloadOptions): void {
  const problem = workloadProblem(ctrl, dev, o, cfg.workers);
  if (problem === undefined) return;
  if (problem.option === 'regionBytes' && cfg.size === undefined) {
    throw new UsageError(`--verify over all of ${dev.name}: expected ${problem.expected} (give --size)`);
  }
  const [flag, value] = {
    ioBytes: ['bs', formatSize(cfg.bs)],
    queueDepth: ['qd', String(cfg.qd)],
    regionBytes: ['size', formatSize(cfg.size ?? 0)],
    verify: ['verify', ''],
    seconds: ['time', String(cfg.seconds)],
    ios: ['ios', String(cfg.ios)],
    workers: ['workers', String(cfg.workers)],
  }[problem.option];
  throw bad(flag!, value!, problem.expected);
}

export const bench: Subcommand = {
  async run(argv: string[]): Promise<number> {
    const cfg = parseBenchArgs(argv);
    if (cfg === 'help') {
      process.stdout.write(HELP);
      return 0;
    }
    if (cfg.logLevel !== undefined) setLogLevel(cfg.logLevel);
    // First signal: stop issuing, let what is in flight complete, report. Second: leave now.
    const stop = new AbortController();
    const leftovers: Leftovers = {};
    const onSignal = (signal: NodeJS.Signals): void => {
      if (stop.signal.aborted) {
        process.stderr.write(`\nvirtio-initiator bench: ${signal} again, exiting\n`);
        // The target removes its socket on SIGTERM; the directory goes with it.
        leftovers.target?.child.kill('SIGTERM');
        if (leftovers.dir !== undefined) rmSync(leftovers.dir, { recursive: true, force: true });
        process.exit(128 + (signal === 'SIGTERM' ? 15 : 2));
      }
      stop.abort(signal);
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    try {
      return await run(cfg, stop, leftovers);
    } finally {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    }
  },
};
