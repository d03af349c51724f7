// Standard INQUIRY data (SPC-4 6.6.2) and the VPD pages a block initiator reads
// (SPC-4 7.8: 0x00, 0x80, 0x83; SBC-3 6.6: 0xB0, 0xB1, 0xB2).

import {
  asciiField,
  dataView,
  hex,
  hexBytes,
  requireLength,
  ScsiDataError,
  TruncatedDataError,
  utf8Field,
} from './util.js';

export const VpdPage = {
  SUPPORTED_PAGES: 0x00,
  UNIT_SERIAL_NUMBER: 0x80,
  DEVICE_IDENTIFICATION: 0x83,
  BLOCK_LIMITS: 0xb0,
  BLOCK_DEVICE_CHARACTERISTICS: 0xb1,
  LOGICAL_BLOCK_PROVISIONING: 0xb2,
} as const;

/** Peripheral qualifier 3: the target has no logical unit at this address. */
export const PQ_NOT_CONNECTED = 3;

const DEVICE_TYPE_NAMES: readonly string[] = [
  'direct access block device',
  'sequential access device',
  'printer device',
  'processor device',
  'write-once device',
  'CD/DVD device',
  'scanner device',
  'optical memory device',
  'media changer device',
  'communications device',
  'obsolete',
  'obsolete',
  'storage array controller device',
  'enclosure services device',
  'simplified direct access device',
  'optical card reader/writer device',
  'bridge controller commands',
  'object-based storage device',
  'automation/drive interface',
  'security manager device',
  'host managed zoned block device',
];

export function deviceTypeName(type: number): string {
  if (type === 0x1e) return 'well known logical unit';
  if (type === 0x1f) return 'unknown or no device type';
  return DEVICE_TYPE_NAMES[type] ?? `reserved device type ${hex(type)}`;
}

export interface StandardInquiry {
  peripheralQualifier: number;
  deviceType: number;
  deviceTypeName: string;
  removable: boolean;
  /** Claimed standard: 5 = SPC-3, 6 = SPC-4, 7 = SPC-5. */
  version: number;
  responseDataFormat: number;
  /** Target port group support (ALUA), bits 5:4 of byte 5. */
  tpgs: number;
  /** Protection information supported. */
  protect: boolean;
  cmdQue: boolean;
  vendor: string;
  product: string;
  revision: string;
}

export function parseInquiry(buf: Uint8Array): StandardInquiry {
  // SPC-4: standard INQUIRY data holds at least 36 bytes (through PRODUCT REVISION LEVEL).
  requireLength(buf, 36, 'standard INQUIRY data');
  const b0 = buf[0] ?? 0;
  const b5 = buf[5] ?? 0;
  const type = b0 & 0x1f;
  return {
    peripheralQualifier: b0 >> 5,
    deviceType: type,
    deviceTypeName: deviceTypeName(type),
    removable: ((buf[1] ?? 0) & 0x80) !== 0,
    version: buf[2] ?? 0,
    responseDataFormat: (buf[3] ?? 0) & 0x0f,
    tpgs: (b5 >> 4) & 0x03,
    protect: (b5 & 0x01) !== 0,
    cmdQue: ((buf[7] ?? 0) & 0x02) !== 0,
    vendor: asciiField(buf.subarray(8, 16)),
    product: asciiField(buf.subarray(16, 32)),
    revision: asciiField(buf.subarray(32, 36)),
  };
}

const VPD_NAMES: ReadonlyMap<number, string> = new Map([
  [VpdPage.SUPPORTED_PAGES, 'supported VPD pages'],
  [VpdPage.UNIT_SERIAL_NUMBER, 'unit serial number'],
  [VpdPage.DEVICE_IDENTIFICATION, 'device identification'],
  [VpdPage.BLOCK_LIMITS, 'block limits'],
  [VpdPage.BLOCK_DEVICE_CHARACTERISTICS, 'block device characteristics'],
  [VpdPage.LOGICAL_BLOCK_PROVISIONING, 'logical block provisioning'],
]);

function vpdLabel(page: number): string {
  return `VPD page ${hex(page)} (${VPD_NAMES.get(page) ?? 'unknown'})`;
}

/**
 * Checks a VPD page header (page code, PAGE LENGTH) and returns the page truncated to its
 * declared length. Throws when the buffer holds less than the header promises.
 */
function vpdPage(buf: Uint8Array, page: number, minPayload = 0): Uint8Array {
  // The label is built only for an error: this runs for every page of every scanned LUN.
  if (buf.length < 4) throw new TruncatedDataError(vpdLabel(page), 4, buf.length);
  if (buf[1] !== page) throw new ScsiDataError(`${vpdLabel(page)}: response carries page ${hex(buf[1] ?? 0)}`);
  const total = 4 + ((buf[2]! << 8) | buf[3]!);
  if (buf.length < total) throw new TruncatedDataError(vpdLabel(page), total, buf.length);
  if (total < 4 + minPayload) {
    throw new ScsiDataError(`${vpdLabel(page)}: PAGE LENGTH ${total - 4} below the minimum of ${minPayload}`);
  }
  return buf.subarray(0, total);
}

/** VPD 0x00: the page codes the logical unit supports. */
export function parseVpdSupportedPages(buf: Uint8Array): number[] {
  const page = vpdPage(buf, VpdPage.SUPPORTED_PAGES);
  // An indexed copy: Array.from would walk an iterator, one result object per byte.
  const out = new Array<number>(page.length - 4);
  for (let i = 4; i < page.length; i++) out[i - 4] = page[i]!;
  return out;
}

/** VPD 0x80: the product serial number, trimmed. */
export function parseVpdSerial(buf: Uint8Array): string {
  return asciiField(vpdPage(buf, VpdPage.UNIT_SERIAL_NUMBER).subarray(4));
}

export const CodeSet = { BINARY: 1, ASCII: 2, UTF8: 3 } as const;
export const Association = { LOGICAL_UNIT: 0, TARGET_PORT: 1, TARGET_DEVICE: 2 } as const;

const DESIGNATOR_TYPE_NAMES: readonly string[] = [
  'vendor specific',
  'T10 vendor ID',
  'EUI-64',
  'NAA',
  'relative target port',
  'target port group',
  'logical unit group',
  'MD5 logical unit',
  'SCSI name string',
  'protocol specific port',
  'UUID',
];

export interface Designator {
  protocolIdentifier: number;
  codeSet: number;
  /** PIV: `protocolIdentifier` is meaningful. */
  piv: boolean;
  association: number;
  type: number;
  typeName: string;
  /** Text for the ASCII and UTF-8 code sets, lower-case hex otherwise. */
  value: string;
}

/** VPD 0x83: the designation descriptors, in page order. */
export function parseVpdDeviceId(buf: Uint8Array): Designator[] {
  const page = vpdPage(buf, VpdPage.DEVICE_IDENTIFICATION);
  const out: Designator[] = [];
  let off = 4;
  while (off < page.length) {
    const what = (): string => `${vpdLabel(VpdPage.DEVICE_IDENTIFICATION)} designator ${out.length}`;
    if (off + 4 > page.length) throw new TruncatedDataError(what(), off + 4, page.length);
    const b0 = page[off] ?? 0;
    const b1 = page[off + 1] ?? 0;
    const end = off + 4 + (page[off + 3] ?? 0);
    if (end > page.length) throw new TruncatedDataError(what(), end, page.length);
    const codeSet = b0 & 0x0f;
    const type = b1 & 0x0f;
    const body = page.subarray(off + 4, end);
    out.push({
      protocolIdentifier: b0 >> 4,
      codeSet,
      piv: (b1 & 0x80) !== 0,
      association: (b1 >> 4) & 0x03,
      type,
      typeName: DESIGNATOR_TYPE_NAMES[type] ?? `reserved type ${hex(type)}`,
      value:
        codeSet === CodeSet.ASCII
          ? asciiField(body)
          : codeSet === CodeSet.UTF8
            ? utf8Field(body)
            : hexBytes(body),
    });
    off = end;
  }
  return out;
}

export interface BlockLimits {
  /** Write same non-zero: WRITE SAME with 0 blocks is not "to the end of the medium". */
  wsnz: boolean;
  maxCompareWriteLength: number;
  optimalTransferLengthGranularity: number;
  maxTransferLength: number;
  optimalTransferLength: number;
  maxPrefetchLength: number;
  maxUnmapLbaCount: number;
  maxUnmapBlockDescriptorCount: number;
  optimalUnmapGranularity: number;
  /** Present only when the UGAVALID bit is set. */
  unmapGranularityAlignment?: number;
  maxWriteSameLength: bigint;
}

/**
 * VPD 0xB0. Targets written before SBC-3 send a page of length 0x0c (through OPTIMAL TRANSFER
 * LENGTH); fields past the page's own length read as 0, which SBC-3 defines as "no limit
 * reported" for each of them.
 */
export function parseVpdBlockLimits(buf: Uint8Array): BlockLimits {
  const page = vpdPage(buf, VpdPage.BLOCK_LIMITS);
  const dv = dataView(page);
  const has = (off: number, size: number): boolean => off + size <= page.length;
  const u32 = (off: number): number => (has(off, 4) ? dv.getUint32(off) : 0);
  const ugaWord = u32(32);
  const limits: BlockLimits = {
    wsnz: has(4, 1) && ((page[4] ?? 0) & 0x01) !== 0,
    maxCompareWriteLength: page[5] ?? 0,
    optimalTransferLengthGranularity: has(6, 2) ? dv.getUint16(6) : 0,
    maxTransferLength: u32(8),
    optimalTransferLength: u32(12),
    maxPrefetchLength: u32(16),
    maxUnmapLbaCount: u32(20),
    maxUnmapBlockDescriptorCount: u32(24),
    optimalUnmapGranularity: u32(28),
    maxWriteSameLength: has(36, 8) ? dv.getBigUint64(36) : 0n,
  };
  if (ugaWord & 0x80000000) limits.unmapGranularityAlignment = ugaWord & 0x7fffffff;
  return limits;
}

export interface BlockCharacteristics {
  /** 0 not reported, 1 non-rotating medium (solid state), else revolutions per minute. */
  rotationRate: number;
  productType: number;
  /** 0 not reported, 1 5.25", 2 3.5", 3 2.5", 4 1.8", 5 below 1.8". */
  nominalFormFactor: number;
}

/** VPD 0xB1. */
export function parseVpdBlockCharacteristics(buf: Uint8Array): BlockCharacteristics {
  const page = vpdPage(buf, VpdPage.BLOCK_DEVICE_CHARACTERISTICS, 4);
  return {
    rotationRate: dataView(page).getUint16(4),
    productType: page[6] ?? 0,
    nominalFormFactor: (page[7] ?? 0) & 0x0f,
  };
}

export const ProvisioningType = { FULL: 0, RESOURCE: 1, THIN: 2 } as const;

export interface LogicalBlockProvisioning {
  thresholdExponent: number;
  /** UNMAP supported. */
  lbpu: boolean;
  /** WRITE SAME(16) with UNMAP supported. */
  lbpws: boolean;
  /** WRITE SAME(10) with UNMAP supported. */
  lbpws10: boolean;
  /** Unmapped blocks read back as zeroes. */
  lbprz: boolean;
  /** ANC_SUP: the ANCHOR bit of UNMAP is supported. */
  ancSup: boolean;
  /** A provisioning group descriptor follows. */
  dp: boolean;
  /** See `ProvisioningType`. */
  provisioningType: number;
}

/** VPD 0xB2. */
export function parseVpdLogicalBlockProvisioning(buf: Uint8Array): LogicalBlockProvisioning {
  const page = vpdPage(buf, VpdPage.LOGICAL_BLOCK_PROVISIONING, 4);
  const b5 = page[5] ?? 0;
  return {
    thresholdExponent: page[4] ?? 0,
    lbpu: (b5 & 0x80) !== 0,
    lbpws: (b5 & 0x40) !== 0,
    lbpws10: (b5 & 0x20) !== 0,
    // SBC-4 widened LBPRZ to bits 4:2; bit 2 still means "reads return zeroes".
    lbprz: (b5 & 0x04) !== 0,
    ancSup: (b5 & 0x02) !== 0,
    dp: (b5 & 0x01) !== 0,
    provisioningType: (page[6] ?? 0) & 0x07,
  };
}
