// Random-read load through the Promise API, and the latency bookkeeping for it: what `npm run
// demo` and `npm run bench` measure with. Nothing here is asserted by tests; it only reports.

import { performance } from 'node:perf_hooks';

import type { BlockDevice } from './block-device.js';

/** Latency samples (microseconds): count and sum of all, percentiles over the first `limit`. */
export class Latencies {
  private readonly samples: Float64Array;
  private n = 0;
  count = 0;
  sum = 0;

  constructor(limit = 1 << 22) {
    this.samples = new Float64Array(limit);
  }

  add(us: number): void {
    this.count++;
    this.sum += us;
    if (this.n < this.samples.length) this.samples[this.n++] = us;
  }

  summary(): LatencySummary {
    const s = this.samples.subarray(0, this.n).sort();
    const pick = (q: number) => (s.length === 0 ? 0 : s[Math.min(s.length - 1, Math.floor(q * s.length))]!);
    const round = (x: number) => Math.round(x * 10) / 10;
    return {
      mean: round(this.count === 0 ? 0 : this.sum / this.count),
      p50: round(pick(0.5)),
      p99: round(pick(0.99)),
      max: round(s.length === 0 ? 0 : s[s.length - 1]!),
      samples: this.n,
    };
  }
}

export interface LatencySummary {
  mean: number;
  p50: number;
  p99: number;
  max: number;
  samples: number;
}

/** Pseudo-random LBAs aligned to the I/O size (xorshift32: cheap and repeatable from a seed). */
export class RandomOffsets {
  private x: number;
  private readonly slots: number;
  private readonly blocksPerIo: number;

  constructor(deviceBytes: number, blockSize: number, ioBytes: number, seed: number) {
    this.x = seed >>> 0 || 1;
    this.slots = Math.floor(deviceBytes / ioBytes);
    this.blocksPerIo = ioBytes / blockSize;
  }

  next(): number {
    let x = this.x;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.x = x >>> 0;
    return (this.x % this.slots) * this.blocksPerIo;
  }
}

export interface RandomReadOptions {
  depth: number;
  seconds: number;
  /** Bytes per read (default 4096). */
  ioBytes?: number;
  seed?: number;
  /** Called about every 250 ms with the reads done so far. */
  onProgress?: (done: number, secondsLeft: number) => void;
}

export interface RandomReadResult {
  ios: number;
  errors: number;
  seconds: number;
  iops: number;
  mbPerSecond: number;
  latencyUs: LatencySummary;
}

/** `depth` loops of random reads, each into its own DMA buffer, for `seconds`. */
export async function randomReads(dev: BlockDevice, o: RandomReadOptions): Promise<RandomReadResult> {
  const io = o.ioBytes ?? 4096;
  const bytes = Number(dev.info.sizeBytes);
  const lat = new Latencies();
  let errors = 0;
  let firstError: unknown;
  const t0 = performance.now();
  const end = t0 + o.seconds * 1000;
  let last = t0;
  const progress =
    o.onProgress && setInterval(() => o.onProgress!(lat.count, Math.max(0, (end - performance.now()) / 1000)), 250);
  try {
    await Promise.all(
      Array.from({ length: o.depth }, async (_, w) => {
        const buf = dev.allocBuffer(io);
        const offsets = new RandomOffsets(bytes, dev.blockSize, io, (o.seed ?? 1) + w * 7919);
        for (;;) {
          const start = performance.now();
          if (start >= end) return;
          try {
            await dev.read(offsets.next(), buf);
          } catch (e) {
            errors++;
            firstError ??= e;
            if (errors > 100) throw e;
          }
          last = performance.now();
          lat.add((last - start) * 1000);
        }
      }),
    );
  } finally {
    if (progress) clearInterval(progress);
  }
  if (errors > 0 && lat.count === errors) throw firstError;
  const seconds = (last - t0) / 1000;
  return {
    ios: lat.count,
    errors,
    seconds,
    iops: Math.round(lat.count / seconds),
    mbPerSecond: Math.round((lat.count * io) / seconds / 1e4) / 100,
    latencyUs: lat.summary(),
  };
}
