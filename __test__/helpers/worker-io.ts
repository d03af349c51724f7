// A worker thread that attaches to a controller shared by the main thread and does verified
// I/O on its own region of a disk, through its own request queue. It reports what it did, or
// the error that stopped it, in one message.
import { parentPort, workerData } from 'node:worker_threads';

import { Controller, type ControllerHandle } from '../../ts/index.js';
import { pattern } from './initiator-bodies.js';

export interface WorkerJob {
  handle: ControllerHandle;
  device: string;
  /** First block of the worker's region, and its size in blocks. */
  lba: number;
  blocks: number;
  /** Requests in flight at once. */
  depth: number;
  /** Write-then-read rounds over the region (0: run until terminated). */
  rounds: number;
  seed: number;
  /**
   * Workers that must hold their queues at the same time: each opens its queue, counts itself
   * in the first Int32 of the buffer and waits for `parties` before its rounds (else a quick
   * worker may close its queue before a slow one opens, which then takes the same queue).
   */
  gate?: { buffer: SharedArrayBuffer; parties: number };
}

export interface WorkerReport {
  ok: boolean;
  verified: number;
  mismatches: number;
  queueIndex: number;
  shared: boolean;
  error?: { name: string; code?: string; message: string };
}

/** The bytes a worker writes at `lba` in a round: distinct per worker, round and LBA. */
const contents = (seed: number, lba: number, bytes: number): Buffer => pattern(seed * 1_000_003 + lba, bytes);

const job = workerData as WorkerJob;
const report: WorkerReport = { ok: false, verified: 0, mismatches: 0, queueIndex: 0, shared: false };
try {
  const ctrl = await Controller.attach(job.handle);
  const dev = ctrl.device(job.device);
  const bs = dev.blockSize;
  const per = 8;
  const slots = Math.floor(job.blocks / per);
  parentPort!.postMessage({ started: true });
  if (job.gate !== undefined) {
    await dev.read(job.lba, 1); // opens this thread's queue
    const count = new Int32Array(job.gate.buffer);
    Atomics.add(count, 0, 1);
    Atomics.notify(count, 0);
    // Nothing is in flight here, so this thread may block until the others have opened theirs.
    for (let n = Atomics.load(count, 0); n < job.gate.parties; n = Atomics.load(count, 0)) Atomics.wait(count, 0, n, 1000);
  }
  for (let round = 0; job.rounds === 0 || round < job.rounds; round++) {
    for (let base = 0; base < slots; base += job.depth) {
      const n = Math.min(job.depth, slots - base);
      const bufs = Array.from({ length: n }, () => dev.allocBuffer(per * bs));
      await Promise.all(
        bufs.map((b, i) => {
          const lba = job.lba + (base + i) * per;
          contents(job.seed + round, lba, b.length).copy(b);
          return dev.write(lba, b);
        }),
      );
      const backs = await Promise.all(bufs.map((_, i) => dev.read(job.lba + (base + i) * per, per)));
      // Whether the queue was shared while this thread used it.
      report.shared ||= ctrl.queueStats!.shared;
      report.queueIndex = ctrl.queueStats!.queueIndex;
      backs.forEach((b, i) => {
        if (b.equals(contents(job.seed + round, job.lba + (base + i) * per, per * bs))) report.verified++;
        else report.mismatches++;
      });
    }
  }
  report.ok = report.mismatches === 0;
  ctrl.close();
} catch (e) {
  const err = e as Error & { code?: string };
  report.error = { name: err.name, message: err.message, ...(err.code ? { code: err.code } : {}) };
}
parentPort!.postMessage(report);
