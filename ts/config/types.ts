// The typed result of every configuration format (design D8), the error they all throw, and the
// checks they share, so that a value means the same whichever file it came from.

import { CONTROLLER_NAME } from '../controller.js';
import { PCI_ADDRESS } from '../pci.js';

/** Where a controller is reached. `pci-all` is every function of the controller's device type bound to vfio-pci. */
export type ConfigTransport = { type: 'vhost-user'; path: string } | { type: 'pci'; address: string } | { type: 'pci-all' };

export type ConfigDeviceType = 'scsi' | 'blk';

/** One controller to attach. */
export interface ControllerConfig {
  /**
   * Name of the controller and prefix of its devices. For `pci-all` it is the prefix of the
   * functions' names: each gets `<name><n>` with the lowest n no other controller has.
   */
  name: string;
  transport: ConfigTransport;
  deviceType: ConfigDeviceType;
  requestQueues: number;
  queueSize: number;
  memoryBytes?: number;
  hugepages?: 'auto' | 'require' | 'never';
}

export type ConfigFormat = 'spdk-ini' | 'spdk-json' | 'native-json';

/** What a configuration file describes. */
export interface InitiatorConfig {
  controllers: ControllerConfig[];
  /** Things that were skipped or merged (other subsystems, non-virtio sections, repeated keys). */
  warnings: string[];
  /** The format the text was recognised as (absent for configurations built in code). */
  format?: ConfigFormat;
}

/** SPDK's fixed ring size for configuration-file controllers. */
export const DEFAULT_QUEUE_SIZE = 512;
/** SPDK gave a controller one request queue unless told otherwise. */
export const DEFAULT_REQUEST_QUEUES = 1;
export const MAX_QUEUE_SIZE = 1024;
/** virtio-scsi counts request queues in a 16-bit field, but vhost-user targets cap far lower. */
export const MAX_REQUEST_QUEUES = 255;
/** SPDK named unnamed controllers VirtioScsi0, VirtioScsi1, ... */
export const DEFAULT_NAME_PREFIX = 'VirtioScsi';
export const DEFAULT_BLK_NAME_PREFIX = 'VirtioBlk';


/** A place in a configuration: the file, and a line (INI, JSON) and/or a JSON path. */
export interface Where {
  source: string;
  line?: number;
  column?: number;
  path?: string;
}

/** A configuration that cannot be used; the message names the file, the line or field, and what was expected. */
export class ConfigError extends Error {
  override readonly name = 'ConfigError';
  readonly source: string;
  readonly line?: number;
  readonly column?: number;
  readonly path?: string;
  /** The message without the location prefix. */
  readonly detail: string;

  constructor(where: Where, detail: string, options?: { cause?: unknown }) {
    super(`${describe(where)}: ${detail}`, options);
    this.source = where.source;
    if (where.line !== undefined) this.line = where.line;
    if (where.column !== undefined) this.column = where.column;
    if (where.path !== undefined) this.path = where.path;
    this.detail = detail;
  }
}

/** `file:line:column: path` in the order editors and compilers print them. */
export function describe(where: Where): string {
  let s = where.source;
  if (where.line !== undefined) {
    s += `:${where.line}`;
    if (where.column !== undefined) s += `:${where.column}`;
  }
  if (where.path !== undefined && where.path !== '') s += `: ${where.path}`;
  return s;
}

export function fail(where: Where, detail: string): never {
  throw new ConfigError(where, detail);
}

export function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n >= 1 && (n & (n - 1)) === 0;
}

export function checkQueueSize(value: unknown, where: Where, field: string): number {
  if (typeof value !== 'number' || !isPowerOfTwo(value) || value > MAX_QUEUE_SIZE) {
    fail(where, `${field} must be a power of two from 1 to ${MAX_QUEUE_SIZE}, got ${show(value)}`);
  }
  return value;
}

export function checkRequestQueues(value: unknown, where: Where, field: string): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > MAX_REQUEST_QUEUES) {
    fail(where, `${field} must be an integer from 1 to ${MAX_REQUEST_QUEUES}, got ${show(value)}`);
  }
  return value;
}

export function checkName(value: unknown, where: Where, field: string): string {
  if (typeof value !== 'string' || !CONTROLLER_NAME.test(value)) {
    fail(where, `${field} ${show(value)} must be 1 to 64 letters, digits, '_', '.' or '-'`);
  }
  return value;
}

/** A PCI address in the full lower-case form ("0000:00:04.0"), the form sysfs lists. */
export function checkPciAddress(value: unknown, where: Where, field: string): string {
  const m = typeof value === 'string' ? PCI_ADDRESS.exec(value) : null;
  if (!m) {
    fail(where, `${field} ${show(value)} is not a PCI address (expected DDDD:BB:DD.F or BB:DD.F, e.g. 0000:00:04.0)`);
  }
  return `${m[1] ?? '0000'}:${m[2]}:${m[3]}.${m[4]}`.toLowerCase();
}

/** A value as it appears in a message: strings quoted, the rest as JSON would print it. */
export function show(value: unknown): string {
  if (value === undefined) return 'nothing';
  if (typeof value === 'string') return JSON.stringify(value);
  if (typeof value === 'number' || typeof value === 'boolean' || value === null) return String(value);
  return Array.isArray(value) ? 'an array' : 'an object';
}

/**
 * Controller names in use, with where each was given, so that a duplicate names both places and
 * default names skip the taken ones as SPDK's numbering did.
 */
export class NameBook {
  private readonly taken = new Map<string, string>();

  take(name: string, where: Where, place: string): void {
    const first = this.taken.get(name);
    if (first !== undefined) fail(where, `duplicate controller name ${JSON.stringify(name)} (already used by ${first})`);
    this.taken.set(name, place);
  }

  has(name: string): boolean {
    return this.taken.has(name);
  }

  /** `<prefix><n>` with the lowest n not taken; the name is then taken. */
  next(prefix: string, place: string): string {
    for (let n = 0; ; n++) {
      const name = `${prefix}${n}`;
      if (!this.taken.has(name)) {
        this.taken.set(name, place);
        return name;
      }
    }
  }
}
