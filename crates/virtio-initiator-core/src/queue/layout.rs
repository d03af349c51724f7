//! Split virtqueue layout (virtio 1.2, section 2.7).

/// Descriptor continues through `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Buffer is device-writable.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Buffer holds a table of indirect descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// avail->flags: the driver does not want interrupts (without EVENT_IDX).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// used->flags: the device does not want notifications (without EVENT_IDX).
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// Largest queue size this driver accepts.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Bytes of one descriptor (addr u64, len u32, flags u16, next u16).
pub const DESC_SIZE: usize = 16;
/// Bytes of one used element (id u32, len u32).
pub const USED_ELEM_SIZE: usize = 8;

/// The used ring goes on its own cache line, away from what the driver writes.
const USED_ALIGN: usize = 64;

/// Offsets of the three areas in one contiguous allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    pub size: u16,
    pub avail: usize,
    pub used: usize,
    pub total: usize,
}

impl RingLayout {
    pub fn new(size: u16) -> Self {
        let n = size as usize;
        let avail = DESC_SIZE * n;
        // flags, idx, ring[n], used_event
        let avail_len = 4 + 2 * n + 2;
        let used = (avail + avail_len).div_ceil(USED_ALIGN) * USED_ALIGN;
        // flags, idx, ring[n], avail_event
        let used_len = 4 + USED_ELEM_SIZE * n + 2;
        RingLayout { size, avail, used, total: used + used_len }
    }

    pub fn desc(&self, index: u16) -> usize {
        DESC_SIZE * index as usize
    }

    pub fn avail_flags(&self) -> usize {
        self.avail
    }

    pub fn avail_idx(&self) -> usize {
        self.avail + 2
    }

    pub fn avail_ring(&self, slot: u16) -> usize {
        self.avail + 4 + 2 * slot as usize
    }

    pub fn used_event(&self) -> usize {
        self.avail + 4 + 2 * self.size as usize
    }

    pub fn used_flags(&self) -> usize {
        self.used
    }

    pub fn used_idx(&self) -> usize {
        self.used + 2
    }

    pub fn used_elem(&self, slot: u16) -> usize {
        self.used + 4 + USED_ELEM_SIZE * slot as usize
    }

    pub fn avail_event(&self) -> usize {
        self.used + 4 + USED_ELEM_SIZE * self.size as usize
    }
}

/// The spec's rule for event suppression: notify when `event_idx` lies in the window of
/// indices published (or consumed) since the last check, `[old, new)`, modulo 2^16.
pub fn vring_need_event(event_idx: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec_sizes() {
        let l = RingLayout::new(256);
        assert_eq!(l.avail, 4096);
        assert_eq!(l.used_event(), 4096 + 4 + 512);
        assert_eq!(l.used % 64, 0);
        assert!(l.used >= l.used_event() + 2);
        assert_eq!(l.total, l.used + 6 + 8 * 256);
        assert_eq!(l.avail_event(), l.total - 2);
    }

    #[test]
    fn need_event_window() {
        assert!(vring_need_event(0, 1, 0));
        assert!(!vring_need_event(1, 1, 0));
        assert!(vring_need_event(5, 10, 3));
        assert!(!vring_need_event(10, 10, 3));
        assert!(!vring_need_event(2, 10, 3));
        // Across the 16-bit wrap.
        assert!(vring_need_event(0xffff, 2, 0xfffe));
        assert!(vring_need_event(1, 2, 0xfffe));
        assert!(!vring_need_event(2, 2, 0xfffe));
    }
}
