// Bad input gets a clear error before anything reaches the device; bad socket paths fail to
// connect with a clear error; and a process that closes its controller exits by itself.
import test, { type ImplementationFn } from 'ava';
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

import { ConnectError, Controller, NotSupportedError } from '../ts/index.js';
import { repoRoot, testWhen } from './helpers/env.js';
import { connectAndScan, initiatorRequirements, pattern, requireAddon, startTestTarget } from './helpers/initiator.js';

const when = (title: string, impl: ImplementationFn<[]>) => testWhen(test, title, initiatorRequirements, impl);

when('out-of-range LBAs and wrong buffer sizes are refused before reaching the device', async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:1M:512', '0:1:ram:1M:4096'] });
  t.teardown(() => s.cleanup());
  const ctrl = await connectAndScan(s);
  t.teardown(() => ctrl.close());
  const d = ctrl.device('VirtioScsi0t0');
  const d4k = ctrl.device('VirtioScsi0t0l1');
  t.is(d.blockCount, 2048n);
  const sent = ctrl.queueStats!.submitted;

  await t.throwsAsync(d.read(2048, 1), {
    instanceOf: RangeError,
    message: 'VirtioScsi0t0: request lba 2048 + blocks 1 exceeds the capacity of 2048 blocks',
  });
  await t.throwsAsync(d.read(2040, 9), { instanceOf: RangeError, message: /lba 2040 \+ blocks 9 exceeds the capacity of 2048/ });
  await t.throwsAsync(d.write(2047n, Buffer.alloc(1024)), { instanceOf: RangeError, message: /lba 2047 \+ blocks 2/ });
  await t.throwsAsync(d.read(-1, 1), { instanceOf: RangeError, message: 'lba -1 is negative' });
  await t.throwsAsync(d.read(1.5, 1), { instanceOf: RangeError, message: /lba must be a non-negative safe integer/ });
  await t.throwsAsync(d.read(0, 0), { instanceOf: RangeError, message: /blocks must be a positive integer/ });
  await t.throwsAsync(d.write(0, Buffer.alloc(513)), {
    instanceOf: RangeError,
    message: 'VirtioScsi0t0: buffer length 513 is not a positive multiple of the block size 512',
  });
  await t.throwsAsync(d4k.write(0, Buffer.alloc(512)), { instanceOf: RangeError, message: /block size 4096/ });
  await t.throwsAsync(d.read(0, Buffer.alloc(0)), { instanceOf: RangeError, message: /buffer length 0/ });
  await t.throwsAsync(d.write(0, 'text' as unknown as Buffer), { instanceOf: TypeError });
  await t.throwsAsync(d.unmap([{ lba: 2000, blocks: 100 }]), {
    instanceOf: RangeError,
    message: /ranges\[0\] lba 2000 \+ blocks 100 exceeds the capacity of 2048 blocks/,
  });
  await t.throwsAsync(d.unmap([]), { instanceOf: RangeError });
  await t.throwsAsync(d.writeZeroes(0, 4096), { instanceOf: RangeError, message: /blocks 4096 exceeds/ });
  await t.throwsAsync(d.passthrough(new Uint8Array(4)), { instanceOf: RangeError, message: /cdb length 4/ });
  await t.throwsAsync(d.passthrough(new Uint8Array(10), { dataIn: 4, dataOut: Buffer.alloc(4) }), {
    instanceOf: TypeError,
  });
  t.is(ctrl.queueStats!.submitted, sent, 'nothing was submitted');
  t.throws(() => ctrl.allocBuffer(0), { instanceOf: RangeError });

  // Valid I/O still works afterwards, right at the end of the device.
  const last = pattern(512, 1);
  await d.write(2047, last);
  t.true((await d.read(2047, 1)).equals(last));
});

when('calls on a closed controller reject clearly', async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:1M:512'] });
  t.teardown(() => s.cleanup());
  const ctrl = await connectAndScan(s);
  const d = ctrl.device('VirtioScsi0t0');
  ctrl.close();
  await t.throwsAsync(d.read(0, 1), { message: 'VirtioScsi0t0: controller VirtioScsi0 closed' });
  t.throws(() => ctrl.info, { message: 'controller VirtioScsi0 is closed' });
  await t.throwsAsync(ctrl.scan(), { message: 'controller VirtioScsi0 is closed' });
});

testWhen(test, 'connect: a missing path, a plain file and a non-vhost-user socket', [requireAddon], async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vi-bad-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const missing = join(dir, 'nothing.sock');
  const e1 = await t.throwsAsync(Controller.connect(missing), {
    instanceOf: ConnectError,
    message: `cannot open vhost-user socket ${missing}: no such file or directory`,
  });
  t.is(e1!.errno, 'ENOENT');
  const file = join(dir, 'plain');
  writeFileSync(file, 'not a socket');
  const e2 = await t.throwsAsync(Controller.connect(file), {
    instanceOf: ConnectError,
    message: `cannot open vhost-user socket ${file}: not a unix socket`,
  });
  t.is(e2!.errno, 'ENOTSOCK');
  // A socket file that nothing listens on (bound, never listened, its process gone).
  const stale = join(dir, 'stale.sock');
  execFileSync('python3', ['-c', 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])', stale]);
  const e3 = await t.throwsAsync(Controller.connect(stale), { instanceOf: ConnectError, message: /refused/ });
  t.is(e3!.errno, 'ECONNREFUSED');
  await t.throwsAsync(Controller.connect(''), { instanceOf: TypeError });
  await t.throwsAsync(Controller.connect(file, { name: 'bad name!' }), { instanceOf: RangeError, message: /name/ });
  await t.throwsAsync(Controller.connect(file, { queueSize: 0 }), { instanceOf: RangeError, message: /queueSize/ });
});

// A backend that answers GET_FEATURES (offering protocol features) and then falls silent: the
// next request's reply never comes. The wait is bounded (a timeout error naming the request,
// errno ETIMEDOUT) and happens off the event loop: timers keep firing meanwhile.
testWhen(test, 'connect: a vhost-user backend that stops answering is a timeout, not a hang', [requireAddon], async (t) => {
  t.timeout(30_000);
  const dir = mkdtempSync(join(tmpdir(), 'vi-silent-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const socket = join(dir, 'silent.sock');
  const requests: number[] = [];
  const server = createServer((conn) => {
    let pending = Buffer.alloc(0);
    conn.on('data', (chunk: Buffer) => {
      pending = Buffer.concat([pending, chunk]);
      while (pending.length >= 12) {
        const request = pending.readUInt32LE(0);
        const size = pending.readUInt32LE(8);
        if (pending.length < 12 + size) break;
        pending = pending.subarray(12 + size);
        requests.push(request);
        if (request !== 1) continue; // silent on everything but GET_FEATURES
        const reply = Buffer.alloc(20);
        reply.writeUInt32LE(1, 0);
        reply.writeUInt32LE(0x5, 4); // version 1, reply
        reply.writeUInt32LE(8, 8);
        reply.writeBigUInt64LE((1n << 32n) | (1n << 30n), 12); // VERSION_1, PROTOCOL_FEATURES
        conn.write(reply);
      }
    });
    conn.on('error', () => {});
  });
  await new Promise<void>((r) => server.listen(socket, r));
  t.teardown(() => server.close());
  let ticks = 0;
  const timer = setInterval(() => ticks++, 50);
  t.teardown(() => clearInterval(timer));
  const e = await t.throwsAsync(Controller.connect(socket), {
    instanceOf: ConnectError,
    message: /did not answer GET_PROTOCOL_FEATURES within 5s; the connection was closed/,
  });
  t.is(e!.errno, 'ETIMEDOUT');
  t.deepEqual(requests.slice(0, 3), [1, 1, 15], 'the probe, the negotiation, then the request left unanswered');
  t.true(ticks >= 20, `${ticks} timer ticks while the backend was silent`);
});

// Serial: no other test of this file has child processes coming and going meanwhile (the
// native probe of a silent peer used to block for good when a SIGCHLD interrupted its poll).
testWhen(test.serial, 'connect: the target control socket is not a vhost-user backend', initiatorRequirements, async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:1M:512'] });
  t.teardown(() => s.cleanup());
  const start = performance.now();
  const e = await t.throwsAsync(Controller.connect(s.control), { instanceOf: ConnectError });
  t.true(e!.message.startsWith(`cannot open vhost-user socket ${s.control}: `), e!.message);
  t.regex(e!.message, /vhost-user/);
  t.true(performance.now() - start < 10_000);
  // The real socket still works.
  const ctrl = await connectAndScan(s);
  t.is(ctrl.devices.length, 1);
  ctrl.close();
});

when('the process exits by itself after close()', async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:4M:512'] });
  t.teardown(() => s.cleanup());
  const script = join(s.dir, 'client.mts');
  const index = pathToFileURL(join(repoRoot, 'ts', 'index.ts')).href;
  writeFileSync(
    script,
    `import { Controller } from ${JSON.stringify(index)};
const ctrl = await Controller.connect(${JSON.stringify(s.socket)}, { memoryBytes: 16 << 20 });
await ctrl.scan();
const d = ctrl.device('VirtioScsi0t0');
const data = Buffer.alloc(64 * 512, 0xa5);
await d.write(0, data);
const back = await d.read(0, 64);
if (!back.equals(data)) throw new Error('data mismatch');
ctrl.close();
console.log('closed');
`,
  );
  const child = spawn(process.execPath, ['--import', 'tsx', script], {
    cwd: repoRoot,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (out += d));
  const start = performance.now();
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
  const code = await exited;
  clearTimeout(timer);
  t.is(code, 0, out);
  t.regex(out, /closed/);
  t.true(performance.now() - start < 15_000);
});

when('UNMAP on a device without it is NotSupportedError', async (t) => {
  // The bundled target always offers UNMAP; a device without it is simulated by its info.
  const s = await startTestTarget({ luns: ['0:0:ram:1M:512'] });
  t.teardown(() => s.cleanup());
  const ctrl = await connectAndScan(s);
  t.teardown(() => ctrl.close());
  const lun = ctrl.luns[0]!;
  const { BlockDevice } = await import('../ts/block-device.js');
  const dev = new BlockDevice(
    {
      controllerName: 'VirtioScsi0',
      executor: () => {
        throw new Error('must not be reached');
      },
      allocBuffer: (n) => Buffer.alloc(n),
      taskManagement: () => Promise.resolve(0),
      maxSectors: 0,
      maxTransferBytes: 0,
      policy: (await import('../ts/command.js')).DEFAULT_RETRY_POLICY,
    },
    { ...lun, provisioning: { ...lun.provisioning!, lbpu: false } },
  );
  await t.throwsAsync(dev.unmap({ lba: 0, blocks: 1 }), { instanceOf: NotSupportedError, message: /does not support UNMAP/ });
});
