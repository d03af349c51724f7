// Reconnecting to a vhost-user target that went away: the bundled target dropping the connection
// (control socket `disconnect`), and a target process killed and started again on the same
// socket. The same DMA memory is announced again (buffers from before stay zero-copy), devices
// keep their objects, and data written before is read back after.
import test from 'ava';
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { type Controller, ControllerFailedError, type ControllerOptions } from '../ts/index.js';
import { testWhen } from './helpers/env.js';
import { connectAndScan, initiatorRequirements, pattern, startTestTarget, type TargetSetup } from './helpers/initiator.js';
import { startTarget } from './helpers/target.js';

const FAST: ControllerOptions['reconnect'] = { delayMs: 20, maxDelayMs: 200, retries: 50 };

function next<T extends unknown[]>(c: Controller, event: 'reconnected' | 'disconnected' | 'failed'): Promise<T> {
  return new Promise((resolve) => c.once(event, (...args: unknown[]) => resolve(args as T)));
}

testWhen(test, 'the target drops the connection: disconnected, then reconnected on the same memory; devices and data stay', initiatorRequirements, async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:8M:512', '0:1:ram:8M:4096'] });
  t.teardown(() => s.cleanup());
  const c = await connectAndScan(s, { reconnect: FAST });
  t.teardown(() => c.close());
  const d0 = c.device('VirtioScsi0t0');
  const d1 = c.device('VirtioScsi0t0l1');
  const dma = c.allocBuffer(64 * 512);
  pattern(dma.length, 1).copy(dma);
  await d0.write(100, dma);
  const memory = c.info.memoryBytes;
  const events: string[] = [];
  for (const e of ['device-added', 'device-removed', 'disconnected', 'reconnected', 'failed'] as const) c.on(e, () => events.push(e));

  const disconnected = next<[string]>(c, 'disconnected');
  const reconnected = next<[number]>(c, 'reconnected');
  const ctl = await s.target.control();
  await ctl.disconnect();
  const [reason] = await disconnected;
  t.regex(reason, /closed the connection/);
  // While it reconnects, calls fail clearly rather than hang.
  const during = await d0.read(0, 1).then(
    () => undefined,
    (e: unknown) => e,
  );
  if (during !== undefined) t.true(during instanceof ControllerFailedError, String(during));
  const [attempts] = await reconnected;
  t.true(attempts >= 1);
  t.deepEqual(events, ['disconnected', 'reconnected'], 'the same LUNs came back: nothing added or removed');

  // The same objects, the same memory, the same data.
  t.is(c.device('VirtioScsi0t0'), d0);
  t.is(c.device('VirtioScsi0t0l1'), d1);
  t.is(c.info.memoryBytes, memory, 'no new memory: the old pool was announced again');
  t.true((await d0.read(100, 64)).equals(pattern(dma.length, 1)));
  // A buffer from before the loss still goes down zero-copy, both ways.
  pattern(dma.length, 2).copy(dma);
  await d0.write(300, dma);
  dma.fill(0);
  await d0.read(300, dma);
  t.true(dma.equals(pattern(dma.length, 2)));
  const big = pattern(8 * 4096, 3);
  await d1.write(7, big);
  t.true((await d1.read(7, 8)).equals(big));
  t.is(c.failure, null);
});

testWhen(test, 'requests on the device when the connection goes reject at once; the controller reconnects', initiatorRequirements, async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:8M:512'] });
  t.teardown(() => s.cleanup());
  const c = await connectAndScan(s, { reconnect: FAST });
  t.teardown(() => c.close());
  const d = c.device('VirtioScsi0t0');
  const ctl = await s.target.control();
  await ctl.inject(0, 0, 'never', 8);
  const pending = Promise.allSettled(Array.from({ length: 8 }, (_, i) => d.read(i, 1)));
  await new Promise((r) => setTimeout(r, 50));
  t.is(c.queueStats!.inFlight, 8);
  const reconnected = next<[number]>(c, 'reconnected');
  await ctl.disconnect();
  for (const r of await pending) {
    t.is(r.status, 'rejected');
    t.true((r as PromiseRejectedResult).reason instanceof ControllerFailedError);
  }
  await reconnected;
  await ctl.clearFaults(0, 0);
  const data = pattern(512, 4);
  await d.write(9, data);
  t.true((await d.read(9, 1)).equals(data));
  t.like(c.queueStats, { inFlight: 0, queued: 0 });
});

testWhen(test, 'a target process killed and started again on the same socket: reconnected, the image data is there', initiatorRequirements, async (t) => {
  t.timeout(30_000);
  const dir = mkdtempSync(join(tmpdir(), 'vi-reconnect-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const image = join(dir, 'disk.img');
  writeFileSync(image, '');
  truncateSync(image, 4 << 20);
  const socket = join(dir, 'vhost.sock');
  const luns = [`0:0:file:${image}:512`];
  let target = await startTarget({ socket, luns });
  t.teardown(() => target.stop());
  const c = await connectAndScan({ socket } as TargetSetup, { reconnect: { ...FAST, retries: 200 } });
  t.teardown(() => c.close());
  const d = c.device('VirtioScsi0t0');
  const data = pattern(16 * 512, 5);
  await d.write(40, data);
  const reconnected = next<[number]>(c, 'reconnected');
  target.child.kill('SIGKILL');
  await new Promise((r) => target.child.once('exit', r));
  rmSync(socket, { force: true });
  target = await startTarget({ socket, luns });
  const [attempts] = await reconnected;
  t.log(`reconnected after ${attempts} attempt(s)`);
  t.is(c.device('VirtioScsi0t0'), d);
  t.true((await d.read(40, 16)).equals(data));
});

testWhen(test, 'a target that does not come back: failed after the attempts, naming the last error', initiatorRequirements, async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:4M:512'] });
  t.teardown(() => s.cleanup());
  const c = await connectAndScan(s, { reconnect: { retries: 3, delayMs: 10, maxDelayMs: 20 } });
  t.teardown(() => c.close());
  const failed = next<[ControllerFailedError]>(c, 'failed');
  await s.target.stop();
  const [e] = await failed;
  t.regex(e.message, /3 reconnect attempt\(s\) failed, the last with: .*(refused|no such file)/i);
  await t.throwsAsync(c.device('VirtioScsi0t0').read(0, 1), { instanceOf: ControllerFailedError });
});

testWhen(test, 'reconnect options are checked', initiatorRequirements, async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:4M:512'] });
  t.teardown(() => s.cleanup());
  const { Controller } = await import('../ts/index.js');
  await t.throwsAsync(Controller.connect(s.socket, { reconnect: { delayMs: -1 } }), { instanceOf: RangeError, message: /reconnect.delayMs/ });
  await t.throwsAsync(Controller.openPci('0000:00:03.0', { reconnect: true }), { instanceOf: TypeError, message: /vhost-user/ });
});
