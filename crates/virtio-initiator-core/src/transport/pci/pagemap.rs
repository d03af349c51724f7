//! Physical addresses of our own memory, from `/proc/self/pagemap`, for devices that bypass the
//! IOMMU (no VIRTIO_F_ACCESS_PLATFORM) and so must be given physical addresses.
//!
//! Each 8-byte pagemap entry describes one base page: bit 63 "present", bits 0..=54 the page
//! frame number. The kernel shows frame numbers only to CAP_SYS_ADMIN; others read zero.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const PAGEMAP: &str = "/proc/self/pagemap";
const ENTRY_BYTES: u64 = 8;
const PRESENT: u64 = 1 << 63;
const PFN_MASK: u64 = (1 << 55) - 1;

fn base_page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

/// Decodes one pagemap entry into the physical address of its page, or why it has none.
pub fn decode_entry(entry: u64, vaddr: u64, base_page: u64) -> io::Result<u64> {
    if entry & PRESENT == 0 {
        return Err(io::Error::other(format!("page at {vaddr:#x} is not present in memory")));
    }
    let pfn = entry & PFN_MASK;
    if pfn == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{PAGEMAP} shows no frame number for {vaddr:#x}: reading physical addresses needs \
                 CAP_SYS_ADMIN"
            ),
        ));
    }
    Ok(pfn * base_page + vaddr % base_page)
}

/// The physical address of one byte of our address space. The page must be resident (the
/// DMA pool populates its pages when it maps them).
pub fn physical_address(vaddr: u64) -> io::Result<u64> {
    let file = open()?;
    read_one(&file, vaddr, base_page_size())
}

fn open() -> io::Result<File> {
    File::open(PAGEMAP).map_err(|e| io::Error::new(e.kind(), format!("{PAGEMAP}: {e}")))
}

fn read_one(file: &File, vaddr: u64, base_page: u64) -> io::Result<u64> {
    let mut raw = [0u8; ENTRY_BYTES as usize];
    file.read_exact_at(&mut raw, vaddr / base_page * ENTRY_BYTES)
        .map_err(|e| io::Error::new(e.kind(), format!("{PAGEMAP} at {vaddr:#x}: {e}")))?;
    decode_entry(u64::from_ne_bytes(raw), vaddr, base_page)
}

/// Physical address of each of `pages` pages of `page_size` bytes from `host_addr`. For a
/// hugepage it checks that the base pages inside it really are contiguous (its first and last
/// base page), which a hugepage always is; anything else means the memory is not what the
/// caller thinks it is. Matches [`crate::memory::PhysResolver`].
pub fn resolve(host_addr: u64, page_size: u64, pages: usize) -> io::Result<Vec<u64>> {
    let base = base_page_size();
    if page_size == 0 || page_size % base != 0 || host_addr % page_size != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot resolve pages of {page_size} bytes at {host_addr:#x}"),
        ));
    }
    let file = open()?;
    let mut out = Vec::with_capacity(pages);
    for i in 0..pages as u64 {
        let vaddr = host_addr + i * page_size;
        let pa = read_one(&file, vaddr, base)?;
        if page_size > base {
            let last = read_one(&file, vaddr + page_size - base, base)?;
            if last != pa + page_size - base {
                return Err(io::Error::other(format!(
                    "the {page_size}-byte page at {vaddr:#x} is not physically contiguous \
                     ({pa:#x} .. {last:#x})"
                )));
            }
        }
        out.push(pa);
    }
    Ok(out)
}
