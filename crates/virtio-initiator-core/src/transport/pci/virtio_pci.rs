//! The modern virtio PCI transport (virtio 1.2, section 4.1): vendor capabilities locate the
//! common configuration, notification, ISR and device configuration structures in the BARs;
//! the common configuration drives the status handshake, features and queue setup.
//!
//! The transport is written against [`PciAccess`], so the same code drives a VFIO-assigned
//! function and, in tests, an emulated one.

use std::thread::sleep;
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::vfio::{format_ranges, IovaRange};
use super::{pagemap, PciAddress, PciError};
use crate::memory::{IovaPlacement, PhysResolver, PoolConfig, Region, HUGE_PAGE_SIZE};
use crate::transport::{
    Notifier, QueueHandle, Result as TransportResult, RingAddresses, Transport, TransportError,
};

// PCI configuration space.
const PCI_VENDOR_ID: usize = 0x00;
const PCI_DEVICE_ID: usize = 0x02;
const PCI_COMMAND: u64 = 0x04;
const PCI_STATUS: usize = 0x06;
const PCI_CAPABILITY_LIST: usize = 0x34;
const PCI_STATUS_CAP_LIST: u16 = 0x10;
const PCI_COMMAND_MEMORY: u16 = 0x0002;
const PCI_COMMAND_MASTER: u16 = 0x0004;
const PCI_COMMAND_INTX_DISABLE: u16 = 0x0400;
const PCI_CAP_ID_VENDOR: u8 = 0x09;
/// Standard configuration header; capabilities live after it.
const PCI_STD_HEADER: usize = 0x40;
const PCI_CONFIG_BYTES: usize = 256;

// virtio_pci_cap.cfg_type
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

// struct virtio_pci_common_cfg
pub const COMMON_DFSELECT: u64 = 0x00;
pub const COMMON_DF: u64 = 0x04;
pub const COMMON_GFSELECT: u64 = 0x08;
pub const COMMON_GF: u64 = 0x0c;
pub const COMMON_MSIX: u64 = 0x10;
pub const COMMON_NUMQ: u64 = 0x12;
pub const COMMON_STATUS: u64 = 0x14;
pub const COMMON_CFGGENERATION: u64 = 0x15;
pub const COMMON_Q_SELECT: u64 = 0x16;
pub const COMMON_Q_SIZE: u64 = 0x18;
pub const COMMON_Q_MSIX: u64 = 0x1a;
pub const COMMON_Q_ENABLE: u64 = 0x1c;
pub const COMMON_Q_NOFF: u64 = 0x1e;
pub const COMMON_Q_DESC: u64 = 0x20;
pub const COMMON_Q_DRIVER: u64 = 0x28;
pub const COMMON_Q_DEVICE: u64 = 0x30;
/// Bytes of the common configuration structure we use.
const COMMON_CFG_BYTES: u32 = 0x38;

// Device status bits.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// MSI-X vector meaning "none": we poll.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;

/// How long a device may take to finish a reset.
const RESET_TIMEOUT: Duration = Duration::from_secs(2);
/// Region limit for a pool behind an IOMMU (it only grows by explicit request).
const IOMMU_MAX_REGIONS: usize = 64;
/// Region limit for a physically placed pool: one per contiguous run of hugepages.
const PHYSICAL_MAX_REGIONS: usize = 4096;

/// What the virtio PCI transport needs of a PCI function. Register accesses are made with the
/// width of the buffer (1, 2 or 4 bytes), as the device requires.
pub trait PciAccess: Send {
    fn address(&self) -> PciAddress;
    fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), PciError>;
    fn config_write(&self, offset: u64, data: &[u8]) -> Result<(), PciError>;
    /// Size of a BAR, `None` when it is not implemented.
    fn bar_size(&self, bar: u8) -> Option<u64>;
    fn bar_read(&self, bar: u8, offset: u64, buf: &mut [u8]) -> Result<(), PciError>;
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) -> Result<(), PciError>;
    /// A doorbell writing `queue` at `offset` of `bar`.
    fn notifier(&self, bar: u8, offset: u64, queue: u16) -> Result<Notifier, PciError>;
    /// IOVA ranges the IOMMU can map; empty when it did not say.
    fn iova_ranges(&self) -> &[IovaRange];
    /// Lets the device access `size` bytes at `host` through IOVA `iova`.
    ///
    /// # Safety
    /// `host..host + size` must stay mapped until [`PciAccess::dma_unmap`] of the same range
    /// (or until `self` is dropped), and while mapped it may change at any time.
    unsafe fn dma_map(&mut self, iova: u64, size: u64, host: *mut u8) -> Result<(), PciError>;
    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), PciError>;
}

/// Where one virtio structure lives: `length` bytes at `offset` of BAR `bar`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapWindow {
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
}

/// The virtio vendor capabilities of a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCaps {
    pub common: CapWindow,
    pub notify: CapWindow,
    pub notify_off_multiplier: u32,
    pub isr: CapWindow,
    /// Devices without configuration fields may have none.
    pub device: Option<CapWindow>,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Walks the capability list of a configuration space (at least the 256-byte header) and finds
/// the virtio structures. The first capability of each type wins, as the spec asks; ones the
/// driver cannot use (reserved BAR numbers, short capabilities) are skipped.
pub fn parse_caps(address: PciAddress, cfg: &[u8]) -> Result<VirtioCaps, PciError> {
    let bad = |detail: String| PciError::BadDevice { address, detail };
    if cfg.len() < PCI_STD_HEADER {
        return Err(bad(format!("configuration space of {} bytes is too short", cfg.len())));
    }
    let (mut common, mut notify, mut isr, mut device) = (None, None, None, None);
    let mut seen_virtio = false;
    if le16(cfg, PCI_STATUS) & PCI_STATUS_CAP_LIST != 0 {
        let mut ptr = (cfg[PCI_CAPABILITY_LIST] & 0xfc) as usize;
        let mut hops = 0;
        while ptr != 0 {
            if ptr < PCI_STD_HEADER || ptr + 2 > cfg.len() {
                return Err(bad(format!("capability list points to {ptr:#x}, outside the capability area")));
            }
            hops += 1;
            if hops > (PCI_CONFIG_BYTES - PCI_STD_HEADER) / 4 {
                return Err(bad("capability list loops".into()));
            }
            let (id, next) = (cfg[ptr], (cfg[ptr + 1] & 0xfc) as usize);
            if id == PCI_CAP_ID_VENDOR && ptr + 16 <= cfg.len() {
                let cap_len = cfg[ptr + 2] as usize;
                let (cfg_type, bar) = (cfg[ptr + 3], cfg[ptr + 4]);
                let window = CapWindow { bar, offset: le32(cfg, ptr + 8), length: le32(cfg, ptr + 12) };
                let usable = cap_len >= 16 && ptr + cap_len <= cfg.len() && bar <= 5;
                if usable {
                    match cfg_type {
                        VIRTIO_PCI_CAP_COMMON_CFG => {
                            seen_virtio = true;
                            common.get_or_insert(window);
                        }
                        VIRTIO_PCI_CAP_NOTIFY_CFG if cap_len >= 20 => {
                            seen_virtio = true;
                            notify.get_or_insert((window, le32(cfg, ptr + 16)));
                        }
                        VIRTIO_PCI_CAP_ISR_CFG => {
                            seen_virtio = true;
                            isr.get_or_insert(window);
                        }
                        VIRTIO_PCI_CAP_DEVICE_CFG => {
                            seen_virtio = true;
                            device.get_or_insert(window);
                        }
                        _ => {}
                    }
                }
            }
            ptr = next;
        }
    }
    if !seen_virtio {
        return Err(PciError::LegacyOnly(address));
    }
    let missing = |what: &str| bad(format!("no virtio {what} capability"));
    let common = common.ok_or_else(|| missing("common configuration"))?;
    let (notify, notify_off_multiplier) = notify.ok_or_else(|| missing("notification"))?;
    let isr = isr.ok_or_else(|| missing("ISR"))?;
    if common.length < COMMON_CFG_BYTES || common.offset % 4 != 0 {
        return Err(bad(format!("common configuration window {common:?} is too small or misaligned")));
    }
    if notify.offset % 2 != 0 || notify_off_multiplier % 2 != 0 || notify.length < 2 {
        return Err(bad(format!(
            "notification window {notify:?} (multiplier {notify_off_multiplier}) is misaligned"
        )));
    }
    Ok(VirtioCaps { common, notify, notify_off_multiplier, isr, device })
}

/// A 2 MiB-aligned IOVA for a pool of `size` bytes inside the IOMMU's ranges: 4 GiB when it
/// fits there (what the rest of the code uses by default), otherwise the lowest fitting start
/// in the largest range. `None` when no range can hold it.
pub fn choose_iova_base(ranges: &[IovaRange], size: u64) -> Option<u64> {
    let need = size.max(1).checked_next_multiple_of(HUGE_PAGE_SIZE)?;
    let preferred = PoolConfig::DEFAULT_IOVA_BASE;
    if ranges.is_empty() || ranges.iter().any(|r| r.contains(preferred, need)) {
        return Some(preferred);
    }
    let mut by_size: Vec<&IovaRange> = ranges.iter().collect();
    by_size.sort_by_key(|r| std::cmp::Reverse(r.end - r.start));
    by_size.into_iter().find_map(|r| {
        // IOVA 0 is legal but looks like a null pointer in every dump: start above it.
        let start = r.start.max(HUGE_PAGE_SIZE).checked_next_multiple_of(HUGE_PAGE_SIZE)?;
        r.contains(start, need).then_some(start)
    })
}

/// A region of the pool as the device was given it.
struct Mapped {
    /// Keeps the memory mapped in this process while the device may access it.
    region: Region,
    /// Mapped through VFIO (and so to be unmapped).
    dma: bool,
}

/// The modern virtio PCI transport over a PCI function.
pub struct VirtioPciTransport<D: PciAccess> {
    dev: D,
    caps: VirtioCaps,
    /// The virtio device type its PCI id names.
    device_type: Option<u32>,
    num_queues: u16,
    /// Features acknowledged with FEATURES_OK.
    acked: Option<u64>,
    started: bool,
    resolver: PhysResolver,
    // After `dev`: the memory outlives the device's access to it.
    mapped: Vec<Mapped>,
}

impl<D: PciAccess> VirtioPciTransport<D> {
    /// Checks the function, finds its virtio structures, turns on memory decoding and bus
    /// mastering, resets the device and announces the driver (ACKNOWLEDGE, DRIVER).
    pub fn new(dev: D) -> Result<Self, PciError> {
        let address = dev.address();
        let mut cfg = [0u8; PCI_CONFIG_BYTES];
        dev.config_read(0, &mut cfg)?;
        let (vendor, device) = (le16(&cfg, PCI_VENDOR_ID), le16(&cfg, PCI_DEVICE_ID));
        if vendor != super::discover::VIRTIO_VENDOR || !(0x1000..=0x107f).contains(&device) {
            return Err(PciError::NotVirtio { address, vendor, device });
        }
        let caps = parse_caps(address, &cfg)?;
        let windows = [Some(caps.common), Some(caps.notify), Some(caps.isr), caps.device];
        for w in windows.into_iter().flatten() {
            let fits =
                dev.bar_size(w.bar).is_some_and(|size| u64::from(w.offset) + u64::from(w.length) <= size);
            if !fits {
                return Err(PciError::BadDevice {
                    address,
                    detail: format!("virtio structure {w:?} lies outside BAR{}", w.bar),
                });
            }
        }
        // Memory decoding for the BARs, bus mastering for DMA, and no INTx: we poll, and an
        // interrupt line nobody handles could get a shared line disabled.
        let mut cmd = [0u8; 2];
        dev.config_read(PCI_COMMAND, &mut cmd)?;
        let cmd =
            u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE;
        dev.config_write(PCI_COMMAND, &cmd.to_le_bytes())?;

        let mut t = VirtioPciTransport {
            dev,
            caps,
            device_type: super::discover::virtio_device_type(vendor, device),
            num_queues: 0,
            acked: None,
            started: false,
            resolver: pagemap::resolve,
            mapped: Vec::new(),
        };
        t.restart()?;
        debug!("{address}: virtio-pci {caps:?}, {} virtqueues", t.num_queues);
        Ok(t)
    }

    /// Resets the device and takes it to the point where features are negotiated.
    fn restart(&mut self) -> Result<(), PciError> {
        self.reset_device()?;
        self.acked = None;
        self.set_status(STATUS_ACKNOWLEDGE)?;
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)?;
        self.write16(COMMON_MSIX, VIRTIO_MSI_NO_VECTOR)?;
        self.num_queues = self.read16(COMMON_NUMQ)?;
        Ok(())
    }

    /// Finds physical addresses with `resolver` instead of `/proc/self/pagemap` (tests).
    pub fn with_resolver(mut self, resolver: PhysResolver) -> Self {
        self.resolver = resolver;
        self
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    pub fn caps(&self) -> &VirtioCaps {
        &self.caps
    }

    /// Whether the device takes physical addresses (set once the features are): it did not
    /// negotiate VIRTIO_F_ACCESS_PLATFORM, so it bypasses the IOMMU.
    pub fn physical_addresses(&self) -> Option<bool> {
        self.acked.map(|f| f & VIRTIO_F_ACCESS_PLATFORM == 0)
    }

    fn common_rw(&self, offset: u64, len: usize) -> (u8, u64) {
        debug_assert!(offset + len as u64 <= u64::from(COMMON_CFG_BYTES));
        (self.caps.common.bar, u64::from(self.caps.common.offset) + offset)
    }

    fn read8(&self, offset: u64) -> Result<u8, PciError> {
        let (bar, at) = self.common_rw(offset, 1);
        let mut b = [0u8; 1];
        self.dev.bar_read(bar, at, &mut b)?;
        Ok(b[0])
    }

    fn read16(&self, offset: u64) -> Result<u16, PciError> {
        let (bar, at) = self.common_rw(offset, 2);
        let mut b = [0u8; 2];
        self.dev.bar_read(bar, at, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    fn read32(&self, offset: u64) -> Result<u32, PciError> {
        let (bar, at) = self.common_rw(offset, 4);
        let mut b = [0u8; 4];
        self.dev.bar_read(bar, at, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn write8(&self, offset: u64, v: u8) -> Result<(), PciError> {
        let (bar, at) = self.common_rw(offset, 1);
        self.dev.bar_write(bar, at, &[v])
    }

    fn write16(&self, offset: u64, v: u16) -> Result<(), PciError> {
        let (bar, at) = self.common_rw(offset, 2);
        self.dev.bar_write(bar, at, &v.to_le_bytes())
    }

    fn write32(&self, offset: u64, v: u32) -> Result<(), PciError> {
        let (bar, at) = self.common_rw(offset, 4);
        self.dev.bar_write(bar, at, &v.to_le_bytes())
    }

    /// 64-bit fields are written as two 32-bit halves, low first.
    fn write64(&self, offset: u64, v: u64) -> Result<(), PciError> {
        self.write32(offset, v as u32)?;
        self.write32(offset + 4, (v >> 32) as u32)
    }

    fn status(&self) -> Result<u8, PciError> {
        self.read8(COMMON_STATUS)
    }

    fn set_status(&self, status: u8) -> Result<(), PciError> {
        self.write8(COMMON_STATUS, status)
    }

    /// Writes 0 to the status and waits until the device reads back 0: only then has it
    /// stopped using the rings.
    fn reset_device(&mut self) -> Result<(), PciError> {
        self.set_status(0)?;
        let start = Instant::now();
        let mut pause = Duration::from_micros(10);
        loop {
            if self.status()? == 0 {
                self.started = false;
                return Ok(());
            }
            if start.elapsed() > RESET_TIMEOUT {
                return Err(PciError::BadDevice {
                    address: self.dev.address(),
                    detail: format!("device did not complete its reset within {RESET_TIMEOUT:?}"),
                });
            }
            sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }

    fn select_queue(&self, index: u16) -> Result<(), PciError> {
        self.write16(COMMON_Q_SELECT, index)
    }

    fn map_region(&mut self, region: &Region) -> Result<(), PciError> {
        let address = self.dev.address();
        let ranges = self.dev.iova_ranges();
        let in_range = ranges.is_empty() || ranges.iter().any(|r| r.contains(region.iova, region.size));
        let physical = self.physical_addresses().unwrap_or(false);
        if !physical && !in_range {
            return Err(PciError::IovaOutOfRange {
                iova: region.iova,
                size: region.size,
                ranges: format_ranges(ranges),
            });
        }
        // In physical mode the IOVA is the physical address: mapping it 1:1 pins the pages
        // (and would even be right for a device that translated after all). Physical memory
        // outside the IOMMU's ranges cannot be mapped; hugepages are not swapped, so it is
        // still usable.
        let dma = in_range;
        if dma {
            // SAFETY: `region` is a mapping of the DMA pool that we keep (a clone in
            // `self.mapped`) until after it is unmapped again; all access to pool memory goes
            // through raw pointers or volatile copies.
            unsafe { self.dev.dma_map(region.iova, region.size, region.host_addr as *mut u8)? };
        }
        let result = if physical { self.verify_physical(region) } else { Ok(()) };
        self.mapped.push(Mapped { region: region.clone(), dma });
        result.map_err(|detail| PciError::BadDevice { address, detail })
    }

    /// Checks that every hugepage of a physically placed region still is where its IOVA says
    /// (pinning may migrate pages out of a movable zone before it pins them).
    fn verify_physical(&self, region: &Region) -> Result<(), String> {
        if !region.hugepages || region.size % HUGE_PAGE_SIZE != 0 {
            return Err(format!("region at {:#x} is not made of hugepages", region.iova));
        }
        let pages = (region.size / HUGE_PAGE_SIZE) as usize;
        let pa = (self.resolver)(region.host_addr, HUGE_PAGE_SIZE, pages)
            .map_err(|e| format!("cannot check the physical address of DMA memory: {e}"))?;
        for (i, &p) in pa.iter().enumerate() {
            let expected = region.iova + i as u64 * HUGE_PAGE_SIZE;
            if p != expected {
                return Err(format!(
                    "hugepage {i} of the region at {:#x} moved to {p:#x} while being pinned",
                    region.iova
                ));
            }
        }
        Ok(())
    }

    fn unmap_all(&mut self) -> Result<(), PciError> {
        let mut first_error = None;
        for m in std::mem::take(&mut self.mapped) {
            if m.dma {
                if let Err(e) = self.dev.dma_unmap(m.region.iova, m.region.size) {
                    warn!("{e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl<D: PciAccess> Transport for VirtioPciTransport<D> {
    fn device_features(&mut self) -> TransportResult<u64> {
        self.write32(COMMON_DFSELECT, 0)?;
        let lo = self.read32(COMMON_DF)?;
        self.write32(COMMON_DFSELECT, 1)?;
        let hi = self.read32(COMMON_DF)?;
        Ok(u64::from(hi) << 32 | u64::from(lo))
    }

    fn set_features(&mut self, features: u64) -> TransportResult<()> {
        let offered = self.device_features()?;
        if features & !offered != 0 {
            return Err(TransportError::FeaturesRejected(features & !offered));
        }
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err(PciError::BadDevice {
                address: self.dev.address(),
                detail: "device does not offer VIRTIO_F_VERSION_1 on its modern interface".into(),
            }
            .into());
        }
        // The modern interface requires VERSION_1 from the driver too.
        let features = features | VIRTIO_F_VERSION_1;
        self.write32(COMMON_GFSELECT, 0)?;
        self.write32(COMMON_GF, features as u32)?;
        self.write32(COMMON_GFSELECT, 1)?;
        self.write32(COMMON_GF, (features >> 32) as u32)?;
        let status = self.status()?;
        self.set_status(status | STATUS_FEATURES_OK)?;
        if self.status()? & STATUS_FEATURES_OK == 0 {
            self.set_status(status | STATUS_FAILED)?;
            return Err(TransportError::FeaturesRejected(features));
        }
        self.acked = Some(features);
        debug!(
            "{}: features {features:#x} accepted; {}",
            self.dev.address(),
            if features & VIRTIO_F_ACCESS_PLATFORM != 0 {
                "DMA through the IOMMU"
            } else {
                "the device takes physical addresses"
            }
        );
        Ok(())
    }

    fn queue_count(&mut self) -> TransportResult<Option<u16>> {
        Ok(Some(self.num_queues))
    }

    fn max_queue_size(&mut self, index: u16) -> TransportResult<Option<u16>> {
        if index >= self.num_queues {
            return Ok(Some(0));
        }
        self.select_queue(index)?;
        Ok(Some(self.read16(COMMON_Q_SIZE)?))
    }

    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> TransportResult<()> {
        let window =
            self.caps.device.ok_or(TransportError::Unsupported("a device configuration structure"))?;
        let address = self.dev.address();
        if u64::from(offset) + buf.len() as u64 > u64::from(window.length) {
            return Err(PciError::BadDevice {
                address,
                detail: format!(
                    "configuration read of {} bytes at {offset} is beyond its {} bytes",
                    buf.len(),
                    window.length
                ),
            }
            .into());
        }
        // The generation counter tells whether the device changed the fields while we read.
        for _ in 0..100 {
            let generation = self.read8(COMMON_CFGGENERATION)?;
            let mut i = 0;
            while i < buf.len() {
                let pos = offset as usize + i;
                let width = match (pos % 4, pos % 2, buf.len() - i) {
                    (0, _, n) if n >= 4 => 4,
                    (_, 0, n) if n >= 2 => 2,
                    _ => 1,
                };
                self.dev.bar_read(
                    window.bar,
                    u64::from(window.offset) + pos as u64,
                    &mut buf[i..i + width],
                )?;
                i += width;
            }
            if self.read8(COMMON_CFGGENERATION)? == generation {
                return Ok(());
            }
        }
        Err(PciError::BadDevice { address, detail: "device configuration keeps changing while read".into() }
            .into())
    }

    fn pool_config(&mut self, config: PoolConfig) -> TransportResult<PoolConfig> {
        let physical = self.physical_addresses().ok_or(TransportError::Unsupported(
            "choosing DMA addresses before the features are negotiated",
        ))?;
        if physical {
            if config.hugepages == crate::memory::HugePages::Never {
                return Err(TransportError::Unsupported(
                    "a DMA pool without hugepages: it does not offer VIRTIO_F_ACCESS_PLATFORM, so it \
                     bypasses the IOMMU and takes physical addresses",
                ));
            }
            return Ok(config
                .hugepages(crate::memory::HugePages::Require)
                .placement(IovaPlacement::Physical(self.resolver))
                .max_regions(PHYSICAL_MAX_REGIONS));
        }
        let ranges = self.dev.iova_ranges();
        let base = choose_iova_base(ranges, config.size).ok_or_else(|| PciError::IovaOutOfRange {
            iova: PoolConfig::DEFAULT_IOVA_BASE,
            size: config.size,
            ranges: format_ranges(ranges),
        })?;
        Ok(config.iova_base(base).max_regions(IOMMU_MAX_REGIONS))
    }

    fn set_memory(&mut self, regions: &[Region]) -> TransportResult<()> {
        self.unmap_all()?;
        for r in regions {
            self.map_region(r)?;
        }
        Ok(())
    }

    fn add_memory(&mut self, region: &Region) -> TransportResult<()> {
        Ok(self.map_region(region)?)
    }

    fn setup_queue(&mut self, index: u16, rings: &RingAddresses) -> TransportResult<QueueHandle> {
        let err = |detail: String| TransportError::Queue { index, detail };
        if index >= self.num_queues {
            return Err(err(format!("the device has only {} virtqueues", self.num_queues)));
        }
        self.select_queue(index)?;
        let max = self.read16(COMMON_Q_SIZE)?;
        if max == 0 {
            return Err(err("not available on the device".into()));
        }
        if rings.size == 0 || rings.size > max || !rings.size.is_power_of_two() {
            return Err(err(format!("size {} is not a power of two up to the device's {max}", rings.size)));
        }
        self.write16(COMMON_Q_SIZE, rings.size)?;
        self.write16(COMMON_Q_MSIX, VIRTIO_MSI_NO_VECTOR)?;
        self.write64(COMMON_Q_DESC, rings.desc_iova)?;
        self.write64(COMMON_Q_DRIVER, rings.avail_iova)?;
        self.write64(COMMON_Q_DEVICE, rings.used_iova)?;
        let notify_off = self.read16(COMMON_Q_NOFF)?;
        let n = self.caps.notify;
        let rel = u64::from(notify_off) * u64::from(self.caps.notify_off_multiplier);
        if rel + 2 > u64::from(n.length) {
            return Err(err(format!(
                "notify offset {notify_off} x {} is outside the {}-byte notification area",
                self.caps.notify_off_multiplier, n.length
            )));
        }
        // Everything is set: only now may the queue be enabled.
        self.write16(COMMON_Q_ENABLE, 1)?;
        let notifier = self.dev.notifier(n.bar, u64::from(n.offset) + rel, index)?;
        Ok(QueueHandle { notifier, interrupt: None })
    }

    fn start(&mut self) -> TransportResult<()> {
        let status = self.status()?;
        self.set_status(status | STATUS_DRIVER_OK)?;
        let now = self.status()?;
        if now & STATUS_DEVICE_NEEDS_RESET != 0 || now & STATUS_DRIVER_OK == 0 {
            return Err(PciError::BadDevice {
                address: self.dev.address(),
                detail: format!("device did not start (status {now:#04x})"),
            }
            .into());
        }
        self.started = true;
        Ok(())
    }

    fn reset(&mut self) -> TransportResult<()> {
        Ok(self.reset_device()?)
    }

    fn reinit(&mut self) -> TransportResult<()> {
        Ok(self.restart()?)
    }

    fn check_alive(&mut self) -> TransportResult<()> {
        let address = self.dev.address();
        let status = self
            .status()
            .map_err(|e| TransportError::Disconnected(format!("{address} cannot be read: {e}")))?;
        let gone = |why: String| Err(TransportError::Disconnected(format!("{address} {why}")));
        if status == 0xff {
            return gone("no longer responds (its status reads 0xff)".into());
        }
        if status & STATUS_DEVICE_NEEDS_RESET != 0 {
            return gone("reports DEVICE_NEEDS_RESET".into());
        }
        if self.started && status & STATUS_DRIVER_OK == 0 {
            return gone(format!("was reset underneath the driver (status {status:#04x})"));
        }
        Ok(())
    }

    fn device_type(&self) -> Option<u32> {
        self.device_type
    }

    fn describe(&self) -> String {
        let address = self.dev.address();
        match self.physical_addresses() {
            Some(false) => format!("pci {address} (DMA through the IOMMU)"),
            Some(true) => format!("pci {address} (physical addresses)"),
            None => format!("pci {address}"),
        }
    }
}

impl<D: PciAccess> Drop for VirtioPciTransport<D> {
    fn drop(&mut self) {
        let stopped = match self.reset_device() {
            Ok(()) => true,
            Err(e) => {
                warn!("{e}");
                false
            }
        };
        // No more DMA from the function, whatever state it is in.
        let mut cmd = [0u8; 2];
        if self.dev.config_read(PCI_COMMAND, &mut cmd).is_ok() {
            let cmd = u16::from_le_bytes(cmd) & !PCI_COMMAND_MASTER;
            let _ = self.dev.config_write(PCI_COMMAND, &cmd.to_le_bytes());
        }
        if !stopped && self.physical_addresses() == Some(true) {
            // A device that would not stop may still write to these physical pages: never let
            // them be reused.
            warn!("{}: leaking the DMA pool's hugepages of a device that did not stop", self.dev.address());
            for m in std::mem::take(&mut self.mapped) {
                std::mem::forget(m.region);
            }
            return;
        }
        let _ = self.unmap_all();
    }
}
