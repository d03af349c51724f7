// The request queue against a scripted channel: batching, the JS FIFO behind a full ring,
// polling that stops when idle, abort, close and controller failure. The same queue runs over
// the real addon in initiator-io.spec.ts.
import test from 'ava';
import { setImmediate as tick, setTimeout as sleep } from 'node:timers/promises';

import { ClosedError, ControllerFailedError } from '../ts/errors.js';
import { type CommandResult, Rejected, RequestQueue, RequestRefusedError, type ScsiCommand } from '../ts/queue.js';
import { RESPONSE_REFUSED } from '../ts/records.js';
import { readCapacity10, testUnitReady } from '../ts/scsi/index.js';
import { FakeChannel } from './helpers/fake-channel.js';

const tur = (extra: Partial<ScsiCommand> = {}): ScsiCommand => ({ target: 0, lun: 0, cdb: testUnitReady(), ...extra });

/** The rejection reason of `p` (AbortSignal reasons are DOMExceptions, which ava's throwsAsync refuses). */
async function reason(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => {
      throw new Error('expected a rejection');
    },
    (e: unknown) => e,
  );
}

/** Lets the poller run until `cond` holds (or fails the test after many turns). */
async function until(cond: () => boolean, turns = 1000): Promise<void> {
  for (let i = 0; i < turns && !cond(); i++) await tick();
  if (!cond()) throw new Error('condition not reached');
}

test('requests of one tick go down in one submit call, with their fields encoded', async (t) => {
  const ch = new FakeChannel(64);
  const q = new RequestQueue(ch, { label: 'Q' });
  const inBuf = Buffer.alloc(8);
  const outBuf = Buffer.from('abcdefgh');
  const p = [
    q.execute({ target: 3, lun: 0x1234, cdb: readCapacity10(), dataIn: inBuf, taskAttribute: 1 }),
    q.execute({ target: 1, lun: 2, cdb: new Uint8Array(32).fill(0xaa), dataOut: outBuf }),
    q.execute(tur()),
  ];
  t.is(ch.submitCalls.length, 0, 'nothing submitted synchronously');
  await Promise.resolve();
  t.is(ch.submitCalls.length, 1);
  const [a, b, c] = ch.submitCalls[0]!;
  t.like(a, { target: 3, lun: 0x1234, direction: 1, taskAttribute: 1 });
  t.deepEqual(a!.cdb, Buffer.from(readCapacity10()));
  t.is(a!.buffer, inBuf);
  t.like(b, { target: 1, lun: 2, direction: 2 });
  t.is(b!.cdb.length, 32);
  t.is(b!.buffer, outBuf);
  t.not(a!.bufferIndex, b!.bufferIndex);
  t.like(c, { direction: 0, buffer: null });
  t.is(new Set([a!.token, b!.token, c!.token]).size, 3, 'distinct tokens');

  const sense = Buffer.from('700006000000000a00000000290000000000', 'hex');
  ch.complete(c!.token, { status: 2, sense });
  ch.complete(a!.token, { residual: 0, dataLength: 8, latencyNs: 2 ** 33 + 5 });
  ch.complete(b!.token, { response: 3 });
  const [ra, rb, rc] = await Promise.all(p);
  t.deepEqual(ra, { response: 0, status: 0, residual: 0, dataLength: 8, latencyNs: 2 ** 33 + 5 });
  t.like(rb, { response: 3 });
  t.is(rc!.status, 2);
  t.deepEqual(Buffer.from(rc!.sense!), sense);
});

test('a long burst starts down in groups of 16 while it is being written', async (t) => {
  const ch = new FakeChannel(64);
  const q = new RequestQueue(ch, { label: 'Q' });
  const p = Array.from({ length: 40 }, (_, i) => q.execute(tur({ lun: i })));
  t.deepEqual(
    ch.submitCalls.map((c) => c.length),
    [16, 16],
    'two groups of 16 went down synchronously, within the burst',
  );
  await Promise.resolve();
  t.deepEqual(ch.submitCalls.map((c) => c.length), [16, 16, 8], 'the rest at the end of the tick');
  t.deepEqual(ch.submitCalls.flat().map((r) => r.lun), Array.from({ length: 40 }, (_, i) => i), 'in order');
  ch.auto = () => ({});
  t.true((await Promise.all(p)).every((r) => r.status === 0));
});

test('a full ring parks requests in the FIFO and submits them as slots free, in order', async (t) => {
  const ch = new FakeChannel(4);
  const q = new RequestQueue(ch);
  const order: number[] = [];
  ch.auto = () => ({});
  const all = Array.from({ length: 50 }, (_, i) =>
    q.execute(tur({ lun: i })).then((r) => {
      order.push(i);
      return r;
    }),
  );
  const results = await Promise.all(all);
  t.true(results.every((r) => r.response === 0 && r.status === 0));
  t.deepEqual(order, [...Array(50).keys()], 'completed in submission order');
  const submitted = ch.submitCalls.flat().map((r) => r.lun);
  t.deepEqual(submitted, [...Array(50).keys()], 'submitted in FIFO order, each once');
  t.true(ch.submitCalls.every((c) => c.length <= 4));
  t.like(q.stats, { queued: 0, inFlight: 0, submitted: 50, completed: 50 });
});

test('a ring that accepts fewer records than offered keeps the rest queued', async (t) => {
  const ch = new FakeChannel(16);
  ch.acceptLimit = 3;
  ch.auto = () => ({});
  const q = new RequestQueue(ch);
  const results = await Promise.all(Array.from({ length: 20 }, (_, i) => q.execute(tur({ lun: i }))));
  t.is(results.length, 20);
  t.deepEqual(
    ch.submitCalls.flat().map((r) => r.lun),
    [...Array(20).keys()],
  );
  t.true(ch.submitCalls.length >= 7);
});

test('the poller stops when nothing is in flight', async (t) => {
  const ch = new FakeChannel(8);
  const q = new RequestQueue(ch);
  const p = q.execute(tur());
  await until(() => ch.onDevice.size === 1);
  await until(() => ch.reapCalls > 5);
  ch.complete([...ch.onDevice.keys()][0]!);
  await p;
  const reaps = ch.reapCalls;
  await sleep(30);
  t.is(ch.reapCalls, reaps, 'no reap once idle');
});

test('abort: a queued request is dropped, an in-flight one rejects and its completion is ignored', async (t) => {
  const ch = new FakeChannel(1);
  const q = new RequestQueue(ch);
  const first = new AbortController();
  const second = new AbortController();
  const buf = Buffer.alloc(16);
  const p1 = q.execute(tur({ signal: first.signal, dataIn: buf }));
  const p2 = q.execute(tur({ signal: second.signal, lun: 7 }));
  const p3 = q.execute(tur({ lun: 9 }));
  await until(() => ch.onDevice.size === 1);
  const onDevice = [...ch.onDevice.values()][0]!;
  t.is(onDevice.buffer, buf);

  second.abort(new Error('stop 2'));
  await t.throwsAsync(p2, { message: 'stop 2' });
  first.abort();
  t.is((await reason(p1) as DOMException).name, 'AbortError');
  t.is(q.stats.inFlight, 1, 'the aborted request stays tracked until the device answers');

  ch.complete(onDevice.token, { status: 0 });
  // The slot freed by the dropped completion goes to the next queued request.
  await until(() => [...ch.onDevice.values()].some((r) => r.lun === 9));
  ch.complete([...ch.onDevice.keys()][0]!, { status: 0 });
  const r3 = await p3;
  t.is(r3.status, 0);
  t.false(
    ch.submitCalls.flat().some((r) => r.lun === 7),
    'the request aborted in the FIFO never reached the device',
  );
  t.is((await reason(q.execute(tur({ signal: AbortSignal.abort() }))) as DOMException).name, 'AbortError');
});

test.serial('requests nobody waits for are polled slowly, without holding the process', async (t) => {
  const ch = new FakeChannel(4);
  const q = new RequestQueue(ch);
  const ac = new AbortController();
  const p = q.execute(tur({ signal: ac.signal }));
  const active = (): string[] => (process as unknown as { getActiveResourcesInfo(): string[] }).getActiveResourcesInfo();
  await until(() => ch.onDevice.size === 1);
  t.true(active().includes('Immediate'), 'the poller holds the loop while someone waits');
  ac.abort();
  await reason(p);
  await tick();
  // Only the abandoned request is in flight: polled from an unref'd slow timer.
  t.false(active().includes('Immediate'));
  t.false(active().includes('Timeout'));
  const reaps = ch.reapCalls;
  await sleep(200);
  // About 20 at a 10 ms period (fewer on a loaded machine); a fast poll would be thousands.
  const slow = ch.reapCalls - reaps;
  t.true(slow >= 1 && slow <= 40, `${slow} polls in 200 ms`);
  // A new request switches back to fast polling, and the late completion is dropped.
  const abandoned = [...ch.onDevice.keys()][0]!;
  const next = q.execute(tur({ lun: 5 }));
  await until(() => ch.onDevice.size === 2);
  t.true(active().includes('Immediate'));
  ch.complete(abandoned);
  ch.complete([...ch.onDevice.keys()].find((k) => k !== abandoned)!, { status: 0 });
  t.is((await next).status, 0);
  t.like(q.stats, { inFlight: 0, completed: 2 });
  q.close();
});

test('close rejects queued and in-flight requests and closes the channel', async (t) => {
  const ch = new FakeChannel(2);
  const q = new RequestQueue(ch, { label: 'C0' });
  const ps = Array.from({ length: 5 }, () => q.execute(tur()));
  await until(() => ch.onDevice.size === 2);
  q.close();
  for (const p of ps) await t.throwsAsync(p, { instanceOf: ClosedError, message: /C0: request queue closed/ });
  t.true(ch.closed);
  await t.throwsAsync(q.execute(tur()), { instanceOf: ClosedError });
});

test('a failing reap rejects everything at once with the reason', async (t) => {
  const ch = new FakeChannel(2);
  const q = new RequestQueue(ch, { label: 'VirtioScsi9' });
  const ps = Array.from({ length: 6 }, () => q.execute(tur()));
  await until(() => ch.onDevice.size === 2);
  ch.failure = new Error('vhost-user socket closed by the target');
  const errors = await Promise.all(ps.map((p) => p.then(() => undefined, (e: unknown) => e)));
  for (const e of errors) {
    t.true(e instanceof ControllerFailedError);
    t.is((e as Error).message, 'controller VirtioScsi9 failed: vhost-user socket closed by the target');
  }
  await t.throwsAsync(q.execute(tur()), { instanceOf: ControllerFailedError });
});

test('a failing submit rejects the batch', async (t) => {
  const ch = new FakeChannel(8);
  ch.failure = new Error('device needs reset');
  const q = new RequestQueue(ch);
  await t.throwsAsync(q.execute(tur()), { instanceOf: ControllerFailedError, message: /device needs reset/ });
});

test('bad commands are refused before they are queued', async (t) => {
  const q = new RequestQueue(new FakeChannel(4), { label: 'V' });
  await t.throwsAsync(q.execute({ target: 0, lun: 0, cdb: new Uint8Array(5) }), {
    instanceOf: TypeError,
    message: 'V: cdb length 5 out of range 6..32',
  });
  await t.throwsAsync(q.execute({ target: 0, lun: 0, cdb: new Uint8Array(33) }), { message: /cdb length 33/ });
  await t.throwsAsync(q.execute({ target: 256, lun: 0, cdb: testUnitReady() }), { message: /target 256/ });
  await t.throwsAsync(q.execute({ target: 0, lun: 16384, cdb: testUnitReady() }), { message: /lun 16384/ });
  await t.throwsAsync(
    q.execute({ target: 0, lun: 0, cdb: testUnitReady(), dataIn: Buffer.alloc(1), dataOut: Buffer.alloc(1) }),
    { message: /not both/ },
  );
});

test('a request the native side refuses fails alone while the controller works', async (t) => {
  const ch = new FakeChannel(8);
  const refusal = 'no DMA memory for a 999-byte bounce buffer: pool exhausted';
  ch.auto = (r) => (r.lun === 1 ? { response: RESPONSE_REFUSED, sense: Buffer.from(refusal) } : {});
  const q = new RequestQueue(ch, { label: 'R0' });
  const ps = [q.execute(tur({ lun: 1 })), q.execute(tur({ lun: 2 })), q.execute(tur({ lun: 3 }))];
  await t.throwsAsync(ps[0]!, { instanceOf: RequestRefusedError, message: `R0: request refused: ${refusal}` });
  t.is((await ps[1]!).status, 0);
  t.is((await ps[2]!).status, 0);
  t.false(q.closed);

  // A native call that throws means the controller is gone: everything fails.
  ch.failure = new Error('device gone');
  await t.throwsAsync(q.execute(tur()), { instanceOf: ControllerFailedError, message: /device gone/ });
  t.true(q.closed);
});

test('sense data of a completion stays its own when later completions reuse the sense slot', async (t) => {
  const ch = new FakeChannel(4);
  const q = new RequestQueue(ch);
  const first = q.execute(tur({ lun: 1 }));
  await until(() => ch.onDevice.size === 1);
  const ua = Buffer.from('700006000000000a00000000290000000000', 'hex');
  ch.complete([...ch.onDevice.keys()][0]!, { status: 2, sense: ua });
  const r1 = await first;
  // The next completion lands in the same record and sense slot.
  const second = q.execute(tur({ lun: 2 }));
  await until(() => ch.onDevice.size === 1);
  const illegal = Buffer.from('700005000000000a00000000240000000000', 'hex');
  ch.complete([...ch.onDevice.keys()][0]!, { status: 2, sense: illegal });
  const r2 = await second;
  t.deepEqual(Buffer.from(r1.sense!), ua);
  t.deepEqual(Buffer.from(r2.sense!), illegal);
});

test('executeAll: beyond the ring, in order, each command with its own completion or refusal', async (t) => {
  const ch = new FakeChannel(4);
  const q = new RequestQueue(ch, { label: 'B' });
  // Sense differs per LUN, so every result can be told from the others.
  ch.auto = (r) => (r.lun % 3 === 0 ? { status: 2, sense: Uint8Array.from([0x70, 0, 6, 0, 0, 0, 0, 10, 0, 0, 0, 0, r.lun, 0]) } : { dataLength: r.lun });
  const cmds: ScsiCommand[] = Array.from({ length: 30 }, (_, i) => tur({ lun: i }));
  cmds[7] = { target: 0, lun: 7, cdb: new Uint8Array(5) };
  const out = await q.executeAll(cmds);
  t.is(out.length, 30);
  for (let i = 0; i < 30; i++) {
    const r = out[i]!;
    if (i === 7) {
      t.true(r instanceof Rejected);
      t.regex(((r as Rejected).reason as Error).message, /B: cdb length 5/);
    } else if (i % 3 === 0) {
      t.is((r as CommandResult).status, 2);
      t.is((r as CommandResult).sense![12], i, `sense of LUN ${i}`);
    } else {
      t.is((r as CommandResult).dataLength, i);
    }
  }
  t.deepEqual(
    ch.submitCalls.flat().map((r) => r.lun),
    [...Array(30).keys()].filter((i) => i !== 7),
    'submitted in order, the refused one never',
  );
  t.true(ch.submitCalls.every((c) => c.length <= 4));
  t.like(q.stats, { queued: 0, inFlight: 0, completed: 29 });
  t.deepEqual(await q.executeAll([]), []);
});

test('executeAll: an abort settles commands not yet admitted at once; close settles the rest', async (t) => {
  const ch = new FakeChannel(2);
  const q = new RequestQueue(ch);
  const ac = new AbortController();
  const cmds = Array.from({ length: 6 }, (_, i) => tur({ lun: i, signal: i % 2 === 1 ? ac.signal : undefined }));
  const batch = q.executeAll(cmds);
  await until(() => ch.onDevice.size === 2);
  t.is(q.stats.queued, 4);
  ac.abort(new Error('enough'));
  // LUN 1 is on the device (abandoned until it comes back), 3 and 5 were waiting.
  ch.complete([...ch.onDevice.values()].find((r) => r.lun === 0)!.token);
  ch.complete([...ch.onDevice.values()].find((r) => r.lun === 1)!.token);
  await until(() => [...ch.onDevice.values()].some((r) => r.lun === 2));
  q.close();
  const out = await batch;
  t.is((out[0] as CommandResult).status, 0);
  for (const i of [1, 3, 5]) t.is(((out[i] as Rejected).reason as Error).message, 'enough', `LUN ${i}`);
  for (const i of [2, 4]) t.true((out[i] as Rejected).reason instanceof ClosedError, `LUN ${i}`);
  t.false(
    ch.submitCalls.flat().some((r) => r.lun === 3 || r.lun === 5),
    'aborted commands that waited never reached the device',
  );
  t.true((await q.executeAll([tur()]))[0] instanceof Rejected);
});
