//! virtio-blk on the same storage backends as the SCSI LUNs.

pub mod request;

pub use request::{execute, Disk, Done};
