// Shared helpers for the SCSI builders and parsers: argument checks and big-endian access.

/** A logical block address: a safe-integer number or a bigint (needed above 2^53). */
export type Lba = number | bigint;

/** Response data that cannot be decoded (wrong page, impossible field values). */
export class ScsiDataError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ScsiDataError';
  }
}

/**
 * Response data shorter than its own header says, or shorter than the fixed layout. `needed`
 * is the length that would have been enough, so a caller can reissue the command with a
 * larger allocation length.
 */
export class TruncatedDataError extends ScsiDataError {
  readonly needed: number;
  readonly actual: number;

  constructor(what: string, needed: number, actual: number) {
    super(`${what} truncated: need ${needed} bytes, got ${actual}`);
    this.name = 'TruncatedDataError';
    this.needed = needed;
    this.actual = actual;
  }
}

export function dataView(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

export function requireLength(buf: Uint8Array, needed: number, what: string): void {
  if (buf.length < needed) throw new TruncatedDataError(what, needed, buf.length);
}

/** Checks an integer argument against an unsigned field of `max` and returns it. */
export function checkUint(value: unknown, field: string, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value)) {
    throw new RangeError(`${field} must be an integer, got ${String(value)}`);
  }
  if (value < 0 || value > max) {
    throw new RangeError(`${field} ${value} out of range 0..${max}`);
  }
  return value;
}

/** Checks an LBA-like argument against a field `bits` wide and returns it as a bigint. */
export function checkBig(value: unknown, field: string, bits: number): bigint {
  let big: bigint;
  if (typeof value === 'bigint') {
    big = value;
  } else if (typeof value === 'number') {
    // Above 2^53 a number has already lost precision: the caller must pass a bigint.
    if (!Number.isSafeInteger(value)) {
      throw new RangeError(`${field} must be a safe integer or a bigint, got ${value}`);
    }
    big = BigInt(value);
  } else {
    throw new RangeError(`${field} must be a number or a bigint, got ${typeof value}`);
  }
  const max = (1n << BigInt(bits)) - 1n;
  if (big < 0n || big > max) {
    throw new RangeError(`${field} ${big} out of range 0..0x${max.toString(16)}`);
  }
  return big;
}

export function hex(value: number | bigint, width = 2): string {
  return `0x${value.toString(16).padStart(width, '0')}`;
}

/**
 * Fields up to this many bytes are decoded in JavaScript: for the short fields of INQUIRY and
 * VPD data, wrapping them in a Buffer to decode costs more than the decoding (a scan decodes
 * thousands of them).
 */
const SHORT_FIELD = 64;
const HEX_DIGITS = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, '0'));

export function hexBytes(bytes: Uint8Array): string {
  if (bytes.length > SHORT_FIELD) return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('hex');
  let out = '';
  for (let i = 0; i < bytes.length; i++) out += HEX_DIGITS[bytes[i]!]!;
  return out;
}

/** Bytes as Latin-1 text (one character per byte). */
function latin1(bytes: Uint8Array): string {
  if (bytes.length > SHORT_FIELD) return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('latin1');
  // fromCharCode takes any array-like of numbers; a Uint8Array is one.
  return String.fromCharCode.apply(null, bytes as unknown as number[]);
}

/**
 * Strips leading blanks and NULs; the value ends at the first NUL after that (C string) and
 * trailing blanks are dropped. Linear in the length: a `[\s\0]+$` regex is quadratic on long
 * runs of inner blanks, and VPD pages reach 64 KiB.
 */
function trimField(text: string): string {
  const start = text.search(/[^\s\0]/);
  if (start < 0) return '';
  const nul = text.indexOf('\0', start);
  return (nul < 0 ? text.slice(start) : text.slice(start, nul)).trimEnd();
}

/** ASCII fields in SCSI data are space padded; some targets pad with NULs instead. */
export function asciiField(bytes: Uint8Array): string {
  return trimField(latin1(bytes));
}

export function utf8Field(bytes: Uint8Array): string {
  return trimField(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('utf8'));
}
