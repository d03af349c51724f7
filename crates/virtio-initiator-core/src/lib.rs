//! Transport-independent core of the virtio-initiator.
//!
//! - [`memory`]: the DMA pool every controller owns. It is the only memory a device (a
//!   vhost-user backend process or a VFIO-assigned PCI function) ever sees, described as a
//!   handful of regions, each with an IOVA, a host address and a file descriptor.
//! - [`transport`]: how the driver reaches a device (vhost-user socket; PCI through VFIO).
//! - [`scsi`]: the virtio-scsi device layer: controller, control and event queues, request
//!   channels exchanging packed request and completion records.
//! - [`queue`]: driver-side split virtqueues living in that pool, with notification
//!   suppression and validation of everything the device writes back.

pub mod driver;
pub mod memory;
pub mod queue;
pub mod transport;

pub use memory::{Arena, DmaBuf, DmaPool, HugePages, MemoryError, PoolConfig, Region};
pub use queue::{Completion, DeviceBug, QueueError, QueueFeatures, RingAddrs, Segment, SplitQueue};
