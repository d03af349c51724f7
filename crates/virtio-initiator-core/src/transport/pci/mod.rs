//! PCI transport: a virtio-scsi PCI function driven from userspace through VFIO.
//!
//! ```text
//! discover   sysfs: find virtio-scsi functions, move them to vfio-pci (driver_override)
//! vfio       container + group + device fd, config space, BARs, DMA map / unmap
//! virtio_pci the modern (virtio 1.x) interface: capabilities, common cfg, notify, device cfg
//! pagemap    physical addresses, for devices that bypass the IOMMU
//! ```
//!
//! Two ways a device reaches our memory:
//!
//! - **IOMMU mode** (the device offers VIRTIO_F_ACCESS_PLATFORM, e.g. QEMU `iommu_platform=on`):
//!   its DMA goes through the IOMMU, so the DMA pool is mapped into the VFIO container at IOVAs
//!   we pick inside the ranges the IOMMU reports, and descriptors carry those IOVAs.
//! - **Physical-address mode** (no ACCESS_PLATFORM, e.g. QEMU's vhost-user-scsi-pci): the
//!   device ignores the IOMMU and takes (guest-)physical addresses. The pool is then made of
//!   hugepages and *placed* at their physical addresses ([`IovaPlacement::Physical`]): each
//!   region of the pool is a physically contiguous run of hugepages whose IOVA equals its
//!   physical address, so the rings, the scsi layer and the allocator work unchanged and no
//!   buffer can straddle a physical discontinuity (buffers never span regions). The pages are
//!   also mapped through VFIO at IOVA = physical address, which pins them and means the device
//!   would still be right if it did translate, and their physical addresses are checked again
//!   after pinning. The price: the largest DMA buffer is the largest physically contiguous run
//!   (at least one 2 MiB hugepage), and the pool cannot grow after creation.
//!
//! [`IovaPlacement::Physical`]: crate::memory::IovaPlacement::Physical

pub mod discover;
pub mod pagemap;
pub mod vfio;
pub mod virtio_pci;

use std::fmt;
use std::io;
use std::str::FromStr;

pub use discover::{
    virtio_device_type, PciFunction, Sysfs, VirtioInterface, VIRTIO_ID_BLOCK, VIRTIO_ID_SCSI,
};
pub use vfio::{IovaRange, VfioPci};
pub use virtio_pci::{PciAccess, VirtioCaps, VirtioPciTransport};

/// The transport over a VFIO-assigned function.
pub type PciTransport = VirtioPciTransport<VfioPci>;

impl PciTransport {
    /// Opens the virtio-scsi function at `address` ("0000:00:03.0" or "00:03.0"), which must be
    /// bound to vfio-pci (see [`Sysfs::bind_vfio`]), and resets it.
    pub fn open(address: &str) -> Result<Self, PciError> {
        let address: PciAddress = address.parse()?;
        let sysfs = Sysfs::new();
        let function = sysfs.check_openable(address)?;
        let device = VfioPci::open(&sysfs, &function)?;
        VirtioPciTransport::new(device)
    }
}

/// A PCI function address: domain, bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{:x}", self.domain, self.bus, self.device, self.function)
    }
}

impl FromStr for PciAddress {
    type Err = PciError;

    /// Parses `DDDD:BB:DD.F` or `BB:DD.F` (domain 0), in hexadecimal.
    fn from_str(s: &str) -> Result<Self, PciError> {
        let bad = || PciError::InvalidAddress(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        let (domain, bus, rest) = match parts.as_slice() {
            [d, b, r] => (*d, *b, *r),
            [b, r] => ("0", *b, *r),
            _ => return Err(bad()),
        };
        let (dev, func) = rest.split_once('.').ok_or_else(bad)?;
        let hex = |t: &str, max_len: usize| -> Result<u32, PciError> {
            if t.is_empty() || t.len() > max_len || !t.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(t, 16).map_err(|_| bad())
        };
        let domain = hex(domain, 4)?;
        let bus = hex(bus, 2)?;
        let device = hex(dev, 2)?;
        let function = hex(func, 1)?;
        if device > 0x1f || function > 7 {
            return Err(bad());
        }
        Ok(PciAddress {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

/// Why a PCI function cannot be found, bound, opened or driven.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("'{0}' is not a PCI address (expected DDDD:BB:DD.F, e.g. 0000:00:03.0)")]
    InvalidAddress(String),
    #[error("no PCI device at {0}")]
    NoSuchDevice(PciAddress),
    #[error("{address} is not a virtio device (vendor {vendor:04x}, device {device:04x})")]
    NotVirtio { address: PciAddress, vendor: u16, device: u16 },
    #[error(
        "{address} is a virtio device but neither virtio-scsi (1af4:1004, 1af4:1048) nor virtio-blk \
         (1af4:1001, 1af4:1042): device id {device:04x}"
    )]
    NotVirtioStorage { address: PciAddress, device: u16 },
    #[error(
        "{0} has only the legacy virtio interface; a virtio 1.x (modern) interface is required \
         (QEMU: disable-modern=off)"
    )]
    LegacyOnly(PciAddress),
    #[error(
        "{address} is bound to {driver}, not to vfio-pci (bind it first, e.g. with bindVfioPci or \
         driver_override)"
    )]
    NotBoundToVfio { address: PciAddress, driver: String },
    #[error(
        "{0} has no IOMMU group: the system has no IOMMU enabled (boot with intel_iommu=on or \
         amd_iommu=on; in a VM, give it an emulated IOMMU)"
    )]
    NoIommu(PciAddress),
    #[error(
        "IOMMU group {group} of {address} also holds {others}; every device of the group must be \
         bound to vfio-pci (or have no driver) before one of them can be used"
    )]
    GroupNotViable { address: PciAddress, group: u32, others: String },
    #[error("{address} is in use: IOMMU group {group} is already open (by another process or controller)")]
    DeviceBusy { address: PciAddress, group: u32 },
    #[error("permission denied on {path}: {detail}")]
    Permission { path: String, detail: String },
    #[error("VFIO is not available: {0}")]
    VfioUnavailable(String),
    #[error("binding {address} to {driver} failed: {detail}")]
    BindFailed { address: PciAddress, driver: String, detail: String },
    #[error("VFIO {operation} failed for {address}: {detail}")]
    Vfio { address: PciAddress, operation: &'static str, detail: String },
    #[error("{address}: {detail}")]
    BadDevice { address: PciAddress, detail: String },
    #[error("IOVA range {iova:#x}+{size:#x} is outside the ranges the IOMMU can map ({ranges})")]
    IovaOutOfRange { iova: u64, size: u64, ranges: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl PciError {
    /// Wraps an I/O error on `path`, turning EACCES / EPERM into [`PciError::Permission`].
    pub(crate) fn io(path: impl Into<String>, source: io::Error) -> Self {
        let path = path.into();
        if source.kind() == io::ErrorKind::PermissionDenied {
            PciError::Permission { path, detail: format!("{source} (root or access to VFIO is needed)") }
        } else {
            PciError::Io { path, source }
        }
    }
}

#[cfg(test)]
mod tests;
