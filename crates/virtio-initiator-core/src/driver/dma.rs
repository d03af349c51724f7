//! The controller's DMA memory: the pool it started with, plus the pools it grows by when
//! allocations run dry, up to a limit. Each pool is fixed once made, so buffers never move; the
//! device learns of a new pool's regions through `Transport::add_memory` (vhost-user ADD_MEM_REG,
//! or the whole table again without CONFIGURE_MEM_SLOTS; VFIO MAP_DMA).
//!
//! Channels look up which caller memory lies in the pools on every request; they keep a copy of
//! the spans and refresh it only when the generation number moves, so that path takes no lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use log::info;

use super::DriverError;
use crate::memory::{DmaBuf, DmaPool, HugePages, MemoryError, PoolConfig};
use crate::transport::Transport;

const HUGE_PAGE: u64 = 2 << 20;
/// Smallest region the memory grows by.
const GROWTH_STEP: u64 = 64 << 20;
/// Growth ahead of need starts when less than this fraction of the memory is free.
const LOW_WATER_DIVISOR: u64 = 4;

/// A stretch of DMA memory in our address space and in the device's.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub host: u64,
    pub size: u64,
    pub iova: u64,
}

impl Span {
    /// The IOVA of `len` bytes at host address `host`, when they lie inside this span.
    pub fn iova_of(&self, host: u64, len: u64) -> Option<u64> {
        (host >= self.host && host.checked_add(len)? <= self.host + self.size)
            .then(|| self.iova + (host - self.host))
    }
}

pub(super) struct DmaMemory {
    pools: RwLock<Vec<Arc<DmaPool>>>,
    generation: AtomicU64,
    /// Serialises growth, so that two threads running dry at once add one pool, not two.
    growing: Mutex<()>,
    limit: u64,
    step: u64,
    hugepages: HugePages,
}

impl DmaMemory {
    pub fn new(first: Arc<DmaPool>, limit: u64, hugepages: HugePages) -> Self {
        // Few, large regions: a backend has a handful of memory slots (8 without
        // CONFIGURE_MEM_SLOTS), and each growth is a round trip to it.
        let step = first.total_size().max(GROWTH_STEP);
        DmaMemory {
            pools: RwLock::new(vec![first]),
            generation: AtomicU64::new(0),
            growing: Mutex::new(()),
            limit,
            step,
            hugepages,
        }
    }

    pub fn first(&self) -> Arc<DmaPool> {
        self.pools.read().unwrap()[0].clone()
    }

    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Every region of every pool, with the generation they belong to.
    pub fn spans(&self) -> (u64, Vec<Span>) {
        let pools = self.pools.read().unwrap();
        let spans = pools
            .iter()
            .flat_map(|p| p.regions().iter().map(|r| Span { host: r.host_addr, size: r.size, iova: r.iova }))
            .collect();
        (self.generation(), spans)
    }

    /// Every region of every pool, for announcing the memory to a new connection.
    pub fn regions(&self) -> Vec<crate::memory::Region> {
        self.pools.read().unwrap().iter().flat_map(|p| p.regions().iter().cloned()).collect()
    }

    pub fn total_bytes(&self) -> u64 {
        self.pools.read().unwrap().iter().map(|p| p.total_size()).sum()
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Allocates from the pools there are; the error of the last one when all are full.
    fn try_alloc(&self, len: usize, align: usize) -> Result<DmaBuf, MemoryError> {
        let pools = self.pools.read().unwrap();
        let mut last = None;
        for p in pools.iter() {
            match p.alloc_shared_aligned(len, align) {
                Ok(b) => return Ok(b),
                Err(e @ MemoryError::Exhausted { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("there is always a first pool"))
    }

    /// Bytes free in all pools.
    pub fn free_bytes(&self) -> u64 {
        self.pools.read().unwrap().iter().map(|p| p.free_bytes()).sum()
    }

    /// Whether free memory has fallen below the low-water mark (a quarter of the memory there
    /// is) while the limit leaves room to grow: time to grow ahead of need.
    pub fn low(&self) -> bool {
        let total = self.total_bytes();
        total + HUGE_PAGE <= self.limit && self.free_bytes() < total / LOW_WATER_DIVISOR
    }

    /// Grows by one step when [`Self::low`]; false when there was no need (or another thread
    /// grew it meanwhile). Meant for a thread other than the one doing I/O: allocations go on
    /// from the pools there are while the new one is made.
    pub fn grow_ahead(&self, transport: &Mutex<Option<Box<dyn Transport>>>) -> Result<bool, DriverError> {
        let _one_at_a_time = self.growing.lock().unwrap();
        if !self.low() {
            return Ok(false);
        }
        self.publish(self.grow(0, 0, transport)?);
        Ok(true)
    }

    /// Allocates `len` bytes, growing by one pool through `transport` when all are full.
    pub fn alloc_or_grow(
        &self,
        len: usize,
        align: usize,
        transport: &Mutex<Option<Box<dyn Transport>>>,
    ) -> Result<DmaBuf, DriverError> {
        let exhausted = match self.try_alloc(len, align) {
            Ok(b) => return Ok(b),
            Err(e @ MemoryError::Exhausted { .. }) => e,
            Err(e) => return Err(e.into()),
        };
        let _one_at_a_time = self.growing.lock().unwrap();
        // Someone else may have grown it while we waited.
        if let Ok(b) = self.try_alloc(len, align) {
            return Ok(b);
        }
        match self.grow(len, align, transport) {
            Ok(pool) => {
                // Taken before the pool is published, so that no other thread gets there first.
                let buf = pool.alloc_shared_aligned(len, align)?;
                self.publish(pool);
                Ok(buf)
            }
            Err(DriverError::MemoryLimit { requested, have, limit, .. }) => {
                Err(DriverError::MemoryLimit { requested, have, limit, cause: exhausted })
            }
            Err(e) => Err(e),
        }
    }

    /// Adds a pool big enough for `len` bytes at `align` (a full step where the limit allows)
    /// and tells the device. The caller holds `growing`. The pool is made and populated without
    /// the transport lock, which is held only to ask for its placement and to announce it.
    fn grow(
        &self,
        len: usize,
        align: usize,
        transport: &Mutex<Option<Box<dyn Transport>>>,
    ) -> Result<Arc<DmaPool>, DriverError> {
        let need = (len as u64 + align as u64).div_ceil(HUGE_PAGE).max(1) * HUGE_PAGE;
        let have = self.total_bytes();
        // A full step where the limit allows, else what is left of it (when that is enough).
        let size = self.step.max(need).min(self.limit.saturating_sub(have) / HUGE_PAGE * HUGE_PAGE).max(need);
        if have + size > self.limit {
            return Err(DriverError::MemoryLimit {
                requested: len as u64,
                have,
                limit: self.limit,
                cause: MemoryError::Exhausted {
                    requested: len as u64,
                    available: self.free_bytes(),
                    largest: 0,
                },
            });
        }
        let base = {
            let pools = self.pools.read().unwrap();
            let end = pools.iter().flat_map(|p| p.regions().iter().map(|r| r.iova_end())).max().unwrap_or(0);
            end.div_ceil(HUGE_PAGE) * HUGE_PAGE
        };
        let mut config = {
            let mut guard = transport.lock().unwrap();
            guard
                .as_mut()
                .ok_or(DriverError::Closed)?
                .pool_config(PoolConfig::new(size).hugepages(self.hugepages))?
        };
        config.iova_base = config.iova_base.max(base);
        let pool = Arc::new(DmaPool::new(config)?);
        {
            let mut guard = transport.lock().unwrap();
            let t = guard.as_mut().ok_or(DriverError::Closed)?;
            for r in pool.regions() {
                t.add_memory(r)?;
            }
        }
        info!("DMA memory grew by {size} bytes to {} of at most {}", have + pool.total_size(), self.limit);
        Ok(pool)
    }

    /// Makes a new pool available to allocations and to the channels' address lookups.
    fn publish(&self, pool: Arc<DmaPool>) {
        self.pools.write().unwrap().push(pool);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}
