// A vhost-user socket cannot tell the device type behind it, so opening it as the wrong one
// fails in negotiation with a message about queues or the configuration space. The management
// surfaces add what to change, in their own words.

import { ConnectError } from './errors.js';

export type DeviceType = 'scsi' | 'blk';

/**
 * A hint for a vhost-user socket that was reached but could not be opened as `opened` (a
 * ConnectError without an errno: the device did not come up): " (opened as virtio-blk; if the
 * target is a virtio-scsi one, give --type scsi)". Worded as a condition, since other causes
 * fail the same way. Empty for any other failure: no socket, nobody listening, or a PCI
 * function (whose id tells its type, and a mismatch is named as such).
 */
export function deviceTypeHint(
  e: unknown,
  transport: 'vhost-user' | 'pci',
  opened: DeviceType,
  give: (other: DeviceType) => string,
): string {
  if (transport !== 'vhost-user' || !(e instanceof ConnectError) || e.errno !== undefined) return '';
  const other = opened === 'blk' ? 'scsi' : 'blk';
  return ` (opened as virtio-${opened}; if the target is a virtio-${other} one, give ${give(other)})`;
}
