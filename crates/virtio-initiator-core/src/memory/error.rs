use std::io;

use thiserror::Error;

/// Errors of the DMA pool and its allocators.
#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("invalid DMA pool size {size}: must be greater than zero and fit the address space")]
    InvalidSize { size: u64 },

    #[error("IOVA base {base:#x} is not aligned to 2 MiB")]
    UnalignedIovaBase { base: u64 },

    #[error("IOVA space exhausted: a region of {size} bytes after {next:#x} overflows 64 bits")]
    IovaOverflow { next: u64, size: u64 },

    #[error("DMA pool already has the maximum of {max} regions")]
    TooManyRegions { max: usize },

    #[error("memfd_create failed (hugetlb: {hugetlb}): {source}")]
    MemfdCreate {
        hugetlb: bool,
        #[source]
        source: io::Error,
    },

    #[error(
        "hugepages not available: {available} free 2 MiB hugepages of {needed} needed \
         (reserve more through /proc/sys/vm/nr_hugepages)"
    )]
    HugePagesUnavailable { needed: u64, available: u64 },

    #[error("ftruncate of the DMA memfd to {size} bytes failed: {source}")]
    Truncate {
        size: u64,
        #[source]
        source: io::Error,
    },

    #[error(
        "allocating {size} bytes of DMA memory failed (hugetlb: {hugetlb}): {source}{hint}",
        hint = if *.hugetlb { " (see /proc/sys/vm/nr_hugepages)" } else { "" }
    )]
    Allocate {
        size: u64,
        hugetlb: bool,
        #[source]
        source: io::Error,
    },

    #[error("mmap of {size} bytes of DMA memory failed (hugetlb: {hugetlb}): {message}")]
    Mmap { size: u64, hugetlb: bool, message: String },

    #[error("DMA region table rejected a new region: {0}")]
    RegionTable(String),

    #[error(
        "DMA memory exhausted: requested {requested} bytes, {available} bytes free \
         (largest contiguous block {largest} bytes)"
    )]
    Exhausted { requested: u64, available: u64, largest: u64 },

    #[error("a zero-length DMA allocation was requested")]
    ZeroLength,

    #[error("invalid DMA alignment {align}: must be a power of two")]
    InvalidAlignment { align: u64 },

    #[error("buffer at IOVA {iova:#x} was not allocated from this arena")]
    ForeignBuffer { iova: u64 },

    #[error("IOVA range {iova:#x}+{len} is not inside the DMA pool")]
    BadIova { iova: u64, len: u64 },

    #[error("a DMA pool placed at physical addresses needs hugepages (hugepages: never was asked for)")]
    PhysicalNeedsHugePages,

    #[error("cannot find the physical address of DMA memory: {0}")]
    PhysicalAddress(String),

    #[error("a DMA pool placed at physical addresses cannot grow; create it with the size it needs")]
    PhysicalCannotGrow,

    #[error("access of {len} bytes at offset {offset} is outside a {size}-byte DMA buffer")]
    OutOfBounds { offset: usize, len: usize, size: usize },
}
