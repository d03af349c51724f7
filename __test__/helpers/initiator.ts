// Shared set-up of the initiator tests: the addon requirement, a bundled target on fresh
// sockets in a private directory, and a controller connected to it.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { Controller, type ControllerOptions } from '../../ts/index.js';
import { nativeUnavailableReason } from '../../ts/native.js';
import { type Requirement, requireTargetBinary } from './env.js';
import { startTarget, type TargetOptions, type TargetProcess } from './target.js';

export const requireAddon: Requirement = () => {
  const why = nativeUnavailableReason();
  return why === undefined ? undefined : `${why} (npm run build:napi)`;
};

/** What the initiator tests against the bundled target need. */
export const initiatorRequirements: Requirement[] = [requireAddon, requireTargetBinary];

export interface TargetSetup {
  target: TargetProcess;
  dir: string;
  socket: string;
  control: string;
  /** Stops the target and removes the directory. */
  cleanup(): Promise<void>;
}

/** Starts the bundled target with a control socket, in a new temporary directory. */
export async function startTestTarget(
  opts: Omit<TargetOptions, 'socket' | 'control'> & { dir?: string },
): Promise<TargetSetup> {
  const dir = opts.dir ?? mkdtempSync(join(tmpdir(), 'vi-init-'));
  const socket = join(dir, 'vhost.sock');
  const control = join(dir, 'control.sock');
  let target: TargetProcess;
  try {
    target = await startTarget({ ...opts, socket, control });
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
  return {
    target,
    dir,
    socket,
    control,
    async cleanup() {
      await target.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Connects and scans; the memory pool stays small, as tests run side by side. */
export async function connectAndScan(setup: TargetSetup, options: ControllerOptions = {}): Promise<Controller> {
  const ctrl = await Controller.connect(setup.socket, { memoryBytes: 32 << 20, ...options });
  try {
    const { problems } = await ctrl.scan();
    if (problems.length > 0) {
      throw new Error(`scan problems: ${problems.map((p) => p.error.message).join('; ')}`);
    }
  } catch (e) {
    ctrl.close();
    throw e;
  }
  return ctrl;
}

/** A buffer whose every 4-byte word encodes its byte offset and a seed: misplaced data shows. */
export function pattern(bytes: number, seed: number): Buffer {
  const buf = Buffer.alloc(bytes);
  for (let off = 0; off + 4 <= bytes; off += 4) buf.writeUInt32LE((off ^ (seed * 0x9e3779b1)) >>> 0, off);
  return buf;
}
