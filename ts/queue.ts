// A request queue over one native channel (one exclusive virtqueue), owned by one thread.
//
// The slot index is the request's token. Everything a request needs is kept per slot in typed
// arrays and plain arrays allocated once, so a request costs its Promise and nothing else on the
// heap. Requests are written as packed records straight into the channel's submission area;
// one native `pump` call takes the batch down and brings completions back in the channel's
// completion area (design D3).
//
// Passes run from a microtask loop while work keeps coming (so completions are seen as soon as
// the continuations they wake have queued their next requests), yield to the event loop through
// setImmediate after a budget of passes or when a pass found nothing, and stop when nothing is
// outstanding: an idle queue holds no handle and uses no CPU.

import { closeSync, read, writeSync } from 'node:fs';

import { ClosedError, ControllerFailedError, InitiatorError, RequestTimeoutError } from './errors.js';
import { CompletionReader, Direction, Flag, Kind, RecordWriter, RESPONSE_REFUSED, SubmitRecord } from './records.js';

import { describeCdb, read as readCdb, write as writeCdb } from './scsi/cdb.js';

/** What a request queue needs from a channel; the native Channel has exactly this shape. */
export interface ChannelLike {
  readonly capacity: number;
  /** The virtqueue index (2 for the first request queue). */
  readonly queueIndex?: number;
  /** True while other threads use the same request queue. */
  readonly shared?: boolean;
  /** Added to a slot number, the tag the device knows that request by (0 unless shared). */
  readonly tagBase?: number;
  /** `capacity` submission records, shared with the channel. */
  submissionArea(): Buffer;
  /** `capacity` completion records and their sense slots, shared with the channel. */
  completionArea(): Buffer;
  /** Takes `count` records, reaps completions; returns `taken * 65536 + completed`. */
  pump(count: number, buffers?: Array<Buffer | null> | null): number;
  /** Takes `count` records without reaping; returns how many the ring took. */
  submit?(count: number, buffers?: Array<Buffer | null> | null): number;
  close(): void;
  /** Interrupt mode: a blocking descriptor of the caller's own for the queue's signal. */
  interruptFd?(): number;
  /** Asks for a signal at the next completion; true when there is something to poll already. */
  armInterrupts?(): boolean;
  disarmInterrupts?(): void;
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
  /** Milliseconds the device may take (default: the queue's `timeoutMs`; 0: no limit). */
  timeoutMs?: number;
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
  /** Nanoseconds from the submission to the poll that found the completion. */
  latencyNs: number;
}

/** Why a command of `executeAll` has no completion: what `execute` would have rejected with. */
export class Rejected {
  constructor(readonly reason: unknown) {}
}

/** Anything that runs SCSI commands: a RequestQueue, or a wrapper that shares one. */
export interface CommandExecutor {
  execute(cmd: ScsiCommand): Promise<CommandResult>;
  /**
   * Runs commands together, resolving once all are done with each one's completion (or
   * `Rejected`), in order: one promise for the lot instead of one per command.
   */
  executeAll?(cmds: readonly ScsiCommand[]): Promise<Array<CommandResult | Rejected>>;
}

/**
 * Completed READ and WRITE commands of the fast path, their bytes and their latencies (sum,
 * least and most, in nanoseconds from submission to the poll that found them), counted by the
 * queue. Minimums start at Infinity.
 */
export interface TransferCounters {
  readOps: number;
  readBytes: number;
  readLatencyNs: number;
  readLatencyMinNs: number;
  readLatencyMaxNs: number;
  writeOps: number;
  writeBytes: number;
  writeLatencyNs: number;
  writeLatencyMinNs: number;
  writeLatencyMaxNs: number;
}

/** Adds one completed READ (`write` false) or WRITE to `c`. */
export function countTransfer(c: TransferCounters, write: boolean, bytes: number, ns: number): void {
  if (write) {
    if (ns < c.writeLatencyMinNs) c.writeLatencyMinNs = ns;
    if (ns > c.writeLatencyMaxNs) c.writeLatencyMaxNs = ns;
    c.writeOps++;
    c.writeBytes += bytes;
    c.writeLatencyNs += ns;
  } else {
    if (ns < c.readLatencyMinNs) c.readLatencyMinNs = ns;
    if (ns > c.readLatencyMaxNs) c.readLatencyMaxNs = ns;
    c.readOps++;
    c.readBytes += bytes;
    c.readLatencyNs += ns;
  }
}

/** Who a fast-path READ or WRITE belongs to (a block device). */
export interface TransferOwner {
  /** Counted when the command completes with GOOD status and the whole transfer. */
  readonly counters: TransferCounters;
  /**
   * Called for a command that did not simply succeed; what it returns (or throws) settles the
   * request. Retries go here, so that the common case runs no retry machinery at all.
   */
  recover(result: CommandResult, cmd: ScsiCommand): unknown;
}

/** What block devices need of a queue: commands, virtio-blk requests, and the READ/WRITE fast path. */
export type IoQueue = Pick<RequestQueue, 'execute' | 'transfer' | 'blockRequest'>;

/**
 * A virtio-blk request other than READ and WRITE. It completes with response 0 once the device
 * wrote its status byte, and `status` is that byte (0 OK, 1 IOERR, 2 UNSUPP).
 */
export interface BlockRequest {
  op: 'flush' | 'discard' | 'write-zeroes' | 'get-id';
  /** DISCARD, WRITE ZEROES: the range, in logical blocks. */
  lba?: number;
  blocks?: number;
  /** WRITE ZEROES: the device may deallocate the blocks. */
  unmap?: boolean;
  /** GET ID: the buffer for the ID (20 bytes). */
  dataIn?: Uint8Array;
  signal?: AbortSignal;
  timeoutMs?: number;
}

const BLOCK_KINDS: Record<BlockRequest['op'], number> = {
  flush: Kind.SYNCHRONIZE_CACHE,
  discard: Kind.DISCARD,
  'write-zeroes': Kind.WRITE_ZEROES,
  'get-id': Kind.GET_ID,
};
const BLOCK_NAMES = ['', '', '', 'FLUSH', 'DISCARD', 'WRITE ZEROES', 'GET ID'];

export interface RequestQueueStats {
  /** The virtqueue this queue submits to (2 for the first request queue). */
  queueIndex: number;
  /** True while other threads share that virtqueue. */
  shared: boolean;
  /** Requests waiting for a slot or for the next native call. */
  queued: number;
  /** Requests on the device, including abandoned (aborted) ones whose completion is pending. */
  inFlight: number;
  /** Native calls (each submits, and all but the early submits of a long burst reap too). */
  submitCalls: number;
  submitted: number;
  completed: number;
}

export interface RequestQueueOptions {
  /** Names the controller in errors. */
  label?: string;
  /**
   * The host address of memory inside the controller's DMA memory, or -1 for any other memory
   * (then copied through a bounce buffer by the native side).
   */
  addressOf?: (data: Uint8Array) => number;
  /**
   * The error for a controller that was closed (by its owner, perhaps in another thread), or
   * undefined while it is open: a native call that fails then rejects with it rather than with
   * a controller failure.
   */
  closedError?: () => Error | undefined;
  /**
   * Wait for completions on the queue's interrupt descriptor (read in libuv's thread pool)
   * instead of polling: for services that do little I/O, at the cost of latency.
   */
  interrupts?: boolean;
  /**
   * Called with one line per completed command (CDB, response, status, sense, data length,
   * latency), for debugging a target. Costs nothing when not given.
   */
  trace?: (line: string) => void;
  /**
   * Milliseconds the device may take for a request before it is given up on (rejected with
   * RequestTimeoutError), unless the request says otherwise; 0 for no limit. Default 30 s.
   */
  timeoutMs?: number;
  /**
   * Called for each request given up on while the device still holds it (timed out, or its
   * signal aborted): its slot is kept until the device gives it back, which the caller makes
   * happen (ABORT TASK, then resets).
   */
  onAbandoned?: (request: AbandonedRequest) => void;
}

/** A request given up on while the device holds it. */
export interface AbandonedRequest {
  target: number;
  lun: number;
  /** The tag the device knows it by (for ABORT TASK). */
  tag: number;
  /** What it was, for messages ("READ of 8 blocks at LBA 0", "INQUIRY"). */
  what: string;
  why: 'timeout' | 'abort';
  /** Resolves once the device has given it back (or the queue has shut down). */
  returned: Promise<void>;
}

/** Default request deadline. */
export const DEFAULT_TIMEOUT_MS = 30_000;
/** Period of the coarse clock that deadlines are kept in: no clock is read per request. */
const TICK_MS = 100;

/** The native side refused a request before it reached the device (it names why). */
export class RequestRefusedError extends InitiatorError {
  constructor(label: string, reason: string) {
    super('ERR_VIRTIO_REQUEST_REFUSED', `${label}: request refused: ${reason}`);
    this.name = 'RequestRefusedError';
  }
}

const enum State {
  Free,
  /** Written into the submission area, waiting for the next native call. */
  Staged,
  OnDevice,
  /** Given up on (aborted or timed out) while on the device: the completion is awaited and dropped. */
  Abandoned,
}

const enum Mode {
  /** Resolves with a CommandResult. */
  Command,
  /** READ/WRITE fast path: resolves with a fixed value on success, else asks `recover`. */
  Transfer,
  /** A virtio-blk request (its record kind in `value`): resolves with a CommandResult. */
  Block,
}

/** The commands of one `executeAll`, admitted in order as slots free up. */
interface Batch {
  cmds: readonly ScsiCommand[];
  out: Array<CommandResult | Rejected>;
  /** The next command to admit. */
  next: number;
  /** Commands not settled yet. */
  pending: number;
  /** Commands settled before admission (their signal fired), by index. */
  skip: Uint8Array | undefined;
  resolve: (out: Array<CommandResult | Rejected>) => void;
}

/** A request that found no free slot, waiting in order for one. */
interface Waiting {
  mode: Mode;
  cmd: ScsiCommand | undefined;
  write: boolean;
  target: number;
  lun: number;
  lba: number;
  blocks: number;
  data: Buffer | null;
  fua: boolean;
  signal: AbortSignal | undefined;
  timeoutMs: number;
  value: unknown;
  recover: TransferOwner | undefined;
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
}

const MAX_TARGET = 255;
const MAX_LUN = 0x3fff;
const MIN_CDB = 6;
/** Poll period while only abandoned requests are on the device. */
const ABANDONED_POLL_MS = 10;
/** Passes run back to back from microtasks before the event loop gets a turn. */
const MICROTASK_BUDGET = 16;
/** Staged requests that are sent down at once, without waiting for the end of the burst. */
const EARLY_SUBMIT = 16;

const noAddress = (): number => -1;
const RESOLVED = Promise.resolve();

function asBuffer(data: Uint8Array): Buffer {
  // Shares memory: a DMA Buffer (or a view of one) must stay zero-copy.
  return Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

/** Why `ms` is not a request deadline (milliseconds, 0 for none), or undefined when it is one. */
export function badTimeout(ms: unknown): string | undefined {
  return typeof ms === 'number' && ms >= 0 && ms <= 2 ** 31
    ? undefined
    : `timeoutMs ${String(ms)} is not a number of milliseconds from 0 to 2^31`;
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
  if (cmd.dataIn !== undefined && !(cmd.dataIn instanceof Uint8Array)) return 'dataIn must be a Buffer or Uint8Array';
  if (cmd.dataOut !== undefined && !(cmd.dataOut instanceof Uint8Array)) {
    return 'dataOut must be a Buffer or Uint8Array';
  }
  if (cmd.timeoutMs !== undefined) {
    const bad = badTimeout(cmd.timeoutMs);
    if (bad !== undefined) return bad;
  }
  const attr = cmd.taskAttribute ?? 0;
  if (!Number.isInteger(attr) || attr < 0 || attr > 0xff) return `taskAttribute ${String(attr)} out of range`;
  return undefined;
}

export class RequestQueue implements CommandExecutor {
  readonly label: string;
  private readonly channel: ChannelLike;
  private readonly addressOf: (data: Uint8Array) => number;
  private readonly closedBy: (() => Error | undefined) | undefined;
  private readonly traceLine: ((line: string) => void) | undefined;
  private readonly capacity: number;
  private readonly writer: RecordWriter;
  private readonly reader: CompletionReader;

  // Per slot.
  private readonly state: Uint8Array;
  private readonly mode: Uint8Array;
  private readonly isWrite: Uint8Array;
  private readonly fua: Uint8Array;
  private readonly target: Uint8Array;
  private readonly lun: Uint16Array;
  private readonly lba: Float64Array;
  private readonly blocks: Uint32Array;
  private readonly cmd: Array<ScsiCommand | undefined>;
  /** The request's data: a Buffer for READ/WRITE, any Uint8Array for a command. */
  private readonly data: Array<Uint8Array | null>;
  private readonly signal: Array<AbortSignal | undefined>;
  private readonly value: unknown[];
  private readonly recover: Array<TransferOwner | undefined>;
  private readonly resolveOf: Array<((v: unknown) => void) | undefined>;
  private readonly rejectOf: Array<((e: unknown) => void) | undefined>;
  /** Deadline in ticks of the coarse clock (0: none), and the limit it came from. */
  private readonly deadline: Float64Array;
  private readonly limitMs: Float64Array;
  /** Abandoned slots whose return someone waits for. */
  private readonly returnedOf: Array<(() => void) | undefined>;
  private readonly freeSlots: Int32Array;
  private freeCount: number;

  /** Slots staged for the next native call, in record order. */
  private readonly staged: Int32Array;
  private stagedCount = 0;
  /** Plain (non-DMA) buffers named by index in the staged records. */
  private passBuffers: Array<Buffer | null> = [];
  private waiting: Waiting[] = [];
  private waitingHead = 0;
  /** `executeAll` batches with commands not admitted yet, in order (after the waiting line). */
  private batches: Batch[] = [];
  /** Per slot: the batch and index of the command in it, and settlers made once per slot. */
  private readonly batchOf: Array<Batch | undefined>;
  private readonly batchIndex: Uint32Array;
  private readonly batchDone: Array<(v: unknown) => void>;
  private readonly batchFail: Array<(e: unknown) => void>;

  private onDevice = 0;
  private abandoned = 0;
  private microScheduled = false;
  private burst = 0;
  private immediate: NodeJS.Immediate | undefined;
  private slowTimer: NodeJS.Timeout | undefined;
  private readonly watched = new WeakSet<AbortSignal>();
  private readonly timeoutMs: number;
  private readonly onAbandoned: ((request: AbandonedRequest) => void) | undefined;
  private readonly tagBase: number;
  /** The coarse clock: advanced by a timer that runs while requests are on the device. */
  private tick = 1;
  private ticker: NodeJS.Timeout | undefined;
  private readonly onTick = (): void => this.expireOverdue();
  /** Interrupt mode: our descriptor for the queue's signal, and whether a read waits on it. */
  private interruptFd = -1;
  private interruptWait = false;
  private readonly eventBuf = Buffer.alloc(8);
  private readonly onInterrupt = (err: NodeJS.ErrnoException | null): void => {
    this.interruptWait = false;
    if (this.closedError) {
      closeFd(this.interruptFd);
      return;
    }
    if (err) {
      this.shutDownWith(err);
      return;
    }
    try {
      this.channel.disarmInterrupts!();
    } catch (e) {
      this.shutDownWith(e);
      return;
    }
    this.burst = 0;
    this.pass();
  };
  private closedError: Error | undefined;
  private counters = { submitCalls: 0, submitted: 0, completed: 0 };

  // Promise executor state: one shared executor instead of a closure per request.
  private nextResolve: ((v: unknown) => void) | undefined;
  private nextReject: ((e: unknown) => void) | undefined;
  private readonly capture = (resolve: (v: unknown) => void, reject: (e: unknown) => void): void => {
    this.nextResolve = resolve;
    this.nextReject = reject;
  };
  private readonly runPass = (): void => {
    this.microScheduled = false;
    this.pass();
  };
  private readonly runImmediate = (): void => {
    this.immediate = undefined;
    this.burst = 0;
    this.pass();
  };
  private readonly runSlow = (): void => {
    this.slowTimer = undefined;
    this.pass();
  };

  constructor(channel: ChannelLike, options: RequestQueueOptions = {}) {
    this.channel = channel;
    this.label = options.label ?? 'virtio-scsi';
    this.addressOf = options.addressOf ?? noAddress;
    this.closedBy = options.closedError;
    this.traceLine = options.trace;
    const cap = channel.capacity;
    if (!Number.isInteger(cap) || cap < 1 || cap > 0xffff) {
      throw new RangeError(`channel capacity ${String(cap)} is not an integer from 1 to 65535`);
    }
    this.capacity = cap;
    this.writer = new RecordWriter(channel.submissionArea());
    this.reader = new CompletionReader(channel.completionArea(), cap);
    this.state = new Uint8Array(cap);
    this.mode = new Uint8Array(cap);
    this.isWrite = new Uint8Array(cap);
    this.fua = new Uint8Array(cap);
    this.target = new Uint8Array(cap);
    this.lun = new Uint16Array(cap);
    this.lba = new Float64Array(cap);
    this.blocks = new Uint32Array(cap);
    this.cmd = new Array<ScsiCommand | undefined>(cap).fill(undefined);
    this.data = new Array<Uint8Array | null>(cap).fill(null);
    this.signal = new Array<AbortSignal | undefined>(cap).fill(undefined);
    this.value = new Array<unknown>(cap).fill(undefined);
    this.recover = new Array<TransferOwner | undefined>(cap).fill(undefined);
    this.resolveOf = new Array<((v: unknown) => void) | undefined>(cap).fill(undefined);
    this.rejectOf = new Array<((e: unknown) => void) | undefined>(cap).fill(undefined);
    this.deadline = new Float64Array(cap);
    this.limitMs = new Float64Array(cap);
    this.returnedOf = new Array<(() => void) | undefined>(cap).fill(undefined);
    this.batchOf = new Array<Batch | undefined>(cap).fill(undefined);
    this.batchIndex = new Uint32Array(cap);
    this.batchDone = Array.from({ length: cap }, (_, slot) => (v: unknown) => this.settleSlotMember(slot, v as CommandResult));
    this.batchFail = Array.from({ length: cap }, (_, slot) => (e: unknown) => this.settleSlotMember(slot, new Rejected(e)));
    const timeout = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const bad = badTimeout(timeout);
    if (bad !== undefined) throw new RangeError(bad);
    this.timeoutMs = timeout;
    this.onAbandoned = options.onAbandoned;
    this.tagBase = channel.tagBase ?? 0;
    this.freeSlots = new Int32Array(cap);
    for (let i = 0; i < cap; i++) this.freeSlots[i] = cap - 1 - i;
    this.freeCount = cap;
    this.staged = new Int32Array(cap);
    if (options.interrupts === true) {
      if (!channel.interruptFd || !channel.armInterrupts || !channel.disarmInterrupts) {
        throw new TypeError(`${this.label}: this channel has no interrupt mode`);
      }
      this.interruptFd = channel.interruptFd();
    }
  }

  /** True once closed or failed: every later request rejects. */
  get closed(): boolean {
    return this.closedError !== undefined;
  }

  get stats(): RequestQueueStats {
    return {
      queueIndex: this.channel.queueIndex ?? 0,
      shared: this.channel.shared ?? false,
      queued: this.stagedCount + this.waiting.length - this.waitingHead + this.batches.reduce((n, b) => n + b.cmds.length - b.next, 0),
      inFlight: this.onDevice,
      submitCalls: this.counters.submitCalls,
      submitted: this.counters.submitted,
      completed: this.counters.completed,
    };
  }

  /** Queues one SCSI command. Rejects only for bad arguments, abort, close or controller failure. */
  execute(cmd: ScsiCommand): Promise<CommandResult> {
    const bad = validate(cmd);
    if (bad !== undefined) return Promise.reject(new TypeError(`${this.label}: ${bad}`));
    return this.enqueue(
      Mode.Command,
      cmd,
      false,
      cmd.target,
      cmd.lun,
      0,
      0,
      null,
      false,
      cmd.signal,
      cmd.timeoutMs ?? this.timeoutMs,
      undefined,
      undefined,
    ) as Promise<CommandResult>;
  }

  /**
   * Queues commands together: resolves, once every one is done, with each one's completion or
   * (for bad arguments, abort, close, failure) `Rejected`, in order. Commands are checked
   * as `execute` checks them.
   */
  executeAll(cmds: readonly ScsiCommand[]): Promise<Array<CommandResult | Rejected>> {
    const n = cmds.length;
    const out = new Array<CommandResult | Rejected>(n);
    if (n === 0) return Promise.resolve(out);
    if (this.closedError) return Promise.resolve(out.fill(new Rejected(this.closedError)));
    return new Promise((resolve) => {
      // The commands wait in the caller's array, not one record each, until slots free up.
      this.batches.push({ cmds, out, next: 0, pending: n, skip: undefined, resolve });
      this.admitWaiting();
      this.ensurePass();
    });
  }

  /**
   * READ (`write` false) or WRITE of `blocks` blocks at `lba` (below 2^53) with `data`, built
   * natively. Resolves with `value` when the command completes with GOOD status and the whole
   * transfer (counted in `owner.counters`); otherwise settles with what `owner.recover` returns
   * or throws. `timeoutMs` undefined takes the queue's. Arguments are trusted: the block
   * device checks them.
   */
  transfer(
    write: boolean,
    target: number,
    lun: number,
    lba: number,
    blocks: number,
    data: Buffer,
    fua: boolean,
    signal: AbortSignal | undefined,
    timeoutMs: number | undefined,
    value: unknown,
    owner: TransferOwner,
  ): Promise<unknown> {
    return this.enqueue(Mode.Transfer, undefined, write, target, lun, lba, blocks, data, fua, signal, timeoutMs ?? this.timeoutMs, value, owner);
  }

  /**
   * Queues one virtio-blk request (see `BlockRequest`), framed natively. Rejects only for bad
   * arguments, abort, close or controller failure.
   */
  blockRequest(req: BlockRequest): Promise<CommandResult> {
    const kind = BLOCK_KINDS[req.op];
    if (kind === undefined) return Promise.reject(new TypeError(`${this.label}: unknown block request ${String(req.op)}`));
    const lba = req.lba ?? 0;
    const blocks = req.blocks ?? 0;
    if (!Number.isSafeInteger(lba) || lba < 0 || !Number.isInteger(blocks) || blocks < 0 || blocks > 0xffffffff) {
      return Promise.reject(new RangeError(`${this.label}: ${req.op} of ${blocks} blocks at LBA ${lba} is not a range`));
    }
    const data = req.dataIn === undefined ? null : asBuffer(req.dataIn);
    const timeout = req.timeoutMs ?? this.timeoutMs;
    const bad = badTimeout(timeout);
    if (bad !== undefined) return Promise.reject(new TypeError(`${this.label}: ${bad}`));
    return this.enqueue(Mode.Block, undefined, false, 0, 0, lba, blocks, data, req.unmap === true, req.signal, timeout, kind, undefined) as Promise<CommandResult>;
  }

  /**
   * Rejects everything queued or in flight with ControllerFailedError (`reason`) and releases
   * the channel: the controller behind it failed, or its device was reset.
   */
  fail(reason: string): void {
    this.shutDownWith(new Error(reason));
  }

  /** Rejects everything queued or in flight and releases the channel. */
  close(): void {
    if (this.closedError) return;
    this.shutDown(new ClosedError(`${this.label}: request queue closed`));
  }

  private enqueue(
    mode: Mode,
    cmd: ScsiCommand | undefined,
    write: boolean,
    target: number,
    lun: number,
    lba: number,
    blocks: number,
    data: Buffer | null,
    fua: boolean,
    signal: AbortSignal | undefined,
    timeoutMs: number,
    value: unknown,
    recover: TransferOwner | undefined,
  ): Promise<unknown> {
    if (this.closedError) return Promise.reject(this.closedError);
    if (signal !== undefined) {
      if (signal.aborted) return Promise.reject(signal.reason);
      this.watch(signal);
    }
    const promise = new Promise<unknown>(this.capture);
    const resolve = this.nextResolve!;
    const reject = this.nextReject!;
    if (this.freeCount === 0 || this.waiting.length > this.waitingHead || this.batches.length > 0) {
      this.waiting.push({ mode, cmd, write, target, lun, lba, blocks, data, fua, signal, timeoutMs, value, recover, resolve, reject });
    } else {
      const slot = this.freeSlots[--this.freeCount]!;
      this.fill(slot, mode, cmd, write, target, lun, lba, blocks, data, fua, signal, timeoutMs, value, recover, resolve, reject);
      this.stage(slot);
      // A long burst (the continuations of many completions) starts down before it ends.
      if (this.stagedCount >= EARLY_SUBMIT) this.submitStaged();
    }
    this.ensurePass();
    return promise;
  }

  private fill(
    slot: number,
    mode: Mode,
    cmd: ScsiCommand | undefined,
    write: boolean,
    target: number,
    lun: number,
    lba: number,
    blocks: number,
    data: Buffer | null,
    fua: boolean,
    signal: AbortSignal | undefined,
    timeoutMs: number,
    value: unknown,
    recover: TransferOwner | undefined,
    resolve: (v: unknown) => void,
    reject: (e: unknown) => void,
  ): void {
    this.mode[slot] = mode;
    this.limitMs[slot] = timeoutMs;
    if (timeoutMs > 0) {
      // One tick more than the limit: the clock may be about to advance.
      this.deadline[slot] = this.tick + Math.ceil(timeoutMs / TICK_MS) + 1;
      if (this.ticker === undefined) this.startTicker();
    } else {
      this.deadline[slot] = 0;
    }
    this.cmd[slot] = cmd;
    this.isWrite[slot] = write ? 1 : 0;
    this.target[slot] = target;
    this.lun[slot] = lun;
    this.lba[slot] = lba;
    this.blocks[slot] = blocks;
    this.fua[slot] = fua ? 1 : 0;
    this.signal[slot] = signal;
    this.value[slot] = value;
    this.recover[slot] = recover;
    this.resolveOf[slot] = resolve;
    this.rejectOf[slot] = reject;
    if (mode === Mode.Command) {
      const buf = cmd!.dataIn ?? cmd!.dataOut;
      this.data[slot] = buf !== undefined && buf.length > 0 ? buf : null;
    } else {
      this.data[slot] = data;
    }
  }

  /** Writes the slot's record at the end of the submission area. */
  private stage(slot: number): void {
    const i = this.stagedCount++;
    this.staged[i] = slot;
    this.state[slot] = State.Staged;
    const data = this.data[slot] ?? null;
    let addr = -1;
    let length = 0;
    let index = 0;
    if (data !== null) {
      length = data.length;
      addr = this.addressOf(data);
      if (addr < 0) {
        index = this.passBuffers.length;
        this.passBuffers.push(asBuffer(data));
      }
    }
    if (this.mode[slot] === Mode.Block) {
      const flags = this.fua[slot] === 1 ? Flag.UNMAP : 0;
      this.writer.blockRequest(i, slot, this.value[slot] as number, this.lba[slot]!, this.blocks[slot]!, flags, addr, length, index);
    } else if (this.mode[slot] === Mode.Transfer) {
      this.writer.readWrite(
        i,
        slot,
        this.target[slot]!,
        this.lun[slot]!,
        this.isWrite[slot] === 1,
        this.lba[slot]!,
        this.blocks[slot]!,
        this.fua[slot] === 1,
        addr,
        length,
        index,
      );
    } else {
      const cmd = this.cmd[slot]!;
      const direction = data === null ? Direction.NONE : cmd.dataIn !== undefined ? Direction.IN : Direction.OUT;
      this.writer.cdb(i, slot, cmd.target, cmd.lun, cmd.cdb, cmd.taskAttribute ?? 0, direction, addr, length, index);
    }
  }

  /** Rewrites the submission area from the staged slots still waiting (after a partial take or an abort). */
  private restage(from: number): void {
    const keep: number[] = [];
    for (let i = from; i < this.stagedCount; i++) {
      const slot = this.staged[i]!;
      if (this.state[slot] === State.Staged) keep.push(slot);
    }
    this.stagedCount = 0;
    this.passBuffers = [];
    for (const slot of keep) this.stage(slot);
  }

  private ensurePass(): void {
    if (!this.microScheduled) {
      this.microScheduled = true;
      // A reaction on a settled promise, not queueMicrotask: Node wraps each queueMicrotask
      // callback in an AsyncResource, which costs more than the pass it schedules at low depth.
      RESOLVED.then(this.runPass);
    }
  }

  /** One native call: submit what is staged, take completions, settle them, plan the next pass. */
  private pass(): void {
    if (this.closedError) return;
    this.admitWaiting();
    const count = this.stagedCount;
    if (count === 0 && this.onDevice === 0) return;
    let result: number;
    try {
      this.counters.submitCalls++;
      result = this.channel.pump(count, this.passBuffers.length > 0 ? this.passBuffers : null);
    } catch (e) {
      this.shutDownWith(e);
      return;
    }
    const taken = result >>> 16;
    const done = result & 0xffff;
    if (taken > count || done > this.capacity) {
      this.shutDownWith(new Error(`pump took ${taken} of ${count} requests and returned ${done} completions`));
      return;
    }
    this.took(taken, count);
    for (let k = 0; k < done; k++) {
      this.complete(k);
      if (this.closedError) return;
    }
    this.plan(taken + done > 0);
  }

  /** The first `taken` of `count` staged requests are on the device; the rest stay staged. */
  private took(taken: number, count: number): void {
    for (let i = 0; i < taken; i++) this.state[this.staged[i]!] = State.OnDevice;
    this.onDevice += taken;
    this.counters.submitted += taken;
    if (taken === count) {
      this.stagedCount = 0;
      if (this.passBuffers.length > 0) this.passBuffers = [];
    } else {
      this.restage(taken);
    }
  }

  /** Sends the staged requests down now, without reaping (the next pass does that). */
  private submitStaged(): void {
    if (this.channel.submit === undefined || this.closedError) return;
    const count = this.stagedCount;
    let taken: number;
    try {
      this.counters.submitCalls++;
      taken = this.channel.submit(count, this.passBuffers.length > 0 ? this.passBuffers : null);
    } catch (e) {
      this.shutDownWith(e);
      return;
    }
    if (!(taken >= 0 && taken <= count)) {
      this.shutDownWith(new Error(`submit took ${taken} of ${count} requests`));
      return;
    }
    this.took(taken, count);
  }

  private plan(didWork: boolean): void {
    if (this.closedError) return;
    if (this.stagedCount > 0 || this.waiting.length > this.waitingHead || this.batches.length > 0) {
      // Staged requests the ring could not take yet wait for completions: poll, yielding.
      if (this.freeCount === 0 || this.stagedCount > 0) this.idle();
      else this.ensurePass();
      return;
    }
    if (this.onDevice > this.abandoned) {
      if (didWork && this.burst < MICROTASK_BUDGET) {
        this.burst++;
        this.ensurePass();
      } else {
        this.idle();
      }
    } else if (this.onDevice > 0 && this.slowTimer === undefined) {
      // Only abandoned requests: nobody waits, so poll slowly and keep the process free to exit.
      this.slowTimer = setTimeout(this.runSlow, ABANDONED_POLL_MS).unref();
    }
  }

  /** Nothing to do until the device completes something: poll again, or wait for its signal. */
  private idle(): void {
    if (this.interruptFd < 0) {
      this.scheduleImmediate();
      return;
    }
    if (this.interruptWait) return;
    let ready: boolean;
    try {
      ready = this.channel.armInterrupts!();
      if (ready) this.channel.disarmInterrupts!();
    } catch (e) {
      this.shutDownWith(e);
      return;
    }
    if (ready) {
      this.scheduleImmediate();
      return;
    }
    this.interruptWait = true;
    read(this.interruptFd, this.eventBuf, 0, 8, null, this.onInterrupt);
  }

  private scheduleImmediate(): void {
    if (this.immediate === undefined) this.immediate = setImmediate(this.runImmediate);
  }

  /** Moves waiting requests into free slots, in order. */
  private admitWaiting(): void {
    while (this.freeCount > 0 && this.waitingHead < this.waiting.length) {
      const w = this.waiting[this.waitingHead]!;
      this.waiting[this.waitingHead++] = undefined as unknown as Waiting;
      if (w.signal?.aborted) {
        w.reject(w.signal.reason);
        continue;
      }
      const slot = this.freeSlots[--this.freeCount]!;
      this.fill(slot, w.mode, w.cmd, w.write, w.target, w.lun, w.lba, w.blocks, w.data, w.fua, w.signal, w.timeoutMs, w.value, w.recover, w.resolve, w.reject);
      this.stage(slot);
    }
    if (this.waitingHead === this.waiting.length && this.waitingHead > 0) {
      this.waiting = [];
      this.waitingHead = 0;
    }
    while (this.freeCount > 0 && this.waitingHead === this.waiting.length && this.batches.length > 0) {
      const b = this.batches[0]!;
      this.admitMember(b);
      if (b.next === b.cmds.length) this.batches.shift();
    }
  }

  /** Takes the next command of a batch into a free slot (or settles it, when it cannot go). */
  private admitMember(b: Batch): void {
    const i = b.next++;
    if (b.skip !== undefined && b.skip[i] === 1) return;
    const cmd = b.cmds[i]!;
    const bad = validate(cmd);
    if (bad !== undefined) {
      this.settleMember(b, i, new Rejected(new TypeError(`${this.label}: ${bad}`)));
      return;
    }
    const signal = cmd.signal;
    if (signal !== undefined) {
      if (signal.aborted) {
        this.settleMember(b, i, new Rejected(signal.reason));
        return;
      }
      this.watch(signal);
    }
    const slot = this.freeSlots[--this.freeCount]!;
    this.batchOf[slot] = b;
    this.batchIndex[slot] = i;
    const timeoutMs = cmd.timeoutMs ?? this.timeoutMs;
    this.fill(slot, Mode.Command, cmd, false, cmd.target, cmd.lun, 0, 0, null, false, signal, timeoutMs, undefined, undefined, this.batchDone[slot]!, this.batchFail[slot]!);
    // No early submit: a batch is staged in one go, and goes down with the pass, in one call
    // (and at most one notification of the device) instead of one per 16 records.
    this.stage(slot);
  }

  /** Settles the batch command a slot held (called once per admission, right after its release). */
  private settleSlotMember(slot: number, v: CommandResult | Rejected): void {
    const b = this.batchOf[slot]!;
    this.batchOf[slot] = undefined;
    this.settleMember(b, this.batchIndex[slot]!, v);
  }

  private settleMember(b: Batch, i: number, v: CommandResult | Rejected): void {
    b.out[i] = v;
    if (--b.pending === 0) b.resolve(b.out);
  }

  private release(slot: number): void {
    this.state[slot] = State.Free;
    this.cmd[slot] = undefined;
    this.data[slot] = null;
    this.signal[slot] = undefined;
    this.value[slot] = undefined;
    this.recover[slot] = undefined;
    this.resolveOf[slot] = undefined;
    this.rejectOf[slot] = undefined;
    this.freeSlots[this.freeCount++] = slot;
  }

  private complete(k: number): void {
    const r = this.reader;
    const slot = r.token(k);
    const state = slot < this.capacity ? this.state[slot] : State.Free;
    if (state !== State.OnDevice && state !== State.Abandoned) {
      // The native layer validates used-ring entries; an unknown token here means the two
      // sides disagree, and nothing can be trusted any more.
      this.shutDownWith(new Error(`completion for unknown request token ${slot}`));
      return;
    }
    this.onDevice--;
    this.counters.completed++;
    if (this.traceLine !== undefined) this.traceCompletion(slot, k);
    if (state === State.Abandoned) {
      this.abandoned--;
      const returned = this.returnedOf[slot];
      this.returnedOf[slot] = undefined;
      this.release(slot);
      returned?.();
      return;
    }
    const resolve = this.resolveOf[slot]!;
    const reject = this.rejectOf[slot]!;
    const response = r.response(k);
    const status = r.status(k);
    if (this.mode[slot] === Mode.Transfer && response === 0 && status === 0 && (this.isWrite[slot] === 1 || r.residual(k) === 0)) {
      const value = this.value[slot];
      countTransfer(this.recover[slot]!.counters, this.isWrite[slot] === 1, this.data[slot]!.length, r.latencyNs(k));
      this.release(slot);
      resolve(value);
      return;
    }
    if (response === RESPONSE_REFUSED) {
      const reason = r.refusal(k);
      this.release(slot);
      reject(new RequestRefusedError(this.label, reason));
      return;
    }
    const result: CommandResult = {
      response,
      status,
      residual: r.residual(k),
      dataLength: r.dataLength(k),
      latencyNs: r.latencyNs(k),
    };
    if (r.senseLength(k) > 0) result.sense = r.sense(k);
    if (this.mode[slot] !== Mode.Transfer) {
      this.release(slot);
      resolve(result);
      return;
    }
    // A fast READ/WRITE that needs attention: rebuild the command for retries and messages.
    const write = this.isWrite[slot] === 1;
    const args = { lba: this.lba[slot]!, blocks: this.blocks[slot]!, fua: this.fua[slot] === 1 };
    const cmd: ScsiCommand = {
      target: this.target[slot]!,
      lun: this.lun[slot]!,
      cdb: write ? writeCdb(args) : readCdb(args),
      timeoutMs: this.limitMs[slot]!,
    };
    const data = this.data[slot]!;
    if (write) cmd.dataOut = data;
    else cmd.dataIn = data;
    const signal = this.signal[slot];
    if (signal !== undefined) cmd.signal = signal;
    const owner = this.recover[slot]!;
    this.release(slot);
    try {
      resolve(owner.recover(result, cmd));
    } catch (e) {
      reject(e);
    }
  }

  /** The trace line of completion `k` (of the request in `slot`). */
  private traceCompletion(slot: number, k: number): void {
    const r = this.reader;
    let what: string;
    let target: number;
    let lun: number;
    if (this.mode[slot] === Mode.Transfer) {
      const args = { lba: this.lba[slot]!, blocks: this.blocks[slot]!, fua: this.fua[slot] === 1 };
      what = describeCdb(this.isWrite[slot] === 1 ? writeCdb(args) : readCdb(args));
      target = this.target[slot]!;
      lun = this.lun[slot]!;
    } else if (this.mode[slot] === Mode.Block) {
      what = this.describe(slot);
      target = 0;
      lun = 0;
    } else {
      const cmd = this.cmd[slot]!;
      what = `${describeCdb(cmd.cdb)} [${Buffer.from(cmd.cdb).toString('hex')}]`;
      target = cmd.target;
      lun = cmd.lun;
    }
    const us = Math.round(r.latencyNs(k) / 1000);
    const sense = r.senseLength(k) > 0 ? ` sense ${Buffer.from(r.sense(k)).toString('hex')}` : '';
    const state = this.state[slot] === State.Abandoned ? ' (abandoned)' : '';
    this.traceLine!(
      `${this.label} ${target}:${lun} ${what}: response ${r.response(k)} status ${r.status(k)}${sense} ` +
        `data ${r.dataLength(k)} residual ${r.residual(k)} in ${us} us${state}`,
    );
  }

  /** One listener per signal and queue, however many requests carry it. */
  private watch(signal: AbortSignal): void {
    if (this.watched.has(signal)) return;
    this.watched.add(signal);
    signal.addEventListener('abort', () => this.aborted(signal), { once: true });
  }

  private aborted(signal: AbortSignal): void {
    const reason: unknown = signal.reason;
    let unstaged = false;
    for (let slot = 0; slot < this.capacity; slot++) {
      if (this.signal[slot] !== signal) continue;
      const state = this.state[slot];
      const reject = this.rejectOf[slot];
      if (state === State.Staged) {
        this.release(slot);
        unstaged = true;
      } else if (state === State.OnDevice) {
        this.abandon(slot, 'abort');
      } else {
        continue;
      }
      reject?.(reason);
    }
    if (unstaged) this.restage(0);
    // Waiting requests with this signal are dropped when they would be admitted.
    for (let i = this.waitingHead; i < this.waiting.length; i++) {
      const w = this.waiting[i]!;
      if (w.signal === signal) {
        w.reject(reason);
        w.signal = undefined;
        w.reject = noop;
        w.resolve = noop;
        w.mode = Mode.Command;
        w.cmd = CANCELLED;
      }
    }
    this.waiting = this.waiting.filter((w, i) => i < this.waitingHead || w.cmd !== CANCELLED);
    for (const b of this.batches) {
      for (let i = b.next; i < b.cmds.length; i++) {
        if (b.cmds[i]!.signal !== signal || (b.skip !== undefined && b.skip[i] === 1)) continue;
        (b.skip ??= new Uint8Array(b.cmds.length))[i] = 1;
        this.settleMember(b, i, new Rejected(reason));
      }
    }
  }

  /**
   * Gives up on a request the device holds. The device may still write into its buffer: the
   * slot (and with it the buffer) is kept until the completion arrives, then dropped.
   */
  private abandon(slot: number, why: AbandonedRequest['why']): void {
    this.state[slot] = State.Abandoned;
    this.abandoned++;
    this.resolveOf[slot] = undefined;
    this.rejectOf[slot] = undefined;
    this.deadline[slot] = 0;
    if (this.onAbandoned === undefined) return;
    const returned = new Promise<void>((r) => {
      this.returnedOf[slot] = r;
    });
    const target = this.target[slot]!;
    const lun = this.lun[slot]!;
    this.onAbandoned({ target, lun, tag: this.tagBase + slot, what: this.describe(slot), why, returned });
  }

  /** What a slot's request is, for messages. */
  private describe(slot: number): string {
    if (this.mode[slot] === Mode.Transfer) {
      const op = this.isWrite[slot] === 1 ? 'WRITE' : 'READ';
      return `${op} of ${this.blocks[slot]} blocks at LBA ${this.lba[slot]}`;
    }
    if (this.mode[slot] === Mode.Block) {
      const kind = this.value[slot] as number;
      const name = BLOCK_NAMES[kind]!;
      return kind === Kind.DISCARD || kind === Kind.WRITE_ZEROES ? `${name} of ${this.blocks[slot]} blocks at LBA ${this.lba[slot]}` : name;
    }
    return describeCdb(this.cmd[slot]!.cdb);
  }

  private startTicker(): void {
    this.ticker = setInterval(this.onTick, TICK_MS);
    // Deadlines never keep a process alive: pending requests do, by their own means.
    this.ticker.unref();
  }

  /** Advances the coarse clock and gives up on requests past their deadline. */
  private expireOverdue(): void {
    this.tick++;
    if (this.onDevice === 0 && this.stagedCount === 0 && this.waiting.length === this.waitingHead && this.batches.length === 0) {
      clearInterval(this.ticker);
      this.ticker = undefined;
      return;
    }
    for (let slot = 0; slot < this.capacity; slot++) {
      const d = this.deadline[slot]!;
      if (d === 0 || d > this.tick || this.state[slot] !== State.OnDevice) continue;
      const reject = this.rejectOf[slot];
      const target = this.target[slot]!;
      const lun = this.lun[slot]!;
      const err = new RequestTimeoutError(this.label, target, lun, this.describe(slot), this.limitMs[slot]!);
      this.abandon(slot, 'timeout');
      reject?.(err);
    }
  }

  private shutDownWith(cause: unknown): void {
    if (this.closedError) return;
    let closed: Error | undefined;
    try {
      closed = this.closedBy?.();
    } catch {
      // Cannot tell: a failure, then.
    }
    if (closed !== undefined) {
      this.shutDown(closed);
      return;
    }
    const reason = cause instanceof Error ? cause.message : String(cause);
    this.shutDown(new ControllerFailedError(this.label, reason, { cause }));
  }

  private shutDown(err: Error): void {
    this.closedError = err;
    if (this.ticker !== undefined) clearInterval(this.ticker);
    this.ticker = undefined;
    if (this.immediate !== undefined) clearImmediate(this.immediate);
    if (this.slowTimer !== undefined) clearTimeout(this.slowTimer);
    this.immediate = undefined;
    this.slowTimer = undefined;
    if (this.interruptFd >= 0) {
      // A read waiting on the descriptor is woken (and closes it); otherwise close it now.
      if (this.interruptWait) wakeFd(this.interruptFd);
      else closeFd(this.interruptFd);
    }
    // The channel goes first: it stops the queue (or keeps its memory) before anything the
    // device might still write is let go here.
    try {
      this.channel.close();
    } catch {
      // Already failed or closed on the native side: nothing left to release.
    }
    for (let slot = 0; slot < this.capacity; slot++) {
      const state = this.state[slot];
      if (state === State.Free) continue;
      const reject = this.rejectOf[slot];
      const returned = this.returnedOf[slot];
      this.returnedOf[slot] = undefined;
      this.release(slot);
      if (state !== State.Abandoned) reject?.(err);
      returned?.();
    }
    for (let i = this.waitingHead; i < this.waiting.length; i++) this.waiting[i]!.reject(err);
    this.waiting = [];
    this.waitingHead = 0;
    const batches = this.batches;
    this.batches = [];
    for (const b of batches) {
      for (let i = b.next; i < b.cmds.length; i++) {
        if (b.skip === undefined || b.skip[i] !== 1) this.settleMember(b, i, new Rejected(err));
      }
    }
    this.stagedCount = 0;
    this.passBuffers = [];
    this.onDevice = 0;
    this.abandoned = 0;
  }
}

function noop(): void {}

function closeFd(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    // Already closed.
  }
}

/** Makes a read waiting on an eventfd return. */
function wakeFd(fd: number): void {
  try {
    writeSync(fd, EVENTFD_ONE);
  } catch {
    closeFd(fd);
  }
}

const EVENTFD_ONE = new BigUint64Array([1n]);

/** Marks a waiting request whose signal fired. */
const CANCELLED: ScsiCommand = Object.freeze({ target: 0, lun: 0, cdb: new Uint8Array(6) }) as ScsiCommand;
