// Interrupt mode (`poll: false`): completions are waited for on the queue's interrupt eventfd
// through libuv instead of being polled. Data is verified as in poll mode, and a request the
// target holds back costs (almost) no CPU while it waits, where polling would spin.
import { setTimeout as sleep } from 'node:timers/promises';

import test, { type ImplementationFn } from 'ava';

import type { Controller } from '../ts/index.js';
import { testWhen, unmet } from './helpers/env.js';
import { connectAndScan, initiatorRequirements, pattern, startTestTarget, type TargetSetup } from './helpers/initiator.js';

let setup: TargetSetup | undefined;
let ctrl: Controller | undefined;

test.before(async () => {
  if (unmet(initiatorRequirements).length > 0) return;
  setup = await startTestTarget({ luns: ['0:0:ram:16M:512'] });
  ctrl = await connectAndScan(setup, { poll: false });
});

test.after.always(async () => {
  ctrl?.close();
  await setup?.cleanup();
});

const it = (title: string, impl: ImplementationFn<[]>) => testWhen(test.serial, title, initiatorRequirements, impl);

it('reads and writes are verified one at a time and 64 at a time', async (t) => {
  const d = ctrl!.device('VirtioScsi0t0');
  for (let i = 0; i < 50; i++) {
    const data = pattern(4096, i);
    await d.write(i * 8, data);
    t.true((await d.read(i * 8, 8)).equals(data));
  }
  const datas = Array.from({ length: 64 }, (_, i) => pattern(4096, 100 + i));
  await Promise.all(datas.map((b, i) => d.write(1000 + i * 8, b)));
  const backs = await Promise.all(datas.map((_, i) => d.read(1000 + i * 8, 8)));
  t.true(backs.every((b, i) => b.equals(datas[i]!)));
  t.is(ctrl!.queueStats!.inFlight, 0);
});

it('a request the target holds back is waited for, not spun on', async (t) => {
  const d = ctrl!.device('VirtioScsi0t0');
  const control = await setup!.target.control();
  await control.inject(0, 0, 'delay', 1, { ms: 400 });
  const before = process.cpuUsage();
  const started = Date.now();
  const data = await d.read(0, 8);
  const waited = Date.now() - started;
  const cpu = process.cpuUsage(before);
  t.true(data.equals(pattern(4096, 0)));
  t.true(waited >= 350, `completed after ${waited} ms`);
  // Polling would keep this thread busy for the whole wait.
  const cpuMs = (cpu.user + cpu.system) / 1000;
  t.true(cpuMs < waited / 4, `${cpuMs.toFixed(1)} ms of CPU over a ${waited} ms wait`);
});

it('closing with a request waiting on the interrupt rejects it at once', async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:8M:512'] });
  t.teardown(() => s.cleanup());
  const c = await connectAndScan(s, { poll: false, name: 'Irq0' });
  const control = await s.target.control();
  await control.inject(0, 0, 'never', 1);
  const pending = c.device('Irq0t0').read(0, 1);
  await sleep(50);
  c.close();
  await t.throwsAsync(pending, { code: 'ERR_VIRTIO_CLOSED' });
});
