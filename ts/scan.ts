// Target and LUN enumeration (design D6): REPORT LUNS per target with a LUN 0 fallback, then
// INQUIRY, the VPD pages, the caching mode page and READ CAPACITY (which tells readiness too)
// per logical unit. Targets that implement less (no REPORT LUNS, no VPD pages, no READ
// CAPACITY (16)) are handled through the ILLEGAL REQUEST they answer with; only transport-level
// failures end a scan.
//
// The scan goes in four steps, each sending its command for every target or LUN at once:
// REPORT LUNS; INQUIRY; the VPD page list; then the identification and limits pages, MODE
// SENSE and READ CAPACITY together. A command that simply succeeds is parsed where its step
// completes; anything else (retries, longer reads, older commands) continues on its own.

import { DEFAULT_RETRY_POLICY, executeAll, isIllegalRequest, type RetryPolicy, runCommand, succeeded } from './command.js';
import { DeviceError, InitiatorError, VirtioResponse, VirtioResponseError } from './errors.js';
import { type CommandExecutor, type CommandResult, Rejected, type ScsiCommand } from './queue.js';
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

/**
 * Data-in bytes each LUN's prober keeps for the commands it sends together (five VPD pages,
 * MODE SENSE, READ CAPACITY), each at its own offset.
 */
const SCRATCH_BYTES = 2048;
/** Offset step between the commands of one wave in a prober's scratch. */
const SCRATCH_STEP = 256;
/** DMA memory is taken for this many probers at a time. */
const SCRATCH_SLAB_PROBERS = 64;

/**
 * The CDBs a scan sends, built once: every LUN gets the same bytes, and nothing writes to a
 * CDB once built (the queue copies it into its submission record).
 */
const CDB = {
  inquiry: inquiry({ allocationLength: INQUIRY_LENGTH }),
  reportLuns: reportLuns(REPORT_LUNS_FIRST_LENGTH),
  modeSense6: modeSense6({ page: ModePage.CACHING, dbd: true, allocationLength: 0xff }),
  readCapacity16: readCapacity16(32),
  readCapacity10: readCapacity10(),
};
const MODE_SENSE_LENGTH = 0xff;
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
  take(): Uint8Array | undefined {
    if (this.slab === undefined || this.used === this.slab.length) {
      try {
        this.slab = this.alloc(SCRATCH_BYTES * SCRATCH_SLAB_PROBERS);
      } catch {
        return undefined;
      }
      this.used = 0;
    }
    this.used += SCRATCH_BYTES;
    return new Uint8Array(this.slab.buffer, this.slab.byteOffset + this.used - SCRATCH_BYTES, SCRATCH_BYTES);
  }
}

/** What a command sent in a wave came back with: its completion, or why it has none. */
type First = CommandResult | Rejected;

/** A command sent in a wave, and its first completion. */
interface Sent {
  cmd: ScsiCommand;
  first: First;
}

function ok(first: First): first is CommandResult {
  return !(first instanceof Rejected) && succeeded(first);
}

/** The bytes the device wrote: the residual is what SAM and Linux go by; claims beyond it are ignored. */
function received(cmd: ScsiCommand, r: CommandResult): Uint8Array {
  const buf = cmd.dataIn!;
  return buf.subarray(0, buf.length - Math.min(r.residual, buf.length));
}

/**
 * Commands sent together (one step of every LUN at once), each with what its first completion
 * leads to: the scan costs one promise per step of all LUNs, not one per command.
 */
class Wave {
  private readonly cmds: ScsiCommand[] = [];
  private readonly takers: Array<(first: First) => void> = [];

  add(cmd: ScsiCommand, take: (first: First) => void): void {
    this.cmds.push(cmd);
    this.takers.push(take);
  }

  async run(exec: CommandExecutor): Promise<void> {
    if (this.cmds.length === 0) return;
    const firsts = await executeAll(exec, this.cmds);
    for (let i = 0; i < firsts.length; i++) this.takers[i]!(firsts[i]!);
  }
}

/** INQUIRY data, or undefined when no logical unit is at this address. */
function present(inq: StandardInquiry): StandardInquiry | undefined {
  // Qualifier 1 (capable, not connected) and 3 (not capable) both mean nothing is here now.
  return inq.peripheralQualifier !== 0 || inq.deviceType === DEVICE_TYPE_NONE ? undefined : inq;
}

function cachingOf(sense: { pages: Map<number, Uint8Array> }): CachingPage | undefined {
  const page = sense.pages.get(modePageKey(ModePage.CACHING));
  return page ? parseCachingPage(page) : undefined;
}

/**
 * One logical unit (or, for REPORT LUNS, one target) being examined. Every step has a fast
 * path, taken when the command simply succeeded and its data parses, and a slow one that
 * starts from the same completion and knows every exception: retries, longer reads, older
 * commands, refusals.
 */
class LunProber {
  readonly device: string;
  private readonly policy: Readonly<RetryPolicy>;
  /** Where the commands of this prober's waves land (their own offsets); parsers copy what they keep. */
  private readonly scratch: Uint8Array | undefined;
  /** The first error that concerns this LUN: its examination stops there. */
  failed = false;
  error: unknown;
  /** Slow paths the last wave started. */
  private pending: Array<Promise<void>> = [];

  inquiry: StandardInquiry | undefined;
  result: ScannedLun | undefined;
  luns: number[] | undefined;

  constructor(
    private readonly exec: CommandExecutor,
    readonly target: number,
    readonly lun: number,
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

  /** Runs what a completion leads to; what it throws, now or later, is this LUN's failure. */
  private step(work: () => unknown): void {
    try {
      const p = work();
      if (p instanceof Promise) this.pending.push(p.then(undefined, (e: unknown) => this.fail(e)));
    } catch (e) {
      this.fail(e);
    }
  }

  private fail(e: unknown): void {
    if (this.failed) return;
    this.failed = true;
    this.error = e;
  }

  /** The slow paths the last wave started, once all have ended (they never reject). */
  settled(): Promise<unknown> | undefined {
    if (this.pending.length === 0) return undefined;
    const all = Promise.all(this.pending);
    this.pending = [];
    return all;
  }

  /** A data-in command of a wave, on the scratch at `offset` when there is one. */
  private waveCmd(cdb: Uint8Array, length: number, offset: number): ScsiCommand {
    // Plain Uint8Array views: Buffer's own subarray and fill cost more, and run for every command.
    const s = this.scratch;
    const dataIn =
      s !== undefined && offset + length <= s.length ? new Uint8Array(s.buffer, s.byteOffset + offset, length).fill(0) : new Uint8Array(length);
    return { target: this.target, lun: this.lun, cdb, dataIn, signal: this.opts.signal };
  }

  /**
   * Sends a data-in command in `w`; its data goes to `fast`, and when the command did not
   * simply succeed or `fast` throws, the completion goes to `slow`. `done` gets the value.
   */
  private send<T>(
    w: Wave,
    cdb: Uint8Array,
    length: number,
    offset: number,
    fast: (data: Uint8Array) => T,
    slow: (sent: Sent) => Promise<T>,
    done: (value: T) => void,
  ): void {
    const cmd = this.waveCmd(cdb, length, offset);
    w.add(cmd, (first) =>
      this.step(() => {
        if (ok(first)) {
          let value: T;
          try {
            value = fast(received(cmd, first));
          } catch {
            // The slow path meets the same data and knows what to do about it.
            return slow({ cmd, first }).then(done);
          }
          done(value);
          return undefined;
        }
        return slow({ cmd, first }).then(done);
      }),
    );
  }

  /** A follow-up command (a retry's data is the first's): data-in bytes, after retries. */
  private dataIn(cdb: Uint8Array, length: number, sent?: Sent): Promise<Uint8Array> {
    if (sent !== undefined) return this.dataFrom(sent);
    const cmd: ScsiCommand = { target: this.target, lun: this.lun, cdb, dataIn: new Uint8Array(length), signal: this.opts.signal };
    return this.exec.execute(cmd).then((r) => this.dataFrom({ cmd, first: r }));
  }

  /** Data of a sent command from its first completion, through the retries when it failed. */
  private dataFrom({ cmd, first }: Sent): Promise<Uint8Array> {
    if (first instanceof Rejected) return Promise.reject(first.reason);
    const r = succeeded(first) ? Promise.resolve(first) : runCommand(this.exec, cmd, { device: this.device, policy: this.policy }, first);
    return r.then((res) => received(cmd, res));
  }

  private noData(cdb: Uint8Array): Promise<CommandResult> {
    const cmd: ScsiCommand = { target: this.target, lun: this.lun, cdb, signal: this.opts.signal };
    return this.exec.execute(cmd).then((r) => (succeeded(r) ? r : runCommand(this.exec, cmd, { device: this.device, policy: this.policy }, r)));
  }

  /**
   * Parses data read with allocation length `alloc`, and reissues the command with the length
   * the data says it needs when the first was too short.
   */
  private parseOrGrow<T>(build: (alloc: number) => Uint8Array, alloc: number, max: number, parse: (d: Uint8Array) => T, data: Uint8Array, attempt: number): T | Promise<T> {
    try {
      return parse(data);
    } catch (e) {
      // Only a truncation the allocation length caused is worth another round.
      if (e instanceof TruncatedDataError && data.length === alloc && e.needed > alloc && e.needed <= max && attempt < MAX_REGROW) {
        return this.dataIn(build(e.needed), e.needed).then((d) => this.parseOrGrow(build, e.needed, max, parse, d, attempt + 1));
      }
      throw e;
    }
  }

  /** A VPD page (from a sent INQUIRY, or asked for now); undefined when the unit refuses it. */
  private optionalVpd<T>(page: number, parse: (d: Uint8Array) => T, sent?: Sent): Promise<T | undefined> {
    const build = (alloc: number): Uint8Array => vpdCdb(page, alloc);
    return this.dataIn(build(VPD_FIRST_LENGTH), VPD_FIRST_LENGTH, sent)
      .then((d) => this.parseOrGrow(build, VPD_FIRST_LENGTH, 0xffff, parse, d, 0))
      .catch((e: unknown) => {
        if (isIllegalRequest(e)) return undefined;
        throw e;
      });
  }

  // Step 0, on LUN 0 of each target: REPORT LUNS.

  sendReportLuns(w: Wave): void {
    const limit = Math.min(this.opts.maxLun, MAX_VIRTIO_LUN);
    const fast = (d: Uint8Array): number[] => {
      const luns = parseReportLuns(d);
      // The usual answer (distinct, ascending, in range) is taken as it is.
      for (let i = 0; i < luns.length; i++) {
        if (luns[i]! > limit || (i > 0 && luns[i]! <= luns[i - 1]!)) throw new RangeError('not in order');
      }
      return luns;
    };
    this.send(w, CDB.reportLuns, REPORT_LUNS_FIRST_LENGTH, 0, fast, (s) => this.reportLuns(s, limit), (luns) => {
      this.luns = luns;
    });
  }

  /** The LUNs a target reports, in order; [] when the target is absent (virtio BAD_TARGET). */
  private async reportLuns(sent: Sent, limit: number): Promise<number[]> {
    let luns: number[];
    try {
      const data = await this.dataFrom(sent);
      luns = await this.parseOrGrow((alloc) => reportLuns(alloc), REPORT_LUNS_FIRST_LENGTH, 0xffffffff, parseReportLuns, data, 0);
    } catch (e) {
      if (e instanceof VirtioResponseError && e.response === VirtioResponse.BAD_TARGET) return [];
      // A target without REPORT LUNS (or one whose answer makes no sense): probe LUN 0 alone.
      if (e instanceof ScsiError || e instanceof ScsiDataError) return [0];
      throw e;
    }
    return [...new Set(luns)].filter((l) => l <= limit).sort((a, b) => a - b);
  }

  // Step 1: INQUIRY.

  sendInquiry(w: Wave): void {
    this.send(w, CDB.inquiry, INQUIRY_LENGTH, 0, (d) => present(parseInquiry(d)), (s) => this.standardInquiry(s), (inq) => {
      this.inquiry = inq;
    });
  }

  /** INQUIRY; undefined when no logical unit answers at this address. */
  private async standardInquiry(sent: Sent): Promise<StandardInquiry | undefined> {
    let data: Uint8Array;
    try {
      data = await this.dataFrom(sent);
    } catch (e) {
      if (e instanceof VirtioResponseError && e.response === VirtioResponse.INCORRECT_LUN) return undefined;
      throw e;
    }
    return present(parseInquiry(data));
  }

  // Step 2: the VPD pages the unit has.

  sendVpdList(w: Wave): void {
    const inq = this.inquiry!;
    this.send(w, vpdCdb(VpdPage.SUPPORTED_PAGES, VPD_FIRST_LENGTH), VPD_FIRST_LENGTH, 0, parseVpdSupportedPages, (s) => this.optionalVpd(VpdPage.SUPPORTED_PAGES, parseVpdSupportedPages, s), (pages) => {
      this.result = {
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
        // No VPD support at all (an SPC-2 style target) leaves the list empty.
        vpdPages: pages ?? [],
        ready: false,
      };
    });
  }

  // Step 3: identification, limits, caching and capacity, all at once.

  sendDetails(w: Wave): void {
    const lun = this.result!;
    const pages = lun.vpdPages;
    let offset = 0;
    const vpd = <T>(page: number, parse: (d: Uint8Array) => T, done: (v: T) => void): void => {
      if (!pages.includes(page)) return;
      this.send(w, vpdCdb(page, VPD_FIRST_LENGTH), VPD_FIRST_LENGTH, offset, parse, (s) => this.optionalVpd(page, parse, s), (v) => {
        if (v !== undefined) done(v);
      });
      offset += SCRATCH_STEP;
    };
    vpd(VpdPage.UNIT_SERIAL_NUMBER, parseVpdSerial, (v) => (lun.serial = v));
    vpd(VpdPage.DEVICE_IDENTIFICATION, parseVpdDeviceId, (v) => (lun.identifiers = v));
    if (lun.deviceType !== DEVICE_TYPE_DISK) return;
    vpd(VpdPage.BLOCK_LIMITS, parseVpdBlockLimits, (v) => (lun.blockLimits = v));
    vpd(VpdPage.BLOCK_DEVICE_CHARACTERISTICS, parseVpdBlockCharacteristics, (v) => (lun.characteristics = v));
    vpd(VpdPage.LOGICAL_BLOCK_PROVISIONING, parseVpdLogicalBlockProvisioning, (v) => (lun.provisioning = v));
    this.send(w, CDB.modeSense6, MODE_SENSE_LENGTH, offset, (d) => cachingOf(parseModeSense6(d)), (s) => this.cachingPage(s), (page) => {
      if (page) lun.caching = page;
    });
    offset += SCRATCH_STEP;
    // SPC-3 and later devices are asked READ CAPACITY (16) first, as Linux's sd does: one
    // command reports everything (sizes past 2 TiB, protection, thin provisioning).
    const first16 = lun.inquiry.version >= SPC3_VERSION;
    const state = (s: Pick<ScannedLun, 'ready' | 'geometry' | 'problem'>): void => {
      lun.ready = s.ready;
      if (s.geometry !== undefined) lun.geometry = s.geometry;
      if (s.problem !== undefined) lun.problem = s.problem;
    };
    this.send(
      w,
      first16 ? CDB.readCapacity16 : CDB.readCapacity10,
      first16 ? 32 : 8,
      offset,
      // The old-device path (READ CAPACITY (10) first, maybe (16) after) is always the slow one.
      (d) => {
        if (!first16) throw new RangeError('READ CAPACITY (10) first');
        return { ready: true, geometry: this.geometry(parseReadCapacity16(d), undefined) };
      },
      (s) => this.readiness(lun.inquiry, pages, s),
      state,
    );
  }

  /**
   * The caching mode page (MODE SENSE(6), else (10)); undefined when the unit has neither or
   * does not report the page, which is common and not a problem.
   */
  private async cachingPage(sent: Sent): Promise<CachingPage | undefined> {
    try {
      return cachingOf(parseModeSense6(await this.dataFrom(sent)));
    } catch (e) {
      if (isFatal(e, this.opts.signal)) throw e;
      if (!isIllegalRequest(e)) return undefined;
    }
    try {
      const args = { page: ModePage.CACHING, dbd: true, allocationLength: MODE_SENSE_LENGTH };
      return cachingOf(parseModeSense10(await this.dataIn(modeSense10(args), MODE_SENSE_LENGTH)));
    } catch (e) {
      if (isFatal(e, this.opts.signal)) throw e;
      return undefined;
    }
  }

  /**
   * READ CAPACITY, which also tells whether the unit is ready: a unit that is not answers it
   * with NOT READY, as it would TEST UNIT READY (so that command is not sent as well). A unit
   * that asks for an initializing command is started (START STOP UNIT, as SBC-3 says) and asked
   * again. `sent` is the first READ CAPACITY, when it was sent already.
   */
  async readiness(inq: StandardInquiry, vpdPages: readonly number[], sent?: Sent): Promise<Pick<ScannedLun, 'ready' | 'geometry' | 'problem'>> {
    let started = false;
    for (;;) {
      try {
        return { ready: true, geometry: await this.capacity(inq, vpdPages, sent) };
      } catch (e) {
        if (isFatal(e, this.opts.signal)) throw e;
        if (e instanceof ScsiError && e.key === SenseKey.NOT_READY) {
          if (e.asc === 0x04 && e.ascq === 0x02 && !started) {
            started = true;
            sent = undefined;
            await this.noData(startStopUnit({ start: true }));
            continue;
          }
          return { ready: false, problem: `not ready: ${e.message}` };
        }
        return { ready: true, problem: e instanceof Error ? e.message : String(e) };
      }
    }
  }

  /** READ CAPACITY (16) and/or (10), as the device supports them. */
  async capacity(inq: StandardInquiry, vpdPages: readonly number[], sent?: Sent): Promise<Geometry> {
    // The first command asked is the one `sent` is the answer to.
    let first = sent;
    const read = (cdb: Uint8Array, length: number): Promise<Uint8Array> => {
      const s = first;
      first = undefined;
      return this.dataIn(cdb, length, s);
    };
    let rc16: Capacity16 | undefined;
    let refused16: ScsiError | undefined;
    const try16 = async (): Promise<void> => {
      try {
        rc16 = parseReadCapacity16(await read(CDB.readCapacity16, 32));
      } catch (e) {
        if (!isIllegalRequest(e)) throw e;
        refused16 = e;
      }
    };
    const first16 = inq.version >= SPC3_VERSION;
    if (first16) await try16();
    let rc10: ReturnType<typeof parseReadCapacity10> | undefined;
    if (rc16 === undefined) {
      try {
        rc10 = parseReadCapacity10(await read(CDB.readCapacity10, 8));
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
    return this.geometry(rc16, rc10);
  }

  private geometry(rc16: Capacity16 | undefined, rc10: ReturnType<typeof parseReadCapacity10> | undefined): Geometry {
    const blockSize = rc16?.blockSize ?? rc10?.blockSize ?? 0;
    const blockCount = rc16 !== undefined ? rc16.lastLba + 1n : BigInt((rc10?.lastLba ?? -1) + 1);
    if (blockSize === 0) throw new DeviceError(`${this.device}: READ CAPACITY reports a block size of 0`);
    const geometry: Geometry = { blockSize, blockCount };
    if (rc16) geometry.capacity16 = rc16;
    return geometry;
  }
}

/**
 * Sends one step of every prober still going, at once, and waits for all that it leads to.
 * False when the scan must stop (aborted, or the controller is gone).
 */
async function runStep(exec: CommandExecutor, probers: readonly LunProber[], send: (p: LunProber, w: Wave) => void, signal: AbortSignal | undefined): Promise<boolean> {
  const w = new Wave();
  for (let i = 0; i < probers.length; i++) if (!probers[i]!.failed) send(probers[i]!, w);
  await w.run(exec);
  const slow: Array<Promise<unknown>> = [];
  for (let i = 0; i < probers.length; i++) {
    const s = probers[i]!.settled();
    if (s !== undefined) slow.push(s);
  }
  if (slow.length > 0) await Promise.all(slow);
  return !signal?.aborted && !probers.some((p) => p.failed && isFatal(p.error, signal));
}

/** Scans every target of a controller; LUNs come back ordered by target, then LUN. */
export async function scanTargets(exec: CommandExecutor, opts: ScanOptions): Promise<ScanResult> {
  if (!Number.isInteger(opts.maxTarget) || opts.maxTarget < 0 || opts.maxTarget > 255) {
    throw new RangeError(`maxTarget ${String(opts.maxTarget)} out of range 0..255`);
  }
  const targets = opts.targets ?? Array.from({ length: opts.maxTarget + 1 }, (_, i) => i);
  const problems: ScanProblem[] = [];
  // Each step waits for all commands it started, so no command of this scan is left running.
  const note = (p: LunProber, lun: number | undefined): void => {
    if (!p.failed) return;
    if (isFatal(p.error, opts.signal)) throw p.error;
    const error = p.error instanceof Error ? p.error : new Error(String(p.error));
    problems.push(lun === undefined ? { target: p.target, error } : { target: p.target, lun, error });
  };
  const slabs = opts.allocBuffer ? new ScratchSlabs(opts.allocBuffer) : undefined;
  const signal = opts.signal;

  const reporters = targets.map((t) => new LunProber(exec, t, 0, opts, slabs));
  let going = await runStep(exec, reporters, (p, w) => p.sendReportLuns(w), signal);
  const probers: LunProber[] = [];
  for (const r of reporters) {
    for (const lun of r.failed ? [] : r.luns!) probers.push(new LunProber(exec, r.target, lun, opts, slabs));
  }
  if (going) going = await runStep(exec, probers, (p, w) => p.sendInquiry(w), signal);
  const found = probers.filter((p) => p.failed || p.inquiry !== undefined);
  if (going) going = await runStep(exec, found, (p, w) => p.sendVpdList(w), signal);
  if (going) await runStep(exec, found, (p, w) => p.sendDetails(w), signal);
  signal?.throwIfAborted();

  for (const r of reporters) note(r, undefined);
  for (const p of found) note(p, p.lun);
  return { luns: found.filter((p) => !p.failed).map((p) => p.result!), problems };
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
