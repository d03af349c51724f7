use std::collections::HashSet;

use vm_memory::{Bytes, GuestAddress};

use super::*;

const MIB: u64 = 1 << 20;

fn plain_pool(size: u64) -> DmaPool {
    DmaPool::new(PoolConfig::new(size).hugepages(HugePages::Never)).expect("plain memfd pool")
}

/// A reproducible byte pattern distinct for every (seed, offset).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn fd_target(fd: i32) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap().to_string_lossy().into_owned()
}

#[test]
fn plain_memfd_pool_round_trips_data() {
    let pool = plain_pool(MIB);
    let regions = pool.regions();
    assert_eq!(regions.len(), 1);
    let r = &regions[0];
    assert_eq!(r.iova, PoolConfig::DEFAULT_IOVA_BASE);
    assert_eq!(r.size, MIB);
    assert!(!r.hugepages);
    assert_eq!(r.fd_offset, 0);
    assert!(fd_target(r.raw_fd()).contains("memfd:virtio-initiator-dma"));

    let mut buf = pool.alloc_shared(8192).unwrap();
    assert!(r.contains(buf.iova(), 8192));
    assert_eq!(buf.as_ptr() as u64 - r.host_addr, buf.iova() - r.iova);
    let data = pattern(1, 8192);
    buf.as_mut_slice().copy_from_slice(&data);

    // The device's view: read through the IOVA translation.
    let mut seen = vec![0u8; 8192];
    pool.memory().read_slice(&mut seen, GuestAddress(buf.iova())).unwrap();
    assert_eq!(seen, data);

    // And the other way round: a "device" write shows up in the buffer.
    let reply = pattern(2, 100);
    pool.memory().write_slice(&reply, GuestAddress(buf.iova() + 4000)).unwrap();
    let mut back = vec![0u8; 100];
    buf.read_at(4000, &mut back).unwrap();
    assert_eq!(back, reply);
}

#[test]
fn memfd_is_shared_memory_visible_through_the_fd() {
    // A backend maps the region's fd itself; emulate that with a second mapping.
    let pool = plain_pool(MIB);
    let r = pool.regions()[0].clone();
    let mut buf = pool.alloc_shared(4096).unwrap();
    buf.write_at(0, b"shared through the memfd").unwrap();
    let offset = buf.iova() - r.iova;
    // SAFETY: mapping a fresh read-only view of our own memfd and unmapping it below.
    let view = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            r.size as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            r.raw_fd(),
            r.fd_offset as libc::off_t,
        )
    };
    assert_ne!(view, libc::MAP_FAILED);
    // SAFETY: the view is r.size bytes long and offset + 24 is inside it.
    let seen = unsafe { std::slice::from_raw_parts((view as *const u8).add(offset as usize), 24) };
    assert_eq!(seen, b"shared through the memfd");
    // SAFETY: unmapping the view created above.
    unsafe { libc::munmap(view, r.size as usize) };
}

fn meminfo_free_hugepages() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo.lines().find_map(|l| l.strip_prefix("HugePages_Free:")?.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn hugepage_pool_rounds_to_2mib_and_round_trips_data() {
    let free = meminfo_free_hugepages();
    let needed = 2;
    if free < needed && std::env::var("CI").as_deref() != Ok("true") {
        println!(
            "SKIPPED hugepage_pool_rounds_to_2mib_and_round_trips_data: /proc/meminfo shows \
             {free} free hugepages, {needed} needed (set /proc/sys/vm/nr_hugepages)"
        );
        return;
    }
    let pool = DmaPool::new(PoolConfig::new(3 * MIB).hugepages(HugePages::Require))
        .expect("hugepage pool (CI must provide 2 MiB hugepages)");
    let r = &pool.regions()[0];
    assert!(r.hugepages);
    assert_eq!(r.size, 4 * MIB);
    assert_eq!(r.host_addr % HUGE_PAGE_SIZE, 0, "hugetlb mappings are 2 MiB aligned");
    assert!(fd_target(r.raw_fd()).contains("memfd:virtio-initiator-dma"));

    let mut buf = pool.alloc_shared((3 * MIB) as usize).unwrap();
    let data = pattern(3, buf.len());
    buf.write_at(0, &data).unwrap();
    let mut seen = vec![0u8; data.len()];
    pool.memory().read_slice(&mut seen, GuestAddress(buf.iova())).unwrap();
    assert_eq!(seen, data);

    // Auto takes hugepages when they are there, for grown regions too.
    let mut auto = DmaPool::new(PoolConfig::new(MIB)).unwrap();
    assert!(auto.regions()[0].hugepages);
    assert_eq!(auto.regions()[0].size, 2 * MIB);
    let grown = auto.grow(1).unwrap();
    assert!(grown.hugepages);
    assert_eq!(grown.iova, PoolConfig::DEFAULT_IOVA_BASE + 2 * MIB);
}

#[test]
fn require_without_enough_hugepages_is_a_clear_error() {
    let available = free_hugepages().unwrap_or(0);
    // One page more than exist: refused by the up-front check, before any memory is touched.
    let size = (available + 1) * HUGE_PAGE_SIZE;
    let err = DmaPool::new(PoolConfig::new(size).hugepages(HugePages::Require)).unwrap_err();
    match &err {
        MemoryError::HugePagesUnavailable { needed, available: a } => {
            assert_eq!(*needed, available + 1);
            // Tests running beside this one may hold some of the pages by now.
            assert!(*a <= available, "{a} free now, {available} before");
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains("/proc/sys/vm/nr_hugepages"), "{err}");
}

#[test]
fn auto_falls_back_to_plain_memfd() {
    // More than the system has reserved in all: Auto cannot use hugepages and must fall back.
    let total: u64 = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let size = (total + 1) * HUGE_PAGE_SIZE;
    let pool = DmaPool::new(PoolConfig::new(size)).unwrap();
    assert!(!pool.regions()[0].hugepages);
    assert_eq!(pool.regions()[0].size, size);
}

#[test]
fn invalid_configs_are_errors() {
    assert!(matches!(
        DmaPool::new(PoolConfig::new(MIB).iova_base(0x1000)),
        Err(MemoryError::UnalignedIovaBase { base: 0x1000 })
    ));
    assert!(matches!(DmaPool::new(PoolConfig::new(0)), Err(MemoryError::InvalidSize { .. })));
    assert!(matches!(
        DmaPool::new(PoolConfig::new(MIB).hugepages(HugePages::Never).iova_base(!(HUGE_PAGE_SIZE - 1))),
        Err(MemoryError::IovaOverflow { .. })
    ));
    assert!(matches!(
        DmaPool::new(PoolConfig::new(u64::MAX).hugepages(HugePages::Never)),
        Err(MemoryError::InvalidSize { .. })
    ));
}

#[test]
fn grow_adds_aligned_regions_and_translation_spans_them() {
    let mut pool = DmaPool::new(
        PoolConfig::new(MIB + 4096).hugepages(HugePages::Never).iova_base(0x4000_0000).max_regions(2),
    )
    .unwrap();
    let second = pool.grow(3 * MIB).unwrap().clone();
    assert_eq!(second.iova, 0x4000_0000 + 2 * MIB, "next region starts at the next 2 MiB boundary");
    assert_eq!(second.size, 3 * MIB);
    assert_eq!(pool.regions().len(), 2);
    assert_ne!(pool.regions()[0].raw_fd(), second.raw_fd());
    assert_eq!(pool.total_size(), 4 * MIB + 4096);
    assert!(matches!(pool.grow(MIB), Err(MemoryError::TooManyRegions { max: 2 })));

    // Too big for the first region: must come from the second.
    let mut big = pool.alloc_shared((2 * MIB) as usize).unwrap();
    assert!(second.contains(big.iova(), 2 * MIB));
    let mut small = pool.alloc_shared(4096).unwrap();
    assert!(pool.regions()[0].contains(small.iova(), 4096));

    for (seed, buf) in [(10, &mut big), (11, &mut small)] {
        let data = pattern(seed, buf.len());
        buf.write_at(0, &data).unwrap();
        assert_eq!(pool.translate(buf.iova(), buf.len()).unwrap(), buf.as_ptr());
        let mut seen = vec![0u8; data.len()];
        pool.memory().read_slice(&mut seen, GuestAddress(buf.iova())).unwrap();
        assert_eq!(seen, data);
    }

    // Translation refuses the gap between regions, ranges crossing a region's end, and
    // anything outside the pool.
    let first_end = pool.regions()[0].iova_end();
    assert!(pool.translate(first_end, 1).is_err());
    assert!(pool.translate(first_end - 8, 16).is_err());
    assert!(pool.translate(second.iova_end() - 8, 16).is_err());
    assert!(pool.translate(0, 1).is_err());
    assert!(pool.translate(second.iova_end() - 8, 8).is_ok());
}

/// Pairs of consecutive pages of `region` that are adjacent in physical memory too, and all
/// pairs; `None` when this process may not see frame numbers (no CAP_SYS_ADMIN).
fn physically_adjacent_pairs(region: &Region) -> Option<(usize, usize)> {
    let page = super::backing::page_size();
    let pages = (region.size / page) as usize;
    let pa = match crate::transport::pci::pagemap::resolve(region.host_addr, page, pages) {
        Ok(pa) => pa,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return None,
        Err(e) => panic!("pagemap of the pool: {e}"),
    };
    Some((pa.windows(2).filter(|w| w[1] == w[0] + page).count(), pages - 1))
}

#[test]
fn scattered_pool_pages_are_not_physically_adjacent() {
    let config = PoolConfig::new(4 * MIB).hugepages(HugePages::Never).scatter_pages(true).max_regions(2);
    assert!(config.scatter_pages);
    let mut pool = DmaPool::new(config).unwrap();
    pool.grow(2 * MIB).unwrap();
    assert_eq!(pool.total_size(), 6 * MIB);
    for (i, r) in pool.regions().iter().enumerate() {
        assert!(!r.hugepages);
        // The pool works as any other: data written through the host mapping is what the
        // device reads at the IOVA, across every page boundary.
        let data = pattern(20 + i as u64, r.size as usize);
        pool.memory().write_slice(&data, GuestAddress(r.iova)).unwrap();
        let host = pool.translate(r.iova, r.size as usize).unwrap();
        // SAFETY: the whole region is mapped at `host` for as long as the pool lives.
        assert_eq!(unsafe { std::slice::from_raw_parts(host, r.size as usize) }, &data[..]);
        match physically_adjacent_pairs(r) {
            Some((adjacent, pairs)) => assert!(
                adjacent * 10 <= pairs,
                "region {i}: {adjacent} of {pairs} consecutive pages are physically adjacent"
            ),
            None => eprintln!("frame numbers are hidden from this process: physical layout not checked"),
        }
    }
}

#[test]
fn scatter_is_off_unless_asked_for() {
    if std::env::var_os(SCATTER_PAGES_ENV).is_none() {
        assert!(!PoolConfig::new(MIB).scatter_pages);
    }
}

#[test]
fn pool_larger_than_16_mib_is_usable_end_to_end() {
    let size = 20 * MIB;
    let pool = DmaPool::new(PoolConfig::new(size)).unwrap();
    assert!(pool.total_size() >= size);
    let len = (18 * MIB) as usize;
    let mut buf = pool.alloc_shared(len).unwrap();
    let data = pattern(20, len);
    buf.write_at(0, &data).unwrap();
    let mut seen = vec![0u8; len];
    pool.memory().read_slice(&mut seen, GuestAddress(buf.iova())).unwrap();
    assert_eq!(seen, data);
    // The tail is usable too.
    let mut arena = pool.carve(MIB).unwrap();
    let mut tail = arena.alloc((MIB - 4096) as usize, 4096).unwrap();
    tail.fill(0xa5);
    pool.memory().read_slice(&mut seen[..tail.len()], GuestAddress(tail.iova())).unwrap();
    assert!(seen[..tail.len()].iter().all(|&b| b == 0xa5));
}

#[test]
fn pool_exhaustion_is_an_error_with_numbers() {
    let pool = plain_pool(MIB);
    let err = pool.carve(2 * MIB).unwrap_err();
    assert!(
        matches!(err, MemoryError::Exhausted { requested, available, largest }
            if requested == 2 * MIB && available == MIB && largest == MIB),
        "{err:?}"
    );
    assert!(err.to_string().contains("exhausted"));
    assert!(matches!(pool.alloc_shared(0), Err(MemoryError::ZeroLength)));
    assert!(matches!(pool.alloc_shared_aligned(64, 48), Err(MemoryError::InvalidAlignment { .. })));
}

#[test]
fn chunks_return_to_the_pool() {
    let pool = plain_pool(MIB);
    let arena = pool.carve(100_000).unwrap();
    assert_eq!(arena.len(), 102_400, "rounded up to the page size");
    let shared = pool.alloc_shared(5000).unwrap();
    assert!(pool.free_bytes() < MIB - 102_400);
    drop(arena);
    drop(shared);
    assert_eq!(pool.free_bytes(), MIB);
    // The whole region is one block again.
    let all = pool.carve(MIB).unwrap();
    assert_eq!(all.len(), MIB);
}

/// Inode of a memfd, and whether anything in this process still maps it or holds a
/// descriptor to it.
fn memfd_inode(fd: i32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino()
}

fn inode_in_use(ino: u64) -> (bool, bool) {
    use std::os::unix::fs::MetadataExt;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mapped = maps.lines().any(|l| {
        l.split_whitespace().nth(4).and_then(|i| i.parse::<u64>().ok()) == Some(ino)
            && l.contains("virtio-initiator-dma")
    });
    let open = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::metadata(e.ok()?.path()).ok())
        .any(|m| m.ino() == ino && m.nlink() == 0);
    (mapped, open)
}

#[test]
fn drop_unmaps_and_closes_after_the_last_user() {
    let mut pool = plain_pool(MIB);
    pool.grow(MIB).unwrap();
    let inodes: Vec<u64> = pool.regions().iter().map(|r| memfd_inode(r.raw_fd())).collect();
    for &ino in &inodes {
        assert_eq!(inode_in_use(ino), (true, true));
    }
    let arena = pool.carve(4096).unwrap();
    drop(pool);
    // The arena keeps its own region (the first) alive, and only that one.
    assert_eq!(inode_in_use(inodes[0]), (true, true));
    assert_eq!(inode_in_use(inodes[1]), (false, false));
    drop(arena);
    assert_eq!(inode_in_use(inodes[0]), (false, false));
}

#[test]
fn arena_and_buffers_outlive_the_pool_handle() {
    let pool = plain_pool(MIB);
    let mut arena = pool.carve(64 * 1024).unwrap();
    let mut kept = pool.alloc_shared(4096).unwrap();
    drop(pool);
    let mut buf = arena.alloc(4096, 64).unwrap();
    let data = pattern(5, 4096);
    buf.write_at(0, &data).unwrap();
    kept.write_at(0, &data).unwrap();
    assert_eq!(buf.as_slice(), &data[..]);
    assert_eq!(kept.as_slice(), &data[..]);
    arena.free(buf).unwrap();
}

#[test]
fn arena_alignment_and_no_overlap() {
    let pool = plain_pool(MIB);
    let mut arena = pool.carve(512 * 1024).unwrap();
    let mut live: Vec<(DmaBuf, u8)> = Vec::new();
    let mut seed = 7u64;
    for i in 0..400u32 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let len = 1 + (seed >> 33) as usize % 3000;
        let align = 1usize << ((seed >> 20) % 13); // 1 .. 4096
        match arena.alloc(len, align) {
            Ok(mut buf) => {
                assert_eq!(buf.iova() % align as u64, 0, "iova alignment {align}");
                assert_eq!(buf.as_ptr() as usize % align, 0, "host alignment {align}");
                assert_eq!(buf.len(), len);
                let tag = i as u8;
                buf.fill(tag);
                live.push((buf, tag));
            }
            Err(MemoryError::Exhausted { .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
        // Free about a third of the time, from the middle, to fragment the arena.
        if seed % 3 == 0 && !live.is_empty() {
            let (buf, tag) = live.swap_remove((seed >> 40) as usize % live.len());
            assert!(buf.as_slice().iter().all(|&b| b == tag), "buffer was overwritten");
            arena.free(buf).unwrap();
        }
    }
    let mut ranges: Vec<(u64, u64)> = live.iter().map(|(b, _)| (b.iova(), b.len() as u64)).collect();
    ranges.sort();
    for w in ranges.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "overlapping buffers {w:?}");
    }
    for (buf, tag) in live {
        assert!(buf.as_slice().iter().all(|&b| b == tag), "buffer was overwritten");
        arena.free(buf).unwrap();
    }
    assert_eq!(arena.free_bytes(), arena.len());
    assert_eq!(arena.largest_free(), arena.len(), "all free space coalesced");
}

#[test]
fn arena_exhaustion_fragmentation_and_coalescing() {
    let pool = plain_pool(MIB);
    let mut arena = pool.carve(64 * 1024).unwrap();
    let mut bufs: Vec<Option<DmaBuf>> = (0..16).map(|_| Some(arena.alloc(4096, 4096).unwrap())).collect();
    let err = arena.alloc(1, 1).unwrap_err();
    assert!(matches!(err, MemoryError::Exhausted { requested: 1, available: 0, largest: 0 }), "{err}");

    // Free every other block: 32 KiB free, but no two adjacent pages.
    for slot in bufs.iter_mut().step_by(2) {
        arena.free(slot.take().unwrap()).unwrap();
    }
    assert_eq!(arena.free_bytes(), 32 * 1024);
    let err = arena.alloc(8192, 16).unwrap_err();
    assert!(
        matches!(err, MemoryError::Exhausted { requested: 8192, available: 32768, largest: 4096 }),
        "{err}"
    );
    // Freeing a neighbour merges three pages into one block.
    arena.free(bufs[1].take().unwrap()).unwrap();
    let merged = arena.alloc(3 * 4096, 4096).unwrap();
    assert_eq!(merged.iova(), arena.iova());
    arena.free(merged).unwrap();

    for buf in bufs.into_iter().flatten() {
        arena.free(buf).unwrap();
    }
    let whole = arena.alloc(64 * 1024, 4096).unwrap();
    assert_eq!(whole.iova(), arena.iova());
}

#[test]
fn arena_refuses_foreign_buffers() {
    let pool = plain_pool(MIB);
    let mut a = pool.carve(16 * 1024).unwrap();
    let mut b = pool.carve(16 * 1024).unwrap();
    let from_b = b.alloc(64, 16).unwrap();
    let iova = from_b.iova();
    assert!(matches!(a.free(from_b), Err(MemoryError::ForeignBuffer { iova: i }) if i == iova));
    let shared = pool.alloc_shared(64).unwrap();
    assert!(matches!(a.free(shared), Err(MemoryError::ForeignBuffer { .. })));
    assert_eq!(a.free_bytes(), a.len());
}

#[test]
fn buffer_accessors_check_bounds() {
    let pool = plain_pool(MIB);
    let mut buf = pool.alloc_shared(100).unwrap();
    assert!(matches!(buf.write_at(90, &[0; 11]), Err(MemoryError::OutOfBounds { .. })));
    assert!(matches!(buf.read_at(usize::MAX, &mut [0; 2]), Err(MemoryError::OutOfBounds { .. })));
    buf.write_at(90, &[7; 10]).unwrap();
    let mut out = [0u8; 10];
    buf.read_at(90, &mut out).unwrap();
    assert_eq!(out, [7; 10]);
    let ptrs: HashSet<_> = (0..4).map(|_| pool.alloc_shared(64).unwrap().iova()).collect();
    assert_eq!(ptrs.len(), 1, "a dropped shared buffer is reused at once");
}
