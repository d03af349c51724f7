//! The per-controller DMA pool: regions, IOVA layout and the locked pool-level allocator.

use std::fmt;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use super::arena::{Arena, Chunk};
use super::backing::{self, HugePages, PhysResolver, HUGE_PAGE_SIZE};
use super::buf::DmaBuf;
use super::error::MemoryError;
use super::freelist::{align_up, FreeList};

/// Settings of a [`DmaPool`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Bytes of the first region (rounded up to the page size in use).
    pub size: u64,
    pub hugepages: HugePages,
    /// IOVA of the first region; must be 2 MiB aligned. In PCI mode pick it inside the
    /// IOMMU's usable ranges.
    pub iova_base: u64,
    /// Upper bound on regions, e.g. the vhost-user backend's memory slots (8 without
    /// CONFIGURE_MEM_SLOTS).
    pub max_regions: usize,
    /// How regions get their IOVAs.
    pub placement: IovaPlacement,
    /// For testing: allocate the pages of regions that are not on hugepages so that pages
    /// adjacent in the pool are not adjacent in physical memory, as they may well not be on a
    /// machine that has been up for a while. Off unless [`SCATTER_PAGES_ENV`] is `1`.
    pub scatter_pages: bool,
}

/// Environment variable for testing: `1` makes every pool of the process scatter its pages
/// ([`PoolConfig::scatter_pages`]). Behind an IOMMU the device then sees IOVA-adjacent pages as
/// separate pieces of memory, so anything that must reach it in one piece but crosses a page (a
/// device without VIRTIO_F_ANY_LAYOUT takes the first piece of a header for all of it) fails
/// every time rather than only where free memory happens to be fragmented. Hugepage memory is
/// not affected. Creating a scattered region briefly takes twice its memory.
pub const SCATTER_PAGES_ENV: &str = "VIRTIO_INITIATOR_SCATTER_PAGES";

fn scatter_pages_from_env() -> bool {
    std::env::var_os(SCATTER_PAGES_ENV).is_some_and(|v| v == "1")
}

/// How the pool assigns IOVAs to its regions.
#[derive(Clone, Copy, Default)]
pub enum IovaPlacement {
    /// One region after the other from `iova_base`, each 2 MiB aligned: for vhost-user
    /// backends and for devices behind an IOMMU, which see whatever layout we map.
    #[default]
    Contiguous,
    /// Every IOVA is the physical address of its memory, found with the resolver: for a PCI
    /// device that bypasses the IOMMU (no VIRTIO_F_ACCESS_PLATFORM) and so takes physical
    /// addresses. Needs hugepages; the pool becomes one region per physically contiguous run
    /// of them, so a buffer never spans memory the device would not see as contiguous.
    Physical(PhysResolver),
}

impl PartialEq for IovaPlacement {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (IovaPlacement::Contiguous, IovaPlacement::Contiguous) => true,
            (IovaPlacement::Physical(a), IovaPlacement::Physical(b)) => *a as usize == *b as usize,
            _ => false,
        }
    }
}

impl Eq for IovaPlacement {}

impl fmt::Debug for IovaPlacement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IovaPlacement::Contiguous => f.write_str("Contiguous"),
            IovaPlacement::Physical(_) => f.write_str("Physical"),
        }
    }
}

impl PoolConfig {
    pub const DEFAULT_IOVA_BASE: u64 = 0x1_0000_0000;
    /// The vhost-user baseline: backends must accept at least this many regions.
    pub const DEFAULT_MAX_REGIONS: usize = 8;

    pub fn new(size: u64) -> Self {
        PoolConfig {
            size,
            hugepages: HugePages::Auto,
            iova_base: Self::DEFAULT_IOVA_BASE,
            max_regions: Self::DEFAULT_MAX_REGIONS,
            placement: IovaPlacement::Contiguous,
            scatter_pages: scatter_pages_from_env(),
        }
    }

    /// See [`PoolConfig::scatter_pages`]; for testing.
    pub fn scatter_pages(mut self, scatter: bool) -> Self {
        self.scatter_pages = scatter;
        self
    }

    pub fn placement(mut self, placement: IovaPlacement) -> Self {
        self.placement = placement;
        self
    }

    pub fn hugepages(mut self, hugepages: HugePages) -> Self {
        self.hugepages = hugepages;
        self
    }

    pub fn iova_base(mut self, iova_base: u64) -> Self {
        self.iova_base = iova_base;
        self
    }

    pub fn max_regions(mut self, max_regions: usize) -> Self {
        self.max_regions = max_regions;
        self
    }
}

/// One mapped region of the pool, described the way vhost-user SET_MEM_TABLE / ADD_MEM_REG
/// and VFIO MAP_DMA want it. Holding a `Region` (it is cheap to clone) keeps its mapping and
/// descriptor alive.
#[derive(Clone)]
pub struct Region {
    /// Device-visible address of the first byte; 2 MiB aligned (a physical address with
    /// [`IovaPlacement::Physical`]).
    pub iova: u64,
    pub size: u64,
    /// Where the region is mapped in this process.
    pub host_addr: u64,
    /// Offset of the region within its memfd: 0, except for physically placed pools, whose
    /// regions are pieces of one memfd.
    pub fd_offset: u64,
    /// Backed by 2 MiB hugepages.
    pub hugepages: bool,
    file: Arc<File>,
    // Keeps the mapping alive as long as the description is around.
    _mapping: Arc<GuestRegionMmap>,
}

impl Region {
    /// The memfd to pass to the backend (vhost-user) or keep for reference.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd().as_raw_fd()
    }

    /// IOVA one past the last byte.
    pub fn iova_end(&self) -> u64 {
        self.iova + self.size
    }

    pub fn contains(&self, iova: u64, len: u64) -> bool {
        iova >= self.iova && iova.checked_add(len).is_some_and(|end| end <= self.iova_end())
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("size", &self.size)
            .field("host_addr", &format_args!("{:#x}", self.host_addr))
            .field("fd", &self.raw_fd())
            .field("fd_offset", &self.fd_offset)
            .field("hugepages", &self.hugepages)
            .finish()
    }
}

/// Where the region after `mapping` starts: regions are 2 MiB aligned in IOVA space.
fn next_iova_after(mapping: &GuestRegionMmap) -> Result<u64, MemoryError> {
    let (iova, size) = (mapping.start_addr().0, mapping.len());
    iova.checked_add(size)
        .and_then(|end| align_up(end, HUGE_PAGE_SIZE))
        .ok_or(MemoryError::IovaOverflow { next: iova, size })
}

/// Pool-level allocation state, shared with every [`Chunk`] so a chunk can give its space
/// back when its last user goes away, even after the `DmaPool` handle itself was dropped.
pub(crate) struct PoolState {
    regions: Vec<RegionSpace>,
}

struct RegionSpace {
    free: FreeList,
    // Weak: the pool's `Region`s and the chunks own the mapping, so a region nobody uses
    // any more is unmapped once the pool handle is gone.
    mapping: Weak<GuestRegionMmap>,
}

pub(crate) type SharedState = Arc<Mutex<PoolState>>;

pub(crate) fn lock(state: &SharedState) -> MutexGuard<'_, PoolState> {
    // The state is consistent between statements, so a panic elsewhere cannot leave it torn.
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PoolState {
    pub(crate) fn release(&mut self, region: usize, iova: u64, len: u64) {
        let result = match self.regions.get_mut(region) {
            Some(space) => space.free.free(iova, len),
            None => Err(MemoryError::BadIova { iova, len }),
        };
        if let Err(err) = result {
            log::error!("DMA pool: returning a chunk failed: {err}");
        }
    }
}

/// The DMA memory of one controller: one or more memfd regions laid out in a contiguous IOVA
/// space, plus a first-fit allocator with coalescing (as in [`Arena`]) that hands out
/// chunks under a mutex.
///
/// Hot-path allocation happens in [`Arena`]s carved from the pool, one per queue owner; the
/// pool lock is only taken to carve, to allocate long-lived shared buffers and to release
/// them.
pub struct DmaPool {
    config: PoolConfig,
    regions: Vec<Region>,
    memory: GuestMemoryMmap,
    state: SharedState,
    next_iova: u64,
}

impl fmt::Debug for DmaPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaPool")
            .field("config", &self.config)
            .field("regions", &self.regions)
            .finish_non_exhaustive()
    }
}

impl DmaPool {
    /// Creates the pool with its first region of `config.size` bytes (several regions with
    /// [`IovaPlacement::Physical`], one per physically contiguous run of hugepages).
    pub fn new(config: PoolConfig) -> Result<Self, MemoryError> {
        if config.iova_base % HUGE_PAGE_SIZE != 0 {
            return Err(MemoryError::UnalignedIovaBase { base: config.iova_base });
        }
        if config.size == 0 {
            return Err(MemoryError::InvalidSize { size: 0 });
        }
        if config.max_regions == 0 {
            return Err(MemoryError::TooManyRegions { max: 0 });
        }
        let mut backings = match config.placement {
            IovaPlacement::Contiguous => {
                vec![backing::create(config.size, config.iova_base, config.hugepages, config.scatter_pages)?]
            }
            IovaPlacement::Physical(resolve) => {
                if config.hugepages == HugePages::Never {
                    return Err(MemoryError::PhysicalNeedsHugePages);
                }
                backing::create_physical(config.size, resolve)?
            }
        };
        if backings.len() > config.max_regions {
            return Err(MemoryError::TooManyRegions { max: config.max_regions });
        }
        // vm-memory wants its regions in address order.
        backings.sort_by_key(|b| b.mapping.start_addr().0);
        let pieces: Vec<_> =
            backings.into_iter().map(|b| (Arc::new(b.mapping), b.file, b.hugetlb, b.fd_offset)).collect();
        let last = pieces.last().ok_or(MemoryError::InvalidSize { size: config.size })?;
        let next_iova = next_iova_after(&last.0)?;
        let memory = GuestMemoryMmap::from_arc_regions(pieces.iter().map(|p| p.0.clone()).collect())
            .map_err(|e| MemoryError::RegionTable(e.to_string()))?;
        let mut pool = DmaPool {
            next_iova,
            config,
            regions: Vec::new(),
            memory,
            state: Arc::new(Mutex::new(PoolState { regions: Vec::new() })),
        };
        for (mapping, file, hugetlb, fd_offset) in pieces {
            pool.register(mapping, file, hugetlb, fd_offset, next_iova);
        }
        Ok(pool)
    }

    /// Adds a region of at least `bytes`, placed at the next 2 MiB-aligned IOVA after the
    /// existing ones. The transport must then tell the device about it (ADD_MEM_REG, MAP_DMA).
    /// A physically placed pool cannot grow this way (its new memory may be several regions):
    /// size it up front.
    pub fn grow(&mut self, bytes: u64) -> Result<&Region, MemoryError> {
        if let IovaPlacement::Physical(_) = self.config.placement {
            return Err(MemoryError::PhysicalCannotGrow);
        }
        if self.regions.len() >= self.config.max_regions {
            return Err(MemoryError::TooManyRegions { max: self.config.max_regions });
        }
        if bytes == 0 {
            return Err(MemoryError::InvalidSize { size: 0 });
        }
        let iova = self.next_iova;
        let backing = backing::create(bytes, iova, self.config.hugepages, self.config.scatter_pages)?;
        let mapping = Arc::new(backing.mapping);
        let next_iova = next_iova_after(&mapping)?;
        self.memory = self
            .memory
            .insert_region(mapping.clone())
            .map_err(|e| MemoryError::RegionTable(e.to_string()))?;
        Ok(self.register(mapping, backing.file, backing.hugetlb, backing.fd_offset, next_iova))
    }

    fn register(
        &mut self,
        mapping: Arc<GuestRegionMmap>,
        file: Arc<File>,
        hugepages: bool,
        fd_offset: u64,
        next_iova: u64,
    ) -> &Region {
        let iova = mapping.start_addr().0;
        let size = mapping.len();
        self.next_iova = next_iova;
        lock(&self.state)
            .regions
            .push(RegionSpace { free: FreeList::new(iova, size), mapping: Arc::downgrade(&mapping) });
        self.regions.push(Region {
            iova,
            size,
            host_addr: mapping.as_ptr() as u64,
            fd_offset,
            hugepages,
            file,
            _mapping: mapping,
        });
        &self.regions[self.regions.len() - 1]
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The regions to announce to the device, in IOVA order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The pool as vm-memory guest memory, addressed by IOVA.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Bytes not handed out to arenas or shared buffers.
    pub fn free_bytes(&self) -> u64 {
        lock(&self.state).regions.iter().map(|r| r.free.free_bytes()).sum()
    }

    /// Host pointer of `len` bytes at `iova`; the range must lie within one region.
    pub fn translate(&self, iova: u64, len: usize) -> Result<*mut u8, MemoryError> {
        let bad = MemoryError::BadIova { iova, len: len as u64 };
        let slice = self.memory.get_slice(GuestAddress(iova), len).map_err(|_| bad)?;
        Ok(slice.ptr_guard_mut().as_ptr())
    }

    /// Hands `bytes` (rounded up to the page size) of contiguous DMA memory to one owner.
    pub fn carve(&self, bytes: u64) -> Result<Arena, MemoryError> {
        let page = backing::page_size();
        let len = align_up(bytes, page).filter(|&l| l > 0).ok_or(MemoryError::Exhausted {
            requested: bytes,
            available: self.free_bytes(),
            largest: 0,
        })?;
        let chunk = self.take(len, page, bytes)?;
        Ok(Arena::new(Arc::new(chunk)))
    }

    /// A long-lived buffer (for example one JavaScript holds), 4 KiB aligned. Dropping it
    /// returns the memory to the pool.
    pub fn alloc_shared(&self, len: usize) -> Result<DmaBuf, MemoryError> {
        self.alloc_shared_aligned(len, 4096)
    }

    /// Like [`DmaPool::alloc_shared`] with an explicit IOVA alignment (a power of two).
    pub fn alloc_shared_aligned(&self, len: usize, align: usize) -> Result<DmaBuf, MemoryError> {
        if len == 0 {
            return Err(MemoryError::ZeroLength);
        }
        let chunk = Arc::new(self.take(len as u64, align as u64, len as u64)?);
        let iova = chunk.iova();
        Ok(DmaBuf::new(chunk, iova, len))
    }

    fn take(&self, len: u64, align: u64, requested: u64) -> Result<Chunk, MemoryError> {
        let mut state = lock(&self.state);
        for (index, space) in state.regions.iter_mut().enumerate() {
            // Always present: `self.regions` holds every mapping while the pool lives.
            let Some(mapping) = space.mapping.upgrade() else { continue };
            match space.free.alloc(len, align) {
                Ok(iova) => return Ok(Chunk::new(iova, len, mapping, self.state.clone(), index)),
                Err(MemoryError::Exhausted { .. }) => {}
                // Bad length or alignment: the same in every region.
                Err(other) => return Err(other),
            }
        }
        Err(MemoryError::Exhausted {
            requested,
            available: state.regions.iter().map(|r| r.free.free_bytes()).sum(),
            largest: state.regions.iter().map(|r| r.free.largest_free()).max().unwrap_or(0),
        })
    }
}
