// Property definitions for the SCSI response parsers, shared by __test__/fuzz-parsers.spec.ts
// (few runs) and scripts/fuzz-parsers.ts (many runs). Every parser must return a sane value or
// throw a ScsiDataError, for arbitrary bytes and for well-formed layouts with hostile fields.

import assert from 'node:assert/strict';
import { isDeepStrictEqual } from 'node:util';

import fc from 'fast-check';

import {
  type BlockCharacteristics,
  type BlockLimits,
  type CachingPage,
  type Capacity10,
  type Capacity16,
  type DecodedSense,
  type Designator,
  type LogicalBlockProvisioning,
  type ModeSenseData,
  type SenseKeySpecific,
  type StandardInquiry,
  ascName,
  decodeLun,
  decodeSense,
  describeCdb,
  deviceTypeName,
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
  read,
  ScsiDataError,
  ScsiError,
  senseKeyName,
  TruncatedDataError,
  write,
} from '../../ts/scsi/index.js';

export interface RunOptions {
  numRuns: number;
  seed?: number;
}

export interface ParserProperty {
  name: string;
  /** One run costs about this many ordinary runs (64 KiB inputs); it runs numRuns / cost times. */
  cost: number;
  /** Runs the property; on failure throws fast-check's report (seed, path, counterexample). */
  run(options: RunOptions): void;
}

export interface ParserSuite {
  parser: string;
  properties: readonly ParserProperty[];
}

/** A seed from FUZZ_SEED or --seed; undefined lets fast-check pick one. */
export function parseSeed(text: string | undefined): number | undefined {
  if (text === undefined || text === '') return undefined;
  const seed = Number(text);
  if (!Number.isSafeInteger(seed)) throw new Error(`seed must be an integer, got ${text}`);
  return seed;
}

/** Runs of `p` for a requested count. */
export function runsFor(p: ParserProperty, numRuns: number): number {
  return Math.max(1, Math.ceil(numRuns / p.cost));
}

/** The linear-time properties parse inputs of up to 64 KiB; one parse must stay below this. */
const LARGE_INPUT_BUDGET_MS = 250;
const LARGE_INPUT_COST = 100;

const U64_MAX = (1n << 64n) - 1n;

function property<T>(name: string, arb: fc.Arbitrary<T>, predicate: (value: T) => void, cost = 1): ParserProperty {
  const prop = fc.property(arb, predicate);
  const p: ParserProperty = {
    name,
    cost,
    run: ({ numRuns, seed }) => {
      const runs = runsFor(p, numRuns);
      fc.assert(prop, seed === undefined ? { numRuns: runs } : { numRuns: runs, seed });
    },
  };
  return p;
}

// ---- byte helpers ----

const byte = fc.integer({ min: 0, max: 0xff });
const u16 = fc.integer({ min: 0, max: 0xffff });
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u64 = fc.bigInt({ min: 0n, max: U64_MAX });

const bytes = (maxLength: number): fc.Arbitrary<Uint8Array> => fc.uint8Array({ maxLength, size: 'max' });

function concat(...parts: ArrayLike<number>[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

function be(width: number, value: number | bigint): Uint8Array {
  const out = new Uint8Array(width);
  let v = BigInt(value);
  for (let i = width - 1; i >= 0; i--) {
    out[i] = Number(v & 0xffn);
    v >>= 8n;
  }
  return out;
}

const clamp = (v: number, lo: number, hi: number): number => Math.min(hi, Math.max(lo, v));

/** A length field: usually the true length, else a little off, anything, or the field maximum. */
function lengthFor(actual: number, max: number): fc.Arbitrary<number> {
  return fc.oneof(
    { weight: 4, arbitrary: fc.constant(Math.min(actual, max)) },
    { weight: 2, arbitrary: fc.integer({ min: -9, max: 9 }).map((d) => clamp(actual + d, 0, max)) },
    { weight: 1, arbitrary: fc.integer({ min: 0, max }) },
    { weight: 1, arbitrary: fc.constant(max) },
  );
}

/** The buffer as a target might return it: whole, cut short, or with bytes after it. */
function deliver(buf: Uint8Array): fc.Arbitrary<Uint8Array> {
  return fc.oneof(
    { weight: 3, arbitrary: fc.constant(buf) },
    { weight: 1, arbitrary: fc.nat({ max: buf.length }).map((n) => buf.slice(0, n)) },
    { weight: 1, arbitrary: bytes(24).map((extra) => concat(buf, extra)) },
  );
}

/** Text-like bytes: blanks, NULs, printable and high bytes. */
const textByte = fc.oneof(fc.constantFrom(0x00, 0x20, 0x09, 0x0a, 0xa0, 0x41, 0x7e, 0x80, 0xff), byte);
const textBytes = (minLength: number, maxLength: number): fc.Arbitrary<Uint8Array> =>
  fc.array(textByte, { minLength, maxLength, size: 'max' }).map((a) => Uint8Array.from(a));

const PAD = fc.constantFrom(0x20, 0x00, 0x09);

/** Printable ASCII without edge blanks, placed in a field of `width` bytes padded with blanks/NULs. */
function paddedAscii(width: number): fc.Arbitrary<{ field: Uint8Array; text: string }> {
  return fc
    .record({
      text: fc.string({ unit: 'grapheme-ascii', maxLength: width }).map((s) => s.trim()),
      left: fc.nat({ max: width }),
      pads: fc.array(PAD, { minLength: width, maxLength: width }),
    })
    .map(({ text, left, pads }) => {
      const room = width - text.length;
      const l = Math.min(left, room);
      const field = concat(pads.slice(0, l), Buffer.from(text, 'latin1'), pads.slice(l + text.length));
      return { field, text };
    });
}

/** Like paddedAscii but of any width up to `maxWidth`. */
const paddedAsciiUpTo = (maxWidth: number): fc.Arbitrary<{ field: Uint8Array; text: string }> =>
  fc.nat({ max: maxWidth }).chain(paddedAscii);

/** Unicode text (no NUL, no edge blanks) as UTF-8 with blank/NUL padding, at most `maxBytes`. */
function paddedUtf8(maxBytes: number): fc.Arbitrary<{ field: Uint8Array; text: string }> {
  return fc
    .record({
      text: fc
        .string({ unit: 'grapheme', maxLength: 24 })
        .map((s) => s.replaceAll('\0', '').trim())
        .filter((s) => Buffer.byteLength(s) <= maxBytes),
      left: fc.array(PAD, { maxLength: 8 }),
      right: fc.array(PAD, { maxLength: 8 }),
    })
    .map(({ text, left, right }) => {
      const body = Buffer.from(text, 'utf8');
      const room = maxBytes - body.length;
      const l = left.slice(0, room);
      return { field: concat(l, body, right.slice(0, room - l.length)), text };
    });
}

// ---- sanity checks on parsed values ----

function assertUint(v: unknown, max: number, what: string): void {
  assert.ok(typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= max, `${what} = ${String(v)}`);
}

function assertBig(v: unknown, max: bigint, what: string): void {
  assert.ok(typeof v === 'bigint' && v >= 0n && v <= max, `${what} = ${String(v)}`);
}

function assertBool(v: unknown, what: string): void {
  assert.equal(typeof v, 'boolean', what);
}

/** Decoded text: no NUL, no edge blanks, at most `maxLength` characters. */
function assertText(v: unknown, maxLength: number, what: string): void {
  assert.equal(typeof v, 'string', what);
  const s = String(v);
  assert.ok(!s.includes('\0'), `${what} holds a NUL: ${JSON.stringify(s)}`);
  assert.equal(s, s.trim(), `${what} has edge blanks`);
  assert.ok(s.length <= maxLength, `${what} longer than ${maxLength}`);
}

function assertName(v: unknown, what: string): void {
  assert.ok(typeof v === 'string' && v.length > 0 && !v.includes('\0'), `${what} = ${String(v)}`);
}

/** `view` lies inside `buf` (same memory), not copied from or past it. */
function assertWithin(view: Uint8Array, buf: Uint8Array, what: string): void {
  assert.ok(
    view.buffer === buf.buffer &&
      view.byteOffset >= buf.byteOffset &&
      view.byteOffset + view.length <= buf.byteOffset + buf.length,
    `${what} lies outside the input`,
  );
}

type Outcome<T> = { ok: true; value: T } | { ok: false; error: ScsiDataError };

/** Any exception other than a ScsiDataError propagates and fails the property. */
function attempt<T>(parse: (buf: Uint8Array) => T, buf: Uint8Array): Outcome<T> {
  try {
    return { ok: true, value: parse(buf) };
  } catch (e) {
    if (!(e instanceof ScsiDataError)) throw e;
    assertName(e.message, 'error message');
    if (e instanceof TruncatedDataError) {
      assertUint(e.actual, buf.length, 'TruncatedDataError.actual');
      assert.ok(Number.isSafeInteger(e.needed) && e.needed > e.actual, `needed ${e.needed}, actual ${e.actual}`);
    }
    return { ok: false, error: e };
  }
}

function sameOutcome<T>(a: Outcome<T>, b: Outcome<T>): boolean {
  if (a.ok && b.ok) return isDeepStrictEqual(a.value, b.value);
  if (a.ok || b.ok) return false;
  return (
    a.error.constructor === b.error.constructor &&
    a.error.message === b.error.message &&
    (!(a.error instanceof TruncatedDataError) ||
      (b.error instanceof TruncatedDataError && a.error.needed === b.error.needed && a.error.actual === b.error.actual))
  );
}

// ---- generic suite ----

interface Sample<T> {
  buf: Uint8Array;
  expected: T;
}

interface ParserSpec<T> {
  parser: string;
  parse: (buf: Uint8Array) => T;
  /** Sanity of a value parsed from `buf`. */
  check: (value: T, buf: Uint8Array) => void;
  /** Inputs shaped like this parser's data, with hostile lengths and codes. */
  hostile: fc.Arbitrary<Uint8Array>;
  /** Valid responses built from arbitrary field values, with the value they must parse to. */
  valid: fc.Arbitrary<Sample<T>>;
  /** Compares a parsed value with the expected one; deep equality unless given. */
  compare?: (actual: T, expected: T) => void;
  /** Largest inputs, built cheaply; parsing each must stay under LARGE_INPUT_BUDGET_MS. */
  large?: fc.Arbitrary<Uint8Array>;
  extra?: ParserProperty[];
}

const ANY_BYTES = bytes(512);

function suite<T>(spec: ParserSpec<T>): ParserSuite {
  const { parse, check } = spec;
  const compare = spec.compare ?? ((actual: T, expected: T): void => assert.deepStrictEqual(actual, expected));
  const sane = (buf: Uint8Array): void => {
    const out = attempt(parse, buf);
    if (out.ok) check(out.value, buf);
  };
  const properties: ParserProperty[] = [
    property('arbitrary bytes', ANY_BYTES, sane),
    property('hostile layout', spec.hostile, sane),
    property(
      'view inside a larger buffer',
      fc.record({ before: bytes(16), body: fc.oneof(ANY_BYTES, spec.hostile), after: bytes(16) }),
      ({ before, body, after }) => {
        // Bytes around the view must not be read, and the input must not be written.
        const whole = concat(before, body, after);
        const snapshot = whole.slice();
        const view = whole.subarray(before.length, before.length + body.length);
        const inView = attempt(parse, view);
        if (inView.ok) check(inView.value, view);
        assert.ok(sameOutcome(inView, attempt(parse, body.slice())), 'view and copy parse differently');
        assert.deepEqual(whole, snapshot, 'input modified');
      },
    ),
    property('round trip', spec.valid, ({ buf, expected }) => {
      const out = attempt(parse, buf);
      assert.ok(out.ok, out.ok ? '' : `valid response rejected: ${out.error.message}`);
      check(out.value, buf);
      compare(out.value, expected);
    }),
    property('prefix of a valid response', fc.tuple(spec.valid, fc.nat()), ([{ buf, expected }, cut]) => {
      const prefix = buf.slice(0, buf.length === 0 ? 0 : cut % buf.length);
      const out = attempt(parse, prefix);
      if (out.ok) {
        check(out.value, prefix);
      } else if (out.error instanceof TruncatedDataError) {
        // A caller reissuing the command with `needed` bytes gets there: each step asks for
        // more, never more than the whole response, and the end result is the full value.
        let next: Outcome<T> = out;
        while (!next.ok && next.error instanceof TruncatedDataError) {
          const needed: number = next.error.needed;
          assert.ok(needed <= buf.length, `needed ${needed} exceeds the response length ${buf.length}`);
          next = attempt(parse, buf.slice(0, needed));
        }
        assert.ok(next.ok, next.ok ? '' : `reissue fails: ${next.error.message}`);
        compare(next.value, expected);
      }
    }),
  ];
  if (spec.large) {
    properties.push(
      property(
        'largest inputs in linear time',
        spec.large,
        (buf) => {
          // Best of three, so a scheduling or GC pause on a loaded machine is not a failure.
          let best = Infinity;
          for (let i = 0; i < 3 && best >= LARGE_INPUT_BUDGET_MS; i++) {
            const start = performance.now();
            sane(buf);
            best = Math.min(best, performance.now() - start);
          }
          assert.ok(best < LARGE_INPUT_BUDGET_MS, `${buf.length} bytes took ${best.toFixed(0)} ms`);
        },
        LARGE_INPUT_COST,
      ),
    );
  }
  properties.push(...(spec.extra ?? []));
  return { parser: spec.parser, properties };
}

// ---- INQUIRY and VPD ----

/** A VPD page: page code usually right, PAGE LENGTH hostile, delivered whole or not. */
function vpdHostile(page: number, payload: fc.Arbitrary<Uint8Array>): fc.Arbitrary<Uint8Array> {
  return fc
    .tuple(byte, fc.oneof({ weight: 6, arbitrary: fc.constant(page) }, { weight: 1, arbitrary: byte }), payload)
    .chain(([b0, code, body]) => lengthFor(body.length, 0xffff).map((len) => concat([b0, code], be(2, len), body)))
    .chain(deliver);
}

/** A well-formed VPD page around `body`; byte 0 (qualifier, device type) is arbitrary. */
function vpdPage(page: number, b0: number, body: Uint8Array): Uint8Array {
  return concat([b0, page], be(2, body.length), body);
}

function checkInquiry(v: StandardInquiry, buf: Uint8Array): void {
  assert.ok(buf.length >= 36);
  assertUint(v.peripheralQualifier, 7, 'peripheralQualifier');
  assertUint(v.deviceType, 0x1f, 'deviceType');
  assertName(v.deviceTypeName, 'deviceTypeName');
  assertBool(v.removable, 'removable');
  assertUint(v.version, 0xff, 'version');
  assertUint(v.responseDataFormat, 0x0f, 'responseDataFormat');
  assertUint(v.tpgs, 3, 'tpgs');
  assertBool(v.protect, 'protect');
  assertBool(v.cmdQue, 'cmdQue');
  assertText(v.vendor, 8, 'vendor');
  assertText(v.product, 16, 'product');
  assertText(v.revision, 4, 'revision');
}

const inquiryValid: fc.Arbitrary<Sample<StandardInquiry>> = fc
  .record({
    pq: fc.nat({ max: 7 }),
    type: fc.nat({ max: 0x1f }),
    removable: fc.boolean(),
    version: byte,
    format: fc.nat({ max: 0x0f }),
    tpgs: fc.nat({ max: 3 }),
    protect: fc.boolean(),
    cmdQue: fc.boolean(),
    vendor: paddedAscii(8),
    product: paddedAscii(16),
    revision: paddedAscii(4),
    noise: fc.array(byte, { minLength: 4, maxLength: 4 }),
    tail: bytes(60),
  })
  .map((f) => {
    const [n1 = 0, n3 = 0, n5 = 0, n7 = 0] = f.noise;
    // Bits the parser does not decode carry noise; byte 4 (ADDITIONAL LENGTH) is set below.
    const header = [
      (f.pq << 5) | f.type,
      (f.removable ? 0x80 : 0) | (n1 & 0x7f),
      f.version,
      (n3 & 0xf0) | f.format,
      0,
      (n5 & 0xce) | (f.tpgs << 4) | (f.protect ? 1 : 0),
      0,
      (n7 & 0xfd) | (f.cmdQue ? 0x02 : 0),
    ];
    const buf = concat(header, f.vendor.field, f.product.field, f.revision.field, f.tail);
    buf[4] = buf.length - 5;
    const expected: StandardInquiry = {
      peripheralQualifier: f.pq,
      deviceType: f.type,
      deviceTypeName: deviceTypeName(f.type),
      removable: f.removable,
      version: f.version,
      responseDataFormat: f.format,
      tpgs: f.tpgs,
      protect: f.protect,
      cmdQue: f.cmdQue,
      vendor: f.vendor.text,
      product: f.product.text,
      revision: f.revision.text,
    };
    return { buf, expected };
  });

const inquirySuite = suite<StandardInquiry>({
  parser: 'parseInquiry',
  parse: parseInquiry,
  check: checkInquiry,
  hostile: fc
    .record({ header: fc.array(byte, { minLength: 8, maxLength: 8 }), text: textBytes(28, 28), tail: bytes(64) })
    .chain(({ header, text, tail }) =>
      lengthFor(28 + tail.length, 0xff).map((len) => {
        const buf = concat(header, text, tail);
        buf[4] = len;
        return buf;
      }),
    )
    .chain(deliver),
  valid: inquiryValid,
});

const supportedPagesSuite = suite<number[]>({
  parser: 'parseVpdSupportedPages',
  parse: parseVpdSupportedPages,
  check: (v, buf) => {
    const len = ((buf[2] ?? 0) << 8) | (buf[3] ?? 0);
    assert.ok(4 + len <= buf.length);
    assert.equal(v.length, len);
    for (const [i, page] of v.entries()) assert.ok(page === buf[4 + i], `page ${i}`);
  },
  hostile: vpdHostile(0x00, bytes(300)),
  valid: fc.tuple(byte, fc.uniqueArray(byte, { maxLength: 256 })).map(([b0, pages]) => ({
    buf: vpdPage(0x00, b0, Uint8Array.from(pages)),
    expected: pages,
  })),
  large: fc.record({ len: fc.integer({ min: 0xf000, max: 0xffff }), fill: byte }).map(({ len, fill }) => {
    const buf = new Uint8Array(4 + len).fill(fill);
    buf.set([0, 0x00, len >> 8, len & 0xff]);
    return buf;
  }),
});

const serialSuite = suite<string>({
  parser: 'parseVpdSerial',
  parse: parseVpdSerial,
  check: (v, buf) => assertText(v, Math.max(0, buf.length - 4), 'serial'),
  hostile: vpdHostile(0x80, fc.oneof(textBytes(0, 300), bytes(300))),
  valid: fc
    .tuple(byte, paddedAsciiUpTo(300))
    .map(([b0, { field, text }]) => ({ buf: vpdPage(0x80, b0, field), expected: text })),
  // Two characters apart, with a long blank or NUL run around and between them.
  large: fc
    .record({
      left: fc.nat({ max: 64 }),
      right: fc.nat({ max: 64 }),
      inner: fc.integer({ min: 0xf000, max: 0xffff }),
      pad: PAD,
      fill: PAD,
    })
    .map(({ left, right, inner, pad, fill }) => {
      const run = Math.min(inner, 0xffff - 2 - left - right);
      const body = concat(
        new Uint8Array(left).fill(pad),
        [0x41],
        new Uint8Array(run).fill(fill),
        [0x42],
        new Uint8Array(right).fill(pad),
      );
      return vpdPage(0x80, 0, body);
    }),
});

// ---- VPD 0x83 ----

interface DesignatorSample {
  bytes: Uint8Array;
  expected: Designator;
}

/** Designator body for a code set: padded text for ASCII and UTF-8, raw bytes (shown as hex) else. */
function designatorBody(codeSet: number): fc.Arbitrary<{ field: Uint8Array; text: string }> {
  if (codeSet === 2) return paddedAsciiUpTo(255);
  if (codeSet === 3) return paddedUtf8(255);
  return bytes(255).map((field) => ({ field, text: Buffer.from(field).toString('hex') }));
}

const designatorValid: fc.Arbitrary<DesignatorSample> = fc
  .record({
    protocolIdentifier: fc.nat({ max: 0x0f }),
    codeSet: fc.nat({ max: 0x0f }),
    piv: fc.boolean(),
    association: fc.nat({ max: 3 }),
    type: fc.nat({ max: 0x0f }),
    reserved: byte,
  })
  .chain((f) => designatorBody(f.codeSet).map((body) => ({ ...f, body })))
  .map((f) => {
    const b1 = (f.piv ? 0x80 : 0) | (f.association << 4) | f.type;
    return {
      bytes: concat([(f.protocolIdentifier << 4) | f.codeSet, b1, f.reserved, f.body.field.length], f.body.field),
      expected: {
        protocolIdentifier: f.protocolIdentifier,
        codeSet: f.codeSet,
        piv: f.piv,
        association: f.association,
        type: f.type,
        typeName: '',
        value: f.body.text,
      },
    };
  });

/** A designator whose DESIGNATOR LENGTH may run past its body, and the page, or stop short. */
const designatorHostile: fc.Arbitrary<Uint8Array> = fc
  .record({ b0: byte, b1: byte, b2: byte, body: fc.oneof(textBytes(0, 64), bytes(64)) })
  .chain(({ b0, b1, b2, body }) => lengthFor(body.length, 0xff).map((len) => concat([b0, b1, b2, len], body)));

const noTypeName = (d: Designator): Designator => ({ ...d, typeName: '' });

function checkDeviceId(v: Designator[], buf: Uint8Array): void {
  assert.ok(v.length <= Math.floor((buf.length - 4) / 4), 'more designators than fit');
  for (const [i, d] of v.entries()) {
    assertUint(d.protocolIdentifier, 0x0f, `[${i}].protocolIdentifier`);
    assertUint(d.codeSet, 0x0f, `[${i}].codeSet`);
    assertBool(d.piv, `[${i}].piv`);
    assertUint(d.association, 3, `[${i}].association`);
    assertUint(d.type, 0x0f, `[${i}].type`);
    assertName(d.typeName, `[${i}].typeName`);
    assertText(d.value, 510, `[${i}].value`);
    if (d.codeSet !== 2 && d.codeSet !== 3) assert.match(d.value, /^(?:[0-9a-f]{2}){0,255}$/);
  }
}

const deviceIdSuite = suite<Designator[]>({
  parser: 'parseVpdDeviceId',
  parse: parseVpdDeviceId,
  check: checkDeviceId,
  hostile: vpdHostile(
    0x83,
    fc
      .tuple(
        fc.array(
          fc.oneof(
            designatorValid.map((d) => d.bytes),
            designatorHostile,
          ),
          { maxLength: 6 },
        ),
        bytes(3),
      )
      .map(([ds, partial]) => concat(...ds, partial)),
  ),
  valid: fc.tuple(byte, fc.array(designatorValid, { maxLength: 8 })).map(([b0, ds]) => {
    const buf = vpdPage(0x83, b0, concat(...ds.map((d) => d.bytes)));
    return { buf, expected: ds.map((d) => d.expected) };
  }),
  // Type names are a lookup table, checked for presence only.
  compare: (actual, expected) => assert.deepStrictEqual(actual.map(noTypeName), expected.map(noTypeName)),
  // As many 255-byte ASCII designators as the page holds, blanks between two characters.
  large: fc.record({ fill: PAD, count: fc.integer({ min: 200, max: 256 }) }).map(({ fill, count }) => {
    const body = new Uint8Array(255).fill(fill);
    body[0] = 0x41;
    body[254] = 0x42;
    const one = concat([0x02, 0x00, 0x00, 255], body);
    const n = Math.min(count, Math.floor(0xffff / one.length));
    return vpdPage(0x83, 0, concat(...Array.from({ length: n }, () => one)));
  }),
});

// ---- VPD 0xB0, 0xB1, 0xB2 ----

/** Where each VPD 0xB0 field ends: a page too short for a field reports it as 0. */
const BLOCK_LIMITS_ENDS: ReadonlyArray<readonly [keyof BlockLimits, number]> = [
  ['wsnz', 5],
  ['maxCompareWriteLength', 6],
  ['optimalTransferLengthGranularity', 8],
  ['maxTransferLength', 12],
  ['optimalTransferLength', 16],
  ['maxPrefetchLength', 20],
  ['maxUnmapLbaCount', 24],
  ['maxUnmapBlockDescriptorCount', 28],
  ['optimalUnmapGranularity', 32],
  ['unmapGranularityAlignment', 36],
  ['maxWriteSameLength', 44],
];

function checkBlockLimits(v: BlockLimits, buf: Uint8Array): void {
  assertBool(v.wsnz, 'wsnz');
  assertUint(v.maxCompareWriteLength, 0xff, 'maxCompareWriteLength');
  assertUint(v.optimalTransferLengthGranularity, 0xffff, 'optimalTransferLengthGranularity');
  assertUint(v.maxTransferLength, 0xffffffff, 'maxTransferLength');
  assertUint(v.optimalTransferLength, 0xffffffff, 'optimalTransferLength');
  assertUint(v.maxPrefetchLength, 0xffffffff, 'maxPrefetchLength');
  assertUint(v.maxUnmapLbaCount, 0xffffffff, 'maxUnmapLbaCount');
  assertUint(v.maxUnmapBlockDescriptorCount, 0xffffffff, 'maxUnmapBlockDescriptorCount');
  assertUint(v.optimalUnmapGranularity, 0xffffffff, 'optimalUnmapGranularity');
  if (v.unmapGranularityAlignment !== undefined) {
    assertUint(v.unmapGranularityAlignment, 0x7fffffff, 'unmapGranularityAlignment');
  }
  assertBig(v.maxWriteSameLength, U64_MAX, 'maxWriteSameLength');
  const total = 4 + (((buf[2] ?? 0) << 8) | (buf[3] ?? 0));
  for (const [field, end] of BLOCK_LIMITS_ENDS) {
    const value = v[field];
    if (end > total) assert.ok(!value, `${field} ${String(value)} past the page end`);
  }
}

const blockLimitsValid: fc.Arbitrary<Sample<BlockLimits>> = fc
  .record({
    b0: byte,
    wsnz: fc.boolean(),
    byte4: byte,
    maxCompareWriteLength: byte,
    optimalTransferLengthGranularity: u16,
    maxTransferLength: u32,
    optimalTransferLength: u32,
    maxPrefetchLength: u32,
    maxUnmapLbaCount: u32,
    maxUnmapBlockDescriptorCount: u32,
    optimalUnmapGranularity: u32,
    unmapGranularityAlignment: fc.option(fc.nat({ max: 0x7fffffff }), { nil: undefined }),
    maxWriteSameLength: u64,
    tail: bytes(20),
    // 0x0c: pre-SBC-3 targets; 0x3c: SBC-3; anything else cuts or extends the layout.
    pageLength: fc.oneof(fc.constantFrom(0x0c, 0x3c), fc.nat({ max: 0x50 })),
  })
  .map((f) => {
    const full = concat(
      [(f.byte4 & 0xfe) | (f.wsnz ? 1 : 0), f.maxCompareWriteLength],
      be(2, f.optimalTransferLengthGranularity),
      be(4, f.maxTransferLength),
      be(4, f.optimalTransferLength),
      be(4, f.maxPrefetchLength),
      be(4, f.maxUnmapLbaCount),
      be(4, f.maxUnmapBlockDescriptorCount),
      be(4, f.optimalUnmapGranularity),
      be(4, f.unmapGranularityAlignment === undefined ? 0 : 0x80000000 + f.unmapGranularityAlignment),
      be(8, f.maxWriteSameLength),
      new Uint8Array(16),
      f.tail,
    );
    const body = full.slice(0, f.pageLength);
    const total = 4 + body.length;
    const expected: BlockLimits = {
      wsnz: total >= 5 && f.wsnz,
      maxCompareWriteLength: total >= 6 ? f.maxCompareWriteLength : 0,
      optimalTransferLengthGranularity: total >= 8 ? f.optimalTransferLengthGranularity : 0,
      maxTransferLength: total >= 12 ? f.maxTransferLength : 0,
      optimalTransferLength: total >= 16 ? f.optimalTransferLength : 0,
      maxPrefetchLength: total >= 20 ? f.maxPrefetchLength : 0,
      maxUnmapLbaCount: total >= 24 ? f.maxUnmapLbaCount : 0,
      maxUnmapBlockDescriptorCount: total >= 28 ? f.maxUnmapBlockDescriptorCount : 0,
      optimalUnmapGranularity: total >= 32 ? f.optimalUnmapGranularity : 0,
      maxWriteSameLength: total >= 44 ? f.maxWriteSameLength : 0n,
    };
    if (total >= 36 && f.unmapGranularityAlignment !== undefined) {
      expected.unmapGranularityAlignment = f.unmapGranularityAlignment;
    }
    return { buf: vpdPage(0xb0, f.b0, body), expected };
  });

const blockLimitsSuite = suite<BlockLimits>({
  parser: 'parseVpdBlockLimits',
  parse: parseVpdBlockLimits,
  check: checkBlockLimits,
  hostile: vpdHostile(0xb0, bytes(80)),
  valid: blockLimitsValid,
});

const blockCharacteristicsSuite = suite<BlockCharacteristics>({
  parser: 'parseVpdBlockCharacteristics',
  parse: parseVpdBlockCharacteristics,
  check: (v, buf) => {
    assert.ok(buf.length >= 8);
    assertUint(v.rotationRate, 0xffff, 'rotationRate');
    assertUint(v.productType, 0xff, 'productType');
    assertUint(v.nominalFormFactor, 0x0f, 'nominalFormFactor');
  },
  hostile: vpdHostile(0xb1, bytes(80)),
  valid: fc
    .record({
      b0: byte,
      rotationRate: u16,
      productType: byte,
      nominalFormFactor: fc.nat({ max: 0x0f }),
      high: byte,
      rest: fc.nat({ max: 0x3c - 4 }).chain((n) => fc.uint8Array({ minLength: n, maxLength: n })),
    })
    .map((f) => ({
      buf: vpdPage(
        0xb1,
        f.b0,
        concat(be(2, f.rotationRate), [f.productType, (f.high & 0xf0) | f.nominalFormFactor], f.rest),
      ),
      expected: { rotationRate: f.rotationRate, productType: f.productType, nominalFormFactor: f.nominalFormFactor },
    })),
});

const provisioningSuite = suite<LogicalBlockProvisioning>({
  parser: 'parseVpdLogicalBlockProvisioning',
  parse: parseVpdLogicalBlockProvisioning,
  check: (v, buf) => {
    assert.ok(buf.length >= 8);
    assertUint(v.thresholdExponent, 0xff, 'thresholdExponent');
    for (const k of ['lbpu', 'lbpws', 'lbpws10', 'lbprz', 'ancSup', 'dp'] as const) assertBool(v[k], k);
    assertUint(v.provisioningType, 7, 'provisioningType');
  },
  hostile: vpdHostile(0xb2, bytes(40)),
  valid: fc
    .record({
      b0: byte,
      thresholdExponent: byte,
      flags: fc.array(fc.boolean(), { minLength: 6, maxLength: 6 }),
      lbprzHigh: fc.nat({ max: 3 }),
      provisioningType: fc.nat({ max: 7 }),
      high: byte,
      rest: bytes(24),
    })
    .map((f) => {
      const [lbpu = false, lbpws = false, lbpws10 = false, lbprz = false, ancSup = false, dp = false] = f.flags;
      const b5 =
        (lbpu ? 0x80 : 0) |
        (lbpws ? 0x40 : 0) |
        (lbpws10 ? 0x20 : 0) |
        (f.lbprzHigh << 3) |
        (lbprz ? 0x04 : 0) |
        (ancSup ? 0x02 : 0) |
        (dp ? 0x01 : 0);
      return {
        buf: vpdPage(
          0xb2,
          f.b0,
          concat([f.thresholdExponent, b5, (f.high & 0xf8) | f.provisioningType, f.high], f.rest),
        ),
        expected: {
          thresholdExponent: f.thresholdExponent,
          lbpu,
          lbpws,
          lbpws10,
          lbprz,
          ancSup,
          dp,
          provisioningType: f.provisioningType,
        },
      };
    }),
});

// ---- READ CAPACITY ----

const capacity10Suite = suite<Capacity10>({
  parser: 'parseReadCapacity10',
  parse: parseReadCapacity10,
  check: (v, buf) => {
    assertUint(v.lastLba, 0xffffffff, 'lastLba');
    assertUint(v.blockSize, 0xffffffff, 'blockSize');
    assert.equal(v.blockSize, Buffer.from(buf).readUInt32BE(4), 'blockSize as reported');
    assert.equal(v.needs16, v.lastLba === 0xffffffff);
  },
  hostile: fc
    .record({ lastLba: fc.oneof(u32, fc.constantFrom(0, 0xfffffffe, 0xffffffff)), blockSize: u32 })
    .chain(({ lastLba, blockSize }) => deliver(concat(be(4, lastLba), be(4, blockSize)))),
  valid: fc.record({ lastLba: u32, blockSize: u32 }).map(({ lastLba, blockSize }) => ({
    buf: concat(be(4, lastLba), be(4, blockSize)),
    expected: { lastLba, blockSize, needs16: lastLba === 0xffffffff },
  })),
});

const capacity16Valid: fc.Arbitrary<Sample<Capacity16>> = fc
  .record({
    lastLba: fc.oneof(u64, fc.constantFrom(0n, 0xffffffffn, U64_MAX)),
    blockSize: u32,
    protectionEnabled: fc.boolean(),
    pType: fc.nat({ max: 7 }),
    b12High: byte,
    lbpme: fc.boolean(),
    lbprz: fc.boolean(),
    physicalBlockExponent: fc.nat({ max: 0x0f }),
    b13High: byte,
    lowestAlignedLba: fc.nat({ max: 0x3fff }),
    rest: fc.uint8Array({ minLength: 16, maxLength: 16 }),
  })
  .map((f) => ({
    buf: concat(
      be(8, f.lastLba),
      be(4, f.blockSize),
      [
        (f.b12High & 0xf0) | (f.pType << 1) | (f.protectionEnabled ? 1 : 0),
        (f.b13High & 0xf0) | f.physicalBlockExponent,
      ],
      be(2, (f.lbpme ? 0x8000 : 0) | (f.lbprz ? 0x4000 : 0) | f.lowestAlignedLba),
      f.rest,
    ),
    expected: {
      lastLba: f.lastLba,
      blockSize: f.blockSize,
      protectionEnabled: f.protectionEnabled,
      protectionType: f.protectionEnabled ? f.pType + 1 : 0,
      lbpme: f.lbpme,
      lbprz: f.lbprz,
      physicalBlockExponent: f.physicalBlockExponent,
      lowestAlignedLba: f.lowestAlignedLba,
    },
  }));

const capacity16Suite = suite<Capacity16>({
  parser: 'parseReadCapacity16',
  parse: parseReadCapacity16,
  check: (v, buf) => {
    assertBig(v.lastLba, U64_MAX, 'lastLba');
    assert.equal(v.lastLba, Buffer.from(buf).readBigUInt64BE(0), 'lastLba as reported');
    assertUint(v.blockSize, 0xffffffff, 'blockSize');
    assert.equal(v.blockSize, Buffer.from(buf).readUInt32BE(8), 'blockSize as reported');
    assertBool(v.protectionEnabled, 'protectionEnabled');
    if (v.protectionEnabled) assert.ok(v.protectionType >= 1 && v.protectionType <= 8);
    else assert.equal(v.protectionType, 0);
    assertBool(v.lbpme, 'lbpme');
    assertBool(v.lbprz, 'lbprz');
    assertUint(v.physicalBlockExponent, 0x0f, 'physicalBlockExponent');
    assertUint(v.lowestAlignedLba, 0x3fff, 'lowestAlignedLba');
  },
  hostile: capacity16Valid.chain(({ buf }) => deliver(buf)),
  valid: capacity16Valid,
});

// ---- REPORT LUNS ----

interface LunEntry {
  raw: bigint;
  lun: number | undefined;
}

const lunEntry: fc.Arbitrary<LunEntry> = fc.oneof(
  // Peripheral device addressing: byte 0 = 0, LUN in byte 1.
  fc.nat({ max: 0xff }).map((lun) => ({ raw: BigInt(lun) << 48n, lun })),
  // Flat space addressing: 01b in bits 7:6, 14-bit LUN.
  fc.nat({ max: 0x3fff }).map((lun) => ({ raw: BigInt(0x4000 | lun) << 48n, lun })),
  // A second level, or an addressing method this initiator does not use.
  fc
    .tuple(fc.nat({ max: 0xffff }), fc.bigInt({ min: 1n, max: (1n << 48n) - 1n }))
    .map(([top, low]) => ({ raw: (BigInt(top) << 48n) | low, lun: undefined })),
  fc.tuple(fc.integer({ min: 0x80, max: 0xff }), fc.bigInt({ min: 0n, max: (1n << 56n) - 1n })).map(([b0, low]) => ({
    raw: (BigInt(b0) << 56n) | low,
    lun: undefined,
  })),
);

const reportLunsValid: fc.Arbitrary<Sample<number[]>> = fc
  .tuple(fc.array(lunEntry, { maxLength: 64 }), u32)
  .map(([entries, reserved]) => ({
    buf: concat(be(4, entries.length * 8), be(4, reserved), ...entries.map((e) => be(8, e.raw))),
    expected: entries.flatMap((e) => (e.lun === undefined ? [] : [e.lun])),
  }));

const reportLunsSuite = suite<number[]>({
  parser: 'parseReportLuns',
  parse: parseReportLuns,
  check: (v, buf) => {
    const raw = parseReportLunsRaw(buf);
    const listLength = Buffer.from(buf).readUInt32BE(0);
    assert.equal(raw.length * 8, listLength);
    assert.ok(8 + listLength <= buf.length, 'entries past the buffer');
    for (const r of raw) assertBig(r, U64_MAX, 'raw LUN');
    assert.deepEqual(
      v,
      raw.map(decodeLun).filter((l) => l !== undefined),
    );
    for (const lun of v) assertUint(lun, 0x3fff, 'LUN');
  },
  hostile: fc
    .tuple(fc.array(lunEntry, { maxLength: 40 }), bytes(12))
    .chain(([entries, junk]) =>
      fc
        .oneof(
          lengthFor(entries.length * 8, 0xffffffff),
          // Not a multiple of 8, or near 2^32.
          fc.integer({ min: 0, max: 400 }),
          fc.integer({ min: 0xffffff00, max: 0xffffffff }),
        )
        .map((len) => concat(be(4, len), be(4, 0), ...entries.map((e) => be(8, e.raw)), junk)),
    )
    .chain(deliver),
  valid: reportLunsValid,
  large: fc.record({ n: fc.integer({ min: 0x1e00, max: 0x1fff }), flat: fc.boolean() }).map(({ n, flat }) => {
    const buf = new Uint8Array(8 + 8 * n);
    buf.set(be(4, 8 * n));
    for (let i = 0; i < n; i++) buf.set(flat ? [0x40 | (i >> 8), i & 0xff] : [0, i & 0xff], 8 + 8 * i);
    return buf;
  }),
});

// ---- MODE SENSE ----

interface ModePageSample {
  bytes: Uint8Array;
  key: number;
}

/** A mode page in page_0 or sub_page format (SPC-4 7.5.7). */
const modePageValid = (maxBody: number): fc.Arbitrary<ModePageSample> =>
  fc
    .record({ ps: fc.boolean(), code: fc.nat({ max: 0x3f }), spf: fc.boolean(), subpage: byte, body: bytes(maxBody) })
    .map(({ ps, code, spf, subpage, body }) => {
      const b0 = (ps ? 0x80 : 0) | (spf ? 0x40 : 0) | code;
      return spf
        ? { bytes: concat([b0, subpage], be(2, body.length), body), key: modePageKey(code, subpage) }
        : { bytes: concat([b0, body.length], body), key: code };
    });

interface ModeLayout {
  ten: boolean;
  longLba: boolean;
}

function modeDataValid({ ten, longLba }: ModeLayout): fc.Arbitrary<Sample<ModeSenseData>> {
  // MODE SENSE(6) data is at most 256 bytes: 4 + 4 * 8 + 4 * (4 + 40) fits.
  const maxDesc = ten ? 8 : 4;
  const maxBody = ten ? 200 : 40;
  const shortDesc = fc.record({
    numberOfBlocks: u32.map(BigInt),
    density: byte,
    blockLength: fc.nat({ max: 0xffffff }),
  });
  const longDesc = fc.record({ numberOfBlocks: u64, density: fc.constant(0), blockLength: u32 });
  return fc
    .record({
      mediumType: byte,
      deviceSpecific: byte,
      byte4: byte,
      descriptors: fc.array(longLba ? longDesc : shortDesc, { maxLength: maxDesc }),
      pages: fc.uniqueArray(modePageValid(maxBody), { maxLength: 4, selector: (p) => p.key }),
    })
    .map((f) => {
      const descs = f.descriptors.map((d) =>
        longLba
          ? concat(be(8, d.numberOfBlocks), be(4, 0), be(4, d.blockLength))
          : concat(be(4, d.numberOfBlocks), [d.density], be(3, d.blockLength)),
      );
      const bdl = descs.reduce((n, d) => n + d.length, 0);
      const pages = f.pages.map((p) => p.bytes);
      const header = ten
        ? concat(be(2, 0), [f.mediumType, f.deviceSpecific, (f.byte4 & 0xfe) | (longLba ? 1 : 0), 0], be(2, bdl))
        : concat([0, f.mediumType, f.deviceSpecific, bdl]);
      const buf = concat(header, ...descs, ...pages);
      if (ten) buf.set(be(2, buf.length - 2));
      else buf[0] = buf.length - 1;
      return {
        buf,
        expected: {
          mediumType: f.mediumType,
          writeProtected: (f.deviceSpecific & 0x80) !== 0,
          dpofua: (f.deviceSpecific & 0x10) !== 0,
          blockDescriptors: f.descriptors.map(({ numberOfBlocks, blockLength }) => ({ numberOfBlocks, blockLength })),
          pages: new Map(f.pages.map((p) => [p.key, p.bytes])),
        },
      };
    });
}

/** Mode data with hostile MODE DATA LENGTH, BLOCK DESCRIPTOR LENGTH and page lengths. */
function modeDataHostile(ten: boolean): fc.Arbitrary<Uint8Array> {
  const lenMax = ten ? 0xffff : 0xff;
  const page = fc
    .record({ b0: byte, b1: byte, body: bytes(48) })
    .chain(({ b0, b1, body }) =>
      b0 & 0x40
        ? lengthFor(body.length, 0xffff).map((len) => concat([b0, b1], be(2, len), body))
        : lengthFor(body.length, 0xff).map((len) => concat([b0, len], body)),
    );
  return fc
    .record({
      header: fc.array(byte, { minLength: 8, maxLength: 8 }),
      descs: bytes(64),
      pages: fc.array(page, { maxLength: 5 }),
      partial: bytes(3),
    })
    .chain(({ header, descs, pages, partial }) => {
      const rest = concat(descs, ...pages, partial);
      const headerLength = ten ? 8 : 4;
      return fc
        .tuple(lengthFor(headerLength + rest.length - (ten ? 2 : 1), lenMax), lengthFor(descs.length, lenMax))
        .map(([total, bdl]) => {
          const h = Uint8Array.from(header.slice(0, headerLength));
          if (ten) {
            h.set(be(2, total));
            h.set(be(2, bdl), 6);
          } else {
            h[0] = total;
            h[3] = bdl;
          }
          return concat(h, rest);
        });
    })
    .chain(deliver);
}

function checkModeSense(v: ModeSenseData, buf: Uint8Array, ten: boolean): void {
  assertUint(v.mediumType, 0xff, 'mediumType');
  assertBool(v.writeProtected, 'writeProtected');
  assertBool(v.dpofua, 'dpofua');
  const longLba = ten && ((buf[4] ?? 0) & 1) !== 0;
  const headerLength = ten ? 8 : 4;
  assert.ok(headerLength + v.blockDescriptors.length * (longLba ? 16 : 8) <= buf.length, 'descriptors past the end');
  for (const d of v.blockDescriptors) {
    assertBig(d.numberOfBlocks, longLba ? U64_MAX : 0xffffffffn, 'numberOfBlocks');
    assertUint(d.blockLength, longLba ? 0xffffffff : 0xffffff, 'blockLength');
  }
  let pageBytes = 0;
  for (const [key, page] of v.pages) {
    assertWithin(page, buf, `page ${key}`);
    assert.ok(page.length >= 2);
    const b0 = page[0] ?? 0;
    if (b0 & 0x40) {
      assert.equal(page.length, 4 + (((page[2] ?? 0) << 8) | (page[3] ?? 0)));
      assert.equal(key, modePageKey(b0 & 0x3f, page[1] ?? 0));
    } else {
      assert.equal(page.length, 2 + (page[1] ?? 0));
      assert.equal(key, b0 & 0x3f);
    }
    assertUint(key, 0x3fff, 'page key');
    pageBytes += page.length;
  }
  assert.ok(headerLength + pageBytes <= buf.length, 'pages past the end');
}

const modeSense6Suite = suite<ModeSenseData>({
  parser: 'parseModeSense6',
  parse: parseModeSense6,
  check: (v, buf) => checkModeSense(v, buf, false),
  hostile: modeDataHostile(false),
  valid: modeDataValid({ ten: false, longLba: false }),
});

const modeSense10Suite = suite<ModeSenseData>({
  parser: 'parseModeSense10',
  parse: parseModeSense10,
  check: (v, buf) => checkModeSense(v, buf, true),
  hostile: modeDataHostile(true),
  valid: fc.boolean().chain((longLba) => modeDataValid({ ten: true, longLba })),
  // Up to 64 KiB of empty pages.
  large: fc.record({ n: fc.integer({ min: 0x7000, max: 0x7ffb }), spf: fc.boolean() }).map(({ n, spf }) => {
    const size = spf ? 4 : 2;
    const count = Math.floor((0xffff - 6) / size) - (n & 0xff);
    const buf = new Uint8Array(8 + size * count);
    buf.set(be(2, buf.length - 2));
    for (let i = 0; i < count; i++) buf.set(spf ? [0x40 | (i & 0x3f), i >> 6] : [i & 0x3f], 8 + size * i);
    return buf;
  }),
});

const cachingSuite = suite<CachingPage>({
  parser: 'parseCachingPage',
  parse: parseCachingPage,
  check: (v, page) => {
    assertBool(v.wce, 'wce');
    assertBool(v.rcd, 'rcd');
    // The flags are in byte 2 of a page_0 page; in sub_page format that byte is PAGE LENGTH.
    assert.equal((page[0] ?? 0) & 0x7f, 0x08, 'accepted a page other than page_0 caching');
  },
  hostile: fc
    .tuple(fc.oneof(fc.constantFrom(0x08, 0x88, 0x48, 0xc8), byte), byte, bytes(24))
    .map(([b0, len, body]) => concat([b0, len], body))
    .chain(deliver),
  valid: fc
    .record({ ps: fc.boolean(), wce: fc.boolean(), rcd: fc.boolean(), b2: byte, rest: bytes(17) })
    .map(({ ps, wce, rcd, b2, rest }) => ({
      buf: concat([(ps ? 0x80 : 0) | 0x08, 1 + rest.length, (b2 & 0xfa) | (wce ? 0x04 : 0) | (rcd ? 0x01 : 0)], rest),
      expected: { wce, rcd },
    })),
  extra: [
    property('caching page found by MODE SENSE', modeDataValid({ ten: true, longLba: false }), ({ buf, expected }) => {
      // What scan does: look the page up, then decode it. A sub_page format page stored under
      // the same key must be refused, not read at the wrong offset; so must an empty one.
      const page = parseModeSense10(buf).pages.get(modePageKey(0x08));
      assert.deepEqual(page, expected.pages.get(0x08));
      if (!page) return;
      const out = attempt(parseCachingPage, page);
      const b2 = page[2] ?? 0;
      if ((page[0] ?? 0) & 0x40 || page.length < 3) assert.ok(!out.ok, 'sub_page format or empty page accepted');
      else assert.deepEqual(out, { ok: true, value: { wce: (b2 & 0x04) !== 0, rcd: (b2 & 0x01) !== 0 } });
    }),
  ],
});

// ---- sense data ----

function expectedSks(key: number, b0: number, field: number): SenseKeySpecific | undefined {
  if (!(b0 & 0x80)) return undefined;
  if (key === 0x5) {
    const out: SenseKeySpecific = { kind: 'field-pointer', commandData: (b0 & 0x40) !== 0, fieldPointer: field };
    if (b0 & 0x08) out.bitPointer = b0 & 0x07;
    return out;
  }
  if (key === 0x0 || key === 0x2) return { kind: 'progress', progress: field / 65536 };
  if (key === 0x1 || key === 0x3 || key === 0x4) return { kind: 'retry-count', count: field };
  return { kind: 'raw', value: ((b0 & 0x7f) << 16) | field };
}

function checkSense(v: DecodedSense, buf: Uint8Array): void {
  const code = (buf[0] ?? 0) & 0x7f;
  assert.equal(v.format, code >= 0x72 ? 'descriptor' : 'fixed');
  assert.equal(v.current, code === 0x70 || code === 0x72);
  assertUint(v.key, 0x0f, 'key');
  assertName(v.keyName, 'keyName');
  assertUint(v.asc, 0xff, 'asc');
  assertUint(v.ascq, 0xff, 'ascq');
  assertName(v.ascName, 'ascName');
  const fixed = v.format === 'fixed';
  if (v.information !== undefined) assertBig(v.information, fixed ? 0xffffffffn : U64_MAX, 'information');
  if (v.commandSpecific !== undefined) {
    assertBig(v.commandSpecific, fixed ? 0xffffffffn : U64_MAX, 'commandSpecific');
  }
  const sks = v.senseKeySpecific;
  if (sks?.kind === 'field-pointer') {
    assertUint(sks.fieldPointer, 0xffff, 'fieldPointer');
    if (sks.bitPointer !== undefined) assertUint(sks.bitPointer, 7, 'bitPointer');
  } else if (sks?.kind === 'progress') {
    assert.ok(sks.progress >= 0 && sks.progress < 1, `progress ${sks.progress}`);
  } else if (sks?.kind === 'retry-count') {
    assertUint(sks.count, 0xffff, 'count');
  } else if (sks?.kind === 'raw') {
    assertUint(sks.value, 0x7fffff, 'raw');
  }
  if (fixed) {
    assert.equal(v.descriptors, undefined);
    return;
  }
  // Descriptors follow each other from byte 8 and end within ADDITIONAL SENSE LENGTH.
  const descriptors = v.descriptors ?? [];
  let off = 8;
  for (const d of descriptors) {
    assertWithin(d.data, buf, 'descriptor');
    assert.equal(d.data.byteOffset - buf.byteOffset, off);
    assert.equal(d.data[0], d.type);
    assert.equal(d.data.length, 2 + (d.data[1] ?? 0));
    off += d.data.length;
  }
  if (descriptors.length > 0) assert.ok(off <= 8 + (buf[7] ?? 0));
}

const fixedSenseValid: fc.Arbitrary<Sample<DecodedSense>> = fc
  .record({
    current: fc.boolean(),
    valid: fc.boolean(),
    information: u32,
    key: fc.nat({ max: 0x0f }),
    b2High: byte,
    csi: fc.oneof(fc.constant(0), u32),
    asc: byte,
    ascq: byte,
    fru: byte,
    sks0: byte,
    sksField: u16,
    extra: bytes(20),
  })
  .map((f) => {
    const buf = concat(
      [(f.valid ? 0x80 : 0) | (f.current ? 0x70 : 0x71), 0, (f.b2High & 0xf0) | f.key],
      be(4, f.information),
      [10 + f.extra.length],
      be(4, f.csi),
      [f.asc, f.ascq, f.fru, f.sks0],
      be(2, f.sksField),
      f.extra,
    );
    const expected: DecodedSense = {
      format: 'fixed',
      current: f.current,
      key: f.key,
      keyName: senseKeyName(f.key),
      asc: f.asc,
      ascq: f.ascq,
      ascName: ascName(f.asc, f.ascq),
    };
    if (f.valid) expected.information = BigInt(f.information);
    if (f.csi !== 0) expected.commandSpecific = BigInt(f.csi);
    const sks = expectedSks(f.key, f.sks0, f.sksField);
    if (sks) expected.senseKeySpecific = sks;
    return { buf, expected };
  });

type SenseDescriptorSpec =
  | { kind: 'information'; valid: boolean; value: bigint }
  | { kind: 'command-specific'; value: bigint }
  | { kind: 'sks'; b0: number; field: number }
  | { kind: 'other'; type: number; body: Uint8Array };

const senseDescriptor: fc.Arbitrary<SenseDescriptorSpec> = fc.oneof(
  fc.record({ kind: fc.constant('information' as const), valid: fc.boolean(), value: u64 }),
  fc.record({ kind: fc.constant('command-specific' as const), value: u64 }),
  fc.record({ kind: fc.constant('sks' as const), b0: byte, field: u16 }),
  fc.record({ kind: fc.constant('other' as const), type: fc.integer({ min: 0x03, max: 0xff }), body: bytes(24) }),
);

function encodeSenseDescriptor(d: SenseDescriptorSpec): Uint8Array {
  switch (d.kind) {
    case 'information':
      return concat([0x00, 0x0a, d.valid ? 0x80 : 0, 0], be(8, d.value));
    case 'command-specific':
      return concat([0x01, 0x0a, 0, 0], be(8, d.value));
    case 'sks':
      return concat([0x02, 0x06, 0, 0, d.b0], be(2, d.field), [0]);
    case 'other':
      return concat([d.type, d.body.length], d.body);
  }
}

const descriptorSenseValid: fc.Arbitrary<Sample<DecodedSense>> = fc
  .record({
    current: fc.boolean(),
    key: fc.nat({ max: 0x0f }),
    b1High: byte,
    asc: byte,
    ascq: byte,
    descriptors: fc.array(senseDescriptor, { maxLength: 8 }),
  })
  .map((f) => {
    const encoded = f.descriptors.map(encodeSenseDescriptor);
    const body = concat(...encoded);
    const buf = concat([f.current ? 0x72 : 0x73, (f.b1High & 0xf0) | f.key, f.asc, f.ascq, 0, 0, 0, body.length], body);
    const expected: DecodedSense = {
      format: 'descriptor',
      current: f.current,
      key: f.key,
      keyName: senseKeyName(f.key),
      asc: f.asc,
      ascq: f.ascq,
      ascName: ascName(f.asc, f.ascq),
      descriptors: [],
    };
    let off = 8;
    for (const [i, d] of f.descriptors.entries()) {
      const len = encoded[i]?.length ?? 0;
      expected.descriptors?.push({ type: buf[off] ?? 0, data: buf.subarray(off, off + len) });
      off += len;
      // The last descriptor of each kind wins; SKS only when SKSV is set.
      if (d.kind === 'information' && d.valid) expected.information = d.value;
      if (d.kind === 'command-specific') expected.commandSpecific = d.value;
      if (d.kind === 'sks') {
        const sks = expectedSks(f.key, d.b0, d.field);
        if (sks) expected.senseKeySpecific = sks;
      }
    }
    return { buf, expected };
  })
  .filter(({ buf }) => buf.length <= 8 + 0xff);

/** Sense data of either format with a bogus ADDITIONAL SENSE LENGTH and descriptor lengths. */
const senseHostile: fc.Arbitrary<Uint8Array> = fc
  .record({
    code: fc.oneof(fc.constantFrom(0x70, 0x71, 0x72, 0x73, 0xf0, 0xf1, 0xf2, 0xf3), byte),
    header: fc.array(byte, { minLength: 7, maxLength: 7 }),
    descriptors: fc.array(
      fc.oneof(
        senseDescriptor.map(encodeSenseDescriptor),
        fc
          .record({ type: fc.constantFrom(0, 1, 2, 3, 0x80), body: bytes(16) })
          .chain(({ type, body }) => lengthFor(body.length, 0xff).map((len) => concat([type, len], body))),
      ),
      { maxLength: 6 },
    ),
    fixedBody: bytes(24),
  })
  .chain(({ code, header, descriptors, fixedBody }) => {
    const body = (code & 0x7f) >= 0x72 ? concat(...descriptors) : fixedBody;
    return lengthFor(body.length, 0xff).map((addl) => {
      const h = Uint8Array.from(header);
      h[6] = addl;
      return concat([code], h, body);
    });
  })
  .chain(deliver);

const senseSuite = suite<DecodedSense>({
  parser: 'decodeSense',
  parse: decodeSense,
  check: checkSense,
  hostile: senseHostile,
  valid: fc.oneof(fixedSenseValid, descriptorSenseValid),
  extra: [
    property('ScsiError with arbitrary sense', fc.tuple(byte, fc.oneof(ANY_BYTES, senseHostile)), ([status, sense]) => {
      // Garbage sense must not make the error itself throw.
      const err = new ScsiError({ status, sense, context: 'fuzz' });
      assertName(err.message, 'message');
      if (err.sense) checkSense(err.sense, sense);
    }),
    property(
      'lenient on a cut: fields before the cut survive',
      fixedSenseValid.chain((s) => fc.tuple(fc.constant(s), fc.integer({ min: 3, max: s.buf.length }))),
      ([{ buf }, cut]) => {
        const whole = decodeSense(buf);
        const part = decodeSense(buf.slice(0, cut));
        assert.equal(part.key, whole.key);
        if (cut >= 14) assert.deepEqual([part.asc, part.ascq], [whole.asc, whole.ascq]);
        if (cut >= 18) assert.deepStrictEqual(part.senseKeySpecific, whole.senseKeySpecific);
      },
    ),
  ],
});

// ---- CDB description (the builders in cdb.ts as encoder) ----

const cdbSuite: ParserSuite = {
  parser: 'describeCdb',
  properties: [
    property('arbitrary bytes', bytes(32), (cdb) => {
      assertName(describeCdb(cdb), 'description');
    }),
    property(
      'READ/WRITE builders round trip',
      fc.record({ write: fc.boolean(), lba: u64, blocks: u32, fua: fc.boolean() }),
      ({ write: isWrite, lba, blocks, fua }) => {
        const cdb = (isWrite ? write : read)({ lba, blocks, fua });
        const text = describeCdb(cdb);
        assert.match(text, isWrite ? /^WRITE\((?:10|16)\) / : /^READ\((?:10|16)\) /);
        assert.ok(text.endsWith(` lba ${lba} blocks ${blocks}`), text);
      },
    ),
  ],
};

export const PARSER_SUITES: readonly ParserSuite[] = [
  inquirySuite,
  supportedPagesSuite,
  serialSuite,
  deviceIdSuite,
  blockLimitsSuite,
  blockCharacteristicsSuite,
  provisioningSuite,
  capacity10Suite,
  capacity16Suite,
  reportLunsSuite,
  modeSense6Suite,
  modeSense10Suite,
  cachingSuite,
  senseSuite,
  cdbSuite,
];
