// A controller: the connection to one virtio-scsi or virtio-blk device (a vhost-user socket, or a
// VFIO PCI function), its request queue for the calling thread, the scan and the block devices.
// A virtio-scsi device has targets and LUNs to scan; a virtio-blk device is one disk.

import { EventEmitter } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { stat } from 'node:fs/promises';

import { type BlkConfig, BLK_ID_BYTES, blkDiskName, blkGeometry, blkIdString, BlkStatus } from './blk.js';
import { type BlkUnit, BlockDevice, type DeviceContext } from './block-device.js';
import { DEFAULT_RETRY_POLICY, type RetryPolicy } from './command.js';
import { ClosedError, CONNECT_ERRNOS, ConnectError, ControllerFailedError, InitiatorError } from './errors.js';
import {
  loadNative,
  type NativeChannel,
  type NativeController,
  type NativeControllerOptions,
  type NativeOpenFailure,
} from './native.js';
import { log } from './log.js';
import { badTimeout, DEFAULT_TIMEOUT_MS, RequestQueue, type RequestQueueStats } from './queue.js';
import { Recovery, type RecoveryStep } from './recovery.js';
import { PCI_ADDRESS } from './pci.js';
import { type Geometry, lunName, type ScannedLun, scanTargets, type ScanResult } from './scan.js';
import { type EventPlan, EventWatcher } from './watch.js';

/**
 * How to reach the device: a vhost-user socket, or a virtio-scsi or virtio-blk PCI function
 * bound to vfio-pci (inside a VM), e.g. "0000:00:03.0".
 */
export type Transport = { type: 'vhost-user'; path: string } | { type: 'pci'; address: string };

export interface ControllerOptions {
  /**
   * The device type: 'scsi' (default over vhost-user, which cannot tell) or 'blk'. A PCI
   * function's id tells it; one given must match.
   */
  type?: 'scsi' | 'blk';
  /** Prefix of device names (default "VirtioScsi0"); a virtio-blk disk's name (default "VirtioBlk0"). */
  name?: string;
  /** Request queues to set up (default: all the device offers, at most 16). */
  requestQueues?: number;
  /** Ring entries per queue, a power of two up to 1024 (default 256). */
  queueSize?: number;
  /**
   * Size of the DMA memory pool at first (default 4 MiB: it is populated up front, so attaching
   * stays quick). When less than a quarter of it is free, it grows ahead of need in the
   * background (libuv's thread pool), so that allocations find memory without waiting.
   */
  memoryBytes?: number;
  /**
   * How far DMA memory may grow when allocations run dry (default four times memoryBytes, at
   * least 256 MiB), by regions of at least 64 MiB; the
   * device is told of each new region (vhost-user ADD_MEM_REG, VFIO MAP_DMA).
   */
  maxMemoryBytes?: number;
  /** Back the pool with hugepages: 'auto' (default), 'require' or 'never'. */
  hugepages?: 'auto' | 'require' | 'never';
  /**
   * Cap on the bytes of one READ or WRITE command; larger transfers are split. Default: an
   * eighth of the DMA pool at first, at least 2 MiB, so that several bounced transfers fit; 2 MiB
   * on a pool of ordinary pages.
   */
  maxTransferBytes?: number;
  /**
   * Milliseconds the device may take for a request (default 30 s; 0: no limit; calls can say
   * otherwise). A request past it rejects with RequestTimeoutError, and the device is made to
   * give it back: ABORT TASK, then LOGICAL UNIT RESET, then I_T NEXUS RESET (`recovery` events);
   * when none does, the controller fails.
   */
  timeoutMs?: number;
  /**
   * vhost-user: when the backend goes away, connect again (with `true`, the defaults below)
   * instead of failing. The same DMA memory is announced again, the queues are set up afresh
   * and the targets rescanned; devices keep their objects when the same logical units come
   * back. Off by default.
   */
  reconnect?: boolean | ReconnectOptions;
  /** Retry bounds for BUSY, TASK SET FULL and UNIT ATTENTION. */
  retry?: Partial<RetryPolicy>;
  /**
   * Poll for completions (the default), or with `false` wait for the device's signal on the
   * queue's interrupt eventfd through libuv: less CPU for services that do little I/O, more
   * latency. vhost-user only (PCI functions are driven without MSI-X).
   */
  poll?: boolean;
  /**
   * Log every command of this thread's queue (CDB, status, sense, latency) at level 'trace'
   * (see `setLogLevel`), for debugging a target. Off by default: then it costs nothing.
   */
  trace?: boolean;
}

export interface ReconnectOptions {
  /** Attempts before the controller fails (default 10; Infinity to keep trying). */
  retries?: number;
  /** Wait before the first attempt, doubled after each failed one (default 100 ms). */
  delayMs?: number;
  /** Longest wait between two attempts (default 5000 ms). */
  maxDelayMs?: number;
}

const RECONNECT_DEFAULTS: Readonly<Required<ReconnectOptions>> = Object.freeze({ retries: 10, delayMs: 100, maxDelayMs: 5000 });

function reconnectPolicy(r: ControllerOptions['reconnect']): Readonly<Required<ReconnectOptions>> | undefined {
  if (r === undefined || r === false) return undefined;
  const policy = { ...RECONNECT_DEFAULTS, ...(r === true ? {} : r) };
  for (const [k, v] of Object.entries(policy)) {
    if (typeof v !== 'number' || Number.isNaN(v) || v < 0 || (k !== 'retries' && !Number.isFinite(v))) {
      throw new RangeError(`reconnect.${k} must be a non-negative number, got ${String(v)}`);
    }
  }
  return Object.freeze(policy);
}

/** What the device and the negotiation gave (config space and features). */
export interface ControllerInfo {
  /** e.g. "vhost-user /tmp/x.sock". */
  transport: string;
  deviceType: 'scsi' | 'blk';
  requestQueues: number;
  queueSize: number;
  segMax: number;
  maxSectors: number;
  cmdPerLun: number;
  maxTarget: number;
  maxLun: number;
  eventIdx: boolean;
  indirect: boolean;
  hotplug: boolean;
  change: boolean;
  hugepages: boolean;
  /** DMA memory now; it grows up to maxMemoryBytes. */
  memoryBytes: number;
  maxMemoryBytes: number;
  /** virtio-blk: the configuration space as of opening (the capacity may change since). */
  blk?: BlkConfig;
}

export const ControllerEventType = {
  NO_EVENT: 0,
  TRANSPORT_RESET: 1,
  ASYNC_NOTIFY: 2,
  PARAM_CHANGE: 3,
} as const;

/** Set in the event code when the device dropped events: rescan everything. */
export const EVENTS_MISSED = 0x80000000;

/** An event-queue event (virtio 1.2, 5.6.6.3). */
export interface ControllerEvent {
  type: 'transport-reset' | 'async-notify' | 'param-change' | 'none' | 'unknown';
  /** The raw event code, EVENTS_MISSED bit included. */
  event: number;
  eventsMissed: boolean;
  target: number;
  lun: number;
  /** Name the LUN has (or would have) under this controller. */
  device: string;
  /** TRANSPORT_RESET: 0 reset, 1 rescan (LUN added), 2 removed. PARAM_CHANGE: asc | ascq << 8. */
  reason: number;
}

/**
 * What `Controller.share()` gives another thread: plain data that survives postMessage.
 */
export interface ControllerHandle {
  readonly kind: typeof HANDLE_KIND;
  readonly id: number;
  readonly name: string;
  readonly transport: Transport;
  readonly maxTransferBytes: number;
  readonly retry: RetryPolicy;
  readonly poll: boolean;
  readonly timeoutMs: number;
  /** The LUNs of the last scan, so that the thread need not scan again. */
  readonly luns: readonly ScannedLun[];
  /** virtio-blk: the disk of the last scan. */
  readonly blk?: BlkUnit;
}

const HANDLE_KIND = 'virtio-initiator/controller';
const DEFAULT_NAME = 'VirtioScsi0';
const DEFAULT_BLK_NAME = 'VirtioBlk0';
/** Default transfer cap: this fraction of the DMA pool per command, and at least MIN_TRANSFER_CAP. */
const POOL_SHARE_PER_TRANSFER = 8;
const MIN_TRANSFER_CAP = 2 << 20;
/**
 * Default transfer cap on a pool of 4 KiB pages. A device behind an IOMMU may see each page as a
 * piece of its own, and QEMU takes at most 1024 pieces per request (header and status included):
 * 512 pages stay well inside.
 */
const SMALL_PAGE_TRANSFER_CAP = 2 << 20;
function defaultTransferCap(info: { memoryBytes: number; hugepages: boolean }): number {
  const share = Math.max(MIN_TRANSFER_CAP, Math.floor(info.memoryBytes / POOL_SHARE_PER_TRANSFER));
  return info.hugepages ? share : Math.min(share, SMALL_PAGE_TRANSFER_CAP);
}

/** What a controller name may be (it prefixes the device names). */
export const CONTROLLER_NAME = /^[A-Za-z0-9_.-]{1,64}$/;
const EVENT_TYPES: Record<number, ControllerEvent['type']> = {
  0: 'none',
  1: 'transport-reset',
  2: 'async-notify',
  3: 'param-change',
};

function noop(): void {}

function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function checkCount(value: unknown, field: string): void {
  if (value !== undefined && (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 1)) {
    throw new RangeError(`${field} must be a positive integer, got ${String(value)}`);
  }
}

function nativeOptions(o: ControllerOptions): NativeControllerOptions {
  checkCount(o.requestQueues, 'requestQueues');
  checkCount(o.queueSize, 'queueSize');
  checkCount(o.memoryBytes, 'memoryBytes');
  checkCount(o.maxMemoryBytes, 'maxMemoryBytes');
  if (o.hugepages !== undefined && !['auto', 'require', 'never'].includes(o.hugepages)) {
    throw new RangeError(`hugepages must be 'auto', 'require' or 'never', got ${String(o.hugepages)}`);
  }
  const out: NativeControllerOptions = {};
  if (o.requestQueues !== undefined) out.requestQueues = o.requestQueues;
  if (o.queueSize !== undefined) out.queueSize = o.queueSize;
  if (o.memoryBytes !== undefined) out.memoryBytes = o.memoryBytes;
  if (o.maxMemoryBytes !== undefined) out.maxMemoryBytes = o.maxMemoryBytes;
  if (o.hugepages !== undefined) out.hugepages = o.hugepages;
  if (o.type !== undefined) {
    if (o.type !== 'scsi' && o.type !== 'blk') throw new RangeError(`type must be 'scsi' or 'blk', got ${String(o.type)}`);
    out.deviceType = o.type;
  }
  return out;
}

function retryPolicy(r: Partial<RetryPolicy> | undefined): Readonly<RetryPolicy> {
  const policy = { ...DEFAULT_RETRY_POLICY, ...r };
  for (const [k, v] of Object.entries(policy)) {
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) {
      throw new RangeError(`retry.${k} must be a non-negative number, got ${String(v)}`);
    }
  }
  return Object.freeze(policy);
}

async function checkSocket(path: string, label: string): Promise<void> {
  let st;
  try {
    st = await stat(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new ConnectError(label, 'no such file or directory', { cause: e, errno: 'ENOENT' });
    throw new ConnectError(label, errorText(e), { cause: e });
  }
  if (!st.isSocket()) throw new ConnectError(label, 'not a unix socket', { errno: 'ENOTSOCK' });
}

/**
 * What a controller tells its listeners (`ctrl.on('device-added', (dev) => ...)`). Events are
 * watched by the controller that opened the device (not by those attached in worker threads).
 */
export interface ControllerEventMap {
  /** A scan or a hot-plug event found a disk (every disk of the first scan, too). */
  'device-added': [device: BlockDevice];
  /** The disk left the target; its pending and later calls fail with DeviceRemovedError. */
  'device-removed': [device: BlockDevice];
  /**
   * A step of getting the device to give back a request that timed out or was aborted (ABORT
   * TASK, LOGICAL UNIT RESET, I_T NEXUS RESET), and whether the request came back.
   */
  recovery: [step: RecoveryStep];
  /** A refresh found a different size or block size (CAPACITY DATA HAS CHANGED). */
  'capacity-changed': [device: BlockDevice, before: Geometry];
  /** The device reported a media change (asynchronous notification). */
  'media-changed': [device: BlockDevice];
  /** A scan finished, asked for or started by events (TRANSPORT_RESET, EVENTS_MISSED). */
  rescanned: [result: ScanResult, targets: 'all' | readonly number[]];
  /** The target went away (its socket closed, the PCI function stopped answering). */
  disconnected: [reason: string];
  /**
   * With `reconnect`: the target is back and the controller works again (after a rescan, whose
   * `device-added` and `device-removed` came first); `attempts` it took.
   */
  reconnected: [attempts: number];
  /** The controller cannot be used any more; every request fails with this error. */
  failed: [error: ControllerFailedError];
  /** Acting on an event failed (a rescan that could not run); later events are still handled. */
  'event-error': [error: Error];
}

export class Controller extends EventEmitter<ControllerEventMap> implements AsyncDisposable {
  readonly name: string;
  readonly transport: Readonly<Transport>;
  /** 'scsi', or 'blk' (one disk, named after the controller). */
  readonly deviceType: 'scsi' | 'blk';
  private readonly handle: NativeController;
  private readonly policy: Readonly<RetryPolicy>;
  private readonly poll: boolean;
  private readonly timeoutMs: number;
  private readonly recovery: Recovery;
  private readonly reconnectPolicy: Readonly<Required<ReconnectOptions>> | undefined;
  /** True from the loss of the target until the controller works again (or gives up). */
  private reconnectingNow = false;
  /** Recovery gave up and failed the controller. */
  private gaveUp = false;
  private readonly trace: boolean;
  private readonly context: DeviceContext;
  private queue: RequestQueue | undefined;
  private closedError: ClosedError | undefined;
  private closing: Promise<void> | undefined;
  private scanned: readonly ScannedLun[] = [];
  /** virtio-blk: the disk of the last scan. */
  private blkUnit: BlkUnit | undefined;
  private blockDevices = new Map<string, BlockDevice>();
  private watcher: EventWatcher | undefined;
  /** Host address of each DMA Buffer's memory, for requests that name their data by address. */
  private readonly dmaBase = new WeakMap<ArrayBufferLike, number>();
  /** The address of each view already asked about (buffers are reused request after request). */
  private readonly viewAddress = new WeakMap<Uint8Array, number>();
  /** Growth of the DMA memory under way in the background. */
  private growing: Promise<void> | undefined;
  private readonly addressOf = (data: Uint8Array): number => {
    let addr = this.viewAddress.get(data);
    if (addr === undefined) {
      const base = this.dmaBase.get(data.buffer);
      addr = base === undefined ? -1 : base + data.byteOffset;
      this.viewAddress.set(data, addr);
    }
    return addr;
  };

  private constructor(
    handle: NativeController,
    name: string,
    transport: Transport,
    options: ControllerOptions,
    policy: Readonly<RetryPolicy>,
  ) {
    super();
    this.handle = handle;
    this.name = name;
    this.transport = Object.freeze({ ...transport });
    this.policy = policy;
    this.poll = options.poll !== false;
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.reconnectPolicy = reconnectPolicy(options.reconnect);
    this.trace = options.trace === true;
    const info = handle.info;
    this.deviceType = info.deviceType === 'blk' ? 'blk' : 'scsi';
    this.recovery = new Recovery({
      controllerName: name,
      // virtio-blk has no task management: recovery goes straight to a device reset.
      ...(this.deviceType === 'scsi' ? { taskManagement: (target: number, lun: number, fn: number, tag?: number) => this.taskManagement(target, lun, fn, tag) } : {}),
      report: (step) => {
        if (step.returned) log('info', 'recovery', `${step.device}: ${step.action} brought back ${step.request}`);
        else log('warn', 'recovery', `${step.device}: ${step.action} did not bring back ${step.request}`);
        this.emit('recovery', step);
      },
      resetDevice: (reason) => this.resetDevice(reason),
      giveUp: (reason) => this.giveUp(reason),
    });
    this.context = {
      controllerName: name,
      executor: () => this.executor(),
      allocBuffer: (bytes) => this.allocBuffer(bytes),
      taskManagement: (target, lun, fn) => this.taskManagement(target, lun, fn),
      maxSectors: info.maxSectors,
      maxTransferBytes: options.maxTransferBytes ?? defaultTransferCap(info),
      policy,
      onGeometryChange: (dev, before) => this.emit('capacity-changed', dev, before),
      readCapacity: () => this.handle.readCapacity(),
    };
  }

  /** Connects to a vhost-user socket: virtio-scsi, or virtio-blk with `{ type: 'blk' }`. */
  static connect(socketPath: string, options: ControllerOptions = {}): Promise<Controller> {
    return Controller.open({ type: 'vhost-user', path: socketPath }, options);
  }

  /** Opens a virtio-scsi or virtio-blk PCI function bound to vfio-pci (see `Transport`). */
  static openPci(address: string, options: ControllerOptions = {}): Promise<Controller> {
    return Controller.open({ type: 'pci', address }, options);
  }

  static async open(transport: Transport, options: ControllerOptions = {}): Promise<Controller> {
    const name = options.name ?? (options.type === 'blk' ? DEFAULT_BLK_NAME : DEFAULT_NAME);
    if (typeof name !== 'string' || !CONTROLLER_NAME.test(name)) {
      throw new RangeError(`name ${JSON.stringify(name)} must be 1 to 64 letters, digits, '_', '.' or '-'`);
    }
    checkCount(options.maxTransferBytes, 'maxTransferBytes');
    const badDeadline = options.timeoutMs === undefined ? undefined : badTimeout(options.timeoutMs);
    if (badDeadline !== undefined) throw new RangeError(badDeadline);
    if (options.poll !== undefined && typeof options.poll !== 'boolean') {
      throw new TypeError(`poll must be true or false, got ${String(options.poll)}`);
    }
    const policy = retryPolicy(options.retry);
    if (reconnectPolicy(options.reconnect) !== undefined && transport?.type !== 'vhost-user') {
      throw new TypeError('reconnect is for vhost-user controllers');
    }
    const nativeOpts = nativeOptions(options);
    let label: string;
    let connect: (native: ReturnType<typeof loadNative>) => Promise<NativeController | NativeOpenFailure>;
    if (transport?.type === 'vhost-user') {
      const path = transport.path;
      if (typeof path !== 'string' || path === '') {
        throw new TypeError('the vhost-user socket path must be a non-empty string');
      }
      label = `vhost-user socket ${path}`;
      await checkSocket(path, label);
      connect = (native) => native.Controller.connectVhostUser(path, nativeOpts);
    } else if (transport?.type === 'pci') {
      const address = transport.address;
      if (typeof address !== 'string' || !PCI_ADDRESS.test(address)) {
        throw new TypeError(`PCI address ${JSON.stringify(address)} is not of the form 0000:00:03.0`);
      }
      label = `PCI function ${address}`;
      connect = (native) => native.Controller.openPci(address, nativeOpts);
    } else {
      throw new TypeError(`unsupported transport ${JSON.stringify(transport)} (use 'vhost-user' or 'pci')`);
    }
    const native = loadNative();
    // Connection, negotiation, memory and rings are set up in libuv's thread pool: a slow or
    // silent device (bounded by the native side's reply deadline) never stalls the event loop.
    let opened: NativeController | NativeOpenFailure;
    try {
      opened = await connect(native);
    } catch (e) {
      throw new ConnectError(label, errorText(e), { cause: e });
    }
    if (!(opened instanceof native.Controller)) {
      // The native side names the system's reason for a failed connection in `code`.
      const errno = CONNECT_ERRNOS.find((n) => n === opened.code);
      throw new ConnectError(label, opened.message, errno ? { errno } : {});
    }
    const handle = opened;
    // A PCI function told its type: the default name follows it.
    const told = handle.info.deviceType === 'blk' && options.name === undefined ? DEFAULT_BLK_NAME : name;
    const ctrl = new Controller(handle, told, transport, options, policy);
    ctrl.watch();
    return ctrl;
  }

  /** Starts watching the event queue and the connection (see `ControllerEventMap`). */
  private watch(): void {
    this.watcher = new EventWatcher({
      pollEvents: () => this.pollEvents(),
      checkAlive: () => this.handle.checkAlive(),
      apply: (plan) => this.applyEvents(plan),
      lost: (reason) => {
        if (this.closedError) return;
        log('warn', 'controller', `${this.name}: ${reason}`);
        this.emit('disconnected', reason);
        if (this.transport.type === 'pci') {
          // A function that asks for a reset (DEVICE_NEEDS_RESET) gets one; one that no longer
          // responds fails its reset, and the controller with it.
          void this.resetAfterLoss(reason);
          return;
        }
        if (this.reconnectPolicy !== undefined && this.transport.type === 'vhost-user') {
          this.reconnectingNow = true;
          void this.reconnect(this.transport.path, this.reconnectPolicy, reason);
          return;
        }
        this.emit('failed', new ControllerFailedError(this.name, reason));
      },
      failedToApply: (e) => {
        if (this.closedError) return;
        const error = e instanceof Error ? e : new Error(String(e));
        log('warn', 'controller', `${this.name}: acting on events: ${error.message}`);
        this.emit('event-error', error);
      },
      ...(this.deviceType === 'blk' ? { changedCapacity: () => this.changedCapacity() } : {}),
    });
  }

  /** virtio-blk: the disk, when its capacity in the configuration space is not what it knows. */
  private async changedCapacity(): Promise<string[]> {
    const dev = this.blockDevices.get(blkDiskName(this.name));
    if (dev === undefined || dev.detached || this.closedError || this.reconnectingNow) return [];
    const sectors = await this.handle.readCapacity();
    const now = blkGeometry(sectors, dev.blockSize).blockCount;
    return now === dev.blockCount ? [] : [dev.name];
  }

  /**
   * Connects again until the backend is back or the attempts run out: the same memory, fresh
   * queues, a rescan; then the watcher starts over.
   */
  private async reconnect(path: string, policy: Readonly<Required<ReconnectOptions>>, reason: string): Promise<void> {
    let delay = policy.delayMs;
    let last = reason;
    for (let attempt = 1; attempt <= policy.retries; attempt++) {
      await sleep(delay);
      if (this.closedError) return;
      const failure = await this.handle.reconnectVhostUser(path);
      if (this.closedError) return;
      if (failure === null) {
        this.reconnectingNow = false;
        // The queue of the lost connection gives its ring back, to be set up on the new one.
        this.renewed();
        try {
          await this.rescan('all');
        } catch (e) {
          if (!this.closedError) this.emit('event-error', e instanceof Error ? e : new Error(String(e)));
        }
        if (this.closedError) return;
        log('info', 'controller', `${this.name}: reconnected to ${path} (attempt ${attempt})`);
        this.emit('reconnected', attempt);
        return;
      }
      last = failure.message;
      log('info', 'controller', `${this.name}: reconnect attempt ${attempt} failed: ${last}`);
      delay = Math.min(delay * 2, policy.maxDelayMs);
    }
    this.reconnectingNow = false;
    const why = `${reason}; ${policy.retries} reconnect attempt(s) failed, the last with: ${last}`;
    log('warn', 'controller', `${this.name}: ${why}`);
    this.emit('failed', new ControllerFailedError(this.name, why));
  }

  /** A PCI function that went wrong is reset and set up again, once. */
  private async resetAfterLoss(reason: string): Promise<void> {
    const failure = await this.resetDevice(reason);
    if (this.closedError) return;
    if (failure === undefined) {
      log('info', 'controller', `${this.name}: the device works again after a reset`);
      this.emit('reconnected', 1);
      return;
    }
    const why = `${reason}; a reset did not bring it back: ${failure}`;
    log('warn', 'controller', `${this.name}: ${why}`);
    this.emit('failed', new ControllerFailedError(this.name, why));
  }

  /** Rescans what the events name, then refreshes capacities and reports media changes. */
  private async applyEvents(plan: EventPlan): Promise<void> {
    if (this.closedError) return;
    if (plan.rescan === 'all' || plan.rescan.length > 0) await this.rescan(plan.rescan);
    for (const name of plan.media) {
      const dev = this.blockDevices.get(name);
      if (dev) this.emit('media-changed', dev);
    }
    for (const name of plan.refresh) {
      const dev = this.blockDevices.get(name);
      // A capacity change is emitted by the device's geometry update.
      if (dev && !dev.detached) await dev.refresh();
    }
  }

  /** Resolves once the events taken from the device so far have been acted on. */
  eventsSettled(): Promise<void> {
    return this.watcher?.settled() ?? Promise.resolve();
  }

  get info(): ControllerInfo {
    this.checkOpen();
    const { blk, deviceType, ...rest } = this.handle.info;
    const info: ControllerInfo = { ...rest, deviceType: deviceType === 'blk' ? 'blk' : 'scsi' };
    if (blk) info.blk = blk;
    return info;
  }

  /**
   * True from the loss of the target until the controller works again (with `reconnect`), and
   * while recovery resets the device: calls meanwhile reject with ControllerFailedError.
   */
  get reconnecting(): boolean {
    return this.reconnectingNow;
  }

  /** Why the controller stopped working (target gone, protocol violation), or null. */
  get failure(): string | null {
    if (this.closedError) return null;
    return this.handle.failure;
  }

  get closed(): boolean {
    return this.closedError !== undefined;
  }

  /** Every LUN the last scan found, disks or not, ordered by target and LUN. */
  get luns(): readonly ScannedLun[] {
    return this.scanned;
  }

  /** Block devices (ready disks) from the last scan. */
  get devices(): readonly BlockDevice[] {
    return [...this.blockDevices.values()];
  }

  /** The block device of that name; throws naming the known ones when there is none. */
  device(name: string): BlockDevice {
    const dev = this.blockDevices.get(name);
    if (dev) return dev;
    const known = [...this.blockDevices.keys()];
    throw new RangeError(
      `${this.name} has no block device ${JSON.stringify(name)}` +
        (known.length > 0 ? ` (known: ${known.join(', ')})` : ' (none found: call scan() first)'),
    );
  }

  /** Name a LUN has under this controller. */
  lunName(target: number, lun: number): string {
    return lunName(this.name, target, lun);
  }

  /**
   * Enumerates targets and LUNs and (re)builds the block devices. Devices that survive a
   * rescan keep their object; devices that disappeared are detached.
   */
  async scan(opts: { signal?: AbortSignal } = {}): Promise<ScanResult> {
    return this.rescan('all', opts.signal);
  }

  /** Scans all targets or some; devices of other targets stay as they are. */
  private async rescan(targets: 'all' | readonly number[], signal?: AbortSignal): Promise<ScanResult> {
    if (this.deviceType === 'blk') return this.rescanBlk(signal);
    const info = this.info;
    const result = await scanTargets(this.executor(), {
      controllerName: this.name,
      maxTarget: info.maxTarget,
      maxLun: info.maxLun,
      policy: this.policy,
      allocBuffer: (bytes) => this.allocBuffer(bytes),
      ...(targets === 'all' ? {} : { targets }),
      ...(signal ? { signal } : {}),
    });
    this.checkOpen();
    this.install(result.luns, targets);
    this.emit('rescanned', result, targets);
    return result;
  }

  /**
   * virtio-blk: the one disk, its capacity read afresh and its ID (GET ID, when the device has
   * one) as serial number. The scan result lists no LUNs.
   */
  private async rescanBlk(signal?: AbortSignal): Promise<ScanResult> {
    const config = this.info.blk;
    if (config === undefined) throw new Error(`${this.name}: a virtio-blk controller without its configuration`);
    const id = Buffer.alloc(BLK_ID_BYTES);
    const r = await this.executor().blockRequest({ op: 'get-id', dataIn: id, ...(signal ? { signal } : {}) });
    // A device without an ID answers UNSUPP (or IOERR): the disk simply has no serial number.
    const serial = r.response === 0 && r.status === BlkStatus.OK ? blkIdString(id, r.dataLength) : undefined;
    const capacitySectors = await this.handle.readCapacity();
    this.checkOpen();
    const unit: BlkUnit = { name: blkDiskName(this.name), config: { ...config, capacitySectors }, ...(serial !== undefined ? { serial } : {}) };
    this.installBlk(unit);
    const result: ScanResult = { luns: [], problems: [] };
    this.emit('rescanned', result, 'all');
    return result;
  }

  /** The virtio-blk disk: kept when its ID is the same, else replaced. */
  private installBlk(unit: BlkUnit): void {
    this.blkUnit = unit;
    const old = this.blockDevices.get(unit.name);
    if (old && old.info.serial === unit.serial) {
      old.update(unit);
      return;
    }
    const dev = new BlockDevice(this.context, unit);
    this.blockDevices = new Map([[unit.name, dev]]);
    if (old) {
      old.detach('replaced by a different disk', true);
      this.emit('device-removed', old);
    }
    this.emit('device-added', dev);
  }

  /**
   * A handle to pass to worker threads (postMessage, workerData): `Controller.attach(handle)`
   * there gives the thread a Controller over the same device, with the devices of the last
   * scan and a request queue of its own (shared with other threads when they outnumber the
   * device's queues). Closing it in the worker releases that thread's hold only; closing the
   * controller here stops the device for every thread.
   */
  share(): ControllerHandle {
    this.checkOpen();
    return {
      kind: HANDLE_KIND,
      id: this.handle.share(),
      name: this.name,
      transport: { ...this.transport },
      maxTransferBytes: this.context.maxTransferBytes,
      retry: { ...this.policy },
      poll: this.poll,
      timeoutMs: this.timeoutMs,
      luns: this.scanned,
      ...(this.blkUnit ? { blk: this.blkUnit } : {}),
    };
  }

  /** A Controller in this thread over a controller another thread shared (see `share`). */
  static async attach(handle: ControllerHandle): Promise<Controller> {
    if (typeof handle !== 'object' || handle === null || handle.kind !== HANDLE_KIND || !Number.isInteger(handle.id)) {
      throw new TypeError('not a controller handle (use controller.share() in the thread that opened it)');
    }
    const native = loadNative();
    let h: NativeController;
    try {
      h = native.Controller.attach(handle.id);
    } catch (e) {
      throw new ConnectError(`shared controller ${handle.name}`, errorText(e), { cause: e });
    }
    const c = new Controller(
      h,
      handle.name,
      handle.transport,
      { maxTransferBytes: handle.maxTransferBytes, poll: handle.poll, timeoutMs: handle.timeoutMs },
      Object.freeze({ ...handle.retry }),
    );
    if (handle.blk) c.installBlk(handle.blk);
    else c.install(handle.luns);
    return c;
  }

  /**
   * (Re)builds the block devices of the scanned targets from their LUNs; devices that survive
   * keep their object, the others are detached as removed. Tells the listeners what changed.
   */
  private install(luns: readonly ScannedLun[], targets: 'all' | readonly number[] = 'all'): void {
    const inScope = (target: number): boolean => targets === 'all' || targets.includes(target);
    const next = new Map<string, BlockDevice>();
    for (const [name, dev] of this.blockDevices) if (!inScope(dev.target)) next.set(name, dev);
    const added: BlockDevice[] = [];
    const removed: BlockDevice[] = [];
    for (const lun of luns) {
      if (lun.deviceType !== 0 || !lun.geometry) continue;
      const old = this.blockDevices.get(lun.name);
      if (old && sameUnit(old, lun)) {
        old.update(lun);
        next.set(lun.name, old);
      } else {
        if (old) {
          old.detach('replaced by a different logical unit', true);
          removed.push(old);
        }
        const dev = new BlockDevice(this.context, lun);
        next.set(lun.name, dev);
        added.push(dev);
      }
    }
    for (const [name, dev] of this.blockDevices) {
      if (inScope(dev.target) && !next.has(name)) {
        dev.detach('no longer present on the target', true);
        removed.push(dev);
      }
    }
    this.blockDevices = next;
    this.scanned =
      targets === 'all'
        ? luns
        : [...this.scanned.filter((l) => !inScope(l.target)), ...luns].sort((a, b) => a.target - b.target || a.lun - b.lun);
    for (const dev of removed) this.emit('device-removed', dev);
    for (const dev of added) this.emit('device-added', dev);
  }

  /** A zero-copy Buffer over the controller's DMA pool, released when garbage-collected. */
  allocBuffer(bytes: number): Buffer {
    this.checkOpen();
    if (!Number.isSafeInteger(bytes) || bytes < 1) {
      throw new RangeError(`bytes must be a positive integer, got ${String(bytes)}`);
    }
    try {
      const buf = this.handle.allocDmaBuffer(bytes);
      const base = this.handle.dmaAddress(buf) - buf.byteOffset;
      if (base >= 0) this.dmaBase.set(buf.buffer, base);
      this.growAhead();
      return buf;
    } catch (e) {
      // Closed by its owner in another thread.
      if (this.handle.closed) throw new ClosedError(`controller ${this.name} is closed`);
      throw new Error(`${this.name}: cannot allocate ${bytes} bytes of DMA memory: ${errorText(e)}`, { cause: e });
    }
  }

  /**
   * The last step of recovery: a vhost-user device is reset by dropping its connection (the
   * backend then lets go of everything) and brought up again as on a reconnect; what is in
   * flight fails. Resolves with why it could not, or undefined.
   */
  private async resetDevice(reason: string): Promise<string | undefined> {
    if (this.closedError) return 'the controller is closed';
    if (this.reconnectingNow) return 'the target is away, and being reconnected';
    // The loss of the connection is ours: the watcher must not take it for the target going away.
    this.watcher?.stop();
    this.reconnectingNow = true;
    const why = `device reset: ${reason}`;
    // vhost-user: the connection dropped and made again; PCI: reset and set up in place.
    const failure =
      this.transport.type === 'vhost-user' ? await this.handle.resetVhostUser(this.transport.path, why) : await this.handle.resetPci(why);
    this.reconnectingNow = false;
    if (this.closedError) return 'the controller is closed';
    if (failure !== null) return failure.message;
    this.renewed();
    try {
      await this.rescan('all');
    } catch (e) {
      if (!this.closedError) this.emit('event-error', e instanceof Error ? e : new Error(String(e)));
    }
    return undefined;
  }

  /** A new connection works: the queue of the old one goes, the watcher starts over. */
  private renewed(): void {
    const old = this.queue;
    this.queue = undefined;
    old?.fail('the device was reset or reconnected');
    this.watch();
  }

  /** Recovery could not get a request back: the controller fails (the event loop's own notice). */
  private giveUp(reason: string): void {
    if (this.closedError || this.gaveUp) return;
    this.gaveUp = true;
    log('error', 'recovery', `${this.name}: ${reason}`);
    this.handle.fail(reason);
    // The watcher would report the failure as the device going away; it is not that.
    this.watcher?.stop();
    this.emit('failed', new ControllerFailedError(this.name, reason));
  }

  /**
   * Grows the DMA memory in the background once free memory runs low, so that the
   * allocations to come find it without the event loop waiting for the device.
   */
  private growAhead(): void {
    if (this.growing !== undefined || !this.handle.memoryLow()) return;
    this.growing = this.handle.growMemory().then(
      () => {
        this.growing = undefined;
      },
      (e: unknown) => {
        this.growing = undefined;
        // The next allocation that finds no room tries again, synchronously, and reports why.
        if (!this.closed) log('warn', 'memory', `${this.name}: cannot grow DMA memory ahead of need: ${errorText(e)}`);
      },
    );
  }

  /**
   * A task management function on the control queue (0 ABORT TASK, 1 ABORT TASK SET,
   * 4 I_T NEXUS RESET, 5 LOGICAL UNIT RESET); resolves with the virtio-scsi response code.
   * The wait for the device happens off the event loop.
   */
  async taskManagement(target: number, lun: number, fn: number, tag?: number): Promise<number> {
    this.checkOpen();
    for (const [field, v, max] of [
      ['target', target, 255],
      ['lun', lun, 0x3fff],
      ['fn', fn, 0xffffffff],
    ] as const) {
      if (!Number.isInteger(v) || v < 0 || v > max) {
        throw new RangeError(`${field} ${String(v)} out of range 0..${max}`);
      }
    }
    try {
      return await this.handle.taskManagement(target, lun, fn, tag ?? null);
    } catch (e) {
      throw new InitiatorError(
        'ERR_VIRTIO_TASK_MANAGEMENT',
        `${this.name}: task management function ${fn} for ${lunName(this.name, target, lun)} failed: ${errorText(e)}`,
        { cause: e },
      );
    }
  }

  /**
   * @internal Events the device posted since the last call. The controller's own watcher takes
   * them (see `ControllerEventMap`); a caller taking them too would take them away from it.
   */
  pollEvents(): ControllerEvent[] {
    this.checkOpen();
    return this.handle.pollEvents().map((e) => {
      const code = e.event & ~EVENTS_MISSED;
      return {
        type: EVENT_TYPES[code] ?? 'unknown',
        event: e.event,
        eventsMissed: (e.event & EVENTS_MISSED) !== 0,
        target: e.target,
        lun: e.lun,
        device: lunName(this.name, e.target, e.lun),
        reason: e.reason,
      };
    });
  }

  /**
   * @internal For the benchmark's batch and native modes: gives back this thread's request
   * queue (it must be idle) and opens the native channel of a request queue directly, with the
   * native controller it belongs to.
   */
  rawChannel(): { channel: NativeChannel; controller: NativeController; addressOf: (data: Uint8Array) => number } {
    this.checkOpen();
    this.queue?.close();
    this.queue = undefined;
    return { channel: this.handle.openChannel(), controller: this.handle, addressOf: this.addressOf };
  }

  /** Statistics of this thread's request queue (undefined before the first command). */
  get queueStats(): RequestQueueStats | undefined {
    return this.queue?.stats;
  }

  /**
   * Closes the controller: later calls fail at once and the devices are detached; the device
   * is reset and let go off the event loop (a backend that does not answer holds that up to
   * its reply deadline, never the event loop); then what is still in flight is rejected.
   * Resolves once the device can no longer touch our memory; later calls return the same
   * promise. A process may simply end instead of waiting for it.
   */
  close(): Promise<void> {
    if (this.closing !== undefined) return this.closing;
    this.closedError = new ClosedError(`controller ${this.name} is closed`);
    this.watcher?.stop();
    for (const dev of this.blockDevices.values()) dev.detach(`controller ${this.name} closed`);
    let reset: Promise<void>;
    try {
      reset = this.handle.close();
    } catch {
      // A failed controller may refuse a clean shutdown; its resources go either way.
      reset = Promise.resolve();
    }
    // The device is reset and let go before the queue releases anything it might still write.
    this.closing = reset.then(noop, noop).then(() => {
      this.queue?.close();
      this.queue = undefined;
    });
    return this.closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** This thread's request queue, opened on first use. */
  private executor(): RequestQueue {
    this.checkOpen();
    if (this.reconnectingNow) {
      throw new ControllerFailedError(this.name, 'reconnecting to the target (it went away, or is being reset)');
    }
    // A queue of a connection that was replaced (a reconnect, seen from any thread) is done.
    if (this.queue?.closed && this.handle.failure === null) this.queue = undefined;
    this.queue ??= new RequestQueue(this.handle.openChannel(), {
      label: this.name,
      addressOf: this.addressOf,
      closedError: () => (this.handle.closed ? new ClosedError(`controller ${this.name} is closed`) : undefined),
      interrupts: !this.poll,
      timeoutMs: this.timeoutMs,
      onAbandoned: (request) => this.recovery.recover(request),
      ...(this.trace ? { trace: (line: string) => log('trace', 'command', line) } : {}),
    });
    return this.queue;
  }

  private checkOpen(): void {
    if (this.closedError) throw this.closedError;
  }
}

/** Same logical unit as before: serial number and first designator unchanged. */
function sameUnit(dev: BlockDevice, lun: ScannedLun): boolean {
  const info = dev.info;
  return info.serial === lun.serial && info.identifiers[0]?.value === lun.identifiers[0]?.value;
}
