//! A controller of one virtio device (virtio-scsi or virtio-blk): negotiation, the DMA pool,
//! the request queues waiting to be taken by channels, and for virtio-scsi the control and event
//! queues. Everything but those two queues and the configuration space is the same for both.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use log::{debug, warn};
use virtio_scsi_proto::{event, response, Config, Event, LunAddress, TmfRequest};

use super::blk::{self, BlkConfig};
use super::dma::{DmaMemory, Span};
use super::scsi;
use super::shared::{QueueCell, QueueShare};
use super::DriverError;
use crate::memory::{DmaBuf, DmaPool, HugePages, PoolConfig};
use crate::queue::{QueueFeatures, Segment, SplitQueue};
use crate::transport::pci::{VIRTIO_ID_BLOCK, VIRTIO_ID_SCSI};
use crate::transport::{Notifier, QueueHandle, RingAddresses, Transport};

/// The device takes any split of header and data across descriptors (legacy devices without
/// it assume the header is exactly the first descriptor).
const VIRTIO_F_ANY_LAYOUT: u32 = 27;
const VIRTIO_F_VERSION_1: u32 = 32;
const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;
const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Event buffers kept posted on the event queue.
const EVENT_BUFFERS: u16 = 8;
/// Segments a request uses at most: header, data-out, response, data-in.
pub(super) const SEGMENTS_PER_REQUEST: u16 = 4;
const TMF_TIMEOUT: Duration = Duration::from_secs(1);
/// Written into a task management response before it goes down: no virtio-scsi response has
/// this value, so a device that answers without writing one is told apart.
const TMF_NO_RESPONSE: u8 = 0xff;
/// How far DMA memory grows by default (at least; four times the initial pool when that is more).
const DEFAULT_MEMORY_LIMIT: u64 = 256 << 20;

#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// Request queues to set up; default all the device has, at most 16.
    pub request_queues: Option<u16>,
    pub queue_size: u16,
    pub memory_bytes: u64,
    /// How far the DMA memory may grow when allocations run dry; default four times
    /// `memory_bytes`, at least 256 MiB. Equal to `memory_bytes`, it never grows.
    pub max_memory_bytes: Option<u64>,
    pub hugepages: HugePages,
    /// The device type: None takes what the transport tells (a PCI function's id), else
    /// virtio-scsi; one given must match what the transport tells.
    pub device: Option<DeviceType>,
}

/// The kind of virtio device a controller drives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceType {
    #[default]
    Scsi,
    Blk,
}

impl DeviceType {
    /// Virtqueues before the first request queue (virtio-scsi's control and event queues).
    pub fn first_request_queue(self) -> u16 {
        match self {
            DeviceType::Scsi => virtio_scsi_proto::FIRST_REQUEST_QUEUE,
            DeviceType::Blk => 0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceType::Scsi => "virtio-scsi",
            DeviceType::Blk => "virtio-blk",
        }
    }
}

/// The configuration a device reported, by device type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceConfig {
    Scsi(Config),
    Blk(BlkConfig),
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            request_queues: None,
            queue_size: 256,
            // Small, so that attaching is quick (the pool is populated up front); it grows,
            // ahead of need where the caller asks for that (see `grow_memory_ahead`).
            memory_bytes: 4 << 20,
            max_memory_bytes: None,
            hugepages: HugePages::Auto,
            device: None,
        }
    }
}

/// What the controller negotiated and found, for callers and logs.
#[derive(Clone, Debug)]
pub struct ControllerInfo {
    pub transport: String,
    pub config: DeviceConfig,
    pub request_queues: u16,
    pub queue_size: u16,
    pub event_idx: bool,
    pub indirect: bool,
    pub hotplug: bool,
    pub change: bool,
    pub hugepages: bool,
}

impl ControllerInfo {
    pub fn device_type(&self) -> DeviceType {
        match self.config {
            DeviceConfig::Scsi(_) => DeviceType::Scsi,
            DeviceConfig::Blk(_) => DeviceType::Blk,
        }
    }

    /// The virtio-scsi configuration; None for other devices.
    pub fn scsi(&self) -> Option<&Config> {
        match &self.config {
            DeviceConfig::Scsi(c) => Some(c),
            DeviceConfig::Blk(_) => None,
        }
    }

    /// The virtio-blk configuration as of opening; None for other devices.
    pub fn blk(&self) -> Option<&BlkConfig> {
        match &self.config {
            DeviceConfig::Blk(c) => Some(c),
            DeviceConfig::Scsi(_) => None,
        }
    }
}

/// An event from the device's event queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScsiEvent {
    pub event: u32,
    pub addr: Option<LunAddress>,
    pub reason: u32,
}

/// A request queue set up on the device and waiting for a channel.
pub(super) struct QueueParts {
    pub index: u16,
    pub queue: SplitQueue,
    pub handle: QueueHandle,
    /// Where the rings are, to set the queue up again after it was stopped.
    pub rings: RingAddresses,
}

struct ControlQueue {
    queue: SplitQueue,
    rings: RingAddresses,
    notifier: Notifier,
    /// Buffers of requests the device still owns, by token.
    pending: Vec<(u64, DmaBuf)>,
    next_token: u64,
}

struct EventQueue {
    queue: SplitQueue,
    rings: RingAddresses,
    notifier: Notifier,
    buffers: Vec<DmaBuf>,
}

pub struct Controller {
    /// `None` once closed: dropping the transport ends the connection (or releases the device).
    transport: Mutex<Option<Box<dyn Transport>>>,
    memory: DmaMemory,
    info: ControllerInfo,
    /// virtio-scsi only.
    control: Option<Mutex<ControlQueue>>,
    events: Option<Mutex<EventQueue>>,
    request_queues: Mutex<Vec<QueueParts>>,
    /// Request queues taken by channels and not given back, with the connection they were
    /// taken on: a new connection makes anew every queue that is neither parked nor here (those
    /// given up on, or dropped with the device).
    taken_queues: Mutex<Vec<(u16, u64)>>,
    /// Request queues taken by threads, for threads that find none free to share.
    cells: Mutex<Vec<Weak<QueueCell>>>,
    /// The features acked, and the ring layout: a new connection gets the same.
    features: u64,
    queue_features: QueueFeatures,
    /// Counts connections: a channel opened on an earlier one no longer works.
    connection: AtomicU64,
    /// Whether the device of the previous connection let go of our memory when it ended.
    previous_released: AtomicBool,
    failure: Mutex<Option<String>>,
    failed: AtomicBool,
    /// Set when closing begins: no new channels, memory or growth.
    closing: AtomicBool,
    /// Set once the device was reset and let go: queues fail, and their memory is safe.
    closed: AtomicBool,
}

/// A close under way: the transport taken from the controller, to be reset and dropped.
pub struct Closing {
    transport: Option<Box<dyn Transport>>,
}

fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

impl Controller {
    /// Brings the device up: features, configuration, memory, every queue, and the event
    /// buffers. Every failure names what went wrong.
    pub fn open(
        mut transport: Box<dyn Transport>,
        opts: &ControllerOptions,
    ) -> Result<Arc<Self>, DriverError> {
        let size = opts.queue_size;
        if !size.is_power_of_two() || !(4..=1024).contains(&size) {
            return Err(DriverError::Config(format!(
                "queue size {size} is not a power of two from 4 to 1024"
            )));
        }
        let told = match transport.device_type() {
            None => None,
            Some(VIRTIO_ID_SCSI) => Some(DeviceType::Scsi),
            Some(VIRTIO_ID_BLOCK) => Some(DeviceType::Blk),
            Some(other) => {
                return Err(DriverError::Config(format!(
                    "{} is virtio device type {other}, neither virtio-scsi nor virtio-blk",
                    transport.describe()
                )))
            }
        };
        let device = match (opts.device, told) {
            (Some(want), Some(is)) if want != is => {
                return Err(DriverError::Config(format!(
                    "{} is a {} device, not {}",
                    transport.describe(),
                    is.name(),
                    want.name()
                )))
            }
            (want, is) => want.or(is).unwrap_or_default(),
        };
        let offered = transport.device_features()?;
        let specific: &[u32] = match device {
            DeviceType::Scsi => &scsi::FEATURES,
            DeviceType::Blk => &blk::FEATURES,
        };
        let wanted = [
            VIRTIO_F_ANY_LAYOUT,
            VIRTIO_F_VERSION_1,
            VIRTIO_F_ACCESS_PLATFORM,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
        ]
        .iter()
        .chain(specific)
        .fold(0u64, |acc, &b| acc | (1 << b));
        let features = offered & wanted;
        transport.set_features(features)?;

        let config = match device {
            DeviceType::Scsi => DeviceConfig::Scsi(scsi::read_config(transport.as_mut(), size)),
            DeviceType::Blk => DeviceConfig::Blk(blk::read_config(transport.as_mut(), features)?),
        };
        let fixed = device.first_request_queue();
        let device_queues = match transport.queue_count()? {
            Some(n) if n > fixed => n - fixed,
            Some(n) => {
                return Err(DriverError::Config(format!(
                    "device has {n} virtqueues, a {} device needs at least {}",
                    device.name(),
                    fixed + 1
                )))
            }
            None => match &config {
                DeviceConfig::Scsi(c) => c.num_queues.clamp(1, 256) as u16,
                DeviceConfig::Blk(c) => c.num_queues,
            },
        };
        let request_queues = match opts.request_queues {
            Some(0) => return Err(DriverError::Config("requestQueues must be at least 1".into())),
            Some(n) if n > device_queues => {
                return Err(DriverError::Config(format!(
                    "{n} request queues asked for, the device has {device_queues}"
                )))
            }
            Some(n) => n,
            None => device_queues.min(16),
        };

        // A device may take smaller rings than asked for (a PCI function reports its maximum).
        let mut size = size;
        for index in 0..fixed + request_queues {
            match transport.max_queue_size(index)? {
                Some(0) => {
                    return Err(DriverError::Config(format!(
                        "virtqueue {index} is not available on the device"
                    )))
                }
                Some(max) if max < size => {
                    // Split rings are a power of two; take the largest that fits.
                    size = 1 << (15 - max.leading_zeros());
                    debug!("virtqueue {index} takes at most {max} entries; queues get {size}");
                }
                _ => {}
            }
        }

        let pool_config =
            transport.pool_config(PoolConfig::new(opts.memory_bytes).hugepages(opts.hugepages))?;
        let pool = Arc::new(DmaPool::new(pool_config)?);
        transport.set_memory(pool.regions())?;

        let qf = QueueFeatures {
            event_idx: has(features, VIRTIO_RING_F_EVENT_IDX),
            indirect: has(features, VIRTIO_RING_F_INDIRECT_DESC),
            max_segments: SEGMENTS_PER_REQUEST,
        };
        let mut setup = |index: u16| new_queue(&pool, size, qf, transport.as_mut(), index);
        let (mut control, mut events) = (None, None);
        if device == DeviceType::Scsi {
            let cq = setup(virtio_scsi_proto::CONTROL_QUEUE)?;
            control = Some(Mutex::new(ControlQueue {
                queue: cq.queue,
                rings: cq.rings,
                notifier: cq.handle.notifier,
                pending: Vec::new(),
                next_token: 0,
            }));
            let mut eq = setup(virtio_scsi_proto::EVENT_QUEUE)?;
            // The event queue always has buffers posted, so no event is ever missed for want of one.
            let mut buffers = Vec::new();
            for token in 0..EVENT_BUFFERS {
                let buf = pool.alloc_shared(Event::SIZE)?;
                eq.queue.add(&[], &[Segment::new(buf.iova(), Event::SIZE as u32)], u64::from(token))?;
                buffers.push(buf);
            }
            events = Some(Mutex::new(EventQueue {
                queue: eq.queue,
                rings: eq.rings,
                notifier: eq.handle.notifier,
                buffers,
            }));
        }
        let mut requests = Vec::with_capacity(request_queues as usize);
        for i in 0..request_queues {
            requests.push(setup(fixed + i)?);
        }
        transport.start()?;
        if let Some(eq) = &events {
            let mut eq = eq.lock().unwrap();
            if eq.queue.publish() {
                eq.notifier.notify().map_err(crate::transport::TransportError::from)?;
            }
        }

        let memory_limit = opts
            .max_memory_bytes
            .unwrap_or(opts.memory_bytes.saturating_mul(4).max(DEFAULT_MEMORY_LIMIT))
            .max(pool.total_size());
        let info = ControllerInfo {
            transport: transport.describe(),
            config,
            request_queues,
            queue_size: size,
            event_idx: qf.event_idx,
            indirect: qf.indirect,
            hotplug: device == DeviceType::Scsi && has(features, virtio_scsi_proto::feature::HOTPLUG),
            change: device == DeviceType::Scsi && has(features, virtio_scsi_proto::feature::CHANGE),
            hugepages: pool.regions().iter().all(|r| r.hugepages),
        };
        debug!("controller up: {info:?}");
        Ok(Arc::new(Controller {
            transport: Mutex::new(Some(transport)),
            memory: DmaMemory::new(pool, memory_limit, opts.hugepages),
            info,
            control,
            events,
            request_queues: Mutex::new(requests),
            taken_queues: Mutex::new(Vec::new()),
            cells: Mutex::new(Vec::new()),
            features,
            queue_features: qf,
            connection: AtomicU64::new(0),
            previous_released: AtomicBool::new(true),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }))
    }

    pub fn info(&self) -> &ControllerInfo {
        &self.info
    }

    /// The pool the controller started with (rings, headers and channel arenas live there).
    pub fn pool(&self) -> Arc<DmaPool> {
        self.memory.first()
    }

    /// A DMA buffer for long-lived use (JavaScript buffers, bounce buffers): from any pool with
    /// room, growing the memory by one pool when all are full and the limit allows.
    pub fn alloc_dma(&self, len: usize, align: usize) -> Result<DmaBuf, DriverError> {
        // Memory given back after close may still be written by a device that was let go
        // without being quiesced: none of it is handed out again.
        if self.closing.load(Ordering::Acquire) {
            return Err(DriverError::Closed);
        }
        self.memory.alloc_or_grow(len, align, &self.transport)
    }

    /// Whether free DMA memory is below the low-water mark with room left to grow.
    pub fn memory_low(&self) -> bool {
        !self.closing.load(Ordering::Acquire) && self.memory.low()
    }

    /// Grows the DMA memory ahead of need when it is low; false when it was not. Blocks for as
    /// long as making and announcing a pool takes: call it from a thread that does no I/O.
    pub fn grow_memory_ahead(&self) -> Result<bool, DriverError> {
        if self.closing.load(Ordering::Acquire) {
            return Err(DriverError::Closed);
        }
        self.memory.grow_ahead(&self.transport)
    }

    /// Changes whenever the memory grows; see [`Self::memory_spans`].
    #[inline]
    pub fn memory_generation(&self) -> u64 {
        self.memory.generation()
    }

    /// All DMA memory, for telling whether caller memory can go to the device as it is.
    pub fn memory_spans(&self) -> (u64, Vec<Span>) {
        self.memory.spans()
    }

    /// DMA memory now, and how far it may grow.
    pub fn memory_bytes(&self) -> (u64, u64) {
        (self.memory.total_bytes(), self.memory.limit())
    }

    /// The capacity of a virtio-blk device now, in 512-byte sectors: a device may change it at
    /// any time (virtio-blk has no event queue to say so).
    pub fn blk_capacity(&self) -> Result<u64, DriverError> {
        self.check_usable()?;
        if self.info.blk().is_none() {
            return Err(DriverError::Config("only a virtio-blk device has a capacity of its own".into()));
        }
        let mut transport = self.transport.lock().unwrap();
        let t = transport.as_mut().ok_or(DriverError::Closed)?;
        blk::read_capacity(t.as_mut())
    }

    /// Marks the controller failed; every later operation reports `reason`.
    pub fn fail(&self, reason: String) {
        let mut f = self.failure.lock().unwrap();
        if f.is_none() {
            warn!("controller failed: {reason}");
            *f = Some(reason);
        }
        self.failed.store(true, Ordering::Release);
    }

    pub fn failure(&self) -> Option<String> {
        if self.failed.load(Ordering::Acquire) {
            self.failure.lock().unwrap().clone()
        } else {
            None
        }
    }

    /// Errors out if the controller can no longer be used.
    pub(super) fn check_usable(&self) -> Result<(), DriverError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(DriverError::Closed);
        }
        match self.failure() {
            Some(reason) => Err(DriverError::Failed(reason)),
            None => Ok(()),
        }
    }

    /// Asks the transport whether the device is still there; fails the controller if not.
    pub fn check_alive(&self) -> Result<(), DriverError> {
        self.check_usable()?;
        let result = match self.transport.lock().unwrap().as_mut() {
            Some(t) => t.check_alive(),
            // Closing: the device is being reset, and its queues fail once that is done.
            None if !self.closed.load(Ordering::Acquire) && self.closing.load(Ordering::Acquire) => Ok(()),
            None => return Err(DriverError::Closed),
        };
        if let Err(e) = result {
            self.fail(e.to_string());
            return Err(DriverError::Failed(e.to_string()));
        }
        Ok(())
    }

    /// Closed (or closing) is an error; a failed controller still counts as open (its failure
    /// is reported by the calls that need the device).
    pub fn check_open(&self) -> Result<(), DriverError> {
        if self.closing.load(Ordering::Acquire) {
            return Err(DriverError::Closed);
        }
        Ok(())
    }

    /// Fails the controller and resets the device, so that it stops accessing memory at once.
    pub(super) fn fail_and_reset(&self, reason: String) {
        self.fail(reason);
        if let Some(t) = self.transport.lock().unwrap().as_mut() {
            if let Err(e) = t.reset() {
                warn!("device reset after failure: {e}");
            }
        }
    }

    /// A request queue for the calling thread (see [`QueueShare`]).
    pub fn open_queue(self: &Arc<Self>) -> Result<QueueShare, DriverError> {
        QueueShare::open(self, &self.cells)
    }

    /// A free request queue, and the connection it is set up on (read under the same lock a
    /// reconnect bumps it under, so the two always match).
    pub(super) fn take_queue(&self) -> Result<(QueueParts, u64), DriverError> {
        self.check_usable()?;
        let mut free = self.request_queues.lock().unwrap();
        if free.is_empty() {
            return Err(DriverError::NoFreeQueue(self.info.request_queues));
        }
        let parts = free.remove(0);
        let connection = self.connection();
        self.taken_queues.lock().unwrap().push((parts.index, connection));
        Ok((parts, connection))
    }

    /// A channel gives its queue back. A queue with requests on it (or a broken one) is stopped
    /// first, so that the device never touches its rings or buffers again; it then serves the
    /// next channel from a clean state. Returns false when the queue could not be stopped: the
    /// device may still write into the memory of its requests, so the caller must leak that
    /// memory, and the queue's own rings are leaked here.
    pub(super) fn return_queue(&self, mut parts: QueueParts, connection: u64) -> bool {
        // Under the transport lock throughout: a reconnect (which holds it while it sets queues
        // up) then comes wholly before or after this, and never sets up a second queue at this
        // index for one it took to be still taken, or that was returned to it meanwhile.
        let mut transport = self.transport.lock().unwrap();
        self.taken_queues.lock().unwrap().retain(|&q| q != (parts.index, connection));
        if connection != self.connection() {
            return self.return_stale_queue(parts, transport);
        }
        if parts.queue.in_flight() == 0 && !parts.queue.is_broken() {
            self.park_queue(parts);
            return true;
        }
        if self.closed.load(Ordering::Acquire) {
            // The device was reset and let go on close: nothing of it runs any more.
            return true;
        }
        let Some(t) = transport.as_mut() else {
            // No connection (dropped: the backend let go of everything), unless a close is
            // resetting the device right now: then it may still write, and the memory is kept.
            return !self.closing.load(Ordering::Acquire);
        };
        match t.stop_queue(parts.index) {
            Ok(true) => {}
            // A backend whose connection closed no longer touches our memory (vhost-user): the
            // queue is clean, and a new connection sets it up again.
            Err(_) if t.released() => {
                parts.queue.reset();
                self.park_queue(parts);
                return true;
            }
            Ok(false) => {
                warn!("request queue {} cannot be stopped on its own: its memory is leaked", parts.index);
                self.lose_queue(parts);
                return false;
            }
            Err(e) => {
                warn!("stopping request queue {}: {e}; its memory is leaked", parts.index);
                self.lose_queue(parts);
                return false;
            }
        }
        let dropped = parts.queue.reset();
        debug!("request queue {} stopped with {} requests abandoned", parts.index, dropped.len());
        self.set_up_and_park(parts, &mut transport);
        true
    }

    /// Sets a clean queue up again on the current connection, for the next channel.
    fn set_up_and_park(&self, mut parts: QueueParts, transport: &mut Option<Box<dyn Transport>>) {
        let Some(t) = transport.as_mut() else { return };
        match t.setup_queue(parts.index, &parts.rings) {
            Ok(handle) => {
                parts.handle = handle;
                self.park_queue(parts);
            }
            // Stopped but not restartable: the memory is safe to free, the queue is lost.
            Err(e) => warn!("request queue {} cannot be set up again: {e}", parts.index),
        }
    }

    /// A queue of an earlier connection comes back: the current connection never saw its ring,
    /// so it is set up there afresh, unless the earlier device may still be using it.
    fn return_stale_queue(
        &self,
        mut parts: QueueParts,
        mut transport: MutexGuard<'_, Option<Box<dyn Transport>>>,
    ) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return true;
        }
        if parts.queue.in_flight() > 0 && !self.previous_released.load(Ordering::Acquire) {
            warn!(
                "request queue {} of an earlier connection still had requests: its memory is leaked",
                parts.index
            );
            self.lose_queue(parts);
            return false;
        }
        // Made anew already (the device was reset in place): this one goes.
        let current = self.connection();
        let remade = self.request_queues.lock().unwrap().iter().any(|p| p.index == parts.index)
            || self.taken_queues.lock().unwrap().contains(&(parts.index, current));
        if remade {
            return true;
        }
        parts.queue.reset();
        self.set_up_and_park(parts, &mut transport);
        true
    }

    /// Gives up on a queue whose memory the device may still use: leaked, and made anew on a
    /// new connection.
    fn lose_queue(&self, parts: QueueParts) {
        std::mem::forget(parts);
    }

    /// Which connection (or re-initialisation) of the device this is: it changes each time
    /// the device comes back, and channels of an earlier one fail.
    pub fn connection(&self) -> u64 {
        self.connection.load(Ordering::Acquire)
    }

    /// Errors out for a channel opened on an earlier connection: its ring is not the one the
    /// device now serves.
    pub(super) fn check_connection(&self, opened_on: u64) -> Result<(), DriverError> {
        if self.connection() == opened_on {
            Ok(())
        } else {
            Err(DriverError::Failed("the device was reconnected since this request queue was opened".into()))
        }
    }

    /// Resets the device and sets it up again on the same transport (a PCI function), as
    /// [`Self::reconnect`] does over a new connection: the controller fails with `reason` first,
    /// so channels opened before fail and give their rings back, and the reset stops the device
    /// from touching any of our memory before the transport is let go of.
    pub fn reset_in_place(&self, reason: String) -> Result<(), DriverError> {
        self.check_open()?;
        self.fail(reason);
        let transport = {
            let mut current = self.transport.lock().unwrap();
            current.as_mut().ok_or(DriverError::Closed)?.reinit()?;
            current.take()
        };
        self.bring_up(transport.ok_or(DriverError::Closed)?, false)
    }

    /// Fails the controller and drops its connection: a vhost-user backend then stops and lets
    /// go of every request and of our memory, which no task management could make it do.
    /// [`Self::reconnect`] brings the device up again, from a clean state.
    pub fn drop_connection(&self, reason: String) {
        self.fail(reason);
        drop(self.transport.lock().unwrap().take());
    }

    /// Brings the device up again over a new connection, after the old one was lost (a
    /// restarted vhost-user backend): the features acked before, the same DMA memory (every
    /// region, so buffers handed out stay valid and zero-copy), and every queue from a clean
    /// state. Requests of the old connection failed when it went; channels opened on it fail
    /// from now on, and new ones get the new rings.
    pub fn reconnect(&self, transport: Box<dyn Transport>) -> Result<(), DriverError> {
        self.bring_up(transport, true)
    }

    /// Sets the device up again on `transport`; `late_queues`: the device accepts request
    /// queues after it started, so those still taken by channels wait to be given back.
    fn bring_up(&self, mut transport: Box<dyn Transport>, late_queues: bool) -> Result<(), DriverError> {
        self.check_open()?;
        if !self.failed.load(Ordering::Acquire) {
            return Err(DriverError::Config(
                "the controller works: only one whose device went away reconnects".into(),
            ));
        }
        let mut current = self.transport.lock().unwrap();
        let offered = transport.device_features()?;
        if offered & self.features != self.features {
            return Err(DriverError::Config(format!(
                "the device no longer offers features {:#x} it had before",
                self.features & !offered
            )));
        }
        transport.set_features(self.features)?;
        let first = self.info.device_type().first_request_queue();
        if let Some(n) = transport.queue_count()? {
            if n < first + self.info.request_queues {
                return Err(DriverError::Config(format!(
                    "the device now has {n} virtqueues; {} were in use",
                    first + self.info.request_queues
                )));
            }
        }
        transport.set_memory(&self.memory.regions())?;

        let t = transport.as_mut();
        if let Some(cq) = &self.control {
            let mut cq = cq.lock().unwrap();
            cq.queue.reset();
            cq.pending.clear();
            cq.notifier = t.setup_queue(virtio_scsi_proto::CONTROL_QUEUE, &cq.rings)?.notifier;
        }
        let mut eq = self.events.as_ref().map(|eq| eq.lock().unwrap());
        if let Some(eq) = eq.as_mut() {
            eq.queue.reset();
            for token in 0..eq.buffers.len() {
                let seg = Segment::new(eq.buffers[token].iova(), Event::SIZE as u32);
                eq.queue.add(&[], &[seg], token as u64)?;
            }
            eq.notifier = t.setup_queue(virtio_scsi_proto::EVENT_QUEUE, &eq.rings)?.notifier;
        }
        {
            let mut free = self.request_queues.lock().unwrap();
            for parts in free.iter_mut() {
                parts.queue.reset();
                parts.handle = t.setup_queue(parts.index, &parts.rings)?;
            }
            let pool = self.memory.first();
            // A queue still taken gets its ring set up again when it is given back, where the
            // device takes queues at any time (vhost-user). A reset device takes them before it
            // starts only (PCI): every one is made anew now, and those given back later go.
            let taken: Vec<u16> = if late_queues {
                self.taken_queues.lock().unwrap().iter().map(|&(i, _)| i).collect()
            } else {
                Vec::new()
            };
            for index in first..first + self.info.request_queues {
                if !free.iter().any(|p| p.index == index) && !taken.contains(&index) {
                    free.push(new_queue(&pool, self.info.queue_size, self.queue_features, t, index)?);
                }
            }
            free.sort_by_key(|p| p.index);
            // The free queues are of the new connection from here on.
            self.connection.fetch_add(1, Ordering::AcqRel);
        }
        t.start()?;
        if let Some(eq) = eq.as_mut() {
            if eq.queue.publish() {
                eq.notifier.notify().map_err(crate::transport::TransportError::from)?;
            }
        }
        drop(eq);
        let released = current.as_mut().map_or(true, |old| old.released());
        self.previous_released.store(released, Ordering::Release);
        *current = Some(transport);
        *self.failure.lock().unwrap() = None;
        self.failed.store(false, Ordering::Release);
        debug!("controller up again: {}", self.info.transport);
        Ok(())
    }

    fn park_queue(&self, parts: QueueParts) {
        let mut free = self.request_queues.lock().unwrap();
        free.push(parts);
        free.sort_by_key(|p| p.index);
    }

    /// Runs a task management function and waits for the device's answer.
    pub fn task_management(&self, addr: LunAddress, subtype: u32, tag: u64) -> Result<u8, DriverError> {
        self.check_usable()?;
        let Some(cq) = &self.control else {
            return Err(DriverError::Config(format!(
                "task management is for virtio-scsi devices; this is a {} device",
                self.info.device_type().name()
            )));
        };
        let mut cq = cq.lock().unwrap();
        let buf_len = TmfRequest::SIZE + TmfRequest::RESPONSE_SIZE;
        let mut buf = self.alloc_dma(buf_len, 64)?;
        buf.write_at(0, &TmfRequest { subtype, lun: addr.encode(), tag }.encode())?;
        buf.write_at(TmfRequest::SIZE, &[TMF_NO_RESPONSE])?;
        let token = cq.next_token;
        cq.next_token += 1;
        cq.queue.add(
            &[Segment::new(buf.iova(), TmfRequest::SIZE as u32)],
            &[Segment::new(buf.iova() + TmfRequest::SIZE as u64, TmfRequest::RESPONSE_SIZE as u32)],
            token,
        )?;
        cq.pending.push((token, buf));
        if cq.queue.publish() {
            cq.notifier.notify().map_err(crate::transport::TransportError::from)?;
        }
        let start = Instant::now();
        loop {
            match cq.queue.pop_used() {
                Ok(Some(done)) => {
                    let Some(pos) = cq.pending.iter().position(|(t, _)| *t == done.token) else { continue };
                    let (_, buf) = cq.pending.swap_remove(pos);
                    if done.token != token {
                        continue; // a reply to an earlier request that had timed out
                    }
                    let mut resp = [0u8; 1];
                    buf.read_at(TmfRequest::SIZE, &mut resp)?;
                    // Liberal where targets are sloppy: some complete task management with the
                    // response written but a used length of 0. The sentinel tells a written
                    // response from an untouched one; data requests keep the strict rules.
                    if done.len < 1 && resp[0] == TMF_NO_RESPONSE {
                        return Ok(response::FAILURE);
                    }
                    return Ok(resp[0]);
                }
                Ok(None) => {}
                Err(e) => {
                    self.fail(e.to_string());
                    return Err(e.into());
                }
            }
            if start.elapsed() > TMF_TIMEOUT {
                drop(cq);
                self.check_alive()?;
                return Err(DriverError::Timeout(TMF_TIMEOUT));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Takes the events the device posted and gives their buffers back to it.
    pub fn poll_events(&self) -> Result<Vec<ScsiEvent>, DriverError> {
        self.check_usable()?;
        // Only virtio-scsi has an event queue.
        let Some(eq) = &self.events else { return Ok(Vec::new()) };
        let mut eq = eq.lock().unwrap();
        let mut out = Vec::new();
        let mut reposted = false;
        loop {
            let done = match eq.queue.pop_used() {
                Ok(Some(d)) => d,
                Ok(None) => break,
                Err(e) => {
                    self.fail(e.to_string());
                    return Err(e.into());
                }
            };
            let token = done.token as usize;
            let mut raw = [0u8; Event::SIZE];
            eq.buffers[token].read_at(0, &mut raw)?;
            if done.len as usize >= Event::SIZE {
                if let Some(ev) = Event::decode(&raw) {
                    if ev.event != event::NO_EVENT || ev.event & event::EVENTS_MISSED != 0 {
                        let addr = LunAddress::decode(&ev.lun);
                        out.push(ScsiEvent { event: ev.event, addr, reason: ev.reason });
                    }
                }
            }
            let seg = Segment::new(eq.buffers[token].iova(), Event::SIZE as u32);
            eq.queue.add(&[], &[seg], done.token)?;
            reposted = true;
        }
        if reposted && eq.queue.publish() {
            eq.notifier.notify().map_err(crate::transport::TransportError::from)?;
        }
        Ok(out)
    }

    /// Stops the device and lets it go: a vhost-user connection is closed, so the backend can
    /// serve another frontend at once. Queues still held by channels fail from then on.
    pub fn close(&self) {
        if let Some(c) = self.begin_close() {
            self.finish_close(c);
        }
    }

    /// The quick half of `close`: no new channels or memory from now on, and the transport is
    /// taken for `finish_close`. Channels keep working (the device may still complete what it
    /// holds) until the device is reset. None when closing began before.
    pub fn begin_close(&self) -> Option<Closing> {
        if self.closing.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(Closing { transport: self.transport.lock().unwrap().take() })
    }

    /// The slow half of `close`: resets the device (a silent one is waited for up to the
    /// transport's reply deadline) and drops the transport; then queues fail, and what they
    /// held is theirs to release.
    pub fn finish_close(&self, c: Closing) {
        if let Some(mut t) = c.transport {
            if let Err(e) = t.reset() {
                debug!("reset on close: {e}");
            }
        }
        self.closed.store(true, Ordering::Release);
    }
}

/// A queue of `size` entries in `pool`, set up on the device at `index`.
fn new_queue(
    pool: &DmaPool,
    size: u16,
    qf: QueueFeatures,
    transport: &mut dyn Transport,
    index: u16,
) -> Result<QueueParts, DriverError> {
    let mut queue = SplitQueue::from_pool(pool, size, qf)?;
    queue.disable_interrupts();
    // QEMU's virtio-scsi counts data-out bytes into the used length; the scsi layer takes data
    // lengths from the response instead of trusting it.
    queue.clamp_used_len(true);
    let a = queue.addrs();
    let host = |iova: u64| pool.translate(iova, 1).map(|p| p as u64);
    let rings = RingAddresses {
        size,
        desc_iova: a.desc,
        avail_iova: a.avail,
        used_iova: a.used,
        desc_host: host(a.desc)?,
        avail_host: host(a.avail)?,
        used_host: host(a.used)?,
    };
    let handle = transport.setup_queue(index, &rings)?;
    Ok(QueueParts { index, queue, handle, rings })
}
