//! An in-process device behind the `Transport` trait: it answers negotiation from a script
//! (features, configuration space, queue counts and sizes, calls that fail) and exposes the
//! rings the controller sets up, so a target can play the device side of every queue.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_initiator_core::memory::Region;
use virtio_initiator_core::transport::{Notifier, QueueHandle, RingAddresses, Transport, TransportError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type Result<T> = std::result::Result<T, TransportError>;

/// How the device answers negotiation.
#[derive(Clone, Debug, Default)]
pub struct Script {
    pub features: u64,
    /// The configuration space; `None` makes reads fail (no CONFIG support).
    pub config: Option<Vec<u8>>,
    pub queue_count: Option<u16>,
    /// Largest size of each queue, by index; `None` past the end.
    pub max_queue_size: Vec<Option<u16>>,
    /// The n-th transport call fails (counting from 0).
    pub fail_call: Option<u32>,
}

/// What the controller told the device.
#[derive(Default)]
pub struct State {
    pub regions: Vec<(u64, u64)>,
    pub queues: BTreeMap<u16, RingAddresses>,
    pub acked: Option<u64>,
    /// The configuration space was read successfully.
    pub config_read: bool,
    pub started: bool,
    pub resets: u32,
    pub stops: u32,
    calls: u32,
}

pub struct FakeTransport {
    script: Script,
    state: Arc<Mutex<State>>,
}

impl FakeTransport {
    pub fn new(script: Script) -> (Self, Arc<Mutex<State>>) {
        let state = Arc::new(Mutex::new(State::default()));
        (FakeTransport { script, state: state.clone() }, state)
    }

    /// Counts a call; fails it when the script says so.
    fn call(&self, what: &'static str) -> Result<std::sync::MutexGuard<'_, State>> {
        let mut st = self.state.lock().unwrap();
        let n = st.calls;
        st.calls += 1;
        if self.script.fail_call == Some(n) {
            return Err(TransportError::Protocol { request: what, detail: "scripted failure".into() });
        }
        Ok(st)
    }

    fn count(&self, what: &'static str) -> Result<()> {
        self.call(what).map(drop)
    }
}

impl Transport for FakeTransport {
    fn device_features(&mut self) -> Result<u64> {
        self.count("features")?;
        Ok(self.script.features)
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        let mut st = self.call("set features")?;
        assert_eq!(features & !self.script.features, 0, "driver acked features {features:#x} not offered");
        st.acked = Some(features);
        Ok(())
    }

    fn queue_count(&mut self) -> Result<Option<u16>> {
        self.count("queue count")?;
        Ok(self.script.queue_count)
    }

    fn max_queue_size(&mut self, index: u16) -> Result<Option<u16>> {
        self.count("queue size")?;
        Ok(self.script.max_queue_size.get(index as usize).copied().flatten())
    }

    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()> {
        let mut st = self.call("config")?;
        let Some(cfg) = &self.script.config else {
            return Err(TransportError::Unsupported("configuration space"));
        };
        let start = offset as usize;
        match cfg.get(start..start + buf.len()) {
            Some(src) => {
                buf.copy_from_slice(src);
                st.config_read = true;
                Ok(())
            }
            None => Err(TransportError::Protocol { request: "config", detail: "short".into() }),
        }
    }

    fn set_memory(&mut self, regions: &[Region]) -> Result<()> {
        let mut st = self.call("set memory")?;
        st.regions = regions.iter().map(|r| (r.iova, r.size)).collect();
        Ok(())
    }

    fn add_memory(&mut self, region: &Region) -> Result<()> {
        let mut st = self.call("add memory")?;
        st.regions.push((region.iova, region.size));
        Ok(())
    }

    fn setup_queue(&mut self, index: u16, rings: &RingAddresses) -> Result<QueueHandle> {
        let mut st = self.call("setup queue")?;
        assert!(rings.size.is_power_of_two(), "queue {index} of size {}", rings.size);
        if let Some(max) = self.script.max_queue_size.get(index as usize).copied().flatten() {
            assert!(rings.size <= max, "queue {index}: size {} above the device's {max}", rings.size);
        }
        st.queues.insert(index, *rings);
        Ok(QueueHandle { notifier: Notifier::EventFd(EventFd::new(EFD_NONBLOCK)?), interrupt: None })
    }

    fn start(&mut self) -> Result<()> {
        let mut st = self.call("start")?;
        st.started = true;
        Ok(())
    }

    fn stop_queue(&mut self, index: u16) -> Result<bool> {
        let mut st = self.call("stop queue")?;
        st.stops += 1;
        st.queues.remove(&index);
        Ok(true)
    }

    fn reset(&mut self) -> Result<()> {
        let mut st = self.call("reset")?;
        st.resets += 1;
        st.queues.clear();
        Ok(())
    }

    fn check_alive(&mut self) -> Result<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        "fuzz device".into()
    }
}

/// One descriptor chain as the device found it.
#[derive(Debug, Default)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<(u64, u32)>,
    pub writable: Vec<(u64, u32)>,
}

/// The device side of one split queue, over the controller's DMA memory.
pub struct DevQueue {
    pub rings: RingAddresses,
    last_avail: u16,
    used_idx: u16,
}

impl DevQueue {
    pub fn new(rings: RingAddresses) -> Self {
        DevQueue { rings, last_avail: 0, used_idx: 0 }
    }

    fn r16(mem: &GuestMemoryMmap, at: u64) -> Option<u16> {
        mem.read_obj::<u16>(GuestAddress(at)).ok().map(u16::from_le)
    }

    /// Takes the next available chain (direct or indirect), or `None`.
    pub fn pop(&mut self, mem: &GuestMemoryMmap) -> Option<Chain> {
        let r = self.rings;
        let avail = u16::from_le(mem.load(GuestAddress(r.avail_iova + 2), Ordering::Acquire).ok()?);
        if avail == self.last_avail {
            return None;
        }
        let slot = self.last_avail & (r.size - 1);
        let head = Self::r16(mem, r.avail_iova + 4 + 2 * u64::from(slot))?;
        self.last_avail = self.last_avail.wrapping_add(1);
        let mut chain = Chain { head, ..Default::default() };
        let (mut table, mut count, mut index) = (r.desc_iova, r.size, head);
        let mut ttl = usize::from(r.size) + 1;
        loop {
            if index >= count || ttl == 0 {
                panic!("driver wrote a broken chain at head {head}");
            }
            ttl -= 1;
            let at = table + 16 * u64::from(index);
            let addr = u64::from_le(mem.read_obj(GuestAddress(at)).ok()?);
            let len = u32::from_le(mem.read_obj(GuestAddress(at + 8)).ok()?);
            let flags = Self::r16(mem, at + 12)?;
            let next = Self::r16(mem, at + 14)?;
            if flags & 4 != 0 {
                (table, count, index) = (addr, (len / 16) as u16, 0);
                ttl = usize::from(count) + 1;
                continue;
            }
            if flags & 2 != 0 {
                chain.writable.push((addr, len));
            } else {
                // virtio 1.2, 2.7.4.2: device-writable descriptors come after every readable one.
                assert!(
                    chain.writable.is_empty(),
                    "driver put a readable descriptor after a writable one at head {head}"
                );
                chain.readable.push((addr, len));
            }
            if flags & 1 == 0 {
                return Some(chain);
            }
            index = next;
        }
    }

    /// Puts a used entry and publishes it.
    pub fn complete(&mut self, mem: &GuestMemoryMmap, id: u32, len: u32) {
        let r = self.rings;
        let at = r.used_iova + 4 + 8 * u64::from(self.used_idx & (r.size - 1));
        mem.write_obj(id.to_le(), GuestAddress(at)).expect("used ring");
        mem.write_obj(len.to_le(), GuestAddress(at + 4)).expect("used ring");
        self.used_idx = self.used_idx.wrapping_add(1);
        mem.store(self.used_idx.to_le(), GuestAddress(r.used_iova + 2), Ordering::Release)
            .expect("used ring");
    }
}
