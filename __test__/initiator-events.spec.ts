// Events pushed by the controller (design D7), driven through the bundled target's control
// socket: LUNs added, removed and resized, a burst that overflows the event queue, events while
// I/O runs, and a target that goes away while the controller is idle.
import test, { type ImplementationFn } from 'ava';
import { spawn, spawnSync } from 'node:child_process';
import { pathToFileURL } from 'node:url';
import { join } from 'node:path';

import {
  type BlockDevice,
  type Controller,
  type ControllerEventMap,
  ControllerFailedError,
  DeviceRemovedError,
} from '../ts/index.js';
import { repoRoot, testWhen } from './helpers/env.js';
import { connectAndScan, initiatorRequirements, pattern, startTestTarget } from './helpers/initiator.js';

const when = (title: string, impl: ImplementationFn<[]>) => testWhen(test.serial, title, initiatorRequirements, impl);

/** The next `event` of `ctrl` (with its arguments) that satisfies `pick`, within `ms`. */
function next<K extends keyof ControllerEventMap>(
  ctrl: Controller,
  event: K,
  pick: (...args: ControllerEventMap[K]) => boolean = () => true,
  ms = 10_000,
): Promise<ControllerEventMap[K]> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      ctrl.off(event, listener as never);
      reject(new Error(`no ${event} event in ${ms} ms`));
    }, ms);
    const listener = (...args: ControllerEventMap[K]): void => {
      if (!pick(...args)) return;
      clearTimeout(timer);
      ctrl.off(event, listener as never);
      resolve(args);
    };
    ctrl.on(event, listener as never);
  });
}

/** Sends control requests (argv[2]: JSON array) over the control socket (argv[1]), in order. */
const BURST_SCRIPT = `
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile('rw')
for req in json.loads(sys.argv[2]):
    f.write(json.dumps(req) + '\\n')
    f.flush()
    if not json.loads(f.readline()).get('ok'):
        sys.exit('control request failed: ' + json.dumps(req))
`;

async function verifiedIo(dev: BlockDevice, lba: bigint | number, seed: number): Promise<boolean> {
  const data = pattern(4 * dev.blockSize, seed);
  await dev.write(lba, data);
  return (await dev.read(lba, 4)).equals(data);
}

when('LUNs added, resized (grow and shrink) and removed show up as events; devices keep their identity', async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:4M:512', '0:1:ram:4M:4096'] });
  t.teardown(() => s.cleanup());
  const control = await s.target.control();
  const ctrl = await connectAndScan(s);
  t.teardown(() => ctrl.close());
  const t0 = ctrl.device('VirtioScsi0t0');

  // Added: the new disk is a usable BlockDevice.
  const added = next(ctrl, 'device-added', (d) => d.name === 'VirtioScsi0t0l2');
  await control.addLun('0:2:ram:2M:512');
  const [dev] = await added;
  t.is(ctrl.device('VirtioScsi0t0l2'), dev);
  t.true(await verifiedIo(dev, 0, 1));
  t.is(ctrl.device('VirtioScsi0t0'), t0, 'the other devices keep their object');

  // Grown, then shrunk: capacity-changed with the geometry before, the new size in place.
  const grown = next(ctrl, 'capacity-changed', (d) => d === t0);
  await control.resizeLun(0, 0, '8M');
  const [, before] = await grown;
  t.is(before.blockCount, 8192n);
  t.is(t0.blockCount, 16384n);
  t.true(await verifiedIo(t0, 16384n - 4n, 2), 'the new last blocks are usable');
  const shrunk = next(ctrl, 'capacity-changed', (d) => d === t0);
  await control.resizeLun(0, 0, '1M');
  await shrunk;
  t.is(t0.blockCount, 2048n);
  await t.throwsAsync(t0.read(4096, 1), { instanceOf: RangeError });

  // Removed: pending and later calls fail with DeviceRemovedError.
  const t1 = ctrl.device('VirtioScsi0t0l1');
  const removed = next(ctrl, 'device-removed', (d) => d === t1);
  await control.removeLun(0, 1);
  await removed;
  await t.throwsAsync(t1.read(0, 1), { instanceOf: DeviceRemovedError, message: /VirtioScsi0t0l1: no longer present/ });
  t.throws(() => ctrl.device('VirtioScsi0t0l1'), { instanceOf: RangeError });
  t.deepEqual(
    ctrl.devices.map((d) => d.name),
    ['VirtioScsi0t0', 'VirtioScsi0t0l2'],
  );
  t.true(await verifiedIo(t0, 0, 3));
});

when('a burst that overflows the event queue ends in a full rescan that finds every LUN', async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:1M:512'], maxTarget: 3 });
  t.teardown(() => s.cleanup());
  const control = await s.target.control();
  const ctrl = await connectAndScan(s);
  t.teardown(() => ctrl.close());
  const full = next(ctrl, 'rescanned', (_, targets) => targets === 'all', 20_000);
  // More events than the target keeps pending (64) arrive between two looks at the queue: the
  // LUNs are added by another process while this one is blocked (spawnSync), so the watcher
  // cannot take any event meanwhile.
  const adds = Array.from({ length: 90 }, (_, k) => ({ op: 'add_lun', spec: `${1 + (k % 3)}:${k + 1}:ram:1M:512` }));
  const burst = spawnSync('python3', ['-c', BURST_SCRIPT, s.control, JSON.stringify(adds)], { encoding: 'utf8' });
  t.is(burst.status, 0, burst.stderr);
  await full;
  // Later events (still arriving) are applied too; wait until the device set is complete.
  for (let i = 0; i < 100 && ctrl.devices.length < 91; i++) {
    await new Promise((r) => setTimeout(r, 100));
    await ctrl.eventsSettled();
  }
  t.is(ctrl.devices.length, 91);
  t.true(await verifiedIo(ctrl.device('VirtioScsi0t2l2'), 0, 4));
});

when('events while I/O runs: every read verified, devices come and go', async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:8M:512'] });
  t.teardown(() => s.cleanup());
  const control = await s.target.control();
  const ctrl = await connectAndScan(s);
  t.teardown(() => ctrl.close());
  const t0 = ctrl.device('VirtioScsi0t0');
  let stop = false;
  let verified = 0;
  const io = (async () => {
    for (let i = 0; !stop; i++) {
      if (!(await verifiedIo(t0, (i * 8) % 16000, i))) throw new Error(`mismatch at round ${i}`);
      verified++;
    }
  })();
  for (let i = 1; i <= 6; i++) {
    const added = next(ctrl, 'device-added', (d) => d.name === `VirtioScsi0t0l${i}`);
    await control.addLun(`0:${i}:ram:1M:512`);
    await added;
    if (i % 2 === 0) {
      const gone = next(ctrl, 'device-removed', (d) => d.name === `VirtioScsi0t0l${i - 1}`);
      await control.removeLun(0, i - 1);
      await gone;
    }
  }
  stop = true;
  await io;
  t.true(verified > 0);
  t.deepEqual(
    ctrl.devices.map((d) => d.name),
    ['VirtioScsi0t0', 'VirtioScsi0t0l2', 'VirtioScsi0t0l4', 'VirtioScsi0t0l6'],
  );
});

when('a target that goes away while the controller is idle: disconnected, then failed', async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:1M:512'] });
  t.teardown(() => s.cleanup());
  const control = await s.target.control();
  const ctrl = await connectAndScan(s);
  t.teardown(() => ctrl.close());
  const disconnected = next(ctrl, 'disconnected');
  const failed = next(ctrl, 'failed');
  const start = performance.now();
  await control.disconnect();
  const [reason] = await disconnected;
  const ms = performance.now() - start;
  t.log(`noticed after ${ms.toFixed(0)} ms`);
  t.regex(reason, /closed the connection/);
  const [error] = await failed;
  t.true(error instanceof ControllerFailedError);
  await t.throwsAsync(ctrl.device('VirtioScsi0t0').read(0, 1), { instanceOf: ControllerFailedError });
});

when('the watcher keeps no process alive: a script that never closes its controller exits', async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:1M:512'] });
  t.teardown(() => s.cleanup());
  const entry = pathToFileURL(join(repoRoot, 'ts', 'index.ts')).href;
  const script =
    `const { Controller } = await import(${JSON.stringify(entry)});` +
    `const c = await Controller.connect(${JSON.stringify(s.socket)}); await c.scan();` +
    `console.log(c.devices.length);`;
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
    cwd: repoRoot,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) =>
    child.once('exit', (c, sig) => resolve([c, sig])),
  );
  clearTimeout(timer);
  t.is(signal, null, 'exited by itself, not killed');
  t.is(code, 0);
  t.is(out.trim(), '1');
});
