// qemu-storage-daemon serving a raw image file as a vhost-user-blk export, for the interop tests:
// started on a fresh sparse image in a directory of its own, with a QMP monitor to change it
// while it runs (a minimal QMP client over node:net is here too), and stopped with SIGTERM.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { which } from './env.js';
import { type ExitStatus, TargetProcess } from './target.js';

/** $QEMU_STORAGE_DAEMON, else the one on $PATH, else where Debian's qemu-system-common puts it. */
export const qsdBinary: string =
  process.env.QEMU_STORAGE_DAEMON ?? which('qemu-storage-daemon') ?? '/usr/bin/qemu-storage-daemon';

/** Node names of the image file and of the raw disk on it (the one block_resize takes). */
export const FILE_NODE = 'file0';
export const DISK_NODE = 'disk0';

export interface QsdOptions {
  /** Size of the image file, made with truncate (sparse). */
  sizeBytes: number;
  /** Request queues of the export (default 2). */
  numQueues?: number;
  /** Whether the export takes writes (default true); false offers VIRTIO_BLK_F_RO. */
  writable?: boolean;
  /** Fills the image before the daemon opens it. */
  init?: (image: string) => void;
}

export interface Qsd {
  dir: string;
  image: string;
  /** The vhost-user-blk socket. */
  socket: string;
  /** The QMP monitor socket. */
  qmpSocket: string;
  process: TargetProcess;
  /** The block-export-add arguments of an export like the one started, under `id`. */
  exportArguments(id: string): Record<string, unknown>;
  /** SIGTERM (SIGKILL after a grace period); resolves once the daemon is gone. */
  stop(): Promise<ExitStatus>;
  /** Stops the daemon and removes its directory. */
  cleanUp(): Promise<void>;
}

function isSocket(path: string): boolean {
  try {
    return statSync(path).isSocket();
  } catch {
    return false;
  }
}

/**
 * Starts qemu-storage-daemon on a new image: a file node with discard=unmap (a DISCARD punches a
 * hole into the file), a raw node on it, the export on that, and a QMP monitor. Resolves once
 * both sockets exist; a daemon that exits first is an error carrying its output.
 */
export async function startQsd(opts: QsdOptions): Promise<Qsd> {
  const dir = mkdtempSync(join(tmpdir(), 'interop-qsd-'));
  const image = join(dir, 'disk.img');
  const socket = join(dir, 'vhost-blk.sock');
  const qmpSocket = join(dir, 'qmp.sock');
  const exportArguments = (id: string): Record<string, unknown> => ({
    type: 'vhost-user-blk',
    id,
    'node-name': DISK_NODE,
    addr: { type: 'unix', path: socket },
    writable: opts.writable ?? true,
    'num-queues': opts.numQueues ?? 2,
  });
  let proc: TargetProcess | undefined;
  const cleanUp = async (): Promise<void> => {
    await proc?.stop();
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    writeFileSync(image, '');
    truncateSync(image, opts.sizeBytes);
    opts.init?.(image);
    const args = [
      '--blockdev',
      JSON.stringify({ driver: 'file', 'node-name': FILE_NODE, filename: image, discard: 'unmap' }),
      '--blockdev',
      JSON.stringify({ driver: 'raw', 'node-name': DISK_NODE, file: FILE_NODE, discard: 'unmap' }),
      '--export',
      JSON.stringify(exportArguments('exp0')),
      '--chardev',
      `socket,id=qmp,path=${qmpSocket},server=on,wait=off`,
      '--monitor',
      'chardev=qmp',
    ];
    const child = spawn(qsdBinary, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const started = new TargetProcess(child, socket, undefined);
    proc = started;
    const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));
    const deadline = Date.now() + 10_000;
    while (!(isSocket(socket) && isSocket(qmpSocket))) {
      const failed = await Promise.race([spawnError, sleep(20).then(() => undefined)]);
      if (failed || started.status || Date.now() > deadline) {
        const why = failed?.message ?? (started.status ? `exited with ${JSON.stringify(started.status)}` : 'no sockets after 10 s');
        throw new Error(`qemu-storage-daemon did not start (${why}):\n${started.log}`);
      }
    }
    return { dir, image, socket, qmpSocket, process: started, exportArguments, stop: () => started.stop(), cleanUp };
  } catch (e) {
    await cleanUp();
    throw e;
  }
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

/** An error QMP answered a command with. */
export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    desc: string,
  ) {
    super(`QMP ${command}: ${errorClass}: ${desc}`);
    this.name = 'QmpError';
  }
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
}

/**
 * A QMP client: one JSON object per line each way. Commands carry an id and resolve with their
 * "return" (reject with QmpError on "error"); events are kept until someone waits for them.
 */
export class Qmp {
  private buffered = '';
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private readonly events: QmpEvent[] = [];
  private readonly eventWaiters: Array<{ name: string; resolve: (e: QmpEvent) => void }> = [];
  private closedWith: Error | undefined;
  private greeted!: () => void;
  private readonly greeting = new Promise<void>((resolve) => (this.greeted = resolve));

  private constructor(private readonly sock: Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => this.take(chunk));
    const closed = (why: string) => (): void => {
      this.closedWith ??= new Error(`QMP connection ${why}`);
      for (const p of this.pending.values()) p.reject(this.closedWith);
      this.pending.clear();
    };
    sock.on('error', (e) => closed(`failed: ${e.message}`)());
    sock.on('close', closed('closed'));
  }

  /** Connects, waits for the greeting and leaves capabilities negotiation mode. */
  static async connect(path: string, timeoutMs = 5000): Promise<Qmp> {
    const sock = connect(path);
    const qmp = new Qmp(sock);
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', reject);
    });
    const timer = sleep(timeoutMs).then(() => {
      throw new Error(`no QMP greeting on ${path} within ${timeoutMs} ms`);
    });
    await Promise.race([qmp.greeting, timer]);
    await qmp.execute('qmp_capabilities');
    return qmp;
  }

  /** Runs a command; resolves with what it returned. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject });
      this.sock.write(`${JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id })}\n`);
    });
  }

  /** The first event named `name` not yet taken (it may have arrived already). */
  async event(name: string, timeoutMs = 10_000): Promise<QmpEvent> {
    const i = this.events.findIndex((e) => e.event === name);
    if (i >= 0) return this.events.splice(i, 1)[0]!;
    let waiter!: { name: string; resolve: (e: QmpEvent) => void };
    const got = new Promise<QmpEvent>((resolve) => {
      waiter = { name, resolve };
      this.eventWaiters.push(waiter);
    });
    const ac = new AbortController();
    try {
      return await Promise.race([
        got,
        sleep(timeoutMs, undefined, { signal: ac.signal }).then(() => {
          throw new Error(`no QMP event ${name} within ${timeoutMs} ms`);
        }),
      ]);
    } finally {
      ac.abort();
      const w = this.eventWaiters.indexOf(waiter);
      if (w >= 0) this.eventWaiters.splice(w, 1);
    }
  }

  close(): void {
    this.sock.destroy();
  }

  private take(chunk: string): void {
    this.buffered += chunk;
    for (let nl = this.buffered.indexOf('\n'); nl >= 0; nl = this.buffered.indexOf('\n')) {
      const line = this.buffered.slice(0, nl).trim();
      this.buffered = this.buffered.slice(nl + 1);
      if (line !== '') this.message(JSON.parse(line) as Record<string, unknown>);
    }
  }

  private message(m: Record<string, unknown>): void {
    if ('QMP' in m) {
      this.greeted();
      return;
    }
    if (typeof m.event === 'string') {
      const event = m as unknown as QmpEvent;
      const w = this.eventWaiters.findIndex((x) => x.name === event.event);
      if (w >= 0) this.eventWaiters.splice(w, 1)[0]!.resolve(event);
      else this.events.push(event);
      return;
    }
    const p = typeof m.id === 'number' ? this.pending.get(m.id) : undefined;
    if (p === undefined) return;
    this.pending.delete(m.id as number);
    if ('error' in m) {
      const e = m.error as { class?: string; desc?: string };
      p.reject(new QmpError(p.command, e.class ?? 'Error', e.desc ?? JSON.stringify(m.error)));
    } else {
      p.resolve(m.return);
    }
  }
}
