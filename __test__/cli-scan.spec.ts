// `virtio-initiator scan`: the LUNs of the bundled target as a table and as JSON, with the time
// attaching and scanning took; its virtio-blk disk (--type blk); a socket opened as the wrong
// type; and one-line usage errors with exit status 2.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import test from 'ava';

import type { ScanReport } from '../ts/cli/scan.js';
import { cli } from './helpers/cli.js';
import { testWhen } from './helpers/env.js';
import { initiatorRequirements, startTestTarget } from './helpers/initiator.js';

const LUNS = ['0:0:ram:64M:512', '0:1:null:1G:4096', '2:0:ram:16M:4096', '2:3:null:2G:512'];

testWhen(test, 'scan --json lists every LUN as the target has it, with attach and scan times', initiatorRequirements, async (t) => {
  const s = await startTestTarget({ luns: LUNS });
  t.teardown(() => s.cleanup());
  const r = await cli(['scan', '--socket', s.socket, '--name', 'Scan0', '--json']);
  t.is(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout.trim().split('\n').pop()!) as ScanReport;
  t.true(report.attachMs > 0 && report.scanMs > 0, `attach ${report.attachMs} ms, scan ${report.scanMs} ms`);
  t.is(report.controllers.length, 1);
  const j = report.controllers[0]!;
  t.is(j.controller, 'Scan0');
  t.true(j.scanMs > 0);
  t.deepEqual(j.problems, []);
  const listed = await (await s.target.control()).list();
  t.deepEqual(
    j.luns.map((l) => [l.name, l.target, l.lun, l.blockSize, l.blocks]),
    listed.map((l) => [
      l.lun === 0 ? `Scan0t${l.target}` : `Scan0t${l.target}l${l.lun}`,
      l.target,
      l.lun,
      l.block_size,
      String(l.blocks),
    ]),
  );
  for (const l of j.luns) {
    t.is(l.vendor, 'VIRTINIT');
    t.true(l.unmap);
    t.is(l.writeCache, true);
    t.regex(l.serial ?? '', /^[0-9A-F]{18}$/);
    t.is(BigInt(l.bytes!), BigInt(l.blocks!) * BigInt(l.blockSize!));
  }
});

testWhen(test, 'scan prints a table naming every LUN', initiatorRequirements, async (t) => {
  const s = await startTestTarget({ luns: LUNS });
  t.teardown(() => s.cleanup());
  const r = await cli(['scan', '--socket', s.socket]);
  t.is(r.code, 0, r.stderr);
  t.regex(r.stdout, /^attached in [0-9.]+ ms, scanned in [0-9.]+ ms$/m);
  t.regex(r.stdout, /^VirtioScsi0 over vhost-user .*: 4 LUN\(s\), scanned in [0-9.]+ ms$/m);
  for (const name of ['VirtioScsi0t0 ', 'VirtioScsi0t0l1 ', 'VirtioScsi0t2 ', 'VirtioScsi0t2l3 ']) t.true(r.stdout.includes(name), name);
  t.regex(r.stdout, /NULL DISK\s+512\s+4194304\s+2G/);
});

testWhen(test, 'scan --trace logs every command with its CDB, status and latency; nothing without it', initiatorRequirements, async (t) => {
  const s = await startTestTarget({ luns: ['0:0:ram:16M:512'] });
  t.teardown(() => s.cleanup());
  const traced = await cli(['scan', '--socket', s.socket, '--trace']);
  t.is(traced.code, 0, traced.stderr);
  const lines = traced.stderr.split('\n').filter((l) => / virtio-initiator trace command: /.test(l));
  t.true(lines.some((l) => /VirtioScsi0 0:0 REPORT LUNS \[a0[0-9a-f]+\]: response 0 status 0 data 16 residual \d+ in \d+ us$/.test(l)), lines.join('\n'));
  t.true(lines.some((l) => /VirtioScsi0 0:0 READ CAPACITY\(16\) \[9e[0-9a-f]+\]: response 0 status 0 data 32 /.test(l)), lines.join('\n'));
  t.true(lines.length >= 8, `${lines.length} commands traced`);
  const quiet = await cli(['scan', '--socket', s.socket]);
  t.is(quiet.code, 0);
  t.is(quiet.stderr, '', 'no diagnostics at the default level');
});

testWhen(test, 'scan --config attaches every controller an SPDK INI names, with its names', initiatorRequirements, async (t) => {
  const a = await startTestTarget({ luns: ['0:0:ram:16M:512'] });
  t.teardown(() => a.cleanup());
  const b = await startTestTarget({ luns: ['1:2:null:1G:4096'] });
  t.teardown(() => b.cleanup());
  const dir = mkdtempSync(join(tmpdir(), 'scan-config-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const ini = join(dir, 'virtio.conf');
  writeFileSync(ini, `[Global]\n  ReactorMask 0x1\n\n[VirtioUser0]\n  Path ${a.socket}\n  Name Alpha\n\n[Virtio]\n  Dev User ${b.socket}\n`);
  const r = await cli(['scan', '--config', ini, '--json']);
  t.is(r.code, 0, r.stderr);
  t.regex(r.stderr, /Global/, 'the section that is not about virtio is named in a warning');
  const report = JSON.parse(r.stdout.trim().split('\n').pop()!) as ScanReport;
  t.deepEqual(
    report.controllers.map((c) => [c.controller, c.luns.map((l) => [l.name, l.blockSize])]),
    [
      ['Alpha', [['Alphat0', 512]]],
      ['VirtioScsi0', [['VirtioScsi0t1l2', 4096]]],
    ],
  );
});

testWhen(test, 'scan --type blk --json: the one disk named after the controller, with its size and serial number', initiatorRequirements, async (t) => {
  const s = await startTestTarget({ type: 'blk', luns: ['0:0:ram:64M:4096'] });
  t.teardown(() => s.cleanup());
  const r = await cli(['scan', '--socket', s.socket, '--type', 'blk', '--name', 'Blk3', '--json']);
  t.is(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout.trim().split('\n').pop()!) as ScanReport;
  t.is(report.controllers.length, 1);
  const c = report.controllers[0]!;
  t.like(c, { controller: 'Blk3', deviceType: 'blk', transport: `vhost-user ${s.socket}`, problems: [] });
  t.deepEqual(c.luns, [
    {
      name: 'Blk3',
      target: 0,
      lun: 0,
      type: 'virtio-blk disk',
      vendor: '',
      product: 'virtio-blk',
      revision: '',
      serial: 'VIRTINIT-ram',
      blockSize: 4096,
      blocks: '16384',
      bytes: String(64 << 20),
      unmap: true,
      writeCache: true,
      ready: true,
      problem: null,
    },
  ]);
});

testWhen(test, 'scan --type blk prints the disk as a table (default name VirtioBlk0); --trace shows its GET ID', initiatorRequirements, async (t) => {
  const s = await startTestTarget({ type: 'blk', luns: ['0:0:ram:16M:512'] });
  t.teardown(() => s.cleanup());
  const r = await cli(['scan', '--socket', s.socket, '--type', 'blk', '--trace']);
  t.is(r.code, 0, r.stderr);
  t.regex(r.stdout, /^VirtioBlk0 over vhost-user .*: virtio-blk, 1 disk, scanned in [0-9.]+ ms$/m);
  t.regex(r.stdout, /^VirtioBlk0\s+0\s+0\s+virtio-blk disk\s+-\s+virtio-blk\s+512\s+32768\s+16M\s+VIRTINIT-ram\s+yes$/m);
  t.regex(r.stderr, /VirtioBlk0 0:0 GET ID: response 0 status 0 data \d+/);
});

testWhen(test, 'scan --config lists a virtio-scsi and a virtio-blk controller of our JSON', initiatorRequirements, async (t) => {
  const scsi = await startTestTarget({ luns: ['0:0:ram:16M:512'] });
  t.teardown(() => scsi.cleanup());
  const blk = await startTestTarget({ type: 'blk', luns: ['0:0:ram:8M:4096'] });
  t.teardown(() => blk.cleanup());
  const dir = mkdtempSync(join(tmpdir(), 'scan-config-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const file = join(dir, 'virtio.json');
  writeFileSync(file, JSON.stringify({ controllers: [{ name: 'S', socket: scsi.socket }, { name: 'Disk', socket: blk.socket, type: 'blk' }] }));
  const r = await cli(['scan', '--config', file, '--json']);
  t.is(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout.trim().split('\n').pop()!) as ScanReport;
  t.deepEqual(
    report.controllers.map((c) => [c.controller, c.deviceType, c.luns.map((l) => [l.name, l.blockSize, l.blocks, l.serial])]),
    [
      ['S', 'scsi', [['St0', 512, '32768', report.controllers[0]!.luns[0]!.serial]]],
      ['Disk', 'blk', [['Disk', 4096, '2048', 'VIRTINIT-ram']]],
    ],
  );
});

testWhen(test, 'scan of a socket of the other type fails (exit 1) naming the --type to give', initiatorRequirements, async (t) => {
  const scsi = await startTestTarget({ luns: ['0:0:ram:16M:512'] });
  t.teardown(() => scsi.cleanup());
  const blk = await startTestTarget({ type: 'blk', luns: ['0:0:ram:8M:512'] });
  t.teardown(() => blk.cleanup());
  const [asScsi, asBlk] = await Promise.all([
    cli(['scan', '--socket', blk.socket]),
    cli(['scan', '--socket', scsi.socket, '--type', 'blk']),
  ]);
  t.is(asScsi.code, 1, asScsi.stderr);
  t.is(asScsi.stderr.trim().split('\n').length, 1, asScsi.stderr);
  t.regex(asScsi.stderr, /^virtio-initiator scan: cannot open vhost-user socket .*virtio-scsi.* \(opened as virtio-scsi; if the target is a virtio-blk one, give --type blk\)$/m);
  // A virtio-scsi target does not answer a virtio-blk configuration read (the reply deadline).
  t.is(asBlk.code, 1, asBlk.stderr);
  t.is(asBlk.stderr.trim().split('\n').length, 1, asBlk.stderr);
  t.regex(asBlk.stderr, /^virtio-initiator scan: cannot open vhost-user socket .*virtio-blk.* \(opened as virtio-blk; if the target is a virtio-scsi one, give --type scsi\)$/m);
  t.is(asScsi.stdout + asBlk.stdout, '');
});

for (const [args, message] of [
  [[], /give the device: --socket PATH, --pci BDF or --config FILE/],
  [['--socket', 'a', '--pci', '00:03.0'], /--socket, --pci and --config exclude each other/],
  [['--config', 'c.ini', '--name', 'X'], /--name comes from the configuration with --config/],
  [['--pci', 'nope'], /--pci "nope": expected a PCI address/],
  [['--config', 'c.ini', '--type', 'blk'], /--type comes from the configuration with --config/],
  [['--socket', 'a', '--type', 'nvme'], /--type "nvme": expected scsi or blk/],
  [['--socket', 'a', '--frobnicate'], /--frobnicate/],
  [['--socket', 'a', '--log-level', 'loud'], /--log-level "loud": expected one of off, error, warn, info, debug, trace/],
] as const) {
  test(`scan ${args.join(' ') || '(no device)'} is exit 2 with one line`, async (t) => {
    const r = await cli(['scan', ...args]);
    t.is(r.code, 2);
    t.is(r.stderr.trim().split('\n').length, 1, r.stderr);
    t.regex(r.stderr, message);
  });
}

test('scan of a socket that does not exist is exit 1 naming it', async (t) => {
  const r = await cli(['scan', '--socket', '/nonexistent/vhost.sock']);
  t.is(r.code, 1);
  t.regex(r.stderr, /\/nonexistent\/vhost\.sock: no such file or directory/);
});
