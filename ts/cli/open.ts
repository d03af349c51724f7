// Opening the one controller that `scan` and `bench` are given with --socket or --pci (or the
// bundled target bench starts), as --type says.

import { Controller, type ControllerOptions } from '../controller.js';
import { type DeviceType, deviceTypeHint } from '../device-type.js';

export interface OpenArgs {
  socket: string | undefined;
  pci: string | undefined;
  type: DeviceType | undefined;
}

/**
 * Connects to `socket`, or opens the PCI function `pci`, as `type`. A socket that turns out to
 * serve the other device type fails with a message that names the --type to give.
 */
export async function openController(d: OpenArgs, options: Omit<ControllerOptions, 'type'>): Promise<Controller> {
  const opts: ControllerOptions = d.type !== undefined ? { ...options, type: d.type } : options;
  try {
    if (d.pci !== undefined) return await Controller.openPci(d.pci, opts);
    if (d.socket === undefined) throw new TypeError('openController needs a socket or a PCI address');
    return await Controller.connect(d.socket, opts);
  } catch (e) {
    const hint = deviceTypeHint(e, d.pci !== undefined ? 'pci' : 'vhost-user', d.type ?? 'scsi', (other) => `--type ${other}`);
    if (hint === '') throw e;
    throw new Error(`${e instanceof Error ? e.message : String(e)}${hint}`, { cause: e });
  }
}
