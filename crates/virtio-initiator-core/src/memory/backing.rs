//! memfd-backed mappings: the memory a device is allowed to see.
//!
//! Each region is its own memfd, sized up front, with its pages allocated before it is used
//! (`fallocate`, then `MAP_POPULATE`), so running out of memory is an error at creation and
//! never a SIGBUS on first touch inside the data path.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use super::error::MemoryError;
use super::freelist::align_up;

/// Size of the hugepages the pool uses.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

const MEMFD_NAME: &CStr = c"virtio-initiator-dma";
const SYSFS_HUGEPAGES_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// Whether the pool is backed by 2 MiB hugepages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HugePages {
    /// Use hugepages when enough are free, else fall back to ordinary shared memory.
    #[default]
    Auto,
    /// Use hugepages or fail (PCI mode wants them: fewer IOMMU entries, no TLB pressure).
    Require,
    /// Always use ordinary shared memory.
    Never,
}

/// A mapped, populated memfd region placed at an IOVA.
pub(crate) struct Backing {
    pub(crate) mapping: GuestRegionMmap,
    pub(crate) file: Arc<File>,
    pub(crate) hugetlb: bool,
    /// Where the mapping starts in `file`.
    pub(crate) fd_offset: u64,
}

pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

/// Free 2 MiB hugepages that are not already promised to another mapping, or `None` when
/// the kernel has no 2 MiB hugetlb pool at all.
pub fn free_hugepages() -> Option<u64> {
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(format!("{SYSFS_HUGEPAGES_2M}/{name}")).ok()?.trim().parse().ok()
    };
    if let (Some(free), Some(resv)) = (read("free_hugepages"), read("resv_hugepages")) {
        return Some(free.saturating_sub(resv));
    }
    // Without sysfs, /proc/meminfo describes the default hugepage size only.
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |key: &str| -> Option<u64> {
        meminfo.lines().find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
    };
    if field("Hugepagesize:")? != HUGE_PAGE_SIZE / 1024 {
        return None;
    }
    Some(field("HugePages_Free:")?.saturating_sub(field("HugePages_Rsvd:")?))
}

/// Creates a region of at least `size` bytes at `iova`. Returns the mapping, whose length is
/// `size` rounded up to the page size in use. With `scatter` (for testing), memory that is not
/// on hugepages gets its pages from scattered places in physical memory (see [`Fill::Scattered`]).
pub(crate) fn create(size: u64, iova: u64, mode: HugePages, scatter: bool) -> Result<Backing, MemoryError> {
    let plain = if scatter { Fill::Scattered } else { Fill::Whole };
    match mode {
        HugePages::Never => create_with(size, iova, false, plain),
        HugePages::Require => create_with(size, iova, true, Fill::Whole),
        HugePages::Auto => create_with(size, iova, true, Fill::Whole).or_else(|err| {
            log::info!("DMA pool falls back to ordinary shared memory: {err}");
            create_with(size, iova, false, plain)
        }),
    }
}

fn create_with(size: u64, iova: u64, hugetlb: bool, fill: Fill) -> Result<Backing, MemoryError> {
    let (file, size) = allocate(size, hugetlb, fill)?;
    let mapping = map(&file, 0, size, iova, hugetlb)?;
    Ok(Backing { mapping, file, hugetlb, fd_offset: 0 })
}

/// Finds the physical address of each page of a mapping: `pages` entries for the pages of
/// `page_size` bytes starting at `host_addr`. Used for devices that bypass the IOMMU.
pub type PhysResolver = fn(host_addr: u64, page_size: u64, pages: usize) -> io::Result<Vec<u64>>;

/// Creates hugepage memory of at least `size` bytes for a device that takes physical
/// addresses. Each 2 MiB hugepage is physically contiguous; pages that happen to be adjacent
/// in both the memfd and physical memory are merged. Every piece is mapped on its own and
/// placed at its physical address, so an IOVA of the pool *is* the physical address and no
/// buffer spans memory that is not contiguous for the device.
pub(crate) fn create_physical(size: u64, resolve: PhysResolver) -> Result<Vec<Backing>, MemoryError> {
    // Pages are taken last to first: the kernel hands out free hugepages most recently freed
    // first, which after a fresh reservation is descending physical order, so this order
    // usually yields one physically contiguous run.
    let (file, size) = allocate(size, true, Fill::Backwards)?;
    let pages = (size / HUGE_PAGE_SIZE) as usize;
    // A first mapping of the whole memfd, only to learn where its pages are.
    let whole = map(&file, 0, size, 0, true)?;
    let physical = resolve(whole.as_ptr() as u64, HUGE_PAGE_SIZE, pages)
        .map_err(|e| MemoryError::PhysicalAddress(e.to_string()))?;
    drop(whole);
    if physical.len() != pages {
        return Err(MemoryError::PhysicalAddress(format!(
            "{} physical addresses for {pages} hugepages",
            physical.len()
        )));
    }
    physical_runs(&physical, HUGE_PAGE_SIZE)
        .into_iter()
        .map(|(offset, pa, len)| {
            // The memfd keeps its pages, so the new mappings see the same physical memory.
            let mapping = map(&file, offset, len, pa, true)?;
            Ok(Backing { mapping, file: file.clone(), hugetlb: true, fd_offset: offset })
        })
        .collect()
}

/// Groups pages (physical address of each, in memfd order) into runs that are contiguous both
/// in the memfd and physically: `(memfd offset, physical address, length)`.
pub(crate) fn physical_runs(physical: &[u64], page_size: u64) -> Vec<(u64, u64, u64)> {
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for (i, &pa) in physical.iter().enumerate() {
        match runs.last_mut() {
            Some((_, start, len)) if *start + *len == pa => *len += page_size,
            _ => runs.push((i as u64 * page_size, pa, page_size)),
        }
    }
    runs
}

/// In what order the pages of a new memfd are allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    /// All at once.
    Whole,
    /// Page by page from the end (hugepages for physical placement, see [`create_physical`]).
    Backwards,
    /// For testing: page by page, each followed by a page of a second, temporary memfd that is
    /// closed afterwards. Consecutive allocations of single pages tend to come from adjacent
    /// physical pages, so every pair of pages adjacent in the memfd gets another page between
    /// them in physical memory; once the temporary memfd is gone, those pages are free again
    /// and the pool is left scattered, as memory on a machine that has been up for a while is.
    /// Plain (not hugetlb) memory only.
    Scattered,
}

/// A memfd of `size` bytes (rounded up to the page size in use) with all its pages allocated,
/// in the order `fill` says.
fn allocate(size: u64, hugetlb: bool, fill: Fill) -> Result<(Arc<File>, u64), MemoryError> {
    let unit = if hugetlb { HUGE_PAGE_SIZE } else { page_size() };
    let size = align_up(size, unit)
        .filter(|&s| s > 0 && usize::try_from(s).is_ok() && s <= i64::MAX as u64)
        .ok_or(MemoryError::InvalidSize { size })?;
    if hugetlb {
        let needed = size / HUGE_PAGE_SIZE;
        let available = free_hugepages().unwrap_or(0);
        if available < needed {
            return Err(MemoryError::HugePagesUnavailable { needed, available });
        }
    }
    let file = memfd(size, hugetlb)?;
    // Allocate every page now: for hugetlb this takes the pages from the pool (failing cleanly
    // when a concurrent user got them first), for shmem it charges the memory up front.
    let fallocate = |file: &File, offset: u64, len: u64| -> io::Result<()> {
        // SAFETY: plain syscall on a descriptor we own.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset as libc::off_t, len as libc::off_t) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    match fill {
        Fill::Whole | Fill::Backwards => {
            let pieces: Vec<(u64, u64)> = if fill == Fill::Backwards {
                (0..size / unit).rev().map(|i| (i * unit, unit)).collect()
            } else {
                vec![(0, size)]
            };
            for (offset, len) in pieces {
                if let Err(source) = fallocate(&file, offset, len) {
                    // Kernels or sandboxes without fallocate on memfds still get MAP_POPULATE
                    // below.
                    if source.raw_os_error() != Some(libc::EOPNOTSUPP) {
                        return Err(MemoryError::Allocate { size, hugetlb, source });
                    }
                    break;
                }
            }
        }
        Fill::Scattered => {
            debug_assert!(!hugetlb, "hugepages are not scattered");
            // Scattering means nothing without control over the order pages are allocated in:
            // no fall-back here.
            let spacer = memfd(size, false)?;
            for offset in (0..size).step_by(unit as usize) {
                for f in [&*file, &*spacer] {
                    fallocate(f, offset, unit).map_err(|source| MemoryError::Allocate {
                        size,
                        hugetlb,
                        source,
                    })?;
                }
            }
            // Closing the spacer frees its pages: holes between the pages of the pool.
            drop(spacer);
        }
    }
    Ok((file, size))
}

/// An empty memfd of `size` bytes.
fn memfd(size: u64, hugetlb: bool) -> Result<Arc<File>, MemoryError> {
    let mut flags = libc::MFD_CLOEXEC;
    if hugetlb {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: the name is a valid NUL-terminated string; the call has no memory effects.
    let raw = unsafe { libc::memfd_create(MEMFD_NAME.as_ptr(), flags) };
    if raw < 0 {
        return Err(MemoryError::MemfdCreate { hugetlb, source: io::Error::last_os_error() });
    }
    // SAFETY: memfd_create just returned this descriptor and nothing else owns it.
    let file = Arc::new(File::from(unsafe { OwnedFd::from_raw_fd(raw) }));
    file.set_len(size).map_err(|source| MemoryError::Truncate { size, source })?;
    Ok(file)
}

/// Maps `len` bytes of `file` from `offset`, shared and populated, placed at `iova`.
fn map(
    file: &Arc<File>,
    offset: u64,
    len: u64,
    iova: u64,
    hugetlb: bool,
) -> Result<GuestRegionMmap, MemoryError> {
    let region = MmapRegionBuilder::new(len as usize)
        .with_file_offset(FileOffset::from_arc(file.clone(), offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED | libc::MAP_POPULATE)
        .with_hugetlbfs(hugetlb)
        .build()
        .map_err(|e| MemoryError::Mmap { size: len, hugetlb, message: e.to_string() })?;
    GuestRegionMmap::new(region, GuestAddress(iova))
        .ok_or(MemoryError::IovaOverflow { next: iova, size: len })
}
