//! Access to ring memory shared with the device.
//!
//! All fields are little-endian. The device runs concurrently in another process (or is
//! hardware), so plain loads and stores could be merged, reordered or torn by the compiler:
//! every access here is volatile, and the two index fields that carry the hand-over between
//! driver and device (`avail->idx`, `used->idx`) are atomics with release/acquire ordering.
//! This is the only place of the queue code that touches raw pointers.

use std::sync::atomic::{AtomicU16, Ordering};

use crate::memory::DmaBuf;

pub(crate) struct RingMem {
    buf: DmaBuf,
}

impl RingMem {
    pub(crate) fn new(mut buf: DmaBuf) -> Self {
        // Rings start out all zero: both indices 0, no flags.
        buf.fill(0);
        RingMem { buf }
    }

    pub(crate) fn buf(&self) -> &DmaBuf {
        &self.buf
    }

    pub(crate) fn zero(&mut self) {
        self.buf.fill(0);
    }

    /// Pointer to `size_of::<T>()` bytes at `offset`. Offsets come from `RingLayout` with
    /// indices already reduced modulo the queue size, so they are always in range; the
    /// check below makes an out-of-range offset a panic rather than a stray write.
    #[inline]
    fn at<T>(&self, offset: usize) -> *mut T {
        assert!(
            offset % std::mem::align_of::<T>() == 0 && offset + std::mem::size_of::<T>() <= self.buf.len(),
            "ring offset {offset} out of range"
        );
        self.buf.as_ptr().wrapping_add(offset).cast()
    }

    #[inline]
    pub(crate) fn read_u16(&self, offset: usize) -> u16 {
        // SAFETY: `at` checked bounds and alignment; the memory is mapped while `buf` lives.
        u16::from_le(unsafe { self.at::<u16>(offset).read_volatile() })
    }

    #[inline]
    pub(crate) fn write_u16(&self, offset: usize, value: u16) {
        // SAFETY: as in read_u16.
        unsafe { self.at::<u16>(offset).write_volatile(value.to_le()) }
    }

    #[inline]
    pub(crate) fn read_u32(&self, offset: usize) -> u32 {
        // SAFETY: as in read_u16.
        u32::from_le(unsafe { self.at::<u32>(offset).read_volatile() })
    }

    #[inline]
    pub(crate) fn write_u32(&self, offset: usize, value: u32) {
        // SAFETY: as in read_u16.
        unsafe { self.at::<u32>(offset).write_volatile(value.to_le()) }
    }

    #[inline]
    pub(crate) fn write_u64(&self, offset: usize, value: u64) {
        // SAFETY: as in read_u16.
        unsafe { self.at::<u64>(offset).write_volatile(value.to_le()) }
    }

    #[inline]
    fn atomic_u16(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: aligned and in bounds (checked in `at`), mapped while `self` lives, and
        // AtomicU16 has the layout of u16. Other parties access it only with atomic or
        // volatile 16-bit operations.
        unsafe { &*self.at::<AtomicU16>(offset) }
    }

    /// Load with acquire ordering: what the device wrote before publishing the index is
    /// visible afterwards.
    #[inline]
    pub(crate) fn load_u16_acquire(&self, offset: usize) -> u16 {
        u16::from_le(self.atomic_u16(offset).load(Ordering::Acquire))
    }

    /// Store with release ordering: everything written before is visible to a device that
    /// sees the new value.
    #[inline]
    pub(crate) fn store_u16_release(&self, offset: usize, value: u16) {
        self.atomic_u16(offset).store(value.to_le(), Ordering::Release)
    }

    /// Writes one descriptor at `offset` (in this ring or an indirect table).
    #[inline]
    pub(crate) fn write_desc(&self, offset: usize, addr: u64, len: u32, flags: u16, next: u16) {
        self.write_u64(offset, addr);
        self.write_u32(offset + 8, len);
        self.write_u16(offset + 12, flags);
        self.write_u16(offset + 14, next);
    }
}
