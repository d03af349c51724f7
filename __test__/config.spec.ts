// Configuration files (design D8): the seeds' SPDK INI snippets as they are, an SPDK-era INI with
// every key, SPDK JSON as save_config writes it, our JSON, broken files and their messages, and
// configurations attached to the bundled target, serving virtio-scsi and virtio-blk.
import test from 'ava';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

import type { Controller } from '../ts/controller.js';
import {
  AttachError,
  attachAll,
  CONFIG_SCHEMA,
  ConfigError,
  type ConfigFormat,
  type ControllerConfig,
  expandPciAll,
  loadConfig,
  parseConfig,
  validateConfig,
} from '../ts/config/index.js';
import { schemaText } from '../ts/config/schema.js';
import type { PciDeviceInfo } from '../ts/pci.js';
import { testWhen } from './helpers/env.js';
import { initiatorRequirements, pattern, startTestTarget } from './helpers/initiator.js';

const fixtures = fileURLToPath(new URL('./fixtures/config/', import.meta.url));
const schemaFile = fileURLToPath(new URL('../ts/config/schema.json', import.meta.url));
const fixture = (name: string) => join(fixtures, name);
const CWD = '/srv/spdk';

const scsi = { deviceType: 'scsi', requestQueues: 1, queueSize: 512 } as const;
const blk = { ...scsi, deviceType: 'blk' } as const;

test('seed: [Virtio] Dev Pci enumerates every PCI function', async (t) => {
  const config = await loadConfig(fixture('seed-virtio-dev-pci.conf'));
  t.is(config.format, 'spdk-ini');
  t.deepEqual(config.controllers, [{ name: 'VirtioScsi', transport: { type: 'pci-all' }, ...scsi }]);
  t.deepEqual(config.warnings, []);
});

test('seed: [Virtio] Dev User /tmp/vhost.0', async (t) => {
  const config = await loadConfig(fixture('seed-virtio-dev-user.conf'));
  t.deepEqual(config.controllers, [{ name: 'VirtioScsi0', transport: { type: 'vhost-user', path: '/tmp/vhost.0' }, ...scsi }]);
});

test('seed: [VirtioPci] Enable Yes enumerates virtio-scsi and virtio-blk functions, as SPDK\'s two modules did', async (t) => {
  const config = await loadConfig(fixture('seed-virtiopci-enable.conf'));
  t.deepEqual(config.controllers, [
    { name: 'VirtioScsi', transport: { type: 'pci-all' }, ...scsi },
    { name: 'VirtioBlk', transport: { type: 'pci-all' }, ...blk },
  ]);
});

test('INI: Dev Pci (virtio-scsi only, as in 2017) and Enable Yes together enumerate each type once', (t) => {
  const config = parseConfig('[Virtio]\n  Dev Pci\n[VirtioPci]\n  Enable Yes\n[VirtioPci]\n  Enable Yes\n', { source: 'e.conf' });
  t.deepEqual(config.controllers, [
    { name: 'VirtioScsi', transport: { type: 'pci-all' }, ...scsi },
    { name: 'VirtioBlk', transport: { type: 'pci-all' }, ...blk },
  ]);
  t.deepEqual(config.warnings, [
    // The repeated section is one section, whose first Enable counts.
    'e.conf:6: Enable is given again in [VirtioPci]; the first one (line 4) is used, as SPDK did',
    'e.conf:4: Enable Yes repeats the virtio-scsi PCI enumeration of line 2; the functions are attached once',
  ]);
  const devPciOnly = parseConfig('[Virtio]\n  Dev Pci\n', { source: 'd.conf' });
  t.deepEqual(devPciOnly.controllers.map((c) => c.deviceType), ['scsi']);
});

test('seed: [VirtioUser0] Path /tmp/vhost.0', async (t) => {
  const config = await loadConfig(fixture('seed-virtiouser0.conf'));
  t.deepEqual(config.controllers, [{ name: 'VirtioScsi0', transport: { type: 'vhost-user', path: '/tmp/vhost.0' }, ...scsi }]);
});

test('SPDK-era INI with every key, other sections, any case, quotes and relative paths', (t) => {
  const text = readFileSync(fixture('spdk-era.conf'), 'utf8');
  const config = parseConfig(text, { source: 'spdk.conf', cwd: CWD });
  t.deepEqual(config.controllers, [
    { name: 'VirtioScsi0', transport: { type: 'vhost-user', path: '/tmp/vhost.0' }, deviceType: 'scsi', requestQueues: 2, queueSize: 512 },
    { name: 'VirtioScsi1', transport: { type: 'vhost-user', path: '/srv/spdk/vhost.1' }, ...scsi },
    { name: 'VirtioBlk2', transport: { type: 'vhost-user', path: '/tmp/vhost.2' }, ...blk },
    { name: 'VirtioScsi', transport: { type: 'pci-all' }, ...scsi },
    { name: 'VirtioBlk', transport: { type: 'pci-all' }, ...blk },
    // Dev User lines take the lowest names the sections left free.
    { name: 'VirtioScsi2', transport: { type: 'vhost-user', path: '/tmp/vhost.3' }, ...scsi },
    { name: 'VirtioScsi3', transport: { type: 'vhost-user', path: '/tmp/vhost 4' }, ...scsi },
  ]);
  t.deepEqual(config.warnings, [
    'spdk.conf:2: section [Global] is not about virtio: skipped',
    'spdk.conf:6: section [Ioat] is not about virtio: skipped',
    'spdk.conf:33: section [Bdev] is not about virtio: skipped',
  ]);
});

test('INI as SPDK read it: repeated sections merge, the first of a repeated key wins, continuations', (t) => {
  const text = [
    '[VirtioUser0]',
    '  Path /tmp/a',
    '[Global]',
    '[VIRTIOUSER0]',
    '  path /tmp/b',
    '  Name \\',
    '    Joined',
    '\t# an indented comment',
    '[VirtioPci]',
    '  Enable No',
    '[Virtio]',
    '  Dev Pci',
    '  Dev User /tmp/c   # trailing comment',
  ].join('\r\n');
  const config = parseConfig(text, { source: 'm.conf', cwd: CWD });
  t.deepEqual(config.controllers, [
    { name: 'Joined', transport: { type: 'vhost-user', path: '/tmp/a' }, ...scsi },
    { name: 'VirtioScsi', transport: { type: 'pci-all' }, ...scsi },
    { name: 'VirtioScsi0', transport: { type: 'vhost-user', path: '/tmp/c' }, ...scsi },
  ]);
  t.deepEqual(config.warnings, [
    'm.conf:5: path is given again in [VirtioUser0]; the first one (line 2) is used, as SPDK did',
    'm.conf:3: section [Global] is not about virtio: skipped',
  ]);
});

test('SPDK JSON as save_config writes it: other subsystems and methods are skipped', async (t) => {
  const config = await loadConfig(fixture('spdk-save-config.json'));
  const source = fixture('spdk-save-config.json');
  t.is(config.format, 'spdk-json');
  t.deepEqual(config.controllers, [
    { name: 'VirtioScsi0', transport: { type: 'vhost-user', path: '/tmp/vhost.0' }, deviceType: 'scsi', requestQueues: 2, queueSize: 256 },
    { name: 'VirtioPci0', transport: { type: 'pci', address: '0000:00:04.0' }, ...scsi },
  ]);
  t.deepEqual(config.warnings, [
    `${source}:3:5: subsystems[0]: subsystem "accel" is not about virtio: skipped`,
    `${source}:10:9: subsystems[1].config[0]: method bdev_set_options is not about virtio: skipped`,
    `${source}:18:9: subsystems[1].config[1]: method bdev_malloc_create is not about virtio: skipped`,
    `${source}:46:9: subsystems[1].config[4]: method bdev_wait_for_examine is not about virtio: skipped`,
    `${source}:51:5: subsystems[2]: subsystem "nbd" is not about virtio: skipped`,
  ]);
});

test('our JSON: defaults, relative sockets, PCI forms and names around the given ones', (t) => {
  const config = parseConfig(readFileSync(fixture('native.json'), 'utf8'), { source: 'n.json', cwd: CWD });
  t.is(config.format, 'native-json');
  t.deepEqual(config.controllers, [
    {
      name: 'Fast0',
      transport: { type: 'vhost-user', path: '/run/vhost-scsi.0' },
      deviceType: 'scsi',
      requestQueues: 4,
      queueSize: 256,
      memoryBytes: 134217728,
      hugepages: 'require',
    },
    { name: 'VirtioScsi0', transport: { type: 'vhost-user', path: '/srv/spdk/vhost.1' }, ...scsi },
    { name: 'VirtioScsi1', transport: { type: 'pci', address: '0000:00:04.0' }, ...scsi },
    { name: 'Guest', transport: { type: 'pci-all' }, ...scsi },
  ]);
  t.deepEqual(config.warnings, []);
});

test('the schema file is the schema constant, and names every key the parser takes', (t) => {
  const expected = schemaText();
  let actual: string | undefined;
  try {
    actual = readFileSync(schemaFile, 'utf8');
  } catch {
    actual = undefined;
  }
  // The file is written from the constant, so that the two cannot drift apart.
  if (actual !== expected) writeFileSync(schemaFile, expected);
  t.is(actual, expected, 'ts/config/schema.json was out of date and has been rewritten: commit it');
  t.deepEqual(JSON.parse(readFileSync(schemaFile, 'utf8')), CONFIG_SCHEMA);
  t.deepEqual(Object.keys(CONFIG_SCHEMA.$defs.controller.properties).sort(), [
    'hugepages',
    'memoryBytes',
    'name',
    'pci',
    'queueSize',
    'requestQueues',
    'socket',
    'type',
  ]);
});

/** A small SPDK JSON config with one call whose params are `params`. */
function spdk(params: Record<string, unknown>): string {
  const call = { method: 'bdev_virtio_attach_controller', params: { name: 'V0', trtype: 'user', traddr: '/a', dev_type: 'scsi', ...params } };
  return JSON.stringify({ subsystems: [{ subsystem: 'bdev', config: [call] }] }, null, 2);
}
const P = 'subsystems[0].config[0].params';

const broken: Array<[title: string, source: string, text: string, message: string]> = [
  ['unknown key', 'b.conf', '[VirtioUser0]\n  Path /tmp/a\n  Socket /tmp/b\n', 'b.conf:3: unknown key "Socket" in [VirtioUser0] (expected Path, Queues, Name, Type)'],
  ['unknown key in [Virtio]', 'b.conf', '[Virtio]\n  Device User /a\n', 'b.conf:2: unknown key "Device" in [Virtio] (expected Dev Pci or Dev User <path>)'],
  ['missing Path', 'b.conf', '# no socket\n[VirtioUser0]\n  Queues 2\n', 'b.conf:2: [VirtioUser0] is missing Path (the vhost-user socket)'],
  ['Dev User without a path', 'b.conf', '[Virtio]\n  Dev User\n', 'b.conf:2: Dev User needs the path of a vhost-user socket'],
  ['unknown Dev type', 'b.conf', '[Virtio]\n  Dev Nvme 0000:00:04.0\n', 'b.conf:2: unknown Dev type "Nvme" (expected Pci or User)'],
  ['Queues zero', 'b.conf', '[VirtioUser0]\n  Path /a\n  Queues 0\n', 'b.conf:3: Queues must be an integer from 1 to 255, got 0'],
  ['Queues not a number', 'b.conf', '[VirtioUser0]\n  Path /a\n  Queues four\n', 'b.conf:3: Queues must be an integer from 1 to 255, got "four"'],
  ['Queues too many', 'b.conf', '[VirtioUser0]\n  Path /a\n  Queues 256\n', 'b.conf:3: Queues must be an integer from 1 to 255, got 256'],
  [
    'duplicate Name',
    'b.conf',
    '[VirtioUser0]\n  Path /a\n[VirtioUser1]\n  Path /b\n  Name VirtioScsi0\n',
    'b.conf:5: duplicate controller name "VirtioScsi0" (already used by [VirtioUser0] at line 1)',
  ],
  ['bad Name', 'b.conf', '[VirtioUser0]\n  Path /a\n  Name "my disk"\n', `b.conf:3: Name "my disk" must be 1 to 64 letters, digits, '_', '.' or '-'`],
  ['bad Type', 'b.conf', '[VirtioUser0]\n  Path /a\n  Type NVMe\n', 'b.conf:3: Type must be SCSI or Blk, got "NVMe"'],
  ['bad Enable', 'b.conf', '[VirtioPci]\n  Enable Maybe\n', 'b.conf:2: Enable must be Yes or No, got "Maybe"'],
  ['content outside a section', 'b.conf', '  Dev User /a\n[Virtio]\n', 'b.conf:1: "Dev User /a" is outside any section (expected a [Virtio], [VirtioPci] or [VirtioUserN] header first)'],
  ['unknown virtio section', 'b.conf', '[VirtioNvme]\n  Path /a\n', 'b.conf:1: unknown section [VirtioNvme] (expected [Virtio], [VirtioPci] or [VirtioUserN])'],
  ['non-numeric VirtioUser suffix', 'b.conf', '[VirtioUserA]\n  Path /a\n', 'b.conf:1: section [VirtioUserA] has a non-numeric suffix (expected [VirtioUser0], [VirtioUser1], ...)'],
  ['broken section header', 'b.conf', '[Virtio\n  Dev Pci\n', 'b.conf:1: broken section header "[Virtio" (expected [Name] alone on its line)'],
  ['empty file', 'e.conf', '', 'e.conf: the file is empty (expected SPDK INI sections, an SPDK JSON config or {"controllers": [...]})'],
  ['only comments', 'e.conf', '\n  # nothing here\n\n', 'e.conf: the file is empty (expected SPDK INI sections, an SPDK JSON config or {"controllers": [...]})'],
  [
    'bad JSON with position',
    'b.json',
    '{\n  "controllers": [\n    { "socket": "/a" }\n    { "socket": "/b" }\n  ]\n}\n',
    `b.json:4:5: invalid JSON: expected ',' or ']' after an array element, found "{"`,
  ],
  ['truncated JSON', 'b.json', '{"controllers": [', 'b.json:1:18: invalid JSON: expected a value, found the end of the file'],
  ['vq_size not a power of two', 'b.json', spdk({ vq_size: 100 }), `b.json:13:24: ${P}.vq_size: vq_size must be a power of two from 1 to 1024, got 100`],
  ['vq_count zero', 'b.json', spdk({ vq_count: 0 }), `b.json:13:25: ${P}.vq_count: vq_count must be an integer from 1 to 255, got 0`],
  ['unknown trtype', 'b.json', spdk({ trtype: 'rdma' }), `b.json:10:23: ${P}.trtype: unknown trtype "rdma" (expected "user" or "pci")`],
  ['unknown dev_type', 'b.json', spdk({ dev_type: 'nvme' }), `b.json:12:25: ${P}.dev_type: unknown dev_type "nvme" (expected "scsi" or "blk")`],
  [
    'bad PCI address (SPDK JSON)',
    'b.json',
    spdk({ trtype: 'pci', traddr: '00:04' }),
    `b.json:11:23: ${P}.traddr: traddr "00:04" is not a PCI address (expected DDDD:BB:DD.F or BB:DD.F, e.g. 0000:00:04.0)`,
  ],
  ['wrong type (SPDK JSON)', 'b.json', spdk({ name: 7 }), `b.json:9:21: ${P}.name: name must be a string, got 7`],
  ['unknown SPDK parameter', 'b.json', spdk({ queues: 2 }), `b.json:13:23: ${P}.queues: unknown parameter "queues" (expected name, trtype, traddr, dev_type, vq_count, vq_size)`],
  ['missing SPDK parameter', 'b.json', '{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_virtio_attach_controller","params":{"name":"V"}}]}]}', `b.json:1:97: ${P}: missing trtype`],
  ['unknown top-level key in our JSON', 'o.json', '{\n  "controllers": [],\n  "devices": []\n}', 'o.json:3:14: devices: unknown key "devices" (expected $schema, controllers)'],
  ['unknown controller key in our JSON', 'o.json', '{"controllers": [{"socket": "/a", "queues": 2}]}', 'o.json:1:45: controllers[0].queues: unknown key "queues" (expected name, socket, pci, type, requestQueues, queueSize, memoryBytes, hugepages)'],
  ['wrong type in our JSON', 'o.json', '{"controllers": [{"socket": "/a", "requestQueues": "2"}]}', 'o.json:1:52: controllers[0].requestQueues: requestQueues must be an integer from 1 to 255, got "2"'],
  ['queueSize not a power of two', 'o.json', '{"controllers": [{"socket": "/a", "queueSize": 1000}]}', 'o.json:1:48: controllers[0].queueSize: queueSize must be a power of two from 1 to 1024, got 1000'],
  ['bad PCI address (our JSON)', 'o.json', '{"controllers": [{"pci": "0000:00:1f.9"}]}', 'o.json:1:26: controllers[0].pci: pci "0000:00:1f.9" is not a PCI address (expected DDDD:BB:DD.F or BB:DD.F, e.g. 0000:00:04.0)'],
  ['socket and pci', 'o.json', '{"controllers": [{"socket": "/a", "pci": "all"}]}', 'o.json:1:18: controllers[0]: give either "socket" or "pci", not both'],
  ['no transport', 'o.json', '{"controllers": [{"name": "A"}]}', 'o.json:1:18: controllers[0]: missing "socket" (a vhost-user socket) or "pci" (a PCI address or "all")'],
  [
    'duplicate name in our JSON',
    'o.json',
    '{"controllers": [{"name": "A", "socket": "/a"}, {"name": "A", "socket": "/b"}]}',
    'o.json:1:58: controllers[1].name: duplicate controller name "A" (already used by o.json:1:27: controllers[0].name)',
  ],
  ['top level not an object', 'o.json', '["controllers"]', 'o.json:1:1: expected an object with "controllers" (or SPDK\'s "subsystems"), got an array'],
];

for (const [title, source, text, message] of broken) {
  test(`broken: ${title}`, (t) => {
    const err = t.throws(() => parseConfig(text, { source, cwd: CWD }), { instanceOf: ConfigError });
    t.is(err?.message, message);
    t.is(err?.source, source);
    // INI errors carry a line; JSON errors a line and the path of the value.
    if (source.endsWith('.conf') && !title.includes('empty') && title !== 'only comments') t.is(typeof err?.line, 'number');
  });
}

test('loadConfig names the file it cannot read', async (t) => {
  const err = await t.throwsAsync(loadConfig('/nonexistent/virtio.conf'), { instanceOf: ConfigError });
  t.regex(err?.message ?? '', /^\/nonexistent\/virtio\.conf: cannot read the file: ENOENT/);
});

test('a configuration built in code is checked like a file', (t) => {
  const good: ControllerConfig = { name: 'A', transport: { type: 'vhost-user', path: '/a' }, ...scsi };
  t.notThrows(() => validateConfig({ controllers: [good] }));
  const err = t.throws(() => validateConfig({ controllers: [good, { ...good, name: 'B', queueSize: 3 }] }), { instanceOf: ConfigError });
  t.is(err?.message, '<config>: controllers[1].queueSize: queueSize must be a power of two from 1 to 1024, got 3');
  t.is(err?.path, 'controllers[1].queueSize');
});

/** A PCI function as listPciDevices describes it: virtio-scsi (1af4:1048) or virtio-blk (1af4:1042). */
const fn = (address: string, deviceType: 'scsi' | 'blk', driver?: string): PciDeviceInfo => ({
  address,
  vendorId: 0x1af4,
  deviceId: deviceType === 'blk' ? 0x1042 : 0x1048,
  deviceType,
  interface: 'modern',
  ...(driver ? { driver } : {}),
});

test('pci-all becomes the functions of its type bound to vfio-pci, named around the configured ones', (t) => {
  const config = parseConfig('[VirtioUser0]\n  Path /a\n[VirtioUser1]\n  Path /b\n  Name VirtioScsi2\n[VirtioPci]\n  Enable Yes\n', { source: 'p.conf' });
  const list = () => [
    fn('0000:00:05.0', 'scsi', 'vfio-pci'),
    fn('0000:00:04.0', 'scsi', 'vfio-pci'),
    fn('0000:00:06.0', 'scsi', 'virtio-pci'),
    fn('0000:00:07.0', 'scsi'),
    fn('0000:00:09.0', 'blk', 'vfio-pci'),
    fn('0000:00:08.0', 'blk', 'vfio-pci'),
    fn('0000:00:0a.0', 'blk', 'virtio-pci'),
  ];
  const expanded = expandPciAll(config.controllers, list);
  t.deepEqual(
    expanded.map((c) => [c.name, c.deviceType, c.transport]),
    [
      ['VirtioScsi0', 'scsi', { type: 'vhost-user', path: '/a' }],
      ['VirtioScsi2', 'scsi', { type: 'vhost-user', path: '/b' }],
      ['VirtioScsi1', 'scsi', { type: 'pci', address: '0000:00:04.0' }],
      ['VirtioScsi3', 'scsi', { type: 'pci', address: '0000:00:05.0' }],
      ['VirtioBlk0', 'blk', { type: 'pci', address: '0000:00:08.0' }],
      ['VirtioBlk1', 'blk', { type: 'pci', address: '0000:00:09.0' }],
    ],
  );
  const warnings: string[] = [];
  t.deepEqual(expandPciAll(config.controllers, () => [], (w) => warnings.push(w)).length, 2);
  t.deepEqual(warnings, [
    'controller VirtioScsi: no virtio-scsi PCI function is bound to vfio-pci',
    'controller VirtioBlk: no virtio-blk PCI function is bound to vfio-pci',
  ]);
});

test('our JSON: "pci": "all" takes the functions of the controller\'s type only; a named function is not taken twice', (t) => {
  const config = parseConfig(
    JSON.stringify({
      controllers: [
        { name: 'Disk', pci: 'all', type: 'blk', queueSize: 128 },
        { pci: '0000:00:08.0', type: 'blk' },
        { pci: 'all', type: 'blk' },
      ],
    }),
    { source: 'a.json' },
  );
  const warnings: string[] = [];
  const expanded = expandPciAll(
    config.controllers,
    () => [fn('0000:00:04.0', 'scsi', 'vfio-pci'), fn('0000:00:08.0', 'blk', 'vfio-pci'), fn('0000:00:09.0', 'blk', 'vfio-pci')],
    (w) => warnings.push(w),
  );
  t.deepEqual(
    expanded.map((c) => [c.name, c.deviceType, c.transport, c.queueSize]),
    [
      ['Disk0', 'blk', { type: 'pci', address: '0000:00:09.0' }, 128],
      ['VirtioBlk0', 'blk', { type: 'pci', address: '0000:00:08.0' }, 512],
    ],
    'the scsi function stays out; the second "all" of the same type has nothing left to take',
  );
  t.deepEqual(warnings, []);
});

testWhen(test.serial, 'an INI naming the bundled target: loadConfig, attachAll, I/O, and clean-up on failure', initiatorRequirements, async (t) => {
  const setup = await startTestTarget({ luns: ['0:0:ram:16M:512', '0:1:ram:16M:4096'], queues: 2, queueSize: 1024 });
  try {
    const file = join(setup.dir, 'virtio.conf');
    // A relative Path, taken from the working directory given as cwd.
    writeFileSync(file, '[Global]\n  ReactorMask 0x1\n\n[VirtioUser4]\n  Path vhost.sock\n  Queues 2\n  Name Cfg0\n');
    const config = await loadConfig(file, { cwd: setup.dir });
    t.deepEqual(config.warnings, [`${file}:1: section [Global] is not about virtio: skipped`]);
    const controllers = await attachAll(config, { defaults: { memoryBytes: 32 << 20 } });
    try {
      t.is(controllers.length, 1);
      const ctrl = controllers[0];
      if (!ctrl) throw new Error('no controller');
      t.is(ctrl.name, 'Cfg0');
      t.is(ctrl.info.requestQueues, 2);
      t.deepEqual(
        ctrl.devices.map((d) => d.name),
        ['Cfg0t0', 'Cfg0t0l1'],
      );
      const disk = ctrl.device('Cfg0t0l1');
      const data = pattern(4 * disk.blockSize, 7);
      await disk.write(10, data);
      t.deepEqual(await disk.read(10, 4), data);
    } finally {
      for (const c of controllers) c.close();
    }

    // The second controller cannot connect: the first is closed again and the error names the second.
    const two = parseConfig(`[VirtioUser0]\n  Path ${setup.socket}\n[VirtioUser1]\n  Path ${join(setup.dir, 'missing.sock')}\n`, { source: 'two.conf' });
    const err = await t.throwsAsync(attachAll(two, { defaults: { memoryBytes: 32 << 20 } }), { instanceOf: AttachError });
    t.is(err?.controller, 'VirtioScsi1');
    t.regex(err?.message ?? '', /^controller VirtioScsi1: cannot connect: .*missing\.sock/);
    // The target serves one frontend at a time: attaching again works only if the first was let go.
    const again = await attachAll({ controllers: two.controllers.slice(0, 1) }, { defaults: { memoryBytes: 32 << 20 } });
    t.is(again[0]?.name, 'VirtioScsi0');
    for (const c of again) c.close();
  } finally {
    await setup.cleanup();
  }
});

/** Closes the controllers and waits until each has let go of its target (one frontend at a time). */
async function closeAll(controllers: readonly Controller[]): Promise<void> {
  await Promise.all(controllers.map((c) => c.close()));
}

testWhen(test.serial, 'virtio-blk in each format (INI Type Blk, SPDK dev_type blk, our type blk): one disk named after the controller', initiatorRequirements, async (t) => {
  const setup = await startTestTarget({ type: 'blk', luns: ['0:0:ram:64M:4096'] });
  t.teardown(() => setup.cleanup());
  const spdkJson = {
    subsystems: [
      {
        subsystem: 'bdev',
        config: [
          {
            method: 'bdev_virtio_attach_controller',
            params: { name: 'SpdkBlk', trtype: 'user', traddr: setup.socket, dev_type: 'blk', vq_count: 1, vq_size: 256 },
          },
        ],
      },
    ],
  };
  const formats: Array<[format: ConfigFormat, text: string, name: string, queueSize: number]> = [
    ['spdk-ini', `[VirtioUser3]\n  Path ${setup.socket}\n  Type Blk\n`, 'VirtioBlk3', 512],
    ['spdk-json', JSON.stringify(spdkJson), 'SpdkBlk', 256],
    ['native-json', JSON.stringify({ controllers: [{ socket: setup.socket, type: 'blk' }] }), 'VirtioBlk0', 512],
  ];
  let previous: { lba: number; data: Buffer } | undefined;
  for (const [i, [format, text, name, queueSize]] of formats.entries()) {
    const config = parseConfig(text, { source: `blk.${format}` });
    t.is(config.format, format);
    t.is(config.controllers[0]?.deviceType, 'blk');
    const controllers = await attachAll(config, { defaults: { memoryBytes: 32 << 20 } });
    try {
      t.deepEqual(
        controllers.map((c) => [c.name, c.deviceType, c.info.deviceType, c.devices.map((d) => d.name)]),
        [[name, 'blk', 'blk', [name]]],
        format,
      );
      const ctrl = controllers[0]!;
      t.is(ctrl.info.queueSize, queueSize, `${format}: the ring size of the configuration`);
      const disk = ctrl.device(name);
      t.is(disk.deviceType, 'blk');
      t.is(disk.info.deviceType, 'blk');
      t.is(disk.blockSize, 4096);
      t.is(disk.blockCount, 16384n);
      t.is(disk.info.serial, 'VIRTINIT-ram');
      // The same disk under each configuration: what the previous one wrote is there.
      if (previous) t.deepEqual(await disk.read(previous.lba, previous.data.length / 4096), previous.data, `${format} reads what was written before`);
      const data = pattern(3 * 4096, 11 + i);
      await disk.write(100 * (i + 1), data);
      t.deepEqual(await disk.read(100 * (i + 1), 3), data);
      previous = { lba: 100 * (i + 1), data };
    } finally {
      await closeAll(controllers);
    }
  }
});

testWhen(test.serial, 'a configuration of both types attaches both; a virtio-blk target configured as scsi fails naming the controller and the type', initiatorRequirements, async (t) => {
  const scsiTarget = await startTestTarget({ luns: ['0:0:ram:16M:512'] });
  t.teardown(() => scsiTarget.cleanup());
  const blkTarget = await startTestTarget({ type: 'blk', luns: ['0:0:ram:32M:512'] });
  t.teardown(() => blkTarget.cleanup());
  const options = { defaults: { memoryBytes: 32 << 20 } };
  const both = parseConfig(
    JSON.stringify({ controllers: [{ name: 'S', socket: scsiTarget.socket }, { name: 'Disk', socket: blkTarget.socket, type: 'blk' }] }),
    { source: 'both.json' },
  );
  const controllers = await attachAll(both, options);
  try {
    t.deepEqual(
      controllers.map((c) => [c.name, c.deviceType, c.devices.map((d) => d.name)]),
      [
        ['S', 'scsi', ['St0']],
        ['Disk', 'blk', ['Disk']],
      ],
    );
    t.is(controllers[1]!.device('Disk').blockCount, 65536n);
  } finally {
    await closeAll(controllers);
  }

  // The type left out: the virtio-blk socket is opened as virtio-scsi.
  const wrong = parseConfig(
    JSON.stringify({ controllers: [{ name: 'S', socket: scsiTarget.socket }, { name: 'Disk', socket: blkTarget.socket }] }),
    { source: 'wrong.json' },
  );
  const err = await t.throwsAsync(attachAll(wrong, options), { instanceOf: AttachError });
  t.is(err?.controller, 'Disk');
  t.regex(err?.message ?? '', /^controller Disk: cannot connect: cannot open vhost-user socket .*virtio-scsi/);
  t.true(
    err?.message.endsWith(' (opened as virtio-scsi; if the target is a virtio-blk one, give the controller type blk)'),
    err?.message,
  );
  // S was closed again: both targets take a new frontend.
  await closeAll(await attachAll(both, options));
});
