// `virtio-initiator scan`: attach a controller, enumerate its targets and LUNs (or find the one
// disk of a virtio-blk device), print them as a table (or one JSON object with --json), with the
// time attaching and scanning took.

import { performance } from 'node:perf_hooks';
import { setFlagsFromString } from 'node:v8';

import type { BlockDevice } from '../block-device.js';
import { attachAll, loadConfig } from '../config/index.js';
import type { Controller } from '../controller.js';
import type { ScannedLun } from '../scan.js';
import { type LogLevel, setLogLevel } from '../log.js';
import type { DeviceType } from '../device-type.js';
import {
  DEVICE_OPTIONS,
  deviceArgs,
  formatSize,
  HELP_OPTION,
  LOG_LEVEL_OPTION,
  logLevelOf,
  type OptionSpec,
  optionsHelp,
  parseArgs,
  type Subcommand,
  UsageError,
} from './args.js';
import { openController } from './open.js';
import { printEvents, table, writeJsonLine } from './output.js';

const OPTIONS: readonly OptionSpec[] = [
  ...DEVICE_OPTIONS,
  {
    name: 'name',
    kind: 'value',
    metavar: 'NAME',
    help: 'controller name, the prefix of device names (default VirtioScsi0); with --type blk the disk\'s name (default VirtioBlk0)',
  },
  { name: 'json', kind: 'flag', help: 'print the result as one JSON object on stdout' },
  { name: 'trace', kind: 'flag', help: 'log every command of the scan (CDB, status, sense, latency) on stderr' },
  LOG_LEVEL_OPTION,
  HELP_OPTION,
];

const HELP = `usage: virtio-initiator scan (--socket PATH | --pci BDF | --config FILE) [options]

Attaches virtio-scsi controllers, enumerates their targets and LUNs (REPORT LUNS, INQUIRY and its
VPD pages, READ CAPACITY) and lists them with the time attaching and scanning took. A virtio-blk
device (--type blk, or a virtio-blk PCI function) is one disk: its size from the configuration
space, its serial number from GET ID.

options:
${optionsHelp(OPTIONS)}
`;


interface ScanConfig {
  logLevel: LogLevel | undefined;
  trace: boolean;
  socket: string | undefined;
  pci: string | undefined;
  config: string | undefined;
  type: DeviceType | undefined;
  name: string | undefined;
  json: boolean;
}

export function parseScanArgs(argv: readonly string[]): ScanConfig | 'help' {
  const a = parseArgs(argv, OPTIONS);
  if (a.flag('help')) return 'help';
  const { socket, pci, config, type } = deviceArgs(a);
  if (socket === undefined && pci === undefined && config === undefined) {
    throw new UsageError('give the device: --socket PATH, --pci BDF or --config FILE');
  }
  if (config !== undefined && a.has('name')) throw new UsageError('--name comes from the configuration with --config');
  return { logLevel: logLevelOf(a), trace: a.flag('trace'), socket, pci, config, type, name: a.string('name'), json: a.flag('json') };
}

/** One LUN as the scan reports it (JSON field names). */
export interface ScanLunReport {
  name: string;
  target: number;
  lun: number;
  type: string;
  vendor: string;
  product: string;
  revision: string;
  serial: string | null;
  blockSize: number | null;
  blocks: string | null;
  bytes: string | null;
  unmap: boolean;
  writeCache: boolean | null;
  ready: boolean;
  problem: string | null;
}

export interface ControllerScan {
  controller: string;
  transport: string;
  /** 'blk': `luns` holds the device's one disk (target 0, LUN 0). */
  deviceType: DeviceType;
  /** Milliseconds the scan took. */
  scanMs: number;
  luns: ScanLunReport[];
  problems: Array<{ target: number; lun: number | null; error: string }>;
}

export interface ScanReport {
  /** Milliseconds from the call to working controllers (connection, negotiation, memory, rings). */
  attachMs: number;
  /** Milliseconds all the scans took. */
  scanMs: number;
  controllers: ControllerScan[];
}

function lunReport(l: ScannedLun): ScanLunReport {
  const g = l.geometry;
  return {
    name: l.name,
    target: l.target,
    lun: l.lun,
    type: l.deviceTypeName,
    vendor: l.vendor,
    product: l.product,
    revision: l.revision,
    serial: l.serial ?? null,
    blockSize: g ? g.blockSize : null,
    blocks: g ? String(g.blockCount) : null,
    bytes: g ? String(g.blockCount * BigInt(g.blockSize)) : null,
    unmap: l.provisioning?.lbpu ?? false,
    writeCache: l.caching?.wce ?? null,
    ready: l.ready,
    problem: l.problem ?? null,
  };
}

/** The one disk of a virtio-blk device, in the fields of a LUN. */
function blkDiskReport(d: BlockDevice): ScanLunReport {
  const info = d.info;
  return {
    name: d.name,
    target: info.target,
    lun: info.lun,
    type: 'virtio-blk disk',
    vendor: info.vendor,
    product: info.product,
    revision: info.revision,
    serial: info.serial ?? null,
    blockSize: info.blockSize,
    blocks: String(info.blockCount),
    bytes: String(info.sizeBytes),
    unmap: info.unmap,
    writeCache: info.writeCache ?? null,
    ready: true,
    problem: null,
  };
}

const round2 = (x: number): number => Math.round(x * 100) / 100;

export const scan: Subcommand = {
  async run(argv: string[]): Promise<number> {
    const cfg = parseScanArgs(argv);
    if (cfg === 'help') {
      process.stdout.write(HELP);
      return 0;
    }
    // A scan runs each code path a few thousand times at most and then the process ends:
    // optimizing compilation costs more than it saves (256 LUNs on one core: 85 ms -> 43 ms).
    setFlagsFromString('--no-opt');
    // Most of what a scan allocates lives until its step ends: a young generation that grows
    // faster copies it fewer times.
    setFlagsFromString('--semi-space-growth-factor=8');
    // A trace is logged at level trace: asking for it lowers the level that far.
    const level = cfg.trace ? 'trace' : cfg.logLevel;
    if (level !== undefined) setLogLevel(level);
    const t0 = performance.now();
    let controllers: Controller[];
    if (cfg.config !== undefined) {
      const config = await loadConfig(cfg.config);
      for (const w of config.warnings) process.stderr.write(`virtio-initiator scan: ${w}\n`);
      controllers = await attachAll(config, { scan: false, defaults: { trace: cfg.trace } });
    } else {
      controllers = [await openController(cfg, { ...(cfg.name !== undefined ? { name: cfg.name } : {}), trace: cfg.trace })];
    }
    // A target that goes away or changes during the scan is reported as it happens.
    printEvents('scan', controllers, ['device-added', 'rescanned']);
    try {
      const t1 = performance.now();
      const scans: ControllerScan[] = [];
      for (const ctrl of controllers) {
        const start = performance.now();
        const result = await ctrl.scan();
        scans.push({
          controller: ctrl.name,
          transport: ctrl.info.transport,
          deviceType: ctrl.deviceType,
          scanMs: round2(performance.now() - start),
          luns: ctrl.deviceType === 'blk' ? ctrl.devices.map(blkDiskReport) : result.luns.map(lunReport),
          problems: result.problems.map((p) => ({ target: p.target, lun: p.lun ?? null, error: p.error.message })),
        });
      }
      const report: ScanReport = { attachMs: round2(t1 - t0), scanMs: round2(performance.now() - t1), controllers: scans };
      if (cfg.json) writeJsonLine(report);
      else process.stdout.write(human(report));
      return scans.some((c) => c.problems.length > 0) ? 1 : 0;
    } finally {
      await Promise.all(controllers.map((c) => c.close()));
    }
  },
};

function human(r: ScanReport): string {
  const lines = [`attached in ${r.attachMs} ms, scanned in ${r.scanMs} ms`];
  for (const c of r.controllers) {
    const rows = [['name', 'target', 'lun', 'type', 'vendor', 'product', 'block', 'blocks', 'size', 'serial', 'unmap']];
    for (const l of c.luns) {
      rows.push([
        l.name,
        String(l.target),
        String(l.lun),
        l.type,
        l.vendor || '-',
        l.product,
        l.blockSize === null ? '-' : String(l.blockSize),
        l.blocks ?? '-',
        l.bytes === null ? (l.problem ?? '-') : formatSize(Number(l.bytes)),
        l.serial ?? '-',
        l.unmap ? 'yes' : 'no',
      ]);
    }
    const found = c.deviceType === 'blk' ? `virtio-blk, ${c.luns.length} disk` : `${c.luns.length} LUN(s)`;
    lines.push('', `${c.controller} over ${c.transport}: ${found}, scanned in ${c.scanMs} ms`);
    lines.push(table(rows, new Set([1, 2, 6, 7])));
    for (const p of c.problems) lines.push(`problem: target ${p.target}${p.lun === null ? '' : ` lun ${p.lun}`}: ${p.error}`);
  }
  return `${lines.join('\n')}\n`;
}
