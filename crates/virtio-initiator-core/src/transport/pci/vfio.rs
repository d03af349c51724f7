//! A PCI function through VFIO: container (type1 IOMMU), group and device fd from
//! `vfio-ioctls`, plus what that crate leaves out: the IOMMU's IOVA ranges, region info with
//! sparse-mmap areas, BAR mappings and access with reported errors.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use log::{debug, warn};
use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioOps};
use vmm_sys_util::ioctl::ioctl_with_mut_ptr;
use vmm_sys_util::ioctl_io_nr;

use super::discover::{PciFunction, Sysfs};
use super::virtio_pci::PciAccess;
use super::{PciAddress, PciError};
use crate::transport::Notifier;

ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE as u32, VFIO_BASE + 8);
ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 12);

/// Size of `struct vfio_region_info` (argsz, flags, index, cap_offset, size, offset).
const REGION_INFO_BYTES: usize = 32;
/// Size of `struct vfio_iommu_type1_info` (argsz, flags, iova_pgsizes, cap_offset, pad).
const IOMMU_INFO_BYTES: usize = 24;
/// Regions 0..=5 are the BARs.
const BAR_COUNT: u8 = 6;

/// An inclusive range of IOVAs the IOMMU can map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IovaRange {
    pub start: u64,
    pub end: u64,
}

impl IovaRange {
    pub fn contains(&self, iova: u64, size: u64) -> bool {
        size > 0 && iova >= self.start && iova.checked_add(size - 1).is_some_and(|last| last <= self.end)
    }
}

/// "0x0-0xfedfffff, 0xfef00000-0x7fffffffff", for messages.
pub fn format_ranges(ranges: &[IovaRange]) -> String {
    ranges.iter().map(|r| format!("{:#x}-{:#x}", r.start, r.end)).collect::<Vec<_>>().join(", ")
}

fn ne_u16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn ne_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn ne_u64(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// Walks a VFIO capability chain (header: id u16, version u16, next u32) in `buf`, whose
/// fixed part is `fixed` bytes long, and calls `f(id, offset)` for each capability.
fn walk_vfio_caps(buf: &[u8], first: u32, fixed: usize, mut f: impl FnMut(u16, usize)) {
    let mut at = first as usize;
    // A chain longer than the buffer could hold is corrupt; stop rather than loop.
    for _ in 0..buf.len() / 8 {
        if at < fixed || at + 8 > buf.len() {
            break;
        }
        f(ne_u16(buf, at), at);
        at = ne_u32(buf, at + 4) as usize;
    }
}

/// IOVA page sizes and ranges from an IOMMU info reply.
pub fn parse_iommu_info(buf: &[u8]) -> (u64, Vec<IovaRange>) {
    if buf.len() < IOMMU_INFO_BYTES {
        return (0, Vec::new());
    }
    let flags = ne_u32(buf, 4);
    let page_sizes = if flags & VFIO_IOMMU_INFO_PGSIZES != 0 { ne_u64(buf, 8) } else { 0 };
    let mut ranges = Vec::new();
    if flags & VFIO_IOMMU_INFO_CAPS != 0 {
        walk_vfio_caps(buf, ne_u32(buf, 16), IOMMU_INFO_BYTES, |id, at| {
            if u32::from(id) != VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE || at + 16 > buf.len() {
                return;
            }
            let n = ne_u32(buf, at + 8) as usize;
            for i in 0..n {
                let e = at + 16 + 16 * i;
                if e + 16 > buf.len() {
                    break;
                }
                ranges.push(IovaRange { start: ne_u64(buf, e), end: ne_u64(buf, e + 8) });
            }
        });
    }
    (page_sizes, ranges)
}

/// One VFIO region (a BAR, the config space).
#[derive(Clone, Debug, Default)]
struct RegionInfo {
    flags: u32,
    size: u64,
    /// Where the region starts in the device file.
    offset: u64,
    /// Mmap-able areas (offset, size) within the region: the sparse-mmap list, or the whole
    /// region when it is mmap-able without one.
    mmap_areas: Vec<(u64, u64)>,
}

/// An mmap of part of a BAR.
struct BarMap {
    offset: u64,
    len: u64,
    ptr: *mut u8,
}

impl Drop for BarMap {
    fn drop(&mut self) {
        // A doorbell pointer may still be held by a queue whose controller was closed on
        // another thread. Rather than unmapping (a late doorbell write would then fault), the
        // BAR pages are replaced by inert anonymous memory: the device file is released all
        // the same, and only this much address space stays reserved.
        // SAFETY: MAP_FIXED over exactly the range mmap gave us, which we own; nothing else
        // lives there.
        let inert = unsafe {
            libc::mmap(
                self.ptr.cast(),
                self.len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if inert == libc::MAP_FAILED {
            // SAFETY: ptr/len are exactly what mmap returned.
            unsafe { libc::munmap(self.ptr.cast(), self.len as usize) };
        }
    }
}

struct Bar {
    info: RegionInfo,
    maps: Vec<BarMap>,
}

impl Bar {
    /// Host pointer of `len` bytes at `offset`, when a mapping covers them.
    fn mapped(&self, offset: u64, len: u64) -> Option<*mut u8> {
        self.maps.iter().find_map(|m| {
            (offset >= m.offset && offset + len <= m.offset + m.len)
                .then(|| m.ptr.wrapping_add((offset - m.offset) as usize))
        })
    }
}

/// An open VFIO PCI function: its container, device fd, BARs and DMA mappings.
pub struct VfioPci {
    address: PciAddress,
    config: RegionInfo,
    // Declared before `device`: BAR mappings go first, then the device fd, then the container.
    bars: Vec<Option<Bar>>,
    dma: Vec<(u64, u64)>,
    iova_ranges: Vec<IovaRange>,
    page_sizes: u64,
    device: VfioDevice,
    container: Arc<VfioContainer>,
}

// SAFETY: the raw pointers are BAR mappings owned by this struct; they are only dereferenced
// through methods taking `&self`/`&mut self`, with volatile accesses that the device expects
// from any CPU.
unsafe impl Send for VfioPci {}

impl VfioPci {
    /// Opens the function (which `sysfs` found bound to vfio-pci): container, group, device
    /// fd, region info, BAR mappings and the IOMMU's IOVA ranges.
    pub fn open(sysfs: &Sysfs, function: &PciFunction) -> Result<Self, PciError> {
        let address = function.address;
        let group = function.iommu_group.ok_or(PciError::NoIommu(address))?;
        let container = Arc::new(VfioContainer::new(None).map_err(|e| container_error(address, e))?);
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(&sysfs.device_dir(address), ops)
            .map_err(|e| device_error(sysfs, address, group, e))?;

        let fd = device.as_raw_fd();
        let config = region_info(fd, VFIO_PCI_CONFIG_REGION_INDEX)
            .map_err(|e| vfio_op(address, "region info (config space)", e))?;
        if config.size < 256 {
            return Err(PciError::BadDevice {
                address,
                detail: format!("config space region is only {} bytes", config.size),
            });
        }
        let mut bars = Vec::with_capacity(BAR_COUNT as usize);
        for index in 0..u32::from(BAR_COUNT) {
            let info = match region_info(fd, index) {
                Ok(info) if info.size > 0 => info,
                Ok(_) => {
                    bars.push(None);
                    continue;
                }
                Err(e) => {
                    debug!("{address}: no region info for BAR{index}: {e}");
                    bars.push(None);
                    continue;
                }
            };
            let maps = map_bar(fd, &info).unwrap_or_else(|e| {
                // Register access falls back to read/write on the device file.
                warn!("{address}: BAR{index} cannot be mapped ({e}); using read/write");
                Vec::new()
            });
            bars.push(Some(Bar { info, maps }));
        }
        let (page_sizes, iova_ranges) =
            iommu_info(&container).map_err(|e| vfio_op(address, "IOMMU info", e))?;
        debug!(
            "{address}: VFIO open, IOVA ranges {}, page sizes {page_sizes:#x}",
            format_ranges(&iova_ranges)
        );
        Ok(VfioPci { address, config, bars, dma: Vec::new(), iova_ranges, page_sizes, device, container })
    }

    /// Page sizes the IOMMU can map (a bitmap), 0 when not reported.
    pub fn iova_page_sizes(&self) -> u64 {
        self.page_sizes
    }

    fn bar(&self, bar: u8) -> Result<&Bar, PciError> {
        self.bars.get(bar as usize).and_then(Option::as_ref).ok_or_else(|| PciError::BadDevice {
            address: self.address,
            detail: format!("BAR{bar} is not implemented"),
        })
    }

    fn check_bar_range(&self, bar: &Bar, index: u8, offset: u64, len: usize) -> Result<(), PciError> {
        if offset.checked_add(len as u64).map_or(true, |end| end > bar.info.size) {
            return Err(PciError::BadDevice {
                address: self.address,
                detail: format!(
                    "access of {len} bytes at {offset:#x} is outside BAR{index} ({} bytes)",
                    bar.info.size
                ),
            });
        }
        Ok(())
    }

    fn pread(&self, what: &'static str, at: u64, buf: &mut [u8]) -> Result<(), PciError> {
        // SAFETY: reads into a buffer we own, of its length, from the device fd we own.
        let n =
            unsafe { libc::pread(self.device.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), at as i64) };
        if n != buf.len() as isize {
            let e = if n < 0 {
                io::Error::last_os_error()
            } else {
                io::Error::other(format!("short read ({n})"))
            };
            return Err(vfio_op(self.address, what, e));
        }
        Ok(())
    }

    fn pwrite(&self, what: &'static str, at: u64, data: &[u8]) -> Result<(), PciError> {
        // SAFETY: writes from a buffer we own, of its length, to the device fd we own.
        let n = unsafe { libc::pwrite(self.device.as_raw_fd(), data.as_ptr().cast(), data.len(), at as i64) };
        if n != data.len() as isize {
            let e = if n < 0 {
                io::Error::last_os_error()
            } else {
                io::Error::other(format!("short write ({n})"))
            };
            return Err(vfio_op(self.address, what, e));
        }
        Ok(())
    }
}

impl PciAccess for VfioPci {
    fn address(&self) -> PciAddress {
        self.address
    }

    fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), PciError> {
        self.pread("config space read", self.config.offset + offset, buf)
    }

    fn config_write(&self, offset: u64, data: &[u8]) -> Result<(), PciError> {
        self.pwrite("config space write", self.config.offset + offset, data)
    }

    fn bar_size(&self, bar: u8) -> Option<u64> {
        self.bar(bar).ok().map(|b| b.info.size)
    }

    fn bar_read(&self, index: u8, offset: u64, buf: &mut [u8]) -> Result<(), PciError> {
        let bar = self.bar(index)?;
        self.check_bar_range(bar, index, offset, buf.len())?;
        if bar.info.flags & VFIO_REGION_INFO_FLAG_READ == 0 {
            return Err(PciError::BadDevice {
                address: self.address,
                detail: format!("BAR{index} is not readable"),
            });
        }
        match (bar.mapped(offset, buf.len() as u64), buf.len()) {
            // SAFETY (all three): the pointer lies inside a live BAR mapping (checked by
            // `mapped`) and is aligned for the width (register offsets are); a volatile load
            // of exactly that width is the register access the device expects.
            (Some(p), 1) => buf[0] = unsafe { std::ptr::read_volatile(p) },
            (Some(p), 2) if p as usize % 2 == 0 => {
                let v = unsafe { std::ptr::read_volatile(p.cast::<u16>()) };
                buf.copy_from_slice(&v.to_ne_bytes());
            }
            (Some(p), 4) if p as usize % 4 == 0 => {
                let v = unsafe { std::ptr::read_volatile(p.cast::<u32>()) };
                buf.copy_from_slice(&v.to_ne_bytes());
            }
            _ => self.pread("BAR read", bar.info.offset + offset, buf)?,
        }
        Ok(())
    }

    fn bar_write(&self, index: u8, offset: u64, data: &[u8]) -> Result<(), PciError> {
        let bar = self.bar(index)?;
        self.check_bar_range(bar, index, offset, data.len())?;
        if bar.info.flags & VFIO_REGION_INFO_FLAG_WRITE == 0 {
            return Err(PciError::BadDevice {
                address: self.address,
                detail: format!("BAR{index} is not writable"),
            });
        }
        match (bar.mapped(offset, data.len() as u64), data.len()) {
            // SAFETY (all three): as in `bar_read`, for stores.
            (Some(p), 1) => unsafe { std::ptr::write_volatile(p, data[0]) },
            (Some(p), 2) if p as usize % 2 == 0 => unsafe {
                std::ptr::write_volatile(p.cast::<u16>(), u16::from_ne_bytes([data[0], data[1]]))
            },
            (Some(p), 4) if p as usize % 4 == 0 => unsafe {
                std::ptr::write_volatile(
                    p.cast::<u32>(),
                    u32::from_ne_bytes([data[0], data[1], data[2], data[3]]),
                )
            },
            _ => self.pwrite("BAR write", bar.info.offset + offset, data)?,
        }
        Ok(())
    }

    fn notifier(&self, index: u8, offset: u64, queue: u16) -> Result<Notifier, PciError> {
        let bar = self.bar(index)?;
        self.check_bar_range(bar, index, offset, 2)?;
        if let Some(p) = bar.mapped(offset, 2).filter(|p| *p as usize % 2 == 0) {
            return Ok(Notifier::Mmio { addr: p.cast(), queue });
        }
        // SAFETY: dup of a descriptor we own; the new one is owned by the File below.
        let raw = unsafe { libc::dup(self.device.as_raw_fd()) };
        if raw < 0 {
            return Err(vfio_op(self.address, "dup of the device fd", io::Error::last_os_error()));
        }
        // SAFETY: `raw` was just returned by dup and nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        Ok(Notifier::File { file: Arc::new(file), offset: bar.info.offset + offset, queue })
    }

    fn iova_ranges(&self) -> &[IovaRange] {
        &self.iova_ranges
    }

    unsafe fn dma_map(&mut self, iova: u64, size: u64, host: *mut u8) -> Result<(), PciError> {
        let len = usize::try_from(size).map_err(|_| PciError::BadDevice {
            address: self.address,
            detail: format!("DMA mapping of {size} bytes is too large"),
        })?;
        // SAFETY: the caller keeps `host..host+size` mapped until `dma_unmap` (or our drop),
        // and only touches it in ways that are sound while a device may DMA into it.
        unsafe { self.container.vfio_dma_map(iova, len, host) }.map_err(|e| {
            let mut detail = error_chain(&e);
            if matches!(&e, VfioError::IommuDmaMap(se) if se.errno() == libc::ENOMEM) {
                // Pinned pages count against the locked-memory limit of a non-root process.
                detail.push_str(" (raise the locked-memory limit, RLIMIT_MEMLOCK / ulimit -l)");
            }
            vfio_op(self.address, "DMA map", io::Error::other(detail))
        })?;
        self.dma.push((iova, size));
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), PciError> {
        let len = usize::try_from(size).unwrap_or(usize::MAX);
        self.container
            .vfio_dma_unmap(iova, len)
            .map_err(|e| vfio_op(self.address, "DMA unmap", io::Error::other(error_chain(&e))))?;
        self.dma.retain(|&(i, s)| (i, s) != (iova, size));
        Ok(())
    }
}

impl Drop for VfioPci {
    fn drop(&mut self) {
        // The device must already be stopped (the transport resets it first).
        for (iova, size) in std::mem::take(&mut self.dma) {
            if let Err(e) = self.container.vfio_dma_unmap(iova, size as usize) {
                warn!("{}: DMA unmap of {iova:#x}+{size:#x} failed: {e}", self.address);
            }
        }
    }
}

/// The error and its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

fn vfio_op(address: PciAddress, operation: &'static str, e: io::Error) -> PciError {
    if e.kind() == io::ErrorKind::PermissionDenied {
        return PciError::Permission {
            path: format!("VFIO {operation} on {address}"),
            detail: e.to_string(),
        };
    }
    PciError::Vfio { address, operation, detail: e.to_string() }
}

fn os_error(e: &VfioError) -> Option<i32> {
    match e {
        VfioError::OpenContainer(io) | VfioError::OpenGroup(io, _) => io.raw_os_error(),
        VfioError::GroupGetDeviceFD(e)
        | VfioError::ContainerSetIOMMU(e)
        | VfioError::VfioDeviceGetInfo(e) => Some(e.errno()),
        _ => None,
    }
}

fn container_error(address: PciAddress, e: VfioError) -> PciError {
    match os_error(&e) {
        Some(libc::ENOENT) => PciError::VfioUnavailable(
            "/dev/vfio/vfio does not exist (load the vfio-pci module; the system needs an IOMMU)".into(),
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => {
            PciError::Permission { path: "/dev/vfio/vfio".into(), detail: error_chain(&e) }
        }
        _ => match e {
            VfioError::VfioExtension | VfioError::VfioApiVersion => PciError::VfioUnavailable(format!(
                "{} (the kernel offers no type1v2 IOMMU backend)",
                error_chain(&e)
            )),
            _ => PciError::Vfio { address, operation: "container open", detail: error_chain(&e) },
        },
    }
}

fn device_error(sysfs: &Sysfs, address: PciAddress, group: u32, e: VfioError) -> PciError {
    let errno = os_error(&e);
    match (&e, errno) {
        (_, Some(libc::EBUSY)) => PciError::DeviceBusy { address, group },
        (_, Some(libc::EACCES)) | (_, Some(libc::EPERM)) => {
            PciError::Permission { path: format!("/dev/vfio/{group}"), detail: error_chain(&e) }
        }
        (VfioError::OpenGroup(..), Some(libc::ENOENT)) => PciError::NotBoundToVfio {
            address,
            driver: "a driver other than vfio-pci (its /dev/vfio group node is missing)".into(),
        },
        (VfioError::GroupViable, _) => {
            let others = sysfs
                .group_blockers(address, group)
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "devices bound to other drivers".into());
            PciError::GroupNotViable { address, group, others }
        }
        _ => PciError::Vfio { address, operation: "device open", detail: error_chain(&e) },
    }
}

fn region_info(fd: i32, index: u32) -> io::Result<RegionInfo> {
    let mut buf = vec![0u8; REGION_INFO_BYTES];
    for _ in 0..2 {
        let argsz = buf.len() as u32;
        buf[0..4].copy_from_slice(&argsz.to_ne_bytes());
        buf[8..12].copy_from_slice(&index.to_ne_bytes());
        // SAFETY: the buffer is at least as large as argsz says; the kernel writes no more.
        let rc =
            unsafe { ioctl_with_mut_ptr(&RawFdRef(fd), VFIO_DEVICE_GET_REGION_INFO(), buf.as_mut_ptr()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let needed = ne_u32(&buf, 0) as usize;
        if needed <= buf.len() {
            break;
        }
        // The capabilities did not fit: ask again with the size the kernel wants.
        buf = vec![0u8; needed];
    }
    let flags = ne_u32(&buf, 4);
    let size = ne_u64(&buf, 16);
    let mut info = RegionInfo { flags, size, offset: ne_u64(&buf, 24), mmap_areas: Vec::new() };
    if flags & VFIO_REGION_INFO_FLAG_MMAP != 0 {
        let mut sparse = None;
        if flags & VFIO_REGION_INFO_FLAG_CAPS != 0 {
            walk_vfio_caps(&buf, ne_u32(&buf, 12), REGION_INFO_BYTES, |id, at| {
                if u32::from(id) != VFIO_REGION_INFO_CAP_SPARSE_MMAP || at + 16 > buf.len() {
                    return;
                }
                let n = ne_u32(&buf, at + 8) as usize;
                let areas: Vec<(u64, u64)> = (0..n)
                    .map(|i| at + 16 + 16 * i)
                    .take_while(|&e| e + 16 <= buf.len())
                    .map(|e| (ne_u64(&buf, e), ne_u64(&buf, e + 8)))
                    .filter(|&(_, s)| s > 0)
                    .collect();
                sparse = Some(areas);
            });
        }
        info.mmap_areas = sparse.unwrap_or_else(|| vec![(0, size)]);
    }
    Ok(info)
}

fn map_bar(fd: i32, info: &RegionInfo) -> io::Result<Vec<BarMap>> {
    let mut maps = Vec::new();
    for &(offset, len) in &info.mmap_areas {
        let end = offset.checked_add(len).filter(|&e| e <= info.size);
        if end.is_none() {
            return Err(io::Error::other(format!("mmap area {offset:#x}+{len:#x} is outside the region")));
        }
        // SAFETY: a fresh shared mapping of the device file at an offset and length the kernel
        // reported as mappable; the result is checked and owned by BarMap.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                (info.offset + offset) as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        maps.push(BarMap { offset, len, ptr: ptr.cast() });
    }
    Ok(maps)
}

fn iommu_info(container: &VfioContainer) -> io::Result<(u64, Vec<IovaRange>)> {
    let mut buf = vec![0u8; 4096];
    for _ in 0..2 {
        let argsz = buf.len() as u32;
        buf.fill(0);
        buf[0..4].copy_from_slice(&argsz.to_ne_bytes());
        // SAFETY: the buffer is at least as large as argsz says; the kernel writes no more.
        let rc = unsafe { ioctl_with_mut_ptr(container, VFIO_IOMMU_GET_INFO(), buf.as_mut_ptr()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let needed = ne_u32(&buf, 0) as usize;
        if needed <= buf.len() {
            return Ok(parse_iommu_info(&buf));
        }
        buf = vec![0u8; needed];
    }
    Ok(parse_iommu_info(&buf))
}

/// A borrowed raw fd, for the ioctl helpers.
struct RawFdRef(i32);

impl AsRawFd for RawFdRef {
    fn as_raw_fd(&self) -> i32 {
        self.0
    }
}
