//! Serving a vring, whatever the device: take the chains the driver made available, hand each to
//! the device as a request's two byte streams, put what it finished on the used ring, and signal
//! the driver as the ring's notification rules ask.

use std::io;
use std::sync::atomic::Ordering;

use log::warn;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::segments::Segments;
use super::MemGuard;

/// Serves every chain the driver has made available, with EVENT_IDX notification suppression
/// while doing so. `serve` returns the used length, or `None` when it kept the chain for later
/// completion.
pub fn drain(
    vring: &VringRwLock,
    event_idx: bool,
    memory: impl Fn() -> Option<MemGuard>,
    mut serve: impl FnMut(&MemGuard, u16, Segments) -> Option<u32>,
) -> io::Result<()> {
    loop {
        if event_idx {
            vring.disable_notification().map_err(io::Error::other)?;
        }
        if serve_available(vring, &memory, &mut serve)?.is_some() {
            notify(vring);
        }
        if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
            return Ok(());
        }
    }
}

/// Serves the chains available now. Returns the memory they were served with when any went on
/// the used ring.
pub fn serve_available(
    vring: &VringRwLock,
    memory: impl Fn() -> Option<MemGuard>,
    mut serve: impl FnMut(&MemGuard, u16, Segments) -> Option<u32>,
) -> io::Result<Option<MemGuard>> {
    let no_memory = || io::Error::other("a ring is in use before SET_MEM_TABLE");
    {
        let mem = memory().ok_or_else(no_memory)?;
        let state = vring.get_ref();
        let queue = state.get_queue();
        if queue.avail_idx(&*mem, Ordering::Acquire).map_err(io::Error::other)?.0 == queue.next_avail() {
            return Ok(None);
        }
    }
    // Loaded only once a request is seen: a driver publishes after the memory update (ADD_MEM_REG,
    // SET_MEM_TABLE) that its buffers need has been acknowledged, so this load has it.
    let mem = memory().ok_or_else(no_memory)?;
    let chains: Vec<_> = {
        let mut state = vring.get_mut();
        state.get_queue_mut().iter(mem.clone()).map_err(io::Error::other)?.collect()
    };
    let mut completed = false;
    for chain in chains {
        let head = chain.head_index();
        let segs = Segments::from_descriptors(chain.map(|d| (d.addr(), d.len(), d.is_write_only())));
        if let Some(len) = serve(&mem, head, segs) {
            vring.add_used(head, len).map_err(io::Error::other)?;
            completed = true;
        }
    }
    Ok(completed.then_some(mem))
}

/// Serves what a polled ring has available now, leaving its notification state alone.
pub fn poll(
    vring: &VringRwLock,
    memory: impl Fn() -> Option<MemGuard>,
    serve: impl FnMut(&MemGuard, u16, Segments) -> Option<u32>,
) -> io::Result<()> {
    if let Some(mem) = serve_available(vring, memory, serve)? {
        notify_polled(vring, &mem);
    }
    Ok(())
}

/// Signals the driver after completions on a polled ring. Without EVENT_IDX virtio-queue
/// signals every time; a polled ring honours VRING_AVAIL_F_NO_INTERRUPT too, so that the call
/// eventfd is signalled only when the driver asks.
pub fn notify_polled(vring: &VringRwLock, mem: &MemGuard) {
    let (event_idx, avail) = {
        let state = vring.get_ref();
        (state.get_queue().event_idx_enabled(), state.get_queue().avail_ring())
    };
    if event_idx {
        return notify(vring);
    }
    // The used index must be visible before the driver's flags are read.
    std::sync::atomic::fence(Ordering::SeqCst);
    match mem.load::<u16>(GuestAddress(avail), Ordering::Acquire) {
        Ok(flags) if u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 != 0 => {}
        Ok(_) => signal(vring),
        Err(e) => warn!("cannot read the available ring's flags: {e}"),
    }
}

/// Signals the driver if the ring's notification rules ask for it.
pub fn notify(vring: &VringRwLock) {
    match vring.needs_notification() {
        Ok(true) => signal(vring),
        Ok(false) => {}
        Err(e) => warn!("cannot read notification state: {e}"),
    }
}

pub fn signal(vring: &VringRwLock) {
    if let Err(e) = vring.signal_used_queue() {
        warn!("cannot signal used queue: {e}");
    }
}
