// The package as a user gets it: `npm pack` of the main package and of this machine's platform
// package, both installed into an empty project outside the checkout, used from there with a
// PATH that has no Rust toolchain: the CLI starts the bundled target from the installed platform
// package and scans it, an ESM program does verified I/O, a TypeScript file type-checks against
// the installed declarations, and `virtio-initiator/testing` loads.
import test from 'ava';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, realpathSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';

import { repoRoot, requireCommands, requireFile, testWhen } from './helpers/env.js';

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** The platform package of this machine (the suite runs on glibc x86_64 and arm64). */
const PLATFORM = `linux-${process.arch}-gnu`;
const PLATFORM_DIR = join(repoRoot, 'npm', PLATFORM);
const ADDON = `virtio-initiator.${PLATFORM}.node`;
const TARGET = 'vhost-user-scsi-target';
/** Oldest glibc the shipped binaries may need. */
const GLIBC_BASELINE = [2, 28];

/** Node and the system's tools, nothing of the checkout or of a Rust toolchain. */
const USER_PATH = [dirname(process.execPath), '/usr/local/bin', '/usr/bin', '/bin', '/usr/sbin', '/sbin'].join(':');

function run(cmd: string, args: string[], opts: { cwd: string; env?: NodeJS.ProcessEnv; timeoutMs?: number }): Promise<Run> {
  const child = spawn(cmd, args, { cwd: opts.cwd, env: opts.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 180_000);
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** The environment of a user's shell: no VHOST_USER_SCSI_TARGET, no cargo, no tsx loader. */
function userEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { HOME: process.env.HOME, PATH: USER_PATH, LANG: 'C.UTF-8' };
  for (const k of ['npm_config_cache', 'npm_config_registry', 'CI', 'NODE_EXTRA_CA_CERTS']) {
    if (process.env[k] !== undefined) env[k] = process.env[k];
  }
  return env;
}

interface PackResult {
  filename: string;
  files: Array<{ path: string; mode: number }>;
}

async function pack(dir: string, into: string): Promise<PackResult> {
  const r = await run('npm', ['pack', '--json', '--pack-destination', into], { cwd: dir });
  if (r.code !== 0) throw new Error(`npm pack in ${dir} failed: ${r.stderr}`);
  // prepack's own output may precede the JSON.
  const json = r.stdout.slice(r.stdout.indexOf('['));
  return (JSON.parse(json) as PackResult[])[0]!;
}

/** Newest GLIBC_x.y symbol version a binary needs. */
async function newestGlibc(file: string): Promise<number[]> {
  const r = await run('objdump', ['-T', file], { cwd: repoRoot });
  if (r.code !== 0) throw new Error(`objdump -T ${file}: ${r.stderr}`);
  const versions = [...r.stdout.matchAll(/GLIBC_(\d+)\.(\d+)/g)].map((m) => [Number(m[1]), Number(m[2])]);
  versions.sort((a, b) => a[0]! - b[0]! || a[1]! - b[1]!);
  return versions.at(-1) ?? [0, 0];
}

const CONSUMER_IO = `// Verified I/O through the installed package, against a target it starts itself.
import { Controller } from 'virtio-initiator';
import { defaultTargetBinary, startTarget } from 'virtio-initiator/testing';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const dir = mkdtempSync(join(tmpdir(), 'consumer-'));
const target = await startTarget({ socket: join(dir, 'vhost.sock'), luns: ['0:0:ram:8M:4096'] });
const ctrl = await Controller.connect(target.socket);
try {
  await ctrl.scan();
  const disk = ctrl.devices[0];
  const last = Number(disk.blockCount) - 2;
  const checks = [];
  for (const lba of [0, last]) {
    const data = disk.allocBuffer(2 * disk.blockSize);
    for (let i = 0; i < data.length; i++) data[i] = (lba + i * 7) & 0xff;
    await disk.write(lba, data);
    const back = await disk.read(lba, 2);
    checks.push({ lba, equal: back.equals(data) });
  }
  console.log(JSON.stringify({ binary: defaultTargetBinary(), name: disk.name, blockSize: disk.blockSize, checks }));
} finally {
  ctrl.close();
  await target.stop();
}
`;

const CONSUMER_TS = `// Type-checked against the installed declarations only.
import { type BlockDevice, Controller, ScsiError } from 'virtio-initiator';
import { startTarget, type TargetOptions } from 'virtio-initiator/testing';

export async function firstBlock(socket: string): Promise<Buffer> {
  const ctrl: Controller = await Controller.connect(socket, { name: 'Consumer0' });
  await ctrl.scan();
  const disk: BlockDevice = ctrl.devices[0]!;
  const size: bigint = disk.blockCount;
  const bytes: number = disk.blockSize;
  // @ts-expect-error: read takes an LBA, not a string (an untyped API would let this through)
  void disk.read('zero', 1);
  if (size < 1n || bytes < 512) throw new ScsiError({ status: 2, context: 'empty disk' });
  return disk.read(0, 1);
}

export const options: TargetOptions = { socket: '/tmp/x.sock', luns: ['0:0:ram:1M:512'] };
export const start: typeof startTarget = startTarget;
`;

testWhen(
  test.serial,
  'npm install of the packed packages: CLI target and scan, verified I/O, declarations, testing entry',
  [
    requireFile(join(PLATFORM_DIR, ADDON), 'npm run build'),
    requireFile(join(PLATFORM_DIR, TARGET), 'npm run build'),
    requireFile(join(repoRoot, 'dist', 'index.js'), 'npm run build'),
    requireCommands('npm', 'objdump'),
  ],
  async (t) => {
    const work = realpathSync(mkdtempSync(join(tmpdir(), 'installed-package-')));
    t.teardown(() => rmSync(work, { recursive: true, force: true }));
    const tarballs = join(work, 'tarballs');
    mkdirSync(tarballs);

    // What each tarball holds: the main package JavaScript, declarations and the loader, no
    // sources of the addon and no tests; the platform package the two binaries, executable.
    const main = await pack(repoRoot, tarballs);
    const paths = main.files.map((f) => f.path);
    for (const need of ['dist/index.js', 'dist/index.d.ts', 'dist/testing.js', 'dist/cli/main.js', 'native/index.cjs', 'ts/config/schema.json']) {
      t.true(paths.includes(need), `${need} is in the package`);
    }
    t.deepEqual(
      paths.filter((p) => /\.(rs|ts)$/.test(p) && !p.endsWith('.d.ts')),
      [],
      'no Rust or TypeScript sources',
    );
    t.deepEqual(paths.filter((p) => /^(crates|__test__|scripts|target|npm)\/|\.node$|\.map$/.test(p)), [], 'no crates, tests, scripts or binaries');
    const platform = await pack(PLATFORM_DIR, tarballs);
    const byPath = new Map(platform.files.map((f) => [f.path, f.mode]));
    t.deepEqual([...byPath.keys()].sort(), [ADDON, 'README.md', TARGET, 'package.json'].sort());
    t.is(byPath.get(TARGET)! & 0o111, 0o111, 'the target is executable');

    // glibc baseline of both shipped binaries.
    for (const file of [ADDON, TARGET]) {
      const [major, minor] = await newestGlibc(join(PLATFORM_DIR, file));
      t.true(
        major! < GLIBC_BASELINE[0]! || (major === GLIBC_BASELINE[0] && minor! <= GLIBC_BASELINE[1]!),
        `${file} needs GLIBC_${major}.${minor}, newer than ${GLIBC_BASELINE.join('.')}`,
      );
    }

    // An empty project outside the checkout, as a user has it.
    const app = join(work, 'app');
    mkdirSync(app);
    writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'consumer', private: true, type: 'module' }));
    const env = userEnv();
    const install = await run(
      'npm',
      ['install', '--no-audit', '--no-fund', join(tarballs, main.filename), join(tarballs, platform.filename), 'typescript@~5.9.3', '@types/node@^20.19.0'],
      { cwd: app, env },
    );
    t.is(install.code, 0, install.stderr);
    const installed = join(app, 'node_modules', `virtio-initiator-${PLATFORM}`);
    t.true(existsSync(join(installed, TARGET)) && (statSync(join(installed, TARGET)).mode & 0o111) !== 0);

    // The CLI from the installed package: the target subcommand runs the platform package's
    // binary, and scan finds what it serves.
    const sock = join(work, 'cli.sock');
    // The command npm linked (npx would run the same, but does not pass SIGTERM on).
    const bin = join(app, 'node_modules', '.bin', 'virtio-initiator');
    const target = spawn(bin, ['target', '--socket', sock, '--lun', '0:0:ram:16M:512', '--lun', '0:1:ram:8M:4096'], {
      cwd: app,
      env,
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    const stopped = new Promise((resolve) => target.once('exit', resolve));
    let targetErr = '';
    target.stderr.setEncoding('utf8').on('data', (d: string) => (targetErr += d));
    t.teardown(() => {
      target.kill('SIGTERM');
    });
    for (let i = 0; i < 200 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 50));
    t.true(existsSync(sock), `the target did not create its socket: ${targetErr}`);
    const scan = await run('npx', ['--no-install', 'virtio-initiator', 'scan', '--socket', sock, '--json'], { cwd: app, env });
    t.is(scan.code, 0, scan.stderr);
    const report = JSON.parse(scan.stdout) as { controllers: Array<{ luns: Array<{ name: string; blockSize: number; blocks: string }> }> };
    t.deepEqual(
      report.controllers[0]!.luns.map((l) => [l.name, l.blockSize, l.blocks]),
      [
        ['VirtioScsi0t0', 512, String((16 << 20) / 512)],
        ['VirtioScsi0t0l1', 4096, String((8 << 20) / 4096)],
      ],
    );
    target.kill('SIGTERM');
    await stopped;
    t.false(existsSync(sock), 'the target removed its socket when told to stop');

    // An ESM program: verified I/O at the first and last blocks, on a target started through
    // virtio-initiator/testing from the installed platform package.
    writeFileSync(join(app, 'io.mjs'), CONSUMER_IO);
    const io = await run(process.execPath, ['io.mjs'], { cwd: app, env });
    t.is(io.code, 0, io.stderr);
    const result = JSON.parse(io.stdout) as { binary: string; name: string; blockSize: number; checks: Array<{ lba: number; equal: boolean }> };
    t.is(result.binary, join(installed, TARGET), 'the target binary comes from the installed platform package');
    t.like(result, { name: 'VirtioScsi0t0', blockSize: 4096 });
    t.deepEqual(result.checks, [
      { lba: 0, equal: true },
      { lba: 2046, equal: true },
    ]);

    // A TypeScript file, checked against the installed declarations.
    writeFileSync(join(app, 'check.ts'), CONSUMER_TS);
    const tsc = await run(
      process.execPath,
      [join(app, 'node_modules', 'typescript', 'bin', 'tsc'), '--noEmit', '--strict', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022', '--types', 'node', 'check.ts'],
      { cwd: app, env },
    );
    t.is(tsc.code, 0, tsc.stdout + tsc.stderr);
    // ...and the same checker rejects a misuse, so the check above could fail.
    writeFileSync(join(app, 'wrong.ts'), "import { Controller } from 'virtio-initiator';\nexport const c: string = Controller.connect('/x');\n");
    const wrong = await run(
      process.execPath,
      [join(app, 'node_modules', 'typescript', 'bin', 'tsc'), '--noEmit', '--strict', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--types', 'node', 'wrong.ts'],
      { cwd: app, env },
    );
    t.not(wrong.code, 0);
    t.regex(wrong.stdout, /Promise<Controller>/);
  },
);
