// A long verified load against the bundled target while the target misbehaves: every few
// seconds, in turn, it is killed (SIGKILL) and started again on the same socket and image file,
// answers with BUSY, cuts the connection, or answers with TASK SET FULL or late completions.
//   npm run build && node --import tsx scripts/soak.ts [--minutes M] [--every S] [--seed N]
// The load is `virtio-initiator bench --reconnect --verify --rw randrw`; the run passes when it
// ends with no errors, no mismatches and one reconnect per kill or cut connection. Prints one line per
// disturbance and the bench's JSON result; exits 1 when the run did not pass.

import { spawn } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync, ftruncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

import { startTarget, type TargetProcess } from '../ts/bundled-target.js';

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
const controlPath = join(dir, 'control.sock');
// A file LUN: what was written survives the target's death, as it would on a real target.
const image = join(dir, 'soak.img');
const fd = openSync(image, 'w');
ftruncateSync(fd, 256 << 20);
closeSync(fd);
const start = (): Promise<TargetProcess> => startTarget({ socket, control: controlPath, luns: [`0:0:file:${image}:512`] });
let target = await start();
let control = await target.control();

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

/** Kills the target outright and starts a new one on the same socket and image. */
async function killAndRestart(): Promise<void> {
  const old = target;
  old.child.kill('SIGKILL');
  await new Promise<void>((resolve) => (old.status ? resolve() : old.child.once('exit', () => resolve())));
  // A killed target leaves its sockets behind; the new one refuses to replace them.
  rmSync(socket, { force: true });
  rmSync(controlPath, { force: true });
  target = await start();
  control = await target.control();
}

// Disturbances in turn: a kill, BUSY, a cut connection, then TASK SET FULL or late completions.
let connectionsLost = 0;
let turn = 0;
const t0 = Date.now();
const disturb = async (): Promise<string> => {
  const kind = turn % 4;
  const odd = (turn >> 2) % 2 === 1;
  turn++;
  if (kind === 0) {
    await killAndRestart();
    connectionsLost++;
    return 'target killed and started again';
  }
  if (kind === 1) {
    await control.inject(0, 0, 'busy', 3);
    return 'BUSY x3';
  }
  if (kind === 2) {
    const r = await control.disconnect();
    if (r.connections === 1) connectionsLost++;
    return 'connection cut';
  }
  if (odd) {
    await control.inject(0, 0, 'delay', 20, { ms: 30 });
    return '20 completions 30 ms late';
  }
  await control.inject(0, 0, 'task_set_full', 3);
  return 'TASK SET FULL x3';
};
let busy = Promise.resolve();
const timer = setInterval(() => {
  const at = ((Date.now() - t0) / 1000).toFixed(1);
  busy = busy.then(() =>
    disturb().then(
      (what) => void process.stderr.write(`soak: ${at} s: ${what}\n`),
      (e: unknown) => void process.stderr.write(`soak: ${at} s: disturbance failed: ${String(e)}\n`),
    ),
  );
}, every * 1000);

const code = await exited;
clearInterval(timer);
await busy;
await target.stop();
rmSync(dir, { recursive: true, force: true });

const line = out.trim().split('\n').pop() ?? '';
process.stdout.write(`${line}\n`);
const r = JSON.parse(line) as { ios: number; errors: number; mismatches: number; reconnects: number; lost: number };
const passed = code === 0 && r.errors === 0 && r.mismatches === 0 && r.reconnects === connectionsLost;
process.stderr.write(
  `soak: ${seconds} s, ${r.ios} requests, ${connectionsLost} connections lost (kills and cuts), ${r.reconnects} reconnects, ${r.lost} requests lost ` +
    `with them, ${r.errors} errors, ${r.mismatches} mismatches: ${passed ? 'passed' : 'FAILED'}\n`,
);
process.exit(passed ? 0 : 1);
