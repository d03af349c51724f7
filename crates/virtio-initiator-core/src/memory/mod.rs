//! DMA memory (design D1): the pool a device may access, carved into arenas and buffers.
//!
//! ```text
//! DmaPool ── regions (memfd + MAP_SHARED mapping, 2 MiB aligned IOVAs)
//!    ├── carve(bytes)        -> Arena   (one owner, lock-free alloc/free)  -> DmaBuf
//!    └── alloc_shared(len)   -> DmaBuf  (long-lived, returned to the pool on drop)
//! ```
//!
//! Every buffer has an IOVA (what descriptors carry) and a host pointer. In vhost-user mode
//! the IOVA space is just the layout announced with SET_MEM_TABLE; in PCI mode the same
//! regions are mapped into the VFIO container at those IOVAs.

mod arena;
mod backing;
mod buf;
mod error;
mod freelist;
mod pool;

pub use arena::Arena;
pub use backing::{free_hugepages, HugePages, PhysResolver, HUGE_PAGE_SIZE};
pub use buf::DmaBuf;
pub use error::MemoryError;
pub use pool::{DmaPool, IovaPlacement, PoolConfig, Region, SCATTER_PAGES_ENV};

#[cfg(test)]
pub(crate) use backing::physical_runs as physical_runs_for_tests;

#[cfg(test)]
mod tests;
