//! First-fit free-extent allocator with coalescing, over a range of IOVAs.
//!
//! Free space is kept as non-overlapping, non-adjacent extents in a `BTreeMap` keyed by start
//! address. Allocation scans extents in address order and takes the first one that holds the
//! request at the requested alignment; the alignment padding in front and the tail stay free.
//! Freeing merges the extent with its neighbours, so fragmentation heals as soon as the
//! neighbouring blocks come back. Costs: allocation O(number of free extents), free O(log n).
//!
//! The allocator works in absolute IOVAs, so an alignment is an alignment of the address the
//! device sees. Its bookkeeping lives in ordinary process memory, never in the DMA memory,
//! so a device scribbling over buffers cannot corrupt it.

use std::collections::BTreeMap;

use super::error::MemoryError;

/// Every block starts and ends on this granule, so no sliver smaller than it is ever left.
pub(crate) const GRANULE: u64 = 16;

#[derive(Debug)]
pub(crate) struct FreeList {
    start: u64,
    end: u64,
    extents: BTreeMap<u64, u64>,
    free: u64,
}

pub(crate) fn align_up(value: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

impl FreeList {
    /// A list covering `[start, start + len)`, all free. `start` must be granule-aligned.
    pub(crate) fn new(start: u64, len: u64) -> Self {
        debug_assert_eq!(start % GRANULE, 0);
        let len = len & !(GRANULE - 1);
        let mut extents = BTreeMap::new();
        if len > 0 {
            extents.insert(start, len);
        }
        FreeList { start, end: start + len, extents, free: len }
    }

    pub(crate) fn free_bytes(&self) -> u64 {
        self.free
    }

    pub(crate) fn largest_free(&self) -> u64 {
        self.extents.values().copied().max().unwrap_or(0)
    }

    /// Size actually reserved for a request of `len` bytes.
    pub(crate) fn block_len(len: u64) -> Option<u64> {
        align_up(len, GRANULE)
    }

    /// Reserves `len` bytes aligned to `align`; returns the address or `Exhausted`.
    pub(crate) fn alloc(&mut self, len: u64, align: u64) -> Result<u64, MemoryError> {
        if len == 0 {
            return Err(MemoryError::ZeroLength);
        }
        if !align.is_power_of_two() {
            return Err(MemoryError::InvalidAlignment { align });
        }
        let align = align.max(GRANULE);
        let exhausted = |list: &Self| MemoryError::Exhausted {
            requested: len,
            available: list.free,
            largest: list.largest_free(),
        };
        let block = Self::block_len(len).ok_or_else(|| exhausted(self))?;
        if block > self.free {
            return Err(exhausted(self));
        }
        let mut found = None;
        for (&ext_start, &ext_len) in &self.extents {
            let Some(aligned) = align_up(ext_start, align) else { break };
            let pad = aligned - ext_start;
            if pad.checked_add(block).is_some_and(|need| need <= ext_len) {
                found = Some((ext_start, ext_len, aligned));
                break;
            }
        }
        let Some((ext_start, ext_len, aligned)) = found else {
            return Err(exhausted(self));
        };
        self.extents.remove(&ext_start);
        if aligned > ext_start {
            self.extents.insert(ext_start, aligned - ext_start);
        }
        let tail = aligned + block;
        let ext_end = ext_start + ext_len;
        if tail < ext_end {
            self.extents.insert(tail, ext_end - tail);
        }
        self.free -= block;
        Ok(aligned)
    }

    /// Returns a block obtained from [`FreeList::alloc`] with the same `len`. A block that is
    /// outside the list or overlaps free space (a double free) is refused, leaving the list
    /// unchanged.
    pub(crate) fn free(&mut self, addr: u64, len: u64) -> Result<(), MemoryError> {
        let bad = MemoryError::BadIova { iova: addr, len };
        let block = Self::block_len(len).ok_or(MemoryError::BadIova { iova: addr, len })?;
        let end = addr.checked_add(block).ok_or(MemoryError::BadIova { iova: addr, len })?;
        if addr < self.start || end > self.end || addr % GRANULE != 0 || len == 0 {
            return Err(bad);
        }
        let prev = self.extents.range(..=addr).next_back().map(|(&s, &l)| (s, l));
        let next = self.extents.range(addr..).next().map(|(&s, &l)| (s, l));
        if prev.is_some_and(|(s, l)| s + l > addr) || next.is_some_and(|(s, _)| s < end) {
            return Err(bad);
        }
        let mut new_start = addr;
        let mut new_end = end;
        if let Some((s, l)) = prev {
            if s + l == addr {
                self.extents.remove(&s);
                new_start = s;
            }
        }
        if let Some((s, l)) = next {
            if s == end {
                self.extents.remove(&s);
                new_end = s + l;
            }
        }
        self.extents.insert(new_start, new_end - new_start);
        self.free += block;
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn extent_count(&self) -> usize {
        self.extents.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_alignment_and_coalescing() {
        let mut list = FreeList::new(0x1000, 0x1000);
        let a = list.alloc(100, 1).unwrap();
        assert_eq!(a, 0x1000);
        // 100 rounds up to 112; an aligned request skips the padding and leaves it free.
        let b = list.alloc(64, 256).unwrap();
        assert_eq!(b, 0x1100);
        assert_eq!(list.extent_count(), 2);
        let c = list.alloc(16, 1).unwrap();
        assert_eq!(c, 0x1070, "first fit reuses the alignment padding");
        list.free(b, 64).unwrap();
        list.free(a, 100).unwrap();
        list.free(c, 16).unwrap();
        assert_eq!(list.extent_count(), 1);
        assert_eq!(list.free_bytes(), 0x1000);
        assert_eq!(list.largest_free(), 0x1000);
    }

    #[test]
    fn refuses_double_free_and_foreign_ranges() {
        let mut list = FreeList::new(0, 4096);
        let a = list.alloc(32, 16).unwrap();
        list.free(a, 32).unwrap();
        assert!(matches!(list.free(a, 32), Err(MemoryError::BadIova { .. })));
        assert!(matches!(list.free(8192, 32), Err(MemoryError::BadIova { .. })));
        assert!(matches!(list.free(u64::MAX - 4, 32), Err(MemoryError::BadIova { .. })));
        assert_eq!(list.free_bytes(), 4096);
    }

    #[test]
    fn huge_and_odd_requests_are_errors() {
        let mut list = FreeList::new(4096, 4096);
        assert!(matches!(list.alloc(u64::MAX, 1), Err(MemoryError::Exhausted { .. })));
        assert!(matches!(list.alloc(0, 1), Err(MemoryError::ZeroLength)));
        assert!(matches!(list.alloc(8, 3), Err(MemoryError::InvalidAlignment { align: 3 })));
        assert!(matches!(list.alloc(8, 1 << 63), Err(MemoryError::Exhausted { .. })));
    }
}
