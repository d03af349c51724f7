//! A request channel: one request queue, owned by one thread, with no lock on its path.
//! Requests go down in batches with one notification; completions come back in batches.

use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_scsi_proto::{response, CmdRequest, CmdResponse, LunAddress, SENSE_SIZE};

use super::blk::{self, BlkConfig};
use super::controller::{Controller, QueueParts};
use super::records::{scsi_cdb, CompletionRecord, DataRef, Direction, SubmitRecord, SUBMIT_RECORD_SIZE};
use super::DriverError;
use crate::memory::{Arena, DmaBuf};
use crate::queue::{QueueError, Segment};

/// Header bytes per request slot: the request header at 0 (virtio-blk: the header, then the
/// range of a DISCARD or WRITE ZEROES), the response (or status byte) at `RESPONSE_AT`. A
/// power of two that divides the page, so no header or response ever crosses a 4 KiB page:
/// pages adjacent in IOVA space need not be adjacent in memory, and a device without
/// VIRTIO_F_ANY_LAYOUT takes the first descriptor piece as the whole header.
const SLOT_BYTES: usize = 256;
const RESPONSE_AT: usize = 64;
const PAGE: usize = 4096;
const _: () = assert!(CmdRequest::SIZE <= RESPONSE_AT && RESPONSE_AT + CmdResponse::SIZE <= SLOT_BYTES);
const _: () = assert!(PAGE % SLOT_BYTES == 0);
const _: () =
    assert!(virtio_blk_proto::RequestHeader::SIZE + virtio_blk_proto::RangeSegment::SIZE <= RESPONSE_AT);
/// Written into the response byte before a request goes down: a device that reports a whole
/// response without writing one is caught, not taken for success.
const NO_RESPONSE: u8 = 0xff;
/// Offset of the response byte inside a virtio-scsi command response.
const RESPONSE_BYTE: usize = 11;
/// Where a virtio-blk request's range goes, after its header.
const RANGE_AT: usize = virtio_blk_proto::RequestHeader::SIZE;
/// How often an idle poll asks the transport whether the device is still there.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(10);

/// The response code of a completion for a request the driver refused before it reached the
/// device (bad record, data outside DMA memory, no DMA memory for a bounce buffer). Its sense
/// slot holds the reason as UTF-8 text. Outside the range of virtio-scsi responses.
pub const RESPONSE_REFUSED: u8 = 0xfe;

/// Caller memory for a request's data: its address and length in our address space.
#[derive(Clone, Copy, Debug)]
pub struct HostBuffer {
    pub ptr: *mut u8,
    pub len: usize,
}

/// A request on the device.
struct Slot {
    token: u32,
    /// Caller memory that a data-in bounce buffer is copied back to on completion.
    copy_back: Option<HostBuffer>,
    bounce: Option<DmaBuf>,
    /// Bytes of the data-in buffer (0 for other directions): the most data the device can
    /// have returned, whatever its used length says.
    data_in: u32,
    /// When the request went down, in nanoseconds of the channel's clock.
    submitted: u64,
}

/// A request's header, framed for its device.
enum Header {
    Scsi(CmdRequest),
    Blk(blk::Framed),
}

/// What became of one record offered to the ring.
enum Added {
    Queued,
    /// No room now (ring full, or bounce memory tied up by requests in flight): try later.
    NoRoom,
    Refused(String),
}

pub struct RequestChannel {
    controller: Arc<Controller>,
    /// How requests are framed: virtio-scsi (None), or virtio-blk with its configuration.
    blk: Option<Box<BlkConfig>>,
    parts: Option<QueueParts>,
    /// One header area per ring slot, indexed by slot number.
    headers: ManuallyDrop<DmaBuf>,
    headers_arena: ManuallyDrop<Arena>,
    slots: Vec<Option<Slot>>,
    free: Vec<u16>,
    /// Refused records, completed at the next reap.
    refused: Vec<(u32, String)>,
    /// DMA memory as of a generation (see `dma_address`).
    spans: (u64, Vec<super::Span>),
    /// Since when polls have found nothing while requests are in flight (None: progress, or
    /// nothing to wait for), so that only empty polls read the clock.
    waiting_since: Option<Instant>,
    /// The queue was given back without the device being stopped: the memory of its requests
    /// may still be written, so it is never freed.
    leak: bool,
    /// Zero of the clock that times requests.
    epoch: Instant,
    /// When the requests queued since the last publish went down: one clock read per batch.
    batch_time: Option<u64>,
    /// The controller's connection this channel's ring belongs to.
    connection: u64,
}

// SAFETY: the raw caller pointers in `Slot` refer to memory the caller keeps alive until the
// request completes (a contract of `submit`); the channel is used from one thread at a time.
unsafe impl Send for RequestChannel {}

impl RequestChannel {
    /// Takes a free request queue of `controller`.
    pub fn open(controller: &Arc<Controller>) -> Result<Self, DriverError> {
        let (parts, connection) = controller.take_queue()?;
        let size = parts.queue.size() as usize;
        let bytes = (size * SLOT_BYTES).next_multiple_of(PAGE);
        let mut arena = controller.pool().carve(bytes as u64)?;
        let headers = arena.alloc(bytes, PAGE)?;
        Ok(RequestChannel {
            controller: controller.clone(),
            blk: controller.info().blk().cloned().map(Box::new),
            parts: Some(parts),
            headers: ManuallyDrop::new(headers),
            headers_arena: ManuallyDrop::new(arena),
            slots: (0..size).map(|_| None).collect(),
            free: (0..size as u16).rev().collect(),
            refused: Vec::new(),
            spans: controller.memory_spans(),
            waiting_since: None,
            leak: false,
            epoch: Instant::now(),
            batch_time: None,
            connection,
        })
    }

    fn parts(&mut self) -> Result<&mut QueueParts, DriverError> {
        self.parts.as_mut().ok_or(DriverError::Closed)
    }

    pub fn queue_index(&self) -> u16 {
        self.parts.as_ref().map_or(0, |p| p.index)
    }

    /// Most requests in flight at once.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Submits `count` packed records; `buffers[i]` is the data of records naming index `i`.
    /// Returns how many records were taken: a full ring stops the batch early and the caller
    /// offers the rest again later. A record the driver refuses (malformed, data outside DMA
    /// memory) is taken too and completes at the next reap with [`RESPONSE_REFUSED`]. Taken
    /// requests are published with one notification. Errors mean the controller is unusable.
    ///
    /// # Safety
    /// Every buffer, and the memory named by by-address records, must stay valid and unused by
    /// the caller until its request completes.
    pub unsafe fn submit(
        &mut self,
        batch: &[u8],
        count: usize,
        buffers: &[Option<HostBuffer>],
    ) -> Result<usize, DriverError> {
        self.controller.check_usable()?;
        self.controller.check_connection(self.connection)?;
        let count = count.min(batch.len() / SUBMIT_RECORD_SIZE);
        let mut taken = 0;
        for i in 0..count {
            let raw = &batch[i * SUBMIT_RECORD_SIZE..(i + 1) * SUBMIT_RECORD_SIZE];
            let outcome = match SubmitRecord::decode(raw) {
                Ok(rec) => match self.data_of(&rec, buffers) {
                    Ok(data) => self.add(&rec, data)?,
                    Err(why) => Added::Refused(why),
                },
                Err(why) => Added::Refused(why),
            };
            match outcome {
                Added::Queued => {}
                Added::NoRoom => break,
                Added::Refused(why) => {
                    let token = u32::from_le_bytes(raw[0..4].try_into().unwrap());
                    self.refused.push((token, why));
                }
            }
            taken += 1;
        }
        self.publish()?;
        Ok(taken)
    }

    /// The caller memory a record names, checked.
    fn data_of(
        &mut self,
        rec: &SubmitRecord,
        buffers: &[Option<HostBuffer>],
    ) -> Result<Option<HostBuffer>, String> {
        match rec.data {
            DataRef::None => Ok(None),
            DataRef::Index(k) => {
                let b = buffers
                    .get(k as usize)
                    .copied()
                    .flatten()
                    .ok_or_else(|| format!("buffer {k} is missing"))?;
                if b.len == 0 || b.len > u32::MAX as usize {
                    return Err(format!("buffer {k} holds {} bytes", b.len));
                }
                Ok(Some(b))
            }
            DataRef::Address { addr, len } => {
                self.refresh_spans();
                if !covered(&self.spans.1, addr, u64::from(len)) {
                    return Err(format!(
                        "data at {addr:#x} ({len} bytes) is not DMA memory of this controller"
                    ));
                }
                Ok(Some(HostBuffer { ptr: addr as *mut u8, len: len as usize }))
            }
        }
    }

    /// Puts one request on the ring.
    fn add(&mut self, rec: &SubmitRecord, data: Option<HostBuffer>) -> Result<Added, DriverError> {
        // Framed before a slot is taken: a request the device type cannot carry is refused.
        let header = match self.frame(rec, data.map_or(0, |b| b.len)) {
            Ok(h) => h,
            Err(why) => return Ok(Added::Refused(why)),
        };
        // Whether completions will come that can free bounce memory (before this request's slot
        // is taken, which would count it).
        let others_in_flight = self.in_flight() > 0;
        let Some(slot) = self.free.pop() else { return Ok(Added::NoRoom) };
        let base = slot as usize * SLOT_BYTES;
        let iova = self.headers.iova() + base as u64;
        let (head_seg, range_seg, resp_seg) = match header {
            Header::Scsi(h) => {
                self.headers.write_at(base, &h.encode())?;
                self.headers.write_at(base + RESPONSE_AT + RESPONSE_BYTE, &[NO_RESPONSE])?;
                let resp = Segment::new(iova + RESPONSE_AT as u64, CmdResponse::SIZE as u32);
                (Segment::new(iova, CmdRequest::SIZE as u32), None, resp)
            }
            Header::Blk(f) => {
                self.headers.write_at(base, &f.header.encode())?;
                let range = match f.range {
                    Some(r) => {
                        self.headers.write_at(base + RANGE_AT, &r.encode())?;
                        Some(Segment::new(
                            iova + RANGE_AT as u64,
                            virtio_blk_proto::RangeSegment::SIZE as u32,
                        ))
                    }
                    None => None,
                };
                self.headers.write_at(base + RESPONSE_AT, &[NO_RESPONSE])?;
                let status = Segment::new(iova + RESPONSE_AT as u64, 1);
                (Segment::new(iova, virtio_blk_proto::RequestHeader::SIZE as u32), range, status)
            }
        };

        let mut bounce = None;
        let mut copy_back = None;
        let data_seg = match data {
            None => None,
            Some(b) => Some(match self.dma_address(b) {
                Some(iova) => Segment::new(iova, b.len as u32),
                None => {
                    let mut buf = match self.controller.alloc_dma(b.len, 64) {
                        Ok(buf) => buf,
                        // Bounce memory frees up as requests complete: wait, unless nothing is
                        // in flight and so nothing will free up.
                        Err(_) if others_in_flight => {
                            self.free.push(slot);
                            return Ok(Added::NoRoom);
                        }
                        Err(DriverError::Closed) => return Err(DriverError::Closed),
                        Err(e) => {
                            self.free.push(slot);
                            return Ok(Added::Refused(format!(
                                "no DMA memory for a {}-byte bounce buffer: {e}",
                                b.len
                            )));
                        }
                    };
                    if rec.direction == Direction::ToDevice {
                        // SAFETY: the caller guarantees `b` is valid for `b.len` bytes (see `submit`).
                        let src = unsafe { std::slice::from_raw_parts(b.ptr, b.len) };
                        buf.write_at(0, src)?;
                    } else {
                        copy_back = Some(b);
                    }
                    let seg = Segment::new(buf.iova(), b.len as u32);
                    bounce = Some(buf);
                    seg
                }
            }),
        };
        // Header, then data-out or a range (readable); virtio-scsi: response, then data-in;
        // virtio-blk: data-in, then the status byte last (writable). On the stack.
        let readable = [head_seg, range_seg.or(data_seg).unwrap_or(head_seg)];
        let r = match (rec.direction, data_seg, range_seg) {
            (_, _, Some(_)) | (Direction::ToDevice, Some(_), _) => 2,
            _ => 1,
        };
        let (writable, w) = match (rec.direction, data_seg) {
            (Direction::FromDevice, Some(d)) if self.blk.is_some() => ([d, resp_seg], 2),
            (Direction::FromDevice, Some(d)) => ([resp_seg, d], 2),
            _ => ([resp_seg, resp_seg], 1),
        };
        let parts = self.parts()?;
        match parts.queue.add(&readable[..r], &writable[..w], u64::from(slot)) {
            Ok(()) => {
                let data_in = match (rec.direction, data) {
                    (Direction::FromDevice, Some(b)) => b.len as u32,
                    _ => 0,
                };
                let submitted = self.batch_now();
                self.slots[slot as usize] =
                    Some(Slot { token: rec.token, copy_back, bounce, data_in, submitted });
                Ok(Added::Queued)
            }
            Err(QueueError::Full) => {
                self.free.push(slot);
                Ok(Added::NoRoom)
            }
            Err(e) => {
                self.free.push(slot);
                Err(e.into())
            }
        }
    }

    /// The device's form of a record's request.
    fn frame(&self, rec: &SubmitRecord, data_len: usize) -> Result<Header, String> {
        match &self.blk {
            None => {
                let (cdb, _) = scsi_cdb(&rec.request)?;
                Ok(Header::Scsi(CmdRequest {
                    lun: rec.addr.encode(),
                    tag: u64::from(rec.token),
                    task_attr: rec.task_attr,
                    prio: 0,
                    crn: 0,
                    cdb,
                }))
            }
            Some(config) => {
                if rec.addr != LunAddress::new(0, 0) {
                    return Err(format!(
                        "a virtio-blk device is one disk; target {} LUN {} do not exist",
                        rec.addr.target, rec.addr.lun
                    ));
                }
                blk::frame(&rec.request, data_len, config).map(Header::Blk)
            }
        }
    }

    fn refresh_spans(&mut self) {
        if self.controller.memory_generation() != self.spans.0 {
            self.spans = self.controller.memory_spans();
        }
    }

    /// IOVA of caller memory that lies inside one span of DMA memory, so it needs no bounce
    /// buffer. The spans are refreshed only when the memory has grown since the last look.
    fn dma_address(&mut self, b: HostBuffer) -> Option<u64> {
        self.refresh_spans();
        self.spans.1.iter().find_map(|s| s.iova_of(b.ptr as u64, b.len as u64))
    }

    /// Hands up to `max` completions to `each` (position, record, sense bytes) and returns how
    /// many. When the device broke the ring protocol or went away, the controller fails and this
    /// returns the reason: the requests still in flight will never complete.
    pub fn complete(
        &mut self,
        max: usize,
        mut each: impl FnMut(usize, &CompletionRecord, &[u8]),
    ) -> Result<usize, DriverError> {
        self.controller.check_usable()?;
        self.controller.check_connection(self.connection)?;
        let mut n = 0;
        while n < max && !self.refused.is_empty() {
            let (token, why) = self.refused.remove(0);
            let text = &why.as_bytes()[..why.len().min(SENSE_SIZE)];
            let rec = CompletionRecord {
                token,
                response: RESPONSE_REFUSED,
                sense_len: text.len() as u16,
                ..Default::default()
            };
            each(n, &rec, text);
            n += 1;
        }
        let mut sense = [0u8; SENSE_SIZE];
        // Read once, at the first completion: every completion of this poll was found now.
        let mut found_at = None;
        while n < max {
            let parts = self.parts()?;
            let done = match parts.queue.pop_used() {
                Ok(Some(d)) => d,
                Ok(None) => break,
                Err(e) => {
                    let reason = format!("{} on request queue {}", e, parts.index);
                    self.controller.fail(reason.clone());
                    return Err(DriverError::Failed(reason));
                }
            };
            let slot_no = done.token as usize;
            let Some(slot) = self.slots.get_mut(slot_no).and_then(Option::take) else {
                // The queue validates ids against what is in flight, so this cannot happen.
                continue;
            };
            self.free.push(slot_no as u16);
            let base = slot_no * SLOT_BYTES + RESPONSE_AT;
            let mut head = [0u8; 12];
            let now = *found_at.get_or_insert_with(|| nanos_since(self.epoch));
            let mut rec = CompletionRecord {
                token: slot.token,
                response: response::FAILURE,
                latency_ns: now.saturating_sub(slot.submitted),
                ..Default::default()
            };
            if self.blk.is_some() {
                // The status byte comes last, after the data-in: a used length without it, or
                // the sentinel still in place, is FAILURE, and no data.
                self.headers.read_at(base, &mut head[..1])?;
                if done.len >= 1 && head[0] != NO_RESPONSE {
                    rec.response = response::OK;
                    rec.status = head[0];
                    rec.data_len = (done.len - 1).min(slot.data_in);
                }
            } else {
                self.headers.read_at(base, &mut head)?;
            }
            // A response the device did not wholly write (short used length, or the sentinel
            // still in place) cannot be trusted: FAILURE, and no data.
            if self.blk.is_none()
                && done.len as usize >= CmdResponse::SIZE
                && head[RESPONSE_BYTE] != NO_RESPONSE
            {
                let sense_len = u32::from_le_bytes(head[0..4].try_into().unwrap()).min(SENSE_SIZE as u32);
                rec.response = head[RESPONSE_BYTE];
                rec.status = head[10];
                rec.residual = u32::from_le_bytes(head[4..8].try_into().unwrap());
                rec.data_len = ((done.len as usize - CmdResponse::SIZE) as u32).min(slot.data_in);
                // Sense bytes only travel when there are any (CHECK CONDITION).
                if sense_len > 0 {
                    rec.sense_len = sense_len as u16;
                    self.headers.read_at(base + 12, &mut sense[..sense_len as usize])?;
                }
            }
            if let (Some(dst), Some(buf)) = (slot.copy_back, slot.bounce.as_ref()) {
                let len = (rec.data_len as usize).min(dst.len);
                // SAFETY: `dst` is the caller's buffer, valid until this completion (see `submit`);
                // the bounce buffer holds at least `dst.len` bytes.
                let dst = unsafe { std::slice::from_raw_parts_mut(dst.ptr, len) };
                buf.read_at(0, dst)?;
            }
            each(n, &rec, &sense[..rec.sense_len as usize]);
            n += 1;
        }
        if n > 0 || self.in_flight() == 0 {
            self.waiting_since = None;
        } else {
            let now = Instant::now();
            match self.waiting_since {
                None => self.waiting_since = Some(now),
                Some(since) if now - since >= LIVENESS_INTERVAL => {
                    self.waiting_since = Some(now);
                    self.controller.check_alive()?;
                }
                Some(_) => {}
            }
        }
        Ok(n)
    }

    /// Queues one request without publishing it (see [`publish`](Self::publish)); false when
    /// there is no room for it now. A request the driver refuses completes with
    /// [`RESPONSE_REFUSED`] at the next reap, as in `submit`.
    ///
    /// # Safety
    /// As for [`submit`](Self::submit).
    pub unsafe fn push(&mut self, rec: &SubmitRecord, data: Option<HostBuffer>) -> Result<bool, DriverError> {
        match self.add(rec, data)? {
            Added::Queued => Ok(true),
            Added::NoRoom => Ok(false),
            Added::Refused(why) => {
                self.refused.push((rec.token, why));
                Ok(true)
            }
        }
    }

    /// The submission time of the batch being queued: the clock is read at its first request,
    /// so polls that submit nothing do not read it.
    fn batch_now(&mut self) -> u64 {
        let epoch = self.epoch;
        *self.batch_time.get_or_insert_with(|| nanos_since(epoch))
    }

    /// Makes the queued requests visible to the device, notifying it when it asks to be.
    pub fn publish(&mut self) -> Result<(), DriverError> {
        self.batch_time = None;
        let parts = self.parts()?;
        if parts.queue.publish() {
            parts.handle.notifier.notify().map_err(crate::transport::TransportError::from)?;
        }
        Ok(())
    }

    /// Asks the device to signal the queue's interrupt descriptor at the next completion.
    /// Returns true when completions are already waiting (poll them instead of waiting).
    pub fn arm_interrupts(&mut self) -> Result<bool, DriverError> {
        Ok(self.parts()?.queue.enable_interrupts() || !self.refused.is_empty())
    }

    /// Back to polling: the device stops signalling.
    pub fn disarm_interrupts(&mut self) -> Result<(), DriverError> {
        self.parts()?.queue.disable_interrupts();
        Ok(())
    }

    /// A descriptor of the caller's own for the queue's interrupt eventfd, in blocking mode,
    /// so that a thread can wait in `read` for the device's signal. Errors where the transport
    /// has no interrupt descriptor (PCI functions are driven without MSI-X).
    pub fn interrupt_fd(&mut self) -> Result<std::os::fd::OwnedFd, DriverError> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let parts = self.parts()?;
        let Some(call) = parts.handle.interrupt.as_ref() else {
            return Err(DriverError::Config(format!(
                "request queue {} has no interrupt descriptor on this transport; poll it instead",
                parts.index
            )));
        };
        // SAFETY: dup of a descriptor the queue owns; the new one is ours alone. fcntl then only
        // touches it (O_NONBLOCK lives in the shared file description, which nothing else
        // reads).
        let fd = unsafe {
            let raw = libc::fcntl(call.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0);
            if raw < 0 {
                return Err(DriverError::Transport(std::io::Error::last_os_error().into()));
            }
            OwnedFd::from_raw_fd(raw)
        };
        // SAFETY: as above.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
                return Err(DriverError::Transport(std::io::Error::last_os_error().into()));
            }
        }
        Ok(fd)
    }

    /// Gives the queue back to the controller. Requests in flight are abandoned: the queue is
    /// stopped first (the device then never touches their memory again), or, where a single
    /// queue cannot be stopped, their memory is leaked rather than reused.
    pub fn close(&mut self) {
        let Some(parts) = self.parts.take() else { return };
        if !self.controller.return_queue(parts, self.connection) {
            self.leak = true;
            return;
        }
        for slot in self.slots.iter_mut() {
            *slot = None;
        }
        self.free = (0..self.slots.len() as u16).rev().collect();
        self.refused.clear();
    }
}

fn nanos_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

/// True when `len` bytes at host address `host` lie in DMA memory (possibly across regions
/// that are adjacent in our address space).
fn covered(spans: &[super::Span], host: u64, len: u64) -> bool {
    let Some(end) = host.checked_add(len) else { return false };
    let mut at = host;
    while at < end {
        match spans.iter().find(|s| at >= s.host && at < s.host + s.size) {
            Some(s) => at = s.host + s.size,
            None => return false,
        }
    }
    true
}

impl Drop for RequestChannel {
    fn drop(&mut self) {
        self.close();
        if self.leak {
            // The device may still write into these buffers: they must never be reused, so
            // they are leaked rather than returned to the pool.
            for slot in self.slots.iter_mut().filter_map(Option::take) {
                std::mem::forget(slot.bounce);
            }
            return;
        }
        // SAFETY: dropped once, here, and the fields are not used afterwards.
        unsafe {
            ManuallyDrop::drop(&mut self.headers);
            ManuallyDrop::drop(&mut self.headers_arena);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_header_or_response_crosses_a_page() {
        for slot in 0..1024usize {
            let base = slot * SLOT_BYTES;
            for (at, len) in [(base, CmdRequest::SIZE), (base + RESPONSE_AT, CmdResponse::SIZE)] {
                assert_eq!(at / PAGE, (at + len - 1) / PAGE, "slot {slot}: {len} bytes at {at}");
            }
        }
    }

    #[test]
    fn coverage_of_dma_spans() {
        let spans = [
            super::super::Span { host: 0x1000, size: 0x1000, iova: 0 },
            super::super::Span { host: 0x2000, size: 0x1000, iova: 0x10000 },
            super::super::Span { host: 0x5000, size: 0x1000, iova: 0x20000 },
        ];
        assert!(covered(&spans, 0x1800, 0x1000), "across two adjacent regions");
        assert!(covered(&spans, 0x5000, 0x1000));
        assert!(!covered(&spans, 0x2800, 0x1000), "runs into a hole");
        assert!(!covered(&spans, 0x800, 0x100), "before the first region");
        assert!(!covered(&spans, u64::MAX - 4, 16), "wraps around");
    }
}
