// Request deadlines and recovery against the bundled target: a request the target holds (fault
// `never`) times out with a typed error, and the controller gets it back with ABORT TASK, or
// escalates to LOGICAL UNIT RESET and I_T NEXUS RESET when the target ignores the earlier steps
// (quirks `abort-task-ignored`, `tmf-ignored`) and finally to a device reset; the controller
// fails when nothing works. An aborted request is recovered the same way.
import test from 'ava';

import {
  type Controller,
  Controller as ControllerClass,
  RequestTimeoutError,
  type RecoveryStep,
  VirtioResponse,
} from '../ts/index.js';
import { Recovery, RECOVERY_STEP_MS } from '../ts/recovery.js';
import { testWhen } from './helpers/env.js';
import { connectAndScan, initiatorRequirements, pattern, startTestTarget, type TargetSetup } from './helpers/initiator.js';
import type { TargetQuirk } from './helpers/target.js';

interface Setup {
  s: TargetSetup;
  c: Controller;
  steps: RecoveryStep[];
}

async function setUp(t: { teardown(fn: () => unknown): void }, quirks: TargetQuirk[] = [], timeoutMs?: number): Promise<Setup> {
  const s = await startTestTarget({ luns: ['0:0:ram:4M:512', '0:1:ram:4M:512'], quirks });
  t.teardown(() => s.cleanup());
  const c = await connectAndScan(s, timeoutMs === undefined ? {} : { timeoutMs });
  t.teardown(() => c.close());
  const steps: RecoveryStep[] = [];
  c.on('recovery', (step) => steps.push(step));
  return { s, c, steps };
}

/** Waits until `check` holds (polling), failing after `ms`. */
async function until(check: () => boolean, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function verifiedIo(c: Controller, name: string, seed: number): Promise<boolean> {
  const d = c.device(name);
  const data = pattern(4096, seed);
  await d.write(64, data);
  return (await d.read(64, 8)).equals(data);
}

testWhen(test, 'a request past its deadline rejects with RequestTimeoutError; ABORT TASK brings it back', initiatorRequirements, async (t) => {
  const { s, c, steps } = await setUp(t);
  const ctl = await s.target.control();
  await ctl.inject(0, 0, 'never', 1);
  const d = c.device('VirtioScsi0t0');
  const e = await t.throwsAsync(d.read(0, 8, { timeoutMs: 300 }), { instanceOf: RequestTimeoutError });
  t.is(e!.code, 'ERR_VIRTIO_TIMEOUT');
  t.is(e!.timeoutMs, 300);
  t.regex(e!.message, /^VirtioScsi0: READ of 8 blocks at LBA 0 on 0:0 timed out after 300 ms$/);
  await until(() => steps.length > 0, 5000, 'a recovery step');
  t.deepEqual(steps, [
    { device: 'VirtioScsi0t0', request: 'READ of 8 blocks at LBA 0', why: 'timeout', action: 'abort-task', response: VirtioResponse.OK, returned: true },
  ]);
  // The slot came back: nothing is left on the device, and the LUN works.
  t.is(c.queueStats!.inFlight, 0);
  t.true(await verifiedIo(c, 'VirtioScsi0t0', 1));
});

testWhen(test, 'ABORT TASK ignored: LOGICAL UNIT RESET brings the request back', initiatorRequirements, async (t) => {
  const { s, c, steps } = await setUp(t, ['abort-task-ignored'], 250);
  const ctl = await s.target.control();
  await ctl.inject(0, 1, 'never', 1);
  const d = c.device('VirtioScsi0t0l1');
  // The controller's default deadline applies (250 ms here).
  await t.throwsAsync(d.write(0, pattern(512, 2)), { instanceOf: RequestTimeoutError, message: /WRITE of 1 blocks at LBA 0 on 0:1 timed out after 250 ms/ });
  await until(() => steps.some((x) => x.returned), 10_000, 'the request to come back');
  t.deepEqual(
    steps.map((x) => [x.action, x.returned]),
    [
      ['abort-task', false],
      ['lun-reset', true],
    ],
  );
  t.is(c.queueStats!.inFlight, 0);
  t.true(await verifiedIo(c, 'VirtioScsi0t0l1', 3));
  t.true(await verifiedIo(c, 'VirtioScsi0t0', 4), 'the other LUN was not disturbed');
});

// Serial: alone with its target while it drops and remakes the connection.
testWhen(test.serial, 'a target that ignores every task management function: a device reset brings the request back, and the controller goes on', initiatorRequirements, async (t) => {
  t.timeout(90_000);
  const { s, c, steps } = await setUp(t, ['tmf-ignored']);
  const ctl = await s.target.control();
  const d = c.device('VirtioScsi0t0');
  const d1 = c.device('VirtioScsi0t0l1');
  const data = pattern(4096, 7);
  await d1.write(32, data);
  await ctl.inject(0, 0, 'never', 1);
  const failed: unknown[] = [];
  c.on('failed', (e) => failed.push(e));
  await t.throwsAsync(d.read(4, 1, { timeoutMs: 200 }), { instanceOf: RequestTimeoutError });
  await until(() => steps.length >= 4, 60_000, 'four recovery steps');
  t.deepEqual(
    steps.map((x) => [x.action, x.response, x.returned]),
    [
      ['abort-task', VirtioResponse.OK, false],
      ['lun-reset', VirtioResponse.OK, false],
      ['target-reset', VirtioResponse.OK, false],
      ['device-reset', undefined, true],
    ],
  );
  t.deepEqual(failed, []);
  t.is(c.failure, null);
  t.is(c.queueStats!.inFlight, 0);
  // The same devices, the data written before the reset, and new I/O.
  t.is(c.device('VirtioScsi0t0l1'), d1);
  t.true((await d1.read(32, 8)).equals(data));
  t.true(await verifiedIo(c, 'VirtioScsi0t0', 8));
});

test('recovery gives up, naming the request, when even the device reset fails', async (t) => {
  const reported: RecoveryStep[] = [];
  let gaveUp: string | undefined;
  const never = new Promise<void>(() => {});
  const r = new Recovery({
    controllerName: 'Fake0',
    taskManagement: async () => VirtioResponse.OK,
    report: (step) => reported.push(step),
    resetDevice: async () => 'cannot connect again',
    giveUp: (reason) => {
      gaveUp = reason;
    },
  });
  r.recover({ target: 1, lun: 2, tag: 7, what: 'READ of 1 blocks at LBA 9', why: 'timeout', returned: never });
  // Each step waits its bound for the request: four of them.
  await until(() => gaveUp !== undefined, 4 * RECOVERY_STEP_MS + 5000, 'the recovery to give up');
  t.deepEqual(
    reported.map((x) => [x.device, x.action, x.returned, x.error]),
    [
      ['Fake0t1l2', 'abort-task', false, undefined],
      ['Fake0t1l2', 'lun-reset', false, undefined],
      ['Fake0t1l2', 'target-reset', false, undefined],
      ['Fake0t1l2', 'device-reset', false, 'cannot connect again'],
    ],
  );
  t.is(
    gaveUp,
    'Fake0t1l2: the device did not give back READ of 1 blocks at LBA 9 after ABORT TASK, LOGICAL UNIT RESET and I_T NEXUS RESET, nor after a device reset (cannot connect again)',
  );
});

testWhen(test, 'an aborted request is recovered with ABORT TASK too, and its slot comes back', initiatorRequirements, async (t) => {
  const { s, c, steps } = await setUp(t);
  const ctl = await s.target.control();
  await ctl.inject(0, 0, 'never', 1);
  const d = c.device('VirtioScsi0t0');
  const ac = new AbortController();
  const read = d.read(16, 2, { signal: ac.signal });
  await new Promise((r) => setTimeout(r, 50));
  t.is(c.queueStats!.inFlight, 1);
  ac.abort(new Error('caller gave up'));
  await t.throwsAsync(read, { message: 'caller gave up' });
  await until(() => steps.length > 0, 5000, 'a recovery step');
  t.like(steps[0], { why: 'abort', action: 'abort-task', returned: true, request: 'READ of 2 blocks at LBA 16' });
  t.is(c.queueStats!.inFlight, 0);
  t.true(await verifiedIo(c, 'VirtioScsi0t0', 5));
});

testWhen(test, 'deadlines: a slow answer within its deadline passes, and timeoutMs 0 waits as long as it takes', initiatorRequirements, async (t) => {
  const { s, c, steps } = await setUp(t, [], 200);
  const ctl = await s.target.control();
  const d = c.device('VirtioScsi0t0');
  const data = pattern(512, 6);
  await d.write(2, data);
  // 500 ms is past the controller's 200: the call's own limit (0, none) is what counts.
  await ctl.inject(0, 0, 'delay', 1, { ms: 500 });
  t.true((await d.read(2, 1, { timeoutMs: 0 })).equals(data));
  await ctl.inject(0, 0, 'delay', 1, { ms: 100 });
  t.true((await d.read(2, 1, { timeoutMs: 1000 })).equals(data));
  t.deepEqual(steps, []);
  // Passthrough takes a deadline too.
  await ctl.inject(0, 0, 'never', 1);
  await t.throwsAsync(d.passthrough(Uint8Array.of(0, 0, 0, 0, 0, 0), { timeoutMs: 150 }), {
    instanceOf: RequestTimeoutError,
    message: /TEST UNIT READY on 0:0 timed out after 150 ms/,
  });
});

testWhen(test, 'bad deadlines are refused', initiatorRequirements, async (t) => {
  const { s, c } = await setUp(t);
  await t.throwsAsync(ControllerClass.connect(s.socket, { timeoutMs: -1 }), { instanceOf: RangeError, message: /timeoutMs/ });
  await t.throwsAsync(c.device('VirtioScsi0t0').read(0, 1, { timeoutMs: Number.NaN }), { instanceOf: TypeError, message: /timeoutMs NaN/ });
});
