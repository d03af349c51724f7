// Property-based fuzzing of the SCSI response parsers: a few thousand runs per property here,
// scripts/fuzz-parsers.ts runs the same properties at any count. FUZZ_SEED fixes the seed.

import test from 'ava';

import { parseCachingPage, parseInquiry, parseVpdSerial, ScsiDataError } from '../ts/scsi/index.js';
import { PARSER_SUITES, parseSeed } from './helpers/parser-properties.js';

const NUM_RUNS = 2000;
const seed = parseSeed(process.env.FUZZ_SEED);

for (const { parser, properties } of PARSER_SUITES) {
  for (const p of properties) {
    test(`${parser}: ${p.name}`, (t) => {
      p.run(seed === undefined ? { numRuns: NUM_RUNS } : { numRuns: NUM_RUNS, seed });
      t.pass();
    });
  }
}

// Counterexamples the properties found, kept as fixed cases.

test('regression: a 64 KiB serial with inner blanks is trimmed in linear time', (t) => {
  const len = 0xffff;
  const page = new Uint8Array(4 + len).fill(0x20);
  page.set([0x00, 0x80, len >> 8, len & 0xff, 0x41]);
  page[4 + len - 2] = 0x42;
  // Best of three against pauses on a loaded machine; the quadratic trim took about 6 s here.
  let best = Infinity;
  for (let i = 0; i < 3; i++) {
    const start = performance.now();
    parseVpdSerial(page);
    best = Math.min(best, performance.now() - start);
  }
  t.true(best < 250, `${best.toFixed(0)} ms`);
  const serial = parseVpdSerial(page);
  t.is(serial.length, len - 1);
  t.true(serial.startsWith('A ') && serial.endsWith(' B'));
});

test('regression: text fields end at the first NUL', (t) => {
  t.is(parseVpdSerial(new Uint8Array([0x00, 0x80, 0x00, 0x06, 0x20, 0x41, 0x42, 0x00, 0x43, 0x44])), 'AB');
  const inquiry = new Uint8Array(36).fill(0x20);
  inquiry.set([0x00, 0x00, 0x05, 0x02, 31]);
  inquiry.set([0x51, 0x45, 0x00, 0x4d, 0x55], 8);
  t.is(parseInquiry(inquiry).vendor, 'QE');
});

test('regression: a caching page in sub_page format is refused', (t) => {
  // SPF set: byte 2 is the high byte of PAGE LENGTH, not the WCE/RCD flags.
  const page = new Uint8Array([0x48, 0x00, 0x00, 0x12, ...new Array<number>(0x12).fill(0)]);
  t.throws(() => parseCachingPage(page), { instanceOf: ScsiDataError, message: /sub_page format/ });
});

// Short fields are decoded in JavaScript, long ones through Buffer: both give the same text.
test('text and hex fields decode alike on both sides of the short-field limit', async (t) => {
  const { asciiField, hexBytes } = await import('../ts/scsi/util.js');
  const fc = (await import('fast-check')).default;
  fc.assert(
    fc.property(fc.uint8Array({ minLength: 0, maxLength: 200 }), (bytes) => {
      const b = Buffer.from(bytes);
      const text = b.toString('latin1');
      const start = text.search(/[^\s\0]/);
      const nul = start < 0 ? -1 : text.indexOf('\0', start);
      const expected = start < 0 ? '' : (nul < 0 ? text.slice(start) : text.slice(start, nul)).trimEnd();
      return asciiField(bytes) === expected && hexBytes(bytes) === b.toString('hex');
    }),
    seed === undefined ? { numRuns: NUM_RUNS } : { numRuns: NUM_RUNS, seed },
  );
  t.is(asciiField(Buffer.from('  VIRTINIT\0junk')), 'VIRTINIT');
  t.is(hexBytes(Uint8Array.of(0, 0xab, 0x10)), '00ab10');
});

// The key is read in place on every completion that is not GOOD; it must agree with the decoder.
test('senseKeyOf agrees with decodeSense on any bytes', async (t) => {
  const { decodeSense, senseKeyOf } = await import('../ts/scsi/sense.js');
  const fc = (await import('fast-check')).default;
  const sense = fc.oneof(
    fc.uint8Array({ minLength: 0, maxLength: 40 }),
    fc.tuple(fc.constantFrom(0x70, 0x71, 0x72, 0x73, 0xf0, 0xf2), fc.uint8Array({ minLength: 0, maxLength: 30 })).map(([code, rest]) =>
      Uint8Array.of(code, ...rest),
    ),
  );
  fc.assert(
    fc.property(sense, (bytes) => {
      let key: number | undefined;
      try {
        key = decodeSense(bytes).key;
      } catch {
        key = undefined;
      }
      return senseKeyOf(bytes) === key;
    }),
    seed === undefined ? { numRuns: NUM_RUNS } : { numRuns: NUM_RUNS, seed },
  );
  t.is(senseKeyOf(Uint8Array.of(0x70, 0, 0x06)), 6);
  t.is(senseKeyOf(Uint8Array.of(0x72, 0x05, 0x24, 0)), 5);
});
