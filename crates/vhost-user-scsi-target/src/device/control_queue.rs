//! The control queue: task management functions and asynchronous-notification requests.

use std::io;
use std::sync::atomic::Ordering;

use log::{info, warn};
use vhost_user_backend::VringRwLock;
use virtio_scsi_proto::{an, ctrl, response, tmf, AnRequest, LunAddress, TmfRequest};

use super::segments::Segments;
use super::{Inner, MemGuard};

/// Asynchronous notification classes this device can report.
const SUPPORTED_AN: u32 = an::OPERATIONAL_CHANGE | an::MEDIA_CHANGE;

impl Inner {
    pub(super) fn process_control(&self, vring: &VringRwLock) -> io::Result<()> {
        self.drain(vring, |mem, _, segs| Some(self.control_request(&segs, mem)))
    }

    /// Handles one control request and returns the used length.
    fn control_request(&self, segs: &Segments, mem: &MemGuard) -> u32 {
        let mut raw = [0u8; TmfRequest::SIZE];
        let n = raw.len().min(segs.readable.len());
        if n < 4 || segs.misordered || segs.readable.read(&**mem, 0, &mut raw[..n]).is_err() {
            warn!("malformed control request");
            return reply(segs, mem, &[response::FAILURE]);
        }
        let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        match kind {
            ctrl::TMF => match TmfRequest::decode(&raw[..n]) {
                Some(req) => {
                    let used = reply(segs, mem, &[self.task_management(req)]);
                    if self.opts.quirks.tmf_zero_used_len {
                        0
                    } else {
                        used
                    }
                }
                None => reply(segs, mem, &[response::FAILURE]),
            },
            ctrl::AN_QUERY | ctrl::AN_SUBSCRIBE => match AnRequest::decode(&raw[..n]) {
                Some(req) => {
                    let reply_bytes = self.async_notification(req);
                    reply(segs, mem, &reply_bytes)
                }
                None => reply(segs, mem, &AnRequest::encode_response(0, response::FAILURE)),
            },
            other => {
                warn!("unknown control request type {other}");
                reply(segs, mem, &[response::FAILURE])
            }
        }
    }

    fn task_management(&self, req: TmfRequest) -> u8 {
        let Some(addr) = LunAddress::decode(&req.lun) else { return response::BAD_TARGET };
        if !self.bus.target_exists(addr.target) {
            return response::BAD_TARGET;
        }
        info!("task management {} on {addr:?} tag {}", req.subtype, req.tag);
        let ignored = self.opts.quirks.tmf_ignored
            || (self.opts.quirks.abort_task_ignored && req.subtype == tmf::ABORT_TASK);
        if ignored && req.subtype != tmf::QUERY_TASK && req.subtype != tmf::QUERY_TASK_SET {
            info!("task management {} ignored (quirk)", req.subtype);
            return response::OK;
        }
        match req.subtype {
            tmf::ABORT_TASK => {
                self.cancel_held(|h| h.addr == addr && h.tag == req.tag, response::ABORTED);
                response::OK
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET => {
                self.cancel_held(|h| h.addr == addr, response::ABORTED);
                response::OK
            }
            tmf::LOGICAL_UNIT_RESET => {
                self.cancel_held(|h| h.addr == addr, response::RESET);
                match self.bus.lun_reset(addr) {
                    Ok(()) => response::OK,
                    Err(_) => response::INCORRECT_LUN,
                }
            }
            tmf::I_T_NEXUS_RESET => {
                self.cancel_held(|h| h.addr.target == addr.target, response::RESET);
                self.bus.nexus_reset(addr.target);
                response::OK
            }
            tmf::QUERY_TASK => {
                if self.deferred.contains(|h| h.addr == addr && h.tag == req.tag) {
                    response::FUNCTION_SUCCEEDED
                } else {
                    response::OK
                }
            }
            tmf::QUERY_TASK_SET => {
                if self.deferred.contains(|h| h.addr == addr) {
                    response::FUNCTION_SUCCEEDED
                } else {
                    response::OK
                }
            }
            _ => response::FUNCTION_REJECTED,
        }
    }

    fn async_notification(&self, req: AnRequest) -> [u8; AnRequest::RESPONSE_SIZE] {
        match LunAddress::decode(&req.lun) {
            Some(addr) if self.bus.target_exists(addr.target) => {}
            _ => return AnRequest::encode_response(0, response::BAD_TARGET),
        }
        let actual = req.event_requested & SUPPORTED_AN;
        if req.kind == ctrl::AN_SUBSCRIBE {
            self.an_subscribed.fetch_or(actual, Ordering::Relaxed);
        }
        AnRequest::encode_response(actual, response::OK)
    }
}

fn reply(segs: &Segments, mem: &MemGuard, bytes: &[u8]) -> u32 {
    if segs.writable.len() < bytes.len() {
        warn!("control request without room for its {}-byte reply", bytes.len());
        return 0;
    }
    match segs.writable.write(&**mem, 0, bytes) {
        Ok(()) => bytes.len() as u32,
        Err(e) => {
            warn!("cannot write a control reply: {e}");
            0
        }
    }
}
