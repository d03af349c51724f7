// Memory the device may still write is never handed out again: a request queue given back with a
// request on it is stopped first (vhost-user GET_VRING_BASE, which the target answers only once
// that request is finished), and only then are its rings, headers and bounce buffers freed. The
// bundled target's `late` fault writes a request's data, response and used entry only after a
// delay: without the stop, they would land in memory allocated after the close.
import { setTimeout as sleep } from 'node:timers/promises';

import test from 'ava';

import type { Controller } from '../ts/index.js';
import { CompletionReader, RecordWriter } from '../ts/records.js';
import { testWhen, unmet } from './helpers/env.js';
import { connectAndScan, initiatorRequirements, pattern, startTestTarget, type TargetSetup } from './helpers/initiator.js';

const LATE_MS = 400;
const MiB = 1 << 20;

let setup: TargetSetup | undefined;
let ctrl: Controller | undefined;

test.before(async () => {
  if (unmet(initiatorRequirements).length > 0) return;
  setup = await startTestTarget({ luns: ['0:0:ram:8M:512'] });
  // A small pool that never grows: the allocations below must reuse what the queue gave back.
  ctrl = await connectAndScan(setup, { memoryBytes: 4 * MiB, maxMemoryBytes: 4 * MiB, hugepages: 'never' });
});

test.after.always(async () => {
  ctrl?.close();
  await setup?.cleanup();
});

testWhen(test.serial, 'a queue closed with a late request on it is stopped before its memory is reused', initiatorRequirements, async (t) => {
  const c = ctrl!;
  const dev = c.device('VirtioScsi0t0');
  const data = pattern(4096, 7);
  await dev.write(0, data);

  const control = await setup!.target.control();
  await control.inject(0, 0, 'late', 1, { ms: LATE_MS });

  // A READ into a plain Buffer (bounced through DMA memory) on a channel of its own.
  const { channel } = c.rawChannel();
  const writer = new RecordWriter(channel.submissionArea());
  const dest = Buffer.alloc(4096);
  writer.readWrite(0, 1, 0, 0, false, 0, 8, false, -1, dest.length, 0);
  t.is(channel.pump(1, [dest]) >>> 16, 1, 'the request went down');
  t.is(channel.inFlight, 1);
  // Time for the target to take the request (and hold it back).
  await sleep(50);
  // Stopping the queue makes the target finish what it holds before it answers.
  channel.close();
  // The stopped queue is set up again for the next channel (opened now, while memory is left).
  const again = c.rawChannel();

  // Everything the pool has left, zeroed: rings, headers and the bounce buffer of that queue
  // among it.
  const taken: Buffer[] = [];
  for (;;) {
    try {
      taken.push(c.allocBuffer(64 * 1024).fill(0));
    } catch {
      break;
    }
  }
  t.true(taken.length > 0);
  await sleep(LATE_MS * 2);
  const dirty = taken.findIndex((b) => b.some((x) => x !== 0));
  t.is(dirty, -1, 'no byte of memory allocated after the close was written by the device');

  // The restarted queue serves requests.
  const w2 = new RecordWriter(again.channel.submissionArea());
  const reader = new CompletionReader(again.channel.completionArea(), again.channel.capacity);
  const into = Buffer.alloc(4096);
  w2.readWrite(0, 9, 0, 0, false, 0, 8, false, -1, into.length, 0);
  let done = again.channel.pump(1, [into]) & 0xffff;
  const deadline = Date.now() + 5000;
  while (done === 0 && Date.now() < deadline) {
    await sleep(1);
    done = again.channel.pump(0, null) & 0xffff;
  }
  t.is(done, 1, 'the restarted queue completes a request');
  t.is(reader.token(0), 9);
  t.is(reader.response(0), 0);
  t.is(reader.status(0), 0);
  t.true(into.equals(data), 'and reads what was written');
  again.channel.close();
});
