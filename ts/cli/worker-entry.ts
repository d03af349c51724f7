// One worker thread of `bench --workers N` (started by workers.ts): attaches to the controller
// the main thread opened, runs its share of the load through `runWorkload` (ts/bench.ts, the
// same code as a single-thread run) and reports in messages: ready (then waits for go), the end
// of its measured phase, and its result or the error that stopped it.

import { parentPort, workerData } from 'node:worker_threads';

import { type Progress, runWorkload } from '../bench.js';
import { Controller } from '../controller.js';
import {
  type FromWorker,
  PASS,
  PASS_BYTES,
  PASS_FILL,
  PASS_FRACTION,
  PASS_READ_BACK,
  PROGRESS_SLOTS,
  RUN_BYTES,
  RUN_IOS,
  type ToWorker,
  WORKER_PROGRESS_MS,
  type WorkerJob,
} from './workers.js';

const port = parentPort;
if (port === null) throw new Error('worker-entry runs as a worker thread of virtio-initiator bench --workers');
const job = workerData as WorkerJob;
const post = (m: FromWorker): void => port.postMessage(m);

const stop = new AbortController();
let go!: () => void;
const started = new Promise<void>((resolve) => (go = resolve));
const onMessage = (m: ToWorker): void => {
  if (m.type === 'go') go();
  else stop.abort();
};
port.on('message', onMessage);

const counters = new Float64Array(job.progress, job.index * PROGRESS_SLOTS * Float64Array.BYTES_PER_ELEMENT, PROGRESS_SLOTS);
const onProgress = (p: Progress): void => {
  if (p.phase === 'run') {
    counters[RUN_IOS] = p.ios;
    counters[RUN_BYTES] = p.bytes;
  } else {
    counters[PASS] = p.phase === 'fill' ? PASS_FILL : PASS_READ_BACK;
    counters[PASS_BYTES] = p.bytes;
    counters[PASS_FRACTION] = p.fraction ?? 0;
  }
};

let outcome: FromWorker;
let ctrl: Controller | undefined;
try {
  ctrl = await Controller.attach(job.handle);
  const dev = ctrl.device(job.device);
  const result = await runWorkload(ctrl, dev, {
    ...job.options,
    signal: stop.signal,
    onProgress,
    progressMs: WORKER_PROGRESS_MS,
    onReady: async (queue) => {
      post({ type: 'ready', ...queue });
      await started;
    },
    onMeasure: (edge) => {
      if (edge === 'end') post({ type: 'measured' });
    },
  });
  outcome = { type: 'result', result };
} catch (e) {
  outcome = { type: 'error', name: e instanceof Error ? e.name : 'Error', message: e instanceof Error ? e.message : String(e) };
} finally {
  // This thread's hold on the controller only; the main thread's owner keeps the device up.
  await ctrl?.close();
}
post(outcome);
// Nothing more to hear: the thread ends once the report is out.
port.off('message', onMessage);
port.unref();
