//! virtio-blk on the same storage backends as the SCSI LUNs: the vhost-user-blk device
//! (`device`) and the execution of its requests (`request`).

pub mod device;
pub mod request;

pub use device::{BlkBackend, BlkFault, BlkOptions};
pub use request::{answer, execute, Disk, Done};
