//! The virtio-blk device behind the vhost-user socket: one disk on the storage backends, its
//! configuration space and feature set, and a worker thread per request queue, or in poll mode
//! poll threads of our own (`device::poll`). Every request completes as it is served, so
//! stopping a ring (GET_VRING_BASE) or resetting the device finds nothing held.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_blk_proto::{feature, request, status, Config, ID_BYTES, SECTOR_SIZE};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::request::{answer, execute, Disk};
use crate::device::poll::{self, PollDevice};
use crate::device::rings::{ring_live, RingTable};
use crate::device::segments::Segments;
use crate::device::vring::{self, BoundVring, RingOwner};
use crate::device::{
    check_event_set, config_bytes, exit_event, ring, MemGuard, Memory, QueueStats, QueueStatsSnapshot,
    PROTOCOL_FEATURES,
};
use crate::storage::Storage;

/// Ranges one DISCARD or WRITE_ZEROES request may carry.
const MAX_RANGES: u32 = 16;

/// A fault injected through the control socket, for the next requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkFault {
    /// Answered IOERR without being run.
    IoError,
    /// Run after a pause (the queue's thread waits).
    Delay(std::time::Duration),
    /// Never answered: the request stays with the device until its ring is stopped or reset.
    Never,
}

/// Sizing and identity of the device, fixed for the life of the process.
#[derive(Clone, Debug)]
pub struct BlkOptions {
    pub request_queues: u16,
    pub queue_size: u16,
    pub block_size: u32,
    pub read_only: bool,
    /// GET_ID's answer (at most 20 bytes; shorter is NUL-padded).
    pub id: String,
    /// Busy-poll the request queues with this many threads instead of waiting for kicks.
    pub poll_threads: Option<u16>,
}

/// The vhost-user backend; clones share one device, and each frontend connection gets a clone
/// inside a fresh `VhostUserDaemon`.
#[derive(Clone)]
pub struct BlkBackend {
    inner: Arc<Inner>,
}

struct Inner {
    storage: Storage,
    opts: BlkOptions,
    id: [u8; ID_BYTES],
    mem: RwLock<Option<Memory>>,
    event_idx: AtomicBool,
    /// The current connection's vrings by queue index.
    rings: RingTable,
    /// Notifiers that stop this connection's worker threads.
    exits: Mutex<Vec<EventNotifier>>,
    stats: Vec<QueueStats>,
    /// The injected fault and how many more requests get it.
    fault: Mutex<Option<(BlkFault, u32)>>,
    /// Set while a fault is armed, so the common path takes no lock.
    fault_armed: AtomicBool,
}

impl BlkBackend {
    pub fn new(storage: Storage, opts: BlkOptions) -> Self {
        let mut id = [0u8; ID_BYTES];
        let n = opts.id.len().min(ID_BYTES);
        id[..n].copy_from_slice(&opts.id.as_bytes()[..n]);
        let stats = (0..opts.request_queues).map(|_| QueueStats::default()).collect();
        let inner = Arc::new(Inner {
            storage,
            rings: RingTable::new(opts.request_queues as usize),
            opts,
            id,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            exits: Mutex::new(Vec::new()),
            stats,
            fault: Mutex::new(None),
            fault_armed: AtomicBool::new(false),
        });
        if let Some(threads) = inner.opts.poll_threads {
            poll::start(&inner, inner.opts.request_queues, threads);
        }
        BlkBackend { inner }
    }

    pub fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    pub fn config(&self) -> Config {
        let o = &self.inner.opts;
        let blocks = self.inner.storage.len() / u64::from(o.block_size);
        Config {
            capacity: blocks * u64::from(o.block_size) / SECTOR_SIZE,
            seg_max: u32::from(o.queue_size) - 2,
            blk_size: o.block_size,
            num_queues: o.request_queues,
            max_discard_sectors: u32::MAX,
            max_discard_seg: MAX_RANGES,
            discard_sector_alignment: o.block_size / SECTOR_SIZE as u32,
            max_write_zeroes_sectors: u32::MAX,
            max_write_zeroes_seg: MAX_RANGES,
            write_zeroes_may_unmap: 1,
            ..Config::default()
        }
    }

    /// The daemon for the next frontend connection, with the vrings it creates bound to the
    /// device.
    pub fn new_daemon(&self) -> Result<VhostUserDaemon<BlkBackend>, vhost_user_backend::Error> {
        *self.inner.mem.write().unwrap() = None;
        self.inner.rings.clear();
        let owner: Weak<Inner> = Arc::downgrade(&self.inner);
        vring::bind(owner, || {
            VhostUserDaemon::new(
                "vhost-user-blk".into(),
                self.clone(),
                GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            )
        })
    }

    /// Ends the connection that just went away: stops its worker threads and lets go of its
    /// vrings.
    pub fn end_connection(&self) {
        for n in self.inner.exits.lock().unwrap().drain(..) {
            let _ = n.notify();
        }
        self.inner.rings.clear();
    }

    /// Changes the disk's size to `bytes`, cut down to whole blocks; the configuration space
    /// shows the new capacity from then on.
    pub fn resize(&self, bytes: u64) -> Result<u64, String> {
        let bs = u64::from(self.inner.opts.block_size);
        let whole = bytes - bytes % bs;
        if whole == 0 {
            return Err(format!("{bytes} bytes hold no block of {bs} bytes"));
        }
        self.inner.storage.resize(whole).map_err(|e| e.to_string())?;
        Ok(whole)
    }

    /// The next `count` requests get `fault` (replacing a fault not used up yet).
    pub fn inject(&self, fault: BlkFault, count: u32) {
        self.inner.arm((count > 0).then_some((fault, count)));
    }

    pub fn clear_faults(&self) {
        self.inner.arm(None);
    }

    pub fn stats(&self) -> Vec<QueueStatsSnapshot> {
        self.inner.stats.iter().map(QueueStats::snapshot).collect()
    }
}

impl Inner {
    fn memory(&self) -> Option<MemGuard> {
        self.mem.read().unwrap().as_ref().map(|m| m.memory())
    }

    fn arm(&self, fault: Option<(BlkFault, u32)>) {
        let mut f = self.fault.lock().unwrap();
        *f = fault;
        self.fault_armed.store(f.is_some(), Ordering::Release);
    }

    fn take_fault(&self) -> Option<BlkFault> {
        if !self.fault_armed.load(Ordering::Acquire) {
            return None;
        }
        let mut f = self.fault.lock().unwrap();
        let (fault, left) = (*f)?;
        *f = (left > 1).then_some((fault, left - 1));
        self.fault_armed.store(f.is_some(), Ordering::Release);
        Some(fault)
    }

    /// Runs one request, as the injected fault (if any) says, and counts it.
    fn serve(&self, rq: u16, mem: &MemGuard, segs: Segments) -> Option<u32> {
        let disk = Disk {
            storage: &self.storage,
            block_size: self.opts.block_size,
            read_only: self.opts.read_only,
            id: self.id,
            max_ranges: MAX_RANGES,
            write_zeroes_may_unmap: true,
        };
        let stats = &self.stats[rq as usize];
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let done = match self.take_fault() {
            None => execute(&**mem, &segs, &disk),
            Some(BlkFault::IoError) => answer(&**mem, &segs, status::IOERR),
            Some(BlkFault::Delay(d)) => {
                std::thread::sleep(d);
                execute(&**mem, &segs, &disk)
            }
            Some(BlkFault::Never) => return None,
        };
        match done.status {
            None => stats.malformed.fetch_add(1, Ordering::Relaxed),
            Some(status::OK) if done.request_type == request::IN => {
                stats.bytes_in.fetch_add(done.bytes, Ordering::Relaxed)
            }
            Some(status::OK) => stats.bytes_out.fetch_add(done.bytes, Ordering::Relaxed),
            Some(_) => stats.errors.fetch_add(1, Ordering::Relaxed),
        };
        Some(done.used_len)
    }
}

impl RingOwner for Inner {
    fn attach_ring(&self, queue: u16, ring: VringRwLock) {
        self.rings.attach(queue, ring);
    }

    fn change_ring(&self, queue: u16, change: &mut dyn FnMut()) {
        self.rings.change(queue, change);
    }

    /// Nothing is held, so stopping a ring only waits for a pass in progress.
    fn stop_ring(&self, queue: u16, ring: &VringRwLock) {
        self.rings.change(queue, || ring.set_queue_ready(false));
    }
}

impl PollDevice for Inner {
    const FIRST_REQUEST_QUEUE: u16 = 0;

    fn rings(&self) -> &RingTable {
        &self.rings
    }

    fn memory(&self) -> Option<MemGuard> {
        Inner::memory(self)
    }

    fn poll_requests(&self, rq: u16, ring: &VringRwLock) -> io::Result<()> {
        ring::poll(ring, || self.memory(), |mem, _, segs| self.serve(rq, mem, segs))
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = BoundVring;

    fn num_queues(&self) -> usize {
        self.inner.opts.request_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.inner.opts.queue_size as usize
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << feature::SEG_MAX)
            | (1 << feature::BLK_SIZE)
            | (1 << feature::FLUSH)
            | (1 << feature::DISCARD)
            | (1 << feature::WRITE_ZEROES)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.inner.opts.request_queues > 1 {
            f |= 1 << feature::MQ;
        }
        if self.inner.opts.read_only {
            f |= 1 << feature::RO;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        PROTOCOL_FEATURES
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_bytes(&self.config().encode(), offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // CONFIG_WCE is not offered: nothing in the configuration space is writable.
        Ok(())
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.inner.mem.write().unwrap() = Some(mem);
        self.inner.rings.wake().bump();
        Ok(())
    }

    /// A thread per request queue; none in poll mode, where no thread of the crate waits on
    /// kicks.
    fn queues_per_thread(&self) -> Vec<u64> {
        if self.inner.opts.poll_threads.is_some() {
            return Vec::new();
        }
        (0..self.inner.opts.request_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        exit_event(&self.inner.exits)
    }

    fn handle_event(
        &self,
        _device_event: u16,
        evset: EventSet,
        _vrings: &[BoundVring],
        thread_id: usize,
    ) -> io::Result<()> {
        check_event_set(evset)?;
        // Thread k serves request queue k alone.
        let rq = thread_id as u16;
        let inner = &self.inner;
        let served = inner.rings.with_ring(rq, |vring, _| {
            if !ring_live(vring) {
                // A kick that was pending when the ring was stopped or disabled.
                return Ok(());
            }
            let event_idx = inner.event_idx.load(Ordering::Relaxed);
            ring::drain(vring, event_idx, || inner.memory(), |mem, _, segs| inner.serve(rq, mem, segs))
        });
        served.unwrap_or_else(|| Err(io::Error::other(format!("queue {rq} has no vring"))))
    }
}
