//! The driver: device initialisation, DMA memory, and the request queues handed out as
//! channels, the same for every device type; the device layers (`scsi`, `blk`) add what differs:
//! features, configuration, how a request is framed, and virtio-scsi's control and event queues.
//! It talks to the device only through [`Transport`], so vhost-user and PCI share all of it.
//!
//! [`Transport`]: crate::transport::Transport

mod blk;
mod channel;
mod controller;
mod dma;
mod records;
mod scsi;
mod shared;

pub use blk::BlkConfig;
pub use channel::{HostBuffer, RequestChannel, RESPONSE_REFUSED};
pub use controller::{
    Closing, Controller, ControllerInfo, ControllerOptions, DeviceConfig, DeviceType, ScsiEvent,
};
pub use dma::Span;
pub use records::{
    read_write_cdb, scsi_cdb, CompletionArea, CompletionRecord, DataRef, Direction, Request, SubmitRecord,
    COMPLETION_RECORD_SIZE, COMPLETION_SLOT_SIZE, FLAG_DATA_ADDRESS, FLAG_FUA, FLAG_LONG_CDB, FLAG_UNMAP,
    SUBMIT_RECORD_SIZE,
};
pub use shared::QueueShare;

/// Why a controller or channel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
    #[error("{0}")]
    Config(String),
    #[error("all {0} request queues are in use")]
    NoFreeQueue(u16),
    #[error(
        "DMA memory exhausted: {requested} bytes wanted, {have} bytes in use of a limit of {limit} \
         (raise maxMemoryBytes): {cause}"
    )]
    MemoryLimit { requested: u64, have: u64, limit: u64, cause: crate::memory::MemoryError },
    #[error("controller failed: {0}")]
    Failed(String),
    #[error("controller is closed")]
    Closed,
    #[error("request {index}: {detail}")]
    BadRequest { index: usize, detail: String },
    #[error("task management timed out after {0:?}")]
    Timeout(std::time::Duration),
}
