// MODE SENSE(6)/(10) parameter data (SPC-4 7.5) and the caching mode page (SBC-3 6.5.5).

import { dataView, hex, requireLength, ScsiDataError, TruncatedDataError } from './util.js';

export const ModePage = {
  READ_WRITE_ERROR_RECOVERY: 0x01,
  CACHING: 0x08,
  CONTROL: 0x0a,
  ALL: 0x3f,
} as const;

export interface BlockDescriptor {
  numberOfBlocks: bigint;
  blockLength: number;
}

export interface ModeSenseData {
  mediumType: number;
  /** WP bit of the direct-access DEVICE-SPECIFIC PARAMETER. */
  writeProtected: boolean;
  /** DPO and FUA bits are honoured. */
  dpofua: boolean;
  blockDescriptors: BlockDescriptor[];
  /**
   * Mode pages keyed by page code, or by (page code << 8) | subpage for sub_page format pages
   * with a non-zero subpage. Each value is the whole page including its header.
   */
  pages: Map<number, Uint8Array>;
}

/** Key under which `ModeSenseData.pages` stores a page. */
export function modePageKey(page: number, subpage = 0): number {
  return subpage === 0 ? page : (page << 8) | subpage;
}

interface Header {
  what: string;
  total: number;
  headerLength: number;
  mediumType: number;
  deviceSpecific: number;
  longLba: boolean;
  blockDescriptorLength: number;
}

function parseBody(buf: Uint8Array, h: Header): ModeSenseData {
  const { what, total, headerLength, blockDescriptorLength: bdl } = h;
  requireLength(buf, total, what);
  const pagesStart = headerLength + bdl;
  if (pagesStart > total) {
    throw new ScsiDataError(`${what}: BLOCK DESCRIPTOR LENGTH ${bdl} exceeds MODE DATA LENGTH`);
  }
  const dv = dataView(buf);
  const descSize = h.longLba ? 16 : 8;
  if (bdl % descSize !== 0) {
    throw new ScsiDataError(`${what}: BLOCK DESCRIPTOR LENGTH ${bdl} is not a multiple of ${descSize}`);
  }
  const blockDescriptors: BlockDescriptor[] = [];
  for (let off = headerLength; off < pagesStart; off += descSize) {
    blockDescriptors.push(
      h.longLba
        ? { numberOfBlocks: dv.getBigUint64(off), blockLength: dv.getUint32(off + 12) }
        : { numberOfBlocks: BigInt(dv.getUint32(off)), blockLength: dv.getUint32(off + 4) & 0xffffff },
    );
  }
  const pages = new Map<number, Uint8Array>();
  let off = pagesStart;
  while (off < total) {
    const b0 = buf[off] ?? 0;
    const spf = (b0 & 0x40) !== 0;
    const hdr = spf ? 4 : 2;
    if (off + hdr > total) throw new TruncatedDataError(`${what} page at offset ${off}`, off + hdr, total);
    const len = spf ? dv.getUint16(off + 2) : (buf[off + 1] ?? 0);
    const end = off + hdr + len;
    if (end > total) throw new TruncatedDataError(`${what} page ${hex(b0 & 0x3f)}`, end, total);
    pages.set(modePageKey(b0 & 0x3f, spf ? (buf[off + 1] ?? 0) : 0), buf.subarray(off, end));
    off = end;
  }
  return {
    mediumType: h.mediumType,
    writeProtected: (h.deviceSpecific & 0x80) !== 0,
    dpofua: (h.deviceSpecific & 0x10) !== 0,
    blockDescriptors,
    pages,
  };
}

export function parseModeSense6(buf: Uint8Array): ModeSenseData {
  const what = 'MODE SENSE(6) data';
  requireLength(buf, 4, what);
  return parseBody(buf, {
    what,
    total: (buf[0] ?? 0) + 1,
    headerLength: 4,
    mediumType: buf[1] ?? 0,
    deviceSpecific: buf[2] ?? 0,
    longLba: false,
    blockDescriptorLength: buf[3] ?? 0,
  });
}

export function parseModeSense10(buf: Uint8Array): ModeSenseData {
  const what = 'MODE SENSE(10) data';
  requireLength(buf, 8, what);
  const dv = dataView(buf);
  return parseBody(buf, {
    what,
    total: dv.getUint16(0) + 2,
    headerLength: 8,
    mediumType: buf[2] ?? 0,
    deviceSpecific: buf[3] ?? 0,
    longLba: ((buf[4] ?? 0) & 0x01) !== 0,
    blockDescriptorLength: dv.getUint16(6),
  });
}

export interface CachingPage {
  /** Write cache enabled: writes complete before reaching the medium. */
  wce: boolean;
  /** Read cache disabled. */
  rcd: boolean;
}

/** Decodes the caching mode page as stored in `ModeSenseData.pages`. */
export function parseCachingPage(page: Uint8Array): CachingPage {
  const what = 'caching mode page';
  requireLength(page, 3, what);
  const b0 = page[0] ?? 0;
  const code = b0 & 0x3f;
  if (code !== ModePage.CACHING) throw new ScsiDataError(`${what}: got page ${hex(code)}`);
  // The caching page is page_0 format; with SPF set byte 2 would be PAGE LENGTH, not the flags.
  if (b0 & 0x40) throw new ScsiDataError(`${what}: sub_page format (subpage ${hex(page[1] ?? 0)})`);
  const b2 = page[2] ?? 0;
  return { wce: (b2 & 0x04) !== 0, rcd: (b2 & 0x01) !== 0 };
}
