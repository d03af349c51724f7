//! The current connection's vrings by queue index, as the device sees them.
//!
//! Each ring sits in a slot whose lock is held while the ring is served (by a worker or a poll
//! thread, or to complete a held request) and while the frontend changes how it is served
//! (start, stop, enable, addresses), so a change never lands in the middle of a pass and a stop
//! waits for the pass in progress. Every change bumps the slot's generation, so a poll thread
//! knows to set the ring up again, and wakes idle poll threads.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;

pub struct RingTable {
    slots: Vec<Mutex<Slot>>,
    /// Wakes idle poll threads when a ring may have become ready to serve.
    wake: Wake,
}

#[derive(Default)]
struct Slot {
    ring: Option<VringRwLock>,
    generation: u64,
}

impl RingTable {
    pub fn new(queues: usize) -> RingTable {
        RingTable { slots: (0..queues).map(|_| Mutex::default()).collect(), wake: Wake::default() }
    }

    /// Runs `f` on queue `queue`'s vring and its generation, under the slot lock. `None` when
    /// the connection has no such ring.
    pub fn with_ring<R>(&self, queue: u16, f: impl FnOnce(&VringRwLock, u64) -> R) -> Option<R> {
        let slot = self.slots.get(queue as usize)?.lock().unwrap();
        let ring = slot.ring.as_ref()?;
        Some(f(ring, slot.generation))
    }

    /// A vring of a new connection is created.
    pub fn attach(&self, queue: u16, ring: VringRwLock) {
        if let Some(slot) = self.slots.get(queue as usize) {
            let mut slot = slot.lock().unwrap();
            slot.ring = Some(ring);
            slot.generation += 1;
        }
    }

    /// Applies a frontend's change to how queue `queue` is served, between passes.
    pub fn change(&self, queue: u16, f: impl FnOnce()) {
        match self.slots.get(queue as usize) {
            Some(slot) => {
                let mut slot = slot.lock().unwrap();
                f();
                slot.generation += 1;
            }
            None => f(),
        }
        self.wake.bump();
    }

    /// Lets go of every ring: the connection ended, or a new one begins.
    pub fn clear(&self) {
        for slot in &self.slots {
            let mut slot = slot.lock().unwrap();
            slot.ring = None;
            slot.generation += 1;
        }
        self.wake.bump();
    }

    pub fn wake(&self) -> &Wake {
        &self.wake
    }
}

/// Whether a ring is started and enabled: only then may the device use it.
pub fn ring_live(ring: &VringRwLock) -> bool {
    let state = ring.get_ref();
    state.get_queue().ready() && state.is_enabled()
}

/// A counter with a condition variable: waiters sleep until it moves.
#[derive(Default)]
pub struct Wake {
    seq: Mutex<u64>,
    cond: Condvar,
}

impl Wake {
    pub fn seq(&self) -> u64 {
        *self.seq.lock().unwrap()
    }

    pub fn bump(&self) {
        *self.seq.lock().unwrap() += 1;
        self.cond.notify_all();
    }

    /// Sleeps until the counter moves past `seen`, at most `timeout`.
    pub fn wait(&self, seen: u64, timeout: Duration) {
        let seq = self.seq.lock().unwrap();
        if *seq == seen {
            drop(self.cond.wait_timeout(seq, timeout).unwrap());
        }
    }
}
