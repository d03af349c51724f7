//! Finding virtio-scsi and virtio-blk PCI functions in sysfs, and moving them between their kernel driver and
//! vfio-pci through `driver_override` (which, unlike `new_id`, touches only the one function).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{PciAddress, PciError};

pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// Transitional virtio-scsi (legacy + modern interface).
pub const VIRTIO_SCSI_TRANSITIONAL: u16 = 0x1004;
/// Modern-only virtio-scsi: 0x1040 + device type 8.
pub const VIRTIO_SCSI_MODERN: u16 = 0x1048;
/// Transitional virtio-blk.
pub const VIRTIO_BLK_TRANSITIONAL: u16 = 0x1001;
/// Modern-only virtio-blk: 0x1040 + device type 2.
pub const VIRTIO_BLK_MODERN: u16 = 0x1042;
/// Virtio device types (virtio 1.2, 5): block and SCSI host.
pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const VIRTIO_ID_SCSI: u32 = 8;
/// Virtio PCI device ids: 0x1000..=0x103f transitional, 0x1040..=0x107f modern.
const VIRTIO_DEVICE_IDS: std::ops::RangeInclusive<u16> = 0x1000..=0x107f;

pub const VFIO_DRIVER: &str = "vfio-pci";
/// Drivers VFIO accepts on the other devices of a group.
const VFIO_FRIENDLY_DRIVERS: [&str; 2] = [VFIO_DRIVER, "pci-stub"];

/// The virtio device type (2 block, 8 SCSI, ...) a PCI id names: modern ids are 0x1040 plus
/// the type; of the transitional ids, those of the devices this driver knows.
pub fn virtio_device_type(vendor: u16, device: u16) -> Option<u32> {
    if vendor != VIRTIO_VENDOR {
        return None;
    }
    match device {
        VIRTIO_BLK_TRANSITIONAL => Some(VIRTIO_ID_BLOCK),
        VIRTIO_SCSI_TRANSITIONAL => Some(VIRTIO_ID_SCSI),
        d @ 0x1040..=0x107f => Some(u32::from(d - 0x1040)),
        _ => None,
    }
}

/// Which interfaces a virtio PCI function has, by its device id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioInterface {
    /// 0x1040.. ids: virtio 1.x only.
    Modern,
    /// 0x1000.. ids: legacy and (usually) modern; we use the modern one.
    Transitional,
}

/// A PCI function as sysfs describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciFunction {
    pub address: PciAddress,
    pub vendor: u16,
    pub device: u16,
    pub subsystem_vendor: u16,
    pub subsystem_device: u16,
    /// 24-bit class code.
    pub class: u32,
    /// Bound driver, e.g. "virtio-pci" or "vfio-pci".
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    /// NUMA node, when the platform has one for the device.
    pub numa_node: Option<u32>,
}

impl PciFunction {
    pub fn is_virtio(&self) -> bool {
        self.vendor == VIRTIO_VENDOR && VIRTIO_DEVICE_IDS.contains(&self.device)
    }

    pub fn is_virtio_scsi(&self) -> bool {
        self.virtio_device_type() == Some(VIRTIO_ID_SCSI)
    }

    /// The virtio device type its id names (see [`virtio_device_type`]).
    pub fn virtio_device_type(&self) -> Option<u32> {
        virtio_device_type(self.vendor, self.device)
    }

    /// A virtio-scsi or virtio-blk function: what this driver drives.
    pub fn is_virtio_storage(&self) -> bool {
        matches!(self.virtio_device_type(), Some(VIRTIO_ID_SCSI | VIRTIO_ID_BLOCK))
    }

    /// The virtio interface its id promises; `None` when it is not a virtio device.
    pub fn interface(&self) -> Option<VirtioInterface> {
        if !self.is_virtio() {
            None
        } else if self.device >= 0x1040 {
            Some(VirtioInterface::Modern)
        } else {
            Some(VirtioInterface::Transitional)
        }
    }

    /// Errors out unless this is a virtio-scsi or virtio-blk function.
    pub fn require_virtio_storage(&self) -> Result<(), PciError> {
        if !self.is_virtio() {
            return Err(PciError::NotVirtio {
                address: self.address,
                vendor: self.vendor,
                device: self.device,
            });
        }
        if !self.is_virtio_storage() {
            return Err(PciError::NotVirtioStorage { address: self.address, device: self.device });
        }
        Ok(())
    }

    pub fn bound_to_vfio(&self) -> bool {
        self.driver.as_deref() == Some(VFIO_DRIVER)
    }
}

/// The PCI part of sysfs, rooted at `/sys` (another root for tests).
#[derive(Clone, Debug)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self::new()
    }
}

impl Sysfs {
    pub fn new() -> Self {
        Sysfs { root: PathBuf::from("/sys") }
    }

    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        Sysfs { root: root.into() }
    }

    fn devices_dir(&self) -> PathBuf {
        self.root.join("bus/pci/devices")
    }

    /// The function's sysfs directory (what VFIO wants to find the group).
    pub fn device_dir(&self, address: PciAddress) -> PathBuf {
        self.devices_dir().join(address.to_string())
    }

    /// Describes the function at `address`.
    pub fn function(&self, address: PciAddress) -> Result<PciFunction, PciError> {
        let dir = self.device_dir(address);
        if !dir.exists() {
            return Err(PciError::NoSuchDevice(address));
        }
        let hex = |name: &str| -> Result<u32, PciError> {
            let path = dir.join(name);
            let text = fs::read_to_string(&path).map_err(|e| PciError::io(path.display().to_string(), e))?;
            let t = text.trim();
            u32::from_str_radix(t.trim_start_matches("0x"), 16).map_err(|_| PciError::BadDevice {
                address,
                detail: format!("{} holds '{t}', not a hexadecimal number", path.display()),
            })
        };
        let link_name = |name: &str| -> Option<String> {
            fs::read_link(dir.join(name)).ok()?.file_name()?.to_str().map(str::to_string)
        };
        let numa_node = fs::read_to_string(dir.join("numa_node"))
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .and_then(|n| u32::try_from(n).ok());
        Ok(PciFunction {
            address,
            vendor: hex("vendor")? as u16,
            device: hex("device")? as u16,
            subsystem_vendor: hex("subsystem_vendor").unwrap_or(0) as u16,
            subsystem_device: hex("subsystem_device").unwrap_or(0) as u16,
            class: hex("class").unwrap_or(0),
            driver: link_name("driver"),
            iommu_group: link_name("iommu_group").and_then(|g| g.parse().ok()),
            numa_node,
        })
    }

    /// Every PCI function, in address order. Entries that are not PCI addresses are skipped.
    pub fn functions(&self) -> Result<Vec<PciFunction>, PciError> {
        let dir = self.devices_dir();
        let entries = fs::read_dir(&dir).map_err(|e| PciError::io(dir.display().to_string(), e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| PciError::io(dir.display().to_string(), e))?;
            let Some(address) = entry.file_name().to_str().and_then(|n| n.parse::<PciAddress>().ok()) else {
                continue;
            };
            match self.function(address) {
                Ok(f) => out.push(f),
                // Hot-unplugged between readdir and now.
                Err(PciError::NoSuchDevice(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by_key(|f| f.address);
        Ok(out)
    }

    /// Every virtio-scsi (1af4:1004, 1af4:1048) and virtio-blk (1af4:1001, 1af4:1042) function,
    /// whatever driver it has.
    pub fn virtio_storage_functions(&self) -> Result<Vec<PciFunction>, PciError> {
        Ok(self.functions()?.into_iter().filter(PciFunction::is_virtio_storage).collect())
    }

    /// The other functions of an IOMMU group, with their drivers.
    pub fn group_members(&self, group: u32) -> Result<Vec<PciFunction>, PciError> {
        let dir = self.root.join(format!("kernel/iommu_groups/{group}/devices"));
        let entries = fs::read_dir(&dir).map_err(|e| PciError::io(dir.display().to_string(), e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| PciError::io(dir.display().to_string(), e))?;
            if let Some(address) = entry.file_name().to_str().and_then(|n| n.parse::<PciAddress>().ok()) {
                out.push(self.function(address)?);
            }
        }
        out.sort_by_key(|f| f.address);
        Ok(out)
    }

    /// Group members other than `address` whose drivers keep VFIO from using the group, as
    /// "0000:00:04.0 (virtio-pci), ...". Bridges are fine with any driver, as for VFIO.
    pub fn group_blockers(&self, address: PciAddress, group: u32) -> Result<String, PciError> {
        let blockers: Vec<String> = self
            .group_members(group)?
            .into_iter()
            .filter(|f| f.address != address)
            .filter(|f| !self.is_bridge(f.address))
            .filter_map(|f| match f.driver {
                Some(d) if !VFIO_FRIENDLY_DRIVERS.contains(&d.as_str()) => {
                    Some(format!("{} ({d})", f.address))
                }
                _ => None,
            })
            .collect();
        Ok(blockers.join(", "))
    }

    fn is_bridge(&self, address: PciAddress) -> bool {
        // Header type (config byte 0x0e, low 7 bits) 1 or 2: PCI or CardBus bridge.
        match fs::read(self.device_dir(address).join("config")) {
            Ok(cfg) if cfg.len() > 0x0e => cfg[0x0e] & 0x7f != 0,
            _ => false,
        }
    }

    /// Checks that `address` is a virtio-scsi or virtio-blk function bound to vfio-pci, with an IOMMU group;
    /// returns its description.
    pub fn check_openable(&self, address: PciAddress) -> Result<PciFunction, PciError> {
        let f = self.function(address)?;
        f.require_virtio_storage()?;
        if f.iommu_group.is_none() {
            return Err(PciError::NoIommu(address));
        }
        match &f.driver {
            Some(d) if d == VFIO_DRIVER => Ok(f),
            Some(d) => Err(PciError::NotBoundToVfio { address, driver: d.clone() }),
            None => Err(PciError::NotBoundToVfio { address, driver: "no driver".into() }),
        }
    }

    /// Hands the virtio-scsi or virtio-blk function at `address` to vfio-pci: sets `driver_override`,
    /// unbinds it from its current driver and asks the kernel to probe it again. Returns the
    /// new state. Nothing happens when it already is bound to vfio-pci.
    pub fn bind_vfio(&self, address: PciAddress) -> Result<PciFunction, PciError> {
        let f = self.function(address)?;
        f.require_virtio_storage()?;
        if f.iommu_group.is_none() {
            return Err(PciError::NoIommu(address));
        }
        if f.bound_to_vfio() {
            return Ok(f);
        }
        if !self.root.join("bus/pci/drivers").join(VFIO_DRIVER).exists() {
            return Err(PciError::BindFailed {
                address,
                driver: VFIO_DRIVER.into(),
                detail: "the vfio-pci driver is not loaded (modprobe vfio-pci)".into(),
            });
        }
        let dir = self.device_dir(address);
        self.write(&dir.join("driver_override"), VFIO_DRIVER)?;
        if f.driver.is_some() {
            self.write(&dir.join("driver/unbind"), &address.to_string())?;
        }
        self.probe(address)?;
        let now = self.function(address)?;
        if !now.bound_to_vfio() {
            return Err(PciError::BindFailed {
                address,
                driver: VFIO_DRIVER.into(),
                detail: format!(
                    "after the probe it is bound to {} (see the kernel log)",
                    now.driver.as_deref().unwrap_or("no driver")
                ),
            });
        }
        Ok(now)
    }

    /// Gives the function back to the kernel: unbinds it from vfio-pci, clears
    /// `driver_override` and probes it, so virtio-pci takes it again. Returns the new state.
    pub fn unbind_vfio(&self, address: PciAddress) -> Result<PciFunction, PciError> {
        let f = self.function(address)?;
        let dir = self.device_dir(address);
        if f.bound_to_vfio() {
            // vfio-pci's unbind waits until every user lets the device go: with the group open
            // in this very process it would wait forever.
            if let Some(group) = f.iommu_group.filter(|&g| process_holds_group(g)) {
                return Err(PciError::DeviceBusy { address, group });
            }
            self.write(&dir.join("driver/unbind"), &address.to_string())?;
        }
        // A lone newline clears the override.
        self.write(&dir.join("driver_override"), "\n")?;
        if self.function(address)?.driver.is_none() {
            self.probe(address)?;
        }
        self.function(address)
    }

    fn probe(&self, address: PciAddress) -> Result<(), PciError> {
        match self.write(&self.root.join("bus/pci/drivers_probe"), &address.to_string()) {
            // No driver wants it: not an error for the probe itself; the caller checks.
            Err(PciError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENODEV) => Ok(()),
            other => other,
        }
    }

    fn write(&self, path: &Path, value: &str) -> Result<(), PciError> {
        fs::write(path, value).map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => PciError::Permission {
                path: path.display().to_string(),
                detail: format!("{e} (binding drivers needs root)"),
            },
            _ => PciError::Io { path: path.display().to_string(), source: e },
        })
    }
}

/// Whether this process has `/dev/vfio/<group>` open (an open controller on the device).
fn process_holds_group(group: u32) -> bool {
    let node = PathBuf::from(format!("/dev/vfio/{group}"));
    fs::read_dir("/proc/self/fd")
        .map(|entries| entries.flatten().any(|e| fs::read_link(e.path()).is_ok_and(|target| target == node)))
        .unwrap_or(false)
}
