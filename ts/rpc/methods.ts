// The management methods, under SPDK's names and parameter names (design D9), so that tools
// written for SPDK's virtio bdev module (spdk-rpc, rpc.py, spdkcli) drive this initiator.

import { readFileSync } from 'node:fs';

import type { BlockDevice } from '../block-device.js';
import { Controller, type ControllerOptions } from '../controller.js';
import { ConnectError } from '../errors.js';
import type { RequestQueueStats } from '../queue.js';
import type { Designator } from '../scsi/index.js';
import { describeEvent, EventLog } from '../event-log.js';
import { type DeviceType, deviceTypeHint } from '../device-type.js';
import { Errno, invalidParams, RpcError, type RpcParams } from './server.js';

/** A controller the server attached, with what `bdev_virtio_scsi_get_devices` reports. */
export interface AttachedController {
  readonly controller: Controller;
  /** SPDK's dev_type: virtio-scsi, or virtio-blk (one bdev, named like the controller). */
  readonly devType: DeviceType;
  readonly trtype: 'user' | 'pci';
  /** Socket path (user) or PCI address (pci). */
  readonly traddr: string;
  readonly vqCount: number;
  readonly vqSize: number;
}

export interface MethodsOptions {
  /** Options every attached controller gets (memory sizes, retry policy, ...). */
  controllerOptions?: Omit<ControllerOptions, 'name' | 'type' | 'requestQueues' | 'queueSize'>;
  log?: (line: string) => void;
}

/** Events virtio_initiator_get_events keeps. */
const EVENT_LOG_CAPACITY = 1024;

/** SPDK's defaults for bdev_virtio_attach_controller. */
const DEFAULT_VQ_COUNT = 1;
const DEFAULT_VQ_SIZE = 512;
/** SPDK's product_name of virtio-scsi and virtio-blk bdevs. */
const PRODUCT_NAME: Record<DeviceType, string> = { scsi: 'Virtio SCSI Disk', blk: 'VirtioBlk Disk' };
/** Latencies are reported in nanoseconds: tick_rate is ticks per second. */
const TICK_RATE = 1_000_000_000;
/** Polling interval of bdev_get_bdevs' `timeout` (wait for a bdev to appear). */
const BDEV_WAIT_POLL_MS = 10;
const UUID_DESIGNATOR_TYPE = 0x0a;
const UUID_TEXT = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

function packageVersion(): string {
  try {
    // ts/rpc and dist/rpc both sit two levels below the package root.
    const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version?: unknown };
    return typeof pkg.version === 'string' ? pkg.version : '0.0.0';
  } catch {
    return '0.0.0';
  }
}

/** The LUN's UUID, from a UUID designator (SPC-5 7.7.7.10) or a designator whose text is one. */
export function uuidOf(identifiers: readonly Designator[]): string | undefined {
  for (const d of identifiers) {
    if (d.type === UUID_DESIGNATOR_TYPE) {
      // Binary: a format byte (1h in the high nibble), a reserved byte, then the 16 UUID bytes.
      const hex = d.value.replace(/[^0-9a-fA-F]/g, '').toLowerCase();
      if (hex.length === 36 && hex[0] === '1') {
        const u = hex.slice(4);
        return `${u.slice(0, 8)}-${u.slice(8, 12)}-${u.slice(12, 16)}-${u.slice(16, 20)}-${u.slice(20)}`;
      }
    }
    if (UUID_TEXT.test(d.value)) return d.value.toLowerCase();
  }
  return undefined;
}

// Parameter checks: each names the parameter and what was expected, as -32602.

function checkKnown(params: RpcParams, known: readonly string[]): void {
  for (const key of Object.keys(params)) {
    if (!known.includes(key)) {
      throw invalidParams(`unknown parameter "${key}" (accepted: ${known.length > 0 ? known.join(', ') : 'none'})`);
    }
  }
}

function requiredString(params: RpcParams, key: string): string {
  const v = params[key];
  if (typeof v !== 'string' || v === '') throw invalidParams(`parameter "${key}" is required and must be a non-empty string`);
  return v;
}

function optionalString(params: RpcParams, key: string): string | undefined {
  const v = params[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'string' || v === '') throw invalidParams(`parameter "${key}" must be a non-empty string`);
  return v;
}

function optionalInt(params: RpcParams, key: string, min: number, max: number): number | undefined {
  const v = params[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    throw invalidParams(`parameter "${key}" must be an integer from ${min} to ${max}, got ${JSON.stringify(v)}`);
  }
  return v;
}

function optionalBool(params: RpcParams, key: string): boolean | undefined {
  const v = params[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'boolean') throw invalidParams(`parameter "${key}" must be true or false, got ${JSON.stringify(v)}`);
  return v;
}

function oneOf<T extends string>(params: RpcParams, key: string, choices: readonly T[]): T {
  const v = params[key];
  if (typeof v !== 'string' || !(choices as readonly string[]).includes(v)) {
    throw invalidParams(`parameter "${key}" must be one of ${choices.map((c) => `"${c}"`).join(', ')}, got ${JSON.stringify(v)}`);
  }
  return v as T;
}

function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** Why an attach failed, as SPDK would answer it: a negative errno and a message to act on. */
function attachError(e: unknown, trtype: 'user' | 'pci', traddr: string, devType: DeviceType): RpcError {
  if (e instanceof RpcError) return e;
  if (e instanceof RangeError || e instanceof TypeError) return invalidParams(e.message);
  const text = errorText(e);
  if (e instanceof ConnectError && e.errno === 'ENOENT') {
    return new RpcError(
      Errno.ENOENT,
      trtype === 'user'
        ? `vhost-user socket ${traddr} does not exist: start the vhost-user-scsi target first, or check the path given as traddr (-a)`
        : `${text}: check the address given as traddr (-a)`,
    );
  }
  if (e instanceof ConnectError && e.errno === 'ENOTSOCK') {
    return new RpcError(Errno.ENODEV, `${traddr} is not a unix socket: traddr (-a) must be the target's vhost-user socket`);
  }
  if (e instanceof ConnectError && e.errno === 'ECONNREFUSED') {
    return new RpcError(Errno.ECONNREFUSED, `${text}: nothing accepts connections on ${traddr}; is the target running?`);
  }
  const hint = deviceTypeHint(e, trtype === 'user' ? 'vhost-user' : 'pci', devType, (other) => `dev_type "${other}" (-d ${other})`);
  return new RpcError(Errno.EIO, `cannot attach ${traddr}: ${text}${hint}`);
}

function ioTypes(dev: BlockDevice, a: AttachedController): Record<string, boolean> {
  const info = dev.info;
  // A read-only virtio-blk device refuses writes; a SCSI unit says so per command.
  const writable = a.devType === 'scsi' || a.controller.info.blk?.readOnly !== true;
  return {
    read: true,
    write: writable,
    unmap: info.unmap,
    // writeZeroes works wherever writes do: WRITE SAME or WRITE ZEROES, else plain writes of zeros.
    write_zeroes: writable,
    flush: true,
    // LOGICAL UNIT RESET; virtio-blk has no task management.
    reset: a.devType === 'scsi',
    compare: false,
    compare_and_write: false,
    abort: false,
    seek_hole: false,
    seek_data: false,
    copy: false,
    nvme_admin: false,
    nvme_io: false,
    nvme_io_md: false,
    nvme_iov_md: false,
    zcopy: false,
    get_zone_info: false,
    zone_management: false,
    zone_append: false,
  };
}

function virtioJson(a: AttachedController): Record<string, unknown> {
  const out: Record<string, unknown> = { vq_count: a.vqCount, vq_size: a.vqSize, type: a.trtype };
  if (a.trtype === 'user') out.socket = a.traddr;
  else out.pci_address = a.traddr;
  return out;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export class VirtioRpcMethods {
  /** Attached controllers by name. */
  readonly controllers = new Map<string, AttachedController>();
  /** Names being attached, so that a concurrent attach of the same name is refused too. */
  private readonly attaching = new Set<string>();
  private closed = false;
  readonly version = packageVersion();
  /** What the attached controllers reported, for virtio_initiator_get_events. */
  readonly events: EventLog;

  constructor(private readonly options: MethodsOptions = {}) {
    this.events = new EventLog(EVENT_LOG_CAPACITY, (e) => options.log?.(`event ${describeEvent(e)}`));
  }

  /** Method name to handler, for registration with the protocol server. */
  handlers(methodNames: () => string[]): Record<string, (params: RpcParams) => Promise<unknown> | unknown> {
    return {
      bdev_virtio_attach_controller: (p) => this.attach(p),
      bdev_virtio_detach_controller: (p) => this.detach(p),
      bdev_virtio_scsi_get_devices: (p) => this.getDevices(p),
      bdev_get_bdevs: (p) => this.getBdevs(p),
      bdev_get_iostat: (p) => this.getIostat(p),
      virtio_initiator_get_queue_stats: (p) => this.getQueueStats(p),
      virtio_initiator_get_events: (p) => this.getEvents(p),
      spdk_get_version: (p) => this.getVersion(p),
      rpc_get_methods: (p) => {
        // spdk-rpc always sends both flags; everything here is callable at any time and has
        // no deprecated aliases, so they change nothing.
        checkKnown(p, ['current', 'include_aliases']);
        optionalBool(p, 'current');
        optionalBool(p, 'include_aliases');
        return methodNames();
      },
    };
  }

  async attach(p: RpcParams): Promise<string[]> {
    checkKnown(p, ['name', 'trtype', 'traddr', 'dev_type', 'vq_count', 'vq_size']);
    const name = requiredString(p, 'name');
    const trtype = oneOf(p, 'trtype', ['user', 'pci', 'vfio-user'] as const);
    const traddr = requiredString(p, 'traddr');
    const devType: DeviceType = oneOf(p, 'dev_type', ['scsi', 'blk'] as const);
    const vqCount = optionalInt(p, 'vq_count', 1, 16);
    const vqSize = optionalInt(p, 'vq_size', 2, 1024);
    if (vqSize !== undefined && (vqSize & (vqSize - 1)) !== 0) {
      throw invalidParams(`parameter "vq_size" must be a power of two up to 1024, got ${vqSize}`);
    }
    if (trtype === 'vfio-user') {
      throw new RpcError(Errno.EOPNOTSUPP, 'trtype "vfio-user" is not supported (use "user" or "pci")');
    }
    if (this.closed) throw new RpcError(Errno.ENODEV, 'the RPC server is shutting down');
    if (this.controllers.has(name) || this.attaching.has(name)) {
      throw new RpcError(Errno.EEXIST, `a controller named ${name} is already attached (detach it or choose another name)`);
    }
    this.attaching.add(name);
    let ctrl: Controller | undefined;
    try {
      const base: ControllerOptions = { ...this.options.controllerOptions, name, type: devType };
      if (trtype === 'user') {
        ctrl = await Controller.connect(traddr, {
          ...base,
          requestQueues: vqCount ?? DEFAULT_VQ_COUNT,
          queueSize: vqSize ?? DEFAULT_VQ_SIZE,
        });
      } else {
        // SPDK documents vq_count and vq_size for the user transport only; for PCI the
        // initiator's own defaults apply unless they are given.
        const opts: ControllerOptions = { ...base };
        if (vqCount !== undefined) opts.requestQueues = vqCount;
        if (vqSize !== undefined) opts.queueSize = vqSize;
        ctrl = await Controller.openPci(traddr, opts);
      }
      this.events.follow(ctrl);
      const { problems } = await ctrl.scan();
      for (const pr of problems) {
        this.options.log?.(
          `rpc ${name}: target ${pr.target}${pr.lun === undefined ? '' : ` LUN ${pr.lun}`} not scanned: ${pr.error.message}`,
        );
      }
      if (this.closed) throw new RpcError(Errno.ENODEV, 'the RPC server shut down during the attach');
      const info = ctrl.info;
      this.controllers.set(name, {
        controller: ctrl,
        devType,
        trtype,
        traddr,
        vqCount: info.requestQueues,
        vqSize: info.queueSize,
      });
      // SPDK's answer: the bdevs created (for virtio-blk the one, named like the controller).
      return ctrl.devices.map((d) => d.name);
    } catch (e) {
      if (ctrl) this.events.forget(ctrl);
      await ctrl?.close();
      throw attachError(e, trtype, traddr, devType);
    } finally {
      this.attaching.delete(name);
    }
  }

  /** Resolves once the device is let go, so the same target can be attached again at once. */
  async detach(p: RpcParams): Promise<boolean> {
    checkKnown(p, ['name']);
    const name = requiredString(p, 'name');
    const a = this.controllers.get(name);
    if (!a) throw this.noController(name);
    this.controllers.delete(name);
    this.events.forget(a.controller);
    await a.controller.close();
    return true;
  }

  /**
   * What the attached controllers reported after `cursor` (the `cursor` of the previous answer;
   * 0 for everything kept), and the state of each controller.
   */
  getEvents(p: RpcParams): Record<string, unknown> {
    checkKnown(p, ['cursor', 'name']);
    const cursor = optionalInt(p, 'cursor', 0, Number.MAX_SAFE_INTEGER) ?? 0;
    const name = optionalString(p, 'name');
    if (name !== undefined && !this.controllers.has(name)) throw this.noController(name);
    const { cursor: last, dropped, events } = this.events.since(cursor);
    return {
      cursor: last,
      dropped,
      events: events.filter((e) => name === undefined || e.controller === name),
      controllers: [...this.controllers.entries()]
        .filter(([n]) => name === undefined || n === name)
        .map(([n, a]) => {
          const failure = a.controller.failure;
          return { name: n, state: failure === null ? 'open' : 'failed', failure };
        }),
    };
  }

  /** The virtio-scsi controllers, as SPDK lists them (virtio-blk ones show as their bdev). */
  getDevices(p: RpcParams): Array<Record<string, unknown>> {
    checkKnown(p, []);
    return [...this.controllers.entries()]
      .filter(([, a]) => a.devType === 'scsi')
      .map(([name, a]) => ({ name, virtio: virtioJson(a) }));
  }

  async getBdevs(p: RpcParams): Promise<Array<Record<string, unknown>>> {
    checkKnown(p, ['name', 'timeout']);
    const name = optionalString(p, 'name');
    const timeout = optionalInt(p, 'timeout', 0, 3_600_000) ?? 0;
    if (name === undefined) return this.bdevs().map(([dev, a]) => this.bdevJson(dev, a));
    // SPDK's `timeout` (ms) waits for the bdev to appear, e.g. after a hotplug rescan.
    const deadline = Date.now() + timeout;
    for (;;) {
      const hit = this.bdevs().find(([dev]) => dev.name === name);
      if (hit) return [this.bdevJson(hit[0], hit[1])];
      if (Date.now() >= deadline) throw this.noBdev(name);
      await sleep(BDEV_WAIT_POLL_MS);
    }
  }

  /**
   * SPDK's iostat shape, from what each bdev completed in this process (ticks are nanoseconds);
   * `reset_mode` clears the counters (or only the minimums and maximums) once reported.
   * `virtio_initiator_get_queue_stats` has what the request queues know.
   */
  getIostat(p: RpcParams): Record<string, unknown> {
    checkKnown(p, ['name', 'names', 'per_channel', 'reset_mode']);
    const name = optionalString(p, 'name');
    const names = p.names;
    if (names !== undefined && (!Array.isArray(names) || !names.every((n) => typeof n === 'string'))) {
      throw invalidParams('parameter "names" must be an array of bdev names');
    }
    if (optionalBool(p, 'per_channel') === true) {
      throw new RpcError(Errno.EOPNOTSUPP, 'per_channel statistics are not supported (one channel per thread here)');
    }
    const reset = p.reset_mode === undefined ? 'none' : oneOf(p, 'reset_mode', ['all', 'maxmin', 'error', 'none'] as const);
    const wanted = [...(name === undefined ? [] : [name]), ...((names as string[] | undefined) ?? [])];
    const all = this.bdevs();
    for (const w of wanted) {
      if (!all.some(([d]) => d.name === w)) throw this.noBdev(w);
    }
    const chosen = wanted.length === 0 ? all : all.filter(([d]) => wanted.includes(d.name));
    return {
      tick_rate: TICK_RATE,
      ticks: Number(process.hrtime.bigint()),
      bdevs: chosen.map(([d]) => {
        const io = d.iostat;
        // Errors are not counted per bdev: "error" has nothing to reset.
        if (reset === 'all' || reset === 'maxmin') d.resetIostat(reset === 'maxmin');
        return {
          name: d.name,
          bytes_read: io.readBytes,
          num_read_ops: io.readOps,
          bytes_written: io.writeBytes,
          num_write_ops: io.writeOps,
          bytes_unmapped: io.unmapBytes,
          num_unmap_ops: io.unmapOps,
          bytes_copied: 0,
          num_copy_ops: 0,
          read_latency_ticks: io.readLatencyNs,
          max_read_latency_ticks: io.readLatencyMaxNs,
          min_read_latency_ticks: io.readLatencyMinNs,
          write_latency_ticks: io.writeLatencyNs,
          max_write_latency_ticks: io.writeLatencyMaxNs,
          min_write_latency_ticks: io.writeLatencyMinNs,
          unmap_latency_ticks: io.unmapLatencyNs,
          max_unmap_latency_ticks: io.unmapLatencyMaxNs,
          min_unmap_latency_ticks: io.unmapLatencyMinNs,
          copy_latency_ticks: 0,
          max_copy_latency_ticks: 0,
          min_copy_latency_ticks: 0,
          io_error: {},
        };
      }),
    };
  }

  /** What each controller's request queue in this thread counted (null before its first command). */
  getQueueStats(p: RpcParams): Array<{ name: string; queue: RequestQueueStats | null }> {
    checkKnown(p, ['name']);
    const name = optionalString(p, 'name');
    if (name !== undefined && !this.controllers.has(name)) throw this.noController(name);
    return [...this.controllers.entries()]
      .filter(([n]) => name === undefined || n === name)
      .map(([n, a]) => ({ name: n, queue: a.controller.queueStats ?? null }));
  }

  getVersion(p: RpcParams): Record<string, unknown> {
    checkKnown(p, []);
    const m = /^(\d+)\.(\d+)\.(\d+)(.*)$/.exec(this.version);
    return {
      version: `virtio-initiator ${this.version}`,
      fields: {
        major: Number(m?.[1] ?? 0),
        minor: Number(m?.[2] ?? 0),
        patch: Number(m?.[3] ?? 0),
        suffix: m?.[4] ?? '',
      },
    };
  }

  /** Detaches every controller; attaches still running are closed when they finish. */
  async closeAll(): Promise<void> {
    this.closed = true;
    const all = [...this.controllers.values()].map((a) => a.controller.close());
    this.controllers.clear();
    await Promise.all(all);
  }

  private bdevs(): Array<[BlockDevice, AttachedController]> {
    const out: Array<[BlockDevice, AttachedController]> = [];
    for (const a of this.controllers.values()) {
      if (a.controller.closed) continue;
      for (const d of a.controller.devices) out.push([d, a]);
    }
    return out;
  }

  private bdevJson(dev: BlockDevice, a: AttachedController): Record<string, unknown> {
    const info = dev.info;
    const out: Record<string, unknown> = {
      name: dev.name,
      aliases: [],
      product_name: PRODUCT_NAME[a.devType],
      block_size: info.blockSize,
      num_blocks: Number(info.blockCount),
    };
    const uuid = uuidOf(info.identifiers);
    if (uuid !== undefined) out.uuid = uuid;
    Object.assign(out, {
      assigned_rate_limits: { rw_ios_per_sec: 0, rw_mbytes_per_sec: 0, r_mbytes_per_sec: 0, w_mbytes_per_sec: 0 },
      claimed: false,
      zoned: false,
      supported_io_types: ioTypes(dev, a),
      driver_specific: {
        // SPDK's own key for virtio bdevs, then what this initiator knows of the LUN or disk.
        virtio: virtioJson(a),
        ...(a.devType === 'blk'
          ? { virtio_blk: { serial: info.serial ?? null } }
          : {
              virtio_scsi: {
                target: info.target,
                lun: info.lun,
                vendor: info.vendor,
                product: info.product,
                revision: info.revision,
                serial: info.serial ?? null,
              },
            }),
      },
    });
    return out;
  }

  private noController(name: string): RpcError {
    const known = [...this.controllers.keys()];
    return new RpcError(
      Errno.ENODEV,
      `no controller named ${name}` + (known.length > 0 ? ` (attached: ${known.join(', ')})` : ' (none attached)'),
    );
  }

  private noBdev(name: string): RpcError {
    return new RpcError(Errno.ENODEV, `no bdev named ${name} (bdev_get_bdevs lists them)`);
  }
}
