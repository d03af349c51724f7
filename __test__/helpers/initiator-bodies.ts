// Initiator checks that do not depend on the transport: scan, data verification, unmap,
// flush, reset, error cases and batching, written against the native binding (packed
// submit/reap records). The same bodies run over a vhost-user socket on the host and over a
// VFIO PCI function inside a QEMU guest (scripts/guest/pci-check.sh), so both transports are
// held to identical assertions. BLK_BODIES do the same for a virtio-blk disk, through the
// TypeScript facade (a virtio-blk device has no SCSI commands to send raw).
//
// `Check` is the part of ava's ExecutionContext the bodies use: ava's `t` can be passed as it
// is, and the guest runner supplies one that records failures and prints them.

import { setImmediate as yieldToLoop } from 'node:timers/promises';

import type { Controller } from '../../ts/controller.js';
import type { BlockDevice } from '../../ts/block-device.js';
import { NotSupportedError } from '../../ts/errors.js';
import type { NativeChannel, NativeController } from '../../ts/native.js';
import { CompletionReader, Direction, RecordWriter } from '../../ts/records.js';
import {
  decodeSense,
  inquiry,
  parseInquiry,
  parseReadCapacity10,
  parseReportLuns,
  read10,
  readCapacity10,
  reportLuns,
  ScsiStatus,
  SenseKey,
  synchronizeCache10,
  synchronizeCache16,
  testUnitReady,
  unmap,
  unmapParameterList,
  write10,
  write16,
  read16,
} from '../../ts/scsi/index.js';

export interface Check {
  is(actual: unknown, expected: unknown, message?: string): unknown;
  true(actual: boolean, message?: string): unknown;
  deepEqual(actual: unknown, expected: unknown, message?: string): unknown;
  log(...values: unknown[]): void;
}

/** Bytes at `offset` of a LUN whose contents are pattern(`seed`). */
export interface PatternRegion {
  offset: number;
  bytes: number;
  seed: number;
}

export interface LunSpec {
  target: number;
  lun: number;
  blockSize: number;
  blocks: number;
  /** Put on the LUN by the host before the run: the initiator must read exactly these bytes. */
  preset?: PatternRegion;
  /** Written by the data body; the host compares its own view (image file) afterwards. */
  hostCheck?: PatternRegion;
}

export interface BodyContext {
  controller: NativeController;
  luns: LunSpec[];
}

export type Body = (t: Check, ctx: BodyContext) => Promise<void>;

const KiB = 1024;
const MiB = 1024 * KiB;
/** Scratch areas of every LUN (LUNs are at least 16 MiB). */
const AREA = { data: 4 * MiB, unmap: 6 * MiB, batch: 8 * MiB, reset: 12 * MiB, bigBatch: 13 * MiB } as const;
export const MIN_LUN_BYTES = 16 * MiB;

/** Deterministic bytes for a seed (xorshift32): the host and the guest compute the same. */
export function pattern(seed: number, len: number): Buffer {
  const out = Buffer.alloc(len);
  let x = (Math.imul(seed + 1, 0x9e3779b1) ^ 0x5bd1e995) >>> 0 || 1;
  for (let i = 0; i < len; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out.writeUInt32LE(x, i);
  }
  return out;
}

/** Seeds for the preset and host-check regions of a LUN, distinct per LUN. */
export function regionsFor(target: number, lun: number): { preset: PatternRegion; hostCheck: PatternRegion } {
  const id = target * 64 + lun;
  return {
    preset: { offset: 2 * MiB, bytes: 64 * KiB, seed: 2000 + id },
    hostCheck: { offset: 1 * MiB, bytes: 64 * KiB, seed: 1000 + id },
  };
}

export const lunId = (l: { target: number; lun: number }): string => `${l.target}:${l.lun}`;

// ---------------------------------------------------------------- raw commands

export interface Command {
  target: number;
  lun: number;
  cdb: Uint8Array;
  /** Direction.NONE, IN or OUT. */
  dir: number;
  buffer?: Buffer;
}

export interface Completion {
  response: number;
  status: number;
  sense: Buffer;
  residual: number;
  dataLength: number;
}

/** Longest a command may take inside a TCG guest before the test gives up on it. */
const COMMAND_TIMEOUT_MS = 60_000;

/**
 * One request queue driven through packed records: many commands per submit call, many
 * completions per reap call, polled (yielding to the event loop) until all are back.
 */
export class RawChannel {
  readonly channel: NativeChannel;
  private tokenBase = 1;
  submitCalls = 0;

  constructor(controller: NativeController) {
    this.channel = controller.openChannel();
  }

  close(): void {
    this.channel.close();
  }

  async run(cmds: Command[]): Promise<Completion[]> {
    const ch = this.channel;
    const writer = new RecordWriter(ch.submissionArea());
    const reader = new CompletionReader(ch.completionArea(), ch.capacity);
    const byToken = new Map<number, number>();
    const done: (Completion | undefined)[] = new Array(cmds.length);
    let submitted = 0;
    let completed = 0;
    const deadline = Date.now() + COMMAND_TIMEOUT_MS;
    while (completed < cmds.length) {
      // The next commands, as many as the area holds; those the ring does not take are
      // written again next time.
      const count = Math.min(cmds.length - submitted, ch.capacity);
      const buffers: (Buffer | null)[] = [];
      for (let i = 0; i < count; i++) {
        const c = cmds[submitted + i]!;
        const token = (submitted + i + this.tokenBase) & 0xffff;
        byToken.set(token, submitted + i);
        writer.cdb(i, token, c.target, c.lun, c.cdb, 0, c.buffer ? c.dir : Direction.NONE, -1, 0, buffers.length);
        buffers.push(c.buffer ?? null);
      }
      if (count > 0) this.submitCalls++;
      const r = ch.pump(count, buffers);
      submitted += r >>> 16;
      const n = r & 0xffff;
      for (let i = 0; i < n; i++) {
        const idx = byToken.get(reader.token(i));
        if (idx === undefined || done[idx]) throw new Error(`completion with unknown token ${reader.token(i)}`);
        done[idx] = {
          response: reader.response(i),
          status: reader.status(i),
          sense: Buffer.from(reader.sense(i)),
          residual: reader.residual(i),
          dataLength: reader.dataLength(i),
        };
        completed++;
      }
      if (n === 0) {
        if (Date.now() > deadline) {
          throw new Error(`${cmds.length - completed} of ${cmds.length} commands did not complete in ${COMMAND_TIMEOUT_MS} ms`);
        }
        await yieldToLoop();
      }
    }
    // Tokens of the next run follow on, so a late completion of this one could not be mistaken.
    this.tokenBase = (this.tokenBase + cmds.length) & 0xffff;
    return done as Completion[];
  }

  /** One command; UNIT ATTENTION, BUSY and TASK SET FULL are retried a few times. */
  async exec(cmd: Command, retries = 6): Promise<Completion> {
    for (let attempt = 0; ; attempt++) {
      const [c] = await this.run([cmd]);
      if (attempt < retries && retryable(c!)) continue;
      return c!;
    }
  }
}

function retryable(c: Completion): boolean {
  if (c.response !== 0) return false;
  if (c.status === ScsiStatus.BUSY || c.status === ScsiStatus.TASK_SET_FULL) return true;
  return c.status === ScsiStatus.CHECK_CONDITION && senseKey(c) === SenseKey.UNIT_ATTENTION;
}

function senseKey(c: Completion): number | undefined {
  try {
    return c.sense.length > 0 ? decodeSense(c.sense).key : undefined;
  } catch {
    return undefined;
  }
}

function senseOf(c: Completion): { key: number; asc: number } | undefined {
  try {
    if (c.sense.length === 0) return undefined;
    const s = decodeSense(c.sense);
    return { key: s.key, asc: s.asc };
  } catch {
    return undefined;
  }
}

function describe(c: Completion): string {
  const s = senseOf(c);
  return `response ${c.response} status ${c.status}${s ? ` sense ${s.key.toString(16)}/${s.asc.toString(16)}` : ''}`;
}

function good(t: Check, c: Completion, what: string): boolean {
  const ok = c.response === 0 && c.status === ScsiStatus.GOOD;
  t.true(ok, `${what}: ${describe(c)}`);
  return ok;
}

// ---------------------------------------------------------------- data helpers

function rw(write: boolean, l: LunSpec, lba: number, blocks: number, buffer: Buffer): Command {
  const cdb = lba + blocks > 0xffffffff || blocks > 0xffff
    ? (write ? write16 : read16)({ lba: BigInt(lba), blocks })
    : (write ? write10 : read10)({ lba, blocks });
  return { target: l.target, lun: l.lun, cdb, dir: write ? Direction.OUT : Direction.IN, buffer };
}

async function writeAt(t: Check, ch: RawChannel, l: LunSpec, offset: number, data: Buffer, what: string): Promise<boolean> {
  const c = await ch.exec(rw(true, l, offset / l.blockSize, data.length / l.blockSize, data));
  return good(t, c, `${what}: WRITE ${data.length} bytes at ${offset} of ${lunId(l)}`);
}

async function readAt(t: Check, ch: RawChannel, l: LunSpec, offset: number, into: Buffer, what: string): Promise<boolean> {
  into.fill(0xee);
  const c = await ch.exec(rw(false, l, offset / l.blockSize, into.length / l.blockSize, into));
  if (!good(t, c, `${what}: READ ${into.length} bytes at ${offset} of ${lunId(l)}`)) return false;
  t.is(c.residual, 0, `${what}: residual of the READ at ${offset} of ${lunId(l)}`);
  t.is(c.dataLength, into.length, `${what}: data length of the READ at ${offset} of ${lunId(l)}`);
  return true;
}

function sameBytes(t: Check, actual: Buffer, expected: Buffer, what: string): void {
  if (actual.equals(expected)) {
    t.true(true, what);
    return;
  }
  let i = 0;
  while (i < actual.length && actual[i] === expected[i]) i++;
  t.true(false, `${what}: first difference at byte ${i} of ${expected.length} (${actual[i]} != ${expected[i]})`);
}

async function withChannel<T>(ctx: BodyContext, f: (ch: RawChannel) => Promise<T>): Promise<T> {
  const ch = new RawChannel(ctx.controller);
  try {
    return await f(ch);
  } finally {
    ch.close();
  }
}

// ---------------------------------------------------------------- bodies

/** REPORT LUNS per target, INQUIRY and READ CAPACITY per LUN: what the host configured. */
const scan: Body = async (t, ctx) =>
  withChannel(ctx, async (ch) => {
    const targets = [...new Set(ctx.luns.map((l) => l.target))].sort((a, b) => a - b);
    for (const target of targets) {
      const buf = Buffer.alloc(4096);
      const c = await ch.exec({ target, lun: 0, cdb: reportLuns(buf.length), dir: Direction.IN, buffer: buf });
      if (!good(t, c, `REPORT LUNS of target ${target}`)) continue;
      const expected = ctx.luns.filter((l) => l.target === target).map((l) => l.lun);
      t.deepEqual(parseReportLuns(buf.subarray(0, c.dataLength)).sort((a, b) => a - b), expected.sort((a, b) => a - b), `LUNs of target ${target}`);
    }
    for (const l of ctx.luns) {
      const inq = Buffer.alloc(96);
      const c = await ch.exec({ target: l.target, lun: l.lun, cdb: inquiry({ allocationLength: inq.length }), dir: Direction.IN, buffer: inq });
      if (good(t, c, `INQUIRY of ${lunId(l)}`)) {
        const parsed = parseInquiry(inq.subarray(0, c.dataLength));
        t.is(parsed.deviceType, 0, `${lunId(l)} is a disk`);
        t.is(parsed.peripheralQualifier, 0, `${lunId(l)} is connected`);
        t.log(`${lunId(l)}: ${parsed.vendor.trim()} ${parsed.product.trim()} ${parsed.revision.trim()}`);
      }
      const cap = Buffer.alloc(8);
      const rc = await ch.exec({ target: l.target, lun: l.lun, cdb: readCapacity10(), dir: Direction.IN, buffer: cap });
      if (good(t, rc, `READ CAPACITY(10) of ${lunId(l)}`)) {
        const p = parseReadCapacity10(cap);
        t.deepEqual({ blocks: p.lastLba + 1, blockSize: p.blockSize }, { blocks: l.blocks, blockSize: l.blockSize }, `geometry of ${lunId(l)}`);
      }
    }
  });

/** Write, read back and compare: DMA buffers (zero copy) and plain Buffers (bounce), one block
 * and many, at the start, middle and end of every LUN; the host's preset bytes read back
 * unchanged; the host-check region written for the host to verify. */
const data: Body = async (t, ctx) =>
  withChannel(ctx, async (ch) => {
    for (const [i, l] of ctx.luns.entries()) {
      const bs = l.blockSize;
      const size = l.blocks * bs;
      t.true(size >= MIN_LUN_BYTES, `${lunId(l)} has at least ${MIN_LUN_BYTES} bytes`);
      const spots: Array<{ offset: number; bytes: number; dma: boolean }> = [
        { offset: 0, bytes: bs, dma: true },
        { offset: AREA.data, bytes: 64 * KiB, dma: false },
        { offset: AREA.data + 128 * KiB, bytes: 1 * MiB, dma: true },
        { offset: AREA.data + 2 * MiB - bs * 3, bytes: bs * 3, dma: false },
        { offset: size - 8 * bs, bytes: 8 * bs, dma: true },
      ];
      for (const [j, s] of spots.entries()) {
        const what = `spot ${j} (${s.dma ? 'DMA buffer' : 'plain Buffer'})`;
        const expected = pattern(100 * i + j, s.bytes);
        const out = s.dma ? ctx.controller.allocDmaBuffer(s.bytes) : Buffer.alloc(s.bytes);
        expected.copy(out);
        if (!(await writeAt(t, ch, l, s.offset, out, what))) continue;
        const back = s.dma ? ctx.controller.allocDmaBuffer(s.bytes) : Buffer.alloc(s.bytes);
        if (await readAt(t, ch, l, s.offset, back, what)) sameBytes(t, back, expected, `${what} of ${lunId(l)} reads back`);
      }
      if (l.preset) {
        const back = Buffer.alloc(l.preset.bytes);
        if (await readAt(t, ch, l, l.preset.offset, back, 'preset')) {
          sameBytes(t, back, pattern(l.preset.seed, l.preset.bytes), `bytes the host put on ${lunId(l)}`);
        }
      }
      if (l.hostCheck) {
        await writeAt(t, ch, l, l.hostCheck.offset, pattern(l.hostCheck.seed, l.hostCheck.bytes), 'host check');
      }
    }
    // The host-check data must be on the medium, not in a cache, when the host looks.
    for (const l of ctx.luns) good(t, await ch.exec({ target: l.target, lun: l.lun, cdb: synchronizeCache10(), dir: Direction.NONE }), `SYNCHRONIZE CACHE of ${lunId(l)}`);
  });

/** SYNCHRONIZE CACHE (10) of the whole medium and of a range; (16) where the target has it
 * (it is optional: QEMU's scsi-hd refuses it as an unknown opcode). */
const flush: Body = async (t, ctx) =>
  withChannel(ctx, async (ch) => {
    for (const l of ctx.luns) {
      const at = (cdb: Uint8Array) => ch.exec({ target: l.target, lun: l.lun, cdb, dir: Direction.NONE });
      good(t, await at(synchronizeCache10()), `SYNCHRONIZE CACHE(10) of ${lunId(l)}`);
      good(t, await at(synchronizeCache10({ lba: 8, blocks: 16 })), `SYNCHRONIZE CACHE(10) of a range of ${lunId(l)}`);
      const c16 = await at(synchronizeCache16());
      const s = senseOf(c16);
      const unsupported = c16.status === ScsiStatus.CHECK_CONDITION && s?.key === SenseKey.ILLEGAL_REQUEST && s.asc === 0x20;
      t.true(c16.response === 0 && (c16.status === ScsiStatus.GOOD || unsupported), `SYNCHRONIZE CACHE(16) of ${lunId(l)}: ${describe(c16)}`);
      if (unsupported) t.log(`${lunId(l)}: SYNCHRONIZE CACHE(16) is not implemented by this target`);
    }
  });

/** UNMAP a written range: it reads back as zeros, the blocks around it keep their data. */
const unmapBody: Body = async (t, ctx) =>
  withChannel(ctx, async (ch) => {
    for (const [i, l] of ctx.luns.entries()) {
      const bytes = 256 * KiB;
      const before = pattern(500 + i, bytes);
      if (!(await writeAt(t, ch, l, AREA.unmap, before, 'unmap setup'))) continue;
      const first = AREA.unmap + 64 * KiB;
      const list = Buffer.from(unmapParameterList([{ lba: first / l.blockSize, blocks: (128 * KiB) / l.blockSize }]));
      const c = await ch.exec({ target: l.target, lun: l.lun, cdb: unmap(list.length), dir: Direction.OUT, buffer: list });
      if (!good(t, c, `UNMAP of ${lunId(l)}`)) continue;
      const back = Buffer.alloc(bytes);
      if (!(await readAt(t, ch, l, AREA.unmap, back, 'after UNMAP'))) continue;
      sameBytes(t, back.subarray(0, 64 * KiB), before.subarray(0, 64 * KiB), `data before the unmapped range of ${lunId(l)}`);
      sameBytes(t, back.subarray(64 * KiB, 192 * KiB), Buffer.alloc(128 * KiB), `unmapped range of ${lunId(l)} reads zeros`);
      sameBytes(t, back.subarray(192 * KiB), before.subarray(192 * KiB), `data after the unmapped range of ${lunId(l)}`);
    }
  });

/** LOGICAL UNIT RESET through the control queue; the unit answers again (after its UNIT
 * ATTENTION) and keeps its data. */
const reset: Body = async (t, ctx) =>
  withChannel(ctx, async (ch) => {
    const l = ctx.luns[0]!;
    const data = pattern(900, 32 * KiB);
    await writeAt(t, ch, l, AREA.reset, data, 'before reset');
    const LOGICAL_UNIT_RESET = 5;
    const response = await ctx.controller.taskManagement(l.target, l.lun, LOGICAL_UNIT_RESET);
    // FUNCTION COMPLETE (0) or FUNCTION SUCCEEDED (10).
    t.true(response === 0 || response === 10, `LOGICAL UNIT RESET of ${lunId(l)}: virtio response ${response}`);
    good(t, await ch.exec({ target: l.target, lun: l.lun, cdb: testUnitReady(), dir: Direction.NONE }), `TEST UNIT READY after the reset`);
    const back = Buffer.alloc(data.length);
    if (await readAt(t, ch, l, AREA.reset, back, 'after reset')) sameBytes(t, back, data, `data of ${lunId(l)} survives the reset`);
    t.is(ctx.controller.failure, null, 'controller still healthy');
  });

/** What a target must refuse, it refuses with the right status and sense. */
const errors: Body = async (t, ctx) =>
  withChannel(ctx, async (ch) => {
    const l = ctx.luns[0]!;
    const one = Buffer.alloc(l.blockSize);
    const beyond = await ch.exec(rw(false, l, l.blocks, 1, one));
    t.deepEqual(
      { response: beyond.response, status: beyond.status, sense: senseOf(beyond) },
      { response: 0, status: ScsiStatus.CHECK_CONDITION, sense: { key: SenseKey.ILLEGAL_REQUEST, asc: 0x21 } },
      'READ past the last block: LBA OUT OF RANGE',
    );
    const bogus = await ch.exec({ target: l.target, lun: l.lun, cdb: Uint8Array.of(0xff, 0, 0, 0, 0, 0), dir: Direction.NONE });
    t.deepEqual(
      { status: bogus.status, sense: senseOf(bogus) },
      { status: ScsiStatus.CHECK_CONDITION, sense: { key: SenseKey.ILLEGAL_REQUEST, asc: 0x20 } },
      'unknown opcode: INVALID COMMAND OPERATION CODE',
    );
    // An absent LUN of a present target (SPC-4 4.6.9): INQUIRY says "no logical unit",
    // other commands fail with LOGICAL UNIT NOT SUPPORTED.
    const missingLun = Math.max(...ctx.luns.filter((x) => x.target === l.target).map((x) => x.lun)) + 1;
    const inq = Buffer.alloc(36);
    const noLunInq = await ch.exec({ target: l.target, lun: missingLun, cdb: inquiry({ allocationLength: 36 }), dir: Direction.IN, buffer: inq });
    if (good(t, noLunInq, `INQUIRY of the absent LUN ${l.target}:${missingLun}`)) {
      t.is(inq[0], 0x7f, `INQUIRY of the absent LUN ${l.target}:${missingLun}: peripheral qualifier 3, type 0x1f`);
    }
    const noLun = await ch.exec({ target: l.target, lun: missingLun, cdb: testUnitReady(), dir: Direction.NONE });
    t.deepEqual(
      { response: noLun.response, status: noLun.status, sense: senseOf(noLun) },
      { response: 0, status: ScsiStatus.CHECK_CONDITION, sense: { key: SenseKey.ILLEGAL_REQUEST, asc: 0x25 } },
      `TEST UNIT READY of the absent LUN ${l.target}:${missingLun}: LOGICAL UNIT NOT SUPPORTED`,
    );
    const missingTarget = Math.max(...ctx.luns.map((x) => x.target)) + 7;
    const noTarget = await ch.exec({ target: missingTarget, lun: 0, cdb: testUnitReady(), dir: Direction.NONE });
    t.is(noTarget.response, 3, `command to the absent target ${missingTarget}: virtio BAD_TARGET`);
    t.is(ctx.controller.failure, null, 'refused commands leave the controller healthy');
  });

/** Many requests in one submit call, completions reaped in batches, data verified. */
const batch: Body = async (t, ctx) =>
  withChannel(ctx, async (ch) => {
    const l = ctx.luns[ctx.luns.length - 1]!;
    const count = 48;
    const bytes = Math.max(l.blockSize, 4 * KiB);
    const bufs = Array.from({ length: count }, (_, i) => {
      const b = i % 2 === 0 ? ctx.controller.allocDmaBuffer(bytes) : Buffer.alloc(bytes);
      pattern(700 + i, bytes).copy(b);
      return b;
    });
    const calls = ch.submitCalls;
    const writes = await ch.run(bufs.map((b, i) => rw(true, l, (AREA.batch + i * bytes) / l.blockSize, bytes / l.blockSize, b)));
    t.true(ch.submitCalls - calls <= Math.ceil(count / 16), `${count} writes went down in ${ch.submitCalls - calls} submit calls`);
    writes.forEach((c, i) => good(t, c, `batched WRITE ${i}`));
    const backs = Array.from({ length: count }, () => Buffer.alloc(bytes, 0xee));
    const reads = await ch.run(backs.map((b, i) => rw(false, l, (AREA.batch + i * bytes) / l.blockSize, bytes / l.blockSize, b)));
    let same = 0;
    reads.forEach((c, i) => {
      if (good(t, c, `batched READ ${i}`) && backs[i]!.equals(pattern(700 + i, bytes))) same++;
    });
    t.is(same, count, 'every batched block reads back what was written');
  });

/** Requests in each batch of the big-batch body: more than the ring has slots. */
const BIG_BATCH_MIN = 320;
/** Bytes of LUN (and of DMA memory) each big-batch request may use. */
const BIG_BATCH_STRIDE = 4 * KiB;

/**
 * Batches larger than the ring, so that request slots (and descriptors) are reused within
 * one batch while the rest of it is still on the device. On every LUN, three batches of at
 * least 320 requests on one channel: writes of region A; reads of A interleaved with writes of
 * region B; reads of B. Buffers rotate between DMA memory at a page boundary, DMA memory
 * straddling a page boundary, and plain Buffers (bounced through DMA memory), and requests of
 * a 512-byte-block LUN are 1 to 8 blocks long. Every read must come back GOOD with its whole
 * length and exactly the bytes written: a request that reports success without its data is
 * the failure this looks for, in particular among the reads placed after the first `capacity`
 * requests of a batch. Those go down together and take every slot, so each later request runs
 * on a slot that an earlier request of the same batch gave back.
 */
const bigBatch: Body = async (t, ctx) =>
  withChannel(ctx, async (ch) => {
    const capacity = ch.channel.capacity;
    const count = Math.max(BIG_BATCH_MIN, capacity + 64);
    // DMA memory for the buffers, one stride (plus a page, for the straddling ones) each:
    // `first` serves the first and the last batch (one after the other), `middle` the middle
    // one, for both LUNs in turn.
    const span = BIG_BATCH_STRIDE + 4 * KiB;
    const first = ctx.controller.allocDmaBuffer(count * span);
    const middle = ctx.controller.allocDmaBuffer(2 * count * span);
    const kinds = ['DMA buffer', 'DMA buffer across a page', 'plain Buffer'] as const;
    const bufferFor = (arena: Buffer, slot: number, kind: number, bytes: number): Buffer => {
      if (kind === 2) return Buffer.alloc(bytes);
      // Page aligned, or starting 64-byte aligned somewhere in the page so that it runs into
      // the next one.
      const at = slot * span + (kind === 0 ? 0 : 4 * KiB - 64 * (1 + (slot % 32)));
      return arena.subarray(at, at + bytes);
    };
    for (const [n, l] of ctx.luns.entries()) {
      const bs = l.blockSize;
      const blocksOf = (i: number) => (bs >= BIG_BATCH_STRIDE ? 1 : 1 + ((i * 5) % Math.min(8, BIG_BATCH_STRIDE / bs)));
      const bytesOf = (i: number) => blocksOf(i) * bs;
      const region = (r: 0 | 1) => AREA.bigBatch + r * count * BIG_BATCH_STRIDE;
      const lbaOf = (r: 0 | 1, i: number) => (region(r) + i * BIG_BATCH_STRIDE) / bs;
      const seedOf = (r: 0 | 1, i: number) => 10_000 + 4000 * n + 2000 * r + i;
      t.true(region(1) + count * BIG_BATCH_STRIDE <= MIN_LUN_BYTES, `big-batch areas fit ${lunId(l)}`);
      // A pending UNIT ATTENTION (after power-on or a reset) is taken here, not by a batch.
      good(t, await ch.exec({ target: l.target, lun: l.lun, cdb: testUnitReady(), dir: Direction.NONE }), `TEST UNIT READY of ${lunId(l)}`);

      interface Req {
        cmd: Command;
        read?: { buffer: Buffer; expected: Buffer; what: string };
      }
      const write = (arena: Buffer, slot: number, r: 0 | 1, i: number): Req => {
        const kind = (i + r) % 3;
        const b = bufferFor(arena, slot, kind, bytesOf(i));
        pattern(seedOf(r, i), b.length).copy(b);
        return { cmd: rw(true, l, lbaOf(r, i), blocksOf(i), b) };
      };
      const read = (arena: Buffer, slot: number, r: 0 | 1, i: number): Req => {
        const kind = (i + r + 1) % 3;
        const b = bufferFor(arena, slot, kind, bytesOf(i));
        b.fill(0xee);
        const what = `region ${'AB'[r]} request ${i} of ${lunId(l)} (${kinds[kind]})`;
        return { cmd: rw(false, l, lbaOf(r, i), blocksOf(i), b), read: { buffer: b, expected: pattern(seedOf(r, i), b.length), what } };
      };
      // Each batch is made only when the one before it is done: the first and the last share
      // their DMA memory.
      const batches: Array<{ name: string; make: () => Req[] }> = [
        { name: 'writes of A', make: () => Array.from({ length: count }, (_, i) => write(first, i, 0, i)) },
        {
          name: 'reads of A with writes of B',
          make: () => Array.from({ length: count }, (_, i) => [read(middle, 2 * i, 0, i), write(middle, 2 * i + 1, 1, i)]).flat(),
        },
        { name: 'reads of B', make: () => Array.from({ length: count }, (_, i) => read(first, i, 1, i)) },
      ];
      let readsOk = 0;
      let reads = 0;
      let reusedReads = 0;
      let reusedOk = 0;
      for (const batch of batches) {
        const b = { name: batch.name, reqs: batch.make() };
        const done = await ch.run(b.reqs.map((r) => r.cmd));
        let bad = 0;
        b.reqs.forEach((r, i) => {
          const c = done[i]!;
          const ok = c.response === 0 && c.status === ScsiStatus.GOOD;
          if (!r.read) {
            if (!ok && bad++ < 8) t.true(false, `${b.name} of ${lunId(l)}: request ${i}: ${describe(c)}`);
            return;
          }
          reads++;
          // Position `capacity` and later: on a slot an earlier request of the batch gave back.
          const reused = i >= capacity;
          if (reused) reusedReads++;
          const complete = ok && c.residual === 0 && c.dataLength === r.read.buffer.length;
          const same = r.read.buffer.equals(r.read.expected);
          if (complete && same) {
            readsOk++;
            if (reused) reusedOk++;
          } else if (bad++ < 8) {
            let at = 0;
            while (at < r.read.buffer.length && r.read.buffer[at] === r.read.expected[at]) at++;
            const untouched = r.read.buffer.every((x) => x === 0xee);
            t.true(
              false,
              `${b.name}: ${r.read.what}, position ${i} of ${b.reqs.length}${reused ? ' (reused slot)' : ''}: ${describe(c)} ` +
                `residual ${c.residual} data length ${c.dataLength} of ${r.read.buffer.length}; ` +
                (same
                  ? 'data right'
                  : untouched
                    ? 'buffer untouched (no data arrived)'
                    : `data differs from byte ${at}: ${r.read.buffer.subarray(at, at + 8).toString('hex')} instead of ${r.read.expected.subarray(at, at + 8).toString('hex')}`),
            );
          }
        });
        if (bad > 8) t.true(false, `${b.name} of ${lunId(l)}: ${bad - 8} more failures`);
      }
      t.is(readsOk, reads, `${lunId(l)}: every big-batch read is GOOD, whole, and holds what was written`);
      t.true(reusedReads >= 64, `${lunId(l)}: ${reusedReads} reads sat after the first ${capacity} requests of their batch`);
      t.is(reusedOk, reusedReads, `${lunId(l)}: reads on reused slots are right`);
      t.log(`${lunId(l)}: batches of ${count}, ${2 * count} and ${count} requests on a ${capacity}-slot channel; ${readsOk}/${reads} reads right, ${reusedOk}/${reusedReads} on reused slots`);
    }
    t.is(ctx.controller.failure, null, 'controller still healthy');
  });

/** Every body, by name, in the order they run. */
export const BODIES: ReadonlyArray<readonly [string, Body]> = [
  ['scan', scan],
  ['data', data],
  ['batch', batch],
  ['big-batch', bigBatch],
  ['flush', flush],
  ['unmap', unmapBody],
  ['reset', reset],
  ['errors', errors],
];

// ---------------------------------------------------------------- virtio-blk bodies

/** `f` must throw (or reject with) an error whose message matches `re`, of class `type` when
 * one is given. */
export async function refuses(
  t: Check,
  what: string,
  f: () => unknown,
  re: RegExp,
  type?: abstract new (...args: never[]) => Error,
): Promise<void> {
  try {
    await f();
    t.true(false, `${what}: no error`);
  } catch (e) {
    const text = e instanceof Error ? e.message : String(e);
    if (type) t.true(e instanceof type, `${what}: ${e instanceof Error ? e.name : typeof e} "${text}" is not a ${type.name}`);
    t.true(re.test(text), `${what}: error "${text}" does not match ${re}`);
    t.log(`${what}: ${text}`);
  }
}

/** A virtio-blk disk as the host set it up: what the scan must find, and the regions the host
 * preset and checks afterwards. */
export interface BlkDiskSpec {
  blockSize: number;
  blocks: number;
  /** The ID string GET ID returns: the disk's serial number. */
  serial: string;
  /** The device offers DISCARD. */
  discard: boolean;
  preset: PatternRegion;
  hostCheck: PatternRegion;
}

export interface BlkBodyContext {
  /** A virtio-blk controller, open and scanned. */
  controller: Controller;
  disk: BlkDiskSpec;
}

export type BlkBody = (t: Check, ctx: BlkBodyContext) => Promise<void>;

/** A disk (of at least MIN_LUN_BYTES) with its preset and host-check regions, their seeds apart
 * from any SCSI LUN's. */
export function blkDisk(d: Omit<BlkDiskSpec, 'preset' | 'hostCheck'>): BlkDiskSpec {
  return {
    ...d,
    preset: { offset: 2 * MiB, bytes: 64 * KiB, seed: 2900 },
    hostCheck: { offset: 1 * MiB, bytes: 64 * KiB, seed: 1900 },
  };
}

/** A range written with pattern(seed) whose middle half (`hole`) a body then zeroes. */
interface ZeroedRange extends PatternRegion {
  hole: { offset: number; bytes: number };
}

/** Where the blk bodies write (none overlaps another, or a preset or host-check region). */
function blkPlaces(d: BlkDiskSpec) {
  const bs = d.blockSize;
  const zeroed = (offset: number, seed: number): ZeroedRange => ({ offset, bytes: 256 * KiB, seed, hole: { offset: offset + 64 * KiB, bytes: 128 * KiB } });
  return {
    /** The first and the last blocks; one DMA buffer of many blocks; a plain Buffer of an odd
     * number of blocks (bounced); one call larger than a transfer (split in pieces). */
    data: [
      { offset: 0, bytes: bs, seed: 3100, dma: true },
      { offset: d.blocks * bs - 8 * bs, bytes: 8 * bs, seed: 3101, dma: true },
      { offset: 3 * MiB, bytes: 1 * MiB, seed: 3102, dma: true },
      { offset: 4 * MiB, bytes: 64 * KiB + 3 * bs, seed: 3103, dma: false },
      { offset: 8 * MiB, bytes: BLK_SPLIT_BYTES, seed: 3104, dma: true },
    ],
    fua: { offset: 4 * MiB + 512 * KiB, bytes: 16 * KiB, seed: 3105 },
    writeZeroes: zeroed(5 * MiB, 3106),
    discard: zeroed(5 * MiB + 512 * KiB, 3107),
  };
}

/** Bytes of the blk data body's largest call: more than one transfer of the controllers the
 * bodies run on (4 MiB at most: an eighth of a 32 MiB pool; 2 MiB on ordinary pages), so it goes
 * down in pieces (the body checks that). */
const BLK_SPLIT_BYTES = 6 * MiB;

/** The bytes the image of `d` holds after the blk bodies ran, where they wrote or the host
 * preset: the host compares its own view of the disk with these. */
export function blkImageAfterBodies(d: BlkDiskSpec): Array<{ offset: number; bytes: Buffer; what: string }> {
  const p = blkPlaces(d);
  const zeroed = (z: ZeroedRange): Buffer => {
    const b = pattern(z.seed, z.bytes);
    b.fill(0, z.hole.offset - z.offset, z.hole.offset - z.offset + z.hole.bytes);
    return b;
  };
  return [
    ...p.data.map((s) => ({ offset: s.offset, bytes: pattern(s.seed, s.bytes), what: `${s.bytes} bytes written at ${s.offset}` })),
    { offset: p.fua.offset, bytes: pattern(p.fua.seed, p.fua.bytes), what: 'the write with fua' },
    { offset: d.hostCheck.offset, bytes: pattern(d.hostCheck.seed, d.hostCheck.bytes), what: 'the host-check region' },
    { offset: d.preset.offset, bytes: pattern(d.preset.seed, d.preset.bytes), what: 'the preset region, untouched' },
    { offset: p.writeZeroes.offset, bytes: zeroed(p.writeZeroes), what: 'the range with zeroes written in its middle' },
    ...(d.discard ? [{ offset: p.discard.offset, bytes: zeroed(p.discard), what: 'the range discarded in its middle' }] : []),
  ];
}

/** The controller's one disk; throws when the scan did not make it. */
function blkDevice(ctx: BlkBodyContext): BlockDevice {
  const dev = ctx.controller.devices[0];
  if (!dev) throw new Error(`${ctx.controller.name} has no disk`);
  return dev;
}

async function blkWriteRead(t: Check, dev: BlockDevice, offset: number, data: Buffer, what: string): Promise<void> {
  const lba = offset / dev.blockSize;
  await dev.write(lba, data);
  sameBytes(t, await dev.read(lba, data.length / dev.blockSize), data, `${what}: ${data.length} bytes at ${offset} read back`);
}

/** Writes pattern(seed) over `z`, zeroes its hole with `zero`, and finds zeros in the hole
 * and the pattern around it. */
async function blkZeroHole(t: Check, dev: BlockDevice, z: ZeroedRange, what: string, zero: (lba: number, blocks: number) => Promise<void>): Promise<void> {
  const bs = dev.blockSize;
  const before = pattern(z.seed, z.bytes);
  await blkWriteRead(t, dev, z.offset, before, `before ${what}`);
  await zero(z.hole.offset / bs, z.hole.bytes / bs);
  const back = await dev.read(z.offset / bs, z.bytes / bs);
  const h0 = z.hole.offset - z.offset;
  const h1 = h0 + z.hole.bytes;
  sameBytes(t, back.subarray(0, h0), before.subarray(0, h0), `data before the range of ${what}`);
  sameBytes(t, back.subarray(h0, h1), Buffer.alloc(z.hole.bytes), `the range of ${what} reads zeros`);
  sameBytes(t, back.subarray(h1), before.subarray(h1), `data after the range of ${what}`);
}

/** The scan found one disk, named after the controller, with the geometry and serial number
 * the host gave it; a rescan keeps it. */
const blkIdentity: BlkBody = async (t, ctx) => {
  const c = ctx.controller;
  const d = ctx.disk;
  t.true(d.blocks * d.blockSize >= MIN_LUN_BYTES, `the disk has at least ${MIN_LUN_BYTES} bytes`);
  t.is(c.deviceType, 'blk', 'controller device type');
  t.is(c.info.deviceType, 'blk', 'controller info device type');
  t.deepEqual(
    { blockSize: c.info.blk?.blockSize, capacitySectors: c.info.blk?.capacitySectors, discard: c.info.blk?.discard },
    { blockSize: d.blockSize, capacitySectors: (d.blocks * d.blockSize) / 512, discard: d.discard },
    'configuration space',
  );
  t.deepEqual(c.luns, [], 'a virtio-blk controller has no LUNs');
  t.deepEqual(
    c.devices.map((x) => ({ name: x.info.name, deviceType: x.info.deviceType, target: x.info.target, lun: x.info.lun })),
    [{ name: c.name, deviceType: 'blk', target: 0, lun: 0 }],
    'one disk, named after the controller',
  );
  const dev = blkDevice(ctx);
  t.deepEqual(
    { blockSize: dev.blockSize, blockCount: dev.blockCount, sizeBytes: dev.info.sizeBytes, serial: dev.info.serial, unmap: dev.info.unmap },
    { blockSize: d.blockSize, blockCount: BigInt(d.blocks), sizeBytes: BigInt(d.blocks * d.blockSize), serial: d.serial, unmap: d.discard },
    'geometry, serial number (GET ID) and DISCARD',
  );
  t.log(`${dev.name}: ${dev.blockCount} blocks of ${dev.blockSize} bytes, serial ${JSON.stringify(dev.info.serial)}, ${JSON.stringify(dev.info.limits)}`);
  const again = await c.scan();
  t.deepEqual(again, { luns: [], problems: [] }, 'rescan result');
  t.true(c.devices.length === 1 && c.devices[0] === dev, 'a rescan keeps the same disk');
  t.is(dev.info.serial, d.serial, 'the serial number after a rescan');
};

/** Writes read back: the first and last blocks, many blocks in one DMA buffer, a plain Buffer
 * of an odd number of blocks, and one call larger than a transfer; the host's preset bytes
 * read back unchanged; the host-check region written and flushed for the host to compare. */
const blkData: BlkBody = async (t, ctx) => {
  const dev = blkDevice(ctx);
  const d = ctx.disk;
  const split = blkPlaces(d).data.at(-1)!;
  const perTransfer = dev.info.limits.maxTransferBlocks * dev.blockSize;
  t.true(split.bytes > perTransfer, `the largest call (${split.bytes} bytes) is more than one transfer (${perTransfer} bytes)`);
  for (const s of blkPlaces(d).data) {
    const data = s.dma ? dev.allocBuffer(s.bytes) : Buffer.alloc(s.bytes);
    pattern(s.seed, s.bytes).copy(data);
    await blkWriteRead(t, dev, s.offset, data, s.dma ? 'DMA buffer' : 'plain Buffer');
  }
  // Into a buffer of the caller's, too.
  const last = blkPlaces(d).data[1]!;
  const into = Buffer.alloc(last.bytes, 0xee);
  await dev.read(last.offset / dev.blockSize, into);
  sameBytes(t, into, pattern(last.seed, last.bytes), 'the last blocks read into a plain Buffer');
  sameBytes(t, await dev.read(d.preset.offset / dev.blockSize, d.preset.bytes / dev.blockSize), pattern(d.preset.seed, d.preset.bytes), 'bytes the host put on the disk');
  await dev.write(d.hostCheck.offset / dev.blockSize, pattern(d.hostCheck.seed, d.hostCheck.bytes));
  // On the medium, not in a cache, when the host looks.
  await dev.flush();
  t.is(ctx.controller.failure, null, 'controller still healthy');
};

/** FLUSH, and a write with fua (a write, then a FLUSH: virtio-blk has no forced unit access). */
const blkFlush: BlkBody = async (t, ctx) => {
  const dev = blkDevice(ctx);
  const flushes = dev.iostat.flushOps;
  t.true(ctx.controller.info.blk?.flush === true, 'the device offers FLUSH');
  await dev.flush();
  t.is(dev.iostat.flushOps, flushes + 1, 'the flush is counted');
  const f = blkPlaces(ctx.disk).fua;
  const data = pattern(f.seed, f.bytes);
  await dev.write(f.offset / dev.blockSize, data, { fua: true });
  t.is(dev.iostat.flushOps, flushes + 2, 'a write with fua flushes');
  sameBytes(t, await dev.read(f.offset / dev.blockSize, f.bytes / dev.blockSize), data, 'the write with fua reads back');
};

/** WRITE ZEROES over the middle of written data: zeros there, the data around it kept. */
const blkWriteZeroes: BlkBody = async (t, ctx) => {
  const dev = blkDevice(ctx);
  t.true(ctx.controller.info.blk?.writeZeroes === true, 'the device offers WRITE ZEROES');
  await blkZeroHole(t, dev, blkPlaces(ctx.disk).writeZeroes, 'WRITE ZEROES', (lba, blocks) => dev.writeZeroes(lba, blocks));
};

/** DISCARD over the middle of written data where the device offers it (zeros there, the data
 * around it kept); NotSupportedError where it does not. */
const blkDiscard: BlkBody = async (t, ctx) => {
  const dev = blkDevice(ctx);
  const z = blkPlaces(ctx.disk).discard;
  t.is(dev.info.unmap, ctx.disk.discard, 'DISCARD offered as the host set up');
  if (!ctx.disk.discard) {
    await refuses(t, 'DISCARD', () => dev.unmap({ lba: z.hole.offset / dev.blockSize, blocks: 1 }), /does not support DISCARD/, NotSupportedError);
    return;
  }
  await blkZeroHole(t, dev, z, 'DISCARD', (lba, blocks) => dev.unmap({ lba, blocks }));
};

/** What the facade must refuse: ranges past the end (RangeError, before anything reaches the
 * device) and SCSI-only calls (NotSupportedError); the disk works on afterwards. */
const blkErrors: BlkBody = async (t, ctx) => {
  const dev = blkDevice(ctx);
  const n = ctx.disk.blocks;
  const one = Buffer.alloc(dev.blockSize);
  const past = /exceeds the capacity/;
  await refuses(t, 'READ of the block after the last', () => dev.read(n, 1), past, RangeError);
  await refuses(t, 'READ across the end', () => dev.read(BigInt(n - 1), 2), past, RangeError);
  await refuses(t, 'WRITE of the block after the last', () => dev.write(n, one), past, RangeError);
  await refuses(t, 'WRITE ZEROES across the end', () => dev.writeZeroes(n - 1, 2), past, RangeError);
  await refuses(t, 'DISCARD of the block after the last', () => dev.unmap({ lba: n, blocks: 1 }), past, RangeError);
  await refuses(t, 'passthrough', () => dev.passthrough(testUnitReady()), /passthrough is for SCSI devices; .* is a virtio-blk disk/, NotSupportedError);
  await refuses(t, 'LOGICAL UNIT RESET', () => dev.reset(), /reset is for SCSI devices; .* is a virtio-blk disk/, NotSupportedError);
  const last = blkPlaces(ctx.disk).data[1]!;
  sameBytes(t, await dev.read(n - 1, 1), pattern(last.seed, last.bytes).subarray(-dev.blockSize), 'the last block still reads');
  t.is(ctx.controller.failure, null, 'refused calls leave the controller healthy');
};

/** Every virtio-blk body, by name, in the order they run (blk-errors reads what blk-data wrote). */
export const BLK_BODIES: ReadonlyArray<readonly [string, BlkBody]> = [
  ['blk-identity', blkIdentity],
  ['blk-data', blkData],
  ['blk-flush', blkFlush],
  ['blk-write-zeroes', blkWriteZeroes],
  ['blk-discard', blkDiscard],
  ['blk-errors', blkErrors],
];
