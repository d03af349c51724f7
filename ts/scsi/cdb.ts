// CDB builders for the SPC-4 / SBC-3 commands a block initiator issues. Every builder returns a
// fresh Uint8Array of the command's fixed length; CONTROL bytes and group numbers are left zero.

import { checkBig, checkUint, dataView, hex, type Lba } from './util.js';

export const Opcode = {
  TEST_UNIT_READY: 0x00,
  REQUEST_SENSE: 0x03,
  INQUIRY: 0x12,
  MODE_SELECT_6: 0x15,
  MODE_SENSE_6: 0x1a,
  START_STOP_UNIT: 0x1b,
  PREVENT_ALLOW_MEDIUM_REMOVAL: 0x1e,
  READ_CAPACITY_10: 0x25,
  READ_10: 0x28,
  WRITE_10: 0x2a,
  VERIFY_10: 0x2f,
  SYNCHRONIZE_CACHE_10: 0x35,
  WRITE_SAME_10: 0x41,
  UNMAP: 0x42,
  MODE_SELECT_10: 0x55,
  MODE_SENSE_10: 0x5a,
  READ_16: 0x88,
  WRITE_16: 0x8a,
  VERIFY_16: 0x8f,
  SYNCHRONIZE_CACHE_16: 0x91,
  WRITE_SAME_16: 0x93,
  SERVICE_ACTION_IN_16: 0x9e,
  REPORT_LUNS: 0xa0,
  MAINTENANCE_IN: 0xa3,
} as const;

/** SERVICE ACTION IN (16) service action for READ CAPACITY (16). */
export const SAI_READ_CAPACITY_16 = 0x10;

/** Mode page control (MODE SENSE byte 2, bits 7:6). */
export const PageControl = { CURRENT: 0, CHANGEABLE: 1, DEFAULT: 2, SAVED: 3 } as const;

const U16 = 0xffff;
const U32 = 0xffffffff;

export interface InquiryArgs {
  /** Ask for a VPD page. Defaults to true when `page` is given. */
  evpd?: boolean;
  page?: number;
  allocationLength: number;
}

export function inquiry(args: InquiryArgs): Uint8Array {
  const page = checkUint(args.page ?? 0, 'page', 0xff);
  const evpd = args.evpd ?? args.page !== undefined;
  // SPC-4: with EVPD clear the PAGE CODE field must be zero.
  if (!evpd && page !== 0) throw new RangeError(`page ${hex(page)} requires evpd`);
  const cdb = new Uint8Array(6);
  cdb[0] = Opcode.INQUIRY;
  cdb[1] = evpd ? 0x01 : 0;
  cdb[2] = page;
  dataView(cdb).setUint16(3, checkUint(args.allocationLength, 'allocationLength', U16));
  return cdb;
}

export function testUnitReady(): Uint8Array {
  return new Uint8Array(6);
}

export interface StartStopArgs {
  start: boolean;
  /** Load (with start) or eject (without) the medium. */
  loej?: boolean;
  /** Return status before the operation completes. */
  immed?: boolean;
}

export function startStopUnit(args: StartStopArgs): Uint8Array {
  const cdb = new Uint8Array(6);
  cdb[0] = Opcode.START_STOP_UNIT;
  cdb[1] = args.immed ? 0x01 : 0;
  cdb[4] = (args.loej ? 0x02 : 0) | (args.start ? 0x01 : 0);
  return cdb;
}

/** REQUEST SENSE; `desc` asks for descriptor-format sense data. */
export function requestSense(allocationLength: number, desc = false): Uint8Array {
  const cdb = new Uint8Array(6);
  cdb[0] = Opcode.REQUEST_SENSE;
  cdb[1] = desc ? 0x01 : 0;
  cdb[4] = checkUint(allocationLength, 'allocationLength', 0xff);
  return cdb;
}

/** REPORT LUNS. SPC-4 lets a device server reject allocation lengths below 16. */
export function reportLuns(allocationLength: number, selectReport = 0): Uint8Array {
  const alloc = checkUint(allocationLength, 'allocationLength', U32);
  if (alloc < 16) throw new RangeError(`allocationLength ${alloc} below the minimum of 16`);
  const cdb = new Uint8Array(12);
  cdb[0] = Opcode.REPORT_LUNS;
  cdb[2] = checkUint(selectReport, 'selectReport', 0xff);
  dataView(cdb).setUint32(6, alloc);
  return cdb;
}

export function readCapacity10(): Uint8Array {
  const cdb = new Uint8Array(10);
  cdb[0] = Opcode.READ_CAPACITY_10;
  return cdb;
}

export function readCapacity16(allocationLength: number): Uint8Array {
  const cdb = new Uint8Array(16);
  cdb[0] = Opcode.SERVICE_ACTION_IN_16;
  cdb[1] = SAI_READ_CAPACITY_16;
  dataView(cdb).setUint32(10, checkUint(allocationLength, 'allocationLength', U32));
  return cdb;
}

export interface RwArgs {
  lba: Lba;
  blocks: number;
  /** Force unit access: bypass the volatile write cache. */
  fua?: boolean;
}

function rw10(opcode: number, args: RwArgs): Uint8Array {
  const cdb = new Uint8Array(10);
  const dv = dataView(cdb);
  cdb[0] = opcode;
  cdb[1] = args.fua ? 0x08 : 0;
  dv.setUint32(2, Number(checkBig(args.lba, 'lba', 32)));
  dv.setUint16(7, checkUint(args.blocks, 'blocks', U16));
  return cdb;
}

function rw16(opcode: number, args: RwArgs): Uint8Array {
  const cdb = new Uint8Array(16);
  const dv = dataView(cdb);
  cdb[0] = opcode;
  cdb[1] = args.fua ? 0x08 : 0;
  dv.setBigUint64(2, checkBig(args.lba, 'lba', 64));
  dv.setUint32(10, checkUint(args.blocks, 'blocks', U32));
  return cdb;
}

export const read10 = (args: RwArgs): Uint8Array => rw10(Opcode.READ_10, args);
export const write10 = (args: RwArgs): Uint8Array => rw10(Opcode.WRITE_10, args);
export const read16 = (args: RwArgs): Uint8Array => rw16(Opcode.READ_16, args);
export const write16 = (args: RwArgs): Uint8Array => rw16(Opcode.WRITE_16, args);

/** True when the 10-byte READ/WRITE can carry this request (start LBA and length). */
export function fits10(lba: Lba, blocks: number): boolean {
  return checkBig(lba, 'lba', 64) <= BigInt(U32) && checkUint(blocks, 'blocks', U32) <= U16;
}

/** READ(10) when it can express the request, READ(16) otherwise. */
export function read(args: RwArgs): Uint8Array {
  return fits10(args.lba, args.blocks) ? read10(args) : read16(args);
}

/** WRITE(10) when it can express the request, WRITE(16) otherwise. */
export function write(args: RwArgs): Uint8Array {
  return fits10(args.lba, args.blocks) ? write10(args) : write16(args);
}

export interface SyncArgs {
  /** First block to flush; with `blocks` 0 (the default) the whole cache from here. */
  lba?: Lba;
  blocks?: number;
  immed?: boolean;
}

export function synchronizeCache10(args: SyncArgs = {}): Uint8Array {
  const cdb = new Uint8Array(10);
  const dv = dataView(cdb);
  cdb[0] = Opcode.SYNCHRONIZE_CACHE_10;
  cdb[1] = args.immed ? 0x02 : 0;
  dv.setUint32(2, Number(checkBig(args.lba ?? 0, 'lba', 32)));
  dv.setUint16(7, checkUint(args.blocks ?? 0, 'blocks', U16));
  return cdb;
}

export function synchronizeCache16(args: SyncArgs = {}): Uint8Array {
  const cdb = new Uint8Array(16);
  const dv = dataView(cdb);
  cdb[0] = Opcode.SYNCHRONIZE_CACHE_16;
  cdb[1] = args.immed ? 0x02 : 0;
  dv.setBigUint64(2, checkBig(args.lba ?? 0, 'lba', 64));
  dv.setUint32(10, checkUint(args.blocks ?? 0, 'blocks', U32));
  return cdb;
}

/** UNMAP(10); the data-out buffer comes from `unmapParameterList`. */
export function unmap(parameterListLength: number): Uint8Array {
  const len = checkUint(parameterListLength, 'parameterListLength', U16);
  // A non-empty list is an 8-byte header plus 16-byte descriptors (SBC-3 5.28.2).
  if (len !== 0 && (len < 24 || (len - 8) % 16 !== 0)) {
    throw new RangeError(`parameterListLength ${len} is not 8 + 16 * n`);
  }
  const cdb = new Uint8Array(10);
  cdb[0] = Opcode.UNMAP;
  dataView(cdb).setUint16(7, len);
  return cdb;
}

export interface BlockRange {
  lba: Lba;
  blocks: number;
}

/** Most descriptors whose list still fits the 16-bit PARAMETER LIST LENGTH. */
export const MAX_UNMAP_DESCRIPTORS = Math.floor((U16 - 8) / 16);

/** UNMAP parameter list: header plus one 16-byte block descriptor per range. */
export function unmapParameterList(ranges: readonly BlockRange[]): Uint8Array {
  if (ranges.length === 0) throw new RangeError('ranges must hold at least one range');
  if (ranges.length > MAX_UNMAP_DESCRIPTORS) {
    throw new RangeError(`ranges holds ${ranges.length} entries, at most ${MAX_UNMAP_DESCRIPTORS} fit`);
  }
  const out = new Uint8Array(8 + 16 * ranges.length);
  const dv = dataView(out);
  dv.setUint16(0, out.length - 2);
  dv.setUint16(2, out.length - 8);
  ranges.forEach((r, i) => {
    const off = 8 + 16 * i;
    dv.setBigUint64(off, checkBig(r.lba, `ranges[${i}].lba`, 64));
    dv.setUint32(off + 8, checkUint(r.blocks, `ranges[${i}].blocks`, U32));
  });
  return out;
}

export interface WriteSameArgs {
  lba: Lba;
  /** 0 asks the target to write from `lba` to the end of the medium. */
  blocks: number;
  /** Deallocate the blocks where the target can (thin provisioning). */
  unmap?: boolean;
  /** No data-out buffer: the target writes zeroes (SBC-4 NDOB). */
  ndob?: boolean;
}

export function writeSame16(args: WriteSameArgs): Uint8Array {
  const cdb = new Uint8Array(16);
  const dv = dataView(cdb);
  cdb[0] = Opcode.WRITE_SAME_16;
  cdb[1] = (args.unmap ? 0x08 : 0) | (args.ndob ? 0x01 : 0);
  dv.setBigUint64(2, checkBig(args.lba, 'lba', 64));
  dv.setUint32(10, checkUint(args.blocks, 'blocks', U32));
  return cdb;
}

export interface ModeSenseArgs {
  page: number;
  subpage?: number;
  /** Disable block descriptors. */
  dbd?: boolean;
  /** Page control, see `PageControl`. */
  pc?: number;
  allocationLength: number;
}

function modeSenseByte2(args: ModeSenseArgs): number {
  return (checkUint(args.pc ?? 0, 'pc', 3) << 6) | checkUint(args.page, 'page', 0x3f);
}

export function modeSense6(args: ModeSenseArgs): Uint8Array {
  const cdb = new Uint8Array(6);
  cdb[0] = Opcode.MODE_SENSE_6;
  cdb[1] = args.dbd ? 0x08 : 0;
  cdb[2] = modeSenseByte2(args);
  cdb[3] = checkUint(args.subpage ?? 0, 'subpage', 0xff);
  cdb[4] = checkUint(args.allocationLength, 'allocationLength', 0xff);
  return cdb;
}

export interface ModeSense10Args extends ModeSenseArgs {
  /** Accept 16-byte (long LBA) block descriptors. */
  llbaa?: boolean;
}

export function modeSense10(args: ModeSense10Args): Uint8Array {
  const cdb = new Uint8Array(10);
  cdb[0] = Opcode.MODE_SENSE_10;
  cdb[1] = (args.llbaa ? 0x10 : 0) | (args.dbd ? 0x08 : 0);
  cdb[2] = modeSenseByte2(args);
  cdb[3] = checkUint(args.subpage ?? 0, 'subpage', 0xff);
  dataView(cdb).setUint16(7, checkUint(args.allocationLength, 'allocationLength', U16));
  return cdb;
}

const OPCODE_NAMES: ReadonlyMap<number, string> = new Map([
  [Opcode.TEST_UNIT_READY, 'TEST UNIT READY'],
  [Opcode.REQUEST_SENSE, 'REQUEST SENSE'],
  [Opcode.INQUIRY, 'INQUIRY'],
  [Opcode.MODE_SELECT_6, 'MODE SELECT(6)'],
  [Opcode.MODE_SENSE_6, 'MODE SENSE(6)'],
  [Opcode.START_STOP_UNIT, 'START STOP UNIT'],
  [Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, 'PREVENT ALLOW MEDIUM REMOVAL'],
  [Opcode.READ_CAPACITY_10, 'READ CAPACITY(10)'],
  [Opcode.READ_10, 'READ(10)'],
  [Opcode.WRITE_10, 'WRITE(10)'],
  [Opcode.VERIFY_10, 'VERIFY(10)'],
  [Opcode.SYNCHRONIZE_CACHE_10, 'SYNCHRONIZE CACHE(10)'],
  [Opcode.WRITE_SAME_10, 'WRITE SAME(10)'],
  [Opcode.UNMAP, 'UNMAP'],
  [Opcode.MODE_SELECT_10, 'MODE SELECT(10)'],
  [Opcode.MODE_SENSE_10, 'MODE SENSE(10)'],
  [Opcode.READ_16, 'READ(16)'],
  [Opcode.WRITE_16, 'WRITE(16)'],
  [Opcode.VERIFY_16, 'VERIFY(16)'],
  [Opcode.SYNCHRONIZE_CACHE_16, 'SYNCHRONIZE CACHE(16)'],
  [Opcode.WRITE_SAME_16, 'WRITE SAME(16)'],
  [Opcode.SERVICE_ACTION_IN_16, 'SERVICE ACTION IN(16)'],
  [Opcode.REPORT_LUNS, 'REPORT LUNS'],
  [Opcode.MAINTENANCE_IN, 'MAINTENANCE IN'],
]);

/**
 * Short human description of a CDB for error messages, e.g. "READ(16) lba 1234 blocks 8".
 * Never throws: an unknown or short CDB is named by its opcode.
 */
export function describeCdb(cdb: Uint8Array): string {
  const op = cdb[0];
  if (op === undefined) return 'empty CDB';
  if (op === Opcode.SERVICE_ACTION_IN_16 && ((cdb[1] ?? 0) & 0x1f) === SAI_READ_CAPACITY_16) {
    return 'READ CAPACITY(16)';
  }
  const name = OPCODE_NAMES.get(op) ?? `opcode ${hex(op)}`;
  const dv = dataView(cdb);
  switch (op) {
    case Opcode.READ_10:
    case Opcode.WRITE_10:
    case Opcode.VERIFY_10:
    case Opcode.SYNCHRONIZE_CACHE_10:
    case Opcode.WRITE_SAME_10:
      if (cdb.length < 10) break;
      return `${name} lba ${dv.getUint32(2)} blocks ${dv.getUint16(7)}`;
    case Opcode.READ_16:
    case Opcode.WRITE_16:
    case Opcode.VERIFY_16:
    case Opcode.SYNCHRONIZE_CACHE_16:
    case Opcode.WRITE_SAME_16:
      if (cdb.length < 16) break;
      return `${name} lba ${dv.getBigUint64(2)} blocks ${dv.getUint32(10)}`;
    case Opcode.INQUIRY:
      if (cdb.length < 6 || !((cdb[1] ?? 0) & 1)) break;
      return `${name} VPD page ${hex(cdb[2] ?? 0)}`;
    case Opcode.MODE_SENSE_6:
    case Opcode.MODE_SENSE_10:
      if (cdb.length < 4) break;
      return `${name} page ${hex((cdb[2] ?? 0) & 0x3f)}`;
  }
  return name;
}
