//! Poll mode, for either device: the request queues are busy-polled, like a poll-mode target,
//! instead of served on kicks, so that an initiator's measurements do not include the target's
//! wake-up latency.
//!
//! Each poll thread owns a fixed share of the request queues (queue `q` goes to thread
//! `q % threads`) and visits them round robin, serving whatever is available. While a ring is
//! polled the driver is told not to kick: without EVENT_IDX through VRING_USED_F_NO_NOTIFY, with
//! it by parking avail_event half the index space away from where the driver publishes, so its
//! "need a notification" test never passes. Completions go to the used ring; the call eventfd is
//! signalled only when the driver asks for an interrupt.
//!
//! A thread spins only while at least one of its rings is started and enabled; otherwise it
//! sleeps until the frontend changes something (ring state, memory, connection).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use log::warn;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::rings::{ring_live, RingTable};
use super::MemGuard;

/// Longest sleep of an idle poll thread before it looks again on its own.
const IDLE_WAIT: Duration = Duration::from_millis(200);
/// Passes between two checks that the device still exists.
const PASSES_PER_ROUND: u32 = 4096;
/// avail_event is parked this far from the driver's index...
const AVAIL_EVENT_DISTANCE: u16 = 0x8000;
/// ...and moved again once the driver has come this close to it.
const AVAIL_EVENT_REFRESH: u16 = 0x4000;

/// What a poll thread needs of a device.
pub trait PollDevice: Send + Sync + 'static {
    /// Queue index of request queue 0.
    const FIRST_REQUEST_QUEUE: u16;
    fn rings(&self) -> &RingTable;
    fn memory(&self) -> Option<MemGuard>;
    /// Serves what request queue `rq` has available now, without touching its notification
    /// state, and signals the driver only when it asks (see [`super::ring::poll`]).
    fn poll_requests(&self, rq: u16, ring: &VringRwLock) -> io::Result<()>;
}

/// Starts `threads` poll threads over the device's `queues` request queues. They hold only a
/// weak reference, so they end with the device.
pub fn start<D: PollDevice>(device: &Arc<D>, queues: u16, threads: u16) {
    let threads = threads.clamp(1, queues.max(1));
    for t in 0..threads {
        let mine: Vec<Polled> = (0..queues).filter(|q| q % threads == t).map(Polled::new).collect();
        let weak = Arc::downgrade(device);
        std::thread::Builder::new()
            .name(format!("poll-{t}"))
            .spawn(move || run(weak, mine))
            .expect("spawning a poll thread");
    }
}

/// What a poll thread remembers about one of its rings.
struct Polled {
    rq: u16,
    /// Slot generation for which notifications were last suppressed.
    armed: Option<u64>,
    /// Driver index at which avail_event was last parked.
    parked_at: u16,
    /// Slot generation in which serving last failed, so the failure is logged once.
    failed: Option<u64>,
}

impl Polled {
    fn new(rq: u16) -> Polled {
        Polled { rq, armed: None, parked_at: 0, failed: None }
    }
}

fn run<D: PollDevice>(weak: Weak<D>, mut rings: Vec<Polled>) {
    loop {
        let Some(device) = weak.upgrade() else { return };
        let seen = device.rings().wake().seq();
        let mut live = false;
        for _ in 0..PASSES_PER_ROUND {
            live = poll_pass(&*device, &mut rings);
            if !live {
                break;
            }
            std::hint::spin_loop();
        }
        if !live {
            device.rings().wake().wait(seen, IDLE_WAIT);
        }
    }
}

/// Visits each ring once; returns whether any of them is live.
fn poll_pass<D: PollDevice>(device: &D, rings: &mut [Polled]) -> bool {
    let Some(mem) = device.memory() else { return false };
    let mut live = false;
    for p in rings.iter_mut() {
        device.rings().with_ring(D::FIRST_REQUEST_QUEUE + p.rq, |ring, generation| {
            if !ring_live(ring) {
                return;
            }
            live = true;
            if let Err(e) = poll_ring(device, p, ring, generation, &mem) {
                if p.failed != Some(generation) {
                    warn!("request queue {}: {e}", p.rq);
                    p.failed = Some(generation);
                }
            }
        });
    }
    live
}

fn poll_ring<D: PollDevice>(
    device: &D,
    p: &mut Polled,
    ring: &VringRwLock,
    generation: u64,
    mem: &MemGuard,
) -> io::Result<()> {
    let (event_idx, next_avail) = {
        let state = ring.get_ref();
        (state.get_queue().event_idx_enabled(), state.get_queue().next_avail())
    };
    if p.armed != Some(generation) {
        // A ring (re)started, or its addresses or features changed: suppress kicks anew.
        ring.disable_notification().map_err(io::Error::other)?;
        if event_idx {
            park_avail_event(ring, mem, next_avail)?;
            p.parked_at = next_avail;
        }
        p.armed = Some(generation);
    } else if event_idx && next_avail.wrapping_sub(p.parked_at) >= AVAIL_EVENT_REFRESH {
        park_avail_event(ring, mem, next_avail)?;
        p.parked_at = next_avail;
    }
    // Requests are served with memory loaded afresh once they are seen, so memory the frontend
    // added or replaced is followed.
    device.poll_requests(p.rq, ring)
}

/// Writes avail_event (the u16 after the used ring's entries) half the index space away from
/// `next_avail`: the driver asks for a kick only when its index crosses that value, which it
/// cannot reach before we move it again.
fn park_avail_event(ring: &VringRwLock, mem: &MemGuard, next_avail: u16) -> io::Result<()> {
    let (used, size) = {
        let state = ring.get_ref();
        (state.get_queue().used_ring(), state.get_queue().size())
    };
    let at = used + 4 + 8 * u64::from(size);
    let value = next_avail.wrapping_add(AVAIL_EVENT_DISTANCE);
    mem.store(value.to_le(), GuestAddress(at), Ordering::Release).map_err(io::Error::other)
}
