//! Driver side of a split virtqueue.

use std::sync::atomic::{fence, Ordering};

use super::layout::{
    vring_need_event, RingLayout, DESC_SIZE, MAX_QUEUE_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
};
use super::ring::RingMem;
use super::{Completion, DeviceBug, QueueError, QueueFeatures, RingAddrs, Segment};
use crate::memory::{Arena, DmaBuf, DmaPool, MemoryError};

/// With EVENT_IDX and interrupts off, `used_event` is parked one behind the driver's used
/// index, as far from being crossed as possible; it is moved along every this many
/// completions so the device never wraps around onto it.
const USED_EVENT_REFRESH: u16 = 0x4000;

/// What the driver knows about each descriptor of the ring. Kept in private memory: the
/// device could rewrite the shared descriptor table, so it is never read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DescState {
    Free,
    /// First descriptor of a chain the driver added.
    Head {
        token: u64,
        /// Ring descriptors the chain occupies (1 for an indirect chain).
        descs: u16,
        /// Device-writable bytes of the whole chain: the most the device may report.
        writable: u64,
        /// Visible to the device (its avail index has been published).
        published: bool,
    },
    /// A later descriptor of the chain headed by `head`.
    Member {
        head: u16,
    },
}

/// A split virtqueue driven from the driver side, for one owner thread.
///
/// Usage: [`add`](Self::add) any number of requests, [`publish`](Self::publish) them (and
/// notify the device when it returns true), then [`pop_used`](Self::pop_used) completions.
/// Everything the device writes (used entries and indices) is validated; the first violation
/// is reported as [`QueueError::DeviceBug`] and the queue then refuses further work with
/// [`QueueError::Broken`] until [`reset`](Self::reset).
pub struct SplitQueue {
    ring: RingMem,
    layout: RingLayout,
    /// One table of `max_segments` descriptors per ring slot, when INDIRECT is negotiated.
    indirect: Option<RingMem>,
    features: QueueFeatures,
    size: u16,
    /// Private "next" links: the free list, and the order of descriptors in each chain.
    next: Vec<u16>,
    state: Vec<DescState>,
    free_head: u16,
    num_free: u16,
    /// Next avail index to fill (free-running, wraps at 2^16).
    next_avail: u16,
    /// avail->idx as last published.
    published_idx: u16,
    /// Heads added since the last publish.
    pending: Vec<u16>,
    /// Chains the device may complete.
    published_in_flight: u16,
    /// Next used index to consume.
    last_used: u16,
    interrupts: bool,
    /// With EVENT_IDX and interrupts off: last_used when used_event was last parked.
    used_event_parked_at: u16,
    broken: bool,
    /// Clamp a used length beyond the writable bytes instead of failing (see
    /// [`SplitQueue::clamp_used_len`]).
    clamp_used_len: bool,
}

impl SplitQueue {
    /// Bytes of pool memory [`SplitQueue::from_pool`] takes for the given parameters.
    pub fn required_bytes(size: u16, features: &QueueFeatures) -> usize {
        let rings = RingLayout::new(size).total;
        let tables =
            if features.indirect { size as usize * features.max_segments as usize * DESC_SIZE } else { 0 };
        rings.next_multiple_of(4096) + tables
    }

    /// Creates a queue whose rings (and indirect tables) come from `arena`.
    pub fn new(arena: &mut Arena, size: u16, features: QueueFeatures) -> Result<Self, QueueError> {
        Self::validate(size, &features)?;
        Self::build(size, features, |len, align| arena.alloc(len, align))
    }

    /// Creates a queue whose rings are long-lived allocations from the pool.
    pub fn from_pool(pool: &DmaPool, size: u16, features: QueueFeatures) -> Result<Self, QueueError> {
        Self::validate(size, &features)?;
        Self::build(size, features, |len, align| pool.alloc_shared_aligned(len, align))
    }

    fn validate(size: u16, features: &QueueFeatures) -> Result<(), QueueError> {
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(QueueError::InvalidSize(size));
        }
        if features.max_segments == 0 || features.max_segments > MAX_QUEUE_SIZE {
            return Err(QueueError::InvalidMaxSegments(features.max_segments));
        }
        Ok(())
    }

    fn build(
        size: u16,
        features: QueueFeatures,
        mut alloc: impl FnMut(usize, usize) -> Result<DmaBuf, MemoryError>,
    ) -> Result<Self, QueueError> {
        let layout = RingLayout::new(size);
        // Page alignment keeps the descriptor table (and the rings) off anyone else's pages.
        let ring = RingMem::new(alloc(layout.total, 4096)?);
        let indirect = if features.indirect {
            let len = size as usize * features.max_segments as usize * DESC_SIZE;
            Some(RingMem::new(alloc(len, 4096)?))
        } else {
            None
        };
        let mut queue = SplitQueue {
            ring,
            layout,
            indirect,
            features,
            size,
            next: vec![0; size as usize],
            state: vec![DescState::Free; size as usize],
            free_head: 0,
            num_free: 0,
            next_avail: 0,
            published_idx: 0,
            pending: Vec::with_capacity(size as usize),
            published_in_flight: 0,
            last_used: 0,
            interrupts: true,
            used_event_parked_at: 0,
            broken: false,
            clamp_used_len: false,
        };
        queue.init_state();
        // We poll: no interrupts unless asked for.
        queue.disable_interrupts();
        Ok(queue)
    }

    fn init_state(&mut self) {
        for i in 0..self.size {
            self.next[i as usize] = i.wrapping_add(1) & (self.size - 1);
            self.state[i as usize] = DescState::Free;
        }
        self.free_head = 0;
        self.num_free = self.size;
        self.next_avail = 0;
        self.published_idx = 0;
        self.pending.clear();
        self.published_in_flight = 0;
        self.last_used = 0;
        self.used_event_parked_at = 0;
        self.broken = false;
    }

    /// Forgets every request and zeroes the rings, as after a device reset. Returns the
    /// tokens of the requests that were in flight, so their owners can be failed. The device
    /// must be stopped (reset, or the vring stopped) before calling this.
    pub fn reset(&mut self) -> Vec<u64> {
        let tokens = self
            .state
            .iter()
            .filter_map(|s| match s {
                DescState::Head { token, .. } => Some(*token),
                _ => None,
            })
            .collect();
        self.ring.zero();
        let interrupts = self.interrupts;
        self.init_state();
        self.interrupts = !interrupts;
        if interrupts {
            self.enable_interrupts();
        } else {
            self.disable_interrupts();
        }
        tokens
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn features(&self) -> &QueueFeatures {
        &self.features
    }

    /// IOVAs of the descriptor table, available ring and used ring.
    pub fn addrs(&self) -> RingAddrs {
        let base = self.ring.buf().iova();
        RingAddrs { desc: base, avail: base + self.layout.avail as u64, used: base + self.layout.used as u64 }
    }

    /// Requests added and not yet completed (published or not).
    pub fn in_flight(&self) -> u16 {
        self.published_in_flight + self.pending.len() as u16
    }

    /// Free descriptors. Each request takes one with INDIRECT (when it has more than one
    /// segment, or exactly one without), otherwise one per segment.
    pub fn free_slots(&self) -> u16 {
        self.num_free
    }

    /// The avail index the device should start from (vhost-user SET_VRING_BASE).
    pub fn avail_idx(&self) -> u16 {
        self.published_idx
    }

    /// The used index the driver will consume next.
    pub fn last_used_idx(&self) -> u16 {
        self.last_used
    }

    /// Tolerates used lengths larger than the writable bytes of a request, reporting the
    /// writable bytes instead of failing the queue. For device types whose implementations are
    /// known to count readable bytes too (QEMU's virtio-scsi adds the data-out length); the
    /// driver must then not rely on the length. Nothing beyond the writable bytes is ever read.
    pub fn clamp_used_len(&mut self, clamp: bool) {
        self.clamp_used_len = clamp;
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Most segments one request may have.
    pub fn max_segments(&self) -> u16 {
        if self.features.indirect {
            self.features.max_segments
        } else {
            self.features.max_segments.min(self.size)
        }
    }

    /// Adds one request: `readable` segments (driver to device) first, then `writable` ones
    /// (device to driver), as the spec requires. `token` comes back in the completion. The
    /// device does not see the request until [`publish`](Self::publish).
    pub fn add(&mut self, readable: &[Segment], writable: &[Segment], token: u64) -> Result<(), QueueError> {
        if self.broken {
            return Err(QueueError::Broken);
        }
        let total = readable.len() + writable.len();
        if total == 0 {
            return Err(QueueError::EmptyChain);
        }
        let max = self.max_segments();
        if total > max as usize {
            return Err(QueueError::TooManySegments { segments: total, max });
        }
        let segments =
            || readable.iter().map(|s| (s, 0)).chain(writable.iter().map(|s| (s, VIRTQ_DESC_F_WRITE)));
        let mut writable_bytes = 0u64;
        for (index, (seg, flags)) in segments().enumerate() {
            if seg.len == 0 {
                return Err(QueueError::ZeroLengthSegment { index });
            }
            if flags & VIRTQ_DESC_F_WRITE != 0 {
                writable_bytes += u64::from(seg.len);
            }
        }
        let indirect = self.indirect.as_ref().filter(|_| total > 1);
        let needed = if indirect.is_some() { 1 } else { total as u16 };
        if needed > self.num_free {
            return Err(QueueError::Full);
        }

        let head = self.free_head;
        if let Some(tables) = indirect {
            let table_bytes = self.features.max_segments as usize * DESC_SIZE;
            let table_off = head as usize * table_bytes;
            for (i, (seg, flags)) in segments().enumerate() {
                let last = i + 1 == total;
                let flags = if last { flags } else { flags | VIRTQ_DESC_F_NEXT };
                let next = if last { 0 } else { i as u16 + 1 };
                tables.write_desc(table_off + i * DESC_SIZE, seg.iova, seg.len, flags, next);
            }
            let table_iova = tables.buf().iova() + table_off as u64;
            let len = (total * DESC_SIZE) as u32;
            self.ring.write_desc(self.layout.desc(head), table_iova, len, VIRTQ_DESC_F_INDIRECT, 0);
            self.free_head = self.next[head as usize];
        } else {
            let mut idx = head;
            for (i, (seg, flags)) in segments().enumerate() {
                let last = i + 1 == total;
                let next = self.next[idx as usize];
                let flags = if last { flags } else { flags | VIRTQ_DESC_F_NEXT };
                self.ring.write_desc(
                    self.layout.desc(idx),
                    seg.iova,
                    seg.len,
                    flags,
                    if last { 0 } else { next },
                );
                if i > 0 {
                    self.state[idx as usize] = DescState::Member { head };
                }
                idx = next;
            }
            self.free_head = idx;
        }
        self.num_free -= needed;
        self.state[head as usize] =
            DescState::Head { token, descs: needed, writable: writable_bytes, published: false };

        // The ring entry may be written now: the device reads no further than avail->idx.
        let slot = self.next_avail & (self.size - 1);
        self.ring.write_u16(self.layout.avail_ring(slot), head);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.pending.push(head);
        Ok(())
    }

    /// Makes every added request visible to the device and returns whether the device must
    /// be notified (kicked). One notification covers all requests published so far.
    pub fn publish(&mut self) -> bool {
        if self.pending.is_empty() || self.broken {
            return false;
        }
        // Release: descriptors and ring entries are visible before the new index.
        self.ring.store_u16_release(self.layout.avail_idx(), self.next_avail);
        for &head in &self.pending {
            if let DescState::Head { published, .. } = &mut self.state[head as usize] {
                *published = true;
            }
        }
        self.published_in_flight += self.pending.len() as u16;
        self.pending.clear();
        let old = self.published_idx;
        let new = self.next_avail;
        self.published_idx = new;

        // Full barrier: the index store must be visible before we read the device's
        // suppression state, or both sides could decide the other one will act.
        fence(Ordering::SeqCst);
        if self.features.event_idx {
            let avail_event = self.ring.read_u16(self.layout.avail_event());
            vring_need_event(avail_event, new, old)
        } else {
            self.ring.read_u16(self.layout.used_flags()) & VIRTQ_USED_F_NO_NOTIFY == 0
        }
    }

    /// True when the device has returned completions not yet popped.
    pub fn has_used(&self) -> bool {
        !self.broken && self.ring.load_u16_acquire(self.layout.used_idx()) != self.last_used
    }

    /// Takes the next completion, if any, after validating it. The request's descriptors
    /// are free again when this returns.
    pub fn pop_used(&mut self) -> Result<Option<Completion>, QueueError> {
        if self.broken {
            return Err(QueueError::Broken);
        }
        let used_idx = self.ring.load_u16_acquire(self.layout.used_idx());
        if used_idx == self.last_used {
            return Ok(None);
        }
        let ready = used_idx.wrapping_sub(self.last_used);
        if ready > self.published_in_flight {
            return Err(self.device_bug(DeviceBug::UsedIndexJump {
                last_used: self.last_used,
                used_idx,
                in_flight: self.published_in_flight,
            }));
        }
        let elem = self.layout.used_elem(self.last_used & (self.size - 1));
        let id = self.ring.read_u32(elem);
        let mut len = self.ring.read_u32(elem + 4);
        let head = match u16::try_from(id) {
            Ok(h) if h < self.size => h,
            _ => return Err(self.device_bug(DeviceBug::IdOutOfRange { id, size: self.size })),
        };
        let (token, descs) = match self.state[head as usize] {
            DescState::Head { token, descs, writable, published: true } => {
                if u64::from(len) > writable {
                    if !self.clamp_used_len {
                        return Err(self.device_bug(DeviceBug::LengthTooLarge { id, len, writable }));
                    }
                    len = writable as u32;
                }
                (token, descs)
            }
            DescState::Head { published: false, .. } => {
                return Err(self.device_bug(DeviceBug::NotPublished { id }))
            }
            DescState::Member { head: chain } => {
                return Err(self.device_bug(DeviceBug::NotAHead { id, head: chain }))
            }
            DescState::Free => return Err(self.device_bug(DeviceBug::NotInFlight { id })),
        };

        // Return the chain to the free list, following the driver's own links.
        let mut last = head;
        self.state[head as usize] = DescState::Free;
        for _ in 1..descs {
            last = self.next[last as usize];
            self.state[last as usize] = DescState::Free;
        }
        self.next[last as usize] = self.free_head;
        self.free_head = head;
        self.num_free += descs;
        self.published_in_flight -= 1;
        self.last_used = self.last_used.wrapping_add(1);

        if self.features.event_idx {
            if self.interrupts {
                // Ask for an interrupt at the next completion after this one.
                self.ring.write_u16(self.layout.used_event(), self.last_used);
                fence(Ordering::SeqCst);
            } else if self.last_used.wrapping_sub(self.used_event_parked_at) >= USED_EVENT_REFRESH {
                self.park_used_event();
            }
        }
        Ok(Some(Completion { token, len }))
    }

    /// Asks the device not to interrupt (the default: completions are polled).
    pub fn disable_interrupts(&mut self) {
        if !self.interrupts {
            return;
        }
        self.interrupts = false;
        if self.features.event_idx {
            self.park_used_event();
        } else {
            self.ring.write_u16(self.layout.avail_flags(), VIRTQ_AVAIL_F_NO_INTERRUPT);
        }
    }

    /// Asks the device to interrupt on the next completion. Returns true when completions
    /// are already waiting: the caller must poll them rather than wait for an interrupt
    /// that may never come.
    pub fn enable_interrupts(&mut self) -> bool {
        if !self.interrupts {
            self.interrupts = true;
            if self.features.event_idx {
                self.ring.write_u16(self.layout.used_event(), self.last_used);
            } else {
                self.ring.write_u16(self.layout.avail_flags(), 0);
            }
        }
        // The request must be visible before we check whether the device already wrote.
        fence(Ordering::SeqCst);
        self.has_used()
    }

    /// Parks used_event one behind last_used: the device crosses it only after 2^16 - 1
    /// more completions, and we move it again long before that.
    fn park_used_event(&mut self) {
        self.ring.write_u16(self.layout.used_event(), self.last_used.wrapping_sub(1));
        self.used_event_parked_at = self.last_used;
    }

    fn device_bug(&mut self, bug: DeviceBug) -> QueueError {
        log::error!("virtqueue: {bug}");
        self.broken = true;
        QueueError::DeviceBug(bug)
    }
}

impl std::fmt::Debug for SplitQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitQueue")
            .field("size", &self.size)
            .field("features", &self.features)
            .field("addrs", &self.addrs())
            .field("in_flight", &self.in_flight())
            .field("free", &self.num_free)
            .field("broken", &self.broken)
            .finish()
    }
}
