//! virtio-blk on the same storage backends as the SCSI LUNs: the vhost-user-blk device
//! (`device`) and the execution of its requests (`request`).

pub mod device;
pub mod request;

pub use device::{BlkBackend, BlkOptions};
pub use request::{execute, Disk, Done};
