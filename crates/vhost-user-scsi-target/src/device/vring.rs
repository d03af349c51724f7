//! The vring type the backend crate manages for us: its own `VringRwLock`, plus hooks on the
//! calls that start and stop a ring.
//!
//! The backend crate creates the vrings, answers the ring messages itself and hands the vrings
//! to the device only inside `handle_event`. Two things need more: the poll threads must find
//! the rings without ever being kicked, and stopping a ring (GET_VRING_BASE, which the crate
//! answers by calling `set_queue_ready(false)` before it replies) must first finish the
//! requests the device still holds on it. So each vring knows its queue index and its device
//! (a [`RingOwner`]), learnt when the connection's daemon creates it (see [`bind`]).

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::sync::{Arc, RwLockReadGuard, RwLockWriteGuard, Weak};

use vhost_user_backend::{VringRwLock, VringState, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as QueueError;

use super::Memory;

/// What a device does when the frontend creates, changes or stops one of its rings.
pub trait RingOwner: Send + Sync {
    /// A vring of a new connection is created.
    fn attach_ring(&self, queue: u16, ring: VringRwLock);
    /// Applies `change` to how queue `queue` is served, while no one is serving it.
    fn change_ring(&self, queue: u16, change: &mut dyn FnMut());
    /// Finishes what the device holds on the ring, then marks it stopped.
    fn stop_ring(&self, queue: u16, ring: &VringRwLock);
}

type Owner = (Weak<dyn RingOwner>, u16);

thread_local! {
    /// The device whose daemon is being created on this thread, and the index of the next
    /// vring it creates.
    static BINDING: RefCell<Option<Owner>> = const { RefCell::new(None) };
}

/// Runs `create` (which creates a `VhostUserDaemon`) with every vring it creates bound to
/// `owner`, by queue index in creation order: the backend crate creates them in a single loop,
/// queue 0 first, on the calling thread.
pub fn bind<T>(owner: Weak<dyn RingOwner>, create: impl FnOnce() -> T) -> T {
    BINDING.with(|b| *b.borrow_mut() = Some((owner, 0)));
    let out = create();
    BINDING.with(|b| *b.borrow_mut() = None);
    out
}

/// A vring of one connection.
#[derive(Clone)]
pub struct BoundVring {
    ring: VringRwLock,
    /// The device and this ring's queue index, when created under [`bind`].
    owner: Option<Owner>,
}

impl BoundVring {
    fn owner(&self) -> Option<(Arc<dyn RingOwner>, u16)> {
        let (owner, queue) = self.owner.as_ref()?;
        Some((owner.upgrade()?, *queue))
    }

    /// Applies a change of how the ring is served while no one is serving it.
    fn change(&self, f: impl FnOnce(&VringRwLock)) {
        match self.owner() {
            Some((owner, queue)) => {
                let mut f = Some(f);
                owner.change_ring(queue, &mut || {
                    if let Some(f) = f.take() {
                        f(&self.ring)
                    }
                })
            }
            None => f(&self.ring),
        }
    }
}

impl<'a> VringStateGuard<'a, Memory> for BoundVring {
    type G = RwLockReadGuard<'a, VringState<Memory>>;
}

impl<'a> VringStateMutGuard<'a, Memory> for BoundVring {
    type G = RwLockWriteGuard<'a, VringState<Memory>>;
}

impl VringT<Memory> for BoundVring {
    fn new(mem: Memory, max_queue_size: u16) -> Result<Self, QueueError> {
        let ring = VringRwLock::new(mem, max_queue_size)?;
        let owner = BINDING.with(|b| {
            let mut b = b.borrow_mut();
            let (device, next) = b.as_mut()?;
            let queue = *next;
            *next += 1;
            Some((device.clone(), queue))
        });
        if let Some((device, queue)) = owner.as_ref().and_then(|(w, q)| Some((w.upgrade()?, *q))) {
            device.attach_ring(queue, ring.clone());
        }
        Ok(BoundVring { ring, owner })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, Memory>>::G {
        self.ring.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, Memory>>::G {
        self.ring.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), QueueError> {
        self.ring.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.ring.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, QueueError> {
        self.ring.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), QueueError> {
        self.ring.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, QueueError> {
        self.ring.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.change(|r| r.set_enabled(enabled));
    }

    fn set_queue_info(&self, desc_table: u64, avail_ring: u64, used_ring: u64) -> Result<(), QueueError> {
        let mut result = Ok(());
        self.change(|r| result = r.set_queue_info(desc_table, avail_ring, used_ring));
        result
    }

    fn queue_next_avail(&self) -> u16 {
        self.ring.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.change(|r| r.set_queue_next_avail(base));
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.change(|r| r.set_queue_next_used(idx));
    }

    fn queue_used_idx(&self) -> Result<u16, QueueError> {
        self.ring.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.change(|r| r.set_queue_size(num));
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.change(|r| r.set_queue_event_idx(enabled));
    }

    /// Starting a ring wakes whoever serves it; stopping it (GET_VRING_BASE) first finishes
    /// every request the device holds on it, so that once the frontend has its reply nothing
    /// of this ring is written again.
    fn set_queue_ready(&self, ready: bool) {
        match self.owner() {
            Some((owner, queue)) if !ready => owner.stop_ring(queue, &self.ring),
            Some((owner, queue)) => owner.change_ring(queue, &mut || self.ring.set_queue_ready(true)),
            None => self.ring.set_queue_ready(ready),
        }
    }

    fn set_kick(&self, file: Option<File>) {
        self.ring.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.ring.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        self.ring.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        self.ring.set_err(file)
    }
}
