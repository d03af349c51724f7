//! A vhost-user-scsi target: virtio-scsi served over a vhost-user unix socket, with RAM, null and
//! file-backed LUNs, hotplug, and fault injection for testing initiators.
//!
//! `scsi` is the logical-unit emulation (SPC-4/SBC-3), `storage` the data behind a LUN, `device`
//! the virtio-scsi device on top of `vhost-user-backend`, `blk` virtio-blk requests on the same
//! storage, `server` the socket loop and `control` the management socket.

pub mod blk;
pub mod cli;
pub mod control;
pub mod device;
pub mod scsi;
pub mod server;
pub mod signals;
pub mod storage;
