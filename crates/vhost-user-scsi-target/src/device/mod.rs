//! The virtio-scsi device behind the vhost-user socket: configuration space, feature set, and
//! the dispatch of queue notifications to the control, event and request queue handlers.
//!
//! Queue 0 is the control queue and queue 1 the event queue; both are served by worker thread 0.
//! Every request queue has a worker thread of its own, so queues never contend for a thread; in
//! poll mode the request queues are busy-polled by threads of our own instead (`poll`).
//!
//! What serves a vring for either device lives here too: `ring` (taking chains, completing
//! them, notifying), `rings` (the connection's vrings under their locks), `vring` (the hooks on
//! the frontend's ring messages), `poll` (poll mode), `segments` and `stats`.

mod control_queue;
mod deferred;
mod events;
pub mod poll;
mod request;
pub mod ring;
pub mod rings;
pub mod segments;
mod stats;
pub mod vring;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use log::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_scsi_proto::{feature, Config, Event, LunAddress, CDB_SIZE, FIRST_REQUEST_QUEUE, SENSE_SIZE};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::scsi::Bus;
pub use deferred::Deferred;
pub use events::EventQueue;
use poll::PollDevice;
use rings::{ring_live, RingTable};
pub use stats::{QueueStats, QueueStatsSnapshot};
use vring::{BoundVring, RingOwner};

pub type Memory = GuestMemoryAtomic<GuestMemoryMmap>;
pub(crate) type MemGuard = GuestMemoryLoadGuard<GuestMemoryMmap>;

/// The vhost-user protocol features both devices offer.
pub const PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(VhostUserProtocolFeatures::RESET_DEVICE);

/// GET_CONFIG's answer: the part of an encoded configuration space asked for (clipped to it).
pub fn config_bytes(cfg: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let start = (offset as usize).min(cfg.len());
    let end = start.saturating_add(size as usize).min(cfg.len());
    cfg[start..end].to_vec()
}

/// A worker thread's exit notifier, kept in `exits` so that the connection's end stops it.
pub fn exit_event(exits: &Mutex<Vec<EventNotifier>>) -> Option<(EventConsumer, EventNotifier)> {
    let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()?;
    exits.lock().unwrap().push(notifier.try_clone().ok()?);
    Some((consumer, notifier))
}

/// A queue notification is a readable eventfd; anything else is a fault of the event loop.
pub fn check_event_set(evset: EventSet) -> io::Result<()> {
    if evset == EventSet::IN {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidInput, format!("unexpected event set {evset:?}")))
    }
}

/// Largest queue size the target accepts.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Sizing of the device, fixed for the life of the process.
#[derive(Clone, Copy, Debug)]
pub struct DeviceOptions {
    pub request_queues: u16,
    pub queue_size: u16,
    /// Busy-poll the request queues with this many threads instead of waiting for kicks.
    pub poll_threads: Option<u16>,
    pub quirks: Quirks,
}

/// Deviations of other vhost targets, reproduced for tests of initiators.
#[derive(Clone, Copy, Debug, Default)]
pub struct Quirks {
    /// Task management completes with its response written but a used length of 0.
    pub tmf_zero_used_len: bool,
    /// ABORT TASK (or, with `tmf_ignored`, every function) answers FUNCTION COMPLETE and leaves
    /// the tasks it names running.
    pub abort_task_ignored: bool,
    pub tmf_ignored: bool,
}

/// The vhost-user backend. Cheap to clone: every clone shares one device state, and each new
/// frontend connection gets a clone inside a fresh `VhostUserDaemon`.
#[derive(Clone)]
pub struct ScsiBackend {
    inner: Arc<Inner>,
}

struct Inner {
    bus: Arc<Bus>,
    opts: DeviceOptions,
    mem: RwLock<Option<Memory>>,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    /// The current connection's vrings by queue index.
    rings: RingTable,
    /// Notifiers that stop this connection's worker threads.
    exits: Mutex<Vec<EventNotifier>>,
    events: EventQueue,
    deferred: Deferred,
    an_subscribed: AtomicU32,
    stats: Vec<QueueStats>,
}

impl ScsiBackend {
    pub fn new(bus: Arc<Bus>, opts: DeviceOptions) -> Self {
        let queues = 2 + opts.request_queues as usize;
        let inner = Arc::new(Inner {
            bus,
            opts,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            rings: RingTable::new(queues),
            exits: Mutex::new(Vec::new()),
            events: EventQueue::default(),
            deferred: Deferred::default(),
            an_subscribed: AtomicU32::new(0),
            stats: (0..opts.request_queues).map(|_| QueueStats::default()).collect(),
        });
        Deferred::start_timer(&inner);
        if let Some(threads) = opts.poll_threads {
            poll::start(&inner, opts.request_queues, threads);
        }
        ScsiBackend { inner }
    }

    pub fn bus(&self) -> &Arc<Bus> {
        &self.inner.bus
    }

    pub fn config(&self) -> Config {
        let size = u32::from(self.inner.opts.queue_size);
        Config {
            num_queues: u32::from(self.inner.opts.request_queues),
            seg_max: size - 2,
            max_sectors: 0xffff,
            cmd_per_lun: size,
            event_info_size: Event::SIZE as u32,
            sense_size: SENSE_SIZE as u32,
            cdb_size: CDB_SIZE as u32,
            max_channel: 0,
            max_target: u16::from(self.inner.bus.max_target()),
            max_lun: u32::from(virtio_scsi_proto::lun::MAX_LUN),
        }
    }

    /// The daemon for the next frontend connection, with this device's state reset for it
    /// and the vrings it creates bound to the device.
    pub fn new_daemon(&self) -> Result<VhostUserDaemon<ScsiBackend>, vhost_user_backend::Error> {
        self.begin_connection();
        let owner: std::sync::Weak<Inner> = Arc::downgrade(&self.inner);
        vring::bind(owner, || {
            VhostUserDaemon::new(
                "vhost-user-scsi".into(),
                self.clone(),
                GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            )
        })
    }

    /// Forgets everything tied to the previous frontend: its memory, vrings, held requests and
    /// undelivered events. The LUNs see an I_T nexus loss, as SAM requires.
    fn begin_connection(&self) {
        let inner = &self.inner;
        *inner.mem.write().unwrap() = None;
        inner.rings.clear();
        inner.deferred.clear();
        inner.events.clear();
        inner.an_subscribed.store(0, Ordering::Relaxed);
        for t in 0..=inner.bus.max_target() {
            inner.bus.nexus_reset(t);
        }
    }

    /// Ends the connection that just went away: stops its worker threads and lets go of its
    /// vrings. What the device still holds is dropped, not finished: the frontend is gone (or
    /// about to be), and writing into its memory now could land in memory it already reuses.
    pub fn end_connection(&self) {
        let inner = &self.inner;
        for n in inner.exits.lock().unwrap().drain(..) {
            let _ = n.notify();
        }
        inner.rings.clear();
        inner.deferred.clear();
    }

    /// Posts an event for the frontend; it is delivered as soon as the driver has an event
    /// buffer posted (at once, normally).
    pub fn post_event(&self, ev: Event) {
        self.inner.events.post(ev);
        self.inner.flush_events();
    }

    /// Tells the frontend that a LUN appeared or went away.
    pub fn post_hotplug(&self, addr: LunAddress, added: bool) {
        use virtio_scsi_proto::event;
        let reason = if added { event::REASON_RESCAN } else { event::REASON_REMOVED };
        if self.inner.acked_features.load(Ordering::Relaxed) & (1 << feature::HOTPLUG) != 0 {
            self.post_event(Event { event: event::TRANSPORT_RESET, lun: addr.encode_for_event(), reason });
        }
    }

    /// Tells the frontend that a LUN's parameters changed (`asc`/`ascq` of the unit attention).
    pub fn post_param_change(&self, addr: LunAddress, asc: u8, ascq: u8) {
        use virtio_scsi_proto::event;
        if self.inner.acked_features.load(Ordering::Relaxed) & (1 << feature::CHANGE) != 0 {
            let reason = u32::from(asc) | (u32::from(ascq) << 8);
            self.post_event(Event { event: event::PARAM_CHANGE, lun: addr.encode_for_event(), reason });
        }
    }

    pub fn stats(&self) -> Vec<QueueStatsSnapshot> {
        self.inner.stats.iter().map(QueueStats::snapshot).collect()
    }

    /// Serves the control queue or a request queue as a kick would; used by crates/fuzz.
    #[doc(hidden)]
    pub fn serve_queue(&self, queue: u16, vring: &VringRwLock) -> io::Result<()> {
        if queue == virtio_scsi_proto::CONTROL_QUEUE {
            return self.inner.process_control(vring);
        }
        match queue.checked_sub(FIRST_REQUEST_QUEUE) {
            Some(rq) if rq < self.inner.opts.request_queues => self.inner.process_requests(rq, vring),
            _ => Err(io::Error::other(format!("queue {queue} is not served this way"))),
        }
    }
}

impl Inner {
    fn memory(&self) -> Option<MemGuard> {
        self.mem.read().unwrap().as_ref().map(|m| m.memory())
    }

    fn polling(&self) -> bool {
        self.opts.poll_threads.is_some()
    }

    fn flush_events(&self) {
        let Some(mem) = self.memory() else { return };
        self.rings.with_ring(virtio_scsi_proto::EVENT_QUEUE, |ring, _| {
            if ring_live(ring) {
                if let Err(e) = self.deliver_events(ring, &mem) {
                    warn!("event queue: {e}");
                }
            }
        });
    }

    /// Delivers pending events into the driver's buffers. With EVENT_IDX the driver kicks only
    /// when asked to: while events wait for buffers, ask for a kick at the next one it posts.
    fn deliver_events(&self, vring: &VringRwLock, mem: &MemGuard) -> io::Result<()> {
        loop {
            self.events.deliver(vring, mem);
            if !self.event_idx.load(Ordering::Relaxed) || !self.events.pending() {
                return Ok(());
            }
            if !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }

    /// Serves every chain the driver has made available (see [`ring::drain`]).
    fn drain(
        &self,
        vring: &VringRwLock,
        serve: impl FnMut(&MemGuard, u16, segments::Segments) -> Option<u32>,
    ) -> io::Result<()> {
        ring::drain(vring, self.event_idx.load(Ordering::Relaxed), || self.memory(), serve)
    }

    fn notify(vring: &VringRwLock) {
        ring::notify(vring)
    }

    /// Signals the driver after request completions: as the crate does on event-driven rings,
    /// and only when the driver asks on polled ones.
    fn notify_request(&self, vring: &VringRwLock, mem: &MemGuard) {
        if self.polling() {
            ring::notify_polled(vring, mem)
        } else {
            Inner::notify(vring)
        }
    }
}

impl RingOwner for Inner {
    fn attach_ring(&self, queue: u16, ring: VringRwLock) {
        self.rings.attach(queue, ring);
    }

    fn change_ring(&self, queue: u16, change: &mut dyn FnMut()) {
        self.rings.change(queue, change);
        self.deferred.wake();
    }

    /// Stops queue `queue` (GET_VRING_BASE): waits for a pass in progress, finishes what the
    /// device holds on the ring, then marks it stopped.
    fn stop_ring(&self, queue: u16, ring: &VringRwLock) {
        self.change_ring(queue, &mut || {
            if let Some(rq) = queue.checked_sub(FIRST_REQUEST_QUEUE) {
                self.drain_held(rq, ring);
            }
            ring.set_queue_ready(false);
        });
    }
}

impl PollDevice for Inner {
    const FIRST_REQUEST_QUEUE: u16 = FIRST_REQUEST_QUEUE;

    fn rings(&self) -> &RingTable {
        &self.rings
    }

    fn memory(&self) -> Option<MemGuard> {
        Inner::memory(self)
    }

    fn poll_requests(&self, rq: u16, ring: &VringRwLock) -> io::Result<()> {
        Inner::poll_requests(self, rq, ring)
    }
}

impl VhostUserBackend for ScsiBackend {
    type Bitmap = ();
    type Vring = BoundVring;

    fn num_queues(&self) -> usize {
        2 + self.inner.opts.request_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.inner.opts.queue_size as usize
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << feature::HOTPLUG)
            | (1 << feature::CHANGE)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.inner.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        PROTOCOL_FEATURES
    }

    /// RESET_DEVICE: the crate has disabled every ring; what the device holds is finished now,
    /// before the reply, as a stop of each ring would.
    fn reset_device(&self) {
        for rq in 0..self.inner.opts.request_queues {
            self.inner.rings.with_ring(FIRST_REQUEST_QUEUE + rq, |ring, _| self.inner.drain_held(rq, ring));
        }
        self.inner.deferred.clear();
        self.inner.events.clear();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_bytes(&self.config().encode(), offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // sense_size and cdb_size are the only writable fields; we keep the spec defaults that
        // every driver uses, so a write changes nothing.
        Ok(())
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.inner.mem.write().unwrap() = Some(mem);
        self.inner.rings.wake().bump();
        Ok(())
    }

    /// Thread 0 serves the control and event queues. Each request queue gets a thread of its
    /// own, except in poll mode: there no thread of the crate waits on their kicks.
    fn queues_per_thread(&self) -> Vec<u64> {
        let mut masks = vec![0b11];
        if !self.inner.polling() {
            masks.extend((0..self.inner.opts.request_queues).map(|q| 1u64 << (2 + q)));
        }
        masks
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        exit_event(&self.inner.exits)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        _vrings: &[BoundVring],
        thread_id: usize,
    ) -> io::Result<()> {
        check_event_set(evset)?;
        // Thread 0 serves queues 0 and 1; thread k serves request queue k - 1 (queue index k + 1).
        let queue = if thread_id == 0 { device_event } else { thread_id as u16 + 1 };
        let Some(mem) = self.inner.memory() else {
            return Err(io::Error::other("queue notification before SET_MEM_TABLE"));
        };
        let inner = &self.inner;
        let served = inner.rings.with_ring(queue, |vring, _| {
            if !ring_live(vring) {
                // A kick that was pending when the ring was stopped or disabled.
                return Ok(());
            }
            match queue {
                virtio_scsi_proto::CONTROL_QUEUE => inner.process_control(vring),
                virtio_scsi_proto::EVENT_QUEUE => inner.deliver_events(vring, &mem),
                q => inner.process_requests(q - FIRST_REQUEST_QUEUE, vring),
            }
        });
        served.unwrap_or_else(|| Err(io::Error::other(format!("queue {queue} has no vring"))))
    }
}
