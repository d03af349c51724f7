// Faults injected through the bundled target's control socket: CHECK CONDITION, BUSY and TASK
// SET FULL (within and beyond the retry bound), delayed and lost completions, abort, and a
// target that disconnects with requests in flight.
import { readdirSync, readFileSync } from 'node:fs';

import test, { type ImplementationFn } from 'ava';

import { ClosedError, ControllerFailedError, type Controller, ScsiError, scsi, TMF_LOGICAL_UNIT_RESET, VirtioResponse } from '../ts/index.js';
import { testWhen, unmet } from './helpers/env.js';
import { connectAndScan, initiatorRequirements, pattern, startTestTarget, type TargetSetup } from './helpers/initiator.js';
import type { ControlClient } from './helpers/target.js';

let setup: TargetSetup | undefined;
let ctrl: Controller | undefined;
let control: ControlClient | undefined;
const cleanups: Array<() => unknown> = [];

test.before(async () => {
  if (unmet(initiatorRequirements).length > 0) return;
  setup = await startTestTarget({ luns: Array.from({ length: 7 }, (_, i) => `0:${i}:ram:8M:512`) });
  const s = setup;
  cleanups.push(() => s.cleanup());
  ctrl = await connectAndScan(s);
  const c = ctrl;
  cleanups.push(() => c.close());
  control = await s.target.control();
});

test.after.always(async () => {
  for (const c of cleanups.reverse()) await c();
});

const fault = (title: string, impl: ImplementationFn<[]>) => testWhen(test, title, initiatorRequirements, impl);

/**
 * SIGSTOP that returns only once every thread of the process has stopped: the signal is
 * delivered asynchronously, and a target polling on another core could otherwise still answer
 * a request submitted right after kill() returns.
 */
async function stopProcess(pid: number): Promise<void> {
  process.kill(pid, 'SIGSTOP');
  const state = (stat: string) => stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
  for (let i = 0; i < 500; i++) {
    const tasks = readdirSync(`/proc/${pid}/task`);
    if (tasks.every((tid) => /[tT]/.test(state(readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8'))))) return;
    await new Promise((r) => setTimeout(r, 2));
  }
  throw new Error(`process ${pid} did not stop`);
}

/** The rejection reason of a promise (DOMException reasons included). */
async function reason(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => {
      throw new Error('expected a rejection');
    },
    (e: unknown) => e,
  );
}

fault('CHECK CONDITION with MEDIUM ERROR becomes a ScsiError with that sense', async (t) => {
  const d = ctrl!.device('VirtioScsi0t0');
  const data = pattern(512, 1);
  await d.write(10, data);
  await control!.inject(0, 0, 'check_condition', 1, { key: 3, asc: 0x11, ascq: 0 });
  const e = await t.throwsAsync(d.read(10, 1), { instanceOf: ScsiError });
  t.is(e?.status, scsi.ScsiStatus.CHECK_CONDITION);
  t.is(e?.key, scsi.SenseKey.MEDIUM_ERROR);
  t.is(e?.asc, 0x11);
  t.is(e?.ascq, 0);
  t.regex(e!.message, /^READ\(10\) lba 10 blocks 1 on VirtioScsi0t0: SCSI CHECK CONDITION: MEDIUM ERROR, UNRECOVERED READ ERROR/);
  // One command only: the next read works.
  t.true((await d.read(10, 1)).equals(data));
});

for (const kind of ['busy', 'task_set_full'] as const) {
  // Serial: the command count below would include the other tests' commands.
  testWhen(test.serial, `${kind} twice: the request succeeds after retries`, initiatorRequirements, async (t) => {
    const lun = kind === 'busy' ? 1 : 2;
    const d = ctrl!.device(`VirtioScsi0t0l${lun}`);
    const data = pattern(4 * 512, 2 + lun);
    await d.write(0, data);
    await control!.inject(0, lun, kind, 2);
    const before = ctrl!.queueStats!.submitted;
    t.true((await d.read(0, 4)).equals(data));
    t.is(ctrl!.queueStats!.submitted - before, 3, 'two retries, then success');
  });
}

fault('BUSY beyond the retry bound fails with a clear error', async (t) => {
  const d = ctrl!.device('VirtioScsi0t0l3');
  await control!.inject(0, 3, 'busy', 50);
  const e = await t.throwsAsync(d.write(0, pattern(512, 4)), { instanceOf: ScsiError });
  t.is(e?.status, scsi.ScsiStatus.BUSY);
  t.is(e?.statusName, 'BUSY');
  t.regex(e!.message, /^WRITE\(10\) lba 0 blocks 1 on VirtioScsi0t0l3 \(after 5 retries\): SCSI BUSY$/);
  await control!.request({ op: 'clear_faults', target: 0, lun: 3 });
  await d.write(0, pattern(512, 4));
});

fault('delay: a delayed completion arrives, and other requests pass it meanwhile', async (t) => {
  const slow = ctrl!.device('VirtioScsi0t0l4');
  const fast = ctrl!.device('VirtioScsi0t0l5');
  const data = pattern(512, 5);
  await slow.write(3, data);
  await control!.inject(0, 4, 'delay', 1, { ms: 500 });
  const start = performance.now();
  let slowDone = 0;
  const slowRead = slow.read(3, 1).then((b) => {
    slowDone = performance.now();
    return b;
  });
  for (let i = 0; i < 5; i++) await fast.read(i, 1);
  const fastDone = performance.now();
  const b = await slowRead;
  t.true(b.equals(data));
  t.true(slowDone - start >= 480, `delayed by ${Math.round(slowDone - start)} ms`);
  t.true(fastDone < slowDone, 'other LUNs were served during the delay');
});

fault('abort: a request the target never answers rejects, the queue carries on', async (t) => {
  const d = ctrl!.device('VirtioScsi0t0l6');
  await control!.inject(0, 6, 'never', 1);
  const e = await reason(d.read(0, 1, { signal: AbortSignal.timeout(100) }));
  t.is((e as DOMException).name, 'TimeoutError');
  const data = pattern(512, 6);
  await d.write(1, data);
  t.true((await d.read(1, 1)).equals(data));
});

testWhen(test, 'a target that disconnects fails every request in flight at once', initiatorRequirements, async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:8M:512', '0:1:ram:8M:512'] });
  t.teardown(() => s.cleanup());
  const c = await connectAndScan(s, { name: 'Gone0' });
  t.teardown(() => c.close());
  const ctl = await s.target.control();
  const d0 = c.device('Gone0t0');
  const d1 = c.device('Gone0t0l1');
  await ctl.inject(0, 0, 'never', 1000);
  await ctl.inject(0, 1, 'never', 1000);
  const pending = [
    ...Array.from({ length: 8 }, (_, i) => d0.read(i, 1)),
    ...Array.from({ length: 8 }, (_, i) => d1.write(i, pattern(512, i))),
  ];
  const settled = Promise.allSettled(pending);
  // Let them reach the device.
  await new Promise((r) => setTimeout(r, 50));
  t.is(c.queueStats!.inFlight, 16);
  const start = performance.now();
  await ctl.disconnect();
  const results = await settled;
  const elapsed = performance.now() - start;
  t.true(elapsed < 2000, `rejected after ${Math.round(elapsed)} ms`);
  for (const r of results) {
    t.is(r.status, 'rejected');
    const e = (r as PromiseRejectedResult).reason as Error;
    t.true(e instanceof ControllerFailedError, String(e));
    t.regex(e.message, /^controller Gone0 failed: .+/);
  }
  t.truthy(c.failure);
  await t.throwsAsync(d0.read(0, 1), { instanceOf: ControllerFailedError });
});

// A quirk of some vhost targets: task management answered with the response written but a used
// length of 0. The response byte counts (it is pre-filled with a sentinel the device overwrote);
// without that rule the reset below fails with FAILURE.
testWhen(test, 'task management answered with a used length of 0 (tmf-zero-used-len): the written response counts', initiatorRequirements, async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:4M:512'], quirks: ['tmf-zero-used-len'] });
  t.teardown(() => s.cleanup());
  const c = await connectAndScan(s);
  t.teardown(() => c.close());
  const d = c.device('VirtioScsi0t0');
  const data = pattern(8 * 512, 31);
  await d.write(8, data);
  await d.reset();
  t.true((await d.read(8, 8)).equals(data), 'I/O goes on after the reset');
  // The byte is read, not assumed: a reset of a LUN that is not there answers INCORRECT LUN.
  t.is(await c.taskManagement(0, 9, TMF_LOGICAL_UNIT_RESET), VirtioResponse.INCORRECT_LUN);
});

// The wait for a task management answer happens off the event loop: with the target stopped
// (SIGSTOP), a LOGICAL UNIT RESET waits out its bound while timers keep firing, then fails with
// a typed error; once the target runs again, the controller goes on working.
testWhen(test, 'task management waits off the event loop: timers fire while a stopped target does not answer', initiatorRequirements, async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:4M:512'] });
  t.teardown(() => s.cleanup());
  const c = await connectAndScan(s);
  t.teardown(() => c.close());
  const d = c.device('VirtioScsi0t0');
  const pid = s.target.child.pid!;
  let ticks = 0;
  const timer = setInterval(() => ticks++, 20);
  await stopProcess(pid);
  try {
    await t.throwsAsync(d.reset(), { code: 'ERR_VIRTIO_TASK_MANAGEMENT', message: /timed out|timeout/i });
  } finally {
    process.kill(pid, 'SIGCONT');
    clearInterval(timer);
  }
  t.true(ticks >= 10, `${ticks} timer ticks during the wait`);
  await d.reset();
  t.true((await d.read(0, 1)).length === 512);
});

// Closing resets the device off the event loop too: with the target stopped, close() returns at
// once, timers keep firing while the reset waits out its bound, and a request the device holds
// is let go only when that is over (its buffer may still be written until then).
testWhen(test, 'close waits off the event loop: a stopped target holds up the promise, not the process', initiatorRequirements, async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:4M:512'] });
  t.teardown(() => s.cleanup());
  const c = await connectAndScan(s);
  const d = c.device('VirtioScsi0t0');
  const pid = s.target.child.pid!;
  await stopProcess(pid);
  let ticks = 0;
  const timer = setInterval(() => ticks++, 20);
  try {
    let settled = false;
    const inFlight = reason(d.read(0, 8)).finally(() => {
      settled = true;
    });
    await new Promise((r) => setTimeout(r, 50));
    const started = performance.now();
    const closing = c.close();
    t.true(performance.now() - started < 100, 'close() returns at once');
    t.is(c.close(), closing, 'a second close() returns the same promise');
    await t.throwsAsync(d.read(0, 1), { instanceOf: ClosedError });
    await new Promise((r) => setTimeout(r, 500));
    t.false(settled, 'the request the device holds is not let go before the reset ends');
    await closing;
    t.true(performance.now() - started >= 1000, 'the reset waited for the stopped target');
    t.true((await inFlight) instanceof ClosedError);
  } finally {
    process.kill(pid, 'SIGCONT');
    clearInterval(timer);
  }
  t.true(ticks >= 25, `${ticks} timer ticks while closing`);
});
