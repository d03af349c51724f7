// The packed submission and completion records shared with the native channel: the one
// encoder/decoder of the TypeScript side (its Rust twin is crates/virtio-initiator-core/src/
// driver/records.rs, which documents the layout). Everything that talks to a channel — the
// request queue, the batch benchmark, the transport test bodies — goes through these.

/** Submission record layout (little-endian). */
export const SubmitRecord = {
  SIZE: 64,
  TOKEN: 0,
  TARGET: 4,
  DIRECTION: 5,
  LUN: 6,
  DATA_LENGTH: 8,
  KIND: 12,
  TASK_ATTR: 13,
  FLAGS: 14,
  CDB_LENGTH: 15,
  CDB: 16,
  CDB_MAX: 32,
  LBA: 16,
  BLOCKS: 24,
  DATA: 48,
} as const;

/** Completion record layout (little-endian); sense slots follow the records in an area. */
export const CompletionRecord = {
  SIZE: 24,
  TOKEN: 0,
  RESPONSE: 4,
  STATUS: 5,
  SENSE_LENGTH: 6,
  RESIDUAL: 8,
  DATA_LENGTH: 12,
  /** u64: nanoseconds from the submission to the poll that found the completion. */
  LATENCY: 16,
  /** Bytes per record in a completion area: the record and its sense slot. */
  SLOT_SIZE: 24 + 96,
  SENSE_MAX: 96,
} as const;

/** The fields of one completion record. */
export interface CompletionFields {
  token: number;
  response: number;
  status: number;
  sense: Uint8Array;
  residual: number;
  dataLength: number;
  latencyNs: number;
}

/** Data direction byte. */
export const Direction = { NONE: 0, IN: 1, OUT: 2 } as const;

/**
 * Record kinds: a CDB as given (virtio-scsi), or a request the native side frames for its
 * device (READ, WRITE and FLUSH for both; the others for virtio-blk).
 */
export const Kind = { CDB: 0, READ: 1, WRITE: 2, SYNCHRONIZE_CACHE: 3, DISCARD: 4, WRITE_ZEROES: 5, GET_ID: 6 } as const;

export const Flag = { FUA: 1, DATA_ADDRESS: 2, LONG_CDB: 4, UNMAP: 8 } as const;

/** Response of a completion for a request refused before it reached the device. */
export const RESPONSE_REFUSED = 0xfe;

const TWO_32 = 0x1_0000_0000;

/**
 * Writes records into an area (a channel's submission area, or any Buffer) through cached
 * views: no allocation per record.
 */
export class RecordWriter {
  readonly bytes: Uint8Array;
  private readonly words: Uint32Array;
  private readonly halves: Uint16Array;

  constructor(area: Uint8Array) {
    if (area.byteOffset % 8 !== 0) throw new RangeError('a record area must be 8-byte aligned');
    // A plain view even of a Buffer: the built-in typed-array methods, not Buffer's.
    this.bytes = new Uint8Array(area.buffer, area.byteOffset, area.byteLength);
    this.words = new Uint32Array(area.buffer, area.byteOffset, area.byteLength >>> 2);
    this.halves = new Uint16Array(area.buffer, area.byteOffset, area.byteLength >>> 1);
  }

  /** Record `i` with its common fields set and everything else zero. */
  private head(i: number, token: number, target: number, lun: number, direction: number, kind: number): number {
    const off = i * SubmitRecord.SIZE;
    const w = off >>> 2;
    const words = this.words;
    for (let k = 0; k < 16; k++) words[w + k] = 0;
    words[w] = token;
    const b = this.bytes;
    b[off + SubmitRecord.TARGET] = target;
    b[off + SubmitRecord.DIRECTION] = direction;
    this.halves[(off + SubmitRecord.LUN) >>> 1] = lun;
    b[off + SubmitRecord.KIND] = kind;
    return off;
  }

  /** Data by host address (inside the controller's DMA memory). */
  private address(off: number, addr: number, length: number): void {
    const w = off >>> 2;
    this.words[w + 2] = length;
    this.bytes[off + SubmitRecord.FLAGS] = this.bytes[off + SubmitRecord.FLAGS]! | Flag.DATA_ADDRESS;
    this.words[w + 12] = addr % TWO_32;
    this.words[w + 13] = Math.floor(addr / TWO_32);
  }

  /** Data by index into the buffer list passed with the batch. */
  private index(off: number, index: number): void {
    this.words[(off >>> 2) + 12] = index;
  }

  /**
   * A READ (direction IN) or WRITE (OUT) that the native side turns into a READ/WRITE 10 or
   * 16. `lba` below 2^53. Data by address when `addr` >= 0, else by buffer `index`.
   */
  readWrite(
    i: number,
    token: number,
    target: number,
    lun: number,
    write: boolean,
    lba: number,
    blocks: number,
    fua: boolean,
    addr: number,
    length: number,
    index: number,
  ): void {
    const off = this.head(i, token, target, lun, write ? Direction.OUT : Direction.IN, write ? Kind.WRITE : Kind.READ);
    const w = off >>> 2;
    this.words[w + 4] = lba % TWO_32;
    this.words[w + 5] = Math.floor(lba / TWO_32);
    this.words[w + 6] = blocks;
    if (fua) this.bytes[off + SubmitRecord.FLAGS] = Flag.FUA;
    if (addr >= 0) this.address(off, addr, length);
    else this.index(off, index);
  }

  /**
   * A virtio-blk request of `kind` (FLUSH, DISCARD, WRITE ZEROES with `flags`, GET ID) over
   * `blocks` blocks at `lba`; GET ID names its data-in as `readWrite` does.
   */
  blockRequest(i: number, token: number, kind: number, lba: number, blocks: number, flags: number, addr: number, length: number, index: number): void {
    const off = this.head(i, token, 0, 0, kind === Kind.GET_ID ? Direction.IN : Direction.NONE, kind);
    const w = off >>> 2;
    this.words[w + 4] = lba % TWO_32;
    this.words[w + 5] = Math.floor(lba / TWO_32);
    this.words[w + 6] = blocks;
    this.bytes[off + SubmitRecord.FLAGS] = flags;
    if (kind !== Kind.GET_ID) return;
    if (addr >= 0) this.address(off, addr, length);
    else this.index(off, index);
  }

  /** SYNCHRONIZE CACHE of the whole medium (16-byte form when `long`). */
  synchronizeCache(i: number, token: number, target: number, lun: number, long: boolean): void {
    const off = this.head(i, token, target, lun, Direction.NONE, Kind.SYNCHRONIZE_CACHE);
    if (long) this.bytes[off + SubmitRecord.FLAGS] = Flag.LONG_CDB;
  }

  /** Any CDB, with optional data (direction NONE, IN or OUT). */
  cdb(
    i: number,
    token: number,
    target: number,
    lun: number,
    cdb: Uint8Array,
    taskAttribute: number,
    direction: number,
    addr: number,
    length: number,
    index: number,
  ): void {
    const off = this.head(i, token, target, lun, direction, Kind.CDB);
    const b = this.bytes;
    b[off + SubmitRecord.TASK_ATTR] = taskAttribute;
    b[off + SubmitRecord.CDB_LENGTH] = cdb.length;
    b.set(cdb, off + SubmitRecord.CDB);
    if (direction === Direction.NONE) return;
    if (addr >= 0) this.address(off, addr, length);
    else this.index(off, index);
  }

  /** Moves records [from, from + count) to the front (records a full ring did not take). */
  shift(from: number, count: number): void {
    this.bytes.copyWithin(0, from * SubmitRecord.SIZE, (from + count) * SubmitRecord.SIZE);
  }
}

/** Reads completion records (and their sense slots) of an area holding `capacity` of them. */
/** 32-bit words per completion record. */
const RECORD_WORDS = CompletionRecord.SIZE / 4;

export class CompletionReader {
  readonly bytes: Uint8Array;
  private readonly words: Uint32Array;
  private readonly senseBase: number;

  constructor(area: Uint8Array, capacity: number) {
    if (area.byteOffset % 8 !== 0) throw new RangeError('a completion area must be 8-byte aligned');
    if (area.byteLength < capacity * CompletionRecord.SLOT_SIZE) {
      throw new RangeError(`a completion area for ${capacity} records needs ${capacity * CompletionRecord.SLOT_SIZE} bytes`);
    }
    // A plain view even of a Buffer: `slice` then copies (Buffer's would share the area, which
    // the next completions overwrite).
    this.bytes = new Uint8Array(area.buffer, area.byteOffset, area.byteLength);
    this.words = new Uint32Array(area.buffer, area.byteOffset, (capacity * CompletionRecord.SIZE) >>> 2);
    this.senseBase = capacity * CompletionRecord.SIZE;
  }

  token(k: number): number {
    return this.words[k * RECORD_WORDS]!;
  }

  response(k: number): number {
    return this.bytes[k * CompletionRecord.SIZE + CompletionRecord.RESPONSE]!;
  }

  status(k: number): number {
    return this.bytes[k * CompletionRecord.SIZE + CompletionRecord.STATUS]!;
  }

  senseLength(k: number): number {
    const off = k * CompletionRecord.SIZE + CompletionRecord.SENSE_LENGTH;
    return Math.min(this.bytes[off]! | (this.bytes[off + 1]! << 8), CompletionRecord.SENSE_MAX);
  }

  residual(k: number): number {
    return this.words[k * RECORD_WORDS + 2]!;
  }

  dataLength(k: number): number {
    return this.words[k * RECORD_WORDS + 3]!;
  }

  latencyNs(k: number): number {
    return this.words[k * RECORD_WORDS + 4]! + this.words[k * RECORD_WORDS + 5]! * 0x1_0000_0000;
  }

  /** A copy of the sense bytes of record `k` (the area is reused by the next call). */
  /** A copy of record `k`'s sense data. */
  sense(k: number): Uint8Array {
    const start = this.senseBase + k * CompletionRecord.SENSE_MAX;
    return this.bytes.slice(start, start + this.senseLength(k));
  }

  /** The reason text of a refused request (RESPONSE_REFUSED). */
  refusal(k: number): string {
    return Buffer.from(this.sense(k)).toString('utf8');
  }
}

/** Writes record `k` of a completion area for `capacity` records, as the native side does. */
export function writeCompletion(area: Buffer, capacity: number, k: number, c: CompletionFields): void {
  const off = k * CompletionRecord.SIZE;
  const sense = c.sense.subarray(0, CompletionRecord.SENSE_MAX);
  area.writeUInt32LE(c.token, off + CompletionRecord.TOKEN);
  area.writeUInt8(c.response, off + CompletionRecord.RESPONSE);
  area.writeUInt8(c.status, off + CompletionRecord.STATUS);
  area.writeUInt16LE(sense.length, off + CompletionRecord.SENSE_LENGTH);
  area.writeUInt32LE(c.residual, off + CompletionRecord.RESIDUAL);
  area.writeUInt32LE(c.dataLength, off + CompletionRecord.DATA_LENGTH);
  area.writeBigUInt64LE(BigInt(c.latencyNs), off + CompletionRecord.LATENCY);
  area.set(sense, capacity * CompletionRecord.SIZE + k * CompletionRecord.SENSE_MAX);
}

/** Bytes of a completion area for `capacity` records. */
export function completionAreaBytes(capacity: number): number {
  return capacity * CompletionRecord.SLOT_SIZE;
}

/** `pump` packs both counts in one number. */
export function pumpTaken(result: number): number {
  return result >>> 16;
}

export function pumpCompleted(result: number): number {
  return result & 0xffff;
}
