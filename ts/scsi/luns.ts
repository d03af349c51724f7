// REPORT LUNS parameter data (SPC-4 6.33) and SAM-5 single-level LUN decoding.

import { dataView, requireLength, ScsiDataError, TruncatedDataError } from './util.js';

/**
 * Every 8-byte LUN entry as a raw big-endian bigint, in list order. Throws when the buffer
 * holds fewer entries than LUN LIST LENGTH announces; `needed` on the error is the allocation
 * length that would have been enough.
 */
export function parseReportLunsRaw(buf: Uint8Array): bigint[] {
  requireLength(buf, 8, 'REPORT LUNS data');
  const dv = dataView(buf);
  const listLength = dv.getUint32(0);
  if (listLength % 8 !== 0) {
    throw new ScsiDataError(`REPORT LUNS data: LUN LIST LENGTH ${listLength} is not a multiple of 8`);
  }
  if (buf.length < 8 + listLength) {
    throw new TruncatedDataError('REPORT LUNS data', 8 + listLength, buf.length);
  }
  const out: bigint[] = [];
  for (let off = 8; off < 8 + listLength; off += 8) out.push(dv.getBigUint64(off));
  return out;
}

/**
 * Decodes one 8-byte LUN as a single-level LUN number, or returns undefined for LUNs this
 * initiator cannot address over virtio-scsi: peripheral addressing (byte 0 = 0, LUN in byte 1)
 * and flat space addressing (byte 0 bits 7:6 = 01, 14-bit LUN) with the remaining six bytes
 * zero are decoded; multi-level, logical unit addressing, extended and well-known LUNs are not.
 */
export function decodeLun(raw: bigint): number | undefined {
  if ((raw & 0xffff_ffff_ffffn) !== 0n) return undefined;
  const top = Number(raw >> 48n);
  const b0 = top >> 8;
  if (b0 === 0) return top & 0xff;
  if (b0 >> 6 === 1) return top & 0x3fff;
  return undefined;
}

/**
 * REPORT LUNS -> LUN numbers in list order. Entries `decodeLun` cannot express are skipped;
 * use `parseReportLunsRaw` to see them.
 */
export function parseReportLuns(buf: Uint8Array): number[] {
  const out: number[] = [];
  for (const raw of parseReportLunsRaw(buf)) {
    const lun = decodeLun(raw);
    if (lun !== undefined) out.push(lun);
  }
  return out;
}
