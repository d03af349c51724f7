//! Wire layouts of virtio-scsi (virtio 1.2, section 5.6) and the SCSI constants that both the
//! initiator and the bundled target speak.
//!
//! Every structure is encoded and decoded explicitly in little-endian byte order, so neither
//! side depends on host struct layout or needs `unsafe` to read guest memory.

pub mod lun;
pub mod scsi;
pub mod wire;

pub use lun::LunAddress;
pub use wire::*;
