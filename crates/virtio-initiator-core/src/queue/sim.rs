//! A device side for tests: reads and writes the rings through the pool's IOVA translation
//! (vm-memory), as a backend holding the same memory would. It also lets tests write
//! arbitrary, hostile used entries.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use super::RingAddrs;

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Chain {
    pub head: u16,
    pub readable: Vec<(u64, u32)>,
    pub writable: Vec<(u64, u32)>,
    pub indirect: bool,
}

impl Chain {
    pub fn writable_len(&self) -> u32 {
        self.writable.iter().map(|w| w.1).sum()
    }
}

pub(crate) struct SimDevice<'a> {
    mem: &'a GuestMemoryMmap,
    addrs: RingAddrs,
    size: u16,
    pub last_avail: u16,
    pub used_idx: u16,
}

impl<'a> SimDevice<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, addrs: RingAddrs, size: u16) -> Self {
        SimDevice { mem, addrs, size, last_avail: 0, used_idx: 0 }
    }

    fn r16(&self, addr: u64) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(addr)).unwrap())
    }

    fn w16(&self, addr: u64, v: u16) {
        self.mem.write_obj(v.to_le(), GuestAddress(addr)).unwrap()
    }

    pub fn avail_idx(&self) -> u16 {
        u16::from_le(self.mem.load(GuestAddress(self.addrs.avail + 2), Ordering::Acquire).unwrap())
    }

    pub fn avail_flags(&self) -> u16 {
        self.r16(self.addrs.avail)
    }

    pub fn used_event(&self) -> u16 {
        self.r16(self.addrs.avail + 4 + 2 * self.size as u64)
    }

    pub fn set_used_flags(&self, flags: u16) {
        self.w16(self.addrs.used, flags)
    }

    pub fn set_avail_event(&self, v: u16) {
        self.w16(self.addrs.used + 4 + 8 * self.size as u64, v)
    }

    fn desc(&self, at: u64) -> (u64, u32, u16, u16) {
        let addr: u64 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 8)).unwrap();
        (u64::from_le(addr), u32::from_le(len), self.r16(at + 12), self.r16(at + 14))
    }

    /// Takes the next available chain, following direct and indirect descriptors.
    pub fn pop(&mut self) -> Option<Chain> {
        if self.last_avail == self.avail_idx() {
            return None;
        }
        let slot = self.last_avail % self.size;
        let head = self.r16(self.addrs.avail + 4 + 2 * slot as u64);
        self.last_avail = self.last_avail.wrapping_add(1);
        let mut chain = Chain { head, ..Default::default() };
        let (mut table, mut count, mut index) = (self.addrs.desc, self.size, head);
        let mut ttl = self.size as usize;
        loop {
            assert!(index < count, "descriptor index {index} out of table of {count}");
            let (addr, len, flags, next) = self.desc(table + 16 * index as u64);
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                assert!(!chain.indirect && chain.readable.is_empty() && chain.writable.is_empty());
                assert_eq!(len % 16, 0);
                assert_eq!(flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE), 0);
                chain.indirect = true;
                (table, count, index) = (addr, (len / 16) as u16, 0);
                ttl = count as usize;
                continue;
            }
            if flags & VIRTQ_DESC_F_WRITE != 0 {
                chain.writable.push((addr, len));
            } else {
                assert!(chain.writable.is_empty(), "readable descriptor after a writable one");
                chain.readable.push((addr, len));
            }
            ttl -= 1;
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                return Some(chain);
            }
            assert!(ttl > 0, "descriptor chain loops");
            index = next;
        }
    }

    pub fn read(&self, addr: u64, len: u32) -> Vec<u8> {
        let mut v = vec![0; len as usize];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap()
    }

    /// Writes a used entry (honest or not) without publishing it.
    pub fn put_used(&mut self, id: u32, len: u32) {
        let at = self.addrs.used + 4 + 8 * (self.used_idx % self.size) as u64;
        self.mem.write_obj(id.to_le(), GuestAddress(at)).unwrap();
        self.mem.write_obj(len.to_le(), GuestAddress(at + 4)).unwrap();
        self.used_idx = self.used_idx.wrapping_add(1);
    }

    /// Publishes used entries written so far.
    pub fn publish_used(&self) {
        self.set_used_idx(self.used_idx);
    }

    pub fn set_used_idx(&self, idx: u16) {
        self.mem.store(idx.to_le(), GuestAddress(self.addrs.used + 2), Ordering::Release).unwrap();
    }

    pub fn complete_raw(&mut self, id: u32, len: u32) {
        self.put_used(id, len);
        self.publish_used();
    }

    pub fn complete(&mut self, id: u16, len: u32) {
        self.put_used(id as u32, len);
        self.publish_used();
    }
}
