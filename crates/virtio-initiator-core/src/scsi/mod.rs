//! The virtio-scsi device layer: device initialisation, the control and event queues, and the
//! request queues handed out as channels. It talks to the device only through [`Transport`],
//! so vhost-user and PCI share all of it.
//!
//! [`Transport`]: crate::transport::Transport

mod channel;
mod controller;
mod dma;
mod records;
mod shared;

pub use channel::{HostBuffer, RequestChannel, RESPONSE_REFUSED};
pub use controller::{Closing, ControllerInfo, ControllerOptions, ScsiController, ScsiEvent};
pub use dma::Span;
pub use records::{
    read_write_cdb, CompletionArea, CompletionRecord, DataRef, Direction, SubmitRecord,
    COMPLETION_RECORD_SIZE, COMPLETION_SLOT_SIZE, FLAG_DATA_ADDRESS, FLAG_FUA, FLAG_LONG_CDB,
    SUBMIT_RECORD_SIZE,
};
pub use shared::QueueShare;

/// Why a controller or channel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ScsiError {
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
