// Configuration files (design D8): SPDK's legacy INI, SPDK's JSON config and our own JSON, read
// into one typed list of controllers, and `attachAll` to connect and scan them.

import { readFile } from 'node:fs/promises';

import { Controller, type ControllerOptions } from '../controller.js';
import { listPciDevices, type PciDeviceInfo } from '../pci.js';
import { deviceTypeHint } from '../device-type.js';
import { parseIni } from './ini.js';
import { parseJson } from './json.js';
import { parseNativeJson } from './native-json.js';
import { isSpdkJson, parseSpdkJson } from './spdk-json.js';
import {
  checkName,
  checkPciAddress,
  checkQueueSize,
  checkRequestQueues,
  ConfigError,
  type ConfigDeviceType,
  type ControllerConfig,
  fail,
  type InitiatorConfig,
  NameBook,
  show,
} from './types.js';

export { CONFIG_SCHEMA, CONFIG_SCHEMA_ID } from './schema.js';
export {
  ConfigError,
  type ConfigDeviceType,
  type ConfigFormat,
  type ConfigTransport,
  type ControllerConfig,
  DEFAULT_QUEUE_SIZE,
  DEFAULT_REQUEST_QUEUES,
  type InitiatorConfig,
  MAX_QUEUE_SIZE,
  MAX_REQUEST_QUEUES,
} from './types.js';

export interface ParseOptions {
  /** Named in every error and warning (default "<config>"). */
  source?: string;
  /** Relative socket paths are taken from here (default process.cwd(), as SPDK did). */
  cwd?: string;
}

/** A `[` that opens a JSON array rather than an INI section: `[Virtio]` is INI, `[{...` is JSON. */
const JSON_ARRAY_START = /^\[\s*(?:[{["\]\d-]|true\b|false\b|null\b|$)/;

/** Reads a configuration in any of the three formats, recognised by its content. */
export function parseConfig(text: string, options: ParseOptions = {}): InitiatorConfig {
  const ctx = { source: options.source ?? '<config>', cwd: options.cwd ?? process.cwd() };
  const body = text.startsWith('\uFEFF') ? text.slice(1) : text;
  const meaningful = body.split(/\r?\n/).filter((l) => l.trim() !== '' && !l.trim().startsWith('#'));
  if (meaningful.length === 0) {
    fail({ source: ctx.source }, 'the file is empty (expected SPDK INI sections, an SPDK JSON config or {"controllers": [...]})');
  }
  const first = (meaningful[0] as string).trim();
  const json = first.startsWith('{') || JSON_ARRAY_START.test(first);
  if (!json) return parseIni(body, ctx);
  const doc = parseJson(body, ctx.source);
  return isSpdkJson(doc.value) ? parseSpdkJson(doc, ctx) : parseNativeJson(doc, ctx);
}

/**
 * Reads and parses a configuration file. Relative socket paths in it are taken from the
 * working directory (or `cwd`), not from the file's directory: that is what SPDK did.
 */
export async function loadConfig(path: string, options: Omit<ParseOptions, 'source'> = {}): Promise<InitiatorConfig> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw new ConfigError({ source: path }, `cannot read the file: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
  }
  return parseConfig(text, { ...options, source: path });
}

/**
 * Checks a configuration built in code with the rules the files follow (names, counts, PCI
 * addresses, one controller per name); paths in errors are `controllers[i].field`.
 */
export function validateConfig(config: Pick<InitiatorConfig, 'controllers'>, source = '<config>'): void {
  if (typeof config !== 'object' || config === null || !Array.isArray(config.controllers)) {
    fail({ source, path: 'controllers' }, `expected an array of controllers, got ${show(config?.controllers)}`);
  }
  const names = new NameBook();
  config.controllers.forEach((c, i) => {
    const at = (field: string) => ({ source, path: `controllers[${i}].${field}` });
    checkName(c.name, at('name'), 'name');
    names.take(c.name, at('name'), `controllers[${i}]`);
    const t = c.transport;
    if (t?.type === 'vhost-user') {
      if (typeof t.path !== 'string' || t.path === '') fail(at('transport.path'), `expected a socket path, got ${show(t.path)}`);
    } else if (t?.type === 'pci') {
      checkPciAddress(t.address, at('transport.address'), 'address');
    } else if (t?.type !== 'pci-all') {
      fail(at('transport.type'), `expected 'vhost-user', 'pci' or 'pci-all', got ${show((t as { type?: string } | undefined)?.type)}`);
    }
    if (c.deviceType !== 'scsi' && c.deviceType !== 'blk') fail(at('deviceType'), `expected 'scsi' or 'blk', got ${show(c.deviceType)}`);
    checkRequestQueues(c.requestQueues, at('requestQueues'), 'requestQueues');
    checkQueueSize(c.queueSize, at('queueSize'), 'queueSize');
  });
}

/** A controller of the configuration could not be attached. */
export class AttachError extends Error {
  override readonly name = 'AttachError';
  constructor(
    /** The controller's name. */
    readonly controller: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`controller ${controller}: ${message}`, options);
  }
}

export interface AttachAllOptions {
  /** Controller options the configuration does not set (maxTransferBytes, retry, poll, ...). */
  defaults?: Omit<ControllerOptions, 'name' | 'type' | 'requestQueues' | 'queueSize'>;
  /** Scan each controller after connecting it (default true). */
  scan?: boolean;
  signal?: AbortSignal;
  /** Lists the PCI functions that `pci-all` stands for (default `listPciDevices`). */
  listPci?: () => PciDeviceInfo[];
  /** Told of what attach time finds worth saying (a `pci-all` that matched no function). */
  onWarning?: (message: string) => void;
}

/**
 * The configuration with every `pci-all` replaced by the functions of its device type bound to
 * vfio-pci (virtio-scsi, or virtio-blk for `deviceType: 'blk'`), named `<prefix><n>` with the
 * lowest n no other controller has, in address order. Functions the configuration names on
 * their own are not taken twice.
 */
export function expandPciAll(
  controllers: readonly ControllerConfig[],
  list: () => PciDeviceInfo[] = listPciDevices,
  onWarning: (message: string) => void = () => {},
): ControllerConfig[] {
  if (!controllers.some((c) => c.transport.type === 'pci-all')) return [...controllers];
  const names = new NameBook();
  const explicit = new Set<string>();
  for (const c of controllers) {
    if (c.transport.type !== 'pci-all') names.take(c.name, { source: '<config>' }, c.name);
    if (c.transport.type === 'pci') explicit.add(c.transport.address.toLowerCase());
  }
  let functions: PciDeviceInfo[];
  try {
    functions = list();
  } catch (e) {
    const c = controllers.find((x) => x.transport.type === 'pci-all') as ControllerConfig;
    throw new AttachError(c.name, `cannot list PCI functions: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
  }
  const bound = functions
    .filter((f) => f.driver === 'vfio-pci' && !explicit.has(f.address.toLowerCase()))
    .sort((a, b) => a.address.localeCompare(b.address));
  const out: ControllerConfig[] = [];
  const taken = new Set<ConfigDeviceType>();
  for (const c of controllers) {
    if (c.transport.type !== 'pci-all') {
      out.push(c);
      continue;
    }
    // Two pci-all entries of one type cannot both have its functions; the first one takes them.
    if (taken.has(c.deviceType)) continue;
    taken.add(c.deviceType);
    const mine = bound.filter((f) => f.deviceType === c.deviceType);
    if (mine.length === 0) onWarning(`controller ${c.name}: no virtio-${c.deviceType} PCI function is bound to vfio-pci`);
    for (const f of mine) {
      out.push({ ...c, name: names.next(c.name, f.address), transport: { type: 'pci', address: f.address } });
    }
  }
  return out;
}

/**
 * Connects every controller of a configuration and scans it, in order. When one fails, the
 * ones already attached are closed and an AttachError names the one that failed.
 */
export async function attachAll(config: Pick<InitiatorConfig, 'controllers'>, options: AttachAllOptions = {}): Promise<Controller[]> {
  validateConfig(config);
  const controllers = expandPciAll(config.controllers, options.listPci, options.onWarning);
  const attached: Controller[] = [];
  try {
    for (const c of controllers) {
      options.signal?.throwIfAborted();
      attached.push(await attachOne(c, options));
    }
  } catch (e) {
    await Promise.all(attached.map((ctrl) => ctrl.close()));
    throw e;
  }
  return attached;
}

async function attachOne(c: ControllerConfig, options: AttachAllOptions): Promise<Controller> {
  const opts: ControllerOptions = {
    ...options.defaults,
    name: c.name,
    type: c.deviceType,
    requestQueues: c.requestQueues,
    queueSize: c.queueSize,
  };
  if (c.memoryBytes !== undefined) opts.memoryBytes = c.memoryBytes;
  if (c.hugepages !== undefined) opts.hugepages = c.hugepages;
  const transport = c.transport;
  if (transport.type === 'pci-all') throw new Error('pci-all must be expanded first');
  let ctrl: Controller;
  try {
    ctrl =
      transport.type === 'vhost-user'
        ? await Controller.connect(transport.path, opts)
        : await Controller.openPci(transport.address, opts);
  } catch (e) {
    const hint = deviceTypeHint(e, transport.type, c.deviceType, (other) => `the controller type ${other}`);
    throw new AttachError(c.name, `cannot connect: ${e instanceof Error ? e.message : String(e)}${hint}`, { cause: e });
  }
  if (options.scan === false) return ctrl;
  try {
    await ctrl.scan(options.signal ? { signal: options.signal } : {});
  } catch (e) {
    await ctrl.close();
    throw new AttachError(c.name, `scan failed: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
  }
  return ctrl;
}
