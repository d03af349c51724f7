// A request queue over one native channel (one exclusive virtqueue), owned by one thread.
//
// Requests issued in the same tick go down in one `submit` call; a full ring parks the rest in a
// JS FIFO that drains as completions free slots. Completions are found by polling `reap` from
// setImmediate while anything is on the device, so other JavaScript runs between polls; with
// nothing outstanding the poller stops and the queue holds no handle, so an idle process uses no
// CPU and can exit (design D3).

import { ClosedError, ControllerFailedError, InitiatorError } from './errors.js';
import { CompletionRecord, Direction, SubmitRecord } from './native.js';

/** What a request queue needs from a channel; the native Channel has exactly this shape. */
export interface ChannelLike {
  readonly capacity: number;
  submit(batch: Buffer, count: number, buffers: Array<Buffer | null>): number;
  reap(out: Buffer, max: number): number;
  close(): void;
}

export interface ScsiCommand {
  target: number;
  lun: number;
  /** 6 to 32 bytes. */
  cdb: Uint8Array;
  /** Data-in buffer: the device writes into it (READ-type commands). */
  dataIn?: Uint8Array;
  /** Data-out buffer: the device reads it (WRITE-type commands). */
  dataOut?: Uint8Array;
  /** SAM task attribute: 0 simple (default), 1 ordered, 2 head of queue, 3 ACA. */
  taskAttribute?: number;
  signal?: AbortSignal;
}

export interface CommandResult {
  /** virtio-scsi response (0 = OK: the command ran and `status` is meaningful). */
  response: number;
  /** SAM status byte. */
  status: number;
  /** Sense data, when the device returned any. */
  sense?: Uint8Array;
  /** Bytes of the data buffer not transferred. */
  residual: number;
  /** Bytes the device wrote into the data-in buffer. */
  dataLength: number;
}

/** Anything that runs SCSI commands: a RequestQueue, or a wrapper that shares one. */
export interface CommandExecutor {
  execute(cmd: ScsiCommand): Promise<CommandResult>;
}

export interface RequestQueueStats {
  /** Requests waiting in the JS FIFO for a ring slot. */
  queued: number;
  /** Requests on the device, including abandoned (aborted) ones whose completion is pending. */
  inFlight: number;
  submitCalls: number;
  submitted: number;
  completed: number;
  reapCalls: number;
}

export interface RequestQueueOptions {
  /** Names the controller in errors. */
  label?: string;
  /**
   * Why the controller failed, or null while it works. Tells a refused request (bad record, no
   * DMA memory for its bounce buffer) from a dead controller when `submit` throws; without it
   * every submit error counts as a controller failure.
   */
  controllerFailure?: () => string | null;
}

const enum State {
  Queued,
  OnDevice,
  /** Aborted by the caller while on the device: the completion is awaited and dropped. */
  Abandoned,
  /** Aborted while still in the FIFO: skipped when the FIFO drains. */
  Cancelled,
  Done,
}

interface Pending {
  token: number;
  state: State;
  cmd: ScsiCommand;
  data: Buffer | null;
  direction: number;
  resolve: (r: CommandResult) => void;
  reject: (e: unknown) => void;
  onAbort: (() => void) | undefined;
}

const MAX_TARGET = 255;
const MAX_LUN = 0x3fff;
const MIN_CDB = 6;
/** Poll period while only abandoned requests are on the device. */
const ABANDONED_POLL_MS = 10;
/** FIFO compaction threshold: reclaim consumed slots once this many have piled up. */
const COMPACT_AT = 1024;

function asBuffer(data: Uint8Array): Buffer {
  // Shares memory: a DMA Buffer (or a view of one) must stay zero-copy.
  return Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

function validate(cmd: ScsiCommand): string | undefined {
  if (typeof cmd !== 'object' || cmd === null) return 'command must be an object';
  if (!Number.isInteger(cmd.target) || cmd.target < 0 || cmd.target > MAX_TARGET) {
    return `target ${String(cmd.target)} out of range 0..${MAX_TARGET}`;
  }
  if (!Number.isInteger(cmd.lun) || cmd.lun < 0 || cmd.lun > MAX_LUN) {
    return `lun ${String(cmd.lun)} out of range 0..${MAX_LUN}`;
  }
  if (!(cmd.cdb instanceof Uint8Array)) return 'cdb must be a Uint8Array';
  if (cmd.cdb.length < MIN_CDB || cmd.cdb.length > SubmitRecord.CDB_MAX) {
    return `cdb length ${cmd.cdb.length} out of range ${MIN_CDB}..${SubmitRecord.CDB_MAX}`;
  }
  if (cmd.dataIn !== undefined && cmd.dataOut !== undefined) {
    return 'a command takes a data-in or a data-out buffer, not both';
  }
  for (const [name, buf] of [
    ['dataIn', cmd.dataIn],
    ['dataOut', cmd.dataOut],
  ] as const) {
    if (buf !== undefined && !(buf instanceof Uint8Array)) return `${name} must be a Buffer or Uint8Array`;
    if (buf !== undefined && buf.length > 0xffffffff) return `${name} is larger than 4 GiB`;
  }
  const attr = cmd.taskAttribute ?? 0;
  if (!Number.isInteger(attr) || attr < 0 || attr > 0xff) return `taskAttribute ${String(attr)} out of range`;
  return undefined;
}

export class RequestQueue implements CommandExecutor {
  readonly label: string;
  private readonly channel: ChannelLike;
  private readonly controllerFailure: (() => string | null) | undefined;
  private readonly capacity: number;
  private readonly batch: Buffer;
  private readonly completions: Buffer;
  /** Requests not yet on the device, oldest first, from `head` on. */
  private fifo: Pending[] = [];
  private head = 0;
  private queuedCount = 0;
  /** Requests on the device (including abandoned ones) by token. */
  private readonly onDevice = new Map<number, Pending>();
  private abandoned = 0;
  private nextToken = 1;
  private flushScheduled = false;
  /** The next poll: an immediate while someone waits, a slow unref'd timer otherwise. */
  private poller: { kind: 'fast'; handle: NodeJS.Immediate } | { kind: 'slow'; handle: NodeJS.Timeout } | undefined;
  private closedError: Error | undefined;
  private counters = { submitCalls: 0, submitted: 0, completed: 0, reapCalls: 0 };

  constructor(channel: ChannelLike, options: RequestQueueOptions = {}) {
    this.channel = channel;
    this.label = options.label ?? 'virtio-scsi';
    this.controllerFailure = options.controllerFailure;
    const cap = channel.capacity;
    if (!Number.isInteger(cap) || cap < 1) {
      throw new RangeError(`channel capacity ${String(cap)} is not a positive integer`);
    }
    this.capacity = cap;
    this.batch = Buffer.alloc(cap * SubmitRecord.SIZE);
    this.completions = Buffer.alloc(cap * CompletionRecord.SIZE);
  }

  /** True once closed or failed: every later request rejects. */
  get closed(): boolean {
    return this.closedError !== undefined;
  }

  get stats(): RequestQueueStats {
    return { queued: this.queuedCount, inFlight: this.onDevice.size, ...this.counters };
  }

  /** Queues one SCSI command. Rejects only for bad arguments, abort, close or controller failure. */
  execute(cmd: ScsiCommand): Promise<CommandResult> {
    const bad = validate(cmd);
    if (bad !== undefined) return Promise.reject(new TypeError(`${this.label}: ${bad}`));
    if (this.closedError) return Promise.reject(this.closedError);
    const signal = cmd.signal;
    if (signal?.aborted) return Promise.reject(signal.reason);

    const buf = cmd.dataIn ?? cmd.dataOut;
    const data = buf !== undefined && buf.length > 0 ? asBuffer(buf) : null;
    const direction = data === null ? Direction.NONE : cmd.dataIn !== undefined ? Direction.IN : Direction.OUT;
    return new Promise<CommandResult>((resolve, reject) => {
      const p: Pending = {
        token: 0,
        state: State.Queued,
        cmd,
        data,
        direction,
        resolve,
        reject,
        onAbort: undefined,
      };
      if (signal) {
        p.onAbort = () => this.abort(p);
        signal.addEventListener('abort', p.onAbort, { once: true });
      }
      this.fifo.push(p);
      this.queuedCount++;
      if (!this.flushScheduled) {
        this.flushScheduled = true;
        // A microtask runs after the caller's synchronous code (and the continuations already
        // queued), so a burst of requests from one tick goes down in one batch.
        queueMicrotask(() => this.flush());
      }
    });
  }

  /** Rejects everything queued or in flight and releases the channel. */
  close(): void {
    if (this.closedError) return;
    this.shutDown(new ClosedError(`${this.label}: request queue closed`));
  }

  private abort(p: Pending): void {
    const reason: unknown = p.cmd.signal?.reason;
    if (p.state === State.Queued) {
      p.state = State.Cancelled;
      this.queuedCount--;
      p.reject(reason);
    } else if (p.state === State.OnDevice) {
      // The device may still write into the buffer: keep the entry (and with it the buffer)
      // until the completion arrives, then drop it.
      p.state = State.Abandoned;
      this.abandoned++;
      p.reject(reason);
      // The fast poll already scheduled re-plans itself at its end.
    }
  }

  private settle(p: Pending): void {
    if (p.onAbort) p.cmd.signal?.removeEventListener('abort', p.onAbort);
    p.onAbort = undefined;
  }

  private flush(): void {
    this.flushScheduled = false;
    if (this.closedError || this.queuedCount === 0) return;
    const free = this.capacity - this.onDevice.size;
    if (free <= 0) return;

    const entries: Pending[] = [];
    /** FIFO position just past each collected entry. */
    const ends: number[] = [];
    const buffers: Array<Buffer | null> = [];
    const batch = this.batch;
    let i = this.head;
    while (i < this.fifo.length && entries.length < free) {
      const p = this.fifo[i++]!;
      if (p.state !== State.Queued) continue;
      const off = entries.length * SubmitRecord.SIZE;
      batch.fill(0, off, off + SubmitRecord.SIZE);
      p.token = this.allocToken();
      batch.writeUInt32LE(p.token, off + SubmitRecord.TOKEN);
      batch.writeUInt8(p.cmd.target, off + SubmitRecord.TARGET);
      batch.writeUInt8(p.direction, off + SubmitRecord.DIRECTION);
      batch.writeUInt16LE(p.cmd.lun, off + SubmitRecord.LUN);
      if (p.data !== null) {
        batch.writeUInt32LE(buffers.length, off + SubmitRecord.BUFFER_INDEX);
        buffers.push(p.data);
      }
      batch.writeUInt8(p.cmd.cdb.length, off + SubmitRecord.CDB_LENGTH);
      batch.writeUInt8(p.cmd.taskAttribute ?? 0, off + SubmitRecord.TASK_ATTR);
      batch.set(p.cmd.cdb, off + SubmitRecord.CDB);
      entries.push(p);
      ends.push(i);
    }
    if (entries.length === 0) {
      // Only cancelled entries were left.
      this.head = i;
      this.compact();
      return;
    }

    let accepted: number;
    try {
      this.counters.submitCalls++;
      accepted = this.channel.submit(batch, entries.length, buffers);
    } catch (e) {
      this.refused(entries, e);
      return;
    }
    if (!Number.isInteger(accepted) || accepted < 0 || accepted > entries.length) {
      this.fail(new Error(`submit accepted ${String(accepted)} of ${entries.length} requests`));
      return;
    }
    for (let k = 0; k < accepted; k++) {
      const p = entries[k]!;
      p.state = State.OnDevice;
      this.onDevice.set(p.token, p);
    }
    this.counters.submitted += accepted;
    this.queuedCount -= accepted;
    if (accepted === entries.length) this.head = i;
    else if (accepted > 0) this.head = ends[accepted - 1]!;
    this.compact();
    this.schedulePoll();
  }

  /**
   * `submit` threw. The native side refuses a batch only at its first record (a later record
   * that does not fit just ends the batch), so while the controller still works the first
   * request alone is rejected and the rest stay queued.
   */
  private refused(entries: Pending[], e: unknown): void {
    const message = e instanceof Error ? e.message : String(e);
    const index = /^request (\d+): /.exec(message)?.[1];
    let failure: string | null = message;
    try {
      failure = this.controllerFailure ? this.controllerFailure() : message;
    } catch {
      // The controller cannot even say: treat it as failed.
    }
    if (failure !== null || (index !== undefined && index !== '0')) {
      this.fail(e);
      return;
    }
    const p = entries[0]!;
    p.state = State.Done;
    this.queuedCount--;
    this.settle(p);
    p.reject(new Error(`${this.label}: request refused: ${message}`, { cause: e }));
    if (this.queuedCount > 0 && !this.flushScheduled) {
      this.flushScheduled = true;
      queueMicrotask(() => this.flush());
    }
  }

  private allocToken(): number {
    // Tokens wrap at 2^32; skip any still held by a request on the device.
    for (;;) {
      const t = this.nextToken;
      this.nextToken = t === 0xffffffff ? 1 : t + 1;
      if (!this.onDevice.has(t)) return t;
    }
  }

  private compact(): void {
    if (this.head === this.fifo.length) {
      this.fifo = [];
      this.head = 0;
    } else if (this.head >= COMPACT_AT && this.head * 2 >= this.fifo.length) {
      this.fifo = this.fifo.slice(this.head);
      this.head = 0;
    }
  }

  /**
   * Polls from setImmediate while a caller waits for a completion. Requests nobody waits for
   * any more (all abandoned) are polled from a slow unref'd timer instead: a target that never
   * answers them must neither spin a core nor keep the process alive.
   */
  private schedulePoll(): void {
    if (this.closedError || this.onDevice.size === 0) return;
    const waited = this.onDevice.size > this.abandoned;
    if (this.poller?.kind === 'fast' || (this.poller?.kind === 'slow' && !waited)) return;
    this.cancelPoll();
    if (waited) {
      this.poller = { kind: 'fast', handle: setImmediate(() => this.poll()) };
    } else {
      this.poller = { kind: 'slow', handle: setTimeout(() => this.poll(), ABANDONED_POLL_MS).unref() };
    }
  }

  private cancelPoll(): void {
    if (this.poller?.kind === 'fast') clearImmediate(this.poller.handle);
    else if (this.poller?.kind === 'slow') clearTimeout(this.poller.handle);
    this.poller = undefined;
  }

  private poll(): void {
    this.poller = undefined;
    if (this.closedError) return;
    const out = this.completions;
    const max = this.capacity;
    let n: number;
    do {
      try {
        this.counters.reapCalls++;
        n = this.channel.reap(out, max);
      } catch (e) {
        this.fail(e);
        return;
      }
      if (!Number.isInteger(n) || n < 0 || n > max) {
        this.fail(new Error(`reap returned ${String(n)} completions, at most ${max} fit`));
        return;
      }
      for (let k = 0; k < n; k++) this.complete(out, k * CompletionRecord.SIZE);
    } while (n === max);
    if (this.queuedCount > 0) this.flush();
    this.schedulePoll();
  }

  private complete(out: Buffer, off: number): void {
    const token = out.readUInt32LE(off + CompletionRecord.TOKEN);
    const p = this.onDevice.get(token);
    if (p === undefined) {
      // The native layer validates used-ring entries; an unknown token here means the two
      // sides disagree, and nothing can be trusted any more.
      this.fail(new Error(`completion for unknown request token ${token}`));
      return;
    }
    this.onDevice.delete(token);
    this.counters.completed++;
    if (p.state === State.Abandoned) {
      this.abandoned--;
      p.state = State.Done;
      return;
    }
    p.state = State.Done;
    this.settle(p);
    const senseLength = Math.min(out.readUInt16LE(off + CompletionRecord.SENSE_LENGTH), CompletionRecord.SENSE_MAX);
    const result: CommandResult = {
      response: out.readUInt8(off + CompletionRecord.RESPONSE),
      status: out.readUInt8(off + CompletionRecord.STATUS),
      residual: out.readUInt32LE(off + CompletionRecord.RESIDUAL),
      dataLength: out.readUInt32LE(off + CompletionRecord.DATA_LENGTH),
    };
    if (senseLength > 0) {
      const start = off + CompletionRecord.SENSE;
      // A copy: the completion buffer is reused by the next reap.
      result.sense = new Uint8Array(out.subarray(start, start + senseLength));
    }
    p.resolve(result);
  }

  private fail(cause: unknown): void {
    if (this.closedError) return;
    const reason = cause instanceof Error ? cause.message : String(cause);
    this.shutDown(new ControllerFailedError(this.label, reason, { cause }));
  }

  private shutDown(err: InitiatorError): void {
    this.closedError = err;
    this.cancelPoll();
    for (let i = this.head; i < this.fifo.length; i++) {
      const p = this.fifo[i]!;
      if (p.state !== State.Queued) continue;
      p.state = State.Done;
      this.settle(p);
      p.reject(err);
    }
    this.fifo = [];
    this.head = 0;
    this.queuedCount = 0;
    for (const p of this.onDevice.values()) {
      if (p.state !== State.OnDevice) continue;
      p.state = State.Done;
      this.settle(p);
      p.reject(err);
    }
    this.onDevice.clear();
    this.abandoned = 0;
    try {
      this.channel.close();
    } catch {
      // Already failed or closed on the native side: nothing left to release.
    }
  }
}
