// A scripted stand-in for the native Channel, for unit tests of the request queue: it decodes
// the submit records the queue writes, holds the requests "on the device" until the test
// completes them, and encodes completion records the way the addon does.
import type { ChannelLike } from '../../ts/queue.js';

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

  constructor(readonly capacity: number) {}

  submit(batch: Buffer, count: number, buffers: Array<Buffer | null>): number {
    if (this.closed) throw new Error('channel closed');
    if (this.failure) throw this.failure;
    const free = this.capacity - this.onDevice.size;
    const n = Math.min(count, free, this.acceptLimit);
    const records: SubmittedRecord[] = [];
    for (let i = 0; i < count; i++) {
      const off = i * 64;
      const cdbLen = batch.readUInt8(off + 12);
      const direction = batch.readUInt8(off + 5);
      const bufferIndex = batch.readUInt32LE(off + 8);
      const rec: SubmittedRecord = {
        token: batch.readUInt32LE(off),
        target: batch.readUInt8(off + 4),
        direction,
        lun: batch.readUInt16LE(off + 6),
        bufferIndex,
        cdb: Buffer.from(batch.subarray(off + 16, off + 16 + cdbLen)),
        taskAttribute: batch.readUInt8(off + 13),
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

  reap(out: Buffer, max: number): number {
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
      const off = n * 112;
      out.fill(0, off, off + 112);
      out.writeUInt32LE(token, off);
      out.writeUInt8(c.response ?? 0, off + 4);
      out.writeUInt8(c.status ?? 0, off + 5);
      const sense = c.sense ?? new Uint8Array(0);
      out.writeUInt16LE(sense.length, off + 6);
      out.writeUInt32LE(c.residual ?? 0, off + 8);
      out.writeUInt32LE(c.dataLength ?? 0, off + 12);
      out.set(sense, off + 16);
      n++;
    }
    return n;
  }

  close(): void {
    this.closed = true;
  }
}
