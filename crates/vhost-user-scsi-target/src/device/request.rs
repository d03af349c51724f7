//! Request queues: one SCSI command per descriptor chain.

use std::io;
use std::sync::atomic::Ordering;

use log::{debug, warn};
use vhost_user_backend::VringRwLock;
use virtio_scsi_proto::{response, scsi::status, CmdRequest, CmdResponse, LunAddress};

use super::deferred::Held;
use super::segments::{GuestDataIn, GuestDataOut, Segments};
use super::{Inner, MemGuard};
use crate::scsi::Action;

/// What became of one chain.
enum Outcome {
    /// Put it on the used ring now with this many bytes written.
    Done(u32),
    /// The deferred list owns it now.
    Deferred,
}

impl Inner {
    /// Serves a request queue after a kick.
    pub(super) fn process_requests(&self, rq: u16, vring: &VringRwLock) -> io::Result<()> {
        self.drain(vring, |mem, head, segs| self.serve_request(rq, head, segs, mem))
    }

    /// Serves what a polled request queue has available now, without touching its
    /// notification state.
    pub(super) fn poll_requests(&self, rq: u16, vring: &VringRwLock) -> io::Result<()> {
        super::ring::poll(vring, || self.memory(), |mem, head, segs| self.serve_request(rq, head, segs, mem))
    }

    fn serve_request(&self, rq: u16, head: u16, segs: Segments, mem: &MemGuard) -> Option<u32> {
        match self.execute(rq, head, segs, mem) {
            Outcome::Done(len) => Some(len),
            Outcome::Deferred => None,
        }
    }

    fn execute(&self, rq: u16, head: u16, segs: Segments, mem: &MemGuard) -> Outcome {
        let stats = &self.stats[rq as usize];
        stats.requests.fetch_add(1, Ordering::Relaxed);
        if segs.writable.len() < CmdResponse::SIZE {
            // Nowhere to put a response: all we can do is hand the buffers back.
            warn!(
                "request queue {rq}: chain {head} has {} writable bytes, no room for a response",
                segs.writable.len()
            );
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            return Outcome::Done(0);
        }
        let mut header = [0u8; CmdRequest::SIZE];
        let req = if segs.misordered {
            None
        } else {
            segs.readable.read(&**mem, 0, &mut header).ok().and_then(|_| CmdRequest::decode(&header))
        };
        let Some(req) = req else {
            warn!("request queue {rq}: malformed chain {head} (short header or misordered descriptors)");
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            return respond(&segs, mem, CmdResponse { response: response::FAILURE, ..Default::default() }, 0);
        };
        let Some(addr) = LunAddress::decode(&req.lun) else {
            return respond(
                &segs,
                mem,
                CmdResponse { response: response::BAD_TARGET, ..Default::default() },
                0,
            );
        };

        let out = GuestDataOut { mem: &**mem, stream: &segs.readable, skip: CmdRequest::SIZE };
        let mut inp = GuestDataIn::new(&**mem, &segs.writable, CmdResponse::SIZE);
        let Some(done) = self.bus.execute(addr, &req.cdb, &out, &mut inp) else {
            return respond(
                &segs,
                mem,
                CmdResponse { response: response::BAD_TARGET, ..Default::default() },
                0,
            );
        };
        debug!("rq{rq} {addr:?} cdb {:02x?} -> status {:#x}", &req.cdb[..16], done.status);

        use crate::scsi::DataIn as _;
        use crate::scsi::DataOut as _;
        let in_cap = inp.capacity();
        let held_data = inp.take_held();
        let resid = if in_cap > 0 {
            in_cap - done.data_in_len.min(in_cap)
        } else if done.status != status::GOOD {
            out.len()
        } else {
            0
        };
        stats.bytes_in.fetch_add(done.data_in_len as u64, Ordering::Relaxed);
        if done.status == status::GOOD {
            stats.bytes_out.fetch_add(out.len() as u64, Ordering::Relaxed);
        } else {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }

        let mut resp = CmdResponse { status: done.status, resid: resid as u32, ..Default::default() };
        let n = done.sense.len().min(resp.sense.len());
        resp.sense[..n].copy_from_slice(&done.sense[..n]);
        resp.sense_len = n as u32;

        match done.action {
            Action::Now => respond(&segs, mem, resp, done.data_in_len),
            Action::After(delay) => match respond(&segs, mem, resp, done.data_in_len) {
                Outcome::Done(len) => {
                    self.deferred.hold(Held::delayed(rq, head, len, addr, req.tag, segs, delay));
                    Outcome::Deferred
                }
                deferred => deferred,
            },
            Action::Late(delay) => {
                let data_in_len = done.data_in_len;
                let held = Held::late(rq, head, addr, req.tag, segs, resp, held_data, data_in_len, delay);
                self.deferred.hold(held);
                Outcome::Deferred
            }
            Action::Never => {
                self.deferred.hold(Held::forever(rq, head, addr, req.tag, segs));
                Outcome::Deferred
            }
        }
    }
}

/// Writes the response header; the used length covers it and the data-in bytes.
fn respond(segs: &Segments, mem: &MemGuard, resp: CmdResponse, data_in: usize) -> Outcome {
    match segs.writable.write(&**mem, 0, &resp.encode()) {
        Ok(()) => Outcome::Done((CmdResponse::SIZE + data_in) as u32),
        Err(e) => {
            warn!("cannot write a response: {e}");
            Outcome::Done(0)
        }
    }
}

/// Writes an ABORTED or RESET response for a request that never completed.
pub(super) fn respond_cancelled(segs: &Segments, mem: &MemGuard, code: u8) -> u32 {
    match respond(segs, mem, CmdResponse { response: code, ..Default::default() }, 0) {
        Outcome::Done(len) => len,
        Outcome::Deferred => 0,
    }
}
