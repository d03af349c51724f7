// Our own JSON format (described by CONFIG_SCHEMA): a list of controllers, each with either a
// vhost-user `socket` or a `pci` function ("all" for every function bound to vfio-pci).

import { isAbsolute, resolve } from 'node:path';

import { childPath, isObject, type JsonDocument, type JsonObject, whereIn } from './json.js';
import type { ParseContext } from './ini.js';
import {
  checkName,
  checkPciAddress,
  checkQueueSize,
  checkRequestQueues,
  type ConfigDeviceType,
  type ConfigTransport,
  type ControllerConfig,
  DEFAULT_BLK_NAME_PREFIX,
  DEFAULT_NAME_PREFIX,
  DEFAULT_QUEUE_SIZE,
  DEFAULT_REQUEST_QUEUES,
  describe,
  fail,
  type InitiatorConfig,
  NameBook,
  show,
} from './types.js';

const TOP_KEYS = ['$schema', 'controllers'];
const CONTROLLER_KEYS = ['name', 'socket', 'pci', 'type', 'requestQueues', 'queueSize', 'memoryBytes', 'hugepages'];
const HUGEPAGES = ['auto', 'require', 'never'] as const;

export function parseNativeJson(doc: JsonDocument, ctx: ParseContext): InitiatorConfig {
  const { source } = ctx;
  const at = (path: string) => whereIn(doc, source, path);
  const root = doc.value;
  if (!isObject(root)) fail(at(''), `expected an object with "controllers" (or SPDK's "subsystems"), got ${show(root)}`);
  for (const key of Object.keys(root)) {
    if (!TOP_KEYS.includes(key)) fail(at(childPath('', key)), `unknown key ${JSON.stringify(key)} (expected ${TOP_KEYS.join(', ')})`);
  }
  const list = root.controllers;
  if (list === undefined) fail(at(''), 'missing "controllers" (an array of controllers)');
  if (!Array.isArray(list)) fail(at('controllers'), `expected an array of controllers, got ${show(list)}`);

  const warnings: string[] = [];
  const names = new NameBook();
  // Given names first, so that defaults skip them wherever they appear in the list.
  list.forEach((entry, i) => {
    if (isObject(entry) && entry.name !== undefined) {
      const path = childPath(childPath('controllers', i), 'name');
      names.take(checkName(entry.name, at(path), 'name'), at(path), describe(at(path)));
    }
  });

  const controllers = list.map((entry, i): ControllerConfig => {
    const path = childPath('controllers', i);
    if (!isObject(entry)) fail(at(path), `expected a controller object, got ${show(entry)}`);
    return controller(entry, path);
  });

  function controller(entry: JsonObject, path: string): ControllerConfig {
    const field = (key: string) => at(childPath(path, key));
    for (const key of Object.keys(entry)) {
      if (!CONTROLLER_KEYS.includes(key)) {
        fail(field(key), `unknown key ${JSON.stringify(key)} (expected ${CONTROLLER_KEYS.join(', ')})`);
      }
    }
    let transport: ConfigTransport;
    if (entry.socket !== undefined && entry.pci !== undefined) {
      fail(at(path), 'give either "socket" or "pci", not both');
    } else if (entry.socket !== undefined) {
      if (typeof entry.socket !== 'string' || entry.socket === '') {
        fail(field('socket'), `socket must be the path of a vhost-user socket, got ${show(entry.socket)}`);
      }
      transport = { type: 'vhost-user', path: isAbsolute(entry.socket) ? entry.socket : resolve(ctx.cwd, entry.socket) };
    } else if (entry.pci !== undefined) {
      transport =
        entry.pci === 'all' ? { type: 'pci-all' } : { type: 'pci', address: checkPciAddress(entry.pci, field('pci'), 'pci') };
    } else {
      fail(at(path), 'missing "socket" (a vhost-user socket) or "pci" (a PCI address or "all")');
    }

    let deviceType: ConfigDeviceType = 'scsi';
    if (entry.type !== undefined) {
      if (entry.type !== 'scsi' && entry.type !== 'blk') fail(field('type'), `type must be "scsi" or "blk", got ${show(entry.type)}`);
      deviceType = entry.type;
    }
    const prefix = deviceType === 'blk' ? DEFAULT_BLK_NAME_PREFIX : DEFAULT_NAME_PREFIX;
    let name: string;
    if (typeof entry.name === 'string') name = entry.name;
    else name = transport.type === 'pci-all' ? prefix : names.next(prefix, describe(at(path)));

    const out: ControllerConfig = {
      name,
      transport,
      deviceType,
      requestQueues:
        entry.requestQueues === undefined
          ? DEFAULT_REQUEST_QUEUES
          : checkRequestQueues(entry.requestQueues, field('requestQueues'), 'requestQueues'),
      queueSize: entry.queueSize === undefined ? DEFAULT_QUEUE_SIZE : checkQueueSize(entry.queueSize, field('queueSize'), 'queueSize'),
    };
    if (entry.memoryBytes !== undefined) {
      const v = entry.memoryBytes;
      if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) {
        fail(field('memoryBytes'), `memoryBytes must be a positive integer, got ${show(v)}`);
      }
      out.memoryBytes = v;
    }
    if (entry.hugepages !== undefined) {
      const v = entry.hugepages;
      const known = HUGEPAGES.find((h) => h === v);
      if (known === undefined) fail(field('hugepages'), `hugepages must be "auto", "require" or "never", got ${show(v)}`);
      out.hugepages = known;
    }
    return out;
  }

  if (controllers.length === 0) warnings.push(`${source}: "controllers" is empty: no controller is configured`);
  return { controllers, warnings, format: 'native-json' };
}
