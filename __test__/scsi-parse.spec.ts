import test from 'ava';

import {
  decodeLun,
  modePageKey,
  parseCachingPage,
  parseInquiry,
  parseModeSense10,
  parseModeSense6,
  parseReadCapacity10,
  parseReadCapacity16,
  parseReportLuns,
  parseReportLunsRaw,
  parseVpdBlockCharacteristics,
  parseVpdBlockLimits,
  parseVpdDeviceId,
  parseVpdLogicalBlockProvisioning,
  parseVpdSerial,
  parseVpdSupportedPages,
  ScsiDataError,
  TruncatedDataError,
} from '../ts/scsi/index.js';

// Fixtures are written by hand from the SPC-4 / SBC-3 layouts: hex strings (spaces ignored)
// and ASCII pieces concatenated in wire order.
type Piece = string | { ascii: string };
const bytes = (...pieces: Piece[]): Uint8Array =>
  new Uint8Array(
    Buffer.concat(
      pieces.map((p) =>
        typeof p === 'string' ? Buffer.from(p.replace(/\s+/g, ''), 'hex') : Buffer.from(p.ascii, 'latin1'),
      ),
    ),
  );
const zeros = (n: number): string => '00'.repeat(n);

// QEMU scsi-hd answers a standard INQUIRY like this: SPC-3, HiSup, format 2, CmdQue.
const QEMU_INQUIRY = bytes('00 00 05 12 1f 00 00 02', { ascii: 'QEMU    QEMU HARDDISK   2.5+' });

test('standard INQUIRY: QEMU disk', (t) => {
  t.is(QEMU_INQUIRY.length, 36);
  t.deepEqual(parseInquiry(QEMU_INQUIRY), {
    peripheralQualifier: 0,
    deviceType: 0,
    deviceTypeName: 'direct access block device',
    removable: false,
    version: 5,
    responseDataFormat: 2,
    tpgs: 0,
    protect: false,
    cmdQue: true,
    vendor: 'QEMU',
    product: 'QEMU HARDDISK',
    revision: '2.5+',
  });
});

test('standard INQUIRY: removable CD-ROM, no-LUN answer, NUL padding, truncation', (t) => {
  const cd = parseInquiry(
    bytes('05 80 05 02 1f 00 00 00', { ascii: 'QEMU\0\0\0\0QEMU CD-ROM\0\0\0\0\0' }, '00 00 00 00'),
  );
  t.is(cd.deviceType, 5);
  t.is(cd.deviceTypeName, 'CD/DVD device');
  t.true(cd.removable);
  t.false(cd.cmdQue);
  t.is(cd.vendor, 'QEMU');
  t.is(cd.product, 'QEMU CD-ROM');
  t.is(cd.revision, '');

  const none = parseInquiry(bytes('7f 00 06 02 1f 31 00 00', zeros(28)));
  t.is(none.peripheralQualifier, 3);
  t.is(none.deviceType, 0x1f);
  t.is(none.deviceTypeName, 'unknown or no device type');
  t.is(none.version, 6);
  t.is(none.tpgs, 3);
  t.true(none.protect);

  const err = t.throws(() => parseInquiry(QEMU_INQUIRY.subarray(0, 35)), { instanceOf: TruncatedDataError });
  t.is(err?.needed, 36);
  t.regex(err?.message ?? '', /standard INQUIRY data truncated: need 36 bytes, got 35/);
});

test('VPD 0x00 supported pages and 0x80 serial', (t) => {
  t.deepEqual(parseVpdSupportedPages(bytes('00 00 00 06 00 80 83 b0 b1 b2')), [0, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
  const err = t.throws(() => parseVpdSupportedPages(bytes('00 00 00 06 00 80 83 b0')), {
    instanceOf: TruncatedDataError,
    message: /VPD page 0x00 \(supported VPD pages\) truncated/,
  });
  t.is(err?.needed, 10);
  t.throws(() => parseVpdSupportedPages(bytes('00 80 00 00')), {
    instanceOf: ScsiDataError,
    message: /carries page 0x80/,
  });
  t.throws(() => parseVpdSupportedPages(bytes('00 00')), { instanceOf: TruncatedDataError });

  t.is(parseVpdSerial(bytes('00 80 00 0a', { ascii: '  QM00001 ' })), 'QM00001');
  t.is(parseVpdSerial(bytes('00 80 00 00')), '');
  t.throws(() => parseVpdSerial(bytes('00 80 00 0a', { ascii: 'QM' })), { instanceOf: TruncatedDataError });
});

test('VPD 0x83 device identification', (t) => {
  const descs = bytes(
    '02 00 00 05', { ascii: 'disk0' }, // vendor specific, ASCII
    '01 03 00 08 60 01 40 50 12 34 56 78', // NAA, binary
    '02 01 00 0c', { ascii: 'QEMU    sn1 ' }, // T10 vendor ID, ASCII
    '51 94 00 04 00 00 00 01', // relative target port, PIV, protocol 5, target port association
    '03 28 00 08', { ascii: 'iqn.x\0\0\0' }, // SCSI name string, UTF-8, target device association
  );
  const page = bytes('00 83', descs.length.toString(16).padStart(4, '0'), Buffer.from(descs).toString('hex'));
  const d = parseVpdDeviceId(page);
  t.is(d.length, 5);
  t.like(d[0], { codeSet: 2, association: 0, type: 0, typeName: 'vendor specific', value: 'disk0' });
  t.like(d[1], { codeSet: 1, type: 3, typeName: 'NAA', value: '6001405012345678', piv: false });
  t.like(d[2], { type: 1, typeName: 'T10 vendor ID', value: 'QEMU    sn1' });
  t.deepEqual(d[3], {
    protocolIdentifier: 5,
    codeSet: 1,
    piv: true,
    association: 1,
    type: 4,
    typeName: 'relative target port',
    value: '00000001',
  });
  t.like(d[4], { codeSet: 3, association: 2, type: 8, typeName: 'SCSI name string', value: 'iqn.x' });

  // Page length fits the buffer, but the only designator claims more than the page holds.
  t.throws(() => parseVpdDeviceId(bytes('00 83 00 08 01 03 00 10 60 01 40 50')), {
    instanceOf: TruncatedDataError,
    message: /designator 0 truncated: need 24/,
  });
  t.deepEqual(parseVpdDeviceId(bytes('00 83 00 00')), []);
});

test('VPD 0xB0 block limits: full SBC-3 page', (t) => {
  const page = bytes(
    '00 b0 00 3c',
    '01 01 00 08', // WSNZ, max COMPARE AND WRITE 1, granularity 8
    '00 00 40 00 00 00 01 00', // max transfer 0x4000, optimal 0x100
    '00 00 00 00 00 40 00 00', // max prefetch 0, max unmap LBA count 0x400000
    '00 00 01 00 00 00 00 08', // max unmap descriptors 256, unmap granularity 8
    '80 00 00 02', // UGAVALID, alignment 2
    '00 00 00 01 00 00 00 00', // max WRITE SAME length 2^32
    zeros(20),
  );
  t.is(page.length, 64);
  t.deepEqual(parseVpdBlockLimits(page), {
    wsnz: true,
    maxCompareWriteLength: 1,
    optimalTransferLengthGranularity: 8,
    maxTransferLength: 0x4000,
    optimalTransferLength: 0x100,
    maxPrefetchLength: 0,
    maxUnmapLbaCount: 0x400000,
    maxUnmapBlockDescriptorCount: 256,
    optimalUnmapGranularity: 8,
    unmapGranularityAlignment: 2,
    maxWriteSameLength: 0x100000000n,
  });
  t.throws(() => parseVpdBlockLimits(page.subarray(0, 20)), { instanceOf: TruncatedDataError, message: /need 64/ });
});

test('VPD 0xB0 block limits: short pre-SBC-3 page reads absent fields as 0', (t) => {
  const bl = parseVpdBlockLimits(bytes('00 b0 00 0c 00 00 00 01 00 00 ff ff 00 00 00 80'));
  t.is(bl.optimalTransferLengthGranularity, 1);
  t.is(bl.maxTransferLength, 0xffff);
  t.is(bl.optimalTransferLength, 0x80);
  t.is(bl.maxUnmapLbaCount, 0);
  t.is(bl.maxUnmapBlockDescriptorCount, 0);
  t.is(bl.unmapGranularityAlignment, undefined);
  t.is(bl.maxWriteSameLength, 0n);
  t.false(bl.wsnz);
});

test('VPD 0xB1 and 0xB2', (t) => {
  t.deepEqual(parseVpdBlockCharacteristics(bytes('00 b1 00 3c 00 01 00 03', zeros(56))), {
    rotationRate: 1,
    productType: 0,
    nominalFormFactor: 3,
  });
  t.like(parseVpdBlockCharacteristics(bytes('00 b1 00 3c 1c 20 00 02', zeros(56))), {
    rotationRate: 7200,
    nominalFormFactor: 2,
  });
  t.throws(() => parseVpdBlockCharacteristics(bytes('00 b1 00 02 00 01')), {
    instanceOf: ScsiDataError,
    message: /PAGE LENGTH 2 below the minimum of 4/,
  });

  t.deepEqual(parseVpdLogicalBlockProvisioning(bytes('00 b2 00 04 00 e6 02 00')), {
    thresholdExponent: 0,
    lbpu: true,
    lbpws: true,
    lbpws10: true,
    lbprz: true,
    ancSup: true,
    dp: false,
    provisioningType: 2,
  });
  t.like(parseVpdLogicalBlockProvisioning(bytes('00 b2 00 04 00 80 00 00')), {
    lbpu: true,
    lbpws: false,
    lbprz: false,
    provisioningType: 0,
  });
  t.throws(() => parseVpdLogicalBlockProvisioning(bytes('00 b2 00 04 00 e6')), { instanceOf: TruncatedDataError });
});

test('READ CAPACITY(10)', (t) => {
  t.deepEqual(parseReadCapacity10(bytes('00 3f ff ff 00 00 02 00')), {
    lastLba: 0x3fffff,
    blockSize: 512,
    needs16: false,
  });
  t.true(parseReadCapacity10(bytes('ff ff ff ff 00 00 10 00')).needs16);
  t.throws(() => parseReadCapacity10(bytes('00 3f ff ff 00 00 02')), {
    instanceOf: TruncatedDataError,
    message: /READ CAPACITY\(10\)/,
  });
});

test('READ CAPACITY(16)', (t) => {
  t.deepEqual(parseReadCapacity16(bytes('00 00 00 02 00 00 00 00 00 00 10 00 05 03 c0 08', zeros(16))), {
    lastLba: 0x200000000n,
    blockSize: 4096,
    protectionEnabled: true,
    protectionType: 3,
    lbpme: true,
    lbprz: true,
    physicalBlockExponent: 3,
    lowestAlignedLba: 8,
  });
  const huge = parseReadCapacity16(bytes('ff ff ff ff ff ff ff fe 00 00 02 00 00 00 00 00', zeros(16)));
  t.is(huge.lastLba, 0xfffffffffffffffen);
  t.false(huge.protectionEnabled);
  t.is(huge.protectionType, 0);
  t.throws(() => parseReadCapacity16(new Uint8Array(15)), { instanceOf: TruncatedDataError, message: /need 16/ });
});

test('REPORT LUNS: peripheral and flat space decoded, others skipped', (t) => {
  const data = bytes(
    '00 00 00 38 00 00 00 00',
    '00 00 00 00 00 00 00 00', // peripheral LUN 0
    '00 05 00 00 00 00 00 00', // peripheral LUN 5
    '41 00 00 00 00 00 00 00', // flat space LUN 256
    '7f ff 00 00 00 00 00 00', // flat space LUN 16383
    '00 01 00 02 00 00 00 00', // two-level LUN: skipped
    '80 01 00 00 00 00 00 00', // logical unit addressing: skipped
    '01 05 00 00 00 00 00 00', // peripheral on bus 1: skipped
  );
  t.deepEqual(parseReportLuns(data), [0, 5, 256, 16383]);
  const raw = parseReportLunsRaw(data);
  t.is(raw.length, 7);
  t.is(raw[4], 0x0001000200000000n);
  t.is(decodeLun(0x4123000000000000n), 0x123);
  t.is(decodeLun(0x0105000000000000n), undefined);
  t.deepEqual(parseReportLuns(bytes('00 00 00 00 00 00 00 00')), []);

  const err = t.throws(() => parseReportLuns(bytes('00 00 00 10 00 00 00 00', zeros(8))), {
    instanceOf: TruncatedDataError,
  });
  t.is(err?.needed, 24);
  t.throws(() => parseReportLuns(bytes('00 00 00 0c 00 00 00 00', zeros(12))), {
    instanceOf: ScsiDataError,
    message: /not a multiple of 8/,
  });
  t.throws(() => parseReportLuns(bytes('00 00 00')), { instanceOf: TruncatedDataError });
});

test('MODE SENSE(6): header, short block descriptor, caching and control pages', (t) => {
  const data = bytes(
    '2b 00 90 08', // data length 43, WP and DPOFUA, one 8-byte block descriptor
    '00 20 00 00 00 00 02 00', // 0x200000 blocks of 512
    '08 12 04 00', zeros(16), // caching page, WCE
    '0a 0a', zeros(10), // control page
  );
  t.is(data.length, 44);
  const ms = parseModeSense6(data);
  t.is(ms.mediumType, 0);
  t.true(ms.writeProtected);
  t.true(ms.dpofua);
  t.deepEqual(ms.blockDescriptors, [{ numberOfBlocks: 0x200000n, blockLength: 512 }]);
  t.deepEqual([...ms.pages.keys()], [0x08, 0x0a]);
  t.is(ms.pages.get(0x0a)?.length, 12);
  const caching = ms.pages.get(0x08);
  t.truthy(caching);
  t.deepEqual(parseCachingPage(caching ?? new Uint8Array(0)), { wce: true, rcd: false });
  t.throws(() => parseCachingPage(ms.pages.get(0x0a) ?? new Uint8Array(0)), { message: /got page 0x0a/ });

  const err = t.throws(() => parseModeSense6(data.subarray(0, 30)), { instanceOf: TruncatedDataError });
  t.is(err?.needed, 44);
  t.throws(() => parseModeSense6(bytes('0f 00 00 0c', zeros(12))), {
    instanceOf: ScsiDataError,
    message: /multiple of 8/,
  });
  // A page whose length runs past MODE DATA LENGTH.
  t.throws(() => parseModeSense6(bytes('07 00 00 00 08 12 04 00')), {
    instanceOf: TruncatedDataError,
    message: /page 0x08/,
  });
});

test('MODE SENSE(10): long LBA descriptor and sub_page format page', (t) => {
  const data = bytes(
    '00 4a 00 00 01 00 00 10', // data length 74, LONGLBA, 16-byte descriptor
    '00 00 00 01 00 00 00 00 00 00 00 00 00 00 10 00', // 2^32 blocks of 4096
    '08 12 05 00', zeros(16), // caching page: WCE and RCD
    '4a 01 00 1c', zeros(28), // control extension subpage (0x0a/0x01)
  );
  t.is(data.length, 76);
  const ms = parseModeSense10(data);
  t.false(ms.writeProtected);
  t.deepEqual(ms.blockDescriptors, [{ numberOfBlocks: 0x100000000n, blockLength: 4096 }]);
  t.deepEqual([...ms.pages.keys()], [0x08, modePageKey(0x0a, 0x01)]);
  t.is(modePageKey(0x0a, 0x01), 0x0a01);
  t.is(ms.pages.get(0x0a01)?.length, 32);
  t.deepEqual(parseCachingPage(ms.pages.get(0x08) ?? new Uint8Array(0)), { wce: true, rcd: true });
  t.throws(() => parseModeSense10(data.subarray(0, 7)), {
    instanceOf: TruncatedDataError,
    message: /MODE SENSE\(10\)/,
  });
});
