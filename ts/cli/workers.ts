// `bench --workers N`: N worker threads load one block device together. Each attaches to the
// controller this thread opened (`share()` / `Controller.attach`), which gives it a request queue
// of its own while there are free ones (and a shared one when they outnumber the queues), and
// runs its share of the load (`workloadShare`: a region of its own, its part of --ios) through
// `runWorkload` of ts/bench.ts, the code a single-thread run uses (worker-entry.ts).
//
// They start together: each reports ready once set up (buffers, fill pass, queue open) and waits
// for go. Counters for the progress line go through a SharedArrayBuffer, written by each worker
// a few times a second (never per request). This thread measures the process's CPU time over the
// run and merges the results (`mergeWorkloadResults`).

import { performance } from 'node:perf_hooks';
import { Worker } from 'node:worker_threads';

import {
  mergeWorkloadResults,
  type Progress,
  type QueueInfo,
  type WorkloadOptions,
  workloadProblem,
  type WorkloadResult,
  workloadShare,
} from '../bench.js';
import type { BlockDevice } from '../block-device.js';
import type { Controller, ControllerHandle } from '../controller.js';

/** What a worker's load is given: the options without callbacks and signal (they stay here). */
export type WorkerOptions = Omit<WorkloadOptions, 'onProgress' | 'progressMs' | 'onReady' | 'onMeasure' | 'signal'>;

/** `workerData` of a worker. */
export interface WorkerJob {
  handle: ControllerHandle;
  device: string;
  index: number;
  options: WorkerOptions;
  /** PROGRESS_SLOTS float64 counters per worker (see below). */
  progress: SharedArrayBuffer;
}

/** Worker to this thread. */
export type FromWorker =
  | ({ type: 'ready' } & QueueInfo)
  | { type: 'measured' }
  | { type: 'result'; result: WorkloadResult }
  | { type: 'error'; name: string; message: string };

/** This thread to a worker: start the measured phase, or stop issuing (Ctrl-C). */
export type ToWorker = { type: 'go' } | { type: 'stop' };

/**
 * Progress counters of one worker: requests and bytes of the measured phase so far, then the
 * fill or read-back pass it is in (PASS_*), that pass's bytes and the share of it done.
 */
export const PROGRESS_SLOTS = 5;
export const RUN_IOS = 0;
export const RUN_BYTES = 1;
export const PASS = 2;
export const PASS_BYTES = 3;
export const PASS_FRACTION = 4;
export const PASS_NONE = 0;
export const PASS_FILL = 1;
export const PASS_READ_BACK = 2;
/** How often a worker updates its counters. */
export const WORKER_PROGRESS_MS = 100;

/** One worker's part in the result. */
export interface WorkerSummary {
  /** Virtqueue index of its request queue. */
  queue: number;
  iops: number;
  /** Other threads used its queue too. */
  shared: boolean;
}

export interface WorkersResult {
  result: WorkloadResult;
  workers: WorkerSummary[];
}

interface Thread {
  index: number;
  worker: Worker;
  queue: number | undefined;
  ready: boolean;
  measured: boolean;
  result: WorkloadResult | undefined;
}

/**
 * The worker's script next to this file: the TypeScript source when this runs from the sources
 * (through tsx), the compiled JavaScript when it runs from dist/.
 */
function startWorker(job: WorkerJob): Worker {
  const fromSources = import.meta.url.endsWith('.ts');
  const script = new URL(fromSources ? './worker-entry.ts' : './worker-entry.js', import.meta.url);
  if (!fromSources) return new Worker(script, { workerData: job });
  let tsx: string;
  try {
    // Resolved here, from the package, so that it does not depend on the working directory.
    tsx = import.meta.resolve('tsx/esm/api');
  } catch (e) {
    const why = e instanceof Error ? e.message : String(e);
    throw new Error(`worker threads from the TypeScript sources need tsx (npm install; or build with npm run build): ${why}`);
  }
  // A worker thread registers the TypeScript loader for itself before it loads the script.
  const boot = `import(${JSON.stringify(tsx)}).then((m) => { m.register(); return import(${JSON.stringify(script.href)}); })`;
  return new Worker(boot, { eval: true, workerData: job });
}

/** A promise with its settle functions, for the phases every worker must reach. */
function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

/**
 * Runs `o` on `dev` in `count` worker threads at once and merges what they did. Callbacks and
 * the signal of `o` act here: `onProgress` gets the combined counters, `onMeasure` marks the
 * start (go) and the end (every worker done measuring) of the run, and the signal stops every
 * worker. A worker that fails ends the others and rejects with its error.
 */
export async function runWorkers(ctrl: Controller, dev: BlockDevice, o: WorkloadOptions, count: number): Promise<WorkersResult> {
  const problem = workloadProblem(ctrl, dev, o, count);
  if (problem !== undefined) {
    throw new RangeError(`${dev.name} with ${count} workers: ${problem.option}: expected ${problem.expected}`);
  }
  // Callbacks and the signal cannot cross to another thread: they are served from here, and
  // `onReady` is this function's own business (the barrier).
  const { onProgress, progressMs, onReady: _onReady, onMeasure, signal, ...plain } = o;
  const handle = ctrl.share();
  const progress = new SharedArrayBuffer(count * PROGRESS_SLOTS * Float64Array.BYTES_PER_ELEMENT);
  const counters = new Float64Array(progress);

  const allReady = deferred();
  const allMeasured = deferred();
  const allDone = deferred();
  let failure: Error | undefined;
  let rejectRun!: (e: Error) => void;
  const failed = new Promise<never>((_, reject) => (rejectRun = reject));
  // Awaited only in races below; this keeps a failure before the first race from going unhandled.
  failed.catch(() => undefined);
  const threads: Thread[] = [];
  const fail = (t: Thread, why: string): void => {
    if (failure !== undefined) return;
    const where = t.queue !== undefined ? ` (queue ${t.queue})` : '';
    failure = new Error(`worker ${t.index}${where}: ${why}`);
    rejectRun(failure);
  };
  const every = (f: (t: Thread) => boolean): boolean => threads.every(f);
  const post = (m: ToWorker): void => {
    for (const t of threads) t.worker.postMessage(m);
  };

  let phase: 'setup' | 'run' | 'after' = 'setup';
  const t0 = performance.now();
  let goAt = 0;
  let measuredAt = 0;
  const combined = (): Progress | undefined => {
    const now = performance.now();
    const slot = (i: number, k: number): number => counters[i * PROGRESS_SLOTS + k]!;
    const passOf = (kind: number): Progress | undefined => {
      const doing = threads.filter((t) => slot(t.index, PASS) === kind);
      if (doing.length === 0) return undefined;
      const bytes = doing.reduce((n, t) => n + slot(t.index, PASS_BYTES), 0);
      const fraction = doing.reduce((n, t) => n + slot(t.index, PASS_FRACTION), 0) / doing.length;
      return {
        phase: kind === PASS_FILL ? 'fill' : 'read-back',
        ios: 0,
        bytes,
        elapsedSeconds: (now - (kind === PASS_FILL ? t0 : measuredAt)) / 1000,
        remainingSeconds: undefined,
        fraction,
      };
    };
    if (phase === 'setup') return passOf(PASS_FILL);
    if (phase === 'after') return passOf(PASS_READ_BACK);
    // The native loop updates no counters while it runs: its progress text stays up instead.
    if (o.api === 'native') return undefined;
    const elapsedSeconds = (now - goAt) / 1000;
    // Until every worker has updated its counters once, they would read as a stall.
    if (elapsedSeconds * 1000 < WORKER_PROGRESS_MS) return undefined;
    let ios = 0;
    let bytes = 0;
    for (const t of threads) {
      ios += slot(t.index, RUN_IOS);
      bytes += slot(t.index, RUN_BYTES);
    }
    return {
      phase: 'run',
      ios,
      bytes,
      elapsedSeconds,
      remainingSeconds: o.seconds !== undefined ? Math.max(0, o.seconds - elapsedSeconds) : undefined,
      fraction: o.ios !== undefined ? Math.min(1, ios / o.ios) : undefined,
    };
  };
  const timer =
    onProgress &&
    setInterval(() => {
      const p = combined();
      if (p !== undefined) onProgress(p);
    }, progressMs ?? 250);
  const onAbort = (): void => post({ type: 'stop' });

  try {
    for (let index = 0; index < count; index++) {
      const share = workloadShare(dev, plain, index, count);
      const job: WorkerJob = { handle, device: dev.name, index, options: share, progress };
      const t: Thread = { index, worker: startWorker(job), queue: undefined, ready: false, measured: false, result: undefined };
      threads.push(t);
      t.worker.on('message', (m: FromWorker) => {
        switch (m.type) {
          case 'ready':
            t.queue = m.queue;
            t.ready = true;
            if (every((x) => x.ready)) allReady.resolve();
            break;
          case 'measured':
            t.measured = true;
            if (every((x) => x.measured)) allMeasured.resolve();
            break;
          case 'result':
            t.result = m.result;
            if (every((x) => x.result !== undefined)) allDone.resolve();
            break;
          case 'error':
            fail(t, m.name === 'Error' ? m.message : `${m.name}: ${m.message}`);
            break;
        }
      });
      t.worker.on('error', (e: unknown) => fail(t, e instanceof Error ? `${e.name}: ${e.message}` : String(e)));
      t.worker.on('exit', (code) => {
        if (t.result === undefined) fail(t, `ended (exit code ${code}) before reporting its result`);
      });
    }
    if (signal?.aborted === true) onAbort();
    else signal?.addEventListener('abort', onAbort, { once: true });

    await Promise.race([allReady.promise, failed]);
    onMeasure?.('start');
    const cpu0 = process.cpuUsage();
    goAt = performance.now();
    phase = 'run';
    post({ type: 'go' });
    await Promise.race([allMeasured.promise, failed]);
    // Every thread of the process, this one included, over the measured phase.
    const cpu = process.cpuUsage(cpu0);
    onMeasure?.('end');
    measuredAt = performance.now();
    phase = 'after';
    await Promise.race([allDone.promise, failed]);

    const parts = threads.map((t) => t.result!);
    return {
      result: mergeWorkloadResults(parts, (cpu.user + cpu.system) / 1e6),
      workers: parts.map((r) => ({ queue: r.queue, iops: r.iops, shared: r.shared })),
    };
  } finally {
    if (timer) clearInterval(timer);
    signal?.removeEventListener('abort', onAbort);
    // Done or failed: no worker outlives the run (each closed its controller before reporting;
    // one still running after a failure is stopped, which leaves the device nothing to write).
    await Promise.all(threads.map((t) => t.worker.terminate()));
  }
}
