// Image files checked from the host: deterministic block contents, and the bytes of a file read
// and written directly, for tests whose backend serves that file.
import { closeSync, openSync, readSync, writeSync } from 'node:fs';

import type { ExecutionContext } from 'ava';

const BS = 512;

/**
 * Deterministic contents: each 512-byte block starts with its seed and LBA, then bytes from
 * a xorshift generator seeded by both, so a block that lands at the wrong LBA or LUN shows.
 */
export function pattern(seed: number, lba: number, blocks: number): Buffer {
  const buf = Buffer.alloc(blocks * BS);
  for (let b = 0; b < blocks; b++) {
    const off = b * BS;
    buf.writeUInt32LE(seed >>> 0, off);
    buf.writeUInt32LE(lba + b, off + 4);
    let x = (Math.imul(seed + 1, 0x9e3779b1) ^ Math.imul(lba + b + 1, 0x85ebca6b)) >>> 0 || 1;
    for (let i = 8; i < BS; i += 4) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      buf.writeUInt32LE(x >>> 0, off + i);
    }
  }
  return buf;
}

/** Bytes of an image file, read straight from disk. */
export function fromDisk(path: string, offset: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  const fd = openSync(path, 'r');
  try {
    let done = 0;
    while (done < length) {
      const n = readSync(fd, buf, done, length - done, offset + done);
      if (n === 0) throw new Error(`${path}: end of file at byte ${offset + done}`);
      done += n;
    }
  } finally {
    closeSync(fd);
  }
  return buf;
}

/** Writes bytes into an image file directly. */
export function toDisk(path: string, offset: number, data: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    let done = 0;
    while (done < data.length) done += writeSync(fd, data, done, data.length - done, offset + done);
  } finally {
    closeSync(fd);
  }
}

/** Compares buffers without dumping megabytes into the report when they differ. */
export function sameBytes(t: ExecutionContext, actual: Uint8Array, expected: Uint8Array, what: string): void {
  if (actual.length === expected.length && Buffer.compare(actual, expected) === 0) {
    t.pass();
    return;
  }
  let i = 0;
  while (i < Math.min(actual.length, expected.length) && actual[i] === expected[i]) i++;
  t.fail(`${what}: ${actual.length} vs ${expected.length} bytes, first difference at byte ${i}`);
}

export function isZero(buf: Uint8Array): boolean {
  return buf.every((b) => b === 0);
}
