// A scripted stand-in for the native Channel, for unit tests of the request queue: it decodes
// the records the queue writes into its submission area, holds the requests "on the device" until the test
// completes them, and encodes completion records the way the addon does.
import type { ChannelLike } from '../../ts/queue.js';
import { completionAreaBytes, Flag, Kind, SubmitRecord, writeCompletion } from '../../ts/records.js';
import { read as readCdb, write as writeCdb } from '../../ts/scsi/cdb.js';

export interface SubmittedRecord {
  token: number;
  target: number;
  direction: number;
  lun: number;
  bufferIndex: number;
  cdb: Buffer;
  taskAttribute: number;
  buffer: Buffer | null;
}

export interface FakeCompletion {
  response?: number;
  status?: number;
  sense?: Uint8Array;
  residual?: number;
  dataLength?: number;
  latencyNs?: number;
}

export class FakeChannel implements ChannelLike {
  readonly submitCalls: SubmittedRecord[][] = [];
  readonly onDevice = new Map<number, SubmittedRecord>();
  private readonly ready: Array<{ token: number; c: FakeCompletion }> = [];
  /** Most records one submit call accepts (the ring may have fewer free descriptors). */
  acceptLimit = Infinity;
  /** Thrown by the next submit / reap when set. */
  failure: Error | undefined;
  reapCalls = 0;
  closed = false;
  /** Completes every request on the device at the next reap, with this answer. */
  auto: ((r: SubmittedRecord) => FakeCompletion) | undefined;

  private readonly submissions: Buffer;
  private readonly completions: Buffer;

  constructor(readonly capacity: number) {
    this.submissions = Buffer.alloc(capacity * SubmitRecord.SIZE);
    this.completions = Buffer.alloc(completionAreaBytes(capacity));
  }

  submissionArea(): Buffer {
    return this.submissions;
  }

  completionArea(): Buffer {
    return this.completions;
  }

  pump(count: number, buffers?: Array<Buffer | null> | null): number {
    const taken = count > 0 ? this.take(this.submissions, count, buffers ?? []) : 0;
    return taken * 65536 + this.reap(this.completions, this.capacity);
  }

  submit(count: number, buffers?: Array<Buffer | null> | null): number {
    return this.take(this.submissions, count, buffers ?? []);
  }

  /** Decodes the records the queue wrote, as the native side does. */
  private take(batch: Buffer, count: number, buffers: Array<Buffer | null>): number {
    if (this.closed) throw new Error('channel closed');
    if (this.failure) throw this.failure;
    const free = this.capacity - this.onDevice.size;
    const n = Math.min(count, free, this.acceptLimit);
    const records: SubmittedRecord[] = [];
    for (let i = 0; i < count; i++) {
      const off = i * SubmitRecord.SIZE;
      const kind = batch[off + SubmitRecord.KIND]!;
      const direction = batch[off + SubmitRecord.DIRECTION]!;
      const bufferIndex = batch.readUInt32LE(off + SubmitRecord.DATA);
      let cdb: Buffer;
      if (kind === Kind.CDB) {
        cdb = Buffer.from(batch.subarray(off + SubmitRecord.CDB, off + SubmitRecord.CDB + batch[off + SubmitRecord.CDB_LENGTH]!));
      } else {
        const args = {
          lba: batch.readUInt32LE(off + SubmitRecord.LBA) + batch.readUInt32LE(off + SubmitRecord.LBA + 4) * 2 ** 32,
          blocks: batch.readUInt32LE(off + SubmitRecord.BLOCKS),
          fua: (batch[off + SubmitRecord.FLAGS]! & Flag.FUA) !== 0,
        };
        cdb = Buffer.from(kind === Kind.WRITE ? writeCdb(args) : readCdb(args));
      }
      const rec: SubmittedRecord = {
        token: batch.readUInt32LE(off + SubmitRecord.TOKEN),
        target: batch[off + SubmitRecord.TARGET]!,
        direction,
        lun: batch.readUInt16LE(off + SubmitRecord.LUN),
        bufferIndex,
        cdb,
        taskAttribute: batch[off + SubmitRecord.TASK_ATTR]!,
        buffer: direction === 0 ? null : (buffers[bufferIndex] ?? null),
      };
      records.push(rec);
      if (i < n) this.onDevice.set(rec.token, rec);
    }
    this.submitCalls.push(records.slice(0, n));
    return n;
  }

  /** Completes a request on the device: the next reap returns it. */
  complete(token: number, c: FakeCompletion = {}): void {
    if (!this.onDevice.has(token)) throw new Error(`token ${token} is not on the device`);
    this.ready.push({ token, c });
  }

  private reap(out: Buffer, max: number): number {
    if (this.closed) throw new Error('channel closed');
    this.reapCalls++;
    if (this.failure) throw this.failure;
    if (this.auto) {
      const pending = new Set(this.ready.map((r) => r.token));
      for (const rec of this.onDevice.values()) {
        if (!pending.has(rec.token)) this.ready.push({ token: rec.token, c: this.auto(rec) });
      }
    }
    let n = 0;
    while (n < max && this.ready.length > 0) {
      const { token, c } = this.ready.shift()!;
      this.onDevice.delete(token);
      writeCompletion(out, max, n, {
        token,
        response: c.response ?? 0,
        status: c.status ?? 0,
        sense: c.sense ?? new Uint8Array(0),
        residual: c.residual ?? 0,
        dataLength: c.dataLength ?? 0,
        latencyNs: c.latencyNs ?? 0,
      });
      n++;
    }
    return n;
  }

  close(): void {
    this.closed = true;
  }
}
