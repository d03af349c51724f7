//! The virtio-scsi device behind the vhost-user socket: configuration space, feature set, and
//! the dispatch of queue notifications to the control, event and request queue handlers.
//!
//! Queue 0 is the control queue and queue 1 the event queue; both are served by worker thread 0.
//! Every request queue has a worker thread of its own, so queues never contend for a thread.

mod control_queue;
mod deferred;
mod events;
mod request;
pub mod segments;
mod stats;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use log::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueOwnedT;
use virtio_scsi_proto::{feature, Config, Event, LunAddress, CDB_SIZE, SENSE_SIZE};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::scsi::Bus;
pub use deferred::Deferred;
pub use events::EventQueue;
pub use stats::{QueueStats, QueueStatsSnapshot};

pub type Memory = GuestMemoryAtomic<GuestMemoryMmap>;
type MemGuard = GuestMemoryLoadGuard<GuestMemoryMmap>;

/// Largest queue size the target accepts.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Sizing of the device, fixed for the life of the process.
#[derive(Clone, Copy, Debug)]
pub struct DeviceOptions {
    pub request_queues: u16,
    pub queue_size: u16,
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
    /// Vrings of the current connection by queue index, learnt from the worker threads as they
    /// first run: the backend crate owns them and hands them out only to `handle_event`.
    vrings: Mutex<Vec<Option<VringRwLock>>>,
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
            vrings: Mutex::new(vec![None; queues]),
            exits: Mutex::new(Vec::new()),
            events: EventQueue::default(),
            deferred: Deferred::default(),
            an_subscribed: AtomicU32::new(0),
            stats: (0..opts.request_queues).map(|_| QueueStats::default()).collect(),
        });
        Deferred::start_timer(&inner);
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

    /// Forgets everything tied to the previous frontend: its memory, vrings, held requests and
    /// undelivered events. The LUNs see an I_T nexus loss, as SAM requires.
    pub fn begin_connection(&self) {
        let inner = &self.inner;
        *inner.mem.write().unwrap() = None;
        inner.vrings.lock().unwrap().iter_mut().for_each(|v| *v = None);
        inner.deferred.clear();
        inner.events.clear();
        inner.an_subscribed.store(0, Ordering::Relaxed);
        for t in 0..=inner.bus.max_target() {
            inner.bus.nexus_reset(t);
        }
    }

    /// Stops the worker threads of the connection that just ended.
    pub fn end_connection(&self) {
        for n in self.inner.exits.lock().unwrap().drain(..) {
            let _ = n.notify();
        }
        self.inner.deferred.clear();
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
}

impl Inner {
    fn memory(&self) -> Option<MemGuard> {
        self.mem.read().unwrap().as_ref().map(|m| m.memory())
    }

    fn vring(&self, queue: u16) -> Option<VringRwLock> {
        self.vrings.lock().unwrap().get(queue as usize).cloned().flatten()
    }

    fn flush_events(&self) {
        if let (Some(vring), Some(mem)) = (self.vring(virtio_scsi_proto::EVENT_QUEUE), self.memory()) {
            self.events.deliver(&vring, &mem);
        }
    }

    /// Serves every chain the driver has made available, with EVENT_IDX notification
    /// suppression while doing so. `serve` returns the used length, or `None` when it kept the
    /// chain for later completion.
    fn drain(
        &self,
        vring: &VringRwLock,
        mem: &MemGuard,
        mut serve: impl FnMut(u16, segments::Segments) -> Option<u32>,
    ) -> io::Result<()> {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let chains: Vec<_> = {
                let mut state = vring.get_mut();
                state.get_queue_mut().iter(mem.clone()).map_err(io::Error::other)?.collect()
            };
            let mut completed = false;
            for chain in chains {
                let head = chain.head_index();
                let segs = segments::Segments::from_descriptors(
                    chain.map(|d| (d.addr(), d.len(), d.is_write_only())),
                );
                if let Some(len) = serve(head, segs) {
                    vring.add_used(head, len).map_err(io::Error::other)?;
                    completed = true;
                }
            }
            if completed {
                Inner::notify(vring);
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }

    /// Signals the driver if the ring's notification rules ask for it.
    fn notify(vring: &VringRwLock) {
        match vring.needs_notification() {
            Ok(true) => {
                if let Err(e) = vring.signal_used_queue() {
                    warn!("cannot signal used queue: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => warn!("cannot read notification state: {e}"),
        }
    }
}

impl VhostUserBackend for ScsiBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

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
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        self.inner.deferred.clear();
        self.inner.events.clear();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.config().encode();
        let start = (offset as usize).min(cfg.len());
        let end = start.saturating_add(size as usize).min(cfg.len());
        cfg[start..end].to_vec()
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // sense_size and cdb_size are the only writable fields; we keep the spec defaults that
        // every driver uses, so a write changes nothing.
        Ok(())
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.inner.mem.write().unwrap() = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let mut masks = vec![0b11];
        masks.extend((0..self.inner.opts.request_queues).map(|q| 1u64 << (2 + q)));
        masks
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()?;
        self.inner.exits.lock().unwrap().push(notifier.try_clone().ok()?);
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unexpected event set {evset:?}"),
            ));
        }
        // Thread 0 serves queues 0 and 1; thread k serves request queue k - 1 (queue index k + 1).
        let queue = if thread_id == 0 { device_event } else { thread_id as u16 + 1 };
        let vring = vrings
            .get(device_event as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "event for an unknown vring"))?;
        {
            let mut known = self.inner.vrings.lock().unwrap();
            if let Some(slot) = known.get_mut(queue as usize) {
                if slot.is_none() {
                    *slot = Some(vring.clone());
                }
            }
        }
        let Some(mem) = self.inner.memory() else {
            return Err(io::Error::other("queue notification before SET_MEM_TABLE"));
        };
        match queue {
            virtio_scsi_proto::CONTROL_QUEUE => self.inner.process_control(vring, &mem),
            virtio_scsi_proto::EVENT_QUEUE => {
                self.inner.events.deliver(vring, &mem);
                Ok(())
            }
            q => self.inner.process_requests(q - virtio_scsi_proto::FIRST_REQUEST_QUEUE, vring, &mem),
        }
    }
}
