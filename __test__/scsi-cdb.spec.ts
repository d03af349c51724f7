import test from 'ava';

import {
  describeCdb,
  fits10,
  inquiry,
  MAX_UNMAP_DESCRIPTORS,
  modeSense10,
  modeSense6,
  Opcode,
  PageControl,
  read,
  read10,
  read16,
  readCapacity10,
  readCapacity16,
  reportLuns,
  requestSense,
  startStopUnit,
  synchronizeCache10,
  synchronizeCache16,
  testUnitReady,
  unmap,
  unmapParameterList,
  write,
  write10,
  write16,
  writeSame16,
} from '../ts/scsi/index.js';

// Expected CDBs are written out byte by byte from the SBC-3 / SPC-4 CDB tables.
const hex = (b: Uint8Array): string =>
  Array.from(b, (x) => x.toString(16).padStart(2, '0')).join(' ');

test('READ(10) and WRITE(10) layouts', (t) => {
  t.is(hex(read10({ lba: 0x01020304, blocks: 8 })), '28 00 01 02 03 04 00 00 08 00');
  t.is(hex(write10({ lba: 0x10, blocks: 0x0102, fua: true })), '2a 08 00 00 00 10 00 01 02 00');
  t.is(read10({ lba: 0, blocks: 1 })[0], Opcode.READ_10);
});

test('READ(16) and WRITE(16) layouts, bigint LBAs above 2^53', (t) => {
  t.is(
    hex(read16({ lba: 0x0102030405060708n, blocks: 0x10000 })),
    '88 00 01 02 03 04 05 06 07 08 00 01 00 00 00 00',
  );
  t.is(
    hex(write16({ lba: 2n ** 53n + 1n, blocks: 1, fua: true })),
    '8a 08 00 20 00 00 00 00 00 01 00 00 00 01 00 00',
  );
  t.is(
    hex(read16({ lba: 2n ** 64n - 1n, blocks: 0xffffffff })),
    '88 00 ff ff ff ff ff ff ff ff ff ff ff ff 00 00',
  );
  // The largest safe number is accepted as a number.
  t.is(
    hex(read16({ lba: Number.MAX_SAFE_INTEGER, blocks: 1 })),
    '88 00 00 1f ff ff ff ff ff ff 00 00 00 01 00 00',
  );
});

test('read/write choose the 10-byte form exactly at the boundaries', (t) => {
  t.is(read({ lba: 0xffffffff, blocks: 0xffff })[0], Opcode.READ_10);
  t.is(read({ lba: 0x100000000, blocks: 1 })[0], Opcode.READ_16);
  t.is(read({ lba: 0, blocks: 0x10000 })[0], Opcode.READ_16);
  t.is(read({ lba: 5n, blocks: 1 })[0], Opcode.READ_10);
  t.is(write({ lba: 0xffffffffn, blocks: 1 })[0], Opcode.WRITE_10);
  t.is(write({ lba: 2n ** 60n, blocks: 1 })[0], Opcode.WRITE_16);
  t.is(hex(write({ lba: 0x100000000, blocks: 2, fua: true })), '8a 08 00 00 00 01 00 00 00 00 00 00 00 02 00 00');
  t.true(fits10(0xffffffff, 0xffff));
  t.false(fits10(0xffffffff, 0x10000));
});

test('LBA and block count validation names the field', (t) => {
  t.throws(() => read10({ lba: 2 ** 32, blocks: 1 }), { instanceOf: RangeError, message: /lba/ });
  t.throws(() => read10({ lba: 0, blocks: 0x10000 }), { instanceOf: RangeError, message: /blocks/ });
  t.throws(() => read16({ lba: 2n ** 64n, blocks: 1 }), { instanceOf: RangeError, message: /lba/ });
  t.throws(() => read16({ lba: -1, blocks: 1 }), { instanceOf: RangeError, message: /lba/ });
  t.throws(() => read16({ lba: -1n, blocks: 1 }), { instanceOf: RangeError, message: /lba/ });
  t.throws(() => read16({ lba: 2 ** 53, blocks: 1 }), { instanceOf: RangeError, message: /safe integer/ });
  t.throws(() => read16({ lba: 1.5, blocks: 1 }), { instanceOf: RangeError, message: /lba/ });
  t.throws(() => write16({ lba: 0, blocks: 2 ** 32 }), { instanceOf: RangeError, message: /blocks/ });
  t.throws(() => write16({ lba: 0, blocks: 0.5 }), { instanceOf: RangeError, message: /blocks.*integer/ });
  t.throws(() => read({ lba: 0, blocks: -1 }), { instanceOf: RangeError, message: /blocks/ });
});

test('INQUIRY standard and VPD', (t) => {
  t.is(hex(inquiry({ allocationLength: 96 })), '12 00 00 00 60 00');
  t.is(hex(inquiry({ page: 0x83, allocationLength: 4096 })), '12 01 83 10 00 00');
  t.is(hex(inquiry({ evpd: true, allocationLength: 255 })), '12 01 00 00 ff 00');
  t.throws(() => inquiry({ evpd: false, page: 0x80, allocationLength: 8 }), {
    instanceOf: RangeError,
    message: /page 0x80 requires evpd/,
  });
  t.throws(() => inquiry({ allocationLength: 0x10000 }), { instanceOf: RangeError, message: /allocationLength/ });
  t.throws(() => inquiry({ page: 0x100, allocationLength: 8 }), { instanceOf: RangeError, message: /page/ });
});

test('TEST UNIT READY, START STOP UNIT, REQUEST SENSE', (t) => {
  t.is(hex(testUnitReady()), '00 00 00 00 00 00');
  t.is(hex(startStopUnit({ start: true, immed: true })), '1b 01 00 00 01 00');
  t.is(hex(startStopUnit({ start: false, loej: true })), '1b 00 00 00 02 00');
  t.is(hex(requestSense(252, true)), '03 01 00 00 fc 00');
  t.is(hex(requestSense(18)), '03 00 00 00 12 00');
  t.throws(() => requestSense(256), { instanceOf: RangeError, message: /allocationLength/ });
});

test('REPORT LUNS and READ CAPACITY', (t) => {
  t.is(hex(reportLuns(4096, 2)), 'a0 00 02 00 00 00 00 00 10 00 00 00');
  t.throws(() => reportLuns(8), { instanceOf: RangeError, message: /allocationLength 8/ });
  t.throws(() => reportLuns(16, 256), { instanceOf: RangeError, message: /selectReport/ });
  t.is(hex(readCapacity10()), '25 00 00 00 00 00 00 00 00 00');
  t.is(hex(readCapacity16(32)), '9e 10 00 00 00 00 00 00 00 00 00 00 00 20 00 00');
  t.throws(() => readCapacity16(2 ** 32), { instanceOf: RangeError });
});

test('SYNCHRONIZE CACHE 10/16', (t) => {
  t.is(hex(synchronizeCache10()), '35 00 00 00 00 00 00 00 00 00');
  t.is(hex(synchronizeCache10({ lba: 0x100, blocks: 0x20, immed: true })), '35 02 00 00 01 00 00 00 20 00');
  t.is(hex(synchronizeCache16({ lba: 2n ** 40n, immed: true })), '91 02 00 00 01 00 00 00 00 00 00 00 00 00 00 00');
  t.throws(() => synchronizeCache10({ lba: 2 ** 32 }), { instanceOf: RangeError, message: /lba/ });
});

test('UNMAP CDB and parameter list', (t) => {
  const list = unmapParameterList([
    { lba: 0x10, blocks: 8 },
    { lba: 2n ** 40n, blocks: 0x1000 },
  ]);
  t.is(
    hex(list),
    [
      '00 26 00 20 00 00 00 00',
      '00 00 00 00 00 00 00 10 00 00 00 08 00 00 00 00',
      '00 00 01 00 00 00 00 00 00 00 10 00 00 00 00 00',
    ].join(' '),
  );
  t.is(hex(unmap(list.length)), '42 00 00 00 00 00 00 00 28 00');
  t.is(hex(unmap(0)), '42 00 00 00 00 00 00 00 00 00');
  t.throws(() => unmap(20), { instanceOf: RangeError, message: /parameterListLength 20/ });
  t.throws(() => unmap(0x10000), { instanceOf: RangeError, message: /parameterListLength/ });
  t.throws(() => unmapParameterList([]), { instanceOf: RangeError, message: /at least one/ });
  const max = Array.from({ length: MAX_UNMAP_DESCRIPTORS }, (_, i) => ({ lba: i, blocks: 1 }));
  const big = unmapParameterList(max);
  t.is(big.length, 8 + 16 * 4095);
  t.notThrows(() => unmap(big.length));
  t.throws(() => unmapParameterList([...max, { lba: 0, blocks: 1 }]), { instanceOf: RangeError, message: /4096/ });
  t.throws(() => unmapParameterList([{ lba: 0, blocks: 1 }, { lba: 0, blocks: 2 ** 32 }]), {
    instanceOf: RangeError,
    message: /ranges\[1\]\.blocks/,
  });
});

test('WRITE SAME(16) with UNMAP and NDOB', (t) => {
  t.is(
    hex(writeSame16({ lba: 0x1000, blocks: 0x800, unmap: true })),
    '93 08 00 00 00 00 00 00 10 00 00 00 08 00 00 00',
  );
  t.is(
    hex(writeSame16({ lba: 1, blocks: 1, unmap: true, ndob: true })),
    '93 09 00 00 00 00 00 00 00 01 00 00 00 01 00 00',
  );
  t.throws(() => writeSame16({ lba: 0, blocks: -1 }), { instanceOf: RangeError, message: /blocks/ });
});

test('MODE SENSE 6/10', (t) => {
  t.is(
    hex(modeSense6({ page: 0x08, dbd: true, pc: PageControl.CHANGEABLE, allocationLength: 192 })),
    '1a 08 48 00 c0 00',
  );
  t.is(hex(modeSense6({ page: 0x3f, subpage: 0xff, allocationLength: 255 })), '1a 00 3f ff ff 00');
  t.is(hex(modeSense10({ page: 0x3f, llbaa: true, allocationLength: 0x1000 })), '5a 10 3f 00 00 00 00 10 00 00');
  t.is(
    hex(modeSense10({ page: 0x0a, subpage: 1, dbd: true, pc: PageControl.SAVED, allocationLength: 64 })),
    '5a 08 ca 01 00 00 00 00 40 00',
  );
  t.throws(() => modeSense6({ page: 0x40, allocationLength: 4 }), { instanceOf: RangeError, message: /page/ });
  t.throws(() => modeSense6({ page: 0x08, pc: 4, allocationLength: 4 }), { instanceOf: RangeError, message: /pc/ });
  t.throws(() => modeSense6({ page: 0x08, allocationLength: 256 }), {
    instanceOf: RangeError,
    message: /allocationLength/,
  });
});

test('describeCdb names commands for error messages', (t) => {
  t.is(describeCdb(read16({ lba: 1234, blocks: 8 })), 'READ(16) lba 1234 blocks 8');
  t.is(describeCdb(write10({ lba: 7, blocks: 1 })), 'WRITE(10) lba 7 blocks 1');
  t.is(describeCdb(readCapacity16(32)), 'READ CAPACITY(16)');
  t.is(describeCdb(inquiry({ page: 0xb0, allocationLength: 64 })), 'INQUIRY VPD page 0xb0');
  t.is(describeCdb(Uint8Array.of(0xc0, 0, 0, 0, 0, 0)), 'opcode 0xc0');
  t.is(describeCdb(Uint8Array.of(0x88, 0)), 'READ(16)');
  t.is(describeCdb(new Uint8Array(0)), 'empty CDB');
});
