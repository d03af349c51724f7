//! Driver-side virtqueues (design D2).
//!
//! A [`SplitQueue`] lives in DMA memory from the pool and belongs to one thread: adding,
//! publishing and popping take no locks. Requests are published in batches, notifications
//! and interrupts follow the device's and driver's suppression settings (flags or
//! EVENT_IDX), and every completion the device reports is checked before it is trusted.

mod layout;
mod ring;
mod split;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use thiserror::Error;

use crate::memory::{DmaBuf, MemoryError};

pub use layout::{
    vring_need_event, MAX_QUEUE_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
};
pub use split::SplitQueue;

/// Features that shape the ring, as negotiated with the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueFeatures {
    /// VIRTIO_F_EVENT_IDX (VIRTIO_RING_F_EVENT_IDX).
    pub event_idx: bool,
    /// VIRTIO_F_INDIRECT_DESC (VIRTIO_RING_F_INDIRECT_DESC).
    pub indirect: bool,
    /// Most segments per request, 1..=1024; an indirect table of this many descriptors is
    /// preallocated per ring slot. Pick it from the device's limit (virtio-scsi `seg_max`
    /// plus the request and response headers).
    pub max_segments: u16,
}

impl Default for QueueFeatures {
    fn default() -> Self {
        QueueFeatures { event_idx: false, indirect: false, max_segments: 64 }
    }
}

/// One buffer of a request, as the device addresses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub iova: u64,
    pub len: u32,
}

impl Segment {
    pub fn new(iova: u64, len: u32) -> Self {
        Segment { iova, len }
    }

    /// `len` bytes at `offset` of a DMA buffer.
    pub fn within(buf: &DmaBuf, offset: usize, len: usize) -> Result<Self, QueueError> {
        let end = offset.checked_add(len);
        if end.map_or(true, |end| end > buf.len()) {
            return Err(QueueError::SegmentOutOfBuffer { offset, len, size: buf.len() });
        }
        let len = u32::try_from(len).map_err(|_| QueueError::SegmentTooLong(len))?;
        Ok(Segment { iova: buf.iova() + offset as u64, len })
    }
}

impl TryFrom<&DmaBuf> for Segment {
    type Error = QueueError;

    /// The whole buffer as one segment.
    fn try_from(buf: &DmaBuf) -> Result<Self, QueueError> {
        Segment::within(buf, 0, buf.len())
    }
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub token: u64,
    /// Bytes the device wrote into the request's writable segments.
    pub len: u32,
}

/// IOVAs of the three ring areas (vhost-user SET_VRING_ADDR, virtio-pci queue_desc /
/// queue_driver / queue_device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// A device broke the virtqueue protocol. The queue stops, and the caller should fail the
/// controller (reset it, or disconnect).
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum DeviceBug {
    #[error("used ring entry with id {id}, but the queue has only {size} descriptors")]
    IdOutOfRange { id: u32, size: u16 },
    #[error("used ring entry with id {id}, which is not a request in flight")]
    NotInFlight { id: u32 },
    #[error("used ring entry with id {id}, which is inside the chain headed by {head}")]
    NotAHead { id: u32, head: u16 },
    #[error("used ring entry with id {id}, a request that was never made available")]
    NotPublished { id: u32 },
    #[error("used ring entry with id {id} reports {len} bytes written, but only {writable} are writable")]
    LengthTooLarge { id: u32, len: u32, writable: u64 },
    #[error("used index moved from {last_used} to {used_idx}, but only {in_flight} requests are in flight")]
    UsedIndexJump { last_used: u16, used_idx: u16, in_flight: u16 },
}

#[derive(Debug, Error)]
pub enum QueueError {
    #[error("invalid queue size {0}: must be a power of two from 1 to 1024")]
    InvalidSize(u16),
    #[error("invalid max_segments {0}: must be from 1 to 1024")]
    InvalidMaxSegments(u16),
    #[error("a request needs at least one segment")]
    EmptyChain,
    #[error("segment {index} of the request has length zero")]
    ZeroLengthSegment { index: usize },
    #[error("request has {segments} segments, at most {max} are supported")]
    TooManySegments { segments: usize, max: u16 },
    #[error("segment of {0} bytes is longer than a descriptor can describe")]
    SegmentTooLong(usize),
    #[error("segment {offset}+{len} is outside a {size}-byte buffer")]
    SegmentOutOfBuffer { offset: usize, len: usize, size: usize },
    #[error("virtqueue is full")]
    Full,
    #[error("device bug: {0}")]
    DeviceBug(DeviceBug),
    #[error("virtqueue stopped after a device bug; reset it")]
    Broken,
    #[error(transparent)]
    Memory(#[from] MemoryError),
}
