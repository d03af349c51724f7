// Run a command in a QEMU guest through scripts/guest/run-in-guest.sh, stream
// its output line by line (so a test can react to marker lines while the
// guest runs), and always be able to kill the whole process group.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { repoRoot } from './env.js';

export const harness = join(repoRoot, 'scripts', 'guest', 'run-in-guest.sh');

export interface GuestOptions {
  /** shell command run in the guest (host root, chrooted). */
  command: string;
  /** extra qemu arguments (devices, chardevs). */
  qemuArgs?: string[];
  /** GUEST_* knobs of run-in-guest.sh. */
  env?: Record<string, string>;
  /** called for every line of guest output, in order; awaited before the next. */
  onLine?: (line: string) => void | Promise<void>;
}

export interface GuestResult {
  /** the guest command's exit status (124 timeout, 125 guest died). */
  code: number | null;
  signal: NodeJS.Signals | null;
  /** guest command output, one entry per line. */
  lines: string[];
  /** the harness's own stderr (timing line, errors). */
  stderr: string;
  /** the guest kernel console. */
  consoleLog: string;
  /** wall time of the whole harness run, in seconds. */
  seconds: number;
  /** first error thrown by onLine, if any (the guest is killed then). */
  handlerError: Error | undefined;
}

export class GuestRun {
  readonly done: Promise<GuestResult>;
  private readonly child: ChildProcess;
  private readonly workDir: string;
  private finished = false;

  constructor(opts: GuestOptions) {
    this.workDir = mkdtempSync(join(tmpdir(), 'guest-run-'));
    const consoleLog = join(this.workDir, 'console.log');
    const start = process.hrtime.bigint();
    // own process group: qemu runs under timeout(1) under bash, and a kill
    // must reach all of them
    this.child = spawn('bash', [harness, opts.command, ...(opts.qemuArgs ?? [])], {
      cwd: repoRoot,
      detached: true,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, GUEST_CONSOLE_LOG: consoleLog, ...opts.env },
    });
    const lines: string[] = [];
    let stderr = '';
    let handlerError: Error | undefined;
    let handlers: Promise<void> = Promise.resolve();
    this.child.stderr?.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
    });
    const rl = createInterface({ input: this.child.stdout!, crlfDelay: Infinity });
    rl.on('line', (raw) => {
      const line = raw.replace(/\r$/, '');
      lines.push(line);
      if (opts.onLine && handlerError === undefined) {
        const onLine = opts.onLine;
        handlers = handlers
          .then(() => (handlerError === undefined ? onLine(line) : undefined))
          .catch((e: unknown) => {
            handlerError ??= e instanceof Error ? e : new Error(String(e));
            this.kill();
          });
      }
    });
    const spawnFailed = new Promise<Error>((resolve) => this.child.once('error', resolve));
    const exited = new Promise<[number | null, NodeJS.Signals | null]>((resolve) =>
      this.child.once('close', (code, signal) => resolve([code, signal])),
    );
    this.done = Promise.race([
      exited,
      spawnFailed.then((e): [number | null, NodeJS.Signals | null] => {
        stderr += `cannot run ${harness}: ${e.message}\n`;
        return [null, null];
      }),
    ]).then(async ([code, signal]) => {
      this.finished = true;
      await handlers;
      let log = '';
      try {
        log = readFileSync(consoleLog, 'utf8');
      } catch {
        log = '(no console log)';
      }
      rmSync(this.workDir, { recursive: true, force: true });
      const seconds = Number(process.hrtime.bigint() - start) / 1e9;
      return { code, signal, lines, stderr, consoleLog: log, seconds, handlerError };
    });
  }

  /**
   * Stop the harness, qemu and timeout(1): SIGTERM to the whole process group
   * (the harness then removes its work directory), SIGKILL if still there
   * after `graceMs`.
   */
  kill(graceMs = 3000): void {
    if (!this.signalGroup('SIGTERM')) return;
    setTimeout(() => this.signalGroup('SIGKILL'), graceMs).unref();
  }

  private signalGroup(signal: NodeJS.Signals): boolean {
    if (this.finished || this.child.pid === undefined) return false;
    try {
      process.kill(-this.child.pid, signal);
      return true;
    } catch {
      return false; // already gone
    }
  }
}

export function runGuest(opts: GuestOptions): GuestRun {
  return new GuestRun(opts);
}

/** Lines starting with `@@NAME ` split into their key=value fields. */
export interface Marker {
  name: string;
  /** first positional word after the name (e.g. "0:4"), or "". */
  subject: string;
  fields: Record<string, string>;
  line: string;
}

export function parseMarker(line: string): Marker | undefined {
  const m = /^@@([A-Z_]+)(?:\s+(.*))?$/.exec(line);
  if (!m) return undefined;
  const words = (m[2] ?? '').split(/\s+/).filter((w) => w !== '');
  const fields: Record<string, string> = {};
  let subject = '';
  for (const w of words) {
    const eq = w.indexOf('=');
    if (eq > 0) fields[w.slice(0, eq)] = w.slice(eq + 1);
    else if (subject === '') subject = w;
  }
  return { name: m[1]!, subject, fields, line };
}

export function markers(lines: string[], name?: string): Marker[] {
  return lines
    .map(parseMarker)
    .filter((m): m is Marker => m !== undefined && (name === undefined || m.name === name));
}
