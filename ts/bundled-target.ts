// The bundled vhost-user-scsi target as a separate process: start it on a
// socket, wait until it listens, drive it through its control socket, and
// stop it. The demo, the tests and the benchmarks all use it.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { stat } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { connect, type Socket } from 'node:net';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';

import { platformNames } from './platform.js';

const TARGET_FILE = 'vhost-user-scsi-target';

/**
 * The target binary: `$VHOST_USER_SCSI_TARGET`, else the one in this machine's platform package
 * (`virtio-initiator-linux-x64-gnu`, ...; in a checkout, its folder `npm/<platform>/` after
 * `npm run build`), else a local `cargo build --release -p vhost-user-scsi-target`.
 */
export function defaultTargetBinary(): string {
  const fromEnv = process.env.VHOST_USER_SCSI_TARGET;
  if (fromEnv) return fromEnv;
  const candidates: string[] = [];
  const require = createRequire(import.meta.url);
  for (const platform of platformNames()) {
    try {
      candidates.push(join(dirname(require.resolve(`virtio-initiator-${platform}/package.json`)), TARGET_FILE));
    } catch {
      // Not installed (a checkout, or a platform without a prebuilt package).
    }
  }
  for (const platform of platformNames()) {
    candidates.push(fileURLToPath(new URL(`../npm/${platform}/${TARGET_FILE}`, import.meta.url)));
  }
  const local = fileURLToPath(new URL(`../target/release/${TARGET_FILE}`, import.meta.url));
  return candidates.find((c) => existsSync(c)) ?? local;
}

export type TargetQuirk = 'tmf-zero-used-len' | 'abort-task-ignored' | 'tmf-ignored';

export interface TargetOptions {
  /** vhost-user socket path; must not exist yet. */
  socket: string;
  /** The device served: virtio-scsi (default), or virtio-blk with exactly one LUN 0:0. */
  type?: 'scsi' | 'blk';
  /** control socket path (line-delimited JSON); omitted = no control socket. */
  control?: string;
  /** LUN specs, e.g. "0:0:ram:64M:512" or "1:0:file:/tmp/x.img:512". */
  luns: string[];
  queues?: number;
  queueSize?: number;
  maxTarget?: number;
  /** Busy-poll the request queues (`--poll`) instead of waiting for kicks. */
  poll?: boolean;
  /** Poll threads sharing the request queues (`--poll-threads`); needs `poll`. */
  pollThreads?: number;
  /**
   * Deviations of other targets to reproduce (`--quirk`): `tmf-zero-used-len` answers task
   * management with the response written but a used length of 0; `abort-task-ignored` answers
   * ABORT TASK with FUNCTION COMPLETE and leaves the task running, `tmf-ignored` every function.
   */
  quirks?: readonly TargetQuirk[];
  /**
   * Run in a process group of its own, so that a Ctrl-C at the terminal reaches only the
   * parent, which then stops the target when it is done with it.
   */
  detached?: boolean;
  /** binary to run; default defaultTargetBinary(). */
  binary?: string;
  /** how long to wait for the sockets to appear. */
  readyTimeoutMs?: number;
  /** extra environment, e.g. { RUST_LOG: 'debug' }. */
  env?: Record<string, string>;
}

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** Keeps the last `limit` characters of a stream, for error reports. */
class Tail {
  private text = '';
  constructor(private readonly limit: number) {}
  push(chunk: string): void {
    this.text += chunk;
    if (this.text.length > this.limit) this.text = this.text.slice(this.text.length - this.limit);
  }
  toString(): string {
    return this.text;
  }
}

export class TargetProcess {
  readonly exited: Promise<ExitStatus>;
  private exitStatus: ExitStatus | undefined;
  private readonly output = new Tail(64 * 1024);
  private client: ControlClient | undefined;
  private heardListening = false;

  constructor(
    readonly child: ChildProcess,
    readonly socket: string,
    readonly controlPath: string | undefined,
  ) {
    child.stdout?.setEncoding('utf8').on('data', (d: string) => this.output.push(d));
    child.stderr?.setEncoding('utf8').on('data', (d: string) => this.output.push(d));
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.exitStatus = { code, signal };
        resolve(this.exitStatus);
      });
    });
  }

  /** Exit status if the process has ended. */
  get status(): ExitStatus | undefined {
    return this.exitStatus;
  }

  /** The last 64 KiB of the target's stdout and stderr. */
  /**
   * Whether the target said it listens: it prints that line once both of its sockets accept
   * connections (a socket file exists a moment before it does).
   */
  get listening(): boolean {
    this.heardListening ||= this.output.toString().includes('"event":"listening"');
    return this.heardListening;
  }

  get log(): string {
    return this.output.toString();
  }

  /** The control connection (opened on first use, then shared). */
  async control(): Promise<ControlClient> {
    if (this.controlPath === undefined) throw new Error('target was started without --control');
    this.client ??= await ControlClient.connect(this.controlPath);
    return this.client;
  }

  /** SIGTERM, then SIGKILL after `graceMs`; resolves once the process is gone. */
  async stop(graceMs = 3000): Promise<ExitStatus> {
    this.client?.close();
    this.client = undefined;
    if (this.exitStatus) return this.exitStatus;
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
    try {
      return await this.exited;
    } finally {
      clearTimeout(timer);
    }
  }
}

async function isSocket(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isSocket();
  } catch {
    return false;
  }
}

export function targetArgs(opts: TargetOptions): string[] {
  const args = ['--socket', opts.socket];
  if (opts.type !== undefined) args.push('--type', opts.type);
  if (opts.control !== undefined) args.push('--control', opts.control);
  for (const lun of opts.luns) args.push('--lun', lun);
  if (opts.queues !== undefined) args.push('--queues', String(opts.queues));
  if (opts.queueSize !== undefined) args.push('--queue-size', String(opts.queueSize));
  if (opts.maxTarget !== undefined) args.push('--max-target', String(opts.maxTarget));
  if (opts.poll === true) args.push('--poll');
  if (opts.pollThreads !== undefined) args.push('--poll-threads', String(opts.pollThreads));
  for (const q of opts.quirks ?? []) args.push('--quirk', q);
  return args;
}

/** Start the target and wait until its socket(s) accept connections. */
export async function startTarget(opts: TargetOptions): Promise<TargetProcess> {
  const binary = opts.binary ?? defaultTargetBinary();
  const child = spawn(binary, targetArgs(opts), {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...opts.env },
    detached: opts.detached === true,
  });
  const target = new TargetProcess(child, opts.socket, opts.control);
  const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));
  const deadline = Date.now() + (opts.readyTimeoutMs ?? 10_000);
  const paths = [opts.socket, ...(opts.control === undefined ? [] : [opts.control])];
  for (;;) {
    const ready = await Promise.all(paths.map(isSocket));
    if (ready.every(Boolean) && target.listening) return target;
    const failed = await Promise.race([spawnError, sleep(25).then(() => undefined)]);
    if (failed) throw new Error(`cannot run ${binary}: ${failed.message}`);
    if (target.status) {
      throw new Error(
        `${binary} exited (code ${target.status.code}, signal ${target.status.signal}) before listening:\n${target.log}`,
      );
    }
    if (Date.now() > deadline) {
      await target.stop();
      throw new Error(`${binary} did not create ${paths.join(' and ')} in time:\n${target.log}`);
    }
  }
}

export class ControlError extends Error {
  constructor(
    readonly request: object,
    readonly reason: string,
  ) {
    super(`control request ${JSON.stringify(request)} failed: ${reason}`);
    this.name = 'ControlError';
  }
}

export interface LunInfo {
  target: number;
  lun: number;
  kind: string;
  block_size: number;
  blocks: number;
  read_only: boolean;
}

/**
 * Injectable faults. `delay` and `late` take `ms` in the extra fields; `corrupt` returns READ
 * data with the first byte of every 512 flipped and GOOD status. A virtio-blk target (`type:
 * 'blk'`, its disk at 0:0) takes `io_error` (answered IOERR), `delay` and `never`.
 */
export type Fault = 'check_condition' | 'busy' | 'task_set_full' | 'delay' | 'late' | 'never' | 'corrupt' | 'io_error';

export type ControlResponse = { ok: true } & Record<string, unknown>;

/**
 * Client of the target's control socket: one JSON request per line, one
 * response line each, answered in order.  Requests are serialised.
 */
export class ControlClient {
  private buffer = '';
  private readonly waiting: Array<{ resolve: (line: string) => void; reject: (e: Error) => void }> = [];
  private chain: Promise<unknown> = Promise.resolve();
  private closedError: Error | undefined;

  private constructor(private readonly sock: Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buffer += d;
      let nl: number;
      while ((nl = this.buffer.indexOf('\n')) >= 0) {
        const line = this.buffer.slice(0, nl);
        this.buffer = this.buffer.slice(nl + 1);
        this.waiting.shift()?.resolve(line);
      }
    });
    const onGone = (err?: Error) => {
      this.closedError = err ?? new Error('control socket closed');
      for (const w of this.waiting.splice(0)) w.reject(this.closedError);
    };
    sock.on('error', onGone);
    sock.on('close', () => onGone());
  }

  static connect(path: string): Promise<ControlClient> {
    return new Promise((resolve, reject) => {
      const sock = connect(path);
      sock.once('connect', () => {
        sock.removeListener('error', reject);
        resolve(new ControlClient(sock));
      });
      sock.once('error', reject);
    });
  }

  /** Send one request; resolves with the response, throws ControlError when ok is false. */
  request(req: { op: string } & Record<string, unknown>, timeoutMs = 10_000): Promise<ControlResponse> {
    const run = async (): Promise<ControlResponse> => {
      if (this.closedError) throw this.closedError;
      const line = await new Promise<string>((resolve, reject) => {
        const timer = setTimeout(() => {
          const i = this.waiting.findIndex((w) => w.resolve === done);
          if (i >= 0) this.waiting.splice(i, 1);
          reject(new Error(`control request ${JSON.stringify(req)}: no response in ${timeoutMs} ms`));
        }, timeoutMs);
        const done = (l: string) => {
          clearTimeout(timer);
          resolve(l);
        };
        this.waiting.push({
          resolve: done,
          reject: (e) => {
            clearTimeout(timer);
            reject(e);
          },
        });
        this.sock.write(`${JSON.stringify(req)}\n`);
      });
      let parsed: unknown;
      try {
        parsed = JSON.parse(line);
      } catch {
        throw new ControlError(req, `response is not JSON: ${line}`);
      }
      if (typeof parsed !== 'object' || parsed === null || !('ok' in parsed)) {
        throw new ControlError(req, `malformed response: ${line}`);
      }
      const resp = parsed as { ok: unknown; error?: unknown };
      if (resp.ok !== true) throw new ControlError(req, String(resp.error ?? line));
      return resp as ControlResponse;
    };
    const result = this.chain.then(run, run);
    this.chain = result.catch(() => undefined);
    return result;
  }

  addLun(spec: string): Promise<ControlResponse> {
    return this.request({ op: 'add_lun', spec });
  }

  removeLun(target: number, lun: number): Promise<ControlResponse> {
    return this.request({ op: 'remove_lun', target, lun });
  }

  resizeLun(target: number, lun: number, size: string): Promise<ControlResponse> {
    return this.request({ op: 'resize_lun', target, lun, size });
  }

  inject(target: number, lun: number, fault: Fault, count: number, extra: Record<string, unknown> = {}) {
    return this.request({ op: 'inject', target, lun, fault, count, ...extra });
  }

  /** Drops the faults still pending on a LUN. */
  clearFaults(target: number, lun: number): Promise<ControlResponse> {
    return this.request({ op: 'clear_faults', target, lun });
  }

  async list(): Promise<LunInfo[]> {
    const resp = await this.request({ op: 'list' });
    if (!Array.isArray(resp.luns)) throw new ControlError({ op: 'list' }, 'response has no luns array');
    return resp.luns as LunInfo[];
  }

  stats(): Promise<ControlResponse> {
    return this.request({ op: 'stats' });
  }

  disconnect(): Promise<ControlResponse> {
    return this.request({ op: 'disconnect' });
  }

  close(): void {
    this.sock.destroy();
  }
}
