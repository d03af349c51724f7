// The README's example as a program: connect, scan, write, read back, close. It starts the
// bundled target itself so that it runs anywhere: `node --import tsx examples/quickstart.ts`
// (after `npm run build`). Pass a socket path to use a target of your own instead.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { startTarget, type TargetProcess } from '../ts/bundled-target.js';
import { Controller } from '../ts/index.js';

let socket = process.argv[2];
let target: TargetProcess | undefined;
const dir = await mkdtemp(join(tmpdir(), 'virtio-initiator-quickstart-'));
if (socket === undefined) {
  socket = join(dir, 'vhost-scsi.sock');
  target = await startTarget({ socket, luns: ['0:0:ram:64M:512', '0:1:ram:64M:4096'] });
}

try {
  await using ctrl = await Controller.connect(socket);
  await ctrl.scan();
  for (const d of ctrl.devices) {
    console.log(d.info.name, d.info.vendor, d.info.product, d.blockSize, d.blockCount);
  }

  const disk = ctrl.devices[0]!;
  const data = disk.allocBuffer(8 * disk.blockSize); // DMA memory: I/O on it copies nothing
  data.fill(0xa5);
  await disk.write(0, data);
  const back = await disk.read(0, 8);
  console.log(back.equals(data) ? 'verified' : 'MISMATCH');
} finally {
  await target?.stop();
  await rm(dir, { recursive: true, force: true });
}
