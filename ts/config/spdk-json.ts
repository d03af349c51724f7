// SPDK's JSON configuration, as `save_config` writes it and `spdk_tgt --json` reads it:
// subsystems, each with a list of RPC calls. Only `bdev_virtio_attach_controller` (and its name
// before SPDK 19.07, `construct_virtio_dev`) concerns us; every other call and subsystem is
// skipped with a warning, so that a whole SPDK configuration can be handed over as it is.

import { isAbsolute, resolve } from 'node:path';

import { childPath, isObject, type JsonDocument, type JsonObject, type JsonValue, whereIn } from './json.js';
import {
  checkName,
  checkPciAddress,
  checkQueueSize,
  checkRequestQueues,
  type ConfigDeviceType,
  type ConfigTransport,
  type ControllerConfig,
  DEFAULT_QUEUE_SIZE,
  DEFAULT_REQUEST_QUEUES,
  describe,
  fail,
  type InitiatorConfig,
  NameBook,
  show,
} from './types.js';
import type { ParseContext } from './ini.js';

const ATTACH_METHODS = new Set(['bdev_virtio_attach_controller', 'construct_virtio_dev']);
/** The parameters SPDK's decoder for the method knows; it refused any other. */
const PARAMS = ['name', 'trtype', 'traddr', 'dev_type', 'vq_count', 'vq_size'] as const;

/** True when a parsed JSON document has SPDK's shape rather than ours. */
export function isSpdkJson(value: JsonValue): boolean {
  return isObject(value) && 'subsystems' in value;
}

export function parseSpdkJson(doc: JsonDocument, ctx: ParseContext): InitiatorConfig {
  const { source } = ctx;
  const at = (path: string) => whereIn(doc, source, path);
  const warnings: string[] = [];
  const controllers: ControllerConfig[] = [];
  const names = new NameBook();
  const root = doc.value as JsonObject;

  for (const key of Object.keys(root)) {
    if (key !== 'subsystems') warnings.push(`${describe(at(key))}: not part of an SPDK configuration: skipped`);
  }
  const subsystems = root.subsystems;
  if (!Array.isArray(subsystems)) fail(at('subsystems'), `expected an array of subsystems, got ${show(subsystems)}`);

  subsystems.forEach((sub, i) => {
    const subPath = childPath('subsystems', i);
    if (!isObject(sub)) fail(at(subPath), `expected a subsystem object, got ${show(sub)}`);
    if (typeof sub.subsystem !== 'string') {
      fail(at(childPath(subPath, 'subsystem')), `expected the subsystem name as a string, got ${show(sub.subsystem)}`);
    }
    if (sub.subsystem !== 'bdev') {
      warnings.push(`${describe(at(subPath))}: subsystem ${JSON.stringify(sub.subsystem)} is not about virtio: skipped`);
      return;
    }
    const configPath = childPath(subPath, 'config');
    // save_config writes null for a subsystem with nothing to configure.
    const config = sub.config ?? [];
    if (!Array.isArray(config)) fail(at(configPath), `expected an array of method calls, got ${show(config)}`);
    config.forEach((call, j) => {
      const callPath = childPath(configPath, j);
      if (!isObject(call)) fail(at(callPath), `expected a method call object, got ${show(call)}`);
      if (typeof call.method !== 'string') {
        fail(at(childPath(callPath, 'method')), `expected the method name as a string, got ${show(call.method)}`);
      }
      if (!ATTACH_METHODS.has(call.method)) {
        warnings.push(`${describe(at(callPath))}: method ${call.method} is not about virtio: skipped`);
        return;
      }
      controllers.push(attachCall(call, callPath));
    });
  });

  function attachCall(call: JsonObject, callPath: string): ControllerConfig {
    const paramsPath = childPath(callPath, 'params');
    const params = call.params;
    if (!isObject(params)) fail(at(paramsPath), `expected the parameters object, got ${show(params)}`);
    const field = (key: string) => at(childPath(paramsPath, key));
    for (const key of Object.keys(params)) {
      if (!(PARAMS as readonly string[]).includes(key)) {
        fail(field(key), `unknown parameter ${JSON.stringify(key)} (expected ${PARAMS.join(', ')})`);
      }
    }
    for (const key of ['name', 'trtype', 'traddr', 'dev_type'] as const) {
      if (params[key] === undefined) fail(at(paramsPath), `missing ${key}`);
      if (typeof params[key] !== 'string') fail(field(key), `${key} must be a string, got ${show(params[key])}`);
    }
    const name = checkName(params.name, field('name'), 'name');
    names.take(name, field('name'), describe(field('name')));

    const trtype = (params.trtype as string).toLowerCase();
    const traddr = params.traddr as string;
    let transport: ConfigTransport;
    if (trtype === 'user') {
      if (traddr === '') fail(field('traddr'), 'traddr must be the path of a vhost-user socket');
      transport = { type: 'vhost-user', path: isAbsolute(traddr) ? traddr : resolve(ctx.cwd, traddr) };
    } else if (trtype === 'pci') {
      transport = { type: 'pci', address: checkPciAddress(traddr, field('traddr'), 'traddr') };
    } else {
      fail(field('trtype'), `unknown trtype ${show(params.trtype)} (expected "user" or "pci")`);
    }

    const devType = (params.dev_type as string).toLowerCase();
    if (devType !== 'scsi' && devType !== 'blk') {
      fail(field('dev_type'), `unknown dev_type ${show(params.dev_type)} (expected "scsi" or "blk")`);
    }
    const deviceType: ConfigDeviceType = devType;
    const requestQueues =
      params.vq_count === undefined ? DEFAULT_REQUEST_QUEUES : checkRequestQueues(params.vq_count, field('vq_count'), 'vq_count');
    const queueSize = params.vq_size === undefined ? DEFAULT_QUEUE_SIZE : checkQueueSize(params.vq_size, field('vq_size'), 'vq_size');
    return { name, transport, deviceType, requestQueues, queueSize };
  }

  if (controllers.length === 0) warnings.push(`${source}: no bdev_virtio_attach_controller call: no controller is configured`);
  return { controllers, warnings, format: 'spdk-json' };
}
