//! A request channel: one request queue, owned by one thread, with no lock on its path.
//! Requests go down in batches with one notification; completions come back in batches.

use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_scsi_proto::{response, CmdRequest, CmdResponse};

use super::controller::{QueueParts, ScsiController};
use super::records::{CompletionRecord, Direction, SubmitRecord, COMPLETION_RECORD_SIZE, SUBMIT_RECORD_SIZE};
use super::ScsiError;
use crate::memory::{Arena, DmaBuf};
use crate::queue::{QueueError, Segment};

/// Header bytes per request slot: the request header, then the response, 64-byte aligned.
const SLOT_BYTES: usize = (CmdRequest::SIZE + CmdResponse::SIZE + 63) & !63;
/// How often an idle poll asks the transport whether the device is still there.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(10);

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
}

pub struct RequestChannel {
    controller: Arc<ScsiController>,
    parts: Option<QueueParts>,
    /// One header area per ring slot, indexed by slot number.
    headers: ManuallyDrop<DmaBuf>,
    headers_arena: ManuallyDrop<Arena>,
    slots: Vec<Option<Slot>>,
    free: Vec<u16>,
    /// DMA memory as of a generation (see `dma_address`).
    spans: (u64, Vec<super::Span>),
    last_progress: Instant,
}

// SAFETY: the raw caller pointers in `Slot` refer to memory the caller keeps alive until the
// request completes (a contract of `submit`); the channel is used from one thread at a time.
unsafe impl Send for RequestChannel {}

impl RequestChannel {
    /// Takes a free request queue of `controller`.
    pub fn open(controller: &Arc<ScsiController>) -> Result<Self, ScsiError> {
        let parts = controller.take_queue()?;
        let size = parts.queue.size() as usize;
        let mut arena = controller.pool().carve((size * SLOT_BYTES) as u64)?;
        let headers = arena.alloc(size * SLOT_BYTES, 64)?;
        Ok(RequestChannel {
            controller: controller.clone(),
            parts: Some(parts),
            headers: ManuallyDrop::new(headers),
            headers_arena: ManuallyDrop::new(arena),
            slots: (0..size).map(|_| None).collect(),
            free: (0..size as u16).rev().collect(),
            spans: controller.memory_spans(),
            last_progress: Instant::now(),
        })
    }

    fn parts(&mut self) -> Result<&mut QueueParts, ScsiError> {
        self.parts.as_mut().ok_or(ScsiError::Closed)
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
    /// Returns how many were accepted: a full ring stops the batch early and the caller
    /// resubmits the rest later. Accepted requests are published with one notification.
    ///
    /// # Safety
    /// Every buffer must stay valid, and unused by the caller, until its request completes.
    pub unsafe fn submit(
        &mut self,
        batch: &[u8],
        count: usize,
        buffers: &[Option<HostBuffer>],
    ) -> Result<usize, ScsiError> {
        self.controller.check_usable()?;
        if batch.len() < count * SUBMIT_RECORD_SIZE {
            return Err(ScsiError::BadRequest {
                index: batch.len() / SUBMIT_RECORD_SIZE,
                detail: format!(
                    "batch holds {} bytes, {count} records need {}",
                    batch.len(),
                    count * SUBMIT_RECORD_SIZE
                ),
            });
        }
        let mut accepted = 0;
        for i in 0..count {
            let rec = SubmitRecord::decode(&batch[i * SUBMIT_RECORD_SIZE..])
                .map_err(|detail| ScsiError::BadRequest { index: i, detail })?;
            let data = match rec.direction {
                Direction::None => None,
                _ => {
                    let b = buffers.get(rec.buffer as usize).copied().flatten().ok_or_else(|| {
                        ScsiError::BadRequest {
                            index: i,
                            detail: format!("buffer {} is missing", rec.buffer),
                        }
                    })?;
                    if b.len == 0 || b.len > u32::MAX as usize {
                        return Err(ScsiError::BadRequest {
                            index: i,
                            detail: format!("buffer of {} bytes", b.len),
                        });
                    }
                    Some(b)
                }
            };
            match self.add(i, &rec, data)? {
                true => accepted += 1,
                false => break,
            }
        }
        let parts = self.parts()?;
        if accepted > 0 && parts.queue.publish() {
            parts.handle.notifier.notify().map_err(crate::transport::TransportError::from)?;
        }
        Ok(accepted)
    }

    /// Puts one request on the ring; false when there is no room for it now.
    fn add(&mut self, index: usize, rec: &SubmitRecord, data: Option<HostBuffer>) -> Result<bool, ScsiError> {
        // Whether completions will come that can free bounce memory (before this request's slot
        // is taken, which would count it).
        let others_in_flight = self.in_flight() > 0;
        let Some(slot) = self.free.pop() else { return Ok(false) };
        let base = slot as usize * SLOT_BYTES;
        let mut cdb = [0u8; virtio_scsi_proto::CDB_SIZE];
        cdb[..rec.cdb_len as usize].copy_from_slice(&rec.cdb[..rec.cdb_len as usize]);
        let header = CmdRequest {
            lun: rec.addr.encode(),
            tag: u64::from(rec.token),
            task_attr: rec.task_attr,
            prio: 0,
            crn: 0,
            cdb,
        };
        self.headers.write_at(base, &header.encode())?;
        let req_seg = Segment::new(self.headers.iova() + base as u64, CmdRequest::SIZE as u32);
        let resp_seg =
            Segment::new(self.headers.iova() + (base + CmdRequest::SIZE) as u64, CmdResponse::SIZE as u32);

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
                            return Ok(false);
                        }
                        Err(e) => {
                            self.free.push(slot);
                            return Err(ScsiError::BadRequest {
                                index,
                                detail: format!("no DMA memory for a {}-byte bounce buffer: {e}", b.len),
                            });
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
        // Header then data-out (readable), response then data-in (writable), on the stack.
        let (readable, writable) =
            ([req_seg, data_seg.unwrap_or(req_seg)], [resp_seg, data_seg.unwrap_or(resp_seg)]);
        let (r, w) = match (rec.direction, data_seg) {
            (Direction::ToDevice, Some(_)) => (2, 1),
            (Direction::FromDevice, Some(_)) => (1, 2),
            _ => (1, 1),
        };
        let parts = self.parts()?;
        match parts.queue.add(&readable[..r], &writable[..w], u64::from(slot)) {
            Ok(()) => {
                let data_in = match (rec.direction, data) {
                    (Direction::FromDevice, Some(b)) => b.len as u32,
                    _ => 0,
                };
                self.slots[slot as usize] = Some(Slot { token: rec.token, copy_back, bounce, data_in });
                Ok(true)
            }
            Err(QueueError::Full) => {
                self.free.push(slot);
                Ok(false)
            }
            Err(e) => {
                self.free.push(slot);
                Err(e.into())
            }
        }
    }

    /// IOVA of caller memory that lies inside DMA memory, so it needs no bounce buffer. The
    /// spans are refreshed only when the memory has grown since the last look.
    fn dma_address(&mut self, b: HostBuffer) -> Option<u64> {
        if self.controller.memory_generation() != self.spans.0 {
            self.spans = self.controller.memory_spans();
        }
        self.spans.1.iter().find_map(|s| s.iova_of(b.ptr as u64, b.len as u64))
    }

    /// Writes up to `max` completion records into `out` and returns how many. When the device
    /// broke the ring protocol or went away, the controller fails and this returns the reason:
    /// the requests still in flight will never complete.
    pub fn reap(&mut self, out: &mut [u8], max: usize) -> Result<usize, ScsiError> {
        self.controller.check_usable()?;
        let max = max.min(out.len() / COMPLETION_RECORD_SIZE);
        let mut n = 0;
        while n < max {
            let parts = self.parts()?;
            let done = match parts.queue.pop_used() {
                Ok(Some(d)) => d,
                Ok(None) => break,
                Err(e) => {
                    let reason = format!("{} on request queue {}", e, parts.index);
                    self.controller.fail(reason.clone());
                    return Err(ScsiError::Failed(reason));
                }
            };
            let slot_no = done.token as usize;
            let Some(slot) = self.slots.get_mut(slot_no).and_then(Option::take) else {
                // The queue validates ids against what is in flight, so this cannot happen.
                continue;
            };
            self.free.push(slot_no as u16);
            let base = slot_no * SLOT_BYTES + CmdRequest::SIZE;
            let mut raw = [0u8; CmdResponse::SIZE];
            self.headers.read_at(base, &mut raw)?;
            let written = done.len as usize;
            let (resp, data_len) = if written < CmdResponse::SIZE {
                // The device did not write a whole response: nothing in it can be trusted.
                (CmdResponse { response: response::FAILURE, ..Default::default() }, 0)
            } else {
                let r = CmdResponse::decode(&raw).unwrap_or_default();
                (r, ((written - CmdResponse::SIZE) as u32).min(slot.data_in))
            };
            if let (Some(dst), Some(buf)) = (slot.copy_back, slot.bounce.as_ref()) {
                let len = (data_len as usize).min(dst.len);
                // SAFETY: `dst` is the caller's buffer, valid until this completion (see `submit`);
                // the bounce buffer holds at least `dst.len` bytes.
                let dst = unsafe { std::slice::from_raw_parts_mut(dst.ptr, len) };
                buf.read_at(0, dst)?;
            }
            CompletionRecord { token: slot.token, response: resp, data_len }
                .encode(&mut out[n * COMPLETION_RECORD_SIZE..(n + 1) * COMPLETION_RECORD_SIZE]);
            n += 1;
        }
        if n > 0 || self.in_flight() == 0 {
            self.last_progress = Instant::now();
        } else if self.last_progress.elapsed() >= LIVENESS_INTERVAL {
            self.last_progress = Instant::now();
            self.controller.check_alive()?;
        }
        Ok(n)
    }

    /// Gives the queue back to the controller. Requests in flight are abandoned; their queue is
    /// then retired, since the device may still complete them.
    pub fn close(&mut self) {
        if let Some(parts) = self.parts.take() {
            self.controller.return_queue(parts);
        }
    }
}

impl Drop for RequestChannel {
    fn drop(&mut self) {
        self.close();
        if self.in_flight() > 0 && self.controller.check_usable().is_ok() {
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
