// Loads the napi addon and describes the fixed record layouts shared with it.
//
// The addon is loaded on first use rather than at import time, so that the SCSI helpers and the
// types of this package stay usable (and a missing binary is reported with a clear error at the
// point where a controller is opened).

import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

import type * as NativeModule from '../native/index.cjs';
import { platformNames } from './platform.js';
import { CompletionRecord, RESPONSE_REFUSED, SubmitRecord } from './records.js';

export type Native = typeof NativeModule;
export type NativeController = NativeModule.Controller;
export type NativeChannel = NativeModule.Channel;
export type NativeControllerInfo = NativeModule.ControllerInfo;
export type NativeControllerOptions = NativeModule.ControllerOptions;
export type NativeOpenFailure = NativeModule.OpenFailure;
export type NativeControllerEvent = NativeModule.ControllerEvent;
export type NativeLoadSpec = NativeModule.LoadSpec;
export type NativeLoadResult = NativeModule.LoadResult;

export class NativeLoadError extends Error {
  constructor(cause: unknown) {
    const why = cause instanceof Error ? cause.message : String(cause);
    super(`virtio-initiator: cannot load the native addon: ${why}`, { cause });
    this.name = 'NativeLoadError';
  }
}

/**
 * The addon of this machine's platform, from this checkout's build or the installed platform
 * package, opened directly: napi-rs's generated loader, the fallback, probes for the C library
 * and other platforms first, and even a plain `require` of the file costs a millisecond more
 * than opening it.
 */
function loadDirect(): Native | undefined {
  if (process.platform !== 'linux' || process.env.NAPI_RS_NATIVE_LIBRARY_PATH) return undefined;
  for (const platform of platformNames()) {
    const local = fileURLToPath(new URL(`../native/virtio-initiator.${platform}.node`, import.meta.url));
    const mod = open(local) ?? open(packaged(platform));
    if (mod !== undefined) return mod;
  }
  return undefined;
}

/** The addon in `file`; undefined when there is none, or it is not for this C library. */
function open(file: string | undefined): Native | undefined {
  if (file === undefined || !existsSync(file)) return undefined;
  const mod = { exports: {} as Native };
  try {
    process.dlopen(mod, file);
    return mod.exports;
  } catch {
    return undefined;
  }
}

/** The addon file of the installed platform package, if there is one. */
function packaged(platform: string): string | undefined {
  try {
    return fileURLToPath(import.meta.resolve(`virtio-initiator-${platform}`));
  } catch {
    return undefined;
  }
}

let loaded: Native | undefined;
let loadError: NativeLoadError | undefined;

/** The addon, loaded once. Throws NativeLoadError when it is missing or does not match. */
export function loadNative(): Native {
  if (loaded) return loaded;
  if (loadError) throw loadError;
  try {
    const mod = loadDirect() ?? (createRequire(import.meta.url)('../native/index.cjs') as Native);
    // The record layouts are compiled into both sides; a mismatch means a stale binary.
    if (
      mod.SUBMIT_RECORD_SIZE !== SubmitRecord.SIZE ||
      mod.COMPLETION_RECORD_SIZE !== CompletionRecord.SIZE ||
      mod.COMPLETION_SLOT_SIZE !== CompletionRecord.SLOT_SIZE ||
      mod.RESPONSE_REFUSED !== RESPONSE_REFUSED
    ) {
      throw new Error(
        `record layout ${mod.SUBMIT_RECORD_SIZE}/${mod.COMPLETION_RECORD_SIZE}/${mod.COMPLETION_SLOT_SIZE} does not ` +
          `match ${SubmitRecord.SIZE}/${CompletionRecord.SIZE}/${CompletionRecord.SLOT_SIZE} (rebuild with npm run build:napi)`,
      );
    }
    loaded = mod;
    return mod;
  } catch (e) {
    loadError = new NativeLoadError(e);
    throw loadError;
  }
}

/** Why the addon cannot be loaded, or undefined when it can. */
export function nativeUnavailableReason(): string | undefined {
  try {
    loadNative();
    return undefined;
  } catch (e) {
    return e instanceof Error ? e.message : String(e);
  }
}
