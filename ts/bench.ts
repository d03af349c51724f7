// The load generator behind `virtio-initiator bench` and the demo: one block device driven at a
// fixed queue depth through one of three paths, with latency, CPU and (optionally) data
// verification.
//
//   promise  BlockDevice.read / write, one DMA buffer per in-flight slot, each completion
//            issuing the slot's next request from its callback;
//   batch    packed records through the native channel from JavaScript (ts/records.ts), no
//            Promise per request, spinning on `pump` and yielding to the event loop now and then;
//   native   the channel's own load loop (`runLoad`), no JavaScript per request at all.
//
// Verification stamps every written block with its LBA, a generation and the seed, followed by a
// pattern derived from the three; reads of blocks written in this run are checked against what
// was last written there. No two requests in flight touch the same unit (one --bs sized, aligned
// piece of the region), so the expected contents are always known.
//
// Several loads can run at once, one per worker thread (`bench --workers`): `workloadShare` gives
// each its own contiguous region and its part of the request count, `onReady` lets them start
// together, and `mergeWorkloadResults` adds up what they did (latency histograms included).

import { performance } from 'node:perf_hooks';

import type { BlockDevice } from './block-device.js';
import type { Controller } from './controller.js';
import { ClosedError, ControllerFailedError } from './errors.js';
import { CompletionReader, RecordWriter } from './records.js';
import { ScsiStatus, SenseKey, senseKeyOf } from './scsi/index.js';

export const APIS = ['promise', 'batch', 'native'] as const;
export type Api = (typeof APIS)[number];

export const READ_WRITE_MODES = ['randread', 'randwrite', 'read', 'write', 'randrw'] as const;
export type ReadWrite = (typeof READ_WRITE_MODES)[number];

/** Share of reads (percent) of a mode; `mix` only matters for randrw. */
export function readPercentOf(rw: ReadWrite, mix = 50): number {
  if (rw === 'randread' || rw === 'read') return 100;
  if (rw === 'randwrite' || rw === 'write') return 0;
  return mix;
}

export function isRandom(rw: ReadWrite): boolean {
  return rw.startsWith('rand');
}

// ---- latency -----------------------------------------------------------------------------------

export interface LatencySummary {
  mean: number;
  p50: number;
  p99: number;
  p999: number;
  max: number;
}

/** Below this many nanoseconds every nanosecond has a bucket of its own. */
const LINEAR_NS = 128;
/** Sub-buckets per power of two above that: values are kept within 1/128 of their size. */
const SUB_BUCKETS = 64;
const OCTAVES = 32 - 7;
const MAX_NS = 0xffffffff;

/** A histogram as plain data: what a worker thread sends back (structured clone keeps it). */
export interface LatencyHistogramState {
  counts: Float64Array;
  count: number;
  sum: number;
  max: number;
}

const BUCKETS = LINEAR_NS + OCTAVES * SUB_BUCKETS;

/**
 * Log-linear latency histogram in nanoseconds (up to 4.29 s; beyond that the value lands in the
 * last bucket, the mean and maximum stay exact). Fixed size, nothing allocated per sample.
 */
export class LatencyHistogram {
  private readonly counts = new Float64Array(BUCKETS);
  count = 0;
  /** Microseconds. */
  sum = 0;
  /** Microseconds. */
  max = 0;

  add(us: number): void {
    this.count++;
    this.sum += us;
    if (us > this.max) this.max = us;
    const ns = us >= MAX_NS / 1000 ? MAX_NS : (us * 1000) >>> 0;
    let i: number;
    if (ns < LINEAR_NS) {
      i = ns;
    } else {
      const e = 31 - Math.clz32(ns);
      i = LINEAR_NS + (e - 7) * SUB_BUCKETS + ((ns >>> (e - 6)) & (SUB_BUCKETS - 1));
    }
    this.counts[i]!++;
  }

  /** The value (microseconds) below which a share `q` of the samples lie. */
  percentile(q: number): number {
    if (this.count === 0) return 0;
    const rank = Math.max(1, Math.ceil(q * this.count));
    let seen = 0;
    const counts = this.counts;
    for (let i = 0; i < counts.length; i++) {
      seen += counts[i]!;
      if (seen >= rank) return Math.min(this.max, bucketMiddleNs(i) / 1000);
    }
    return this.max;
  }

  /** A copy of the histogram as plain data. */
  state(): LatencyHistogramState {
    return { counts: this.counts.slice(), count: this.count, sum: this.sum, max: this.max };
  }

  /** Adds the samples of another histogram (of another thread, say) to this one. */
  merge(other: LatencyHistogram | LatencyHistogramState): this {
    const s = other instanceof LatencyHistogram ? other.state() : other;
    if (s.counts.length !== BUCKETS) throw new RangeError(`a latency histogram has ${BUCKETS} buckets, not ${s.counts.length}`);
    for (let i = 0; i < BUCKETS; i++) this.counts[i]! += s.counts[i]!;
    this.count += s.count;
    this.sum += s.sum;
    if (s.max > this.max) this.max = s.max;
    return this;
  }

  static from(state: LatencyHistogramState): LatencyHistogram {
    return new LatencyHistogram().merge(state);
  }

  summary(): LatencySummary {
    const round = (x: number) => Math.round(x * 10) / 10;
    return {
      mean: round(this.count === 0 ? 0 : this.sum / this.count),
      p50: round(this.percentile(0.5)),
      p99: round(this.percentile(0.99)),
      p999: round(this.percentile(0.999)),
      max: round(this.max),
    };
  }
}

function bucketMiddleNs(i: number): number {
  if (i < LINEAR_NS) return i;
  const e = Math.floor((i - LINEAR_NS) / SUB_BUCKETS) + 7;
  const width = 2 ** (e - 6);
  return (SUB_BUCKETS + ((i - LINEAR_NS) % SUB_BUCKETS)) * width + width / 2;
}

// ---- offsets -----------------------------------------------------------------------------------

/** xorshift32: cheap and repeatable from a seed. */
export class Xorshift32 {
  private x: number;
  constructor(seed: number) {
    this.x = seed >>> 0 || 0x9e3779b9;
  }
  next(): number {
    let x = this.x;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (this.x = x >>> 0);
  }
}

// ---- verification ------------------------------------------------------------------------------

/** First word of every stamped block ("VIBV" in memory order on little-endian machines). */
const STAMP_MAGIC = 0x56424956;
/** Words of the stamp before the pattern: magic, LBA low, LBA high, generation, seed. */
const STAMP_WORDS = 5;
/** Generation of a block whose last write failed: its contents are not known. */
const UNKNOWN = 0xffffffff;
/** Distinct mismatching LBAs remembered (all are counted). */
const MISMATCHES_KEPT = 100_000;
const TWO_32 = 0x1_0000_0000;

function patternSeed(lba: number, gen: number, seed: number): number {
  let h = Math.imul((lba % TWO_32) ^ Math.imul(Math.floor(lba / TWO_32), 0x85ebca6b), 0x9e3779b1);
  h ^= Math.imul(gen, 0xc2b2ae35) ^ Math.imul(seed, 0x27d4eb2f);
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d);
  h ^= h >>> 15;
  return h | 0 || 1;
}

function stampBlock(words: Uint32Array, off: number, n: number, lba: number, gen: number, seed: number): void {
  words[off] = STAMP_MAGIC;
  words[off + 1] = lba % TWO_32;
  words[off + 2] = Math.floor(lba / TWO_32);
  words[off + 3] = gen;
  words[off + 4] = seed;
  let x = patternSeed(lba, gen, seed);
  for (let i = STAMP_WORDS; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[off + i] = x;
  }
}

/** Index of the first word that differs from the stamp, or -1. */
function checkBlock(words: Uint32Array, off: number, n: number, lba: number, gen: number, seed: number): number {
  if (words[off] !== STAMP_MAGIC) return 0;
  if (words[off + 1] !== lba % TWO_32) return 1;
  if (words[off + 2] !== Math.floor(lba / TWO_32)) return 2;
  if (words[off + 3] !== gen) return 3;
  if (words[off + 4] !== seed) return 4;
  let x = patternSeed(lba, gen, seed);
  for (let i = STAMP_WORDS; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    if (words[off + i] !== x >>> 0) return i;
  }
  return -1;
}

function hex(x: number): string {
  return `0x${(x >>> 0).toString(16).padStart(8, '0')}`;
}

/** The words of a buffer (DMA buffers are page aligned; others are checked). */
export function wordsOf(buf: Uint8Array): Uint32Array {
  if (buf.byteOffset % 4 !== 0 || buf.byteLength % 4 !== 0) {
    throw new RangeError('a verified buffer must be 4-byte aligned and a multiple of 4 bytes long');
  }
  return new Uint32Array(buf.buffer, buf.byteOffset, buf.byteLength >>> 2);
}

export interface Mismatch {
  /** First LBA of the unit (one --bs sized request) that read back wrong. */
  lba: number;
  /** What was wrong with its first bad block. */
  detail: string;
}

/** What every block of the region should hold, and what did not. LBAs are the device's own. */
export class Verifier {
  /**
   * Per block of the region (from `firstLba`): generation last written (0 never written in this
   * run, UNKNOWN after a failed write).
   */
  private readonly gens: Uint32Array;
  private nextGen = 1;
  private readonly wordsPerBlock: number;
  /** Units that read back wrong (all of them, counting repeats). */
  mismatches = 0;
  private readonly found = new Map<number, string>();

  constructor(
    readonly blockSize: number,
    readonly regionBlocks: number,
    readonly seed: number,
    /** First block of the region. */
    readonly firstLba = 0,
  ) {
    this.gens = new Uint32Array(regionBlocks);
    this.wordsPerBlock = blockSize >>> 2;
  }

  /** Fills `blocks` blocks of `words` from word `wordOffset` for a write at `lba`; returns the generation. */
  stamp(words: Uint32Array, wordOffset: number, lba: number, blocks: number): number {
    const gen = this.nextGen;
    this.nextGen = gen + 1 >= UNKNOWN ? 1 : gen + 1;
    const n = this.wordsPerBlock;
    for (let b = 0; b < blocks; b++) stampBlock(words, wordOffset + b * n, n, lba + b, gen, this.seed);
    return gen;
  }

  /** A write of `gen` over the blocks ended: they hold it now, or (when it failed) nobody knows. */
  written(lba: number, blocks: number, gen: number, ok: boolean): void {
    const i = lba - this.firstLba;
    this.gens.fill(ok ? gen : UNKNOWN, i, i + blocks);
  }

  /** Whether any block of the range was written in this run. */
  anyWritten(lba: number, blocks: number): boolean {
    const g = this.gens;
    const from = lba - this.firstLba;
    for (let i = from; i < from + blocks; i++) if (g[i] !== 0 && g[i] !== UNKNOWN) return true;
    return false;
  }

  /**
   * Checks a read of one unit at `lba` held in `words` from `wordOffset`; blocks never written
   * (or whose last write failed) are skipped. Returns false on a mismatch, which it records.
   */
  check(words: Uint32Array, wordOffset: number, lba: number, blocks: number): boolean {
    const n = this.wordsPerBlock;
    const gens = this.gens;
    const from = lba - this.firstLba;
    for (let b = 0; b < blocks; b++) {
      const gen = gens[from + b]!;
      if (gen === 0 || gen === UNKNOWN) continue;
      const off = wordOffset + b * n;
      const bad = checkBlock(words, off, n, lba + b, gen, this.seed);
      if (bad < 0) continue;
      this.mismatches++;
      if (!this.found.has(lba) && this.found.size < MISMATCHES_KEPT) {
        this.found.set(lba, this.describe(words, off, bad, lba, lba + b, gen));
      }
      return false;
    }
    return true;
  }

  /** Distinct mismatching units, by LBA. */
  list(): Mismatch[] {
    return [...this.found.entries()].sort((a, b) => a[0] - b[0]).map(([lba, detail]) => ({ lba, detail }));
  }

  private describe(words: Uint32Array, off: number, bad: number, unitLba: number, lba: number, gen: number): string {
    const where = lba === unitLba ? '' : `block ${lba}: `;
    if (bad >= STAMP_WORDS) return `${where}data differs from byte ${bad * 4} on (generation ${gen})`;
    if (words[off] !== STAMP_MAGIC) {
      return `${where}stamp damaged: first word ${hex(words[off]!)} instead of ${hex(STAMP_MAGIC)} (generation ${gen})`;
    }
    const foundLba = words[off + 1]! + words[off + 2]! * TWO_32;
    return (
      `${where}stamp of LBA ${foundLba} generation ${words[off + 3]} seed ${words[off + 4]}, ` +
      `expected LBA ${lba} generation ${gen} seed ${this.seed}`
    );
  }
}

// ---- the run -----------------------------------------------------------------------------------

export type Phase = 'fill' | 'run' | 'read-back';

export interface Progress {
  phase: Phase;
  /** Requests completed in this phase. */
  ios: number;
  bytes: number;
  elapsedSeconds: number;
  /** Seconds left when the phase is timed, else undefined. */
  remainingSeconds: number | undefined;
  /** Share done (0..1) when known from a request count or a region size. */
  fraction: number | undefined;
}

/** The request queue a load runs on. */
export interface QueueInfo {
  /** Virtqueue index (2 is the first request queue; 0 when unknown). */
  queue: number;
  /** Whether other threads use the same queue. */
  shared: boolean;
}

export interface WorkloadOptions {
  api: Api;
  rw: ReadWrite;
  /** Read share in percent for randrw (default 50). */
  mix?: number;
  /** Bytes per request, a multiple of the block size. */
  ioBytes: number;
  queueDepth: number;
  /** Stop issuing after this long ... */
  seconds?: number;
  /** ... or after this many requests, whichever comes first (at least one of the two). */
  ios?: number;
  seed?: number;
  verify?: boolean;
  /** First block of the region the load touches (default 0; the native path starts at 0 only). */
  firstLba?: number;
  /** Bytes of the device, from `firstLba`, that the load touches (default: all up to the end). */
  regionBytes?: number;
  /**
   * Which of several loads run at once this is (default 0): varies the offsets and read/write
   * choices, so that loads given one seed do not walk in step. Data stamps keep `seed`.
   */
  stream?: number;
  /** Called about every `progressMs` (default 250) while a phase runs (not for `native`). */
  onProgress?: (p: Progress) => void;
  progressMs?: number;
  /**
   * Awaited once the load is set up (buffers, the fill pass, its request queue open), right
   * before the measured phase: lets several loads start together.
   */
  onReady?: (queue: QueueInfo) => void | Promise<void>;
  /** Called right before and right after the measured phase (for outside CPU accounting). */
  onMeasure?: (edge: 'start' | 'end') => void;
  /** Stops issuing; requests in flight complete and the result covers what ran. */
  signal?: AbortSignal;
  /**
   * The controller reconnects when its target goes away (vhost-user `reconnect`; the promise and
   * batch paths): a request that ends with the connection counts as lost, not as an error, and
   * its slot waits until the controller works again. What such a write left on its blocks is
   * unknown, so verification skips them until they are written again.
   */
  reconnect?: boolean;
}

export interface WorkloadResult {
  api: Api;
  rw: ReadWrite;
  readPercent: number;
  ioBytes: number;
  queueDepth: number;
  /** The region the load touched: its first block and its size. */
  firstLba: number;
  regionBytes: number;
  seed: number;
  verify: boolean;
  /** When the measured phase began, in milliseconds since the epoch (comparable across threads). */
  startedAt: number;
  /** Wall time of the measured phase. */
  seconds: number;
  ios: number;
  reads: number;
  writes: number;
  errors: number;
  /** Message of the first failed request. */
  firstError: string | undefined;
  iops: number;
  /** 10^6 bytes per second. */
  mbPerSecond: number;
  latencyUs: LatencySummary;
  /** Every request's latency, for merging. */
  latencyHistogram: LatencyHistogramState;
  /** CPU seconds this process (for native: the load's thread) used in the measured phase. */
  cpuSeconds: number;
  /** Reads of a unit that returned other data than was last written there. */
  mismatches: number;
  /** Distinct units that did, by LBA (up to 100 000). */
  mismatchList: Mismatch[];
  /** Virtqueue index of the request queue the load ran on (2 is the first; 0 when unknown). */
  queue: number;
  /** Other threads used that queue too (seen at the start or the end of the measured phase). */
  shared: boolean;
  /** Stopped early through `signal`. */
  interrupted: boolean;
  /** Requests that ended because the target went away (with `reconnect`). */
  lost: number;
}

/** A request that takes this long means the target is stuck or gone. */
const STALL_MS = 10_000;
/** With `reconnect`: the longest wait for a controller to work again, and how often to look. */
const RECONNECT_WAIT_MS = 60_000;
const RECONNECT_POLL_MS = 20;
/** Loop turns of the batch path between two yields to the event loop. */
const BATCH_YIELD_EVERY = 4096;
/** Fill and read-back: bytes per request and requests in flight. */
const PASS_CHUNK_BYTES = 256 * 1024;
const PASS_DEPTH = 8;
/** Blocks verification keeps state for (4 bytes each). */
const MAX_VERIFIED_BLOCKS = 2 ** 26;
/** TEST UNIT READY: opens this thread's request queue without moving data. */
const TEST_UNIT_READY = new Uint8Array(6);
/** Spreads stream numbers over the seeds of the random streams. */
const STREAM_STRIDE = 0x9e3779b9;

const NO_OPTIONS = Object.freeze({});

function message(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** Errors after which no request can succeed any more: the run stops. */
function fatal(e: unknown): boolean {
  return e instanceof ClosedError || e instanceof ControllerFailedError;
}

/** An option that does not fit the device or the controller, and what it should be. */
export interface WorkloadProblem {
  option: 'ioBytes' | 'queueDepth' | 'regionBytes' | 'verify' | 'seconds' | 'ios' | 'workers';
  expected: string;
}

/**
 * Checks the options against this device and controller, for one load or for `workers` loads
 * sharing the region (see `workloadShare`); undefined when they fit.
 */
export function workloadProblem(
  ctrl: Controller,
  dev: BlockDevice,
  o: WorkloadOptions,
  workers = 1,
): WorkloadProblem | undefined {
  const bs = dev.blockSize;
  const name = dev.name;
  if (!Number.isSafeInteger(o.ioBytes) || o.ioBytes < bs || o.ioBytes % bs !== 0) {
    return { option: 'ioBytes', expected: `a multiple of the ${bs}-byte blocks of ${name}` };
  }
  const info = ctrl.info;
  const capacity = info.queueSize;
  if (!Number.isInteger(o.queueDepth) || o.queueDepth < 1 || o.queueDepth > capacity) {
    return { option: 'queueDepth', expected: `at most ${capacity}, the size of the request queue` };
  }
  const size = Number(dev.info.sizeBytes) - (o.firstLba ?? 0) * bs;
  const region = regionOf(dev, o);
  if (region < o.ioBytes) {
    return o.regionBytes !== undefined && o.regionBytes < size
      ? { option: 'regionBytes', expected: `room for at least one ${o.ioBytes}-byte request` }
      : { option: 'ioBytes', expected: `at most the ${size} bytes of ${name}` };
  }
  const units = Math.floor(region / o.ioBytes);
  if (workers > 1) {
    if (o.api === 'native' && workers > info.requestQueues) {
      const why = 'the native load loop needs a request queue of its own';
      return { option: 'workers', expected: `at most ${info.requestQueues}, the request queues of ${ctrl.name} (${why})` };
    }
    if (o.api !== 'native' && workers > units) {
      return { option: 'workers', expected: `at most ${units}, one ${o.ioBytes}-byte unit of the region each` };
    }
    if (o.ios !== undefined && o.ios < workers) {
      return { option: 'ios', expected: `at least one request per worker (${workers})` };
    }
  }
  if (o.verify === true) {
    if (o.api === 'native') return { option: 'verify', expected: 'the promise or batch path (not native)' };
    // Each worker verifies a region of its own: the smallest one counts.
    const perWorker = Math.floor(units / workers);
    if (perWorker <= o.queueDepth) {
      const whose = workers > 1 ? "each worker's" : 'the';
      return {
        option: 'queueDepth',
        expected: `fewer than the ${perWorker} units of ${o.ioBytes} bytes that verification spreads ${whose} requests over`,
      };
    }
    // 4 bytes of state per block.
    if (region / bs > MAX_VERIFIED_BLOCKS) {
      const most = `at most ${MAX_VERIFIED_BLOCKS * bs} bytes (${MAX_VERIFIED_BLOCKS} blocks) to verify`;
      return { option: 'regionBytes', expected: most };
    }
  }
  const maxTransfer = dev.info.limits.maxTransferBlocks * bs;
  if (o.api !== 'promise' && o.ioBytes > maxTransfer) {
    return { option: 'ioBytes', expected: `at most ${maxTransfer} bytes (the transfer limit of ${name}) on the ${o.api} path` };
  }
  if (o.seconds === undefined && o.ios === undefined) return { option: 'seconds', expected: 'a time or a request count' };
  return undefined;
}

function regionOf(dev: BlockDevice, o: WorkloadOptions): number {
  const size = Number(dev.info.sizeBytes) - (o.firstLba ?? 0) * dev.blockSize;
  const region = o.regionBytes === undefined ? size : Math.min(size, o.regionBytes);
  return Math.max(0, region - (region % o.ioBytes));
}

/**
 * The share of load `index` of `workers` run at once: a contiguous region of its own (whole
 * `ioBytes` units, so that with verification no two requests in flight anywhere touch the same
 * block), its part of `ios`, and a random stream of its own. Its callbacks are those of `o`.
 */
export function workloadShare(dev: BlockDevice, o: WorkloadOptions, index: number, workers: number): WorkloadOptions {
  const share: WorkloadOptions = { ...o, stream: (o.stream ?? 0) + index };
  if (o.ios !== undefined) share.ios = Math.floor(o.ios / workers) + (index < o.ios % workers ? 1 : 0);
  const region = regionOf(dev, o);
  const first = o.firstLba ?? 0;
  const units = region / o.ioBytes;
  const from = Math.floor((index * units) / workers);
  const to = Math.floor(((index + 1) * units) / workers);
  share.firstLba = first + from * (o.ioBytes / dev.blockSize);
  share.regionBytes = (to - from) * o.ioBytes;
  return share;
}

/** Runs the workload on `dev` (a device of `ctrl`); see WorkloadOptions. */
export async function runWorkload(ctrl: Controller, dev: BlockDevice, o: WorkloadOptions): Promise<WorkloadResult> {
  const firstLba = o.firstLba ?? 0;
  if (!Number.isSafeInteger(firstLba) || firstLba < 0 || firstLba >= Number(dev.blockCount)) {
    const last = dev.blockCount - 1n;
    throw new RangeError(`${dev.name}: firstLba ${String(o.firstLba)}: expected a block of the device (0 to ${last})`);
  }
  const problem = workloadProblem(ctrl, dev, o);
  if (problem !== undefined) {
    const { option } = problem;
    // One load: never a problem with the number of workers.
    const value = option === 'workers' ? 1 : o[option];
    throw new RangeError(`${dev.name}: ${option} ${String(value)}: expected ${problem.expected}`);
  }
  const load = new Load(dev, o, firstLba, regionOf(dev, o));
  const verifier = load.verifier;
  if (verifier && load.readPercent === 100) await pass(dev, load, 'fill');
  // The queue is opened before the measured phase: not timed, and held by the time `onReady`
  // resolves, so that loads started together see which of them share a queue.
  const path = await openPath(ctrl, dev, o.api);
  let measured: Measured;
  let shared: boolean;
  try {
    await o.onReady?.({ queue: path.queueIndex(), shared: path.shared() });
    shared = path.shared();
    if (path.raw !== undefined && o.api === 'native') {
      measured = runNative(path.raw, dev, load);
    } else {
      const cpu0 = process.cpuUsage();
      o.onMeasure?.('start');
      const stopProgress = load.startProgress();
      try {
        if (path.raw !== undefined) await runBatch(path.raw, ctrl, dev, load);
        else await runPromise(ctrl, dev, load);
      } finally {
        stopProgress();
      }
      o.onMeasure?.('end');
      const cpu = process.cpuUsage(cpu0);
      measured = { cpuSeconds: (cpu.user + cpu.system) / 1e6, startedAt: performance.timeOrigin + load.t0 };
    }
    shared ||= path.shared();
    measured.queue = path.queueIndex();
  } finally {
    path.close();
  }
  const seconds = Math.max(1e-9, (load.lastCompletion - load.t0) / 1000);
  const result: WorkloadResult = {
    api: o.api,
    rw: o.rw,
    readPercent: load.readPercent,
    ioBytes: o.ioBytes,
    queueDepth: o.queueDepth,
    firstLba,
    regionBytes: load.regionBytes,
    seed: load.seed,
    verify: verifier !== undefined,
    startedAt: measured.startedAt,
    seconds: measured.seconds ?? seconds,
    ios: measured.ios ?? load.done,
    reads: measured.reads ?? load.reads,
    writes: measured.writes ?? load.writes,
    errors: measured.errors ?? load.errors,
    firstError: load.firstError,
    iops: 0,
    mbPerSecond: 0,
    latencyUs: measured.latencyUs ?? load.latency.summary(),
    latencyHistogram: measured.latencyHistogram ?? load.latency.state(),
    cpuSeconds: measured.cpuSeconds,
    mismatches: 0,
    mismatchList: [],
    queue: measured.queue ?? 0,
    shared,
    interrupted: o.signal?.aborted === true,
    lost: load.lost,
  };
  rates(result);
  // A run without reads still checks what it wrote.
  if (verifier && load.readPercent === 0 && !load.fatalError && o.signal?.aborted !== true) {
    await pass(dev, load, 'read-back');
  }
  if (verifier) {
    result.mismatches = verifier.mismatches;
    result.mismatchList = verifier.list();
  }
  if (load.fatalError !== undefined) throw load.fatalError;
  return result;
}

function rates(r: WorkloadResult): void {
  r.iops = Math.round(r.ios / r.seconds);
  r.mbPerSecond = Math.round(((r.ios * r.ioBytes) / r.seconds / 1e6) * 100) / 100;
}

/**
 * One result for loads that ran at once (see `workloadShare`): requests, errors and mismatches
 * add up; the time runs from the first start to the last completion; latency percentiles come
 * from the merged histograms (the native loop keeps the same histogram as JavaScript does).
 * `cpuSeconds` is the process's CPU over the run, measured by the caller.
 */
export function mergeWorkloadResults(parts: readonly WorkloadResult[], cpuSeconds: number): WorkloadResult {
  const first = parts[0];
  if (first === undefined) throw new RangeError('no results to merge');
  const sum = (f: (r: WorkloadResult) => number): number => parts.reduce((n, r) => n + f(r), 0);
  const startedAt = Math.min(...parts.map((r) => r.startedAt));
  const endedAt = Math.max(...parts.map((r) => r.startedAt + r.seconds * 1000));
  const h = new LatencyHistogram();
  for (const r of parts) h.merge(r.latencyHistogram);
  // Shares are disjoint and contiguous.
  const result: WorkloadResult = {
    ...first,
    firstLba: Math.min(...parts.map((r) => r.firstLba)),
    regionBytes: sum((r) => r.regionBytes),
    startedAt,
    seconds: Math.max(1e-9, (endedAt - startedAt) / 1000),
    ios: sum((r) => r.ios),
    reads: sum((r) => r.reads),
    writes: sum((r) => r.writes),
    errors: sum((r) => r.errors),
    firstError: parts.find((r) => r.firstError !== undefined)?.firstError,
    latencyUs: h.summary(),
    latencyHistogram: h.state(),
    cpuSeconds,
    mismatches: sum((r) => r.mismatches),
    mismatchList: parts.flatMap((r) => r.mismatchList).sort((a, b) => a.lba - b.lba),
    shared: parts.some((r) => r.shared),
    interrupted: parts.some((r) => r.interrupted),
    lost: sum((r) => r.lost),
  };
  rates(result);
  return result;
}

interface Measured {
  cpuSeconds: number;
  startedAt: number;
  queue?: number;
  seconds?: number;
  ios?: number;
  reads?: number;
  writes?: number;
  errors?: number;
  latencyUs?: LatencySummary;
  latencyHistogram?: LatencyHistogramState;
}

type RawChannel = ReturnType<Controller['rawChannel']>;

/** Where the measured phase sends its requests. */
interface RequestPath {
  /** The raw channel (batch, native); undefined for promise, which uses the thread's queue. */
  raw: RawChannel | undefined;
  queueIndex(): number;
  shared(): boolean;
  close(): void;
}

async function openPath(ctrl: Controller, dev: BlockDevice, api: Api): Promise<RequestPath> {
  if (api !== 'promise') {
    const raw = ctrl.rawChannel();
    return {
      raw,
      queueIndex: () => raw.channel.queueIndex,
      shared: () => raw.channel.shared,
      close: () => raw.channel.close(),
    };
  }
  if (ctrl.queueStats === undefined) {
    // The thread's queue opens with its first command (virtio-blk has no TEST UNIT READY: a
    // read of one block). Whether it succeeds does not matter: a device that fails it fails
    // the run's requests too, and they report it.
    const first = dev.deviceType === 'blk' ? dev.read(0, 1) : dev.passthrough(TEST_UNIT_READY);
    await first.catch(() => undefined);
  }
  return {
    raw: undefined,
    queueIndex: () => ctrl.queueStats?.queueIndex ?? 0,
    shared: () => ctrl.queueStats?.shared ?? false,
    close: () => {},
  };
}

/** The state of one run: per-slot requests, counters, latency, and the verifier. */
class Load {
  readonly readPercent: number;
  readonly random: boolean;
  readonly seed: number;
  readonly blockSize: number;
  readonly unitBlocks: number;
  readonly units: number;
  readonly depth: number;
  readonly iosLimit: number;
  readonly verifier: Verifier | undefined;
  /** Per slot. */
  readonly lba: Float64Array;
  readonly isWrite: Uint8Array;
  readonly gen: Uint32Array;
  readonly started: Float64Array;
  readonly buffers: Buffer[] = [];
  readonly words: Uint32Array[] = [];
  /** Per unit, with verification: a request on it is in flight. */
  private readonly busy: Uint8Array | undefined;
  private readonly offsets: Xorshift32;
  private readonly ops: Xorshift32;
  private sequential = 0;

  t0 = 0;
  end = Infinity;
  lastCompletion = 0;
  issued = 0;
  done = 0;
  reads = 0;
  writes = 0;
  errors = 0;
  lost = 0;
  bytes = 0;
  firstError: string | undefined;
  fatalError: unknown;
  readonly latency = new LatencyHistogram();

  constructor(
    readonly dev: BlockDevice,
    readonly o: WorkloadOptions,
    /** First block of the region, and its size. */
    readonly firstLba: number,
    readonly regionBytes: number,
  ) {
    this.readPercent = readPercentOf(o.rw, o.mix);
    this.random = isRandom(o.rw);
    this.seed = (o.seed ?? 1) >>> 0;
    this.blockSize = dev.blockSize;
    this.unitBlocks = o.ioBytes / dev.blockSize;
    this.units = regionBytes / o.ioBytes;
    this.depth = o.ios === undefined ? o.queueDepth : Math.min(o.queueDepth, o.ios);
    this.iosLimit = o.ios ?? Infinity;
    // Stream 0 keeps the sequences a single load has always had.
    const stream = Math.imul(o.stream ?? 0, STREAM_STRIDE);
    this.offsets = new Xorshift32(this.seed ^ 0x5bd1e995 ^ stream);
    this.ops = new Xorshift32(this.seed ^ 0x1b873593 ^ stream);
    const n = o.queueDepth;
    this.lba = new Float64Array(n);
    this.isWrite = new Uint8Array(n);
    this.gen = new Uint32Array(n);
    this.started = new Float64Array(n);
    if (o.verify === true) {
      this.verifier = new Verifier(dev.blockSize, regionBytes / dev.blockSize, this.seed, firstLba);
      this.busy = new Uint8Array(this.units);
    }
    if (o.api !== 'native') {
      for (let s = 0; s < n; s++) {
        const buf = dev.allocBuffer(o.ioBytes);
        this.buffers.push(buf);
        if (this.verifier) this.words.push(wordsOf(buf));
      }
    }
  }

  begin(): void {
    this.t0 = performance.now();
    this.lastCompletion = this.t0;
    if (this.o.seconds !== undefined) this.end = this.t0 + this.o.seconds * 1000;
  }

  /** Whether a slot that just finished gets another request. */
  more(now: number): boolean {
    return this.issued < this.iosLimit && now < this.end && this.fatalError === undefined && this.o.signal?.aborted !== true;
  }

  /** Chooses the slot's next request; with verification, claims its unit and stamps write data. */
  prepare(slot: number): void {
    this.issued++;
    const rp = this.readPercent;
    const write = rp === 0 || (rp < 100 && this.ops.next() % 100 >= rp);
    let unit = this.random ? this.offsets.next() % this.units : this.sequential++ % this.units;
    const busy = this.busy;
    if (busy !== undefined) {
      for (let tries = 0; busy[unit] === 1; tries++) {
        // Fewer units are busy than exist (checked up front): a free one is always near.
        unit = this.random && tries < 64 ? this.offsets.next() % this.units : (unit + 1) % this.units;
      }
      busy[unit] = 1;
    }
    const lba = this.firstLba + unit * this.unitBlocks;
    this.lba[slot] = lba;
    this.isWrite[slot] = write ? 1 : 0;
    if (write && this.verifier) this.gen[slot] = this.verifier.stamp(this.words[slot]!, 0, lba, this.unitBlocks);
  }

  /** A request of the slot ended at `now`. */
  finish(slot: number, ok: boolean, now: number): void {
    this.done++;
    this.lastCompletion = now;
    this.latency.add((now - this.started[slot]!) * 1000);
    const write = this.isWrite[slot] === 1;
    if (write) this.writes++;
    else this.reads++;
    if (ok) this.bytes += this.o.ioBytes;
    else this.errors++;
    const v = this.verifier;
    if (v !== undefined) {
      const lba = this.lba[slot]!;
      if (write) v.written(lba, this.unitBlocks, this.gen[slot]!, ok);
      else if (ok) v.check(this.words[slot]!, 0, lba, this.unitBlocks);
      this.busy![(lba - this.firstLba) / this.unitBlocks] = 0;
    }
  }

  failed(e: unknown): void {
    this.firstError ??= message(e);
    if (fatal(e)) this.fatalError ??= e;
  }

  /** A request of the slot ended because the target went away (see `reconnect`). */
  lose(slot: number): void {
    this.lost++;
    const v = this.verifier;
    if (v !== undefined) {
      const lba = this.lba[slot]!;
      if (this.isWrite[slot] === 1) v.written(lba, this.unitBlocks, this.gen[slot]!, false);
      this.busy![(lba - this.firstLba) / this.unitBlocks] = 0;
    }
  }

  /** Starts the progress timer of the run; returns its stop function. */
  startProgress(): () => void {
    const cb = this.o.onProgress;
    if (cb === undefined) return () => {};
    const timer = setInterval(() => {
      const now = performance.now();
      cb({
        phase: 'run',
        ios: this.done,
        bytes: this.bytes,
        elapsedSeconds: (now - this.t0) / 1000,
        remainingSeconds: Number.isFinite(this.end) ? Math.max(0, (this.end - now) / 1000) : undefined,
        fraction: Number.isFinite(this.iosLimit) ? Math.min(1, this.done / this.iosLimit) : undefined,
      });
    }, this.o.progressMs ?? 250);
    return () => clearInterval(timer);
  }
}

/** UNIT ATTENTIONs the batch path retries per request (the promise path's scan bound). */
const MAX_ATTENTIONS = 8;

/**
 * Resolves true once `ctrl` works again after its target went away, false if it does not.
 * @internal exported for tests
 */
export async function controllerBack(ctrl: Pick<Controller, 'failure' | 'reconnecting'>): Promise<boolean> {
  const end = performance.now() + RECONNECT_WAIT_MS;
  // A timer before each look, never a bare check: the event loop must turn for the
  // reconnection to finish, and slots that fail again at once must not spin on microtasks.
  do {
    await new Promise((r) => setTimeout(r, RECONNECT_POLL_MS));
    if (ctrl.failure === null && !ctrl.reconnecting) return true;
  } while (performance.now() < end);
  return false;
}

/** QD slots over the Promise API, each completion issuing the slot's next request. */
function runPromise(ctrl: Controller, dev: BlockDevice, load: Load): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    let active = 0;
    /** While the target is away (with `reconnect`): settles once the controller is back. */
    let outage: Promise<boolean> | undefined;
    const back = (): Promise<boolean> =>
      (outage ??= controllerBack(ctrl).then((ok) => {
        outage = undefined;
        load.lastCompletion = performance.now();
        return ok;
      }));
    // Promises do not time out: a target that stops answering would otherwise hang the run.
    const watchdog = setInterval(() => {
      if (outage === undefined && performance.now() - load.lastCompletion > STALL_MS) {
        clearInterval(watchdog);
        reject(new Error(`no completion for ${STALL_MS / 1000} s with ${active} requests in flight`));
      }
    }, 1000);
    const finished = (): void => {
      clearInterval(watchdog);
      resolve();
    };
    const issue = (slot: number): void => {
      load.prepare(slot);
      const buf = load.buffers[slot]!;
      const lba = load.lba[slot]!;
      load.started[slot] = performance.now();
      const p = load.isWrite[slot] === 1 ? dev.write(lba, buf) : dev.read(lba, buf, NO_OPTIONS);
      (p as Promise<unknown>).then(onDone[slot], onError[slot]);
    };
    const settle = (slot: number, ok: boolean): void => {
      const now = performance.now();
      load.finish(slot, ok, now);
      if (load.more(now)) issue(slot);
      else if (--active === 0) finished();
    };
    // One pair of callbacks per slot, made once: a request allocates nothing of ours.
    const onDone = Array.from({ length: load.depth }, (_, slot) => () => settle(slot, true));
    const onError = Array.from({ length: load.depth }, (_, slot) => (e: unknown) => {
      if (load.o.reconnect === true && e instanceof ControllerFailedError) {
        load.lose(slot);
        void back().then((ok) => {
          if (!ok) load.failed(e);
          if (load.more(performance.now())) issue(slot);
          else if (--active === 0) finished();
        });
        return;
      }
      load.failed(e);
      settle(slot, false);
    });
    load.begin();
    for (let s = 0; s < load.depth; s++) {
      active++;
      issue(s);
    }
    if (active === 0) finished();
  });
}

/**
 * QD slots as packed records on the channel itself: a slot's next record is written as soon as
 * its completion is seen and goes down with the next `pump`. Spins; yields to the event loop
 * every few thousand turns so that timers (progress, signals) run.
 */
async function runBatch(raw: RawChannel, ctrl: Controller, dev: BlockDevice, load: Load): Promise<void> {
  const { addressOf } = raw;
  let channel = raw.channel;
  if (channel.capacity < load.depth) {
    throw new RangeError(`the channel holds ${channel.capacity} requests, fewer than the queue depth ${load.depth}`);
  }
  let writer = new RecordWriter(channel.submissionArea());
  let reader = new CompletionReader(channel.completionArea(), channel.capacity);
  // The same DMA memory after a reconnect: the buffers keep their addresses.
  const addresses = load.buffers.map((b) => addressOf(b));
  if (addresses.some((a) => a < 0)) throw new Error('a benchmark buffer is not in the DMA memory of the controller');
  const target = dev.target;
  const lun = dev.lun;
  const blocks = load.unitBlocks;
  const ioBytes = load.o.ioBytes;
  let staged = 0;
  let onDevice = 0;
  /** The slot's request as prepared (again, for one the device did not execute). */
  const send = (slot: number, now: number): void => {
    load.started[slot] = now;
    const write = load.isWrite[slot] === 1;
    writer.readWrite(staged++, slot, target, lun, write, load.lba[slot]!, blocks, false, addresses[slot]!, ioBytes, 0);
  };
  const stage = (slot: number, now: number): void => {
    load.prepare(slot);
    send(slot, now);
  };
  /** UNIT ATTENTIONs answered per slot in a row: the command was not executed, and goes again. */
  const attentions = new Uint8Array(load.depth);
  load.begin();
  for (let s = 0; s < load.depth; s++) stage(s, load.t0);
  let turns = 0;
  let idle = 0;
  /** Slots with a request staged or on the device. */
  const busy = new Uint8Array(load.depth).fill(1);
  while (staged > 0 || onDevice > 0) {
    let r: number;
    try {
      r = channel.pump(staged, null);
    } catch (e) {
      // With `reconnect`, a channel that fails because the target went away (or was replaced
      // by a reconnect) is reopened once the controller works again; its requests are lost.
      const gone = ctrl.failure !== null || ctrl.reconnecting || /reconnected/.test(message(e));
      if (load.o.reconnect !== true || !gone) throw e;
      for (let s = 0; s < load.depth; s++) if (busy[s] === 1) load.lose(s);
      try {
        channel.close();
      } catch {
        // Already failed on the native side.
      }
      if (!(await controllerBack(ctrl))) throw e;
      channel = raw.channel = ctrl.rawChannel().channel;
      writer = new RecordWriter(channel.submissionArea());
      reader = new CompletionReader(channel.completionArea(), channel.capacity);
      staged = 0;
      onDevice = 0;
      const now = performance.now();
      load.lastCompletion = now;
      for (let s = 0; s < load.depth; s++) {
        if (busy[s] === 1 && load.more(now)) stage(s, now);
        else busy[s] = 0;
      }
      continue;
    }
    const taken = r >>> 16;
    const done = r & 0xffff;
    if (taken > 0) {
      if (taken < staged) writer.shift(taken, staged - taken);
      staged -= taken;
      onDevice += taken;
    }
    if (done > 0) {
      idle = 0;
      const now = performance.now();
      for (let k = 0; k < done; k++) {
        const slot = reader.token(k);
        const response = reader.response(k);
        const status = reader.status(k);
        // A short READ is an error too, as on the promise path.
        const ok = response === 0 && status === 0 && (load.isWrite[slot] === 1 || reader.residual(k) === 0);
        onDevice--;
        if (
          !ok &&
          status === ScsiStatus.CHECK_CONDITION &&
          attentions[slot]! < MAX_ATTENTIONS &&
          senseKeyOf(reader.sense(k)) === SenseKey.UNIT_ATTENTION
        ) {
          // Retried, as the promise path's retry rules do (a reset or a new connection leaves one).
          attentions[slot]!++;
          send(slot, now);
          continue;
        }
        attentions[slot] = 0;
        if (!ok) {
          const what =
            response === 0 && status === 0
              ? `a residual of ${reader.residual(k)} bytes`
              : `response ${response}, status ${status}`;
          load.failed(new Error(`request on LBA ${load.lba[slot]} ended with ${what}`));
        }
        load.finish(slot, ok, now);
        if (load.more(now)) stage(slot, now);
        else busy[slot] = 0;
      }
    } else if (++idle % 1024 === 0 && performance.now() - load.lastCompletion > STALL_MS) {
      const why = ctrl.failure;
      const requests = `${onDevice} requests on the device`;
      throw new Error(`no completion for ${STALL_MS / 1000} s with ${requests}${why ? `: ${why}` : ''}`);
    }
    if (++turns % BATCH_YIELD_EVERY === 0) await new Promise<void>((resolve) => setImmediate(resolve));
  }
}

/** The channel's own load loop: blocks this thread for the whole run. */
function runNative(raw: RawChannel, dev: BlockDevice, load: Load): Measured {
  const o = load.o;
  const { channel, controller } = raw;
  o.onMeasure?.('start');
  const startedAt = performance.timeOrigin + performance.now();
  const r = channel.runLoad(controller, {
    target: dev.target,
    lun: dev.lun,
    blockSize: dev.blockSize,
    firstBlock: load.firstLba,
    blocks: load.regionBytes / dev.blockSize,
    ioBytes: o.ioBytes,
    queueDepth: o.queueDepth,
    readPercent: load.readPercent,
    random: load.random,
    ...(o.seconds !== undefined ? { seconds: o.seconds } : {}),
    ...(o.ios !== undefined ? { ios: o.ios } : {}),
    // Stream 0 keeps the seed as given; other streams get seeds of their own.
    seed: (load.seed + Math.imul(o.stream ?? 0, STREAM_STRIDE)) >>> 0,
  });
  o.onMeasure?.('end');
  const latencyHistogram: LatencyHistogramState = {
    counts: Float64Array.from(r.latencyHistogram),
    count: r.ios,
    sum: r.latencySumUs,
    max: r.latencyUs.max,
  };
  return {
    cpuSeconds: r.cpuSeconds,
    startedAt,
    seconds: r.seconds,
    ios: r.ios,
    reads: r.reads,
    writes: r.writes,
    errors: r.errors,
    latencyUs: LatencyHistogram.from(latencyHistogram).summary(),
    latencyHistogram,
  };
}

/**
 * Fill (write every unit of the region once, so that reads have something to check) or read
 * back (check every unit written in the run), in large requests through the Promise API.
 */
async function pass(dev: BlockDevice, load: Load, phase: 'fill' | 'read-back'): Promise<void> {
  const v = load.verifier!;
  const ioBytes = load.o.ioBytes;
  const chunkBytes = Math.min(load.regionBytes, Math.max(ioBytes, Math.floor(PASS_CHUNK_BYTES / ioBytes) * ioBytes));
  const chunkBlocks = chunkBytes / load.blockSize;
  const unitBlocks = load.unitBlocks;
  const wordsPerUnit = ioBytes >>> 2;
  const end = load.firstLba + load.regionBytes / load.blockSize;
  let next = load.firstLba;
  let bytes = 0;
  const started = performance.now();
  const progress = load.o.onProgress;
  const timer =
    progress &&
    setInterval(() => {
      progress({
        phase,
        ios: 0,
        bytes,
        elapsedSeconds: (performance.now() - started) / 1000,
        remainingSeconds: undefined,
        fraction: Math.min(1, ((next - load.firstLba) * load.blockSize) / load.regionBytes),
      });
    }, load.o.progressMs ?? 250);
  const worker = async (): Promise<void> => {
    const buf = dev.allocBuffer(chunkBytes);
    const words = wordsOf(buf);
    while (next < end && load.o.signal?.aborted !== true) {
      const lba = next;
      const blocks = Math.min(chunkBlocks, end - lba);
      next += blocks;
      const view = blocks === chunkBlocks ? buf : buf.subarray(0, blocks * load.blockSize);
      if (phase === 'fill') {
        const gen = v.stamp(words, 0, lba, blocks);
        let ok = true;
        try {
          await dev.write(lba, view);
        } catch (e) {
          ok = false;
          throw new Error(`${dev.name}: the fill write at LBA ${lba} failed: ${message(e)}`, { cause: e });
        } finally {
          v.written(lba, blocks, gen, ok);
        }
      } else {
        if (!v.anyWritten(lba, blocks)) continue;
        try {
          await dev.read(lba, view, NO_OPTIONS);
        } catch (e) {
          throw new Error(`${dev.name}: the read-back at LBA ${lba} failed: ${message(e)}`, { cause: e });
        }
        for (let u = 0; u < blocks; u += unitBlocks) v.check(words, (u / unitBlocks) * wordsPerUnit, lba + u, unitBlocks);
      }
      bytes += blocks * load.blockSize;
    }
  };
  try {
    await Promise.all(Array.from({ length: PASS_DEPTH }, worker));
  } finally {
    if (timer) clearInterval(timer);
  }
}
