//! How the driver reaches a device: the operations that differ between a vhost-user socket and
//! a PCI function behind VFIO. Rings, memory and the virtio-scsi device layer sit above this
//! trait and are shared by every transport.

pub mod pci;
pub mod vhost_user;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::memory::{PoolConfig, Region};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("{path} does not answer as a vhost-user backend: {detail}")]
    NotVhostUser { path: String, detail: String },
    #[error("vhost-user {request} failed: {detail}")]
    Protocol { request: &'static str, detail: String },
    #[error("the vhost-user backend at {path} did not answer {request} within {after:?}; the connection was closed")]
    Timeout { path: String, request: &'static str, after: std::time::Duration },
    #[error("the device does not support {0}")]
    Unsupported(&'static str),
    #[error("the device rejected the features {0:#x}")]
    FeaturesRejected(u64),
    #[error("queue {index}: {detail}")]
    Queue { index: u16, detail: String },
    #[error("the device is gone: {0}")]
    Disconnected(String),
    #[error(transparent)]
    Pci(#[from] pci::PciError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl TransportError {
    /// The errno name of a failed connection (ECONNREFUSED, ENOENT, ...), for callers that act
    /// on the cause rather than the text.
    pub fn errno_name(&self) -> Option<&'static str> {
        let source = match self {
            TransportError::Connect { source, .. } => source,
            TransportError::Timeout { .. } => return Some("ETIMEDOUT"),
            _ => return None,
        };
        Some(match source.raw_os_error()? {
            libc::ECONNREFUSED => "ECONNREFUSED",
            libc::ENOENT => "ENOENT",
            libc::ENOTSOCK => "ENOTSOCK",
            libc::EACCES => "EACCES",
            libc::EPERM => "EPERM",
            libc::ETIMEDOUT => "ETIMEDOUT",
            libc::ECONNRESET => "ECONNRESET",
            libc::EAGAIN => "EAGAIN",
            _ => return None,
        })
    }
}

pub type Result<T> = std::result::Result<T, TransportError>;

/// Where a ring's three parts live, both as the device addresses them (IOVA) and in our own
/// address space. vhost-user takes ring addresses in the frontend's address space; a PCI device
/// takes IOVAs.
#[derive(Clone, Copy, Debug)]
pub struct RingAddresses {
    pub size: u16,
    pub desc_iova: u64,
    pub avail_iova: u64,
    pub used_iova: u64,
    pub desc_host: u64,
    pub avail_host: u64,
    pub used_host: u64,
}

/// Tells the device that a queue has new buffers.
pub enum Notifier {
    /// vhost-user: the queue's kick eventfd.
    EventFd(EventFd),
    /// PCI: a 16-bit write of the queue index into the notify area of a mapped BAR.
    Mmio { addr: *mut u16, queue: u16 },
    /// PCI, when the BAR cannot be mapped: the same write through the VFIO device file at
    /// the notify address's offset. (The file keeps the device open until the queue is gone.)
    File { file: Arc<File>, offset: u64, queue: u16 },
}

// SAFETY: the MMIO address points into a BAR mapping of the PCI transport. When the transport
// lets the device go (controller closed), it replaces those pages with inert anonymous memory
// instead of unmapping them, so the address stays writable for as long as a queue may hold it;
// writing to it from whichever thread owns the queue is what the device expects.
unsafe impl Send for Notifier {}

impl Notifier {
    #[inline]
    pub fn notify(&self) -> io::Result<()> {
        match self {
            Notifier::EventFd(fd) => fd.write(1),
            Notifier::Mmio { addr, queue } => {
                // SAFETY: see `unsafe impl Send`: the mapping outlives the notifier, and a
                // volatile store is how a doorbell register must be written.
                unsafe { std::ptr::write_volatile(*addr, queue.to_le()) };
                Ok(())
            }
            Notifier::File { file, offset, queue } => file.write_all_at(&queue.to_le_bytes(), *offset),
        }
    }
}

/// A queue as set up on the device.
pub struct QueueHandle {
    pub notifier: Notifier,
    /// Signalled by the device on completions when interrupts are enabled (vhost-user call
    /// eventfd, which the protocol wants set even in poll mode); `None` where the transport has
    /// no such descriptor.
    pub interrupt: Option<EventFd>,
}

/// The transport operations a virtio driver needs, in the order it needs them.
pub trait Transport: Send {
    /// Feature bits the device offers.
    fn device_features(&mut self) -> Result<u64>;
    /// Acknowledges the features the driver uses (a subset of the offer).
    fn set_features(&mut self, features: u64) -> Result<()>;
    /// Number of virtqueues the device has, when the transport can tell.
    fn queue_count(&mut self) -> Result<Option<u16>>;
    /// Largest size of queue `index`, when the transport can tell.
    fn max_queue_size(&mut self, index: u16) -> Result<Option<u16>>;
    /// Reads the device-specific configuration space.
    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()>;
    /// Adapts the DMA pool's settings to what the device can address, once the features are
    /// set and before the pool exists: a PCI function picks IOVAs inside its IOMMU's ranges,
    /// or physical placement when it bypasses the IOMMU. The default keeps them.
    fn pool_config(&mut self, config: PoolConfig) -> Result<PoolConfig> {
        Ok(config)
    }
    /// Makes the DMA pool's regions visible to the device (replacing earlier ones).
    fn set_memory(&mut self, regions: &[Region]) -> Result<()>;
    /// Adds one region to what the device sees (the pool grew).
    fn add_memory(&mut self, region: &Region) -> Result<()>;
    /// Sets up and enables queue `index` on the given rings.
    fn setup_queue(&mut self, index: u16, rings: &RingAddresses) -> Result<QueueHandle>;
    /// Declares the driver ready; the device may process queues from now on.
    fn start(&mut self) -> Result<()>;
    /// Stops one queue, so that the device neither reads its rings nor completes its requests
    /// any more (vhost-user GET_VRING_BASE); it can then be set up again with `setup_queue`.
    /// False when the transport cannot stop a single queue.
    fn stop_queue(&mut self, _index: u16) -> Result<bool> {
        Ok(false)
    }
    /// Stops the device and forgets every queue.
    fn reset(&mut self) -> Result<()>;
    /// Resets the device and brings it back to where opening left it (acknowledged, a driver
    /// found), for features and queues to be set up again on the same memory: a PCI function.
    /// A vhost-user device comes back over a new connection instead.
    fn reinit(&mut self) -> Result<()> {
        Err(TransportError::Unsupported("a reset and re-initialisation in place"))
    }
    /// Returns an error once the device can no longer be reached.
    fn check_alive(&mut self) -> Result<()>;
    /// True once the device is known to have let go of our memory without being stopped (a
    /// vhost-user backend that closed its connection): queues can then be reused as they are.
    fn released(&mut self) -> bool {
        false
    }
    /// The virtio device type (2 block, 8 SCSI) when the transport can tell (a PCI function's
    /// id); vhost-user cannot.
    fn device_type(&self) -> Option<u32> {
        None
    }
    /// A short name for messages ("vhost-user /run/x.sock", "pci 0000:00:03.0").
    fn describe(&self) -> String;
}
