// `virtio-initiator rpc`: the management server as a process, attaching what a configuration
// file names at start, answering JSON-RPC on its socket, and detaching everything and removing
// its socket on SIGTERM.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import test from 'ava';

import { startRpcServer } from '../ts/rpc/index.js';
import { JsonSplitter } from '../ts/rpc/splitter.js';
import { cli } from './helpers/cli.js';
import { repoRoot, testWhen } from './helpers/env.js';
import { initiatorRequirements, startTestTarget } from './helpers/initiator.js';

/** One JSON-RPC call on a fresh connection. */
function call(path: string, method: string, params?: unknown): Promise<{ result?: unknown; error?: { code: number; message: string } }> {
  return new Promise((resolve, reject) => {
    const sock = connect(path);
    const splitter = new JsonSplitter(1 << 20);
    sock.on('error', reject);
    sock.on('data', (d: Buffer) => {
      const [first] = splitter.push(d);
      if (first !== undefined) {
        sock.end();
        resolve(JSON.parse(first) as { result?: unknown; error?: { code: number; message: string } });
      }
    });
    sock.write(JSON.stringify({ jsonrpc: '2.0', id: 1, method, ...(params === undefined ? {} : { params }) }));
  });
}

testWhen(test, 'rpc --config attaches at start (virtio-scsi and virtio-blk), serves calls with a log line each, and cleans up on SIGTERM', initiatorRequirements, async (t) => {
  const target = await startTestTarget({ luns: ['0:0:ram:16M:512', '0:1:null:1G:4096'] });
  t.teardown(() => target.cleanup());
  const disk = await startTestTarget({ type: 'blk', luns: ['0:0:ram:32M:4096'] });
  t.teardown(() => disk.cleanup());
  const dir = mkdtempSync(join(tmpdir(), 'cli-rpc-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const ini = join(dir, 'virtio.conf');
  writeFileSync(ini, `[VirtioUser0]\n  Path ${target.socket}\n  Name Cfg0\n  Queues 1\n[VirtioUser1]\n  Path ${disk.socket}\n  Type Blk\n`);
  const sock = join(dir, 'rpc.sock');
  const child = spawn(process.execPath, ['--import', 'tsx', join(repoRoot, 'ts', 'cli', 'main.ts'), 'rpc', '--listen', sock, '--config', ini], {
    cwd: repoRoot,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  const listening = new Promise<void>((resolve, reject) => {
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
      if (stderr.includes('listening on')) resolve();
    });
    child.once('exit', (code) => reject(new Error(`rpc exited with ${code}: ${stderr}`)));
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  t.teardown(() => child.kill('SIGKILL'));
  await listening;
  t.regex(stderr, /attached Cfg0: Cfg0t0, Cfg0t0l1/);
  t.regex(stderr, /attached VirtioBlk1: VirtioBlk1\n/);
  t.is(statSync(sock).mode & 0o777, 0o600);

  // The virtio-scsi controllers only, as SPDK lists them; the virtio-blk one is its bdev.
  const devices = await call(sock, 'bdev_virtio_scsi_get_devices');
  t.deepEqual((devices.result as Array<{ name: string }>).map((d) => d.name), ['Cfg0']);
  t.like(devices.result, [{ name: 'Cfg0', virtio: { type: 'user', socket: target.socket, vq_count: 1 } }]);
  const bdevs = (await call(sock, 'bdev_get_bdevs')).result as Array<{ name: string; block_size: number; num_blocks: number; product_name: string }>;
  t.deepEqual(bdevs.map((b) => [b.name, b.product_name, b.block_size, b.num_blocks]), [
    ['Cfg0t0', 'Virtio SCSI Disk', 512, 32768],
    ['Cfg0t0l1', 'Virtio SCSI Disk', 4096, 262144],
    ['VirtioBlk1', 'VirtioBlk Disk', 4096, 8192],
  ]);
  const blk = await call(sock, 'bdev_get_bdevs', { name: 'VirtioBlk1' });
  t.like(blk.result, [{ driver_specific: { virtio: { type: 'user', socket: disk.socket }, virtio_blk: { serial: 'VIRTINIT-ram' } } }]);
  const missing = await call(sock, 'bdev_get_bdevs', { name: 'Nope0t0' });
  t.is(missing.error?.code, -19);
  t.regex(stderr, /bdev_get_bdevs/, 'a log line per call');

  child.kill('SIGTERM');
  t.is(await exited, 0, stderr);
  t.false(existsSync(sock), 'the socket is removed');
  t.regex(stderr, /SIGTERM: detaching 2 controller/);
  // The targets are free for the next frontend: the controllers were detached.
  const again = await cli(['scan', '--socket', target.socket, '--json']);
  t.is(again.code, 0, again.stderr);
  const againBlk = await cli(['scan', '--socket', disk.socket, '--type', 'blk', '--json']);
  t.is(againBlk.code, 0, againBlk.stderr);
});

test('rpc without --listen, or with a bad --mode, is exit 2 with one line', async (t) => {
  for (const [args, message] of [
    [[], /give the socket to serve on: --listen PATH/],
    [['--listen', '/tmp/x.sock', '--mode', '999'], /--mode "999": expected an octal file mode/],
  ] as const) {
    const r = await cli(['rpc', ...args]);
    t.is(r.code, 2);
    t.regex(r.stderr, message);
  }
});

test('rpc with a broken configuration starts nothing and names the line', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'cli-rpc-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const ini = join(dir, 'bad.conf');
  writeFileSync(ini, '[VirtioUser0]\n  Queues 2\n');
  const sock = join(dir, 'rpc.sock');
  const r = await cli(['rpc', '--listen', sock, '--config', ini]);
  t.is(r.code, 1);
  t.regex(r.stderr, /bad\.conf:\d+.*Path/);
  t.false(existsSync(sock));
});

testWhen(test, 'bdev_get_iostat reports what the bdevs completed in the serving process', initiatorRequirements, async (t) => {
  const target = await startTestTarget({ luns: ['0:0:ram:16M:512'] });
  t.teardown(() => target.cleanup());
  const dir = mkdtempSync(join(tmpdir(), 'rpc-iostat-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const server = await startRpcServer({ path: join(dir, 'rpc.sock') });
  t.teardown(() => server.close());
  const attached = await call(server.path, 'bdev_virtio_attach_controller', {
    name: 'Io0',
    trtype: 'user',
    traddr: target.socket,
    dev_type: 'scsi',
  });
  t.deepEqual(attached.result, ['Io0t0']);
  const dev = server.controllers.get('Io0')!.controller.device('Io0t0');
  const data = Buffer.alloc(4096, 7);
  for (let i = 0; i < 3; i++) await dev.write(i * 8, data);
  for (let i = 0; i < 5; i++) await dev.read(i * 8, 8);
  await dev.unmap({ lba: 100, blocks: 16 });
  await dev.flush();
  const stat = (await call(server.path, 'bdev_get_iostat', { name: 'Io0t0' })).result as {
    bdevs: Array<Record<string, number | string>>;
  };
  t.like(stat.bdevs[0], {
    name: 'Io0t0',
    num_write_ops: 3,
    bytes_written: 3 * 4096,
    num_read_ops: 5,
    bytes_read: 5 * 4096,
    num_unmap_ops: 1,
    bytes_unmapped: 16 * 512,
  });
  // Latencies in ticks of tick_rate (nanoseconds): each minimum <= mean <= maximum, all below a second.
  const row = stat.bdevs[0]!;
  for (const [op, count] of [['read', 5], ['write', 3], ['unmap', 1]] as const) {
    const total = row[`${op}_latency_ticks`] as number;
    const min = row[`min_${op}_latency_ticks`] as number;
    const max = row[`max_${op}_latency_ticks`] as number;
    t.true(min > 0 && min * count <= total && total <= max * count && max < 1e9, `${op}: ${min} ${total} ${max}`);
  }
  t.like(dev.iostat, { flushOps: 1 });

  // reset_mode: "maxmin" clears the extremes only, "all" everything, once reported.
  await call(server.path, 'bdev_get_iostat', { name: 'Io0t0', reset_mode: 'maxmin' });
  t.like(dev.iostat, { readOps: 5, readLatencyMinNs: 0, readLatencyMaxNs: 0, readLatencyNs: row.read_latency_ticks });
  await dev.read(0, 8);
  t.true(dev.iostat.readLatencyMinNs > 0 && dev.iostat.readLatencyMinNs === dev.iostat.readLatencyMaxNs);
  await call(server.path, 'bdev_get_iostat', { reset_mode: 'all' });
  const cleared = (await call(server.path, 'bdev_get_iostat', { name: 'Io0t0' })).result as typeof stat;
  t.like(cleared.bdevs[0], { num_read_ops: 0, bytes_read: 0, read_latency_ticks: 0, num_write_ops: 0, num_unmap_ops: 0 });
});

testWhen(test, 'bdev_virtio_attach_controller dev_type "blk": the one bdev, its iostat, detach; "scsi" on a virtio-blk target says what to give', initiatorRequirements, async (t) => {
  const disk = await startTestTarget({ type: 'blk', luns: ['0:0:ram:8M:512'] });
  t.teardown(() => disk.cleanup());
  const dir = mkdtempSync(join(tmpdir(), 'rpc-blk-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const server = await startRpcServer({ path: join(dir, 'rpc.sock') });
  t.teardown(() => server.close());
  const params = { name: 'D0', trtype: 'user', traddr: disk.socket };
  const wrong = await call(server.path, 'bdev_virtio_attach_controller', { ...params, dev_type: 'scsi' });
  t.is(wrong.error?.code, -5);
  t.regex(wrong.error?.message ?? '', /give dev_type "blk" \(-d blk\)\)$/);

  t.deepEqual((await call(server.path, 'bdev_virtio_attach_controller', { ...params, dev_type: 'blk' })).result, ['D0']);
  const dev = server.controllers.get('D0')!.controller.device('D0');
  await dev.write(0, Buffer.alloc(1024, 3));
  t.deepEqual(await dev.read(0, 2), Buffer.alloc(1024, 3));
  const stat = (await call(server.path, 'bdev_get_iostat', { name: 'D0' })).result as { bdevs: Array<Record<string, unknown>> };
  t.like(stat.bdevs, [{ name: 'D0', num_write_ops: 1, bytes_written: 1024, num_read_ops: 1, bytes_read: 1024 }]);
  t.deepEqual((await call(server.path, 'bdev_virtio_scsi_get_devices')).result, []);

  t.is((await call(server.path, 'bdev_virtio_detach_controller', { name: 'D0' })).result, true);
  t.is((await call(server.path, 'bdev_get_bdevs', { name: 'D0' })).error?.code, -19);
  t.is(server.controllers.size, 0);
});

testWhen(test, 'virtio_initiator_get_events: what the controllers reported since a cursor, and their state', initiatorRequirements, async (t) => {
  const target = await startTestTarget({ luns: ['0:0:ram:4M:512'] });
  t.teardown(() => target.cleanup());
  const control = await target.target.control();
  const dir = mkdtempSync(join(tmpdir(), 'rpc-events-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const server = await startRpcServer({ path: join(dir, 'rpc.sock') });
  t.teardown(() => server.close());
  await call(server.path, 'bdev_virtio_attach_controller', { name: 'Ev0', trtype: 'user', traddr: target.socket, dev_type: 'scsi' });

  type Answer = {
    cursor: number;
    dropped: number;
    events: Array<{ seq: number; controller: string; event: string; device?: string; detail?: Record<string, unknown> }>;
    controllers: Array<{ name: string; state: string; failure: string | null }>;
  };
  const events = async (params: Record<string, unknown>): Promise<Answer> => {
    const r = await call(server.path, 'virtio_initiator_get_events', params);
    if (r.error) throw new Error(r.error.message);
    return r.result as Answer;
  };
  const first = await events({});
  t.deepEqual(
    first.events.map((e) => [e.event, e.device ?? null]),
    [
      ['device-added', 'Ev0t0'],
      ['rescanned', null],
    ],
  );
  t.deepEqual(first.controllers, [{ name: 'Ev0', state: 'open', failure: null }]);

  /** Asks again from `cursor` until `want` shows up. */
  const waitFor = async (cursor: number, want: (e: Answer['events'][number]) => boolean): Promise<Answer> => {
    for (let i = 0; i < 100; i++) {
      const a = await events({ cursor });
      if (a.events.some(want)) return a;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error('the event never came');
  };
  await control.addLun('0:1:ram:2M:4096');
  const added = await waitFor(first.cursor, (e) => e.event === 'device-added' && e.device === 'Ev0t0l1');
  t.true(added.events.every((e) => e.seq > first.cursor), 'only events after the cursor');
  t.like(added.events.find((e) => e.device === 'Ev0t0l1')!.detail, { blockSize: 4096, blocks: '512' });

  await control.disconnect();
  const lost = await waitFor(added.cursor, (e) => e.event === 'failed');
  t.true(lost.events.some((e) => e.event === 'disconnected'));
  t.is(lost.controllers[0]!.state, 'failed');
  t.regex(lost.controllers[0]!.failure ?? '', /closed the connection/);

  const bad = await call(server.path, 'virtio_initiator_get_events', { name: 'Nope0' });
  t.is(bad.error?.code, -19);
});
