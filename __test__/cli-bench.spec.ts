// The command line: dispatch and help, one-line usage errors with exit status 2, `bench` through
// each request path against the bundled target (with verification on), in this thread and in
// worker threads with queues of their own (or shared ones), the same against its virtio-blk disk
// (--type blk), verification that catches data the target corrupts, and the `target` wrapper
// passing on arguments, exit status and signals.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import test, { type ExecutionContext, type ImplementationFn } from 'ava';

import { controllerBack, LatencyHistogram, mergeWorkloadResults, Verifier, type WorkloadResult, wordsOf } from '../ts/bench.js';
import type { ControlClient } from '../ts/bundled-target.js';
import { cli, type Run } from './helpers/cli.js';
import { repoRoot, requireTargetBinary, testWhen } from './helpers/env.js';
import { initiatorRequirements, startTestTarget } from './helpers/initiator.js';
import { startTarget } from './helpers/target.js';


interface BenchJson {
  api: string;
  device: string;
  blockSize: number;
  reads: number;
  writes: number;
  interrupts: boolean;
  rw: string;
  bs: number;
  qd: number;
  seconds: number;
  ios: number;
  iops: number;
  mbPerSecond: number;
  latencyUs: { mean: number; p50: number; p99: number; p999: number; max: number };
  errors: number;
  mismatches: number;
  mismatchLbas: number[];
  cpu: { initiator: number; target: number | null };
  workers: Array<{ queue: number; iops: number; shared: boolean }>;
}

/** The JSON object on the last line of stdout. */
function lastJson(r: Run): BenchJson {
  const lines = r.stdout.trimEnd().split('\n');
  return JSON.parse(lines[lines.length - 1]!) as BenchJson;
}

function describe(r: Run): string {
  return `exit ${r.code} (signal ${r.signal})\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`;
}

/** `firstQueue`: the index of the first request queue (virtio-scsi 2, after control and event; virtio-blk 0). */
function checkShape(t: ExecutionContext, j: BenchJson, workers = 1, firstQueue = 2): void {
  for (const k of ['mean', 'p50', 'p99', 'p999', 'max'] as const) {
    t.true(typeof j.latencyUs[k] === 'number' && j.latencyUs[k] >= 0, `latencyUs.${k}`);
  }
  t.true(j.latencyUs.p50 <= j.latencyUs.p99 && j.latencyUs.p99 <= j.latencyUs.p999 && j.latencyUs.p999 <= j.latencyUs.max);
  t.true(j.seconds > 0 && j.iops > 0 && j.mbPerSecond > 0);
  t.true(typeof j.cpu.initiator === 'number' && j.cpu.initiator >= 0);
  t.is(j.workers.length, workers);
  for (const w of j.workers) {
    t.true(Number.isInteger(w.queue) && w.queue >= firstQueue, `queue ${w.queue}`);
    t.true(w.iops > 0);
    t.is(typeof w.shared, 'boolean');
  }
  if (workers === 1) t.is(j.workers[0]!.iops, j.iops);
}

// ---- the pieces of bench -----------------------------------------------------------------------

test('the latency histogram keeps percentiles within 1%', (t) => {
  const h = new LatencyHistogram();
  // 1..100000 us, uniformly: the q-th percentile is q * 100000.
  for (let us = 1; us <= 100_000; us++) h.add(us);
  const s = h.summary();
  t.is(s.max, 100_000);
  t.true(Math.abs(s.mean - 50_000.5) < 0.1);
  for (const [got, want] of [
    [s.p50, 50_000],
    [s.p99, 99_000],
    [s.p999, 99_900],
  ] as const) {
    t.true(Math.abs(got - want) / want < 0.01, `${got} vs ${want}`);
  }
  const small = new LatencyHistogram();
  for (const us of [0.05, 0.1, 0.1, 3]) small.add(us);
  t.is(small.percentile(0.5), 0.1, 'below 128 ns every nanosecond has a bucket');
  t.is(new LatencyHistogram().summary().p99, 0);
});

test('merged histograms give the percentiles of all the samples', (t) => {
  const all = new LatencyHistogram();
  const parts = [new LatencyHistogram(), new LatencyHistogram(), new LatencyHistogram()];
  // Three threads with different latencies: the merge must not be an average of percentiles.
  for (let i = 0; i < 30_000; i++) {
    const us = i % 3 === 0 ? 10 + (i % 97) : i % 3 === 1 ? 100 + (i % 89) : 1000 + (i % 83) * 10;
    all.add(us);
    parts[i % 3]!.add(us);
  }
  const merged = new LatencyHistogram();
  for (const p of parts) merged.merge(p.state());
  t.deepEqual(merged.summary(), all.summary());
  t.is(LatencyHistogram.from(parts[2]!.state()).summary().p50, parts[2]!.summary().p50);
});

// A load whose requests fail while the controller reconnects waits for it on timers: it must
// never find the controller back before the reconnection has finished on the event loop, nor
// spin on microtasks (the reconnection could then never finish).
test('a load waits for a reconnecting controller on timers, until it is really back', async (t) => {
  const ctrl = { failure: null as string | null, reconnecting: true };
  let turned = false;
  setImmediate(() => (turned = true));
  setTimeout(() => (ctrl.reconnecting = false), 60);
  t.true(await controllerBack(ctrl));
  t.true(turned, 'the event loop turned before the answer');
  t.false(ctrl.reconnecting, 'not back while still reconnecting');
});

test('merged results add up and list mismatches by LBA', (t) => {
  const part = (firstLba: number, startedAt: number, ios: number, lbas: number[]): WorkloadResult => {
    const h = new LatencyHistogram();
    for (let i = 0; i < ios; i++) h.add(firstLba === 0 ? 50 : 500);
    return {
      api: 'promise',
      rw: 'randrw',
      readPercent: 50,
      ioBytes: 4096,
      queueDepth: 8,
      firstLba,
      regionBytes: 1 << 20,
      seed: 1,
      verify: true,
      startedAt,
      seconds: 1,
      ios,
      reads: ios / 2,
      writes: ios / 2,
      errors: 0,
      firstError: undefined,
      iops: ios,
      mbPerSecond: 0,
      latencyUs: h.summary(),
      latencyHistogram: h.state(),
      cpuSeconds: 1,
      mismatches: lbas.length,
      mismatchList: lbas.map((lba) => ({ lba, detail: 'x' })),
      queue: firstLba === 0 ? 2 : 3,
      shared: false,
      interrupted: false,
      lost: firstLba === 0 ? 2 : 5,
    };
  };
  const m = mergeWorkloadResults([part(2048, 1000.5, 3000, [4000, 2048]), part(0, 1000, 1000, [8, 16])], 1.5);
  t.is(m.ios, 4000);
  t.is(m.seconds, 1.0005, 'from the first start to the last end');
  t.is(m.iops, Math.round(4000 / 1.0005));
  t.is(m.cpuSeconds, 1.5);
  t.is(m.mismatches, 4);
  t.is(m.lost, 7);
  t.deepEqual(
    m.mismatchList.map((x) => x.lba),
    [8, 16, 2048, 4000],
  );
  t.is(m.firstLba, 0);
  t.is(m.regionBytes, 2 << 20);
  // Three quarters of the requests took 500 us.
  t.true(Math.abs(m.latencyUs.p50 - 500) < 5, `p50 ${m.latencyUs.p50}`);
  t.true(Math.abs(m.latencyUs.mean - 387.5) < 0.1, `mean ${m.latencyUs.mean}`);
});

test('the verifier checks written blocks, skips unknown ones and names what it found', (t) => {
  const bs = 512;
  const v = new Verifier(bs, 64, 7);
  const buf = Buffer.alloc(8 * bs);
  const words = wordsOf(buf);
  const gen = v.stamp(words, 0, 16, 8);
  v.written(16, 8, gen, true);
  t.true(v.check(words, 0, 16, 8), 'what was written reads back fine');
  const other = wordsOf(Buffer.alloc(8 * bs));
  v.written(24, 8, v.stamp(other, 0, 24, 8), true);
  t.false(v.check(words, 0, 24, 8), 'data of another LBA is wrong');

  const copy = Buffer.from(buf);
  copy[3 * bs + 100] = copy[3 * bs + 100]! ^ 1;
  t.false(v.check(wordsOf(copy), 0, 16, 8), 'one flipped bit in a block is found');
  t.is(v.mismatches, 2);
  const list = v.list();
  t.deepEqual(
    list.map((m) => m.lba),
    [16, 24],
    'one entry per unit, by LBA',
  );
  t.regex(list[1]!.detail, /stamp of LBA 16 generation \d+ seed 7, expected LBA 24/);

  // A failed write leaves its blocks unknown: whatever is there is accepted until rewritten.
  v.written(16, 8, v.stamp(words, 0, 16, 8), false);
  t.true(v.check(wordsOf(Buffer.alloc(8 * bs)), 0, 16, 8));
  // Blocks never written are not checked.
  t.true(v.check(wordsOf(Buffer.alloc(8 * bs, 0xee)), 0, 40, 8));
  t.is(v.mismatches, 2);
});

// ---- no target needed ------------------------------------------------------------------------

test('--help lists the subcommands and exits 0', async (t) => {
  const r = await cli(['--help']);
  t.is(r.code, 0, describe(r));
  t.regex(r.stdout, /^\s+bench\s/m);
  t.regex(r.stdout, /^\s+target\s/m);
});

test('bench --help describes its options and exits 0', async (t) => {
  const r = await cli(['bench', '--help']);
  t.is(r.code, 0, describe(r));
  const options = ['--api', '--rw', '--bs', '--qd', '--time', '--ios', '--verify', '--json'];
  options.push('--socket', '--pci', '--type', '--target-lun', '--device', '--seed', '--size', '--workers');
  for (const o of options) t.true(r.stdout.includes(o), `help mentions ${o}`);
});

test('an unknown subcommand is exit 2 with one line naming it', async (t) => {
  const r = await cli(['frobnicate']);
  t.is(r.code, 2, describe(r));
  t.is(r.stderr.trimEnd().split('\n').length, 1, r.stderr);
  t.regex(r.stderr, /unknown subcommand "frobnicate"/);
});

const badArguments: Array<[string[], RegExp]> = [
  [['--qd', '0'], /--qd "0": expected an integer from 1 to/],
  [['--qd=abc'], /--qd "abc": expected an integer/],
  [['--bs', '1000'], /--bs "1000": expected a multiple of 512/],
  [['--bs', '4q'], /--bs "4q": expected a size/],
  [['--rw', 'sideways'], /--rw "sideways": expected one of randread, randwrite, read, write, randrw/],
  [['--api', 'telepathy'], /--api "telepathy": expected one of promise, batch, native/],
  [['--frobnicate'], /unknown argument --frobnicate/],
  [['--frobnicate=1'], /unknown argument --frobnicate/],
  [['--time'], /--time needs a value/],
  [['--time', '0'], /--time "0": expected a number above 0/],
  [['--mix', '150', '--rw', 'randrw'], /--mix "150": expected a percentage from 0 to 100/],
  [['--mix', '30'], /--mix applies to --rw randrw only/],
  [['--workers', '0'], /--workers "0": expected an integer from 1 to 64/],
  [['--workers', '3', '--ios', '2'], /--ios 2 with --workers 3: expected at least one request per worker/],
  [['--api', 'native', '--verify'], /--verify is not supported with --api native/],
  [['--qd', '2', '--qd', '3'], /--qd is given more than once/],
  [['--json=yes'], /--json takes no value/],
  [['--socket', '/nonexistent', '--target-lun', '0:0:ram:1M'], /--target-lun is for the bundled target/],
  [['--target-lun', 'ram'], /--target-lun "ram": expected T:L:/],
  [['--type', 'nvme'], /--type "nvme": expected scsi or blk/],
  [['--config', 'x.conf', '--type', 'blk'], /--type comes from the configuration with --config/],
  [['--type', 'blk', '--target-lun', '0:0:ram:1M', '--target-lun', '0:1:ram:1M'], /--type blk: the bundled target serves one disk \(give --target-lun once\)/],
  [['--type', 'blk', '--target-lun', '1:0:ram:1M'], /--target-lun "1:0:ram:1M": expected the one disk of --type blk, 0:0:KIND:/],
  [['extra'], /unexpected argument "extra"/],
];

for (const [args, message] of badArguments) {
  test(`bench ${args.join(' ')} is exit 2 with one line naming the argument`, async (t) => {
    const r = await cli(['bench', ...args]);
    t.is(r.code, 2, describe(r));
    const lines = r.stderr.trimEnd().split('\n');
    t.is(lines.length, 1, r.stderr);
    t.regex(lines[0]!, /^virtio-initiator bench: /);
    t.regex(lines[0]!, message);
    t.is(r.stdout, '');
  });
}

// ---- the target wrapper ----------------------------------------------------------------------

testWhen(test, 'target passes arguments and the exit status through', [requireTargetBinary], async (t) => {
  const help = await cli(['target', '--help']);
  t.is(help.code, 0, describe(help));
  t.regex(help.stdout, /vhost-user-scsi-target --socket PATH/);
  const wrong = await cli(['target', '--socket']);
  t.is(wrong.code, 2, describe(wrong));
  t.regex(wrong.stderr, /--socket/);
});

testWhen(test, 'target forwards SIGTERM and exits with the target\'s status', [requireTargetBinary], async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vi-cli-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const socket = join(dir, 'vhost.sock');
  let pid: number | undefined;
  const running = cli(['target', '--socket', socket, '--lun', '0:0:null:1G'], { timeoutMs: 30_000, onSpawn: (p) => (pid = p) });
  for (let i = 0; i < 400 && !existsSync(socket); i++) await sleep(25);
  t.true(existsSync(socket), 'the target listens');
  process.kill(pid!, 'SIGTERM');
  const r = await running;
  // The target exits in order on SIGTERM (removing its socket) with 128 + 15.
  t.is(r.code, 143, describe(r));
  t.false(existsSync(socket), 'the socket is removed');
  t.regex(r.stdout, /"event":"listening"/, 'its stdout is ours');
});

// ---- bench against the bundled target ----------------------------------------------------------

const bench = (title: string, impl: ImplementationFn<[]>) => testWhen(test.serial, title, initiatorRequirements, impl);

bench('bench --api promise --rw randrw --verify: no errors, no mismatches', async (t) => {
  const r = await cli(['bench', '--json', '--api', 'promise', '--rw', 'randrw', '--verify', '--ios', '3000']);
  t.is(r.code, 0, describe(r));
  const j = lastJson(r);
  t.is(j.api, 'promise');
  t.is(j.rw, 'randrw');
  t.is(j.bs, 4096);
  t.is(j.qd, 32);
  t.true(j.ios >= 3000, `ios ${j.ios}`);
  t.is(j.errors, 0);
  t.is(j.mismatches, 0);
  t.deepEqual(j.mismatchLbas, []);
  // We started the target, so its CPU time is known.
  t.true(typeof j.cpu.target === 'number');
  checkShape(t, j);
});

bench('bench --api batch --rw randrw --verify: no errors, no mismatches', async (t) => {
  const r = await cli(['bench', '--json', '--api', 'batch', '--rw', 'randrw', '--verify', '--ios', '3000'].concat(
    ['--qd', '16', '--bs', '8k'],
  ));
  t.is(r.code, 0, describe(r));
  const j = lastJson(r);
  t.is(j.api, 'batch');
  t.is(j.bs, 8192);
  t.is(j.qd, 16);
  t.true(j.ios >= 3000, `ios ${j.ios}`);
  t.is(j.errors, 0);
  t.is(j.mismatches, 0);
  checkShape(t, j);
});

bench('bench --api native --rw randread --ios 20000 runs exactly that many', async (t) => {
  const r = await cli(['bench', '--json', '--api', 'native', '--rw', 'randread', '--ios', '20000']);
  t.is(r.code, 0, describe(r));
  const j = lastJson(r);
  t.is(j.api, 'native');
  t.is(j.ios, 20000);
  t.is(j.errors, 0);
  checkShape(t, j);
});

bench('bench without --json prints the human summary', async (t) => {
  const r = await cli(['bench', '--time', '0.5', '--qd', '4']);
  t.is(r.code, 0, describe(r));
  for (const label of [/^IOPS\s+\d+/m, /^MB\/s\s+[\d.]+/m, /p99\.9 [\d.]+/, /^errors\s+0/m, /^CPU\s+initiator/m]) {
    t.regex(r.stdout, label);
  }
});

bench('bench --bs that is not a multiple of the block size is exit 2 naming --bs', async (t) => {
  const r = await cli(['bench', '--target-lun', '0:0:null:64M:4096', '--bs', '3k', '--ios', '10']);
  t.is(r.code, 2, describe(r));
  const lines = r.stderr.trimEnd().split('\n');
  t.is(lines.length, 1, r.stderr);
  t.regex(lines[0]!, /--bs "3k": expected a multiple of the 4096-byte blocks/);
});

bench('bench --qd above the queue size is exit 2 naming --qd', async (t) => {
  const r = await cli(['bench', '--qd', '1024', '--ios', '10']);
  t.is(r.code, 2, describe(r));
  t.regex(r.stderr.trimEnd(), /^virtio-initiator bench: --qd "1024": expected at most \d+/);
});

// ---- virtio-blk (--type blk) ---------------------------------------------------------------------

for (const api of ['promise', 'batch'] as const) {
  bench(`bench --type blk --api ${api} --rw randrw --verify on the bundled target's disk: no errors, no mismatches`, async (t) => {
    const r = await cli(['bench', '--json', '--type', 'blk', '--api', api, '--rw', 'randrw', '--verify', '--ios', '3000']);
    t.is(r.code, 0, describe(r));
    const j = lastJson(r);
    t.is(j.api, api);
    t.is(j.device, 'VirtioBlk0', 'the one disk, named after the controller');
    t.is(j.blockSize, 512, 'the default writable disk, 0:0:ram:256M:512');
    t.true(j.ios >= 3000, `ios ${j.ios}`);
    t.true(j.reads > 0 && j.writes > 0, `${j.reads} reads, ${j.writes} writes`);
    t.is(j.errors, 0);
    t.is(j.mismatches, 0);
    t.true(typeof j.cpu.target === 'number', 'bench started the target');
    checkShape(t, j, 1, 0);
  });
}

bench('bench --type blk --api native runs exactly --ios on the disk', async (t) => {
  const r = await cli(['bench', '--json', '--type', 'blk', '--api', 'native', '--rw', 'randrw', '--ios', '20000']);
  t.is(r.code, 0, describe(r));
  const j = lastJson(r);
  t.is(j.device, 'VirtioBlk0');
  t.is(j.ios, 20000);
  t.is(j.reads + j.writes, 20000);
  t.true(j.reads > 0 && j.writes > 0);
  t.is(j.errors, 0);
  checkShape(t, j, 1, 0);
});

bench('bench --type blk --workers 2 --api batch --verify: a queue each, no mismatches', async (t) => {
  const r = await cli(['bench', '--json', '--type', 'blk', '--workers', '2', '--api', 'batch', '--rw', 'randrw', '--verify', '--ios', '4000']);
  t.is(r.code, 0, describe(r));
  const j = lastJson(r);
  t.true(j.ios >= 4000, `ios ${j.ios}`);
  t.is(j.errors, 0);
  t.is(j.mismatches, 0);
  checkShape(t, j, 2, 0);
  t.deepEqual(queuesOf(j).sort(), [0, 1]);
});

for (const type of ['scsi', 'blk'] as const) {
  bench(`bench --type ${type} --target-poll --workers 2: the polling target serves both queues, every read verified`, async (t) => {
    const args = ['--type', type, '--target-poll', '--target-queues', '2', '--workers', '2', '--api', 'batch', '--rw', 'randrw', '--verify', '--ios', '4000'];
    const r = await cli(['bench', '--json', ...args]);
    t.is(r.code, 0, describe(r));
    const j = lastJson(r);
    t.true(j.ios >= 4000, `ios ${j.ios}`);
    t.true(j.reads > 0 && j.writes > 0, `${j.reads} reads, ${j.writes} writes`);
    t.is(j.errors, 0);
    t.is(j.mismatches, 0);
    const first = type === 'blk' ? 0 : 2;
    checkShape(t, j, 2, first);
    t.deepEqual(queuesOf(j).sort(), [first, first + 1]);
  });
}

bench('bench --type blk --workers 3 --api promise on 2 target queues shares a queue, data still verified', async (t) => {
  const args = ['--type', 'blk', '--workers', '3', '--target-queues', '2', '--api', 'promise', '--rw', 'randrw', '--verify', '--ios', '3000'];
  const r = await cli(['bench', '--json', ...args]);
  t.is(r.code, 0, describe(r));
  const j = lastJson(r);
  t.is(j.errors, 0);
  t.is(j.mismatches, 0);
  checkShape(t, j, 3, 0);
  const queues = queuesOf(j);
  t.deepEqual([...new Set(queues)].sort(), [0, 1]);
  t.true(j.workers.filter((w) => w.shared).length >= 2, `workers ${JSON.stringify(j.workers)}`);
});

bench('bench --type blk --socket: every write reaches the virtio-blk target, --device names its disk, no --type says what to give', async (t) => {
  const s = await startTestTarget({ type: 'blk', luns: ['0:0:ram:16M:4096'] });
  t.teardown(() => s.cleanup());
  const r = await cli(['bench', '--socket', s.socket, '--type', 'blk', '--device', 'VirtioBlk0', '--json', '--rw', 'randwrite', '--verify', '--ios', '2000']);
  t.is(r.code, 0, describe(r));
  const j = lastJson(r);
  t.is(j.blockSize, 4096);
  t.is(j.writes, 2000);
  t.is(j.errors, 0);
  t.is(j.mismatches, 0, 'the read-back after the run found every block as written');
  t.is(j.cpu.target, null);
  const queues = (await (await s.target.control()).stats()).queues as Array<{ bytes_out: number; requests: number }>;
  t.is(queues.reduce((n, q) => n + q.bytes_out, 0), 2000 * 4096, 'the target received every byte written');

  const unknown = await cli(['bench', '--socket', s.socket, '--type', 'blk', '--device', 'VirtioBlk0t0', '--ios', '10']);
  t.is(unknown.code, 2, describe(unknown));
  t.regex(unknown.stderr, /--device "VirtioBlk0t0": expected one of VirtioBlk0$/m);

  const untyped = await cli(['bench', '--socket', s.socket, '--ios', '10']);
  t.is(untyped.code, 1, describe(untyped));
  t.regex(untyped.stderr.trim(), /^virtio-initiator bench: cannot open vhost-user socket .* \(opened as virtio-scsi; if the target is a virtio-blk one, give --type blk\)$/);
});

bench('bench --type blk --target-lun: the bundled target serves that disk', async (t) => {
  const r = await cli(['bench', '--json', '--type', 'blk', '--target-lun', '0:0:ram:32M:4096', '--rw', 'randrw', '--verify', '--ios', '1000']);
  t.is(r.code, 0, describe(r));
  const j = lastJson(r);
  t.is(j.blockSize, 4096);
  t.is(j.errors, 0);
  t.is(j.mismatches, 0);
});

bench('bench --config loads a virtio-blk disk the file names (Type Blk) beside a virtio-scsi one', async (t) => {
  const a = await startTestTarget({ luns: ['0:0:ram:16M:512'] });
  t.teardown(() => a.cleanup());
  const b = await startTestTarget({ type: 'blk', luns: ['0:0:ram:16M:4096'] });
  t.teardown(() => b.cleanup());
  const dir = mkdtempSync(join(tmpdir(), 'bench-config-blk-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const ini = join(dir, 'virtio.conf');
  writeFileSync(ini, `[VirtioUser0]\n  Path ${a.socket}\n[VirtioUser1]\n  Path ${b.socket}\n  Type Blk\n  Name Disk\n`);
  const r = await cli(['bench', '--json', '--config', ini, '--device', 'Disk', '--rw', 'randrw', '--verify', '--ios', '2000']);
  t.is(r.code, 0, describe(r));
  const j = lastJson(r);
  t.is(j.device, 'Disk');
  t.is(j.blockSize, 4096);
  t.true(j.ios >= 2000);
  t.is(j.errors, 0);
  t.is(j.mismatches, 0);
});

// ---- verification catches corrupted data --------------------------------------------------------

const LUN_BYTES = 16 << 20;
const REGION = 4 << 20;

/**
 * A target of our own with a control socket; the `corrupt` fault flips the first byte of every
 * 512 of the next `count` READs' data and still reports GOOD. Nothing reads before the run (the
 * scan sends no READ), so every corrupted READ is one of the bench's, and every one of those
 * lands on written blocks: the fill pass of --rw randread writes the whole region first.
 */
bench('bench --verify reports reads that return corrupted data (exit 1)', async (t) => {
  const s = await startTestTarget({ luns: [`0:0:ram:${LUN_BYTES}:512`] });
  t.teardown(() => s.cleanup());
  const corrupted = 5;
  await (await s.target.control()).inject(0, 0, 'corrupt', corrupted);
  const region = ['--size', String(REGION)];
  const r = await cli(['bench', '--socket', s.socket, '--json', '--verify', '--rw', 'randread', ...region, '--ios', '2000']);
  t.is(r.code, 1, describe(r));
  const j = lastJson(r);
  t.is(j.errors, 0, 'corrupted reads still end with GOOD');
  t.is(j.mismatches, corrupted, 'one mismatch per corrupted 4 KiB read');
  t.true(j.mismatchLbas.length > 0 && j.mismatchLbas.length <= corrupted);
  const units = REGION / 4096;
  for (const lba of j.mismatchLbas) {
    t.true(Number.isInteger(lba) && lba >= 0 && lba < LUN_BYTES / 512, `LBA ${lba} is on the device`);
    t.is(lba % 8, 0, `LBA ${lba} is aligned to --bs (8 blocks)`);
    t.true(lba / 8 < units, `LBA ${lba} is inside --size`);
  }
  t.deepEqual([...j.mismatchLbas].sort((a, b) => a - b), j.mismatchLbas, 'listed by LBA');
  t.is(j.cpu.target, null, 'a target we did not start is not measured');
});

bench('bench --verify of a write-only run reads back what it wrote (batch path)', async (t) => {
  const s = await startTestTarget({ luns: [`0:0:ram:${LUN_BYTES}:512`] });
  t.teardown(() => s.cleanup());
  // Writes are untouched; the first READ is the read-back's first 256 KiB request.
  await (await s.target.control()).inject(0, 0, 'corrupt', 1);
  const common = ['bench', '--socket', s.socket, '--verify', '--api', 'batch', '--size', String(REGION)];
  const r = await cli([...common, '--rw', 'randwrite', '--ios', '4000']);
  t.is(r.code, 1, describe(r));
  t.regex(r.stdout, /^mismatches\s+[1-9]\d*/m);
  t.regex(r.stdout, /^ {2}LBA \d+: .*stamp damaged/m);

  const clean = await cli([...common, '--json', '--rw', 'write', '--ios', '2000']);
  t.is(clean.code, 0, describe(clean));
  t.is(lastJson(clean).mismatches, 0);
});

// ---- worker threads ----------------------------------------------------------------------------

/** Workers queues: distinct when each has one of its own. */
/** Data-in bytes the target has sent over all its request queues: the bench is moving data. */
async function bytesSent(control: ControlClient): Promise<number> {
  const queues = (await control.stats()).queues as Array<{ bytes_in: number }>;
  return queues.reduce((n, q) => n + q.bytes_in, 0);
}

function queuesOf(j: BenchJson): number[] {
  return j.workers.map((w) => w.queue);
}

for (const api of ['promise', 'batch'] as const) {
  bench(`bench --workers 2 --api ${api} --rw randrw --verify: a queue each, no errors, no mismatches`, async (t) => {
    const r = await cli(['bench', '--json', '--workers', '2', '--api', api, '--rw', 'randrw', '--verify', '--ios', '4000']);
    t.is(r.code, 0, describe(r));
    const j = lastJson(r);
    t.is(j.api, api);
    t.true(j.ios >= 4000, `ios ${j.ios}`);
    t.is(j.errors, 0);
    t.is(j.mismatches, 0);
    checkShape(t, j, 2);
    t.is(new Set(queuesOf(j)).size, 2, `queues ${queuesOf(j).join(', ')}`);
    t.deepEqual(
      j.workers.map((w) => w.shared),
      [false, false],
    );
  });
}

bench('bench --workers 2 --api native runs the request count across both, a queue each', async (t) => {
  const r = await cli(['bench', '--json', '--workers', '2', '--api', 'native', '--rw', 'randread', '--ios', '20000']);
  t.is(r.code, 0, describe(r));
  const j = lastJson(r);
  t.is(j.ios, 20000);
  t.is(j.errors, 0);
  checkShape(t, j, 2);
  t.is(new Set(queuesOf(j)).size, 2, `queues ${queuesOf(j).join(', ')}`);
});

bench('bench --workers 3 on 2 target queues shares a queue, data still verified', async (t) => {
  const args = ['--workers', '3', '--target-queues', '2', '--api', 'promise', '--verify', '--ios', '3000'];
  const r = await cli(['bench', '--json', ...args]);
  t.is(r.code, 0, describe(r));
  const j = lastJson(r);
  t.true(j.ios >= 3000, `ios ${j.ios}`);
  t.is(j.errors, 0);
  t.is(j.mismatches, 0);
  checkShape(t, j, 3);
  const queues = queuesOf(j);
  const sharing = j.workers.filter((w) => w.shared || queues.filter((q) => q === w.queue).length > 1);
  t.true(sharing.length >= 2, `workers ${JSON.stringify(j.workers)}`);
  t.true(new Set(queues).size <= 2);
});

bench('bench --workers with --api native needs a queue per worker (exit 2)', async (t) => {
  const r = await cli(['bench', '--workers', '3', '--target-queues', '2', '--api', 'native', '--ios', '100']);
  t.is(r.code, 2, describe(r));
  t.regex(r.stderr.trimEnd(), /^virtio-initiator bench: --workers "3": expected at most 2, the request queues/);
});

bench('bench --workers 2 --verify merges the mismatches of both workers by LBA (exit 1)', async (t) => {
  const s = await startTestTarget({ luns: [`0:0:ram:${LUN_BYTES}:512`], queues: 2 });
  t.teardown(() => s.cleanup());
  const corrupted = 6;
  await (await s.target.control()).inject(0, 0, 'corrupt', corrupted);
  const args = ['--socket', s.socket, '--json', '--workers', '2', '--verify', '--rw', 'randread', '--size', String(REGION)];
  const r = await cli(['bench', ...args, '--ios', '4000']);
  t.is(r.code, 1, describe(r));
  const j = lastJson(r);
  t.is(j.errors, 0);
  t.is(j.mismatches, corrupted, 'one mismatch per corrupted read, whichever worker did it');
  t.deepEqual([...j.mismatchLbas].sort((a, b) => a - b), j.mismatchLbas, 'listed by LBA');
  for (const lba of j.mismatchLbas) t.true(lba % 8 === 0 && lba < REGION / 512, `LBA ${lba}`);
  checkShape(t, j, 2);
});

bench('bench --interrupts runs the promise path on the queue interrupt, data verified', async (t) => {
  const r = await cli(['bench', '--json', '--interrupts', '--rw', 'randrw', '--verify', '--qd', '1', '--ios', '2000']);
  t.is(r.code, 0, describe(r));
  const j = lastJson(r);
  t.is(j.interrupts, true);
  t.true(j.ios >= 2000, `ios ${j.ios}`);
  t.is(j.errors, 0);
  t.is(j.mismatches, 0);
});

bench('bench --interrupts with --api batch is exit 2 naming --interrupts', async (t) => {
  const r = await cli(['bench', '--interrupts', '--api', 'batch', '--ios', '10']);
  t.is(r.code, 2);
  t.regex(r.stderr.trim(), /--interrupts applies to --api promise only/);
});

bench('bench --config loads the disk --device names among every controller of the file', async (t) => {
  const a = await startTestTarget({ luns: ['0:0:ram:16M:512'] });
  t.teardown(() => a.cleanup());
  const b = await startTestTarget({ luns: ['0:0:ram:32M:4096'] });
  t.teardown(() => b.cleanup());
  const dir = mkdtempSync(join(tmpdir(), 'bench-config-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const ini = join(dir, 'virtio.conf');
  writeFileSync(ini, `[VirtioUser0]\n  Path ${a.socket}\n  Name First\n[VirtioUser1]\n  Path ${b.socket}\n  Name Second\n`);
  const r = await cli(['bench', '--json', '--config', ini, '--device', 'Secondt0', '--rw', 'randrw', '--verify', '--ios', '2000']);
  t.is(r.code, 0, describe(r));
  const j = lastJson(r);
  t.is(j.device, 'Secondt0');
  t.true(j.ios >= 2000);
  t.is(j.errors, 0);
  t.is(j.mismatches, 0);
  const unknown = await cli(['bench', '--config', ini, '--device', 'Thirdt0', '--ios', '10']);
  t.is(unknown.code, 2);
  t.regex(unknown.stderr, /--device "Thirdt0": expected one of Firstt0, Secondt0/);
});

bench('bench prints what the controller reports while it runs (a LUN added, a capacity change)', async (t) => {
  const s = await startTestTarget({ luns: [`0:0:ram:${LUN_BYTES}:512`] });
  t.teardown(() => s.cleanup());
  const control = await s.target.control();
  const run = cli(['bench', '--socket', s.socket, '--json', '--rw', 'randread', '--size', String(REGION), '--time', '3']);
  // Once the bench moves data (its scan is done by then), the target changes under it.
  const moved = (): Promise<number> => bytesSent(control);
  for (let i = 0; i < 200 && (await moved()) < REGION; i++) await sleep(25);
  await control.addLun('0:1:ram:1M:512');
  await control.resizeLun(0, 0, `${(LUN_BYTES >> 20) * 2}M`);
  const r = await run;
  t.is(r.code, 0, describe(r));
  t.regex(r.stderr, /virtio-initiator bench: event VirtioScsi0 device-added VirtioScsi0t0l1 /);
  t.regex(r.stderr, /virtio-initiator bench: event VirtioScsi0 capacity-changed VirtioScsi0t0 \{"before":/);
});

bench('bench --type blk prints a capacity change of the disk while it runs', async (t) => {
  const s = await startTestTarget({ type: 'blk', luns: [`0:0:ram:${LUN_BYTES}:512`] });
  t.teardown(() => s.cleanup());
  const control = await s.target.control();
  const run = cli(['bench', '--socket', s.socket, '--type', 'blk', '--json', '--rw', 'randread', '--size', String(REGION), '--time', '4']);
  const moved = (): Promise<number> => bytesSent(control);
  for (let i = 0; i < 200 && (await moved()) < REGION; i++) await sleep(25);
  await control.resizeLun(0, 0, `${(LUN_BYTES >> 20) * 2}M`);
  const r = await run;
  t.is(r.code, 0, describe(r));
  const m = /virtio-initiator bench: event VirtioBlk0 capacity-changed VirtioBlk0 (\{.*\})/.exec(r.stderr);
  t.truthy(m, r.stderr);
  const detail = JSON.parse(m![1]!) as { before: { blocks: string }; after: { blocks: string } };
  t.deepEqual([detail.before.blocks, detail.after.blocks], [String(LUN_BYTES / 512), String((2 * LUN_BYTES) / 512)]);
});

for (const [api, workers, type] of [['promise', 1, 'scsi'], ['promise', 2, 'scsi'], ['batch', 1, 'scsi'], ['promise', 2, 'blk']] as const) {
bench(`bench --type ${type} --api ${api} --workers ${workers} --reconnect --verify rides out a target that drops the connection again and again: no errors, no mismatches`, async (t) => {
  const s = await startTestTarget({ type, luns: [`0:0:ram:${LUN_BYTES}:512`], queues: workers });
  t.teardown(() => s.cleanup());
  const control = await s.target.control();
  const name = type === 'blk' ? 'VirtioBlk0' : 'VirtioScsi0';
  // Time enough for every cut and its reconnection on a loaded machine: a cut the run's end
  // overtakes has no reconnection to count.
  const run = cli(['bench', '--socket', s.socket, '--type', type, '--json', '--reconnect', '--verify', '--rw', 'randrw', '--size', String(REGION), '--time', '8', '--workers', String(workers), '--api', api]);
  const moved = (): Promise<number> => bytesSent(control);
  for (let i = 0; i < 200 && (await moved()) < REGION; i++) await sleep(25);
  // Each cut waits for the bench to move a megabyte over its new connection (the old one may
  // finish a batch it had begun).
  const CUTS = 5;
  for (let cut = 0; cut < CUTS; cut++) {
    const before = await moved();
    for (let i = 0; i < 400 && (await moved()) < before + (1 << 20); i++) await sleep(25);
    // A cut that finds no connection (the bench between two) is tried again shortly.
    let cutOne = false;
    for (let i = 0; i < 40 && !cutOne; i++) {
      cutOne = (await control.disconnect()).connections === 1;
      if (!cutOne) await sleep(50);
    }
    t.true(cutOne, `cut ${cut + 1}`);
  }
  const r = await run;
  t.is(r.code, 0, describe(r));
  const rep = JSON.parse(r.stdout.trim().split('\n').pop()!) as { reconnects: number; lost: number; errors: number; mismatches: number; ios: number; writes: number };
  t.is(rep.reconnects, CUTS);
  t.is(rep.errors, 0);
  t.is(rep.mismatches, 0);
  t.true(rep.ios > 0 && rep.writes > 0, `${rep.ios} requests, ${rep.writes} writes`);
  t.log(`${rep.ios} requests, ${rep.lost} lost with the connection, ${rep.reconnects} reconnects`);
  t.true(r.stderr.includes(`virtio-initiator bench: event ${name} disconnected `), r.stderr);
  t.regex(r.stderr, new RegExp(`virtio-initiator bench: event ${name} reconnected \\{"attempts":\\d+\\}`));
});
}

// What a crashed target looks like: killed outright and started again on the same socket and
// image file. The load rides it out with every block it reads back right.
bench('bench --reconnect --verify rides out a target killed (SIGKILL) and started again on its file: no errors, no mismatches', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'vi-bench-kill-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const image = join(dir, 'disk.img');
  writeFileSync(image, '');
  truncateSync(image, LUN_BYTES);
  const socket = join(dir, 'vhost.sock');
  const control = join(dir, 'control.sock');
  const luns = [`0:0:file:${image}:512`];
  let target = await startTarget({ socket, control, luns });
  t.teardown(() => target.stop());
  const run = cli(['bench', '--socket', socket, '--json', '--reconnect', '--verify', '--rw', 'randrw', '--size', String(REGION), '--time', '6']);
  const moved = async (): Promise<number> => bytesSent(await target.control());
  for (let i = 0; i < 200 && (await moved()) < REGION; i++) await sleep(25);
  const KILLS = 2;
  for (let k = 0; k < KILLS; k++) {
    await sleep(500);
    const old = target;
    old.child.kill('SIGKILL');
    await new Promise((r) => old.child.once('exit', r));
    rmSync(socket, { force: true });
    rmSync(control, { force: true });
    target = await startTarget({ socket, control, luns });
  }
  const r = await run;
  t.is(r.code, 0, describe(r));
  const rep = lastJson(r) as BenchJson & { reconnects: number; lost: number; mismatches: number; errors: number; writes: number };
  t.is(rep.reconnects, KILLS);
  t.is(rep.errors, 0);
  t.is(rep.mismatches, 0);
  t.true(rep.ios > 0 && rep.writes > 0, `${rep.ios} requests, ${rep.writes} writes`);
  t.log(`${rep.ios} requests, ${rep.lost} lost with the target, ${rep.reconnects} reconnects`);
});
