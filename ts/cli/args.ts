// The argument parser every subcommand shares: `--name value`, `--name=value`, flags and
// repeatable options, with typed getters. Anything wrong becomes a UsageError whose message is
// one line naming the argument and what was expected; the dispatcher prints it and exits 2.

import { LOG_LEVELS, type LogLevel } from '../log.js';
import { PCI_ADDRESS } from '../pci.js';
import type { DeviceType } from '../device-type.js';

export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

export interface OptionSpec {
  /** Without the leading dashes, e.g. "qd". */
  name: string;
  /** flag: no value; value: one value; list: repeatable, values collected in order. */
  kind: 'flag' | 'value' | 'list';
  /** What the value looks like in the help, e.g. "N" or "SIZE". */
  metavar?: string;
  help: string;
}

export const HELP_OPTION: OptionSpec = { name: 'help', kind: 'flag', help: 'this text' };

export const LOG_LEVEL_OPTION: OptionSpec = {
  name: 'log-level',
  kind: 'value',
  metavar: 'LEVEL',
  help: 'diagnostics on stderr: off, error, warn (default), info, debug, trace (or VIRTIO_INITIATOR_LOG)',
};

/**
 * How `scan` and `bench` are told the device: a socket, a PCI function or a configuration file,
 * and the device type (a vhost-user socket cannot tell it).
 */
export const DEVICE_OPTIONS: readonly OptionSpec[] = [
  { name: 'socket', kind: 'value', metavar: 'PATH', help: 'vhost-user socket of a running target (virtio-scsi, or virtio-blk with --type blk)' },
  { name: 'pci', kind: 'value', metavar: 'BDF', help: 'virtio-scsi or virtio-blk PCI function bound to vfio-pci (0000:00:03.0)' },
  { name: 'config', kind: 'value', metavar: 'FILE', help: 'the controllers a configuration file names (SPDK INI or JSON, or ours)' },
  {
    name: 'type',
    kind: 'value',
    metavar: 'TYPE',
    help: 'device type: scsi (default) or blk (virtio-blk: one disk, named after the controller); a PCI function tells it',
  },
];

export interface DeviceArgs {
  socket: string | undefined;
  pci: string | undefined;
  config: string | undefined;
  /** As given; undefined means virtio-scsi over vhost-user, and what the function is over PCI. */
  type: DeviceType | undefined;
}

/** The device options given, checked: at most one of them, each well-formed. */
export function deviceArgs(a: ParsedArgs): DeviceArgs {
  const d = { socket: a.string('socket'), pci: a.string('pci'), config: a.string('config') };
  if ([d.socket, d.pci, d.config].filter((v) => v !== undefined).length > 1) {
    throw new UsageError('--socket, --pci and --config exclude each other');
  }
  if (d.socket === '') throw bad('socket', d.socket, 'a socket path');
  if (d.config === '') throw bad('config', d.config, 'a file');
  if (d.pci !== undefined && !PCI_ADDRESS.test(d.pci)) throw bad('pci', d.pci, 'a PCI address like 0000:00:03.0');
  const type = a.string('type');
  if (type !== undefined && type !== 'scsi' && type !== 'blk') throw bad('type', type, 'scsi or blk');
  if (type !== undefined && d.config !== undefined) throw new UsageError('--type comes from the configuration with --config');
  return { ...d, type };
}

/** The --log-level given, checked (the caller applies it with setLogLevel). */
export function logLevelOf(a: ParsedArgs): LogLevel | undefined {
  const level = a.string('log-level');
  if (level === undefined) return undefined;
  if (!(LOG_LEVELS as readonly string[]).includes(level)) throw bad('log-level', level, `one of ${LOG_LEVELS.join(', ')}`);
  return level as LogLevel;
}

const SIZE_UNITS: Record<string, number> = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };

export class ParsedArgs {
  constructor(
    private readonly values: ReadonlyMap<string, string[]>,
    readonly positionals: readonly string[],
  ) {}

  has(name: string): boolean {
    return this.values.has(name);
  }

  flag(name: string): boolean {
    return this.values.has(name);
  }

  string(name: string): string | undefined {
    return this.values.get(name)?.[0];
  }

  strings(name: string): string[] {
    return [...(this.values.get(name) ?? [])];
  }

  /** An integer in [min, max]. */
  integer(name: string, range: { min: number; max: number }): number | undefined;
  integer(name: string, range: { min: number; max: number }, fallback: number): number;
  integer(name: string, range: { min: number; max: number }, fallback?: number): number | undefined {
    const text = this.string(name);
    if (text === undefined) return fallback;
    const n = /^[0-9]+$/.test(text) ? Number(text) : NaN;
    if (!Number.isSafeInteger(n) || n < range.min || n > range.max) {
      throw bad(name, text, `an integer from ${range.min} to ${range.max}`);
    }
    return n;
  }

  /** A decimal number in (0, max]. */
  positive(name: string, max: number): number | undefined {
    const text = this.string(name);
    if (text === undefined) return undefined;
    const n = /^([0-9]+\.?[0-9]*|\.[0-9]+)$/.test(text) ? Number(text) : NaN;
    if (!Number.isFinite(n) || n <= 0 || n > max) throw bad(name, text, `a number above 0 and at most ${max}`);
    return n;
  }

  /** Bytes, with an optional binary unit: 512, 4k, 1M, 2G (k = 1024). */
  size(name: string, range: { min: number; max: number }): number | undefined {
    const text = this.string(name);
    if (text === undefined) return undefined;
    const m = /^([0-9]+)([kmgt]?)(i?b)?$/i.exec(text);
    const n = m ? Number(m[1]) * SIZE_UNITS[m[2]!.toLowerCase()]! : NaN;
    if (!Number.isSafeInteger(n) || n < range.min || n > range.max) {
      throw bad(name, text, `a size from ${formatSize(range.min)} to ${formatSize(range.max)} (like 4k or 1M)`);
    }
    return n;
  }

  /** A percentage 0..100, with or without "%". */
  percent(name: string): number | undefined {
    const text = this.string(name);
    if (text === undefined) return undefined;
    const n = /^[0-9]+(\.[0-9]+)?%?$/.test(text) ? Number(text.replace('%', '')) : NaN;
    if (!Number.isFinite(n) || n < 0 || n > 100) throw bad(name, text, 'a percentage from 0 to 100');
    return n;
  }

  /** One of `choices`. */
  choice<T extends string>(name: string, choices: readonly T[]): T | undefined;
  choice<T extends string>(name: string, choices: readonly T[], fallback: T): T;
  choice<T extends string>(name: string, choices: readonly T[], fallback?: T): T | undefined {
    const text = this.string(name);
    if (text === undefined) return fallback;
    if (!(choices as readonly string[]).includes(text)) throw bad(name, text, `one of ${choices.join(', ')}`);
    return text as T;
  }
}

/** "--qd 0: expected an integer from 1 to 1024" */
export function bad(name: string, value: string, expected: string): UsageError {
  return new UsageError(`--${name} ${JSON.stringify(value)}: expected ${expected}`);
}

export function formatSize(bytes: number): string {
  for (const [unit, scale] of [
    ['T', 2 ** 40],
    ['G', 2 ** 30],
    ['M', 2 ** 20],
    ['k', 2 ** 10],
  ] as const) {
    if (bytes >= scale && bytes % scale === 0) return `${bytes / scale}${unit}`;
  }
  return String(bytes);
}

/**
 * Parses `argv` against `specs`. Unknown options, missing values, a value given to a flag, an
 * option given twice (other than a list) and positionals when none are allowed are usage errors.
 */
export function parseArgs(argv: readonly string[], specs: readonly OptionSpec[], allowPositionals = false): ParsedArgs {
  const byName = new Map(specs.map((s) => [s.name, s]));
  const values = new Map<string, string[]>();
  const positionals: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--') {
      if (!allowPositionals && i + 1 < argv.length) throw new UsageError(`unexpected argument ${JSON.stringify(argv[i + 1])}`);
      positionals.push(...argv.slice(i + 1));
      break;
    }
    if (arg === '-h') {
      values.set('help', []);
      continue;
    }
    if (!arg.startsWith('--') || arg === '--') {
      if (!allowPositionals) throw new UsageError(`unexpected argument ${JSON.stringify(arg)}`);
      positionals.push(arg);
      continue;
    }
    const eq = arg.indexOf('=');
    const name = arg.slice(2, eq < 0 ? undefined : eq);
    const spec = byName.get(name);
    if (spec === undefined) throw new UsageError(`unknown argument --${name}`);
    let value: string | undefined;
    if (spec.kind === 'flag') {
      if (eq >= 0) throw new UsageError(`--${name} takes no value`);
    } else if (eq >= 0) {
      value = arg.slice(eq + 1);
    } else {
      const next = argv[i + 1];
      // A value may be "-1" (then refused by its getter), never another option.
      if (next === undefined || next.startsWith('--')) {
        throw new UsageError(`--${name} needs a value${spec.metavar ? ` (${spec.metavar})` : ''}`);
      }
      value = next;
      i++;
    }
    const list = values.get(name);
    if (list !== undefined && spec.kind !== 'list') throw new UsageError(`--${name} is given more than once`);
    if (list === undefined) values.set(name, value === undefined ? [] : [value]);
    else if (value !== undefined) list.push(value);
  }
  return new ParsedArgs(values, positionals);
}

/** The options part of a subcommand's help text. */
export function optionsHelp(specs: readonly OptionSpec[]): string {
  const rows = specs.map((s) => [
    `--${s.name}${s.kind === 'flag' ? '' : ` ${s.metavar ?? 'VALUE'}`}`,
    s.help + (s.kind === 'list' ? ' (repeatable)' : ''),
  ]);
  const width = Math.max(...rows.map((r) => r[0]!.length));
  return rows.map(([left, right]) => `  ${left!.padEnd(width)}  ${right}`).join('\n');
}

/** A subcommand: runs with the arguments after its name and resolves with the exit code. */
export interface Subcommand {
  run(argv: string[]): Promise<number>;
}
