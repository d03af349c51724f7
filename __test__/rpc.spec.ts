// The management RPC server (design D9): driven by SPDK's own client (spdk-rpc from the PyPI
// package spdk 26.9, installed by scripts/setup-spdk-rpc.sh) against bundled targets with
// several targets and LUNs, and by raw sockets for the wire behaviour SPDK's client never
// exercises (bad JSON, split and coalesced writes, batches, disconnects, socket files).
import test, { type ExecutionContext } from 'ava';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { link } from 'node:fs/promises';
import { connect, createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { JsonSplitter, type RpcServer, startRpcServer, StreamError, uuidOf } from '../ts/rpc/index.js';
import { repoRoot, requireFile, type Requirement, testWhen } from './helpers/env.js';
import { initiatorRequirements, startTestTarget, type TargetSetup } from './helpers/initiator.js';

const spdkRpc = process.env.SPDK_RPC ?? join(repoRoot, '.cache', 'spdk-rpc', 'bin', 'spdk-rpc');
const spdkPython = join(spdkRpc, '..', 'python');
const requireSpdkRpc: Requirement = requireFile(spdkRpc, 'run scripts/setup-spdk-rpc.sh, or set SPDK_RPC');
const withClient: Requirement[] = [...initiatorRequirements, requireSpdkRpc];

interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

function run(cmd: string, args: string[], input?: string): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = execFile(cmd, args, { timeout: 60_000 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
      resolve({ code, stdout, stderr });
    });
    if (input !== undefined) child.stdin?.end(input);
  });
}

/** spdk-rpc -s SOCKET ARGS... */
function rpc(sock: string, ...args: string[]): Promise<RunResult> {
  return run(spdkRpc, ['-s', sock, ...args]);
}

async function rpcJson<T>(t: ExecutionContext, sock: string, ...args: string[]): Promise<T> {
  const r = await rpc(sock, ...args);
  t.is(r.code, 0, `spdk-rpc ${args.join(' ')} failed: ${r.stdout}${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

/** The error object spdk-rpc prints after "response:". */
function printedError(r: RunResult): { code: number; message: string } {
  const at = r.stdout.indexOf('response:');
  if (at < 0) throw new Error(`no error response in: ${r.stdout}${r.stderr}`);
  return JSON.parse(r.stdout.slice(at + 'response:'.length)) as { code: number; message: string };
}

interface Fixture {
  dir: string;
  sock: string;
  server: RpcServer;
  log: string[];
  targets: TargetSetup[];
  cleanup(): Promise<void>;
}

/** Two bundled targets (several targets and LUNs, 512 and 4096-byte blocks) and a server. */
async function fixture(withTargets = true): Promise<Fixture> {
  const dir = mkdtempSync(join(tmpdir(), 'vi-rpc-'));
  const targets: TargetSetup[] = [];
  try {
    if (withTargets) {
      targets.push(
        await startTestTarget({ luns: ['0:0:ram:16M:512', '0:1:ram:8M:4096', '1:0:ram:4M:512'] }),
        await startTestTarget({ luns: ['0:0:ram:8M:4096', '2:3:ram:2M:512'], queues: 2 }),
      );
    }
    const log: string[] = [];
    const sock = join(dir, 'rpc.sock');
    const server = await startRpcServer({
      path: sock,
      log: (l) => log.push(l),
      controllerOptions: { memoryBytes: 32 << 20 },
    });
    return {
      dir,
      sock,
      server,
      log,
      targets,
      async cleanup() {
        await server.close();
        for (const tg of targets) await tg.cleanup();
        rmSync(dir, { recursive: true, force: true });
      },
    };
  } catch (e) {
    for (const tg of targets) await tg.cleanup();
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}

/** A raw connection that collects what the server sends and notices when it closes. */
class RawClient {
  text = '';
  closed: Promise<void>;
  constructor(readonly sock: Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.text += d;
    });
    sock.on('error', () => undefined);
    this.closed = new Promise((resolve) => sock.once('close', () => resolve()));
  }

  static open(path: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = connect(path);
      s.once('connect', () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }

  /** The JSON texts received so far (the server ends each response with a newline). */
  messages(): unknown[] {
    const splitter = new JsonSplitter(1 << 24);
    return splitter.push(Buffer.from(this.text)).map((s) => JSON.parse(s) as unknown);
  }

  async waitFor(count: number, timeoutMs = 10_000): Promise<unknown[]> {
    const deadline = Date.now() + timeoutMs;
    while (this.messages().length < count) {
      if (Date.now() > deadline) throw new Error(`got ${this.messages().length} of ${count} responses: ${this.text}`);
      await sleep(5);
    }
    return this.messages();
  }

  write(s: string): void {
    this.sock.write(s);
  }

  close(): void {
    this.sock.destroy();
  }
}

const req = (id: number, method: string, params?: Record<string, unknown>): string =>
  JSON.stringify({ jsonrpc: '2.0', id, method, ...(params ? { params } : {}) }, null, 2);

// ---- with SPDK's own client -------------------------------------------------------------

testWhen(test.serial, 'spdk-rpc: attach, get_devices, get_bdevs, iostat, detach', withClient, async (t) => {
  const f = await fixture();
  try {
    const [a, b] = f.targets as [TargetSetup, TargetSetup];
    const attached = await rpc(f.sock, 'bdev_virtio_attach_controller', '-t', 'user', '-a', a.socket, '-d', 'scsi', 'VirtioUser0');
    t.is(attached.code, 0, attached.stdout + attached.stderr);
    t.deepEqual(attached.stdout.trim().split(' '), ['VirtioUser0t0', 'VirtioUser0t0l1', 'VirtioUser0t1']);
    const second = await rpc(
      f.sock,
      'bdev_virtio_attach_controller',
      '-t', 'user', '-a', b.socket, '-d', 'scsi', '--vq-count', '2', '--vq-size', '256', 'Other',
    );
    t.is(second.code, 0, second.stdout + second.stderr);
    t.deepEqual(second.stdout.trim().split(' '), ['Othert0', 'Othert2l3']);

    const devices = await rpcJson<unknown[]>(t, f.sock, 'bdev_virtio_scsi_get_devices');
    t.deepEqual(devices, [
      { name: 'VirtioUser0', virtio: { vq_count: 1, vq_size: 512, type: 'user', socket: a.socket } },
      { name: 'Other', virtio: { vq_count: 2, vq_size: 256, type: 'user', socket: b.socket } },
    ]);

    type Bdev = {
      name: string;
      block_size: number;
      num_blocks: number;
      aliases: unknown[];
      claimed: boolean;
      zoned: boolean;
      product_name: string;
      uuid?: string;
      supported_io_types: Record<string, boolean>;
      driver_specific: { virtio_scsi: { target: number; lun: number; vendor: string; product: string; serial: string | null } };
    };
    const all = await rpcJson<Bdev[]>(t, f.sock, 'bdev_get_bdevs');
    t.deepEqual(
      all.map((d) => [d.name, d.block_size, d.num_blocks]),
      [
        ['VirtioUser0t0', 512, 32768],
        ['VirtioUser0t0l1', 4096, 2048],
        ['VirtioUser0t1', 512, 8192],
        ['Othert0', 4096, 2048],
        ['Othert2l3', 512, 4096],
      ],
    );
    for (const d of all) {
      t.deepEqual(d.aliases, []);
      t.false(d.claimed);
      t.false(d.zoned);
      t.is(d.product_name, 'Virtio SCSI Disk');
      // The bundled target's LUNs carry NAA and T10 designators, no UUID.
      t.false('uuid' in d);
      t.true(d.supported_io_types.read && d.supported_io_types.write && d.supported_io_types.flush);
      t.false(d.supported_io_types.nvme_admin);
    }
    const one = await rpcJson<Bdev[]>(t, f.sock, 'bdev_get_bdevs', '-b', 'Othert2l3');
    t.is(one.length, 1);
    t.like(one[0]!.driver_specific.virtio_scsi, { target: 2, lun: 3 });
    t.is(typeof one[0]!.driver_specific.virtio_scsi.vendor, 'string');

    const missing = await rpc(f.sock, 'bdev_get_bdevs', '-b', 'Nope');
    t.not(missing.code, 0);
    t.is(printedError(missing).code, -19);

    const iostat = await rpcJson<{ tick_rate: number; ticks: number; bdevs: Array<{ name: string; num_read_ops: number }> }>(
      t, f.sock, 'bdev_get_iostat',
    );
    t.true(iostat.tick_rate > 0);
    t.is(iostat.bdevs.length, 5);
    t.is(iostat.bdevs[0]!.num_read_ops, 0);

    const version = await rpcJson<{ version: string; fields: { major: number } }>(t, f.sock, 'spdk_get_version');
    t.regex(version.version, /^virtio-initiator \d+\.\d+\.\d+/);
    const methods = await rpcJson<string[]>(t, f.sock, 'rpc_get_methods');
    t.true(methods.includes('bdev_virtio_attach_controller') && methods.includes('virtio_initiator_get_queue_stats'));

    // The scan ran on this thread's request queue: it has counted commands.
    const py = await run(spdkPython, [
      '-c',
      'import json,sys; from spdk.rpc.client import JSONRPCClient as C; ' +
        'print(json.dumps(C(sys.argv[1]).call("virtio_initiator_get_queue_stats", {"name": "Other"})))',
      f.sock,
    ]);
    t.is(py.code, 0, py.stderr);
    const stats = JSON.parse(py.stdout) as Array<{ name: string; queue: { submitted: number; completed: number } }>;
    t.is(stats[0]!.name, 'Other');
    t.true(stats[0]!.queue.completed > 0);

    t.is((await rpc(f.sock, 'bdev_virtio_detach_controller', 'VirtioUser0')).code, 0);
    t.deepEqual([...f.server.controllers.keys()], ['Other']);
    const again = await rpc(f.sock, 'bdev_virtio_detach_controller', 'VirtioUser0');
    t.is(printedError(again).code, -19);
    t.true(f.log.some((l) => l.startsWith('rpc bdev_virtio_detach_controller {"name":"VirtioUser0"} -> true (')));
  } finally {
    await f.cleanup();
  }
  t.is(statSync(f.dir, { throwIfNoEntry: false }), undefined);
});

testWhen(test.serial, 'spdk-rpc: a virtio-blk controller (-d blk) is one bdev named like it: attach, get_bdevs, iostat, detach', withClient, async (t) => {
  const f = await fixture(false);
  t.teardown(() => f.cleanup());
  const disk = await startTestTarget({ type: 'blk', luns: ['0:0:ram:64M:4096'], queues: 2 });
  t.teardown(() => disk.cleanup());
  const lun = await startTestTarget({ luns: ['0:0:ram:8M:512'] });
  t.teardown(() => lun.cleanup());

  // Left to its default type, the virtio-blk socket does not come up as virtio-scsi: the answer
  // says which dev_type to give.
  const wrong = await rpc(f.sock, 'bdev_virtio_attach_controller', '-t', 'user', '-a', disk.socket, '-d', 'scsi', 'Blk3');
  const e = printedError(wrong);
  t.is(e.code, -5);
  t.true(e.message.endsWith('(opened as virtio-scsi; if the target is a virtio-blk one, give dev_type "blk" (-d blk))'), e.message);
  t.deepEqual([...f.server.controllers.keys()], []);

  const attached = await rpc(f.sock, 'bdev_virtio_attach_controller', '-t', 'user', '-a', disk.socket, '-d', 'blk', '--vq-count', '2', 'Blk3');
  t.is(attached.code, 0, attached.stdout + attached.stderr);
  t.deepEqual(attached.stdout.trim().split(/\s+/), ['Blk3'], 'SPDK answers with the one bdev, named like the controller');
  t.is((await rpc(f.sock, 'bdev_virtio_attach_controller', '-t', 'user', '-a', lun.socket, '-d', 'scsi', 'Scsi0')).code, 0);

  // bdev_virtio_scsi_get_devices lists the virtio-scsi controllers, as in SPDK.
  const devices = await rpcJson<Array<{ name: string }>>(t, f.sock, 'bdev_virtio_scsi_get_devices');
  t.deepEqual(devices.map((d) => d.name), ['Scsi0']);

  type Bdev = {
    name: string;
    product_name: string;
    block_size: number;
    num_blocks: number;
    supported_io_types: Record<string, boolean>;
    driver_specific: Record<string, unknown>;
  };
  const all = await rpcJson<Bdev[]>(t, f.sock, 'bdev_get_bdevs');
  t.deepEqual(
    all.map((b) => [b.name, b.product_name, b.block_size, b.num_blocks]),
    [
      ['Blk3', 'VirtioBlk Disk', 4096, 16384],
      ['Scsi0t0', 'Virtio SCSI Disk', 512, 16384],
    ],
  );
  const [blk] = await rpcJson<Bdev[]>(t, f.sock, 'bdev_get_bdevs', '-b', 'Blk3');
  t.deepEqual(blk!.driver_specific, {
    virtio: { vq_count: 2, vq_size: 512, type: 'user', socket: disk.socket },
    virtio_blk: { serial: 'VIRTINIT-ram' },
  });
  t.like(blk!.supported_io_types, { read: true, write: true, flush: true, unmap: true, write_zeroes: true, reset: false });

  // I/O through the server's controller shows in bdev_get_iostat under the bdev's name.
  const dev = f.server.controllers.get('Blk3')!.controller.device('Blk3');
  const data = Buffer.alloc(2 * 4096, 0x5a);
  await dev.write(8, data);
  t.deepEqual(await dev.read(8, 2), data);
  const iostat = await rpcJson<{ bdevs: Array<{ name: string; num_read_ops: number; bytes_read: number; num_write_ops: number; bytes_written: number }> }>(
    t, f.sock, 'bdev_get_iostat', '--names', 'Blk3',
  );
  t.like(iostat.bdevs, [{ name: 'Blk3', num_read_ops: 1, bytes_read: 8192, num_write_ops: 1, bytes_written: 8192 }]);

  t.is((await rpc(f.sock, 'bdev_virtio_detach_controller', 'Blk3')).code, 0);
  t.deepEqual((await rpcJson<Bdev[]>(t, f.sock, 'bdev_get_bdevs')).map((b) => b.name), ['Scsi0t0']);
  t.is(printedError(await rpc(f.sock, 'bdev_get_bdevs', '-b', 'Blk3')).code, -19);
  // Detached means let go: the target takes the next frontend, and the data is still there.
  const again = await rpc(f.sock, 'bdev_virtio_attach_controller', '-t', 'user', '-a', disk.socket, '-d', 'blk', 'Again');
  t.deepEqual(again.stdout.trim().split(/\s+/), ['Again'], again.stdout + again.stderr);
  t.deepEqual(await f.server.controllers.get('Again')!.controller.device('Again').read(8, 2), data);
});

testWhen(test.serial, 'spdk-rpc: errors (missing socket, duplicate, unknown method, bad params)', withClient, async (t) => {
  const f = await fixture();
  try {
    const [a] = f.targets as [TargetSetup];
    const nowhere = join(f.dir, 'nowhere.sock');
    const missing = await rpc(f.sock, 'bdev_virtio_attach_controller', '-t', 'user', '-a', nowhere, '-d', 'scsi', 'V0');
    t.is(missing.code, 1);
    const e1 = printedError(missing);
    t.is(e1.code, -2);
    t.true(e1.message.includes(nowhere) && e1.message.includes('does not exist'), e1.message);

    // A socket file that nothing listens on: -ECONNREFUSED, not a generic I/O error.
    const stale = join(f.dir, 'stale.sock');
    await run('python3', ['-c', 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])', stale]);
    const refused = await rpc(f.sock, 'bdev_virtio_attach_controller', '-t', 'user', '-a', stale, '-d', 'scsi', 'V0');
    const e0 = printedError(refused);
    t.is(e0.code, -111);
    t.true(e0.message.includes('is the target running?'), e0.message);

    t.is((await rpc(f.sock, 'bdev_virtio_attach_controller', '-t', 'user', '-a', a.socket, '-d', 'scsi', 'V0')).code, 0);
    const dup = await rpc(f.sock, 'bdev_virtio_attach_controller', '-t', 'user', '-a', a.socket, '-d', 'scsi', 'V0');
    t.is(printedError(dup).code, -17);

    const badSize = await rpc(
      f.sock, 'bdev_virtio_attach_controller', '-t', 'user', '-a', a.socket, '-d', 'scsi', '--vq-size', '100', 'V1',
    );
    const e2 = printedError(badSize);
    t.is(e2.code, -32602);
    t.true(e2.message.includes('vq_size'), e2.message);

    // spdk-rpc only sends the methods it knows; its client library sends any.
    const py = await run(spdkPython, [
      '-c',
      'import sys\nfrom spdk.rpc.client import JSONRPCClient, JSONRPCException\n' +
        'c = JSONRPCClient(sys.argv[1])\n' +
        'for m, p in (("no_such_method", None), ("bdev_virtio_detach_controller", {"nme": "V0"})):\n' +
        '    try:\n        c.call(m, p)\n        print("no error")\n' +
        '    except JSONRPCException as e:\n        print(e.message.split("response:")[1].replace("\\n", " "))\n',
      f.sock,
    ]);
    t.is(py.code, 0, py.stderr);
    const [unknown, badParam] = py.stdout.trim().split('\n').map((l) => JSON.parse(l) as { code: number; message: string });
    t.is(unknown!.code, -32601);
    t.true(unknown!.message.includes('no_such_method'));
    t.is(badParam!.code, -32602);
    t.true(badParam!.message.includes('"nme"'), badParam!.message);
    t.deepEqual([...f.server.controllers.keys()], ['V0']);
  } finally {
    await f.cleanup();
  }
});

testWhen(test.serial, 'spdk-rpc: a batch from stdin (-b)', withClient, async (t) => {
  const f = await fixture();
  try {
    const [a] = f.targets as [TargetSetup];
    t.is((await rpc(f.sock, 'bdev_virtio_attach_controller', '-t', 'user', '-a', a.socket, '-d', 'scsi', 'Batch0')).code, 0);
    // Commands whose output is printed with print_dict: in batch mode spdk-rpc prints the
    // results after the batch, and its print_array (attach's) cannot take the deferred None.
    const r = await run(spdkRpc, ['-s', f.sock, '-b'], 'bdev_virtio_scsi_get_devices\nbdev_get_bdevs -b Batch0t0l1\nspdk_get_version\n');
    t.is(r.code, 0, r.stdout + r.stderr);
    t.true(r.stdout.includes('"socket"') && r.stdout.includes('"Batch0t0l1"') && r.stdout.includes('virtio-initiator'), r.stdout);
    t.true(f.log.some((l) => l.startsWith('rpc spdk_get_version')));
  } finally {
    await f.cleanup();
  }
});

// ---- raw sockets --------------------------------------------------------------------------

test('JsonSplitter: strings, escapes, nesting, splits, several per chunk, limits', (t) => {
  const s = new JsonSplitter(64);
  const text = '{"a":"}{\\"\\\\","b":[1,{"c":"]"}]}';
  t.deepEqual(s.push(Buffer.from(`  ${text}\n${text}{"x"`)), [text, text]);
  t.deepEqual(s.push(Buffer.from(':1}[]')), ['{"x":1}', '[]']);
  const bytes = Buffer.from(text);
  const out: string[] = [];
  for (let i = 0; i < bytes.length; i++) out.push(...s.push(bytes.subarray(i, i + 1)));
  t.deepEqual(out, [text]);
  t.throws(() => new JsonSplitter(64).push(Buffer.from('hello')), { instanceOf: StreamError });
  const err = t.throws(() => new JsonSplitter(16).push(Buffer.from(`{"a":"${'x'.repeat(32)}"}`)), {
    instanceOf: StreamError,
  });
  t.is(err.kind, 'oversized');
  t.is(s.buffered, 0);
});

test('uuidOf: UUID designators and UUID text', (t) => {
  const base = { protocolIdentifier: 0, codeSet: 1, piv: false, association: 0, typeName: 'UUID' };
  t.is(
    uuidOf([{ ...base, type: 0x0a, value: '1000' + '0123456789abcdef0123456789abcdef' }]),
    '01234567-89ab-cdef-0123-456789abcdef',
  );
  t.is(uuidOf([{ ...base, type: 0x08, codeSet: 3, value: 'F81D4FAE-7DEC-11D0-A765-00A0C91E6BF6' }]), 'f81d4fae-7dec-11d0-a765-00a0c91e6bf6');
  t.is(uuidOf([{ ...base, type: 0x03, value: '6001405abcdef012' }]), undefined);
});

test('raw: malformed JSON gets -32700 and the connection closes; others are unaffected', async (t) => {
  const f = await fixture(false);
  try {
    const good = await RawClient.open(f.sock);
    const bad = await RawClient.open(f.sock);
    bad.write(`${req(1, 'spdk_get_version')}\n{"jsonrpc": "2.0", "id": 2, "method": nope}`);
    await bad.closed;
    const got = bad.messages() as Array<{ id: unknown; result?: unknown; error?: { code: number } }>;
    t.is(got.length, 2);
    t.like(got[0], { id: 1 });
    t.like(got[1], { id: null, error: { code: -32700 } });

    const junk = await RawClient.open(f.sock);
    junk.write('hello\n');
    await junk.closed;
    t.like(junk.messages()[0], { error: { code: -32700 } });

    good.write(req(3, 'rpc_get_methods'));
    const [r] = (await good.waitFor(1)) as Array<{ id: number; result: string[] }>;
    t.is(r!.id, 3);
    t.true(r!.result.includes('spdk_get_version'));
    good.close();
  } finally {
    await f.cleanup();
  }
});

test('raw: an oversized request gets -32700 and the connection closes', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vi-rpc-'));
  const server = await startRpcServer({ path: join(dir, 'rpc.sock'), maxRequestBytes: 1024 });
  try {
    const c = await RawClient.open(server.path);
    c.write(`{"jsonrpc":"2.0","id":1,"method":"spdk_get_version","params":{"pad":"${'x'.repeat(4096)}`);
    await c.closed;
    const [e] = c.messages() as Array<{ error: { code: number; message: string } }>;
    t.is(e!.error.code, -32700);
    t.true(e!.error.message.includes('1024 bytes'));
  } finally {
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('raw: split writes, two requests in one write, batches, notifications, invalid requests', async (t) => {
  const f = await fixture(false);
  try {
    const c = await RawClient.open(f.sock);
    const one = req(1, 'spdk_get_version');
    c.write(one.slice(0, 7));
    await sleep(20);
    c.write(one.slice(7, 30));
    await sleep(20);
    c.write(one.slice(30));
    await c.waitFor(1);
    c.write(`${req(2, 'rpc_get_methods')}${req(3, 'spdk_get_version')}`);
    const three = (await c.waitFor(3)) as Array<{ id: number }>;
    t.deepEqual(three.map((m) => m.id), [1, 2, 3]);

    // A batch: answers in an array, none for the notification; an empty batch is invalid.
    c.write(
      JSON.stringify([
        { jsonrpc: '2.0', id: 'a', method: 'spdk_get_version' },
        { jsonrpc: '2.0', method: 'spdk_get_version' },
        { jsonrpc: '2.0', id: 'b', method: 'nope' },
        { jsonrpc: '1.0', id: 'c', method: 'spdk_get_version' },
        5,
      ]),
    );
    const batch = (await c.waitFor(4))[3] as Array<{ id: unknown; error?: { code: number } }>;
    t.true(Array.isArray(batch));
    t.deepEqual(batch.map((m) => [m.id, m.error?.code]), [['a', undefined], ['b', -32601], ['c', -32600], [null, -32600]]);

    // Notifications get nothing, a notification-only batch neither; params must be an object.
    c.write(JSON.stringify({ jsonrpc: '2.0', method: 'spdk_get_version' }));
    c.write(JSON.stringify([{ jsonrpc: '2.0', method: 'rpc_get_methods' }]));
    c.write(JSON.stringify([]));
    c.write(JSON.stringify({ jsonrpc: '2.0', id: 9, method: 'bdev_get_bdevs', params: [1] }));
    c.write(JSON.stringify({ jsonrpc: '2.0', id: 10, method: 'bdev_get_bdevs', params: { name: 5 } }));
    const rest = ((await c.waitFor(7)) as Array<{ id: unknown; error?: { code: number; message: string } }>).slice(4);
    t.deepEqual(rest.map((m) => [m.id, m.error?.code]), [[null, -32600], [9, -32602], [10, -32602]]);
    t.true(rest[2]!.error!.message.includes('"name"'));
    await sleep(50);
    t.is(c.messages().length, 7);
    c.close();
  } finally {
    await f.cleanup();
  }
});

testWhen(test.serial, 'raw: two concurrent clients; a client gone mid-request harms nobody', initiatorRequirements, async (t) => {
  const f = await fixture();
  try {
    const [a, b] = f.targets as [TargetSetup, TargetSetup];
    const c1 = await RawClient.open(f.sock);
    const c2 = await RawClient.open(f.sock);
    const attach = (id: number, name: string, socket: string): string =>
      req(id, 'bdev_virtio_attach_controller', { name, trtype: 'user', traddr: socket, dev_type: 'scsi' });
    c1.write(attach(1, 'C1', a.socket));
    c2.write(attach(1, 'C2', b.socket));
    const [r1] = (await c1.waitFor(1)) as Array<{ result: string[] }>;
    const [r2] = (await c2.waitFor(1)) as Array<{ result: string[] }>;
    t.deepEqual(r1!.result, ['C1t0', 'C1t0l1', 'C1t1']);
    t.deepEqual(r2!.result, ['C2t0', 'C2t2l3']);

    // The client leaves while the attach runs: the attach completes, its answer is dropped.
    // (A target serves one frontend at a time, so this one gets a target of its own.)
    const third = await startTestTarget({ luns: ['0:0:ram:1M:512'] });
    f.targets.push(third);
    const leaver = await RawClient.open(f.sock);
    await new Promise<void>((resolve) => leaver.sock.write(attach(1, 'Gone', third.socket), () => resolve()));
    leaver.close();
    const deadline = Date.now() + 10_000;
    while (!f.server.controllers.has('Gone') && Date.now() < deadline) await sleep(10);
    t.true(f.server.controllers.has('Gone'), f.log.join('\n'));

    c1.write(req(2, 'bdev_virtio_scsi_get_devices'));
    const list = ((await c1.waitFor(2))[1] as { result: Array<{ name: string }> }).result;
    t.deepEqual(list.map((d) => d.name).sort(), ['C1', 'C2', 'Gone']);
    c1.close();
    c2.close();
  } finally {
    await f.cleanup();
  }
  t.is(f.server.controllers.size, 0, 'close() detaches every controller');
});

test('socket file: mode 0600, live socket refused, stale one replaced, non-socket refused', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vi-rpc-'));
  try {
    const path = join(dir, 'rpc.sock');
    const server = await startRpcServer({ path });
    t.is(statSync(path).mode & 0o777, 0o600);
    await t.throwsAsync(startRpcServer({ path }), { message: /in use/ });
    await server.close();
    t.is(statSync(path, { throwIfNoEntry: false }), undefined, 'close() removes the socket');

    // A stale socket: what a server that crashed leaves behind (nothing listens on it).
    const keep = join(dir, 'keep.sock');
    await leaveDeadSocket(join(dir, 'bound.sock'), keep);
    t.true(statSync(keep).isSocket());
    const replaced = await startRpcServer({ path: keep, mode: 0o660 });
    t.is(statSync(keep).mode & 0o777, 0o660);
    const c = await RawClient.open(keep);
    c.write(req(1, 'spdk_get_version'));
    await c.waitFor(1);
    c.close();
    await replaced.close();

    const file = join(dir, 'plain');
    writeFileSync(file, 'x');
    await t.throwsAsync(startRpcServer({ path: file }), { message: /not a socket/ });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/**
 * Leaves a socket file at `dead` that nothing listens on: bind at `live`, hard-link it to
 * `dead`, close the listener (which unlinks only `live`).
 */
async function leaveDeadSocket(live: string, dead: string): Promise<void> {
  const s = createServer();
  await new Promise<void>((resolve) => s.listen(live, resolve));
  await link(live, dead);
  await new Promise<void>((resolve) => s.close(() => resolve()));
}
