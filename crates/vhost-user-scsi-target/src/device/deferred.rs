//! Requests that do not complete at once: injected delays and injected "never complete" faults.
//! A delayed request is already executed and answered in guest memory; only its used-ring entry
//! waits. A held request stays until a task-management function or a reset cancels it.

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use log::warn;
use vhost_user_backend::VringT;
use virtio_scsi_proto::{LunAddress, FIRST_REQUEST_QUEUE};

use super::request::respond_cancelled;
use super::segments::Segments;
use super::Inner;

pub struct Held {
    rq: u16,
    head: u16,
    /// Used length when it completes normally.
    len: u32,
    pub addr: LunAddress,
    pub tag: u64,
    segs: Segments,
    /// None: never completes by itself.
    due: Option<Instant>,
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
        Held { rq, head, len, addr, tag, segs, due: Some(Instant::now() + d) }
    }

    pub fn forever(rq: u16, head: u16, addr: LunAddress, tag: u64, segs: Segments) -> Self {
        Held { rq, head, len: 0, addr, tag, segs, due: None }
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
    pub fn take(&self, pick: impl Fn(&Held) -> bool) -> Vec<Held> {
        let mut held = self.held.lock().unwrap();
        let (taken, kept): (Vec<_>, Vec<_>) = held.drain(..).partition(|h| pick(h));
        *held = kept;
        taken
    }

    pub fn contains(&self, pick: impl Fn(&Held) -> bool) -> bool {
        self.held.lock().unwrap().iter().any(pick)
    }

    /// Runs the thread that completes delayed requests when they fall due. It holds only a weak
    /// reference, so it ends with the device.
    pub(super) fn start_timer(inner: &Arc<Inner>) {
        let weak: Weak<Inner> = Arc::downgrade(inner);
        std::thread::Builder::new()
            .name("deferred".into())
            .spawn(move || loop {
                let Some(inner) = weak.upgrade() else { return };
                let due = {
                    let held = inner.deferred.held.lock().unwrap();
                    let now = Instant::now();
                    let next = held.iter().filter_map(|h| h.due).min();
                    let wait = next.map_or(Duration::from_millis(200), |t| t.saturating_duration_since(now));
                    let (held, _) =
                        inner.deferred.wake.wait_timeout(held, wait.min(Duration::from_millis(200))).unwrap();
                    drop(held);
                    inner.deferred.take(|h| h.due.is_some_and(|t| t <= Instant::now()))
                };
                for h in due {
                    inner.complete(h, None);
                }
            })
            .expect("spawning the deferred-completion thread");
    }
}

impl Inner {
    /// Puts a deferred request on its used ring: as it was answered, or cancelled with `code`.
    pub(super) fn complete(&self, h: Held, cancel: Option<u8>) {
        let (Some(vring), Some(mem)) = (self.vring(FIRST_REQUEST_QUEUE + h.rq), self.memory()) else {
            return;
        };
        let len = match cancel {
            Some(code) => respond_cancelled(&h.segs, &mem, code),
            None => h.len,
        };
        if let Err(e) = vring.add_used(h.head, len) {
            warn!("cannot complete a deferred request: {e}");
            return;
        }
        Inner::notify(&vring);
    }
}
