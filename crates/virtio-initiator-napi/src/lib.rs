//! Node.js binding of the initiator core, kept thin: argument conversion and error mapping only.
//! Requests and completions cross in packed batches (see `virtio_initiator_core::driver::records`),
//! so one native call carries many of them, and no native thread ever calls into JavaScript.

use std::cell::{Cell, UnsafeCell};
use std::sync::{Arc, Mutex, Weak};

use napi::bindgen_prelude::*;
use napi_derive::napi;
use virtio_initiator_core::driver::{self, Controller as CoreController, QueueShare};
use virtio_initiator_core::memory::HugePages;
use virtio_initiator_core::transport::pci::{self as pci, PciTransport, Sysfs, VirtioInterface};
use virtio_initiator_core::transport::vhost_user::VhostUserTransport;
use virtio_initiator_core::transport::Transport;
use virtio_scsi_proto::LunAddress;

mod load;
mod logger;

fn err(e: impl std::fmt::Display) -> Error {
    Error::from_reason(e.to_string())
}

/// An error whose JavaScript `code` names its cause.
fn coded(code: &str, e: impl std::fmt::Display) -> Error<String> {
    Error::new(code.to_owned(), e.to_string())
}

/// A task management function waiting for the device, off the event loop.
pub struct TaskManagement {
    inner: Arc<CoreController>,
    addr: LunAddress,
    tmf: u32,
    tag: u64,
}

impl Task for TaskManagement {
    type Output = u8;
    type JsValue = u32;

    fn compute(&mut self) -> Result<u8> {
        self.inner.task_management(self.addr, self.tmf, self.tag).map_err(err)
    }

    fn resolve(&mut self, _env: Env, response: u8) -> Result<u32> {
        Ok(u32::from(response))
    }
}

/// Why opening a controller failed.
#[napi(object)]
pub struct OpenFailure {
    /// The errno name of a failed connection (ECONNREFUSED, ETIMEDOUT, ...), else GenericFailure.
    pub code: String,
    pub message: String,
}

/// What to open: a vhost-user socket or a PCI function.
pub enum OpenTarget {
    VhostUser(String),
    Pci(String),
}

/// Opening a controller (connection, negotiation, memory, rings), off the event loop.
pub struct Open {
    target: OpenTarget,
    opts: driver::ControllerOptions,
}

impl Task for Open {
    type Output = std::result::Result<Arc<CoreController>, OpenFailure>;
    type JsValue = Either<Controller, OpenFailure>;

    fn compute(&mut self) -> Result<Self::Output> {
        let generic = || Status::GenericFailure.as_ref().to_owned();
        let transport: Box<dyn Transport> = match &self.target {
            OpenTarget::VhostUser(path) => match VhostUserTransport::connect(path) {
                Ok(t) => Box::new(t),
                Err(e) => {
                    let code = e.errno_name().map(str::to_owned).unwrap_or_else(generic);
                    return Ok(Err(OpenFailure { code, message: e.to_string() }));
                }
            },
            OpenTarget::Pci(address) => match PciTransport::open(address) {
                Ok(t) => Box::new(t),
                Err(e) => return Ok(Err(OpenFailure { code: generic(), message: e.to_string() })),
            },
        };
        Ok(CoreController::open(transport, &self.opts)
            .map_err(|e| OpenFailure { code: generic(), message: e.to_string() }))
    }

    fn resolve(&mut self, _env: Env, output: Self::Output) -> Result<Self::JsValue> {
        Ok(match output {
            Ok(inner) => Either::A(Controller { inner, owner: true, shared_id: Cell::new(None) }),
            Err(failure) => Either::B(failure),
        })
    }
}

/// Bringing a controller whose vhost-user backend went away up again over a new connection,
/// off the event loop.
pub struct Reconnect {
    inner: Arc<CoreController>,
    path: String,
    /// Drop the current connection first, failing the controller with this reason (a device
    /// reset); None when the connection is already gone.
    drop_reason: Option<String>,
}

impl Task for Reconnect {
    type Output = Option<OpenFailure>;
    type JsValue = Option<OpenFailure>;

    fn compute(&mut self) -> Result<Self::Output> {
        let generic = || Status::GenericFailure.as_ref().to_owned();
        if let Some(reason) = self.drop_reason.take() {
            self.inner.drop_connection(reason);
        }
        let transport = match VhostUserTransport::connect(&self.path) {
            Ok(t) => t,
            Err(e) => {
                let code = e.errno_name().map(str::to_owned).unwrap_or_else(generic);
                return Ok(Some(OpenFailure { code, message: e.to_string() }));
            }
        };
        Ok(self
            .inner
            .reconnect(Box::new(transport))
            .err()
            .map(|e| OpenFailure { code: generic(), message: e.to_string() }))
    }

    fn resolve(&mut self, _env: Env, output: Self::Output) -> Result<Self::JsValue> {
        Ok(output)
    }
}

/// The device reset of a controller being closed, off the event loop.
pub struct Close {
    inner: Arc<CoreController>,
    closing: Option<driver::Closing>,
}

impl Task for Close {
    type Output = ();
    type JsValue = ();

    fn compute(&mut self) -> Result<()> {
        if let Some(c) = self.closing.take() {
            self.inner.finish_close(c);
        }
        Ok(())
    }

    fn resolve(&mut self, _env: Env, _: ()) -> Result<()> {
        Ok(())
    }
}

/// A reset of the device and its set-up again on the same PCI function, off the event loop.
pub struct ResetInPlace {
    inner: Arc<CoreController>,
    reason: String,
}

impl Task for ResetInPlace {
    type Output = Option<OpenFailure>;
    type JsValue = Option<OpenFailure>;

    fn compute(&mut self) -> Result<Self::Output> {
        let generic = || Status::GenericFailure.as_ref().to_owned();
        Ok(self
            .inner
            .reset_in_place(std::mem::take(&mut self.reason))
            .err()
            .map(|e| OpenFailure { code: generic(), message: e.to_string() }))
    }

    fn resolve(&mut self, _env: Env, output: Self::Output) -> Result<Self::JsValue> {
        Ok(output)
    }
}

/// A read of a virtio-blk device's capacity, off the event loop.
pub struct ReadCapacity {
    inner: Arc<CoreController>,
}

impl Task for ReadCapacity {
    type Output = u64;
    type JsValue = f64;

    fn compute(&mut self) -> Result<u64> {
        self.inner.blk_capacity().map_err(err)
    }

    fn resolve(&mut self, _env: Env, sectors: u64) -> Result<f64> {
        Ok(sectors as f64)
    }
}

/// Growth of the DMA memory ahead of need, off the event loop.
pub struct GrowMemory {
    inner: Arc<CoreController>,
}

impl Task for GrowMemory {
    type Output = bool;
    type JsValue = bool;

    fn compute(&mut self) -> Result<bool> {
        self.inner.grow_memory_ahead().map_err(err)
    }

    fn resolve(&mut self, _env: Env, grew: bool) -> Result<bool> {
        Ok(grew)
    }
}

/// Size of one packed request record.
#[napi]
pub const SUBMIT_RECORD_SIZE: u32 = driver::SUBMIT_RECORD_SIZE as u32;
/// Size of one packed completion record.
#[napi]
pub const COMPLETION_RECORD_SIZE: u32 = driver::COMPLETION_RECORD_SIZE as u32;
/// Bytes per completion in a completion area: the record and its sense slot.
#[napi]
pub const COMPLETION_SLOT_SIZE: u32 = driver::COMPLETION_SLOT_SIZE as u32;
/// Response code of a completion for a request refused before it reached the device.
#[napi]
pub const RESPONSE_REFUSED: u32 = driver::RESPONSE_REFUSED as u32;

/// Sets the level of the native log records on stderr ("off", "error", "warn", "info",
/// "debug", "trace"); the default comes from the VIRTIO_INITIATOR_LOG environment variable.
#[napi]
pub fn set_log_level(level: String) -> Result<()> {
    logger::init();
    let filter = logger::parse_level(&level)
        .ok_or_else(|| err(format!("log level '{level}' is not off, error, warn, info, debug or trace")))?;
    log::set_max_level(filter);
    Ok(())
}

/// Version of the native addon.
#[napi]
pub fn native_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

#[napi(object)]
pub struct ControllerOptions {
    /// Request queues to set up (default: all the device has, at most 16).
    pub request_queues: Option<u32>,
    /// Entries per queue, a power of two up to 1024 (default 256).
    pub queue_size: Option<u32>,
    /// DMA pool size in bytes (default 16 MiB).
    pub memory_bytes: Option<f64>,
    /// How far the DMA memory may grow when it runs dry (default 4 x memoryBytes, at least 256 MiB).
    pub max_memory_bytes: Option<f64>,
    /// "auto" (default), "require" or "never".
    pub hugepages: Option<String>,
    /// "scsi" or "blk". vhost-user cannot tell the device type (default "scsi"); a PCI function's
    /// id does, and one given must match it.
    pub device_type: Option<String>,
}

/// What a virtio-blk device offers (configuration space under the features agreed).
#[napi(object)]
pub struct BlkInfo {
    /// In 512-byte sectors.
    pub capacity_sectors: f64,
    pub block_size: u32,
    pub physical_block_exp: u32,
    pub opt_io_blocks: u32,
    /// Largest data segment in bytes (0: not stated).
    pub size_max: u32,
    /// Most data segments per request (0: not stated).
    pub seg_max: u32,
    pub read_only: bool,
    pub flush: bool,
    pub writeback: bool,
    pub discard: bool,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_alignment: u32,
    pub write_zeroes: bool,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: bool,
}

#[napi(object)]
pub struct ControllerInfo {
    pub transport: String,
    /// "scsi" or "blk".
    pub device_type: String,
    pub request_queues: u32,
    pub queue_size: u32,
    pub seg_max: u32,
    pub max_sectors: u32,
    pub cmd_per_lun: u32,
    pub max_target: u32,
    pub max_lun: u32,
    pub event_idx: bool,
    pub indirect: bool,
    pub hotplug: bool,
    pub change: bool,
    pub hugepages: bool,
    /// DMA memory now; it grows up to `maxMemoryBytes` when allocations run dry.
    pub memory_bytes: f64,
    pub max_memory_bytes: f64,
    /// virtio-blk devices only.
    pub blk: Option<BlkInfo>,
}

fn blk_info(c: &driver::BlkConfig) -> BlkInfo {
    BlkInfo {
        capacity_sectors: c.capacity as f64,
        block_size: c.block_size,
        physical_block_exp: u32::from(c.physical_block_exp),
        opt_io_blocks: c.opt_io_blocks,
        size_max: c.size_max,
        seg_max: c.seg_max,
        read_only: c.read_only,
        flush: c.flush,
        writeback: c.writeback,
        discard: c.discard,
        max_discard_sectors: c.max_discard_sectors,
        max_discard_seg: c.max_discard_seg,
        discard_alignment: c.discard_alignment,
        write_zeroes: c.write_zeroes,
        max_write_zeroes_sectors: c.max_write_zeroes_sectors,
        max_write_zeroes_seg: c.max_write_zeroes_seg,
        write_zeroes_may_unmap: c.write_zeroes_may_unmap,
    }
}

fn device_type_name(t: driver::DeviceType) -> String {
    match t {
        driver::DeviceType::Scsi => "scsi",
        driver::DeviceType::Blk => "blk",
    }
    .to_string()
}

#[napi(object)]
pub struct ControllerEvent {
    pub event: u32,
    pub target: u32,
    pub lun: u32,
    pub reason: u32,
}

fn core_options(o: Option<ControllerOptions>) -> Result<driver::ControllerOptions> {
    let mut opts = driver::ControllerOptions::default();
    let Some(o) = o else { return Ok(opts) };
    if let Some(n) = o.request_queues {
        opts.request_queues =
            Some(u16::try_from(n).map_err(|_| err(format!("requestQueues {n} is too large")))?);
    }
    if let Some(n) = o.queue_size {
        opts.queue_size = u16::try_from(n).map_err(|_| err(format!("queueSize {n} is too large")))?;
    }
    if let Some(b) = o.memory_bytes {
        if !(b.is_finite() && b >= 1.0) {
            return Err(err(format!("memoryBytes {b} is not a positive number")));
        }
        opts.memory_bytes = b as u64;
    }
    if let Some(b) = o.max_memory_bytes {
        if !(b.is_finite() && b >= opts.memory_bytes as f64) {
            return Err(err(format!("maxMemoryBytes {b} is below memoryBytes {}", opts.memory_bytes)));
        }
        opts.max_memory_bytes = Some(b as u64);
    }
    if let Some(h) = o.hugepages {
        opts.hugepages = match h.as_str() {
            "auto" => HugePages::Auto,
            "require" => HugePages::Require,
            "never" => HugePages::Never,
            other => return Err(err(format!("hugepages '{other}' is not 'auto', 'require' or 'never'"))),
        };
    }
    if let Some(t) = o.device_type {
        opts.device = Some(match t.as_str() {
            "scsi" => driver::DeviceType::Scsi,
            "blk" => driver::DeviceType::Blk,
            other => return Err(err(format!("deviceType '{other}' is not 'scsi' or 'blk'"))),
        });
    }
    Ok(opts)
}

/// A controller of one virtio-scsi or virtio-blk device.
#[napi]
pub struct Controller {
    inner: Arc<CoreController>,
    /// The thread that opened the device owns it; threads that attached only let go of it.
    owner: bool,
    /// This object's entry in the shared-controller registry, once shared. A Cell: `close`
    /// takes `&self`, since a `&mut self` borrow would last as long as its promise.
    shared_id: Cell<Option<u32>>,
}

/// Controllers handed to other threads, by id. A worker thread attaches by id and gets its own
/// object over the same controller; the entry goes when the owner closes the controller.
static SHARED: Mutex<(u32, Vec<SharedEntry>)> = Mutex::new((0, Vec::new()));
type SharedEntry = (u32, Weak<CoreController>);

#[napi]
impl Controller {
    /// Connects to a vhost-user socket (virtio-scsi, or virtio-blk with `deviceType: "blk"`)
    /// and brings the device up, in libuv's thread pool.
    /// Resolves with the controller, or with why it failed: the message and, for a failed
    /// connection, its errno name (ECONNREFUSED, ETIMEDOUT, ...) as `code`.
    #[napi(ts_return_type = "Promise<Controller | OpenFailure>")]
    pub fn connect_vhost_user(
        path: String,
        options: Option<ControllerOptions>,
    ) -> Result<AsyncTask<Open>, String> {
        logger::init();
        let opts = core_options(options).map_err(|e| coded(e.status.as_ref(), &e.reason))?;
        Ok(AsyncTask::new(Open { target: OpenTarget::VhostUser(path), opts }))
    }

    /// Opens a virtio-scsi or virtio-blk PCI function bound to vfio-pci ("0000:00:03.0") and brings the
    /// device up, in libuv's thread pool; resolves as `connectVhostUser` does.
    #[napi(ts_return_type = "Promise<Controller | OpenFailure>")]
    pub fn open_pci(address: String, options: Option<ControllerOptions>) -> Result<AsyncTask<Open>> {
        logger::init();
        let opts = core_options(options)?;
        Ok(AsyncTask::new(Open { target: OpenTarget::Pci(address), opts }))
    }

    #[napi(getter)]
    pub fn info(&self) -> ControllerInfo {
        let i = self.inner.info();
        // A virtio-blk device is one disk at 0:0; its limits are in `blk`.
        let (seg_max, max_sectors, cmd_per_lun, max_target, max_lun) = match (i.scsi(), i.blk()) {
            (Some(c), _) => (c.seg_max, c.max_sectors, c.cmd_per_lun, u32::from(c.max_target), c.max_lun),
            (None, b) => (b.map_or(0, |b| b.seg_max), 0, u32::from(i.queue_size), 0, 0),
        };
        ControllerInfo {
            transport: i.transport.clone(),
            device_type: device_type_name(i.device_type()),
            request_queues: u32::from(i.request_queues),
            queue_size: u32::from(i.queue_size),
            seg_max,
            max_sectors,
            cmd_per_lun,
            max_target,
            max_lun,
            event_idx: i.event_idx,
            indirect: i.indirect,
            hotplug: i.hotplug,
            change: i.change,
            hugepages: i.hugepages,
            memory_bytes: self.inner.memory_bytes().0 as f64,
            max_memory_bytes: self.inner.memory_bytes().1 as f64,
            blk: i.blk().map(blk_info),
        }
    }

    /// The capacity of a virtio-blk device now, in 512-byte sectors, read from its configuration
    /// space in libuv's thread pool (a device may change it at any time).
    #[napi(ts_return_type = "Promise<number>")]
    pub fn read_capacity(&self) -> AsyncTask<ReadCapacity> {
        AsyncTask::new(ReadCapacity { inner: self.inner.clone() })
    }

    /// A request queue for the calling thread: one of its own while there are free ones, else
    /// a place on the least used one (shared, with completions routed to their submitter).
    #[napi]
    pub fn open_channel(&self) -> Result<Channel> {
        Ok(Channel::new(self.inner.open_queue().map_err(err)?))
    }

    /// An id under which other threads (worker_threads) can attach to this controller.
    #[napi]
    pub fn share(&self) -> Result<u32> {
        self.inner.check_open().map_err(err)?;
        if let Some(id) = self.shared_id.get() {
            return Ok(id);
        }
        let mut shared = SHARED.lock().unwrap();
        shared.1.retain(|(_, c)| c.strong_count() > 0);
        shared.0 = shared.0.wrapping_add(1).max(1);
        let id = shared.0;
        shared.1.push((id, Arc::downgrade(&self.inner)));
        self.shared_id.set(Some(id));
        Ok(id)
    }

    /// Attaches the calling thread to a controller shared with `share()`. Closing the result
    /// releases this thread's hold only; the owner's close stops the device for every thread.
    #[napi(factory)]
    pub fn attach(id: u32) -> Result<Self> {
        let shared = SHARED.lock().unwrap();
        let inner = shared
            .1
            .iter()
            .find(|(i, _)| *i == id)
            .and_then(|(_, c)| c.upgrade())
            .ok_or_else(|| err(format!("no shared controller {id} (closed, or never shared)")))?;
        drop(shared);
        inner.check_open().map_err(err)?;
        Ok(Controller { inner, owner: false, shared_id: Cell::new(Some(id)) })
    }

    /// A Buffer over DMA memory: I/O on it copies nothing. Freed when garbage-collected.
    #[napi]
    pub fn alloc_dma_buffer<'env>(&self, env: &'env Env, size: u32) -> Result<BufferSlice<'env>> {
        if size == 0 {
            return Err(err("DMA buffer size must be at least 1 byte"));
        }
        let mut buf = self.inner.alloc_dma(size as usize, 4096).map_err(err)?;
        let ptr = buf.as_mut_slice().as_mut_ptr();
        // SAFETY: `buf` owns `size` bytes of the pool's shared mapping and keeps the mapping
        // alive; it moves into the finalizer, so the memory stays valid until the Buffer is
        // collected and is returned to the pool only then.
        unsafe { BufferSlice::from_external(env, ptr, size as usize, buf, |_, buf| drop(buf)) }
    }

    /// Connects again to the vhost-user socket at `path` after the backend went away, and
    /// brings the device up on the same memory; resolves with null, or with why it failed.
    #[napi(ts_return_type = "Promise<OpenFailure | null>")]
    pub fn reconnect_vhost_user(&self, path: String) -> AsyncTask<Reconnect> {
        AsyncTask::new(Reconnect { inner: self.inner.clone(), path, drop_reason: None })
    }

    /// Resets a vhost-user device the only sure way: fails the controller with `reason`, drops
    /// the connection (the backend stops and lets go of everything) and connects again as
    /// `reconnectVhostUser` does; resolves with null, or with why it could not connect again.
    #[napi(ts_return_type = "Promise<OpenFailure | null>")]
    pub fn reset_vhost_user(&self, path: String, reason: String) -> AsyncTask<Reconnect> {
        AsyncTask::new(Reconnect { inner: self.inner.clone(), path, drop_reason: Some(reason) })
    }

    /// Resets the device and sets it up again on the same PCI function (the same memory,
    /// queues afresh), failing the controller with `reason` first: the last step of recovery,
    /// and what a device that reports DEVICE_NEEDS_RESET gets. Resolves with null once the
    /// controller works again, else with why not.
    #[napi(ts_return_type = "Promise<OpenFailure | null>")]
    pub fn reset_pci(&self, reason: String) -> AsyncTask<ResetInPlace> {
        AsyncTask::new(ResetInPlace { inner: self.inner.clone(), reason })
    }

    /// Whether free DMA memory is below the low-water mark (with room left to grow).
    #[napi]
    pub fn memory_low(&self) -> bool {
        self.inner.memory_low()
    }

    /// Grows the DMA memory by one region when it is low, in libuv's thread pool; resolves
    /// with whether it grew.
    #[napi(ts_return_type = "Promise<boolean>")]
    pub fn grow_memory(&self) -> AsyncTask<GrowMemory> {
        AsyncTask::new(GrowMemory { inner: self.inner.clone() })
    }

    /// The address of a DMA Buffer of this controller in this process (for by-address records),
    /// or -1 when the Buffer is not DMA memory of this controller.
    #[napi]
    pub fn dma_address(&self, buffer: BufferSlice) -> f64 {
        let (gen_spans, addr, len) = (self.inner.memory_spans(), buffer.as_ptr() as u64, buffer.len() as u64);
        if gen_spans.1.iter().any(|s| s.iova_of(addr, len.max(1)).is_some()) {
            addr as f64
        } else {
            -1.0
        }
    }

    /// Runs a task management function on the control queue and resolves with the virtio
    /// response. The wait for the device happens in libuv's thread pool, not on the event loop.
    #[napi(ts_return_type = "Promise<number>")]
    pub fn task_management(
        &self,
        target: u32,
        lun: u32,
        tmf: u32,
        tag: Option<u32>,
    ) -> Result<AsyncTask<TaskManagement>> {
        let addr = lun_address(target, lun)?;
        Ok(AsyncTask::new(TaskManagement {
            inner: self.inner.clone(),
            addr,
            tmf,
            tag: u64::from(tag.unwrap_or(0)),
        }))
    }

    /// Events from the event queue since the last call.
    #[napi]
    pub fn poll_events(&self) -> Result<Vec<ControllerEvent>> {
        let events = self.inner.poll_events().map_err(err)?;
        Ok(events
            .into_iter()
            .map(|e| ControllerEvent {
                event: e.event,
                target: e.addr.map_or(0, |a| u32::from(a.target)),
                lun: e.addr.map_or(0, |a| u32::from(a.lun)),
                reason: e.reason,
            })
            .collect())
    }

    /// True once the controller was closed (by its owner, in any thread).
    #[napi(getter)]
    pub fn closed(&self) -> bool {
        self.inner.check_open().is_err()
    }

    /// Fails the controller: every later operation reports `reason`.
    #[napi]
    pub fn fail(&self, reason: String) {
        self.inner.fail(reason);
    }

    /// Why the controller failed, or null while it works.
    #[napi(getter)]
    pub fn failure(&self) -> Option<String> {
        self.inner.failure()
    }

    /// Asks the transport whether the device is still there (a vhost-user socket that closed,
    /// a PCI function that needs a reset); returns why the controller failed, or null. Cheap
    /// enough to call from a timer while idle.
    #[napi]
    pub fn check_alive(&self) -> Option<String> {
        match self.inner.check_alive() {
            Ok(()) => None,
            Err(_) => self.inner.failure().or_else(|| Some("closed".into())),
        }
    }

    /// Stops the device and lets it go (the owner), or releases this thread's hold on it. The
    /// controller is closed when this returns; the device reset (which a silent backend makes
    /// wait up to its reply deadline) runs in libuv's thread pool, and the promise resolves once
    /// the device can no longer touch our memory.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close(&self) -> AsyncTask<Close> {
        let mut closing = None;
        if self.owner {
            if let Some(id) = self.shared_id.take() {
                SHARED.lock().unwrap().1.retain(|(i, _)| *i != id);
            }
            closing = self.inner.begin_close();
        }
        AsyncTask::new(Close { inner: self.inner.clone(), closing })
    }
}

fn lun_address(target: u32, lun: u32) -> Result<LunAddress> {
    let t = u8::try_from(target).map_err(|_| err(format!("target {target} is above 255")))?;
    if lun > u32::from(virtio_scsi_proto::lun::MAX_LUN) {
        return Err(err(format!("LUN {lun} is above {}", virtio_scsi_proto::lun::MAX_LUN)));
    }
    Ok(LunAddress::new(t, lun as u16))
}

/// Fixed memory shared with JavaScript as a Buffer: 8-byte aligned, alive as long as either
/// side holds it.
struct SharedArea {
    words: Box<[UnsafeCell<u64>]>,
}

// SAFETY: the area is plain bytes; the channel and its JavaScript thread use it in turn, never
// at once (JavaScript writes records, then calls into the channel, which reads them).
unsafe impl Send for SharedArea {}
unsafe impl Sync for SharedArea {}

impl SharedArea {
    fn new(bytes: usize) -> Arc<Self> {
        Arc::new(SharedArea { words: (0..bytes.div_ceil(8)).map(|_| UnsafeCell::new(0)).collect() })
    }

    fn ptr(&self) -> *mut u8 {
        UnsafeCell::raw_get(self.words.as_ptr()) as *mut u8
    }

    fn len(&self) -> usize {
        self.words.len() * 8
    }

    /// The bytes, for the duration of one native call.
    ///
    /// # Safety
    /// No other slice of the area may be alive, and JavaScript runs nothing meanwhile (it is
    /// the same thread, blocked in the call).
    #[allow(clippy::mut_from_ref)]
    unsafe fn bytes(&self) -> &mut [u8] {
        std::slice::from_raw_parts_mut(self.ptr(), self.len())
    }

    fn buffer<'env>(self: &Arc<Self>, env: &'env Env) -> Result<BufferSlice<'env>> {
        let keep = self.clone();
        // SAFETY: the memory lives as long as `keep`, which the finalizer holds.
        unsafe { BufferSlice::from_external(env, self.ptr(), self.len(), keep, |_, keep| drop(keep)) }
    }
}

/// One request queue, used from one thread. Requests go down as packed records (see
/// `virtio_initiator_core::driver::records`) in the submission area and come back in the
/// completion area, both shared with JavaScript, so that one `pump` call moves both ways.
#[napi]
pub struct Channel {
    inner: QueueShare,
    submissions: Arc<SharedArea>,
    completions: Arc<SharedArea>,
}

fn host_buffers(buffers: Option<Vec<Option<BufferSlice>>>) -> Vec<Option<driver::HostBuffer>> {
    buffers
        .unwrap_or_default()
        .into_iter()
        .map(|b| b.map(|mut b| driver::HostBuffer { ptr: b.as_mut_ptr(), len: b.len() }))
        .collect()
}

#[napi]
impl Channel {
    fn new(inner: QueueShare) -> Self {
        let n = inner.capacity();
        Channel {
            inner,
            submissions: SharedArea::new(n * driver::SUBMIT_RECORD_SIZE),
            completions: SharedArea::new(n * driver::COMPLETION_SLOT_SIZE),
        }
    }

    /// Added to a slot number, the tag the device knows that request by: the member id in the
    /// upper 16 bits on a shared queue (member 0's requests carry their slot as it is).
    #[napi(getter)]
    pub fn tag_base(&self) -> u32 {
        self.inner.tag_base()
    }

    #[napi(getter)]
    pub fn queue_index(&self) -> u32 {
        u32::from(self.inner.queue_index())
    }

    /// Most requests in flight at once; also the record capacity of both areas.
    #[napi(getter)]
    pub fn capacity(&self) -> u32 {
        self.inner.capacity() as u32
    }

    /// This thread's requests on the queue.
    #[napi(getter)]
    pub fn in_flight(&self) -> u32 {
        self.inner.in_flight() as u32
    }

    /// True while other threads use the same request queue.
    #[napi(getter)]
    pub fn shared(&self) -> bool {
        self.inner.is_shared()
    }

    /// The submission area: `capacity` records of SUBMIT_RECORD_SIZE bytes.
    #[napi]
    pub fn submission_area<'env>(&self, env: &'env Env) -> Result<BufferSlice<'env>> {
        self.submissions.buffer(env)
    }

    /// The completion area: `capacity` records of COMPLETION_RECORD_SIZE bytes, then one
    /// sense slot of SENSE_SLOT_SIZE bytes per record.
    #[napi]
    pub fn completion_area<'env>(&self, env: &'env Env) -> Result<BufferSlice<'env>> {
        self.completions.buffer(env)
    }

    /// Submits the first `count` records of the submission area, then reaps completions into
    /// the completion area. Returns `taken * 65536 + completed`. `buffers` is the list that
    /// by-index records name (plain Buffers, bounced through DMA memory); by-address records
    /// need none. Throws only when the controller is closed or failed.
    #[napi]
    pub fn pump(&mut self, count: u32, buffers: Option<Vec<Option<BufferSlice>>>) -> Result<u32> {
        let hosts = host_buffers(buffers);
        let capacity = self.inner.capacity();
        // SAFETY: the areas are used only inside this call on the JavaScript thread that owns
        // the channel; the caller keeps every data buffer referenced until its completion.
        let (taken, done) = unsafe {
            let batch = self.submissions.bytes();
            let out = self.completions.bytes();
            self.inner.pump(batch, (count as usize).min(capacity), &hosts, out)
        }
        .map_err(err)?;
        Ok(((taken as u32) << 16) | done as u32)
    }

    /// A descriptor of the caller's own (to close) for the queue's interrupt eventfd, in
    /// blocking mode: reading 8 bytes from it waits for the device's signal (interrupt mode).
    #[napi]
    pub fn interrupt_fd(&mut self) -> Result<i32> {
        use std::os::fd::IntoRawFd;
        Ok(self.inner.interrupt_fd().map_err(err)?.into_raw_fd())
    }

    /// Asks for a signal at the next completion; true when completions are already waiting
    /// (or the queue is shared), so the caller polls instead of waiting.
    #[napi]
    pub fn arm_interrupts(&mut self) -> Result<bool> {
        self.inner.arm_interrupts().map_err(err)
    }

    /// Back to polling: no more signals.
    #[napi]
    pub fn disarm_interrupts(&mut self) -> Result<()> {
        self.inner.disarm_interrupts().map_err(err)
    }

    /// Submits the first `count` records of the submission area without reaping; returns how
    /// many the ring took. For sending a burst down before the rest of the batch is written.
    #[napi]
    pub fn submit(&mut self, count: u32, buffers: Option<Vec<Option<BufferSlice>>>) -> Result<u32> {
        let hosts = host_buffers(buffers);
        let capacity = self.inner.capacity();
        // SAFETY: as in `pump`; no completion area is written.
        let (taken, _) = unsafe {
            let batch = self.submissions.bytes();
            self.inner.pump(batch, (count as usize).min(capacity), &hosts, &mut [])
        }
        .map_err(err)?;
        Ok(taken as u32)
    }

    /// Runs a load from native code alone, with no JavaScript per request: the upper bound
    /// the JavaScript paths are measured against. Blocks the calling thread for its duration.
    #[napi]
    pub fn run_load(&mut self, controller: &Controller, spec: load::LoadSpec) -> Result<load::LoadResult> {
        let controller = controller.inner.clone();
        self.inner.with_exclusive(|ch| load::run(ch, &controller, &spec)).map_err(err)
    }

    /// Gives the queue back. Requests in flight are abandoned; the queue is stopped before
    /// their memory is released, or that memory is never reused.
    #[napi]
    pub fn close(&mut self) {
        self.inner.leave();
    }
}

/// A virtio-scsi or virtio-blk PCI function as sysfs describes it.
#[napi(object)]
pub struct PciDeviceInfo {
    /// "0000:00:03.0".
    pub address: String,
    pub vendor_id: u32,
    pub device_id: u32,
    /// "scsi" (1af4:1004, 1af4:1048) or "blk" (1af4:1001, 1af4:1042).
    pub device_type: String,
    /// "modern" (1af4:104x) or "transitional" (1af4:100x).
    pub interface: String,
    /// Bound driver ("virtio-pci", "vfio-pci"), or null.
    pub driver: Option<String>,
    /// IOMMU group, or null when the system has no IOMMU.
    pub iommu_group: Option<u32>,
    pub numa_node: Option<u32>,
}

fn pci_info(f: pci::PciFunction) -> PciDeviceInfo {
    PciDeviceInfo {
        address: f.address.to_string(),
        vendor_id: u32::from(f.vendor),
        device_id: u32::from(f.device),
        device_type: if f.is_virtio_scsi() { "scsi" } else { "blk" }.to_string(),
        interface: match f.interface() {
            Some(VirtioInterface::Modern) => "modern",
            Some(VirtioInterface::Transitional) => "transitional",
            None => "none",
        }
        .to_string(),
        driver: f.driver,
        iommu_group: f.iommu_group,
        numa_node: f.numa_node,
    }
}

fn pci_address(address: &str) -> Result<pci::PciAddress> {
    address.parse().map_err(err)
}

/// Every virtio-scsi and virtio-blk PCI function of the system, with its driver and IOMMU group.
#[napi]
pub fn list_pci_devices() -> Result<Vec<PciDeviceInfo>> {
    let functions = Sysfs::new().virtio_storage_functions().map_err(err)?;
    Ok(functions.into_iter().map(pci_info).collect())
}

/// Hands a virtio-scsi or virtio-blk PCI function to vfio-pci (through driver_override); returns its new
/// state. Needs root.
#[napi]
pub fn bind_vfio_pci(address: String) -> Result<PciDeviceInfo> {
    Ok(pci_info(Sysfs::new().bind_vfio(pci_address(&address)?).map_err(err)?))
}

/// Gives a PCI function back from vfio-pci to its kernel driver; returns its new state.
#[napi]
pub fn unbind_vfio_pci(address: String) -> Result<PciDeviceInfo> {
    Ok(pci_info(Sysfs::new().unbind_vfio(pci_address(&address)?).map_err(err)?))
}
