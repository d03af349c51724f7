//! The event queue: events wait here until the driver has posted a buffer for them. If too many
//! pile up, the oldest are dropped and the driver is told with VIRTIO_SCSI_T_EVENTS_MISSED.

use std::collections::VecDeque;
use std::sync::Mutex;

use log::warn;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use virtio_scsi_proto::{event, Event};
use vm_memory::Bytes;

use super::{Inner, MemGuard};

const MAX_PENDING: usize = 64;

#[derive(Default)]
pub struct EventQueue {
    state: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    events: VecDeque<Event>,
    missed: bool,
}

impl EventQueue {
    pub fn post(&self, ev: Event) {
        let mut st = self.state.lock().unwrap();
        if st.events.len() == MAX_PENDING {
            st.events.pop_front();
            st.missed = true;
        }
        st.events.push_back(ev);
    }

    /// Whether events (or the news that some were dropped) wait for a buffer.
    pub fn pending(&self) -> bool {
        let st = self.state.lock().unwrap();
        st.missed || !st.events.is_empty()
    }

    pub fn clear(&self) {
        *self.state.lock().unwrap() = Pending::default();
    }

    /// Moves pending events into the driver's event buffers, as many as it has posted.
    pub fn deliver(&self, vring: &VringRwLock, mem: &MemGuard) {
        let mut st = self.state.lock().unwrap();
        let mut delivered = false;
        while st.missed || !st.events.is_empty() {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let ev = if st.missed {
                st.missed = false;
                Event { event: event::NO_EVENT | event::EVENTS_MISSED, lun: [0; 8], reason: 0 }
            } else {
                st.events.pop_front().expect("checked non-empty")
            };
            let buf = chain.filter(|d| d.is_write_only()).find(|d| d.len() as usize >= Event::SIZE);
            let len = match buf {
                Some(d) if mem.write_slice(&ev.encode(), d.addr()).is_ok() => Event::SIZE as u32,
                _ => {
                    warn!("event buffer {head} is unusable; event dropped");
                    st.missed = true;
                    0
                }
            };
            if let Err(e) = vring.add_used(head, len) {
                warn!("cannot return an event buffer: {e}");
                return;
            }
            delivered = true;
        }
        drop(st);
        if delivered {
            Inner::notify(vring);
        }
    }
}
