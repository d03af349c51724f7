// A disk as a block device: a direct-access SCSI logical unit, or the one disk of a virtio-blk
// device. Read, write, flush, unmap, write zeroes (and for SCSI reset and raw passthrough), with
// arguments checked before anything reaches the device and transfers split to the device's and
// the transport's limits.

import { type BlkConfig, blkGeometry, throwForBlkResult } from './blk.js';
import { isIllegalRequest, type RetryPolicy, runCommand, type RunOptions, throwForResult } from './command.js';
import { ClosedError, DeviceError, DeviceRemovedError, NotSupportedError, TaskManagementError, VirtioResponse } from './errors.js';
import {
  badTimeout,
  type BlockRequest,
  type CommandResult,
  countTransfer,
  type IoQueue,
  type ScsiCommand,
  type TransferCounters,
  type TransferOwner,
} from './queue.js';
import { TMF_LOGICAL_UNIT_RESET } from './recovery.js';
import { type Geometry, readGeometry, type ScannedLun } from './scan.js';
import {
  type BlockLimits,
  type DecodedSense,
  type Designator,
  describeCdb,
  type Lba,
  read as readCdb,
  synchronizeCache10,
  synchronizeCache16,
  unmap as unmapCdb,
  MAX_UNMAP_DESCRIPTORS,
  unmapParameterList,
  write as writeCdb,
  writeSame16,
} from './scsi/index.js';


/** What a block device needs from its controller; a worker thread can supply its own. */
export interface DeviceContext {
  readonly controllerName: string;
  /** The request queue of the calling thread. */
  executor(): IoQueue;
  allocBuffer(bytes: number): Buffer;
  /** Returns the virtio-scsi response of the task management function. */
  taskManagement(target: number, lun: number, fn: number): Promise<number>;
  /** From the device config space: largest transfer in 512-byte sectors (0 = not stated). */
  readonly maxSectors: number;
  /** Largest single request the caller allows, in bytes (0 = no extra cap). */
  readonly maxTransferBytes: number;
  readonly policy: Readonly<RetryPolicy>;
  /** Called when a refresh or rescan finds a different capacity or block size. */
  onGeometryChange?(device: BlockDevice, before: Geometry): void;
  /** virtio-blk: the capacity now, in 512-byte sectors, from the configuration space. */
  readCapacity?(): Promise<number>;
}

/** The one disk of a virtio-blk device, as its controller found it. */
export interface BlkUnit {
  readonly name: string;
  readonly config: BlkConfig;
  /** From GET ID, when the device has an ID. */
  readonly serial?: string;
}

export interface IoOptions {
  /** Aborting gives the request up (the device is told with ABORT TASK). */
  signal?: AbortSignal;
  /**
   * Milliseconds the device may take for each command of the call (default: the controller's
   * `timeoutMs`, 30 s; 0: no limit). Past it the call rejects with RequestTimeoutError.
   */
  timeoutMs?: number;
}

export interface ReadOptions extends IoOptions {
  /** Force unit access: read from the medium, not from a cache. */
  fua?: boolean;
}

export interface WriteOptions extends IoOptions {
  /** Force unit access: the data is on stable storage when the write completes. */
  fua?: boolean;
}

export interface BlockRange {
  lba: Lba;
  blocks: number | bigint;
}

export interface PassthroughOptions extends IoOptions {
  /** Data-in: a byte count to allocate, or a buffer for the device to fill. */
  dataIn?: number | Uint8Array;
  /** Data-out: the bytes the device reads. */
  dataOut?: Uint8Array;
  /** SAM task attribute (0 simple). */
  taskAttribute?: number;
}

export interface PassthroughResult {
  /** virtio-scsi response: always 0 (OK) here, other responses reject. */
  response: number;
  /** SAM status: GOOD or CONDITION MET (anything else rejects with ScsiError). */
  status: number;
  sense?: Uint8Array;
  residual: number;
  /** Bytes transferred into the data-in buffer. */
  dataLength: number;
  /** The data-in bytes received (a view of the data-in buffer). */
  data?: Buffer;
}

/**
 * What a block device completed through the queue of the calling thread, since it was found.
 * Latencies are in nanoseconds: their sum, least and most (minimums are 0 until the first
 * operation). Reads and writes are timed per command, from its submission to the poll that
 * found it complete; unmaps per `unmap()` call.
 */
export interface BlockDeviceIostat extends TransferCounters {
  /** `unmap()` calls and the bytes they deallocated. */
  unmapOps: number;
  unmapBytes: number;
  unmapLatencyNs: number;
  unmapLatencyMinNs: number;
  unmapLatencyMaxNs: number;
  flushOps: number;
}

export interface BlockDeviceLimits {
  /** Most blocks in one READ or WRITE command (device, transport and configured caps). */
  maxTransferBlocks: number;
  /** Preferred transfer size in blocks (0 = not stated). */
  optimalTransferBlocks: number;
  /** Most blocks one UNMAP descriptor covers. */
  maxUnmapBlocks: number;
  /** Most descriptors in one UNMAP command. */
  maxUnmapDescriptors: number;
  /** Unmap granularity in blocks (0 = not stated). */
  unmapGranularity: number;
  /** Most blocks in one WRITE SAME command. */
  maxWriteSameBlocks: number;
}

export interface BlockDeviceInfo {
  name: string;
  /** The device behind it: a SCSI logical unit, or a virtio-blk disk (target 0, LUN 0). */
  deviceType: 'scsi' | 'blk';
  target: number;
  lun: number;
  blockSize: number;
  blockCount: bigint;
  /** blockSize * blockCount. */
  sizeBytes: bigint;
  physicalBlockSize: number;
  vendor: string;
  product: string;
  revision: string;
  serial?: string;
  identifiers: Designator[];
  /** Logical block provisioning management enabled (thin provisioning). */
  thinProvisioned: boolean;
  /** UNMAP is supported. */
  unmap: boolean;
  /** WRITE SAME (16) with the UNMAP bit is supported. */
  writeSameUnmap: boolean;
  /** Unmapped blocks read back as zeroes. */
  unmappedReadsZero: boolean;
  /** 0 none, else protection type 1..3. */
  protectionType: number;
  /** 0 not reported, 1 solid state, else RPM. */
  rotationRate: number;
  /**
   * The write cache is enabled (caching mode page WCE): writes may complete before they are on
   * stable storage, so `flush()` or `{ fua: true }` matter. Undefined when the unit does not say.
   */
  writeCache?: boolean;
  limits: BlockDeviceLimits;
}

const U32 = 0xffffffff;
const MAX_SAFE_LBA = BigInt(Number.MAX_SAFE_INTEGER);
/** Sub-requests of one call kept in flight at once. */
const WINDOW = 64;
/** Size of the shared zero buffer for writeZeroes by plain WRITE. */
const ZERO_BUFFER_BYTES = 1 << 20;
/** WRITE SAME length when the device states none (what Linux assumes). */
const DEFAULT_WRITE_SAME_BLOCKS = 0xffff;

type ZeroStrategy = 'write-same-unmap' | 'write-same' | 'write';

function toBigLba(value: unknown, field: string): bigint {
  if (typeof value === 'bigint') {
    if (value < 0n) throw new RangeError(`${field} ${value} is negative`);
    return value;
  }
  if (typeof value === 'number' && Number.isSafeInteger(value)) {
    if (value < 0) throw new RangeError(`${field} ${value} is negative`);
    return BigInt(value);
  }
  throw new RangeError(`${field} must be a non-negative safe integer or a bigint, got ${String(value)}`);
}

function positiveBlocks(value: unknown, field: string): bigint {
  const b = toBigLba(value, field);
  if (b === 0n) throw new RangeError(`${field} must be at least 1`);
  return b;
}

function asBuffer(data: Uint8Array): Buffer {
  return Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

function minPositive(...values: number[]): number {
  let m = Infinity;
  for (const v of values) if (v > 0 && v < m) m = v;
  return m;
}

/**
 * Runs `count` sub-requests in order with at most WINDOW in flight. On the first failure no
 * further ones start; the ones already running are awaited (they may still be using the
 * caller's buffer) and the first error is thrown.
 */
async function windowed(count: number, run: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  let failure: { error: unknown } | undefined;
  const worker = async (): Promise<void> => {
    while (failure === undefined && next < count) {
      const i = next++;
      try {
        await run(i);
      } catch (e) {
        failure ??= { error: e };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(WINDOW, count) }, worker));
  if (failure) throw failure.error;
}

export class BlockDevice {
  readonly name: string;
  readonly target: number;
  readonly lun: number;
  readonly deviceType: 'scsi' | 'blk';
  /** What the scan found (SCSI), or the virtio-blk disk: exactly one is set. */
  private lunInfo: ScannedLun | undefined;
  private blk: BlkUnit | undefined;
  private geometry: Geometry;
  private cachedInfo: BlockDeviceInfo | undefined;
  private zeroStrategy: ZeroStrategy;
  private zeroBuffer: Buffer | undefined;
  private zeroBlock: Buffer | undefined;
  private removed: Error | undefined;
  private refreshing: Promise<void> | undefined;
  /** The counters of `iostat`; minimums are Infinity until the first operation. */
  private readonly io: BlockDeviceIostat = {
    readOps: 0,
    readBytes: 0,
    readLatencyNs: 0,
    readLatencyMinNs: Infinity,
    readLatencyMaxNs: 0,
    writeOps: 0,
    writeBytes: 0,
    writeLatencyNs: 0,
    writeLatencyMinNs: Infinity,
    writeLatencyMaxNs: 0,
    unmapOps: 0,
    unmapBytes: 0,
    unmapLatencyNs: 0,
    unmapLatencyMinNs: Infinity,
    unmapLatencyMaxNs: 0,
    flushOps: 0,
  };
  /** blockCount as a number, for range checks without BigInt (exact below 2^53). */
  private blockCountNumber = 0;
  private readonly runOptions: RunOptions;

  /** Built by Controller.scan from a ready disk with geometry, or a virtio-blk disk. */
  constructor(
    private readonly ctx: DeviceContext,
    unit: ScannedLun | BlkUnit,
  ) {
    this.name = unit.name;
    if ('config' in unit) {
      this.deviceType = 'blk';
      this.target = 0;
      this.lun = 0;
      this.blk = unit;
      this.geometry = blkGeometry(unit.config.capacitySectors, unit.config.blockSize);
    } else {
      if (!unit.geometry) throw new DeviceError(`${unit.name}: no geometry (${unit.problem ?? 'not scanned'})`);
      this.deviceType = 'scsi';
      this.target = unit.target;
      this.lun = unit.lun;
      this.lunInfo = unit;
      this.geometry = unit.geometry;
    }
    this.setGeometry(this.geometry);
    this.zeroStrategy = this.initialZeroStrategy();
    this.runOptions = {
      device: this.name,
      policy: ctx.policy,
      onUnitAttention: (sense) => this.onUnitAttention(sense),
    };
  }

  get info(): BlockDeviceInfo {
    this.cachedInfo ??= Object.freeze(this.buildInfo());
    return this.cachedInfo;
  }

  /** Reads, writes, unmaps and flushes this device completed in this thread, and their bytes. */
  get iostat(): Readonly<BlockDeviceIostat> {
    const io = this.io;
    const least = (ns: number): number => (ns === Infinity ? 0 : ns);
    return {
      ...io,
      readLatencyMinNs: least(io.readLatencyMinNs),
      writeLatencyMinNs: least(io.writeLatencyMinNs),
      unmapLatencyMinNs: least(io.unmapLatencyMinNs),
    };
  }

  /** Zeroes the counters of `iostat`, or only the latency minimums and maximums. */
  resetIostat(minMaxOnly = false): void {
    const io = this.io;
    for (const op of ['read', 'write', 'unmap'] as const) {
      io[`${op}LatencyMinNs`] = Infinity;
      io[`${op}LatencyMaxNs`] = 0;
    }
    if (minMaxOnly) return;
    io.readOps = io.readBytes = io.readLatencyNs = 0;
    io.writeOps = io.writeBytes = io.writeLatencyNs = 0;
    io.unmapOps = io.unmapBytes = io.unmapLatencyNs = 0;
    io.flushOps = 0;
  }

  get blockSize(): number {
    return this.geometry.blockSize;
  }

  get blockCount(): bigint {
    return this.geometry.blockCount;
  }

  /** A zero-copy DMA buffer of the controller's pool. */
  allocBuffer(bytes: number): Buffer {
    return this.ctx.allocBuffer(bytes);
  }

  /**
   * Reads `blocks` blocks into a new buffer, or fills `buffer` (a whole number of blocks).
   * One command's worth with a number LBA takes the fast path: the READ is built natively and
   * nothing but the Promise is allocated; retries run only after a completion that was not GOOD.
   */
  read(lba: Lba, blocksOrBuffer: number | Uint8Array, opts?: ReadOptions): Promise<Buffer> {
    try {
      if (this.removed) throw this.removed;
      let buf: Buffer;
      let blocks: number;
      if (typeof blocksOrBuffer === 'number') {
        blocks = blocksOrBuffer;
        if (!Number.isSafeInteger(blocks) || blocks < 1) {
          throw new RangeError(`blocks must be a positive integer, got ${String(blocksOrBuffer)}`);
        }
        const bytes = blocks * this.geometry.blockSize;
        if (bytes > U32) throw new RangeError(`blocks ${blocks}: ${bytes} bytes is more than one call reads`);
        const start = this.checkLba(lba, blocks);
        buf = this.allocData(bytes);
        return this.transfer(false, start, blocks, buf, opts?.fua === true, opts, buf) as Promise<Buffer>;
      }
      buf = this.checkBuffer(blocksOrBuffer);
      blocks = buf.length / this.geometry.blockSize;
      return this.transfer(false, this.checkLba(lba, blocks), blocks, buf, opts?.fua === true, opts, buf) as Promise<Buffer>;
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** Writes `buffer` (a whole number of blocks) at `lba`; the fast path as for `read`. */
  write(lba: Lba, buffer: Uint8Array, opts?: WriteOptions): Promise<void> {
    try {
      if (this.removed) throw this.removed;
      const buf = this.checkBuffer(buffer);
      const blocks = buf.length / this.geometry.blockSize;
      const start = this.checkLba(lba, blocks);
      // virtio-blk has no forced unit access: the write, then a flush.
      if (this.blk && opts?.fua === true) {
        return (this.transfer(true, start, blocks, buf, false, opts, undefined) as Promise<void>).then(() => this.flush(opts));
      }
      return this.transfer(true, start, blocks, buf, opts?.fua === true, opts, undefined) as Promise<void>;
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /**
   * SYNCHRONIZE CACHE over the whole device (virtio-blk: FLUSH; a device without a write cache,
   * which does not offer FLUSH, has nothing to flush).
   */
  async flush(opts: IoOptions = {}): Promise<void> {
    this.checkUsable();
    if (this.blk) {
      if (this.blk.config.flush) await this.blockRequest({ op: 'flush' }, 'FLUSH', opts);
      this.io.flushOps++;
      return;
    }
    // Zero LBA and zero blocks mean "the whole medium"; the 16-byte form only matters when a
    // 10-byte LBA could not address the device anyway.
    const cdb = this.blockCount > BigInt(U32) ? synchronizeCache16() : synchronizeCache10();
    await this.run({ cdb }, opts);
    this.io.flushOps++;
  }

  /**
   * Deallocates the ranges (UNMAP; virtio-blk: DISCARD). Throws NotSupportedError when the
   * device has neither.
   */
  async unmap(ranges: BlockRange | readonly BlockRange[], opts: IoOptions = {}): Promise<void> {
    this.checkUsable();
    const list = Array.isArray(ranges) ? (ranges as readonly BlockRange[]) : [ranges as BlockRange];
    if (list.length === 0) throw new RangeError('ranges must hold at least one range');
    const checked = list.map((r, i) => {
      if (typeof r !== 'object' || r === null) throw new RangeError(`ranges[${i}] must be { lba, blocks }`);
      const lba = toBigLba(r.lba, `ranges[${i}].lba`);
      const blocks = positiveBlocks(r.blocks, `ranges[${i}].blocks`);
      this.checkRange(lba, blocks, `ranges[${i}]`);
      return { lba, blocks };
    });
    if (!this.info.unmap) {
      throw new NotSupportedError(
        this.blk
          ? `${this.name} does not support DISCARD (${this.blk.config.readOnly ? 'the device is read-only' : 'the device does not offer VIRTIO_BLK_F_DISCARD'})`
          : `${this.name} does not support UNMAP (logical block provisioning VPD page)`,
      );
    }
    const { maxUnmapBlocks, maxUnmapDescriptors } = this.info.limits;
    const pieces: Array<{ lba: bigint; blocks: number }> = [];
    for (const r of checked) {
      for (let lba = r.lba, left = r.blocks; left > 0n; ) {
        const n = left < BigInt(maxUnmapBlocks) ? Number(left) : maxUnmapBlocks;
        pieces.push({ lba, blocks: n });
        lba += BigInt(n);
        left -= BigInt(n);
      }
    }
    const started = performance.now();
    if (this.blk) {
      // One range per DISCARD request.
      await windowed(pieces.length, async (i) => {
        const p = pieces[i]!;
        await this.blockRequest({ op: 'discard', lba: Number(p.lba), blocks: p.blocks }, `DISCARD of ${p.blocks} blocks at LBA ${p.lba}`, opts);
      });
    } else {
      const perCommand = Math.min(maxUnmapDescriptors, MAX_UNMAP_DESCRIPTORS);
      const commands = Math.ceil(pieces.length / perCommand);
      await windowed(commands, async (i) => {
        const params = unmapParameterList(pieces.slice(i * perCommand, (i + 1) * perCommand));
        await this.run({ cdb: unmapCdb(params.length), dataOut: params }, opts);
      });
    }
    const ns = Math.round((performance.now() - started) * 1e6);
    const io = this.io;
    io.unmapOps++;
    if (ns < io.unmapLatencyMinNs) io.unmapLatencyMinNs = ns;
    if (ns > io.unmapLatencyMaxNs) io.unmapLatencyMaxNs = ns;
    io.unmapLatencyNs += ns;
    io.unmapBytes += pieces.reduce((n, p) => n + p.blocks, 0) * this.blockSize;
  }

  /**
   * Writes zeroes over `blocks` blocks: WRITE SAME (16) with UNMAP where unmapped blocks read
   * as zeroes, else WRITE SAME (16) of a zero block, else plain WRITEs of a zero buffer. A
   * method the device rejects as an ILLEGAL REQUEST is not tried again. virtio-blk: WRITE
   * ZEROES (allowed to deallocate where the device says it may), else plain writes.
   */
  async writeZeroes(lba: Lba, blocks: number | bigint, opts: IoOptions = {}): Promise<void> {
    this.checkUsable();
    const start = toBigLba(lba, 'lba');
    const count = positiveBlocks(blocks, 'blocks');
    this.checkRange(start, count);
    if (this.blk) return this.blkWriteZeroes(start, count, opts);
    for (;;) {
      const strategy = this.zeroStrategy;
      try {
        if (strategy === 'write') return await this.zeroByWrite(start, count, opts);
        return await this.zeroByWriteSame(start, count, strategy === 'write-same-unmap', opts);
      } catch (e) {
        // Only "not implemented" answers (invalid opcode, invalid field in CDB) mean the method is
        // unavailable; any other error is the caller's.
        const unsupported = isIllegalRequest(e) && (e.asc === 0x20 || e.asc === 0x24);
        if (!unsupported || strategy === 'write' || opts.signal?.aborted) throw e;
        this.zeroStrategy = strategy === 'write-same-unmap' ? 'write-same' : 'write';
      }
    }
  }

  /**
   * LOGICAL UNIT RESET through the control queue. Commands in flight on the LUN are aborted.
   * virtio-blk has no task management: NotSupportedError.
   */
  async reset(opts: IoOptions = {}): Promise<void> {
    this.checkUsable();
    this.scsiOnly('reset');
    opts.signal?.throwIfAborted();
    const response = await this.ctx.taskManagement(this.target, this.lun, TMF_LOGICAL_UNIT_RESET);
    if (response !== VirtioResponse.OK && response !== VirtioResponse.FUNCTION_SUCCEEDED) {
      throw new TaskManagementError(`LOGICAL UNIT RESET of ${this.name}`, response);
    }
  }

  /**
   * Sends any CDB as is, without retries. Rejects with VirtioResponseError when the command did
   * not reach the logical unit and with ScsiError for any status but GOOD / CONDITION MET.
   */
  async passthrough(cdb: Uint8Array, opts: PassthroughOptions = {}): Promise<PassthroughResult> {
    this.checkUsable();
    this.scsiOnly('passthrough');
    if (!(cdb instanceof Uint8Array)) throw new TypeError('cdb must be a Buffer or Uint8Array');
    if (cdb.length < 6 || cdb.length > 32) throw new RangeError(`cdb length ${cdb.length} out of range 6..32`);
    if (opts.dataIn !== undefined && opts.dataOut !== undefined) {
      throw new TypeError('passthrough takes dataIn or dataOut, not both');
    }
    const cmd: ScsiCommand = { target: this.target, lun: this.lun, cdb };
    let dataIn: Buffer | undefined;
    if (typeof opts.dataIn === 'number') {
      if (!Number.isSafeInteger(opts.dataIn) || opts.dataIn < 0 || opts.dataIn > U32) {
        throw new RangeError(`dataIn ${opts.dataIn} is not a byte count`);
      }
      dataIn = Buffer.alloc(opts.dataIn);
    } else if (opts.dataIn !== undefined) {
      if (!(opts.dataIn instanceof Uint8Array)) throw new TypeError('dataIn must be a byte count or a buffer');
      dataIn = asBuffer(opts.dataIn);
    }
    if (dataIn) cmd.dataIn = dataIn;
    if (opts.dataOut !== undefined) {
      if (!(opts.dataOut instanceof Uint8Array)) throw new TypeError('dataOut must be a Buffer or Uint8Array');
      cmd.dataOut = opts.dataOut;
    }
    if (opts.taskAttribute !== undefined) cmd.taskAttribute = opts.taskAttribute;
    if (opts.signal) cmd.signal = opts.signal;
    if (opts.timeoutMs !== undefined) cmd.timeoutMs = opts.timeoutMs;
    const r = await this.ctx.executor().execute(cmd);
    throwForResult(r, cmd, this.name);
    const out: PassthroughResult = { response: r.response, status: r.status, residual: r.residual, dataLength: 0 };
    if (r.sense) out.sense = r.sense;
    if (dataIn) {
      out.dataLength = dataIn.length - Math.min(r.residual, dataIn.length);
      out.data = dataIn.subarray(0, out.dataLength);
    }
    return out;
  }

  /**
   * Re-reads the capacity (a SCSI device reports CAPACITY DATA HAS CHANGED on its own, too; a
   * virtio-blk device's configuration space is read again).
   */
  async refresh(opts: IoOptions = {}): Promise<void> {
    this.checkUsable();
    this.refreshing ??= (async () => {
      try {
        if (this.blk) {
          if (!this.ctx.readCapacity) return;
          this.setGeometry(blkGeometry(await this.ctx.readCapacity(), this.blockSize));
          return;
        }
        const lunInfo = this.lunInfo!;
        const scanOpts = {
          controllerName: this.ctx.controllerName,
          maxTarget: this.target,
          maxLun: this.lun,
          inquiry: lunInfo.inquiry,
          vpdPages: lunInfo.vpdPages,
          policy: this.ctx.policy,
          ...(opts.signal ? { signal: opts.signal } : {}),
        };
        this.setGeometry(await readGeometry(this.ctx.executor(), this.target, this.lun, scanOpts));
      } finally {
        this.refreshing = undefined;
      }
    })();
    await this.refreshing;
  }

  /** Takes the result of a rescan of the same logical unit (or virtio-blk disk). */
  update(unit: ScannedLun | BlkUnit): void {
    if ('config' in unit) {
      this.blk = unit;
      this.setGeometry(blkGeometry(unit.config.capacitySectors, unit.config.blockSize));
      return;
    }
    if (!unit.geometry) return;
    this.lunInfo = unit;
    this.setGeometry(unit.geometry);
    this.zeroStrategy = this.initialZeroStrategy();
  }

  /**
   * Marks the device gone: every later call rejects, and so does a pending one that fails, with
   * DeviceRemovedError when the logical unit left the target, else ClosedError.
   */
  detach(reason: string, removed = false): void {
    this.removed ??= removed ? new DeviceRemovedError(this.name, reason) : new ClosedError(`${this.name}: ${reason}`);
  }

  /** Whether `detach` was called. */
  get detached(): boolean {
    return this.removed !== undefined;
  }

  private checkUsable(): void {
    if (this.removed) throw this.removed;
  }

  private scsiOnly(what: string): void {
    if (this.blk) throw new NotSupportedError(`${what} is for SCSI devices; ${this.name} is a virtio-blk disk`);
  }

  /** A virtio-blk request; rejects with the typed error of its status. */
  private async blockRequest(req: BlockRequest, what: string, opts: IoOptions): Promise<CommandResult> {
    if (opts.signal) req.signal = opts.signal;
    if (opts.timeoutMs !== undefined) req.timeoutMs = opts.timeoutMs;
    const r = await this.ctx.executor().blockRequest(req).catch(this.removedOr);
    throwForBlkResult(r, what, this.name);
    return r;
  }

  /** WRITE ZEROES in pieces the device takes, or plain writes of a zero buffer without it. */
  private async blkWriteZeroes(lba: bigint, count: bigint, opts: IoOptions): Promise<void> {
    const config = this.blk!.config;
    if (!config.writeZeroes) return this.zeroByTransfer(lba, count, opts);
    const max = BigInt(this.info.limits.maxWriteSameBlocks);
    const unmap = config.writeZeroesMayUnmap;
    await windowed(Number((count + max - 1n) / max), async (i) => {
      const first = lba + BigInt(i) * max;
      const n = Number(lba + count - first < max ? lba + count - first : max);
      await this.blockRequest({ op: 'write-zeroes', lba: Number(first), blocks: n, unmap }, `WRITE ZEROES of ${n} blocks at LBA ${first}`, opts);
    });
  }

  /** Plain writes of a zero buffer, through the READ/WRITE path. */
  private async zeroByTransfer(lba: bigint, count: bigint, opts: IoOptions): Promise<void> {
    const zeroes = this.zeroChunk();
    const step = BigInt(zeroes.length / this.blockSize);
    await windowed(Number((count + step - 1n) / step), async (i) => {
      const first = lba + BigInt(i) * step;
      const n = Number(lba + count - first < step ? lba + count - first : step);
      await this.transfer(true, Number(first), n, zeroes.subarray(0, n * this.blockSize), false, opts, undefined);
    });
  }

  /** The shared zero buffer for writes of zeroes: as many blocks as one transfer takes, up to 1 MiB. */
  private zeroChunk(): Buffer {
    const bs = this.blockSize;
    const chunkBlocks = Math.max(1, Math.min(this.info.limits.maxTransferBlocks, Math.floor(ZERO_BUFFER_BYTES / bs)));
    if (this.zeroBuffer === undefined || this.zeroBuffer.length !== chunkBlocks * bs) {
      this.zeroBuffer = this.allocData(chunkBlocks * bs).fill(0);
    }
    return this.zeroBuffer;
  }

  private checkRange(lba: bigint, blocks: bigint, what = 'request'): void {
    const capacity = this.blockCount;
    if (lba >= capacity || blocks > capacity - lba) {
      throw new RangeError(
        `${this.name}: ${what} lba ${lba} + blocks ${blocks} exceeds the capacity of ${capacity} blocks`,
      );
    }
  }

  private checkBuffer(data: unknown): Buffer {
    if (!(data instanceof Uint8Array)) throw new TypeError('buffer must be a Buffer or Uint8Array');
    if (data.length === 0 || data.length % this.blockSize !== 0) {
      throw new RangeError(
        `${this.name}: buffer length ${data.length} is not a positive multiple of the block size ${this.blockSize}`,
      );
    }
    return asBuffer(data);
  }

  private allocData(bytes: number): Buffer {
    try {
      return this.ctx.allocBuffer(bytes);
    } catch {
      // The DMA pool is full: a plain buffer works too, through a bounce buffer.
      return Buffer.alloc(bytes);
    }
  }

  private run(cmd: Omit<ScsiCommand, 'target' | 'lun'>, opts: IoOptions): Promise<CommandResult> {
    const full: ScsiCommand = { target: this.target, lun: this.lun, ...cmd };
    if (opts.signal) full.signal = opts.signal;
    if (opts.timeoutMs !== undefined) full.timeoutMs = opts.timeoutMs;
    return runCommand(this.ctx.executor(), full, this.runOptions).catch(this.removedOr);
  }

  /** A failure of a command on a device that was removed meanwhile is the removal. */
  private readonly removedOr = (e: unknown): never => {
    throw this.removed ?? e;
  };

  /**
   * READ or WRITE of `blocks` blocks from `buf` at `lba` (checked). One command with an LBA
   * below 2^53 goes down the queue's fast path; larger transfers are split at the transfer
   * limit, with at most WINDOW commands in flight.
   */
  private transfer(
    write: boolean,
    lba: number | bigint,
    blocks: number,
    buf: Buffer,
    fua: boolean,
    opts: IoOptions | undefined,
    value: unknown,
  ): Promise<unknown> {
    if (opts?.timeoutMs !== undefined) {
      const bad = badTimeout(opts.timeoutMs);
      if (bad !== undefined) throw new TypeError(`${this.name}: ${bad}`);
    }
    const max = this.maxTransferBlocks;
    if (typeof lba === 'number' && blocks <= max) {
      return this.ctx
        .executor()
        .transfer(write, this.target, this.lun, lba, blocks, buf, fua, opts?.signal, opts?.timeoutMs, value, this.owner);
    }
    const bs = this.blockSize;
    if (this.blk) {
      // virtio-blk: every piece through the fast path (an LBA that high is on no device).
      if (typeof lba !== 'number') throw new RangeError(`${this.name}: LBA ${lba} is above 2^53`);
      const exec = this.ctx.executor();
      return windowed(Math.ceil(blocks / max), async (i) => {
        const first = i * max;
        const n = Math.min(max, blocks - first);
        const part = buf.subarray(first * bs, (first + n) * bs);
        await exec.transfer(write, 0, 0, lba + first, n, part, fua, opts?.signal, opts?.timeoutMs, undefined, this.owner);
      }).then(() => value, this.removedOr);
    }
    const start = BigInt(lba);
    const signal = opts?.signal;
    const timeoutMs = opts?.timeoutMs;
    return windowed(Math.ceil(blocks / max), async (i) => {
      const first = i * max;
      const n = Math.min(max, blocks - first);
      const part = buf.subarray(first * bs, (first + n) * bs);
      const args = { lba: start + BigInt(first), blocks: n, fua };
      const cmd: ScsiCommand = write
        ? { target: this.target, lun: this.lun, cdb: writeCdb(args), dataOut: part }
        : { target: this.target, lun: this.lun, cdb: readCdb(args), dataIn: part };
      if (signal) cmd.signal = signal;
      if (timeoutMs !== undefined) cmd.timeoutMs = timeoutMs;
      const r = await runCommand(this.ctx.executor(), cmd, this.runOptions);
      this.checkTransferred(r, cmd);
      this.counted(cmd, r);
    }).then(() => value, this.removedOr);
  }

  /**
   * What the queue's fast path needs of this device: the counters it adds a completed READ or
   * WRITE to, and the retry rules for one that did not simply succeed (from its result on).
   */
  private readonly owner: TransferOwner = {
    counters: this.io,
    recover: (result: CommandResult, cmd: ScsiCommand): Promise<unknown> => {
      if (this.blk) {
        // No retries: virtio-blk's statuses are final. The status names the error; a read
        // that succeeded short is the device's fault.
        const data = cmd.dataIn ?? cmd.dataOut!;
        const what = `${cmd.dataIn ? 'READ' : 'WRITE'} of ${data.length} bytes`;
        try {
          throwForBlkResult(result, what, this.name);
          throw new DeviceError(`${this.name}: ${what} returned ${result.dataLength} bytes`);
        } catch (e) {
          return Promise.reject(this.removed ?? e);
        }
      }
      return runCommand(this.ctx.executor(), cmd, this.runOptions, result).then((r) => {
        this.checkTransferred(r, cmd);
        this.counted(cmd, r);
        return cmd.dataIn;
      }, this.removedOr);
    },
  };

  /** Adds a READ or WRITE that completed outside the queue's fast path to the counters. */
  private counted(cmd: ScsiCommand, r: CommandResult): void {
    const data = cmd.dataIn ?? cmd.dataOut;
    if (data !== undefined) countTransfer(this.io, cmd.dataOut !== undefined, data.length, r.latencyNs);
  }

  /** A READ that succeeded must have filled its buffer. */
  private checkTransferred(r: CommandResult, cmd: ScsiCommand): void {
    const part = cmd.dataIn;
    if (part === undefined || r.residual === 0) return;
    const got = part.length - Math.min(r.residual, part.length);
    throw new DeviceError(`${this.name}: ${describeCdb(cmd.cdb)} returned ${got} of ${part.length} bytes`);
  }

  private async onUnitAttention(sense: DecodedSense): Promise<void> {
    // CAPACITY DATA HAS CHANGED: later range checks must see the new size.
    if (sense.asc === 0x2a && sense.ascq === 0x09) await this.refresh().catch(() => undefined);
  }

  /** Range check of a READ/WRITE; a number LBA is checked without BigInt arithmetic. */
  private checkLba(lba: Lba, blocks: number): number | bigint {
    if (typeof lba === 'number' && Number.isSafeInteger(lba) && lba >= 0) {
      if (lba + blocks > this.blockCountNumber) this.checkRange(BigInt(lba), BigInt(blocks));
      return lba;
    }
    const big = toBigLba(lba, 'lba');
    this.checkRange(big, BigInt(blocks));
    return big <= MAX_SAFE_LBA ? Number(big) : big;
  }

  private get maxTransferBlocks(): number {
    return this.info.limits.maxTransferBlocks;
  }

  private setGeometry(g: Geometry): void {
    const before = this.geometry as Geometry | undefined;
    this.geometry = g;
    if (before && (before.blockCount !== g.blockCount || before.blockSize !== g.blockSize)) {
      this.ctx.onGeometryChange?.(this, before);
    }
    this.blockCountNumber = Number(g.blockCount);
    this.cachedInfo = undefined;
  }

  private async zeroByWriteSame(lba: bigint, count: bigint, unmap: boolean, opts: IoOptions): Promise<void> {
    const bs = this.blockSize;
    if (this.zeroBlock === undefined || this.zeroBlock.length !== bs) this.zeroBlock = this.allocData(bs).fill(0);
    const block = this.zeroBlock;
    const max = BigInt(this.info.limits.maxWriteSameBlocks);
    const commands = Number((count + max - 1n) / max);
    await windowed(commands, async (i) => {
      const first = BigInt(i) * max;
      const n = count - first < max ? count - first : max;
      const cdb = writeSame16({ lba: lba + first, blocks: Number(n), unmap });
      await this.run({ cdb, dataOut: block }, opts);
    });
  }

  private async zeroByWrite(lba: bigint, count: bigint, opts: IoOptions): Promise<void> {
    const bs = this.blockSize;
    // Every chunk writes from the same buffer: the device only reads it.
    const zeroes = this.zeroChunk();
    const step = BigInt(zeroes.length / bs);
    const commands = Number((count + step - 1n) / step);
    await windowed(commands, async (i) => {
      const first = BigInt(i) * step;
      const n = Number(count - first < step ? count - first : step);
      const cdb = writeCdb({ lba: lba + first, blocks: n });
      await this.run({ cdb, dataOut: zeroes.subarray(0, n * bs) }, opts);
    });
  }

  private initialZeroStrategy(): ZeroStrategy {
    if (!this.lunInfo) return 'write';
    const prov = this.lunInfo.provisioning;
    const lbprz = (this.geometry.capacity16?.lbprz ?? false) || (prov?.lbprz ?? false);
    if (prov?.lbpws && lbprz) return 'write-same-unmap';
    return 'write-same';
  }

  private buildInfo(): BlockDeviceInfo {
    if (this.blk) return this.buildBlkInfo(this.blk);
    const lun = this.lunInfo!;
    const g = this.geometry;
    const bs = g.blockSize;
    const bl: BlockLimits | undefined = lun.blockLimits;
    const prov = lun.provisioning;
    const rc16 = g.capacity16;

    // Per-command transfer cap: the device (VPD 0xB0), the transport (max_sectors), the
    // caller's cap and the 32-bit READ(16)/WRITE(16) length field.
    const transportBlocks = this.ctx.maxSectors > 0 ? Math.floor((this.ctx.maxSectors * 512) / bs) : 0;
    const callerBlocks = this.ctx.maxTransferBytes > 0 ? Math.floor(this.ctx.maxTransferBytes / bs) : 0;
    const limit = minPositive(bl?.maxTransferLength ?? 0, transportBlocks, callerBlocks);
    const maxTransferBlocks = Math.max(1, Math.min(limit, U32));

    const unmap = prov?.lbpu ?? false;
    const maxUnmapBlocks = Math.min(minPositive(bl?.maxUnmapLbaCount ?? 0), U32);
    const maxUnmapDescriptors = Math.min(minPositive(bl?.maxUnmapBlockDescriptorCount ?? 0), MAX_UNMAP_DESCRIPTORS);
    const ws = bl?.maxWriteSameLength ?? 0n;
    const maxWriteSameBlocks = ws > 0n ? Number(ws < BigInt(U32) ? ws : BigInt(U32)) : DEFAULT_WRITE_SAME_BLOCKS;

    const info: BlockDeviceInfo = {
      name: this.name,
      deviceType: 'scsi',
      target: this.target,
      lun: this.lun,
      blockSize: bs,
      blockCount: g.blockCount,
      sizeBytes: g.blockCount * BigInt(bs),
      physicalBlockSize: bs * 2 ** (rc16?.physicalBlockExponent ?? 0),
      vendor: lun.vendor,
      product: lun.product,
      revision: lun.revision,
      identifiers: lun.identifiers,
      thinProvisioned: rc16?.lbpme ?? false,
      unmap,
      writeSameUnmap: prov?.lbpws ?? false,
      unmappedReadsZero: (rc16?.lbprz ?? false) || (prov?.lbprz ?? false),
      protectionType: rc16?.protectionType ?? 0,
      rotationRate: lun.characteristics?.rotationRate ?? 0,
      limits: {
        maxTransferBlocks,
        optimalTransferBlocks: bl?.optimalTransferLength ?? 0,
        maxUnmapBlocks: unmap ? maxUnmapBlocks : 0,
        maxUnmapDescriptors: unmap ? maxUnmapDescriptors : 0,
        unmapGranularity: bl?.optimalUnmapGranularity ?? 0,
        maxWriteSameBlocks,
      },
    };
    if (lun.serial !== undefined) info.serial = lun.serial;
    if (lun.caching !== undefined) info.writeCache = lun.caching.wce;
    return info;
  }

  private buildBlkInfo(unit: BlkUnit): BlockDeviceInfo {
    const c = unit.config;
    const g = this.geometry;
    const bs = g.blockSize;
    const perBlock = bs / 512;
    // One data segment per request: SIZE_MAX bounds it, as do the caller's cap and a 32-bit length.
    const limit = minPositive(Math.floor(c.sizeMax / bs), this.ctx.maxTransferBytes > 0 ? Math.floor(this.ctx.maxTransferBytes / bs) : 0);
    const sectorsToBlocks = (sectors: number): number => Math.min(Math.floor(sectors / perBlock), U32);
    const info: BlockDeviceInfo = {
      name: this.name,
      deviceType: 'blk',
      target: 0,
      lun: 0,
      blockSize: bs,
      blockCount: g.blockCount,
      sizeBytes: g.blockCount * BigInt(bs),
      physicalBlockSize: bs * 2 ** c.physicalBlockExp,
      vendor: '',
      product: 'virtio-blk',
      revision: '',
      identifiers: [],
      thinProvisioned: c.discard,
      // A read-only disk discards nothing (such requests are refused before they go down).
      unmap: c.discard && !c.readOnly,
      writeSameUnmap: c.writeZeroesMayUnmap,
      unmappedReadsZero: false,
      protectionType: 0,
      rotationRate: 0,
      writeCache: c.writeback,
      limits: {
        maxTransferBlocks: Math.max(1, Math.min(limit, Math.floor(U32 / bs))),
        optimalTransferBlocks: c.optIoBlocks,
        // A device that offers DISCARD without a limit: one request's 32-bit sector count.
        maxUnmapBlocks: c.discard ? Math.max(1, sectorsToBlocks(c.maxDiscardSectors || U32)) : 0,
        maxUnmapDescriptors: c.discard ? 1 : 0,
        unmapGranularity: sectorsToBlocks(c.discardAlignment),
        maxWriteSameBlocks: c.writeZeroes ? Math.max(1, sectorsToBlocks(c.maxWriteZeroesSectors || U32)) : 0,
      },
    };
    if (unit.serial !== undefined) info.serial = unit.serial;
    return info;
  }
}
