#!/usr/bin/env node
// virtio-initiator: the command line of the package. Each subcommand lives in a file of its own
// and is loaded only when run (the `target` wrapper never loads the native addon); adding one is
// one entry in SUBCOMMANDS.

import { createRequire } from 'node:module';

import { type Subcommand, UsageError } from './args.js';

interface Entry {
  name: string;
  summary: string;
  load: () => Promise<Subcommand>;
}

const SUBCOMMANDS: readonly Entry[] = [
  {
    name: 'bench',
    summary: 'load a block device at a queue depth; IOPS, MB/s, latency, CPU, optional data verification',
    load: async () => (await import('./bench.js')).bench,
  },
  {
    name: 'rpc',
    summary: 'serve the management JSON-RPC (SPDK method names) on a unix socket',
    load: async () => (await import('./rpc.js')).rpc,
  },
  {
    name: 'scan',
    summary: 'attach a controller and list its targets and LUNs, or its virtio-blk disk (with attach and scan times)',
    load: async () => (await import('./scan.js')).scan,
  },
  {
    name: 'target',
    summary: 'run the bundled vhost-user-scsi target with the arguments that follow',
    load: async () => (await import('./target.js')).target,
  },
];

const PROGRAM = 'virtio-initiator';

function usage(): string {
  const width = Math.max(...SUBCOMMANDS.map((c) => c.name.length));
  return [
    `usage: ${PROGRAM} <subcommand> [options]`,
    '',
    'Userspace poll-mode virtio-scsi and virtio-blk initiator.',
    '',
    'subcommands:',
    ...SUBCOMMANDS.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`),
    '',
    `${PROGRAM} <subcommand> --help describes the options of each.`,
    '',
  ].join('\n');
}

function version(): string {
  const pkg = createRequire(import.meta.url)('../../package.json') as { version?: unknown };
  return String(pkg.version ?? 'unknown');
}

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined) {
    process.stderr.write(`${PROGRAM}: missing subcommand (one of ${SUBCOMMANDS.map((c) => c.name).join(', ')}; see --help)\n`);
    return 2;
  }
  if (name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(usage());
    return 0;
  }
  if (name === '--version') {
    process.stdout.write(`${version()}\n`);
    return 0;
  }
  const entry = SUBCOMMANDS.find((c) => c.name === name);
  if (entry === undefined) {
    process.stderr.write(
      `${PROGRAM}: unknown subcommand ${JSON.stringify(name)} (known: ${SUBCOMMANDS.map((c) => c.name).join(', ')})\n`,
    );
    return 2;
  }
  try {
    return await (await entry.load()).run(rest);
  } catch (e) {
    if (e instanceof UsageError) {
      process.stderr.write(`${PROGRAM} ${name}: ${e.message}\n`);
      return 2;
    }
    process.stderr.write(`${PROGRAM} ${name}: ${e instanceof Error ? e.message : String(e)}\n`);
    return 1;
  }
}

// Exit once stdout and stderr have taken everything (a large JSON result into a pipe that the
// reader drains slowly must not be cut short), so that nothing left behind (a timer, a handle)
// keeps the process alive either.
function exit(code: number): void {
  process.stdout.write('', () => process.stderr.write('', () => process.exit(code)));
}

main(process.argv.slice(2)).then(exit, (e: unknown) => {
  process.stderr.write(`${PROGRAM}: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
  exit(1);
});
