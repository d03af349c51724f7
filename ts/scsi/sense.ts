// Sense data (SPC-4 4.5: fixed and descriptor formats), SAM-5 status names and ScsiError.

import { ascName } from './asc.js';
import { dataView, hex, ScsiDataError } from './util.js';

export const SenseKey = {
  NO_SENSE: 0x0,
  RECOVERED_ERROR: 0x1,
  NOT_READY: 0x2,
  MEDIUM_ERROR: 0x3,
  HARDWARE_ERROR: 0x4,
  ILLEGAL_REQUEST: 0x5,
  UNIT_ATTENTION: 0x6,
  DATA_PROTECT: 0x7,
  BLANK_CHECK: 0x8,
  VENDOR_SPECIFIC: 0x9,
  COPY_ABORTED: 0xa,
  ABORTED_COMMAND: 0xb,
  VOLUME_OVERFLOW: 0xd,
  MISCOMPARE: 0xe,
  COMPLETED: 0xf,
} as const;

const SENSE_KEY_NAMES: readonly string[] = [
  'NO SENSE',
  'RECOVERED ERROR',
  'NOT READY',
  'MEDIUM ERROR',
  'HARDWARE ERROR',
  'ILLEGAL REQUEST',
  'UNIT ATTENTION',
  'DATA PROTECT',
  'BLANK CHECK',
  'VENDOR SPECIFIC',
  'COPY ABORTED',
  'ABORTED COMMAND',
  'RESERVED (0xc)',
  'VOLUME OVERFLOW',
  'MISCOMPARE',
  'COMPLETED',
];

export function senseKeyName(key: number): string {
  return SENSE_KEY_NAMES[key & 0x0f] ?? `SENSE KEY ${hex(key)}`;
}

export const ScsiStatus = {
  GOOD: 0x00,
  CHECK_CONDITION: 0x02,
  CONDITION_MET: 0x04,
  BUSY: 0x08,
  RESERVATION_CONFLICT: 0x18,
  TASK_SET_FULL: 0x28,
  ACA_ACTIVE: 0x30,
  TASK_ABORTED: 0x40,
} as const;

const STATUS_NAMES: ReadonlyMap<number, string> = new Map([
  [ScsiStatus.GOOD, 'GOOD'],
  [ScsiStatus.CHECK_CONDITION, 'CHECK CONDITION'],
  [ScsiStatus.CONDITION_MET, 'CONDITION MET'],
  [ScsiStatus.BUSY, 'BUSY'],
  [ScsiStatus.RESERVATION_CONFLICT, 'RESERVATION CONFLICT'],
  [ScsiStatus.TASK_SET_FULL, 'TASK SET FULL'],
  [ScsiStatus.ACA_ACTIVE, 'ACA ACTIVE'],
  [ScsiStatus.TASK_ABORTED, 'TASK ABORTED'],
]);

/** SAM-5 name of a status byte, e.g. "TASK SET FULL"; unknown values read "STATUS 0x..". */
export function statusName(status: number): string {
  return STATUS_NAMES.get(status) ?? `STATUS ${hex(status)}`;
}

/** SENSE KEY SPECIFIC field (SPC-4 4.5.2.4), decoded by sense key when SKSV is set. */
export type SenseKeySpecific =
  | {
      kind: 'field-pointer';
      /** The bad field is in the CDB (true) or the parameter data (false). */
      commandData: boolean;
      fieldPointer: number;
      bitPointer?: number;
    }
  | { kind: 'progress'; /** Fraction done, 0 to 1. */ progress: number }
  | { kind: 'retry-count'; count: number }
  | { kind: 'raw'; value: number };

export interface SenseDescriptor {
  type: number;
  /** The whole descriptor, header included. */
  data: Uint8Array;
}

export interface DecodedSense {
  format: 'fixed' | 'descriptor';
  /** Current error (0x70/0x72) rather than deferred (0x71/0x73). */
  current: boolean;
  key: number;
  keyName: string;
  asc: number;
  ascq: number;
  ascName: string;
  /** INFORMATION (often the failing LBA), only when marked valid. */
  information?: bigint;
  commandSpecific?: bigint;
  senseKeySpecific?: SenseKeySpecific;
  /** Descriptor format only: every descriptor, in order. */
  descriptors?: SenseDescriptor[];
}

function decodeSks(key: number, b0: number, field: number): SenseKeySpecific | undefined {
  if (!(b0 & 0x80)) return undefined;
  switch (key) {
    case SenseKey.ILLEGAL_REQUEST: {
      const out: SenseKeySpecific = {
        kind: 'field-pointer',
        commandData: (b0 & 0x40) !== 0,
        fieldPointer: field,
      };
      if (b0 & 0x08) out.bitPointer = b0 & 0x07;
      return out;
    }
    case SenseKey.NO_SENSE:
    case SenseKey.NOT_READY:
      return { kind: 'progress', progress: field / 65536 };
    case SenseKey.RECOVERED_ERROR:
    case SenseKey.MEDIUM_ERROR:
    case SenseKey.HARDWARE_ERROR:
      return { kind: 'retry-count', count: field };
    default:
      return { kind: 'raw', value: ((b0 & 0x7f) << 16) | field };
  }
}

/**
 * Decodes sense data in either format. Sense arrives on an error path, so decoding is
 * lenient about length: the data is cut at its ADDITIONAL SENSE LENGTH or at the buffer end,
 * whichever is first, fields past that point are reported as absent (ASC/ASCQ as 0), and a
 * descriptor running past it is dropped. Only data too short to hold a sense key, or with an
 * unknown RESPONSE CODE, throws.
 */
export function decodeSense(buf: Uint8Array): DecodedSense {
  if (buf.length === 0) throw new ScsiDataError('sense data is empty');
  const code = (buf[0] ?? 0) & 0x7f;
  if (code === 0x70 || code === 0x71) return decodeFixed(buf, code === 0x70);
  if (code === 0x72 || code === 0x73) return decodeDescriptor(buf, code === 0x72);
  throw new ScsiDataError(`sense data has unknown RESPONSE CODE ${hex(code)}`);
}

/**
 * The sense key alone, read in place (no decoding): undefined when the data is too short or
 * of an unknown format, as `decodeSense` would refuse it.
 */
export function senseKeyOf(buf: Uint8Array): number | undefined {
  const code = (buf[0] ?? 0) & 0x7f;
  if ((code === 0x70 || code === 0x71) && buf.length >= 3) return buf[2]! & 0x0f;
  if ((code === 0x72 || code === 0x73) && buf.length >= 4) return buf[1]! & 0x0f;
  return undefined;
}

function senseEnd(buf: Uint8Array): number {
  return buf.length < 8 ? buf.length : Math.min(buf.length, 8 + (buf[7] ?? 0));
}

function decodeFixed(buf: Uint8Array, current: boolean): DecodedSense {
  if (buf.length < 3) throw new ScsiDataError(`fixed format sense data too short: ${buf.length} bytes`);
  const end = senseEnd(buf);
  const dv = dataView(buf);
  const key = (buf[2] ?? 0) & 0x0f;
  const asc = end > 12 ? (buf[12] ?? 0) : 0;
  const ascq = end > 13 ? (buf[13] ?? 0) : 0;
  const out: DecodedSense = {
    format: 'fixed',
    current,
    key,
    keyName: senseKeyName(key),
    asc,
    ascq,
    ascName: ascName(asc, ascq),
  };
  // VALID (byte 0 bit 7) qualifies the INFORMATION field.
  if ((buf[0] ?? 0) & 0x80 && end >= 7) out.information = BigInt(dv.getUint32(3));
  if (end >= 12) {
    const csi = dv.getUint32(8);
    if (csi !== 0) out.commandSpecific = BigInt(csi);
  }
  if (end >= 18) {
    const sks = decodeSks(key, buf[15] ?? 0, dv.getUint16(16));
    if (sks) out.senseKeySpecific = sks;
  }
  return out;
}

function decodeDescriptor(buf: Uint8Array, current: boolean): DecodedSense {
  if (buf.length < 4) {
    throw new ScsiDataError(`descriptor format sense data too short: ${buf.length} bytes`);
  }
  const end = senseEnd(buf);
  const dv = dataView(buf);
  const key = (buf[1] ?? 0) & 0x0f;
  const asc = buf[2] ?? 0;
  const ascq = buf[3] ?? 0;
  const out: DecodedSense = {
    format: 'descriptor',
    current,
    key,
    keyName: senseKeyName(key),
    asc,
    ascq,
    ascName: ascName(asc, ascq),
    descriptors: [],
  };
  let off = 8;
  while (off + 2 <= end) {
    const type = buf[off] ?? 0;
    const next = off + 2 + (buf[off + 1] ?? 0);
    if (next > end) break;
    out.descriptors?.push({ type, data: buf.subarray(off, next) });
    const len = next - off;
    // Information (0x00) and command-specific (0x01) carry an 8-byte value at +4;
    // sense key specific (0x02) carries the same 3 bytes as fixed format bytes 15-17.
    if (type === 0x00 && len >= 12 && (buf[off + 2] ?? 0) & 0x80) {
      out.information = dv.getBigUint64(off + 4);
    } else if (type === 0x01 && len >= 12) {
      out.commandSpecific = dv.getBigUint64(off + 4);
    } else if (type === 0x02 && len >= 7) {
      const sks = decodeSks(key, buf[off + 4] ?? 0, dv.getUint16(off + 5));
      if (sks) out.senseKeySpecific = sks;
    }
    off = next;
  }
  return out;
}

export interface ScsiErrorInit {
  /** SAM status byte. */
  status: number;
  /** Raw sense bytes or already decoded sense. Raw bytes that do not decode are ignored. */
  sense?: Uint8Array | DecodedSense;
  /** What failed, e.g. "READ(16) lba 1234"; prefixes the message. */
  context?: string;
}

/** A command that completed with a status other than GOOD / CONDITION MET. */
export class ScsiError extends Error {
  readonly status: number;
  readonly statusName: string;
  readonly sense?: DecodedSense;
  readonly key?: number;
  readonly asc?: number;
  readonly ascq?: number;
  readonly context?: string;

  constructor(init: ScsiErrorInit) {
    const sense = toDecoded(init.sense);
    const name = statusName(init.status);
    let text = `SCSI ${name}`;
    if (sense) {
      text += `: ${sense.keyName}, ${sense.ascName} (asc ${hex(sense.asc)} ascq ${hex(sense.ascq)})`;
    } else if (init.status === ScsiStatus.CHECK_CONDITION) {
      text += ' (no sense data)';
    }
    super(init.context ? `${init.context}: ${text}` : text);
    this.name = 'ScsiError';
    this.status = init.status;
    this.statusName = name;
    if (init.context !== undefined) this.context = init.context;
    if (sense) {
      this.sense = sense;
      this.key = sense.key;
      this.asc = sense.asc;
      this.ascq = sense.ascq;
    }
  }
}

function toDecoded(sense: Uint8Array | DecodedSense | undefined): DecodedSense | undefined {
  if (sense === undefined) return undefined;
  if (!(sense instanceof Uint8Array)) return sense;
  if (sense.length === 0) return undefined;
  try {
    return decodeSense(sense);
  } catch {
    // Garbage sense must not hide the status that came with it.
    return undefined;
  }
}

function senseOf(e: unknown): DecodedSense | undefined {
  if (e instanceof ScsiError) return e.sense;
  if (typeof e === 'object' && e !== null && 'keyName' in e && 'key' in e && 'asc' in e) {
    return e as DecodedSense;
  }
  return undefined;
}

/** True for a ScsiError or DecodedSense carrying UNIT ATTENTION. */
export function isUnitAttention(e: unknown): boolean {
  return senseOf(e)?.key === SenseKey.UNIT_ATTENTION;
}

/** True for a ScsiError or DecodedSense carrying NOT READY. */
export function isNotReady(e: unknown): boolean {
  return senseOf(e)?.key === SenseKey.NOT_READY;
}

/**
 * Worth reissuing unchanged: UNIT ATTENTION (reported once, then cleared), NOT READY while
 * the unit is becoming ready (04/01), and BUSY / TASK SET FULL status.
 */
export function isRetryable(e: unknown): boolean {
  if (
    e instanceof ScsiError &&
    (e.status === ScsiStatus.BUSY || e.status === ScsiStatus.TASK_SET_FULL)
  ) {
    return true;
  }
  const s = senseOf(e);
  if (!s) return false;
  return (
    s.key === SenseKey.UNIT_ATTENTION ||
    (s.key === SenseKey.NOT_READY && s.asc === 0x04 && s.ascq === 0x01)
  );
}
