// The virtio-blk side of a block device: what the device offers, its one disk, and what its
// status byte means.

import { BlkIoError, DeviceError, NotSupportedError, VirtioResponse } from './errors.js';
import type { CommandResult } from './queue.js';
import type { Geometry } from './scan.js';

/** What a virtio-blk device offers (its configuration space under the features agreed). */
export interface BlkConfig {
  /** In 512-byte sectors. */
  capacitySectors: number;
  blockSize: number;
  /** log2 of logical blocks per physical block. */
  physicalBlockExp: number;
  /** Optimal I/O size in logical blocks (0: not stated). */
  optIoBlocks: number;
  /** Largest data segment in bytes (0: not stated). */
  sizeMax: number;
  /** Most data segments per request (0: not stated). */
  segMax: number;
  readOnly: boolean;
  flush: boolean;
  /** A write cache is on: a write is on stable storage after a flush. */
  writeback: boolean;
  discard: boolean;
  maxDiscardSectors: number;
  maxDiscardSeg: number;
  discardAlignment: number;
  writeZeroes: boolean;
  maxWriteZeroesSectors: number;
  maxWriteZeroesSeg: number;
  writeZeroesMayUnmap: boolean;
}

/** virtio-blk status byte (virtio 1.2, 5.2.6). */
export const BlkStatus = { OK: 0, IOERR: 1, UNSUPP: 2 } as const;

/** Bytes of the ID string GET ID returns. */
export const BLK_ID_BYTES = 20;

/** Name of the one disk of a virtio-blk controller: the controller's name (as SPDK names it). */
export function blkDiskName(controllerName: string): string {
  return controllerName;
}

/** The disk's size in logical blocks from a capacity in 512-byte sectors. */
export function blkGeometry(capacitySectors: number, blockSize: number): Geometry {
  return { blockSize, blockCount: BigInt(capacitySectors) / BigInt(blockSize / 512) };
}

/** The ID string GET ID filled `id` with: up to 20 bytes, NUL-terminated when shorter. */
export function blkIdString(id: Uint8Array, length: number): string | undefined {
  const bytes = id.subarray(0, Math.min(length, BLK_ID_BYTES));
  const end = bytes.indexOf(0);
  const text = Buffer.from(end < 0 ? bytes : bytes.subarray(0, end)).toString('latin1').trim();
  return text === '' ? undefined : text;
}

/** Throws the typed error for a virtio-blk completion that did not succeed. */
export function throwForBlkResult(r: CommandResult, what: string, device: string): void {
  if (r.response !== VirtioResponse.OK) throw new DeviceError(`${device}: the device completed ${what} without writing its status`);
  if (r.status === BlkStatus.OK) return;
  if (r.status === BlkStatus.UNSUPP) throw new NotSupportedError(`${device}: the device does not support ${what} (VIRTIO_BLK_S_UNSUPP)`);
  if (r.status === BlkStatus.IOERR) throw new BlkIoError(`${device}: ${what} failed (VIRTIO_BLK_S_IOERR)`);
  throw new BlkIoError(`${device}: ${what} ended with unknown status ${r.status}`);
}
