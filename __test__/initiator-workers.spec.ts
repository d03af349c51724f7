// One request queue per worker thread (design D4): a controller shared with worker_threads,
// each thread doing verified I/O through a queue of its own; threads that outnumber the queues
// share them; a worker terminated mid-I/O leaves nothing the device can still write; closing the
// controller in the main thread fails the workers' requests with a clear error.
import { setTimeout as sleep } from 'node:timers/promises';
import { Worker } from 'node:worker_threads';

import test from 'ava';

import type { Controller } from '../ts/index.js';
import { testWhen } from './helpers/env.js';
import { connectAndScan, initiatorRequirements, pattern, startTestTarget, type TargetSetup } from './helpers/initiator.js';
import type { WorkerJob, WorkerReport } from './helpers/worker-io.js';

const WORKER = new URL('./helpers/worker-io.ts', import.meta.url);
const MiB = 1 << 20;

interface Running {
  worker: Worker;
  started: Promise<void>;
  report: Promise<WorkerReport>;
}

function start(job: WorkerJob): Running {
  // A worker thread registers the TypeScript loader for itself before loading the script.
  const boot = `import('tsx/esm/api').then((m) => { m.register(); return import(${JSON.stringify(WORKER.href)}); })`;
  const worker = new Worker(boot, { eval: true, workerData: job });
  let started!: () => void;
  const startedP = new Promise<void>((r) => (started = r));
  const report = new Promise<WorkerReport>((resolve, reject) => {
    worker.on('message', (m: WorkerReport | { started: true }) => {
      if ('started' in m) started();
      else resolve(m);
    });
    worker.on('error', reject);
    worker.on('exit', (code) => reject(new Error(`worker exited with code ${code} before reporting`)));
  });
  return { worker, started: startedP, report };
}

async function withController(queues: number, body: (c: Controller, s: TargetSetup) => Promise<void>): Promise<void> {
  const s = await startTestTarget({ luns: ['0:0:ram:64M:512'], queues });
  try {
    const c = await connectAndScan(s, { memoryBytes: 16 * MiB });
    try {
      await body(c, s);
    } finally {
      c.close();
    }
  } finally {
    await s.cleanup();
  }
}

const job = (c: Controller, i: number, extra: Partial<WorkerJob> = {}): WorkerJob => ({
  handle: c.share(),
  device: 'VirtioScsi0t0',
  lba: i * 16384,
  blocks: 2048,
  depth: 8,
  rounds: 2,
  seed: 100 + i,
  ...extra,
});

testWhen(test, 'two workers on queues of their own, with verified data', initiatorRequirements, async (t) => {
  // Three queues: the main thread's (used by the scan) and one per worker.
  await withController(3, async (c) => {
    const gate = { buffer: new SharedArrayBuffer(4), parties: 2 };
    const ws = [0, 1].map((i) => start(job(c, i, { gate })));
    const reports = await Promise.all(ws.map((w) => w.report));
    for (const r of reports) {
      t.is(r.error, undefined);
      t.true(r.ok);
      t.is(r.verified, 2 * (2048 / 8));
      t.false(r.shared, 'a queue of its own');
    }
    const queues = new Set([...reports.map((r) => r.queueIndex), c.queueStats!.queueIndex]);
    t.is(queues.size, 3, `queues ${[...queues].join(', ')}: one per thread`);
  });
});

testWhen(test, 'threads that outnumber the queues share them safely', initiatorRequirements, async (t) => {
  // Two queues for the main thread and three workers.
  await withController(2, async (c) => {
    const ws = [0, 1, 2].map((i) => start(job(c, i, { rounds: 3 })));
    const reports = await Promise.all(ws.map((w) => w.report));
    for (const r of reports) {
      t.is(r.error, undefined);
      t.true(r.ok, `${r.mismatches} mismatches`);
      t.is(r.verified, 3 * (2048 / 8));
    }
    t.true(reports.filter((r) => r.shared).length >= 2, 'at least two threads shared a queue');
    // The main thread's queue still works.
    const data = pattern(4096, 3);
    await c.device('VirtioScsi0t0').write(60000, data);
    t.true((await c.device('VirtioScsi0t0').read(60000, 8)).equals(data));
  });
});

testWhen(test, 'a worker terminated mid-I/O leaves no memory the device still writes', initiatorRequirements, async (t) => {
  await withController(2, async (c, s) => {
    const control = await s.target.control();
    const w = start(job(c, 0, { rounds: 0, depth: 16 }));
    await w.started;
    await sleep(100);
    // Requests from now on stay on the device for a while: data, response and used entry late.
    await control.inject(0, 0, 'late', 64, { ms: 300 });
    await sleep(30);
    void w.report.catch(() => undefined);
    await w.worker.terminate();
    await control.clearFaults(0, 0);
    // Everything the pool gives out now, zeroed, must stay zero.
    const taken: Buffer[] = [];
    for (let i = 0; i < 64; i++) taken.push(c.allocBuffer(64 * 1024).fill(0));
    await sleep(600);
    t.is(taken.findIndex((b) => b.some((x) => x !== 0)), -1, 'no device write into memory allocated after the terminate');
    t.is(c.failure, null, 'the controller is healthy');
    const data = pattern(4096, 4);
    await c.device('VirtioScsi0t0').write(60000, data);
    t.true((await c.device('VirtioScsi0t0').read(60000, 8)).equals(data));
  });
});

testWhen(test, 'closing the controller in the main thread fails the workers with a clear error', initiatorRequirements, async (t) => {
  await withController(3, async (c) => {
    const ws = [0, 1].map((i) => start(job(c, i, { rounds: 0 })));
    await Promise.all(ws.map((w) => w.started));
    await sleep(100);
    c.close();
    const reports = await Promise.all(ws.map((w) => w.report));
    for (const r of reports) {
      t.false(r.ok);
      t.is(r.error?.code, 'ERR_VIRTIO_CLOSED', JSON.stringify(r.error));
      t.regex(r.error!.message, /VirtioScsi0.*closed/);
    }
  });
});
