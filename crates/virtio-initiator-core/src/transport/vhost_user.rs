//! vhost-user transport: the frontend side of the protocol over a unix socket, through the
//! `vhost` crate. The backend maps our DMA pool from the memfds we pass and drives the rings in
//! it; kicks and calls travel over eventfds.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::debug;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{QueueHandle, Result, RingAddresses, Transport, TransportError};
use crate::memory::Region;

/// How long the backend may take to answer the first request. A backend answers in
/// microseconds; this only bounds a socket that accepted us but does not speak vhost-user.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long the backend may take to answer any later request. The `vhost` crate waits for a
/// reply for ever; past this, the watchdog closes the socket and the request fails.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Most queues a frontend message may address.
const MAX_QUEUES: u64 = 256;

/// Protocol features we use when the backend offers them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RESET_DEVICE
}

pub struct VhostUserTransport {
    path: String,
    frontend: Frontend,
    watchdog: Watchdog,
    /// A second handle on the socket, to notice a backend that went away.
    peer: UnixStream,
    offered: u64,
    protocol: VhostUserProtocolFeatures,
    /// Every region the backend has been told about, to resend the table when it cannot take
    /// regions one at a time.
    regions: Vec<VhostUserMemoryRegionInfo>,
    max_mem_slots: u64,
}

impl VhostUserTransport {
    /// Connects and negotiates the protocol features. A path with nothing listening, or a peer
    /// that does not answer GET_FEATURES as a vhost-user backend, is a clear error.
    pub fn connect(path: &str) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .map_err(|source| TransportError::Connect { path: path.into(), source })?;
        probe(&stream, path)?;
        let peer = stream.try_clone()?;
        let watchdog = Watchdog::start(stream.try_clone()?, path)?;
        let mut frontend = Frontend::from_stream(stream, MAX_QUEUES);

        let offered = watchdog.call("GET_FEATURES", || frontend.get_features()).map_err(|e| match e {
            TransportError::Protocol { detail, .. } => {
                TransportError::NotVhostUser { path: path.into(), detail }
            }
            e => e,
        })?;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let theirs = watchdog.call("GET_PROTOCOL_FEATURES", || frontend.get_protocol_features())?;
            protocol = theirs & wanted_protocol_features();
            watchdog.call("SET_PROTOCOL_FEATURES", || frontend.set_protocol_features(protocol))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every request is acknowledged, so a failure surfaces at the request that failed.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        watchdog.call("SET_OWNER", || frontend.set_owner())?;
        let max_mem_slots = if protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            watchdog.call("GET_MAX_MEM_SLOTS", || frontend.get_max_mem_slots())?
        } else {
            8
        };
        debug!(
            "vhost-user {path}: features {offered:#x}, protocol {protocol:?}, {max_mem_slots} memory slots"
        );
        Ok(VhostUserTransport {
            path: path.into(),
            frontend,
            watchdog,
            peer,
            offered,
            protocol,
            regions: Vec::new(),
            max_mem_slots,
        })
    }

    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// How vhost-user describes a region of our memory to the backend.
    pub fn region_info(r: &Region) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: r.iova,
            memory_size: r.size,
            userspace_addr: r.host_addr,
            mmap_offset: r.fd_offset,
            mmap_handle: r.raw_fd(),
        }
    }
}

/// Sends GET_FEATURES by hand and waits for its reply with a deadline. The `vhost` crate retries
/// a read that times out for ever, so a peer that accepts but never answers would hang it; here
/// that is a clear error instead. The reply is consumed, and the frontend starts afresh.
fn probe(stream: &UnixStream, path: &str) -> Result<()> {
    let not_vhost = |detail: String| TransportError::NotVhostUser { path: path.into(), detail };

    stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
    (&*stream)
        .write_all(&frame(FrontendReq::GET_FEATURES, &[]))
        .map_err(|e| not_vhost(format!("cannot send GET_FEATURES: {e}")))?;

    // The header and the 64-bit feature mask.
    let mut reply = [0u8; HEADER_SIZE + 8];
    let deadline = std::time::Instant::now() + PROBE_TIMEOUT;
    let mut got = 0;
    while got < reply.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut pfd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd on the stack.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue; // a signal (SIGCHLD, say): wait again for what is left of the deadline
            }
            return Err(not_vhost(format!("waiting for the GET_FEATURES reply: {e}")));
        }
        if n == 0 {
            return Err(not_vhost(format!("no answer to GET_FEATURES within {PROBE_TIMEOUT:?}")));
        }
        match (&*stream).read(&mut reply[got..]) {
            Ok(0) => return Err(not_vhost("the peer closed the connection on GET_FEATURES".into())),
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(not_vhost(format!("reading the GET_FEATURES reply: {e}"))),
        }
    }
    let header: &[u8; HEADER_SIZE] = reply[..HEADER_SIZE].try_into().expect("the reply starts with a header");
    if reply_size(header, FrontendReq::GET_FEATURES) != Some(8) {
        return Err(not_vhost(format!("the reply to GET_FEATURES is not vhost-user: {header:02x?}")));
    }
    stream.set_write_timeout(None)?;
    Ok(())
}

/// Size of a vhost-user message header: request code, flags, payload size (native byte order).
const HEADER_SIZE: usize = 12;

/// A request as sent on the socket: its header (protocol version 1), then `body`.
fn frame(request: FrontendReq, body: &[u8]) -> Vec<u8> {
    const VERSION_1: u32 = 0x1;
    let mut message = Vec::with_capacity(HEADER_SIZE + body.len());
    for word in [u32::from(request), VERSION_1, body.len() as u32] {
        message.extend_from_slice(&word.to_ne_bytes());
    }
    message.extend_from_slice(body);
    message
}

/// The payload size a reply header announces, when it is a reply to `request`.
fn reply_size(header: &[u8; HEADER_SIZE], request: FrontendReq) -> Option<usize> {
    let word = |i: usize| u32::from_ne_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let is_reply = word(4) & VhostUserHeaderFlag::REPLY.bits() != 0;
    (word(0) == u32::from(request) && is_reply).then_some(word(8) as usize)
}

/// GET_CONFIG by hand. A backend that cannot serve the range (one of another device type, whose
/// configuration space is shorter) answers with an empty payload, which the `vhost` crate's
/// frontend would wait on for the payload it asked for; here it is an error naming the range.
fn get_config(stream: &UnixStream, offset: u32, len: usize) -> std::result::Result<Vec<u8>, String> {
    let size = u32::try_from(len).map_err(|_| format!("{len} bytes is too large a read"))?;
    let mut body = VhostUserConfig::new(offset, size, VhostUserConfigFlags::empty()).as_slice().to_vec();
    body.resize(body.len() + len, 0);
    let mut s = stream;
    s.write_all(&frame(FrontendReq::GET_CONFIG, &body)).map_err(|e| format!("cannot send: {e}"))?;

    let mut header = [0u8; HEADER_SIZE];
    s.read_exact(&mut header).map_err(|e| format!("reading the reply: {e}"))?;
    let fields = std::mem::size_of::<VhostUserConfig>();
    let reply_len = reply_size(&header, FrontendReq::GET_CONFIG)
        .filter(|n| (fields..=body.len()).contains(n))
        .ok_or_else(|| format!("the reply is not one to GET_CONFIG of {len} bytes: {header:02x?}"))?;
    let mut reply = vec![0u8; reply_len];
    s.read_exact(&mut reply).map_err(|e| format!("reading the reply: {e}"))?;
    let got = *VhostUserConfig::from_slice(&reply[..fields]).expect("VhostUserConfig is packed");
    let (got_offset, got_len) = ({ got.offset }, { got.size } as usize);
    if got_len == 0 {
        return Err(format!(
            "the backend refused to read {len} bytes of configuration space at offset {offset}"
        ));
    }
    if got_offset != offset || got_len != len || reply_len != body.len() {
        return Err(format!(
            "asked for {len} bytes at offset {offset}, the reply has {got_len} at {got_offset} in {reply_len} bytes"
        ));
    }
    reply.drain(..fields);
    Ok(reply)
}

/// Bounds the wait for each reply of the backend. A thread sleeps until the deadline of the
/// request in progress and, should it pass, shuts the socket down: the `vhost` crate's blocking
/// read then ends and the request fails, instead of the caller hanging on a backend that is
/// alive but silent. The thread is woken only when a deadline is set while it sleeps without
/// one, so that a busy connection costs no extra wake-up per message.
struct Watchdog {
    shared: Arc<(Mutex<Watch>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    path: String,
}

#[derive(Default)]
struct Watch {
    deadline: Option<Instant>,
    /// The thread waits without a deadline and must be woken for a new one.
    parked: bool,
    fired: bool,
    stop: bool,
}

impl Watchdog {
    fn start(stream: UnixStream, path: &str) -> std::io::Result<Self> {
        let shared = Arc::new((Mutex::new(Watch::default()), Condvar::new()));
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("vhost-user-watchdog".into()).spawn(move || {
            let (lock, wake) = &*s;
            let mut w = lock.lock().unwrap();
            while !w.stop {
                match w.deadline {
                    Some(d) => {
                        let left = d.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            let _ = stream.shutdown(Shutdown::Both);
                            w.fired = true;
                            w.deadline = None;
                        } else {
                            w = wake.wait_timeout(w, left).unwrap().0;
                        }
                    }
                    None => {
                        w.parked = true;
                        w = wake.wait(w).unwrap();
                        w.parked = false;
                    }
                }
            }
        })?;
        Ok(Watchdog { shared, thread: Some(thread), path: path.into() })
    }

    /// Whether a deadline passed and the socket was shut down.
    fn fired(&self) -> bool {
        self.shared.0.lock().unwrap().fired
    }

    /// Runs one request/reply exchange with the backend under the reply deadline.
    fn call<T, E: std::fmt::Display>(
        &self,
        request: &'static str,
        f: impl FnOnce() -> std::result::Result<T, E>,
    ) -> Result<T> {
        let (lock, wake) = &*self.shared;
        let timeout = || TransportError::Timeout { path: self.path.clone(), request, after: REPLY_TIMEOUT };
        {
            let mut w = lock.lock().unwrap();
            if w.fired {
                return Err(timeout());
            }
            w.deadline = Some(Instant::now() + REPLY_TIMEOUT);
            if w.parked {
                wake.notify_one();
            }
        }
        let result = f();
        let fired = {
            let mut w = lock.lock().unwrap();
            w.deadline = None;
            w.fired
        };
        match result {
            _ if fired => Err(timeout()),
            Ok(v) => Ok(v),
            Err(e) => Err(TransportError::Protocol { request, detail: e.to_string() }),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, wake) = &*self.shared;
        lock.lock().unwrap().stop = true;
        wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Transport for VhostUserTransport {
    fn device_features(&mut self) -> Result<u64> {
        Ok(self.offered)
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !self.offered != 0 {
            return Err(TransportError::FeaturesRejected(features & !self.offered));
        }
        // PROTOCOL_FEATURES stays acked whenever it was offered: it is what enables the rings
        // only on SET_VRING_ENABLE.
        let acked = features | (self.offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
        self.watchdog.call("SET_FEATURES", || self.frontend.set_features(acked))
    }

    fn queue_count(&mut self) -> Result<Option<u16>> {
        if !self.protocol.contains(VhostUserProtocolFeatures::MQ) {
            return Ok(None);
        }
        let n = self.watchdog.call("GET_QUEUE_NUM", || self.frontend.get_queue_num())?;
        Ok(Some(n.min(MAX_QUEUES) as u16))
    }

    fn max_queue_size(&mut self, _index: u16) -> Result<Option<u16>> {
        // vhost-user has no way to ask; SET_VRING_NUM refuses a size the backend cannot take.
        Ok(None)
    }

    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(TransportError::Unsupported("GET_CONFIG (protocol feature CONFIG)"));
        }
        let peer = &self.peer;
        let payload = self.watchdog.call("GET_CONFIG", || get_config(peer, offset, buf.len()))?;
        buf.copy_from_slice(&payload);
        Ok(())
    }

    fn set_memory(&mut self, regions: &[Region]) -> Result<()> {
        let infos: Vec<_> = regions.iter().map(Self::region_info).collect();
        self.watchdog.call("SET_MEM_TABLE", || self.frontend.set_mem_table(&infos))?;
        self.regions = infos;
        Ok(())
    }

    fn add_memory(&mut self, region: &Region) -> Result<()> {
        let info = Self::region_info(region);
        if self.regions.len() as u64 >= self.max_mem_slots {
            return Err(TransportError::Unsupported("more memory regions (backend's slots are full)"));
        }
        if self.protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            self.watchdog.call("ADD_MEM_REG", || self.frontend.add_mem_region(&info))?;
            self.regions.push(info);
            Ok(())
        } else {
            let mut all = self.regions.clone();
            all.push(info);
            self.watchdog.call("SET_MEM_TABLE", || self.frontend.set_mem_table(&all))?;
            self.regions = all;
            Ok(())
        }
    }

    fn setup_queue(&mut self, index: u16, rings: &RingAddresses) -> Result<QueueHandle> {
        let i = index as usize;
        let kick = EventFd::new(EFD_NONBLOCK)?;
        let call = EventFd::new(EFD_NONBLOCK)?;
        let cfg = VringConfigData {
            queue_max_size: rings.size,
            queue_size: rings.size,
            flags: 0,
            desc_table_addr: rings.desc_host,
            used_ring_addr: rings.used_host,
            avail_ring_addr: rings.avail_host,
            log_addr: None,
        };
        let (w, f) = (&self.watchdog, &mut self.frontend);
        w.call("SET_VRING_NUM", || f.set_vring_num(i, rings.size)).map_err(|e| match e {
            TransportError::Protocol { detail, .. } => {
                TransportError::Queue { index, detail: format!("SET_VRING_NUM {}: {detail}", rings.size) }
            }
            e => e,
        })?;
        w.call("SET_VRING_BASE", || f.set_vring_base(i, 0))?;
        w.call("SET_VRING_ADDR", || f.set_vring_addr(i, &cfg))?;
        w.call("SET_VRING_CALL", || f.set_vring_call(i, &call))?;
        w.call("SET_VRING_KICK", || f.set_vring_kick(i, &kick))?;
        if self.offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            w.call("SET_VRING_ENABLE", || f.set_vring_enable(i, true))?;
        }
        Ok(QueueHandle { notifier: super::Notifier::EventFd(kick), interrupt: Some(call) })
    }

    fn start(&mut self) -> Result<()> {
        // A vhost-user device runs once its rings are enabled; there is no status register.
        Ok(())
    }

    fn stop_queue(&mut self, index: u16) -> Result<bool> {
        let i = index as usize;
        if self.offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            self.watchdog.call("SET_VRING_ENABLE", || self.frontend.set_vring_enable(i, false))?;
        }
        // The backend answers once the ring is stopped; what it still held is finished (or
        // answered as aborted) by then, and nothing of the ring is written afterwards.
        self.watchdog.call("GET_VRING_BASE", || self.frontend.get_vring_base(i))?;
        Ok(true)
    }

    fn reset(&mut self) -> Result<()> {
        if self.protocol.contains(VhostUserProtocolFeatures::RESET_DEVICE) {
            self.watchdog.call("RESET_DEVICE", || self.frontend.reset_device())
        } else {
            Err(TransportError::Unsupported("device reset (protocol feature RESET_DEVICE)"))
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        let mut pfd = libc::pollfd { fd: self.peer.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one pollfd on the stack, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return Err(TransportError::Disconnected(format!(
                "vhost-user backend at {} closed the connection",
                self.path
            )));
        }
        Ok(())
    }

    fn released(&mut self) -> bool {
        // The peer closed the connection (not our watchdog, which leaves a silent backend
        // running): a vhost-user backend unmaps our memory when its connection ends.
        !self.watchdog.fired() && self.check_alive().is_err()
    }

    fn describe(&self) -> String {
        format!("vhost-user {}", self.path)
    }
}
