//! Arenas: contiguous chunks of the pool owned by one thread, allocated from without locks.

use std::fmt;
use std::sync::Arc;

use vm_memory::{GuestMemoryRegion, GuestRegionMmap};

use super::buf::DmaBuf;
use super::error::MemoryError;
use super::freelist::FreeList;
use super::pool::{lock, SharedState};

/// A contiguous range of one pool region. It keeps the region's mapping alive, and gives its
/// range back to the pool when the last reference (arena or buffer) is dropped.
pub(crate) struct Chunk {
    iova: u64,
    len: u64,
    mapping: Arc<GuestRegionMmap>,
    home: SharedState,
    region: usize,
}

impl Chunk {
    pub(crate) fn new(
        iova: u64,
        len: u64,
        mapping: Arc<GuestRegionMmap>,
        home: SharedState,
        region: usize,
    ) -> Self {
        debug_assert!(iova >= mapping.start_addr().0);
        debug_assert!(iova + len <= mapping.start_addr().0 + mapping.len());
        Chunk { iova, len, mapping, home, region }
    }

    pub(crate) fn iova(&self) -> u64 {
        self.iova
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Host address of `iova`, which must lie inside this chunk.
    pub(crate) fn host_ptr(&self, iova: u64) -> *mut u8 {
        debug_assert!(iova >= self.iova && iova < self.iova + self.len);
        let offset = (iova - self.mapping.start_addr().0) as usize;
        self.mapping.as_ptr().wrapping_add(offset)
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        lock(&self.home).release(self.region, self.iova, self.len);
    }
}

/// A chunk of DMA memory with its own allocator, for one owner (typically the thread that
/// owns a queue). Allocation takes no lock.
///
/// The allocator is first-fit with coalescing of neighbouring free blocks (see the
/// `freelist` module): blocks are multiples of 16 bytes, aligned to at least 16 bytes, and
/// the requested alignment applies to the IOVA (and to the host address for alignments up to
/// the page size).
///
/// Buffers must be given back with [`Arena::free`]. A buffer dropped instead stays valid
/// memory but its space is not reused until the arena and all its buffers are gone, when the
/// whole chunk returns to the pool.
pub struct Arena {
    chunk: Arc<Chunk>,
    free: FreeList,
}

impl fmt::Debug for Arena {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arena")
            .field("iova", &format_args!("{:#x}", self.chunk.iova))
            .field("len", &self.chunk.len)
            .field("free", &self.free.free_bytes())
            .finish()
    }
}

impl Arena {
    pub(crate) fn new(chunk: Arc<Chunk>) -> Self {
        let free = FreeList::new(chunk.iova(), chunk.len());
        Arena { chunk, free }
    }

    /// IOVA of the first byte of the arena.
    pub fn iova(&self) -> u64 {
        self.chunk.iova()
    }

    pub fn len(&self) -> u64 {
        self.chunk.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunk.len() == 0
    }

    pub fn free_bytes(&self) -> u64 {
        self.free.free_bytes()
    }

    /// Largest block that an allocation with alignment 16 could currently get.
    pub fn largest_free(&self) -> u64 {
        self.free.largest_free()
    }

    /// Allocates `len` bytes at an IOVA aligned to `align` (a power of two). The contents are
    /// whatever the memory held before.
    pub fn alloc(&mut self, len: usize, align: usize) -> Result<DmaBuf, MemoryError> {
        let iova = self.free.alloc(len as u64, align as u64)?;
        Ok(DmaBuf::new(self.chunk.clone(), iova, len))
    }

    /// Gives a buffer back. A buffer from another arena or from the pool is refused.
    pub fn free(&mut self, buf: DmaBuf) -> Result<(), MemoryError> {
        if !Arc::ptr_eq(buf.owner(), &self.chunk) {
            return Err(MemoryError::ForeignBuffer { iova: buf.iova() });
        }
        self.free.free(buf.iova(), buf.len() as u64)
    }
}
