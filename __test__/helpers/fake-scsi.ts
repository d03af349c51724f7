// A small scripted SCSI target behind the CommandExecutor interface, for unit tests of the scan
// and block-device logic against targets that implement less than the bundled one: no REPORT
// LUNS, no VPD pages, no READ CAPACITY (16), no WRITE SAME, units that need starting, and
// pending unit attentions. Data commands work on an in-memory image.
import { type CommandResult, countTransfer, type IoQueue, type ScsiCommand, type TransferOwner } from '../../ts/queue.js';
import { read as readCdb, write as writeCdb } from '../../ts/scsi/cdb.js';

export interface FakeLun {
  /** Peripheral device type (default 0, disk). */
  type?: number;
  /** INQUIRY VERSION (default 5, SPC-3; 2 is SCSI-2). */
  version?: number;
  blockSize?: number;
  blocks?: bigint;
  vpd?: boolean;
  rc10?: boolean;
  rc16?: boolean;
  writeSame?: boolean;
  /** Unit attentions TEST UNIT READY reports before it passes. */
  unitAttentions?: number;
  /** NOT READY, initializing command required, until START STOP UNIT. */
  needsStart?: boolean;
  /** NOT READY with this ASC/ASCQ, always. */
  stuck?: [number, number];
  serial?: string;
  /** Most blocks per READ/WRITE (VPD 0xB0). */
  maxTransfer?: number;
  /** Thin provisioning: VPD 0xB2 with UNMAP and WRITE SAME (16) UNMAP, LBPRZ. */
  unmap?: boolean;
  /** VPD 0xB0 limits for UNMAP and WRITE SAME. */
  maxUnmapBlocks?: number;
  maxUnmapDescriptors?: number;
  maxWriteSame?: number;
}

export interface FakeTarget {
  reportLuns?: boolean;
  luns: Record<number, FakeLun>;
}

export interface LoggedCommand {
  target: number;
  lun: number;
  op: number;
  cdb: Uint8Array;
}

const GOOD: CommandResult = { response: 0, status: 0, residual: 0, dataLength: 0, latencyNs: 0 };

function checkCondition(key: number, asc: number, ascq: number): CommandResult {
  const sense = new Uint8Array(18);
  sense[0] = 0x70;
  sense[2] = key;
  sense[7] = 10;
  sense[12] = asc;
  sense[13] = ascq;
  return { response: 0, status: 2, sense, residual: 0, dataLength: 0, latencyNs: 0 };
}

const illegal = (asc = 0x20): CommandResult => checkCondition(5, asc, 0);

function send(cmd: ScsiCommand, data: Uint8Array): CommandResult {
  const buf = cmd.dataIn ?? new Uint8Array(0);
  const n = Math.min(buf.length, data.length);
  buf.set(data.subarray(0, n));
  return { ...GOOD, residual: buf.length - n, dataLength: n };
}

function be(bytes: number, value: bigint | number): Uint8Array {
  const out = new Uint8Array(bytes);
  let v = BigInt(value);
  for (let i = bytes - 1; i >= 0; i--) {
    out[i] = Number(v & 0xffn);
    v >>= 8n;
  }
  return out;
}

class Unit {
  readonly blockSize: number;
  readonly blocks: bigint;
  started = false;
  ua: number;
  readonly image = new Map<bigint, Uint8Array>();

  constructor(readonly spec: FakeLun) {
    this.blockSize = spec.blockSize ?? 512;
    this.blocks = spec.blocks ?? 2048n;
    this.ua = spec.unitAttentions ?? 0;
  }

  block(lba: bigint): Uint8Array {
    return this.image.get(lba) ?? new Uint8Array(this.blockSize);
  }
}

/** TEST UNIT READY, READ CAPACITY (10) and (16), READ and WRITE (10) and (16). */
const MEDIUM_ACCESS = new Set([0x00, 0x25, 0x9e, 0x28, 0x88, 0x2a, 0x8a]);

export class FakeScsiTarget implements IoQueue {
  readonly log: LoggedCommand[] = [];
  private readonly units = new Map<string, Unit>();

  constructor(private readonly targets: Record<number, FakeTarget>) {
    for (const [t, target] of Object.entries(targets)) {
      for (const [l, spec] of Object.entries(target.luns)) this.units.set(`${t}:${l}`, new Unit(spec));
    }
  }

  unit(target: number, lun: number): Unit {
    const u = this.units.get(`${target}:${lun}`);
    if (!u) throw new Error(`no unit ${target}:${lun}`);
    return u;
  }

  ops(op: number): LoggedCommand[] {
    return this.log.filter((c) => c.op === op);
  }

  /** A SCSI target takes no virtio-blk requests. */
  blockRequest(): Promise<CommandResult> {
    return Promise.reject(new Error('a SCSI target takes no virtio-blk requests'));
  }

  /** The queue's READ/WRITE fast path, on top of `execute`, with the same settling rules. */
  async transfer(
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
    const args = { lba, blocks, fua };
    const cmd: ScsiCommand = write
      ? { target, lun, cdb: writeCdb(args), dataOut: data }
      : { target, lun, cdb: readCdb(args), dataIn: data };
    if (signal) cmd.signal = signal;
    if (timeoutMs !== undefined) cmd.timeoutMs = timeoutMs;
    const r = await this.execute(cmd);
    if (r.response === 0 && r.status === 0 && (write || r.residual === 0)) {
      countTransfer(owner.counters, write, data.length, r.latencyNs);
      return value;
    }
    return owner.recover(r, cmd);
  }

  async execute(cmd: ScsiCommand): Promise<CommandResult> {
    await Promise.resolve();
    const cdb = cmd.cdb;
    const op = cdb[0]!;
    this.log.push({ target: cmd.target, lun: cmd.lun, op, cdb: Uint8Array.from(cdb) });
    const target = this.targets[cmd.target];
    if (!target) return { ...GOOD, response: 3 };
    const unit = this.units.get(`${cmd.target}:${cmd.lun}`);
    if (op === 0xa0) {
      if (!target.reportLuns) return illegal();
      const luns = Object.keys(target.luns).map(Number);
      const data = new Uint8Array(8 + 8 * luns.length);
      data.set(be(4, 8 * luns.length), 0);
      luns.forEach((l, i) => data.set(be(2, l < 256 ? l : 0x4000 | l), 8 + 8 * i));
      return send(cmd, data);
    }
    if (op === 0x12) return this.inquiry(cmd, unit);
    if (!unit) return checkCondition(5, 0x25, 0);
    const spec = unit.spec;
    // As a device does: a pending UNIT ATTENTION is reported on any command but INQUIRY and
    // REPORT LUNS, and a unit that is not ready refuses commands that need the medium.
    if (unit.ua > 0) {
      unit.ua--;
      return checkCondition(6, 0x29, 0);
    }
    if (MEDIUM_ACCESS.has(op)) {
      if (spec.stuck) return checkCondition(2, spec.stuck[0], spec.stuck[1]);
      if (spec.needsStart && !unit.started) return checkCondition(2, 0x04, 0x02);
    }
    switch (op) {
      case 0x00:
        return GOOD;
      case 0x1b:
        unit.started = (cdb[4]! & 1) === 1;
        return GOOD;
      case 0x25: {
        if (spec.rc10 === false) return illegal();
        const last = unit.blocks - 1n > 0xffffffffn ? 0xffffffffn : unit.blocks - 1n;
        return send(cmd, new Uint8Array([...be(4, last), ...be(4, unit.blockSize)]));
      }
      case 0x9e: {
        if (!spec.rc16) return illegal();
        const data = new Uint8Array(32);
        data.set(be(8, unit.blocks - 1n), 0);
        data.set(be(4, unit.blockSize), 8);
        return send(cmd, data);
      }
      case 0x28:
      case 0x88:
      case 0x2a:
      case 0x8a:
        return this.rw(cmd, unit);
      case 0x93: {
        if (!spec.writeSame) return illegal();
        const dv = new DataView(cdb.buffer, cdb.byteOffset, cdb.byteLength);
        const lba = dv.getBigUint64(2);
        const blocks = dv.getUint32(10);
        if (spec.maxWriteSame && blocks > spec.maxWriteSame) return illegal(0x24);
        const block = cmd.dataOut!.subarray(0, unit.blockSize);
        for (let i = 0n; i < BigInt(blocks); i++) unit.image.set(lba + i, Uint8Array.from(block));
        return GOOD;
      }
      case 0x42: {
        if (!spec.unmap) return illegal();
        const list = cmd.dataOut!;
        const dv = new DataView(list.buffer, list.byteOffset, list.byteLength);
        const count = (list.length - 8) / 16;
        if (spec.maxUnmapDescriptors && count > spec.maxUnmapDescriptors) return illegal(0x26);
        for (let i = 0; i < count; i++) {
          const lba = dv.getBigUint64(8 + 16 * i);
          const blocks = dv.getUint32(16 + 16 * i);
          if (spec.maxUnmapBlocks && blocks > spec.maxUnmapBlocks) return illegal(0x26);
          for (let b = 0n; b < BigInt(blocks); b++) unit.image.delete(lba + b);
        }
        return GOOD;
      }
      default:
        return illegal();
    }
  }

  private inquiry(cmd: ScsiCommand, unit: Unit | undefined): CommandResult {
    const cdb = cmd.cdb;
    if ((cdb[1]! & 1) === 0) {
      const data = new Uint8Array(36).fill(0x20);
      data.fill(0, 0, 8);
      data[0] = unit ? (unit.spec.type ?? 0) : 0x7f;
      data[2] = unit?.spec.version ?? 5;
      data[3] = 2;
      data[4] = 31;
      data.set(Buffer.from('FAKE    TINY DISK       0042', 'latin1'), 8);
      return send(cmd, data);
    }
    if (!unit || !unit.spec.vpd) return illegal(0x24);
    const page = cdb[2]!;
    const pages = unit.spec.unmap ? [0x00, 0x80, 0xb0, 0xb2] : [0x00, 0x80, 0xb0];
    let body: Uint8Array;
    if (page === 0x00) body = Uint8Array.from(pages);
    else if (page === 0x80) body = Buffer.from(unit.spec.serial ?? 'SERIAL', 'latin1');
    else if (page === 0xb0) {
      // Offsets are page offsets minus the 4-byte header.
      body = new Uint8Array(0x3c);
      body.set(be(4, unit.spec.maxTransfer ?? 0), 4);
      body.set(be(4, unit.spec.maxUnmapBlocks ?? 0), 16);
      body.set(be(4, unit.spec.maxUnmapDescriptors ?? 0), 20);
      body.set(be(8, unit.spec.maxWriteSame ?? 0), 32);
    } else if (page === 0xb2 && unit.spec.unmap) {
      body = Uint8Array.from([0, 0x80 | 0x40 | 0x04, 2, 0]);
    } else return illegal(0x24);
    return send(cmd, new Uint8Array([unit.spec.type ?? 0, page, ...be(2, body.length), ...body]));
  }

  private rw(cmd: ScsiCommand, unit: Unit): CommandResult {
    const cdb = cmd.cdb;
    const long = cdb[0] === 0x88 || cdb[0] === 0x8a;
    const dv = new DataView(cdb.buffer, cdb.byteOffset, cdb.byteLength);
    const lba = long ? dv.getBigUint64(2) : BigInt(dv.getUint32(2));
    const blocks = long ? dv.getUint32(10) : dv.getUint16(7);
    if (unit.spec.maxTransfer && blocks > unit.spec.maxTransfer) return illegal(0x24);
    if (lba + BigInt(blocks) > unit.blocks) return illegal(0x21);
    const bs = unit.blockSize;
    if (cdb[0] === 0x28 || cdb[0] === 0x88) {
      const out = cmd.dataIn!;
      for (let i = 0; i < blocks; i++) out.set(unit.block(lba + BigInt(i)), i * bs);
      return { ...GOOD, residual: out.length - blocks * bs, dataLength: blocks * bs };
    }
    const src = cmd.dataOut!;
    for (let i = 0; i < blocks; i++) unit.image.set(lba + BigInt(i), Uint8Array.from(src.subarray(i * bs, (i + 1) * bs)));
    return GOOD;
  }
}
