//! DMA buffers.

use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use vm_memory::VolatileSlice;

use super::arena::Chunk;
use super::error::MemoryError;

/// A buffer in the DMA pool: `len` bytes the device addresses at `iova` and this process at
/// `as_ptr()`.
///
/// # Sharing with a device
///
/// The bytes are shared with the device (another process, or hardware through the IOMMU).
/// From the moment a buffer's IOVA is posted to a queue until its completion is popped, the
/// device may read or write it at any time. During that window the owner must not keep
/// slices from [`as_slice`](DmaBuf::as_slice) / [`as_mut_slice`](DmaBuf::as_mut_slice)
/// alive: Rust assumes nothing else changes memory behind a reference. Code that may race
/// with a device (for example inspecting the buffer of a request that timed out) uses the
/// copying accessors [`read_at`](DmaBuf::read_at) / [`write_at`](DmaBuf::write_at) or
/// [`volatile_slice`](DmaBuf::volatile_slice), which never form references to the memory.
///
/// Within the process, buffers never overlap and a `DmaBuf` is not `Clone`, so `&`/`&mut`
/// on the `DmaBuf` govern access like for a `Vec<u8>`.
///
/// The buffer keeps its chunk (and with it the mapping) alive, so it stays valid even when
/// its arena or the pool handle is dropped first.
pub struct DmaBuf {
    iova: u64,
    ptr: NonNull<u8>,
    len: usize,
    owner: Arc<Chunk>,
}

// SAFETY: the pointer refers to a MAP_SHARED mapping kept alive by `owner`, which is
// Send + Sync; the buffer is uniquely owned and mutable access requires `&mut self`.
unsafe impl Send for DmaBuf {}
// SAFETY: shared references only allow reads (or volatile access), as for `Vec<u8>`.
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    /// `iova..iova + len` must lie inside `owner` and not overlap any other live buffer.
    pub(crate) fn new(owner: Arc<Chunk>, iova: u64, len: usize) -> Self {
        debug_assert!(len > 0);
        debug_assert!(iova + len as u64 <= owner.iova() + owner.len());
        let ptr = NonNull::new(owner.host_ptr(iova)).unwrap_or(NonNull::dangling());
        DmaBuf { iova, ptr, len, owner }
    }

    pub(crate) fn owner(&self) -> &Arc<Chunk> {
        &self.owner
    }

    /// The address the device uses.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: zero-length buffers are never handed out.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address in this process, e.g. to wrap as external memory.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The bytes, for use while the device does not own the buffer (see the type docs).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is mapped for as long as `owner` lives, which outlives the
        // borrow of self; no other DmaBuf covers these bytes, and `&mut` access needs `&mut
        // self`. Concurrent device access is excluded by the documented ownership rule.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably, for use while the device does not own the buffer.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Volatile view of the buffer, safe to use while a device may access it. It can write,
    /// hence `&mut self`: no slice from `as_slice` may be alive meanwhile.
    pub fn volatile_slice(&mut self) -> VolatileSlice<'_> {
        self.volatile()
    }

    fn volatile(&self) -> VolatileSlice<'_> {
        // SAFETY: the memory is mapped for the lifetime of the borrow of self (owner keeps
        // it), and VolatileSlice only performs volatile accesses on it. Callers holding only
        // `&self` use it for reads alone.
        unsafe { VolatileSlice::new(self.ptr.as_ptr(), self.len) }
    }

    /// Copies `buf.len()` bytes starting at `offset` out of the DMA buffer.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.range(offset, buf.len())?.copy_to(buf);
        Ok(())
    }

    /// Copies `data` into the DMA buffer at `offset`.
    pub fn write_at(&mut self, offset: usize, data: &[u8]) -> Result<(), MemoryError> {
        self.range(offset, data.len())?.copy_from(data);
        Ok(())
    }

    /// Sets every byte to `value`.
    pub fn fill(&mut self, value: u8) {
        self.as_mut_slice().fill(value);
    }

    fn range(&self, offset: usize, len: usize) -> Result<VolatileSlice<'_>, MemoryError> {
        let oob = MemoryError::OutOfBounds { offset, len, size: self.len };
        if offset.checked_add(len).map_or(true, |end| end > self.len) {
            return Err(oob);
        }
        self.volatile().subslice(offset, len).map_err(|_| oob)
    }
}

impl fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuf")
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}
