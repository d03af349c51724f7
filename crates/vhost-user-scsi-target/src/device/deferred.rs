//! Requests that do not complete at once: injected delays, late completions and "never
//! complete" faults.
//!
//! A delayed request is already executed and answered in guest memory; only its used-ring entry
//! waits. A late request has written nothing yet: its data-in, response and used entry wait
//! together. A held request stays until a task-management function, a reset or the ring's stop
//! cancels it.
//!
//! Every completion of a held request happens under its ring's slot lock, the lock that
//! stopping a ring takes: a request is finished either before the stop or by it, never after.

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use log::warn;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_scsi_proto::{response, CmdResponse, LunAddress, FIRST_REQUEST_QUEUE};

use super::request::respond_cancelled;
use super::segments::Segments;
use super::{ring_live, Inner, MemGuard};

/// How long the timer sleeps at most, so that it notices when the device is gone.
const TIMER_IDLE: Duration = Duration::from_millis(200);

pub struct Held {
    rq: u16,
    head: u16,
    pub addr: LunAddress,
    pub tag: u64,
    segs: Segments,
    /// None: never completes by itself.
    due: Option<Instant>,
    kind: Kind,
}

enum Kind {
    /// Answered in guest memory; the used entry of this length waits.
    Delayed { len: u32 },
    /// Nothing written yet: these data-in pieces (by offset past the response) and this
    /// response wait with the used entry.
    Late { resp: CmdResponse, data: Vec<(usize, Vec<u8>)>, data_in_len: usize },
    /// Not executed; only cancellation completes it.
    Never,
}

impl Held {
    pub fn delayed(
        rq: u16,
        head: u16,
        len: u32,
        addr: LunAddress,
        tag: u64,
        segs: Segments,
        d: Duration,
    ) -> Self {
        Held { rq, head, addr, tag, segs, due: Some(Instant::now() + d), kind: Kind::Delayed { len } }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn late(
        rq: u16,
        head: u16,
        addr: LunAddress,
        tag: u64,
        segs: Segments,
        resp: CmdResponse,
        data: Vec<(usize, Vec<u8>)>,
        data_in_len: usize,
        d: Duration,
    ) -> Self {
        let kind = Kind::Late { resp, data, data_in_len };
        Held { rq, head, addr, tag, segs, due: Some(Instant::now() + d), kind }
    }

    pub fn forever(rq: u16, head: u16, addr: LunAddress, tag: u64, segs: Segments) -> Self {
        Held { rq, head, addr, tag, segs, due: None, kind: Kind::Never }
    }

    fn is_due(&self, now: Instant) -> bool {
        self.due.is_some_and(|t| t <= now)
    }
}

#[derive(Default)]
pub struct Deferred {
    held: Mutex<Vec<Held>>,
    wake: Condvar,
}

impl Deferred {
    pub fn hold(&self, h: Held) {
        self.held.lock().unwrap().push(h);
        self.wake.notify_one();
    }

    /// Drops everything: the connection that owned these requests is gone.
    pub fn clear(&self) {
        self.held.lock().unwrap().clear();
    }

    /// Removes the requests that `pick` selects.
    fn take(&self, pick: impl Fn(&Held) -> bool) -> Vec<Held> {
        let mut held = self.held.lock().unwrap();
        let (taken, kept): (Vec<_>, Vec<_>) = held.drain(..).partition(|h| pick(h));
        *held = kept;
        taken
    }

    pub fn contains(&self, pick: impl Fn(&Held) -> bool) -> bool {
        self.held.lock().unwrap().iter().any(pick)
    }

    /// Makes the timer look again: a ring it skipped may be live now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs the thread that completes delayed and late requests when they fall due, on rings
    /// that are started and enabled (a disabled ring keeps them until it is enabled again or
    /// stopped). It holds only a weak reference, so it ends with the device.
    pub(super) fn start_timer(inner: &Arc<Inner>) {
        let weak: Weak<Inner> = Arc::downgrade(inner);
        std::thread::Builder::new()
            .name("deferred".into())
            .spawn(move || loop {
                let Some(inner) = weak.upgrade() else { return };
                // Slot locks are never taken while the held list is locked: stopping a ring
                // takes them in the other order.
                let live: Vec<bool> = (0..inner.opts.request_queues)
                    .map(|rq| {
                        inner.rings.with_ring(FIRST_REQUEST_QUEUE + rq, |r, _| ring_live(r)).unwrap_or(false)
                    })
                    .collect();
                let any_due = {
                    let held = inner.deferred.held.lock().unwrap();
                    let now = Instant::now();
                    let next = held.iter().filter(|h| live[h.rq as usize]).filter_map(|h| h.due).min();
                    let wait = next.map_or(TIMER_IDLE, |t| t.saturating_duration_since(now)).min(TIMER_IDLE);
                    let (held, _) = inner.deferred.wake.wait_timeout(held, wait).unwrap();
                    let now = Instant::now();
                    held.iter().any(|h| h.is_due(now))
                };
                if !any_due {
                    continue;
                }
                for rq in 0..inner.opts.request_queues {
                    inner.rings.with_ring(FIRST_REQUEST_QUEUE + rq, |ring, _| {
                        if ring_live(ring) {
                            let now = Instant::now();
                            inner.finish_held(
                                ring,
                                inner.deferred.take(|h| h.rq == rq && h.is_due(now)),
                                None,
                            );
                        }
                    });
                }
            })
            .expect("spawning the deferred-completion thread");
    }
}

impl Inner {
    /// Cancels the held requests that `pick` selects with response `code` (ABORTED, RESET),
    /// each under its ring's lock.
    pub(super) fn cancel_held(&self, pick: impl Fn(&Held) -> bool, code: u8) {
        for rq in 0..self.opts.request_queues {
            let queue = FIRST_REQUEST_QUEUE + rq;
            let done = self.rings.with_ring(queue, |ring, _| {
                self.finish_held(ring, self.deferred.take(|h| h.rq == rq && pick(h)), Some(code))
            });
            if done.is_none() {
                // No ring to answer on: the requests go with it.
                drop(self.deferred.take(|h| h.rq == rq && pick(h)));
            }
        }
    }

    /// Finishes everything held on request queue `rq`, whose slot lock the caller holds:
    /// delayed and late requests complete as if their time had come, requests that would never
    /// complete are answered ABORTED.
    pub(super) fn drain_held(&self, rq: u16, ring: &VringRwLock) {
        let held = self.deferred.take(|h| h.rq == rq);
        let (never, timed): (Vec<_>, Vec<_>) = held.into_iter().partition(|h| matches!(h.kind, Kind::Never));
        self.finish_held(ring, timed, None);
        self.finish_held(ring, never, Some(response::ABORTED));
    }

    /// Puts held requests on their used ring: as answered, or cancelled with `cancel`. The
    /// caller holds the ring's slot lock.
    fn finish_held(&self, ring: &VringRwLock, held: Vec<Held>, cancel: Option<u8>) {
        if held.is_empty() {
            return;
        }
        let Some(mem) = self.memory() else { return };
        let mut added = false;
        for h in held {
            let len = match (cancel, h.kind) {
                (Some(_), _) | (None, Kind::Never) => {
                    respond_cancelled(&h.segs, &mem, cancel.unwrap_or(response::ABORTED))
                }
                (None, Kind::Delayed { len }) => len,
                (None, Kind::Late { resp, data, data_in_len }) => {
                    write_late(&h.segs, &mem, resp, data, data_in_len)
                }
            };
            match ring.add_used(h.head, len) {
                Ok(()) => added = true,
                Err(e) => warn!("cannot complete a deferred request: {e}"),
            }
        }
        if added {
            self.notify_request(ring, &mem);
        }
    }
}

/// Writes a late request's data-in, then its response; returns the used length.
fn write_late(
    segs: &Segments,
    mem: &MemGuard,
    resp: CmdResponse,
    data: Vec<(usize, Vec<u8>)>,
    data_in_len: usize,
) -> u32 {
    for (offset, bytes) in data {
        if let Err(e) = segs.writable.write(&**mem, CmdResponse::SIZE + offset, &bytes) {
            warn!("cannot write the data of a late request: {e}");
        }
    }
    match segs.writable.write(&**mem, 0, &resp.encode()) {
        Ok(()) => (CmdResponse::SIZE + data_in_len) as u32,
        Err(e) => {
            warn!("cannot write the response of a late request: {e}");
            0
        }
    }
}
