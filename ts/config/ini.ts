// SPDK's legacy INI configuration, as its conf parser (lib/conf) and the virtio bdev module read
// it: `[Virtio]` with `Dev Pci` / `Dev User <path>` lines (the first form, 2017), `[VirtioPci]`
// with `Enable Yes`, and `[VirtioUserN]` with `Path`, `Queues`, `Name` and `Type`.
//
// What SPDK's parser did and this one does too: section names and keys match without regard to
// case; a `#` starts a comment only at the start of a line; indentation is free; a line ending in
// `\` continues on the next; values are separated by blanks and may be quoted; a section that
// appears twice is one section with the items of both, and a key given twice means its first
// value. Where SPDK was silent (unknown keys, a Queues that is not a number) this one is strict.

import { isAbsolute, resolve } from 'node:path';

import {
  checkName,
  checkRequestQueues,
  type ConfigDeviceType,
  type ControllerConfig,
  DEFAULT_BLK_NAME_PREFIX,
  DEFAULT_NAME_PREFIX,
  DEFAULT_QUEUE_SIZE,
  DEFAULT_REQUEST_QUEUES,
  fail,
  type InitiatorConfig,
  NameBook,
  type Where,
} from './types.js';

export interface ParseContext {
  source: string;
  /** Relative socket paths are taken from here, as SPDK took them from its working directory. */
  cwd: string;
}

interface Item {
  key: string;
  values: string[];
  line: number;
}

interface Section {
  /** As written the first time. */
  name: string;
  line: number;
  items: Item[];
}

/** A controller before default names are given out. */
interface Pending {
  config: Omit<ControllerConfig, 'name'> & { name?: string };
  line: number;
  /** Prefix of the default name. */
  prefix: string;
}

/** SPDK's spdk_conf_section_get_boolval words. */
const TRUE_WORDS = new Set(['yes', 'y', 'true', 'on', '1']);
const FALSE_WORDS = new Set(['no', 'n', 'false', 'off', '0']);

/** Splits a value list on blanks, honouring quotes and backslash escapes as spdk_strsepq did. */
function tokens(text: string, where: Where): string[] {
  const out: string[] = [];
  let i = 0;
  while (i < text.length) {
    while (i < text.length && (text[i] === ' ' || text[i] === '\t')) i++;
    if (i >= text.length) break;
    // An inline comment after blanks: SPDK would have kept it as values, which only ever
    // turned a comment into a bogus extra value; dropping it is what the writer meant.
    if (text[i] === '#') break;
    let token = '';
    let quote: string | undefined;
    while (i < text.length) {
      const c = text[i] as string;
      if (quote !== undefined) {
        if (c === quote) quote = undefined;
        else if (c === '\\' && i + 1 < text.length) token += text[++i];
        else token += c;
      } else if (c === '"' || c === "'") {
        quote = c;
      } else if (c === '\\' && i + 1 < text.length) {
        token += text[++i];
      } else if (c === ' ' || c === '\t') {
        break;
      } else {
        token += c;
      }
      i++;
    }
    if (quote !== undefined) fail(where, `unterminated ${quote} quote`);
    out.push(token);
  }
  return out;
}

/** Logical lines: comments and blank lines dropped, `\` continuations joined, first line number kept. */
function logicalLines(text: string): Array<{ text: string; line: number }> {
  const physical = text.split(/\r?\n/);
  const out: Array<{ text: string; line: number }> = [];
  for (let i = 0; i < physical.length; i++) {
    const line = i + 1;
    let s = (physical[i] as string).trim();
    if (s === '' || s.startsWith('#')) continue;
    while (s.endsWith('\\') && i + 1 < physical.length) {
      s = s.slice(0, -1) + (physical[++i] as string).trim();
    }
    out.push({ text: s, line });
  }
  return out;
}

/** Sections in order of first appearance, repeated ones merged as SPDK merged them. */
function readSections(text: string, source: string): Section[] {
  const byName = new Map<string, Section>();
  let current: Section | undefined;
  for (const { text: s, line } of logicalLines(text)) {
    const where = { source, line };
    if (s.startsWith('[')) {
      const m = /^\[([^\]]*)\]$/.exec(s);
      if (!m) fail(where, `broken section header ${JSON.stringify(s)} (expected [Name] alone on its line)`);
      const name = (m[1] as string).trim();
      if (name === '') fail(where, 'empty section name');
      const key = name.toLowerCase();
      current = byName.get(key);
      if (!current) {
        current = { name, line, items: [] };
        byName.set(key, current);
      }
      continue;
    }
    if (!current) {
      fail(where, `${JSON.stringify(s)} is outside any section (expected a [Virtio], [VirtioPci] or [VirtioUserN] header first)`);
    }
    const [key, ...values] = tokens(s, where);
    if (key === undefined) continue;
    current.items.push({ key, values, line });
  }
  return [...byName.values()];
}

/** The items of a section by lower-case key: the first of each, repeats reported. */
function firstOfEach(section: Section, known: readonly string[], source: string, warnings: string[]): Map<string, Item> {
  const out = new Map<string, Item>();
  for (const item of section.items) {
    const key = item.key.toLowerCase();
    if (!known.includes(key)) {
      fail(
        { source, line: item.line },
        `unknown key ${JSON.stringify(item.key)} in [${section.name}] (expected ${known.map(capital).join(', ')})`,
      );
    }
    const first = out.get(key);
    if (first) {
      warnings.push(
        `${source}:${item.line}: ${item.key} is given again in [${section.name}]; the first one (line ${first.line}) is used, as SPDK did`,
      );
      continue;
    }
    out.set(key, item);
  }
  return out;
}

function capital(key: string): string {
  return key.charAt(0).toUpperCase() + key.slice(1);
}

/** One value, required; extra values are refused rather than silently dropped. */
function single(item: Item, section: Section, source: string): string {
  const where = { source, line: item.line };
  if (item.values.length === 0) fail(where, `${item.key} in [${section.name}] needs a value`);
  if (item.values.length > 1) {
    fail(where, `${item.key} in [${section.name}] takes one value, got ${item.values.length} (quote a value with blanks)`);
  }
  return item.values[0] as string;
}

function socketPath(path: string, cwd: string): string {
  return isAbsolute(path) ? path : resolve(cwd, path);
}

export function parseIni(text: string, ctx: ParseContext): InitiatorConfig {
  const { source } = ctx;
  const warnings: string[] = [];
  const pending: Pending[] = [];
  const names = new NameBook();
  /** The PCI enumeration of each device type, where it was asked for. */
  const pciAll = new Map<ConfigDeviceType, Pending>();

  const addPciAll = (line: number, how: string, types: readonly ConfigDeviceType[]): void => {
    const repeated = types.filter((t) => pciAll.has(t));
    if (repeated.length > 0) {
      const what = repeated.map((t) => `virtio-${t}`).join(' and ');
      const first = pciAll.get(repeated[0]!)!.line;
      warnings.push(`${source}:${line}: ${how} repeats the ${what} PCI enumeration of line ${first}; the functions are attached once`);
    }
    for (const deviceType of types) {
      if (pciAll.has(deviceType)) continue;
      const p: Pending = {
        config: {
          transport: { type: 'pci-all' },
          deviceType,
          requestQueues: DEFAULT_REQUEST_QUEUES,
          queueSize: DEFAULT_QUEUE_SIZE,
        },
        line,
        prefix: deviceType === 'blk' ? DEFAULT_BLK_NAME_PREFIX : DEFAULT_NAME_PREFIX,
      };
      pciAll.set(deviceType, p);
      pending.push(p);
    }
  };

  for (const section of readSections(text, source)) {
    const lower = section.name.toLowerCase();
    const at = { source, line: section.line };
    if (lower === 'virtio') {
      for (const item of section.items) {
        const where = { source, line: item.line };
        if (item.key.toLowerCase() !== 'dev') {
          fail(where, `unknown key ${JSON.stringify(item.key)} in [${section.name}] (expected Dev Pci or Dev User <path>)`);
        }
        const [type, path, ...rest] = item.values;
        const kind = type?.toLowerCase();
        if (kind === 'pci') {
          if (path !== undefined) fail(where, `Dev Pci takes no further value, got ${JSON.stringify(path)}`);
          // The form of 2017, before SPDK had virtio-blk: virtio-scsi functions only.
          addPciAll(item.line, 'Dev Pci', ['scsi']);
        } else if (kind === 'user') {
          if (path === undefined) fail(where, 'Dev User needs the path of a vhost-user socket');
          if (rest.length > 0) fail(where, `Dev User takes one path, got ${1 + rest.length} values (quote a path with blanks)`);
          pending.push({
            config: {
              transport: { type: 'vhost-user', path: socketPath(path, ctx.cwd) },
              deviceType: 'scsi',
              requestQueues: DEFAULT_REQUEST_QUEUES,
              queueSize: DEFAULT_QUEUE_SIZE,
            },
            line: item.line,
            prefix: DEFAULT_NAME_PREFIX,
          });
        } else {
          fail(where, `unknown Dev type ${type === undefined ? '(none)' : JSON.stringify(type)} (expected Pci or User)`);
        }
      }
    } else if (lower === 'virtiopci') {
      const items = firstOfEach(section, ['enable'], source, warnings);
      const enable = items.get('enable');
      if (!enable) {
        warnings.push(`${source}:${section.line}: [${section.name}] has no Enable line: PCI functions are not used`);
        continue;
      }
      const value = single(enable, section, source).toLowerCase();
      // SPDK's virtio-scsi and virtio-blk modules each took their functions on it.
      if (TRUE_WORDS.has(value)) addPciAll(enable.line, 'Enable Yes', ['scsi', 'blk']);
      else if (!FALSE_WORDS.has(value)) {
        fail({ source, line: enable.line }, `Enable must be Yes or No, got ${JSON.stringify(enable.values[0])}`);
      }
    } else if (lower.startsWith('virtiouser')) {
      const m = /^virtiouser(\d+)$/i.exec(section.name);
      if (!m) fail(at, `section [${section.name}] has a non-numeric suffix (expected [VirtioUser0], [VirtioUser1], ...)`);
      const num = Number(m[1]);
      const items = firstOfEach(section, ['path', 'queues', 'name', 'type'], source, warnings);
      const path = items.get('path');
      if (!path) fail(at, `[${section.name}] is missing Path (the vhost-user socket)`);
      let requestQueues = DEFAULT_REQUEST_QUEUES;
      const queues = items.get('queues');
      if (queues) {
        const v = single(queues, section, source);
        const where = { source, line: queues.line };
        if (!/^\d+$/.test(v)) fail(where, `Queues must be an integer from 1 to 255, got ${JSON.stringify(v)}`);
        requestQueues = checkRequestQueues(Number(v), where, 'Queues');
      }
      let deviceType: ConfigDeviceType = 'scsi';
      const type = items.get('type');
      if (type) {
        const v = single(type, section, source);
        if (v.toLowerCase() === 'blk') deviceType = 'blk';
        else if (v.toLowerCase() !== 'scsi') fail({ source, line: type.line }, `Type must be SCSI or Blk, got ${JSON.stringify(v)}`);
      }
      const prefix = deviceType === 'blk' ? DEFAULT_BLK_NAME_PREFIX : DEFAULT_NAME_PREFIX;
      const nameItem = items.get('name');
      // SPDK named an unnamed [VirtioUserN] after its N, not after its position.
      const name = nameItem
        ? checkName(single(nameItem, section, source), { source, line: nameItem.line }, 'Name')
        : `${prefix}${num}`;
      names.take(name, { source, line: nameItem?.line ?? section.line }, `[${section.name}] at line ${section.line}`);
      pending.push({
        config: {
          name,
          transport: { type: 'vhost-user', path: socketPath(single(path, section, source), ctx.cwd) },
          deviceType,
          requestQueues,
          queueSize: DEFAULT_QUEUE_SIZE,
        },
        line: section.line,
        prefix,
      });
    } else if (lower.startsWith('virtio')) {
      fail(at, `unknown section [${section.name}] (expected [Virtio], [VirtioPci] or [VirtioUserN])`);
    } else {
      warnings.push(`${source}:${section.line}: section [${section.name}] is not about virtio: skipped`);
    }
  }

  // `Dev User` lines take the lowest free VirtioScsiN once the named sections have theirs.
  const controllers = pending.map((p): ControllerConfig => {
    const { name: given, ...rest } = p.config;
    // `pci-all` keeps the prefix: its functions are numbered when they are listed at attach time.
    const name = given ?? (rest.transport.type === 'pci-all' ? p.prefix : names.next(p.prefix, `line ${p.line}`));
    return { name, ...rest };
  });
  if (controllers.length === 0) warnings.push(`${source}: no virtio controller is configured`);
  return { controllers, warnings, format: 'spdk-ini' };
}
