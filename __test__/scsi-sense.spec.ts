import test from 'ava';

import {
  ASC_TABLE_SIZE,
  ascName,
  decodeSense,
  describeCdb,
  isNotReady,
  isRetryable,
  isUnitAttention,
  read16,
  ScsiDataError,
  ScsiError,
  ScsiStatus,
  SenseKey,
  senseKeyName,
  statusName,
} from '../ts/scsi/index.js';

const bytes = (...parts: string[]): Uint8Array =>
  new Uint8Array(Buffer.from(parts.join('').replace(/\s+/g, ''), 'hex'));

// Fixed format, 18 bytes: response code, key at byte 2, ASC/ASCQ at 12/13, SKS at 15-17.
const h2 = (v: number): string => v.toString(16).padStart(2, '0');
const fixed = (key: number, asc: number, ascq: number, tail = '00 00 00 00'): Uint8Array =>
  bytes(`70 00 ${h2(key)} 00 00 00 00 0a 00 00 00 00 ${h2(asc)} ${h2(ascq)} ${tail}`);

test('fixed sense: ILLEGAL REQUEST, invalid opcode', (t) => {
  t.deepEqual(decodeSense(fixed(5, 0x20, 0)), {
    format: 'fixed',
    current: true,
    key: SenseKey.ILLEGAL_REQUEST,
    keyName: 'ILLEGAL REQUEST',
    asc: 0x20,
    ascq: 0,
    ascName: 'INVALID COMMAND OPERATION CODE',
  });
});

test('fixed sense: VALID information, retry count, field pointer, progress, deferred', (t) => {
  const medium = decodeSense(bytes('f0 00 03 00 00 12 34 0a 00 00 00 00 11 00 00 80 00 03'));
  t.is(medium.keyName, 'MEDIUM ERROR');
  t.is(medium.ascName, 'UNRECOVERED READ ERROR');
  t.is(medium.information, 0x1234n);
  t.deepEqual(medium.senseKeySpecific, { kind: 'retry-count', count: 3 });

  // SKSV, C/D (CDB), BPV with bit 3, byte 2 of the CDB.
  const field = decodeSense(fixed(5, 0x24, 0, '00 cb 00 02'));
  t.is(field.ascName, 'INVALID FIELD IN CDB');
  t.deepEqual(field.senseKeySpecific, { kind: 'field-pointer', commandData: true, fieldPointer: 2, bitPointer: 3 });
  t.is(field.information, undefined, 'INFORMATION without VALID is not reported');

  const fmt = decodeSense(fixed(2, 0x04, 0x04, '00 80 80 00'));
  t.is(fmt.ascName, 'LOGICAL UNIT NOT READY, FORMAT IN PROGRESS');
  t.deepEqual(fmt.senseKeySpecific, { kind: 'progress', progress: 0.5 });

  const deferred = decodeSense(bytes('71 00 04 00 00 00 00 0a 00 00 00 07 44 00 00 00 00 00'));
  t.false(deferred.current);
  t.is(deferred.keyName, 'HARDWARE ERROR');
  t.is(deferred.ascName, 'INTERNAL TARGET FAILURE');
  t.is(deferred.commandSpecific, 7n);
});

test('fixed sense: short data and ADDITIONAL SENSE LENGTH bound the fields', (t) => {
  const ua = decodeSense(bytes('70 00 06 00 00 00 00 00'));
  t.is(ua.key, SenseKey.UNIT_ATTENTION);
  t.is(ua.asc, 0);
  t.is(ua.ascq, 0);
  // ADDITIONAL SENSE LENGTH 5 ends the data at byte 12: ASC is present, ASCQ (byte 13) is not.
  const cut = decodeSense(bytes('70 00 06 00 00 00 00 05 00 00 00 00 29 07 00 00 00 00'));
  t.is(cut.asc, 0x29);
  t.is(cut.ascq, 0);
  t.throws(() => decodeSense(bytes('70 00')), { instanceOf: ScsiDataError, message: /too short/ });
  t.throws(() => decodeSense(new Uint8Array(0)), { instanceOf: ScsiDataError, message: /empty/ });
  t.throws(() => decodeSense(bytes('7f 00 05 00')), { instanceOf: ScsiDataError, message: /RESPONSE CODE 0x7f/ });
});

test('descriptor sense: information, command-specific and sense key specific descriptors', (t) => {
  const data = bytes(
    '72 03 11 00 00 00 00 20',
    '00 0a 80 00 00 00 00 01 00 00 00 00', // information, VALID, 0x100000000
    '01 0a 00 00 00 00 00 00 00 00 00 2a', // command-specific information 0x2a
    '02 06 00 00 80 00 05 00', // sense key specific: retry count 5
  );
  const s = decodeSense(data);
  t.is(s.format, 'descriptor');
  t.true(s.current);
  t.is(s.keyName, 'MEDIUM ERROR');
  t.is(s.ascName, 'UNRECOVERED READ ERROR');
  t.is(s.information, 0x100000000n);
  t.is(s.commandSpecific, 0x2an);
  t.deepEqual(s.senseKeySpecific, { kind: 'retry-count', count: 5 });
  t.deepEqual(
    s.descriptors?.map((d) => [d.type, d.data.length]),
    [
      [0, 12],
      [1, 12],
      [2, 8],
    ],
  );

  // A descriptor that runs past the data is dropped; the header still decodes.
  const cut = decodeSense(bytes('73 06 2a 09 00 00 00 06 00 0a 80 00 00 00'));
  t.false(cut.current);
  t.is(cut.ascName, 'CAPACITY DATA HAS CHANGED');
  t.deepEqual(cut.descriptors, []);
  t.is(cut.information, undefined);
  t.throws(() => decodeSense(bytes('72 05 20')), { instanceOf: ScsiDataError });
});

test('ASC/ASCQ and key names', (t) => {
  t.true(ASC_TABLE_SIZE >= 80 && ASC_TABLE_SIZE <= 150, `table holds ${ASC_TABLE_SIZE}`);
  t.is(ascName(0x29, 0x07), 'I_T NEXUS LOSS OCCURRED');
  t.is(ascName(0x3f, 0x0e), 'REPORTED LUNS DATA HAS CHANGED');
  t.is(ascName(0x04, 0x01), 'LOGICAL UNIT IS IN PROCESS OF BECOMING READY');
  t.is(ascName(0x3a, 0x00), 'MEDIUM NOT PRESENT');
  t.is(ascName(0x12, 0x34), 'ASC 0x12 ASCQ 0x34');
  t.is(ascName(0x80, 0x00), 'VENDOR SPECIFIC');
  t.is(ascName(0x04, 0x90), 'VENDOR SPECIFIC');
  t.is(ascName(0x4d, 0x12), 'TAGGED OVERLAPPED COMMANDS (TASK TAG 0x12)');
  t.is(ascName(0x40, 0x81), 'DIAGNOSTIC FAILURE ON COMPONENT 0x81');
  t.is(senseKeyName(SenseKey.ABORTED_COMMAND), 'ABORTED COMMAND');
  t.is(senseKeyName(SenseKey.MISCOMPARE), 'MISCOMPARE');
});

test('statusName', (t) => {
  t.is(statusName(ScsiStatus.CHECK_CONDITION), 'CHECK CONDITION');
  t.is(statusName(ScsiStatus.BUSY), 'BUSY');
  t.is(statusName(0x28), 'TASK SET FULL');
  t.is(statusName(0x18), 'RESERVATION CONFLICT');
  t.is(statusName(0x99), 'STATUS 0x99');
});

test('ScsiError message, fields and context', (t) => {
  const e = new ScsiError({ status: ScsiStatus.CHECK_CONDITION, sense: fixed(5, 0x20, 0) });
  t.true(e instanceof Error);
  t.is(e.name, 'ScsiError');
  t.is(e.message, 'SCSI CHECK CONDITION: ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE (asc 0x20 ascq 0x00)');
  t.is(e.status, 2);
  t.is(e.statusName, 'CHECK CONDITION');
  t.is(e.key, SenseKey.ILLEGAL_REQUEST);
  t.is(e.asc, 0x20);
  t.is(e.ascq, 0);
  t.is(e.sense?.ascName, 'INVALID COMMAND OPERATION CODE');

  const ctx = new ScsiError({
    status: 2,
    sense: decodeSense(fixed(3, 0x11, 0)),
    context: describeCdb(read16({ lba: 1234, blocks: 8 })),
  });
  t.is(
    ctx.message,
    'READ(16) lba 1234 blocks 8: SCSI CHECK CONDITION: MEDIUM ERROR, UNRECOVERED READ ERROR (asc 0x11 ascq 0x00)',
  );
  t.is(ctx.context, 'READ(16) lba 1234 blocks 8');

  t.is(new ScsiError({ status: ScsiStatus.BUSY }).message, 'SCSI BUSY');
  t.is(new ScsiError({ status: 2 }).message, 'SCSI CHECK CONDITION (no sense data)');
  // Undecodable sense keeps the status and does not throw.
  const junk = new ScsiError({ status: 2, sense: bytes('00 11 22') });
  t.is(junk.sense, undefined);
  t.is(junk.key, undefined);
  t.regex(junk.message, /no sense data/);
});

test('predicates: unit attention, not ready, retryable', (t) => {
  const ua = new ScsiError({ status: 2, sense: fixed(6, 0x29, 0) });
  t.true(isUnitAttention(ua));
  t.true(isRetryable(ua));
  t.false(isNotReady(ua));

  const becoming = new ScsiError({ status: 2, sense: fixed(2, 0x04, 0x01) });
  t.true(isNotReady(becoming));
  t.true(isRetryable(becoming));

  const needsStart = new ScsiError({ status: 2, sense: fixed(2, 0x04, 0x02) });
  t.true(isNotReady(needsStart));
  t.false(isRetryable(needsStart));
  t.false(isRetryable(new ScsiError({ status: 2, sense: fixed(2, 0x3a, 0) })));
  t.false(isRetryable(new ScsiError({ status: 2, sense: fixed(5, 0x24, 0) })));

  t.true(isRetryable(new ScsiError({ status: ScsiStatus.BUSY })));
  t.true(isRetryable(new ScsiError({ status: ScsiStatus.TASK_SET_FULL })));
  t.false(isRetryable(new ScsiError({ status: ScsiStatus.RESERVATION_CONFLICT })));

  // Decoded sense works on its own; unrelated values do not match.
  t.true(isUnitAttention(decodeSense(fixed(6, 0x2a, 0x09))));
  t.false(isUnitAttention(new Error('x')));
  t.false(isRetryable(null));
  t.false(isNotReady(undefined));
});
