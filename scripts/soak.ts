// A long verified load against the bundled target while the target misbehaves: every few
// seconds it cuts the connection, or answers with BUSY, TASK SET FULL or late completions.
//   npm run build && node --import tsx scripts/soak.ts [--minutes M] [--every S] [--seed N]
// The load is `virtio-initiator bench --reconnect --verify --rw randrw`; the run passes when it
// ends with no errors, no mismatches and one reconnect per cut connection. Prints one line per
// disturbance and the bench's JSON result; exits 1 when the run did not pass.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

import { startTarget } from '../ts/bundled-target.js';

const { values } = parseArgs({
  options: {
    minutes: { type: 'string', default: '5' },
    every: { type: 'string', default: '5' },
    seed: { type: 'string', default: '1' },
  },
  strict: true,
});
const minutes = Number(values.minutes);
const every = Number(values.every);
if (!(minutes > 0) || !(every > 0)) {
  process.stderr.write('soak: --minutes and --every must be positive numbers\n');
  process.exit(2);
}

const root = new URL('..', import.meta.url).pathname;
const dir = mkdtempSync(join(tmpdir(), 'vi-soak-'));
const socket = join(dir, 'vhost.sock');
const target = await startTarget({ socket, control: join(dir, 'control.sock'), luns: ['0:0:ram:256M:512'] });
const control = await target.control();

const seconds = Math.round(minutes * 60);
const bench = spawn(
  process.execPath,
  [join(root, 'dist/cli/main.js'), 'bench', '--socket', socket, '--reconnect', '--verify', '--rw', 'randrw', '--size', '64M',
    '--time', String(seconds), '--seed', values.seed, '--json'],
  { stdio: ['ignore', 'pipe', 'inherit'] },
);
let out = '';
bench.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
const exited = new Promise<number>((resolve) => bench.once('exit', (code) => resolve(code ?? 1)));

// Disturbances in turn; a cut connection every other time.
const faults = [
  () => control.inject(0, 0, 'busy', 3),
  () => control.inject(0, 0, 'task_set_full', 3),
  () => control.inject(0, 0, 'delay', 20, { ms: 30 }),
];
let cuts = 0;
let turn = 0;
const t0 = Date.now();
const timer = setInterval(() => {
  const at = ((Date.now() - t0) / 1000).toFixed(1);
  const cut = turn % 2 === 0;
  const act = cut ? control.disconnect() : faults[(turn >> 1) % faults.length]!();
  const what = cut ? 'connection cut' : ['BUSY x3', 'TASK SET FULL x3', '20 completions 30 ms late'][(turn >> 1) % faults.length];
  turn++;
  void act.then(
    (r) => {
      if (cut && (r as { connections?: number }).connections === 1) cuts++;
      process.stderr.write(`soak: ${at} s: ${what}\n`);
    },
    (e: unknown) => process.stderr.write(`soak: ${at} s: ${what} failed: ${String(e)}\n`),
  );
}, every * 1000);

const code = await exited;
clearInterval(timer);
await target.stop();
rmSync(dir, { recursive: true, force: true });

const line = out.trim().split('\n').pop() ?? '';
process.stdout.write(`${line}\n`);
const r = JSON.parse(line) as { ios: number; errors: number; mismatches: number; reconnects: number; lost: number };
const passed = code === 0 && r.errors === 0 && r.mismatches === 0 && r.reconnects === cuts;
process.stderr.write(
  `soak: ${seconds} s, ${r.ios} requests, ${cuts} connections cut, ${r.reconnects} reconnects, ${r.lost} requests lost ` +
    `with them, ${r.errors} errors, ${r.mismatches} mismatches: ${passed ? 'passed' : 'FAILED'}\n`,
);
process.exit(passed ? 0 : 1);
