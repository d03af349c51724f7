// PCI functions for PCI mode: find virtio-scsi and virtio-blk functions, hand them to vfio-pci and back.
// Opening one is `Controller.openPci(address)`.

import { loadNative } from './native.js';
import type * as NativeModule from '../native/index.cjs';

/** A PCI address: DDDD:BB:DD.F, or BB:DD.F in domain 0 (groups: domain, bus, device, function). */
export const PCI_ADDRESS = /^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$/;

/** A virtio-scsi or virtio-blk PCI function as sysfs describes it (`deviceType` 'scsi' or 'blk'). */
export type PciDeviceInfo = NativeModule.PciDeviceInfo;

/**
 * Every virtio-scsi function (1af4:1004 transitional, 1af4:1048 modern) and virtio-blk function
 * (1af4:1001, 1af4:1042) with its driver and IOMMU group.
 */
export function listPciDevices(): PciDeviceInfo[] {
  return loadNative().listPciDevices();
}

/** Unbinds `address` ("0000:00:04.0") from its kernel driver and binds it to vfio-pci (root only). */
export function bindVfioPci(address: string): PciDeviceInfo {
  return loadNative().bindVfioPci(address);
}

/** Gives `address` back from vfio-pci to its kernel driver; refused while a controller has it open. */
export function unbindVfioPci(address: string): PciDeviceInfo {
  return loadNative().unbindVfioPci(address);
}
