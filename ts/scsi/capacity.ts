// READ CAPACITY parameter data (SBC-3 5.15.2 and 5.16.2).

import { dataView, requireLength } from './util.js';

export interface Capacity10 {
  /** Address of the last block; 0xffffffff means "too large, ask READ CAPACITY (16)". */
  lastLba: number;
  blockSize: number;
  /** The device is too large for the 10-byte command: issue READ CAPACITY (16). */
  needs16: boolean;
}

export function parseReadCapacity10(buf: Uint8Array): Capacity10 {
  requireLength(buf, 8, 'READ CAPACITY(10) data');
  const dv = dataView(buf);
  const lastLba = dv.getUint32(0);
  return { lastLba, blockSize: dv.getUint32(4), needs16: lastLba === 0xffffffff };
}

export interface Capacity16 {
  lastLba: bigint;
  blockSize: number;
  protectionEnabled: boolean;
  /** Protection type 1..3 when enabled, else 0. */
  protectionType: number;
  /** Logical block provisioning management enabled (thin provisioning). */
  lbpme: boolean;
  /** Unmapped blocks read back as zeroes. */
  lbprz: boolean;
  /** Logical blocks per physical block is 2^physicalBlockExponent. */
  physicalBlockExponent: number;
  lowestAlignedLba: number;
}

/**
 * The full parameter data is 32 bytes; the fields decoded here end at byte 15, so that is the
 * minimum accepted.
 */
export function parseReadCapacity16(buf: Uint8Array): Capacity16 {
  requireLength(buf, 16, 'READ CAPACITY(16) data');
  const dv = dataView(buf);
  const b12 = buf[12] ?? 0;
  const b14 = buf[14] ?? 0;
  const protectionEnabled = (b12 & 0x01) !== 0;
  return {
    lastLba: dv.getBigUint64(0),
    blockSize: dv.getUint32(8),
    protectionEnabled,
    protectionType: protectionEnabled ? ((b12 >> 1) & 0x07) + 1 : 0,
    lbpme: (b14 & 0x80) !== 0,
    lbprz: (b14 & 0x40) !== 0,
    physicalBlockExponent: (buf[13] ?? 0) & 0x0f,
    lowestAlignedLba: dv.getUint16(14) & 0x3fff,
  };
}
