// Target and LUN enumeration (design D6): REPORT LUNS per target with a LUN 0 fallback, then
// INQUIRY, the VPD pages, the caching mode page and READ CAPACITY (which tells readiness too)
// per logical unit. Targets that
// implement less (no REPORT LUNS, no VPD pages, no READ CAPACITY (16)) are handled through the
// ILLEGAL REQUEST they answer with; only transport-level failures end a scan.

import { DEFAULT_RETRY_POLICY, isIllegalRequest, type RetryPolicy, runCommand, succeeded } from './command.js';
import { DeviceError, InitiatorError, VirtioResponse, VirtioResponseError } from './errors.js';
import type { CommandExecutor, CommandResult, ScsiCommand } from './queue.js';
import {
  type BlockCharacteristics,
  type BlockLimits,
  type CachingPage,
  type Capacity16,
  type Designator,
  inquiry,
  type LogicalBlockProvisioning,
  modePageKey,
  ModePage,
  modeSense6,
  modeSense10,
  parseCachingPage,
  parseInquiry,
  parseModeSense6,
  parseModeSense10,
  parseReadCapacity10,
  parseReadCapacity16,
  parseReportLuns,
  parseVpdBlockCharacteristics,
  parseVpdBlockLimits,
  parseVpdDeviceId,
  parseVpdLogicalBlockProvisioning,
  parseVpdSerial,
  parseVpdSupportedPages,
  PQ_NOT_CONNECTED,
  readCapacity10,
  readCapacity16,
  reportLuns,
  ScsiDataError,
  ScsiError,
  SenseKey,
  type StandardInquiry,
  startStopUnit,
  TruncatedDataError,
  VpdPage,
} from './scsi/index.js';

/** Peripheral device type of a direct-access block device. */
export const DEVICE_TYPE_DISK = 0x00;
/** Peripheral device type "unknown or no device". */
const DEVICE_TYPE_NONE = 0x1f;
/** Highest LUN a virtio-scsi single-level LUN can address. */
export const MAX_VIRTIO_LUN = 0x3fff;

/** Block geometry and provisioning from READ CAPACITY. */
export interface Geometry {
  blockSize: number;
  blockCount: bigint;
  /** From READ CAPACITY (16), when the device answered it. */
  capacity16?: Capacity16;
}

/** One logical unit found by a scan. */
export interface ScannedLun {
  /** `<controller>t<target>` for LUN 0, `<controller>t<target>l<lun>` otherwise. */
  name: string;
  target: number;
  lun: number;
  inquiry: StandardInquiry;
  deviceType: number;
  deviceTypeName: string;
  vendor: string;
  product: string;
  revision: string;
  /** VPD 0x80, when offered. */
  serial?: string;
  /** VPD 0x83 designators (empty when the page is not offered). */
  identifiers: Designator[];
  /** VPD pages the unit lists in page 0x00 (empty when it has none). */
  vpdPages: number[];
  blockLimits?: BlockLimits;
  characteristics?: BlockCharacteristics;
  provisioning?: LogicalBlockProvisioning;
  /** Disks: the caching mode page (write cache enabled, read cache disabled), when offered. */
  caching?: CachingPage;
  /** Disks only: whether the unit is ready (READ CAPACITY not refused with NOT READY, after START STOP UNIT where needed). */
  ready: boolean;
  /** Disks that are ready: READ CAPACITY data. */
  geometry?: Geometry;
  /** Why a disk has no geometry (not ready, READ CAPACITY failed, bad data). */
  problem?: string;
}

/** A target or LUN the scan could not examine; the rest of the scan went on. */
export interface ScanProblem {
  target: number;
  lun?: number;
  error: Error;
}

export interface ScanResult {
  luns: ScannedLun[];
  problems: ScanProblem[];
}

export interface ScanOptions {
  /** Prefix of the LUN names. */
  controllerName: string;
  /** Highest target id to probe (from the device config space). */
  maxTarget: number;
  /** Highest LUN to accept (from the device config space). */
  maxLun: number;
  /** Probe only these targets (default 0..maxTarget). */
  targets?: readonly number[];
  signal?: AbortSignal;
  policy?: Readonly<RetryPolicy>;
  /**
   * DMA memory of the controller (`Controller.allocBuffer`): command data then lands where the
   * device writes it, with no bounce copy. Without it, each command gets a plain buffer.
   */
  allocBuffer?: (bytes: number) => Buffer;
}

/** Name of a LUN under a controller (SPDK's naming for LUN 0). */
export function lunName(controller: string, target: number, lun: number): string {
  return lun === 0 ? `${controller}t${target}` : `${controller}t${target}l${lun}`;
}

/**
 * Errors that end a scan: the controller failed or closed, or the caller aborted. Everything
 * else (SCSI errors, odd virtio responses, malformed data) only concerns one target or LUN.
 */
function isFatal(e: unknown, signal: AbortSignal | undefined): boolean {
  if (signal?.aborted) return true;
  if (e instanceof InitiatorError) {
    return e.code === 'ERR_VIRTIO_CONTROLLER_FAILED' || e.code === 'ERR_VIRTIO_CLOSED';
  }
  return !(e instanceof ScsiError || e instanceof ScsiDataError);
}

const INQUIRY_LENGTH = 96;
const VPD_FIRST_LENGTH = 252;
const REPORT_LUNS_FIRST_LENGTH = 16 + 8 * 64;
/** INQUIRY VERSION of SPC-3 (0x05); later standards have higher values. */
const SPC3_VERSION = 0x05;
/** Reissues of a command whose data did not fit the first allocation length. */
const MAX_REGROW = 2;
/** UNIT ATTENTIONs are queued per condition (power on, nexus loss, LUN changes, ...). */
const SCAN_UNIT_ATTENTION_RETRIES = 8;

/** Data-in bytes each LUN's prober keeps for its commands: enough for every first attempt. */
const SCRATCH_BYTES = 1024;
/** DMA memory is taken for this many probers at a time. */
const SCRATCH_SLAB_PROBERS = 64;

/**
 * The CDBs a scan sends, built once: every LUN gets the same bytes, and nothing writes to a
 * CDB once built (the queue copies it into its submission record).
 */
const CDB = {
  inquiry: inquiry({ allocationLength: INQUIRY_LENGTH }),
  readCapacity16: readCapacity16(32),
  readCapacity10: readCapacity10(),
};
const vpdCdbs = new Map<number, Uint8Array>();

/** INQUIRY for a VPD page with an allocation length, from the cache when seen before. */
function vpdCdb(page: number, alloc: number): Uint8Array {
  const key = page * 0x10000 + alloc;
  let cdb = vpdCdbs.get(key);
  if (cdb === undefined) {
    cdb = inquiry({ page, allocationLength: alloc });
    // Allocation lengths the data asked for are rare; only the first ones are kept.
    if (alloc === VPD_FIRST_LENGTH) vpdCdbs.set(key, cdb);
  }
  return cdb;
}

/** Hands out scratch buffers carved from DMA buffers taken a slab at a time. */
class ScratchSlabs {
  private slab: Buffer | undefined;
  private used = 0;

  constructor(private readonly alloc: (bytes: number) => Buffer) {}

  /** A scratch buffer, or undefined when DMA memory is short (plain buffers then). */
  take(): Buffer | undefined {
    if (this.slab === undefined || this.used === this.slab.length) {
      try {
        this.slab = this.alloc(SCRATCH_BYTES * SCRATCH_SLAB_PROBERS);
      } catch {
        return undefined;
      }
      this.used = 0;
    }
    this.used += SCRATCH_BYTES;
    return this.slab.subarray(this.used - SCRATCH_BYTES, this.used);
  }
}

class LunProber {
  private readonly device: string;
  private readonly policy: Readonly<RetryPolicy>;
  /**
   * Where the data of this prober's commands land when they fit: a LUN is probed one command
   * at a time, and every parser copies what it keeps out of the bytes it is given.
   */
  private readonly scratch: Buffer | undefined;

  constructor(
    private readonly exec: CommandExecutor,
    private readonly target: number,
    private readonly lun: number,
    private readonly opts: ScanOptions,
    slabs?: ScratchSlabs,
  ) {
    this.scratch = slabs?.take();
    this.device = lunName(opts.controllerName, target, lun);
    const base = opts.policy ?? DEFAULT_RETRY_POLICY;
    this.policy = {
      ...base,
      unitAttentionRetries: Math.max(base.unitAttentionRetries, SCAN_UNIT_ATTENTION_RETRIES),
    };
  }

  // The command helpers below return the queue's promise chained with plain callbacks rather
  // than being async functions: a scan runs thousands of commands through them, and each async
  // layer costs a promise, a suspended frame and a microtask per command.

  /** Runs a command and returns its data-in bytes. */
  dataIn(cdb: Uint8Array, length: number): Promise<Uint8Array> {
    return this.dataInThen(cdb, length, (data) => data);
  }

  /**
   * Runs a command and hands its data-in bytes to `then`, in the one promise reaction the
   * command costs; the retry machinery runs only for a completion that did not succeed.
   */
  private dataInThen<T>(cdb: Uint8Array, length: number, then: (data: Uint8Array) => T | Promise<T>): Promise<T> {
    const buf =
      this.scratch !== undefined && length <= this.scratch.length
        ? this.scratch.subarray(0, length).fill(0)
        : // Small and short-lived: from Node's buffer pool rather than an ArrayBuffer each.
          Buffer.allocUnsafe(length).fill(0);
    const cmd: ScsiCommand = { target: this.target, lun: this.lun, cdb, dataIn: buf, signal: this.opts.signal };
    // The residual is what SAM and Linux go by; bytes the device claims beyond it are ignored.
    const data = (r: CommandResult): T | Promise<T> => then(buf.subarray(0, length - Math.min(r.residual, length)));
    return this.exec.execute(cmd).then((r) => (succeeded(r) ? data(r) : this.retry(cmd, r).then(data)));
  }

  noData(cdb: Uint8Array): Promise<CommandResult> {
    return this.run({ target: this.target, lun: this.lun, cdb, signal: this.opts.signal });
  }

  /** One command; the retry machinery runs only for a completion that did not succeed. */
  private run(cmd: ScsiCommand): Promise<CommandResult> {
    return this.exec.execute(cmd).then((r) => (succeeded(r) ? r : this.retry(cmd, r)));
  }

  private retry(cmd: ScsiCommand, first: CommandResult): Promise<CommandResult> {
    return runCommand(this.exec, cmd, { device: this.device, policy: this.policy }, first);
  }

  /**
   * Issues a command built for an allocation length, parses the answer, and reissues it with
   * the length the data says it needs when the first one was too short.
   */
  grown<T>(build: (alloc: number) => Uint8Array, alloc: number, max: number, parse: (d: Uint8Array) => T, attempt = 0): Promise<T> {
    return this.dataInThen(build(alloc), alloc, (data) => {
      try {
        return parse(data);
      } catch (e) {
        // Only a truncation the allocation length caused is worth another round.
        if (
          e instanceof TruncatedDataError &&
          data.length === alloc &&
          e.needed > alloc &&
          e.needed <= max &&
          attempt < MAX_REGROW
        ) {
          return this.grown(build, e.needed, max, parse, attempt + 1);
        }
        throw e;
      }
    });
  }

  vpd<T>(page: number, parse: (d: Uint8Array) => T): Promise<T> {
    return this.grown((alloc) => vpdCdb(page, alloc), VPD_FIRST_LENGTH, 0xffff, parse);
  }

  /** INQUIRY; undefined when no logical unit answers at this address. */
  async standardInquiry(): Promise<StandardInquiry | undefined> {
    let data: Uint8Array;
    try {
      data = await this.dataIn(CDB.inquiry, INQUIRY_LENGTH);
    } catch (e) {
      if (e instanceof VirtioResponseError && e.response === VirtioResponse.INCORRECT_LUN) return undefined;
      throw e;
    }
    const inq = parseInquiry(data);
    // Qualifier 1 (capable, not connected) and 3 (not capable) both mean nothing is here now.
    if (inq.peripheralQualifier !== 0 || inq.deviceType === DEVICE_TYPE_NONE) return undefined;
    return inq;
  }

  /**
   * The caching mode page (MODE SENSE(6), else (10)); undefined when the unit has neither or
   * does not report the page, which is common and not a problem.
   */
  async cachingPage(): Promise<CachingPage | undefined> {
    const args = { page: ModePage.CACHING, dbd: true, allocationLength: 0xff };
    for (const [build, parse] of [
      [() => modeSense6(args), parseModeSense6],
      [() => modeSense10(args), parseModeSense10],
    ] as const) {
      try {
        const page = parse(await this.dataIn(build(), args.allocationLength)).pages.get(modePageKey(ModePage.CACHING));
        return page ? parseCachingPage(page) : undefined;
      } catch (e) {
        if (isFatal(e, this.opts.signal)) throw e;
        if (!isIllegalRequest(e)) return undefined;
      }
    }
    return undefined;
  }

  /**
   * READ CAPACITY, which also tells whether the unit is ready: a unit that is not answers it
   * with NOT READY, as it would TEST UNIT READY (so that command is not sent as well). A unit
   * that asks for an initializing command is started (START STOP UNIT, as SBC-3 says) and asked
   * again.
   */
  async readiness(inq: StandardInquiry, vpdPages: readonly number[]): Promise<Pick<ScannedLun, 'ready' | 'geometry' | 'problem'>> {
    let started = false;
    for (;;) {
      try {
        return { ready: true, geometry: await this.capacity(inq, vpdPages) };
      } catch (e) {
        if (isFatal(e, this.opts.signal)) throw e;
        if (e instanceof ScsiError && e.key === SenseKey.NOT_READY) {
          if (e.asc === 0x04 && e.ascq === 0x02 && !started) {
            started = true;
            await this.noData(startStopUnit({ start: true }));
            continue;
          }
          return { ready: false, problem: `not ready: ${e.message}` };
        }
        return { ready: true, problem: e instanceof Error ? e.message : String(e) };
      }
    }
  }

  async capacity(inq: StandardInquiry, vpdPages: readonly number[]): Promise<Geometry> {
    let rc16: Capacity16 | undefined;
    let refused16: ScsiError | undefined;
    const try16 = async (): Promise<void> => {
      try {
        rc16 = parseReadCapacity16(await this.dataIn(CDB.readCapacity16, 32));
      } catch (e) {
        if (!isIllegalRequest(e)) throw e;
        refused16 = e;
      }
    };
    // SPC-3 and later devices are asked READ CAPACITY (16) first, as Linux's sd does: one
    // command reports everything (sizes past 2 TiB, protection, thin provisioning).
    const first16 = inq.version >= SPC3_VERSION;
    if (first16) await try16();
    let rc10: ReturnType<typeof parseReadCapacity10> | undefined;
    if (rc16 === undefined) {
      try {
        rc10 = parseReadCapacity10(await this.dataIn(CDB.readCapacity10, 8));
      } catch (e) {
        // Some devices implement only READ CAPACITY (16).
        if (!isIllegalRequest(e)) throw e;
      }
      // READ CAPACITY (16) for large devices, and for what only it reports: protection
      // information and thin provisioning (LBPME / LBPRZ).
      const want16 =
        rc10 === undefined || rc10.needs16 || inq.protect || vpdPages.includes(VpdPage.LOGICAL_BLOCK_PROVISIONING);
      if (want16 && !first16) await try16();
      if (rc16 === undefined && (rc10 === undefined || rc10.needs16)) throw refused16;
    }
    const blockSize = rc16?.blockSize ?? rc10?.blockSize ?? 0;
    const blockCount = rc16 !== undefined ? rc16.lastLba + 1n : BigInt((rc10?.lastLba ?? -1) + 1);
    if (blockSize === 0) throw new DeviceError(`${this.device}: READ CAPACITY reports a block size of 0`);
    const geometry: Geometry = { blockSize, blockCount };
    if (rc16) geometry.capacity16 = rc16;
    return geometry;
  }

  /** Reads a VPD page the unit listed; undefined when it then refuses it. */
  optionalVpd<T>(pages: readonly number[], page: number, parse: (d: Uint8Array) => T): Promise<T | undefined> | undefined {
    if (!pages.includes(page)) return undefined;
    return this.vpd(page, parse).catch((e: unknown) => {
      if (isIllegalRequest(e)) return undefined;
      throw e;
    });
  }

  async probe(): Promise<ScannedLun | undefined> {
    const inq = await this.standardInquiry();
    if (inq === undefined) return undefined;
    let vpdPages: number[] = [];
    try {
      vpdPages = await this.vpd(VpdPage.SUPPORTED_PAGES, parseVpdSupportedPages);
    } catch (e) {
      // No VPD support at all (an SPC-2 style target).
      if (!isIllegalRequest(e)) throw e;
    }
    const lun: ScannedLun = {
      name: this.device,
      target: this.target,
      lun: this.lun,
      inquiry: inq,
      deviceType: inq.deviceType,
      deviceTypeName: inq.deviceTypeName,
      vendor: inq.vendor,
      product: inq.product,
      revision: inq.revision,
      identifiers: [],
      vpdPages,
      ready: false,
    };
    const serial = await this.optionalVpd(vpdPages, VpdPage.UNIT_SERIAL_NUMBER, parseVpdSerial);
    if (serial !== undefined) lun.serial = serial;
    lun.identifiers = (await this.optionalVpd(vpdPages, VpdPage.DEVICE_IDENTIFICATION, parseVpdDeviceId)) ?? [];
    if (inq.deviceType !== DEVICE_TYPE_DISK) return lun;

    const limits = await this.optionalVpd(vpdPages, VpdPage.BLOCK_LIMITS, parseVpdBlockLimits);
    if (limits) lun.blockLimits = limits;
    const chars = await this.optionalVpd(vpdPages, VpdPage.BLOCK_DEVICE_CHARACTERISTICS, parseVpdBlockCharacteristics);
    if (chars) lun.characteristics = chars;
    const prov = await this.optionalVpd(vpdPages, VpdPage.LOGICAL_BLOCK_PROVISIONING, parseVpdLogicalBlockProvisioning);
    if (prov) lun.provisioning = prov;
    const caching = await this.cachingPage();
    if (caching) lun.caching = caching;

    const state = await this.readiness(inq, vpdPages);
    lun.ready = state.ready;
    if (state.geometry !== undefined) lun.geometry = state.geometry;
    if (state.problem !== undefined) lun.problem = state.problem;
    return lun;
  }
}

/** REPORT LUNS on LUN 0; undefined when the target is absent (virtio BAD_TARGET). */
async function targetLuns(
  exec: CommandExecutor,
  target: number,
  opts: ScanOptions,
  slabs: ScratchSlabs | undefined,
): Promise<number[] | undefined> {
  const prober = new LunProber(exec, target, 0, opts, slabs);
  let luns: number[];
  try {
    luns = await prober.grown((alloc) => reportLuns(alloc), REPORT_LUNS_FIRST_LENGTH, 0xffffffff, parseReportLuns);
  } catch (e) {
    if (e instanceof VirtioResponseError && e.response === VirtioResponse.BAD_TARGET) return undefined;
    // A target without REPORT LUNS (or one whose answer makes no sense): probe LUN 0 alone.
    if (e instanceof ScsiError || e instanceof ScsiDataError) return [0];
    throw e;
  }
  const limit = Math.min(opts.maxLun, MAX_VIRTIO_LUN);
  return [...new Set(luns)].filter((l) => l <= limit).sort((a, b) => a - b);
}

async function settleAll<T>(work: Promise<T>[]): Promise<T[]> {
  // Waits for every probe before reporting, so no command of this scan is left running.
  const results = await Promise.allSettled(work);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
  return results.map((r) => (r as PromiseFulfilledResult<T>).value);
}

/** Scans every target of a controller; LUNs come back ordered by target, then LUN. */
export async function scanTargets(exec: CommandExecutor, opts: ScanOptions): Promise<ScanResult> {
  if (!Number.isInteger(opts.maxTarget) || opts.maxTarget < 0 || opts.maxTarget > 255) {
    throw new RangeError(`maxTarget ${String(opts.maxTarget)} out of range 0..255`);
  }
  const targets = opts.targets ?? Array.from({ length: opts.maxTarget + 1 }, (_, i) => i);
  const problems: ScanProblem[] = [];
  const note = (target: number, lun: number | undefined, e: unknown): void => {
    if (isFatal(e, opts.signal)) throw e;
    const error = e instanceof Error ? e : new Error(String(e));
    problems.push(lun === undefined ? { target, error } : { target, lun, error });
  };

  const slabs = opts.allocBuffer ? new ScratchSlabs(opts.allocBuffer) : undefined;
  const perTarget = await settleAll(
    targets.map(async (target): Promise<ScannedLun[]> => {
      let luns: number[] | undefined;
      try {
        luns = await targetLuns(exec, target, opts, slabs);
      } catch (e) {
        note(target, undefined, e);
        return [];
      }
      if (luns === undefined) return [];
      const found = await settleAll(
        luns.map(async (lun) => {
          try {
            return await new LunProber(exec, target, lun, opts, slabs).probe();
          } catch (e) {
            note(target, lun, e);
            return undefined;
          }
        }),
      );
      return found.filter((l): l is ScannedLun => l !== undefined);
    }),
  );
  opts.signal?.throwIfAborted();
  return { luns: perTarget.flat(), problems };
}

/** Re-reads the geometry of one disk (after CAPACITY DATA HAS CHANGED). */
export async function readGeometry(
  exec: CommandExecutor,
  target: number,
  lun: number,
  opts: ScanOptions & { inquiry: StandardInquiry; vpdPages: readonly number[] },
): Promise<Geometry> {
  return new LunProber(exec, target, lun, opts).capacity(opts.inquiry, opts.vpdPages);
}
