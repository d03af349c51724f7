//! `used-ring`: the driver-side split queue against a device that writes whatever it likes into
//! the used ring (indices that jump, ids out of range or not in flight, duplicates, huge
//! lengths) and scribbles over the rest of the ring memory.
//!
//! A model of the queue, kept from what the driver wrote (heads and chains as read back from
//! the descriptor table right after each add), predicts the outcome of every call: which
//! completion `pop_used` returns, or which device bug it reports. Any difference is a failure.

use std::sync::atomic::Ordering;

use virtio_initiator_core::memory::{DmaPool, HugePages, PoolConfig};
use virtio_initiator_core::queue::{
    DeviceBug, QueueError, QueueFeatures, RingAddrs, Segment, SplitQueue, VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::Target;
use crate::input::{Input, Seed};
use crate::stats::hit;

/// Operations per execution, and pops per pop operation.
const MAX_OPS: usize = 96;
const MAX_POPS: usize = 8;

/// What the model knows of one descriptor of the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
enum St {
    Free,
    Head { token: u64, descs: u16, writable: u64, published: bool, chain: Vec<u16> },
    Member { head: u16 },
}

/// What `pop_used` must return.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Broken,
    Nothing,
    Done { token: u64, len: u32, head: u16 },
    Bug(DeviceBug),
}

struct Model {
    size: u16,
    indirect: bool,
    max_segments: u16,
    clamp: bool,
    state: Vec<St>,
    num_free: u16,
    next_avail: u16,
    published_idx: u16,
    pending: Vec<u16>,
    published_in_flight: u16,
    last_used: u16,
    broken: bool,
    next_token: u64,
}

impl Model {
    fn new(size: u16, f: &QueueFeatures, clamp: bool) -> Self {
        let max_segments = if f.indirect { f.max_segments } else { f.max_segments.min(size) };
        Model {
            size,
            indirect: f.indirect,
            max_segments,
            clamp,
            state: vec![St::Free; size as usize],
            num_free: size,
            next_avail: 0,
            published_idx: 0,
            pending: Vec::new(),
            published_in_flight: 0,
            last_used: 0,
            broken: false,
            next_token: 0,
        }
    }

    fn reset(&mut self) -> Vec<u64> {
        let mut tokens: Vec<u64> = self
            .state
            .iter()
            .filter_map(|s| match s {
                St::Head { token, .. } => Some(*token),
                _ => None,
            })
            .collect();
        tokens.sort_unstable();
        let fresh =
            Model { next_token: self.next_token, ..Model::new(self.size, &self.features(), self.clamp) };
        *self = fresh;
        tokens
    }

    fn features(&self) -> QueueFeatures {
        QueueFeatures { event_idx: false, indirect: self.indirect, max_segments: self.max_segments }
    }

    fn published_heads(&self) -> Vec<u16> {
        (0..self.size)
            .filter(|&i| matches!(self.state[i as usize], St::Head { published: true, .. }))
            .collect()
    }

    fn members(&self) -> Vec<u16> {
        (0..self.size).filter(|&i| matches!(self.state[i as usize], St::Member { .. })).collect()
    }

    fn check(&self, q: &SplitQueue) {
        assert_eq!(q.is_broken(), self.broken, "broken flag");
        assert_eq!(q.in_flight(), self.published_in_flight + self.pending.len() as u16, "in flight");
        assert_eq!(q.free_slots(), self.num_free, "free descriptors");
        assert_eq!(q.last_used_idx(), self.last_used, "last used index");
        assert_eq!(q.avail_idx(), self.published_idx, "published avail index");
    }
}

/// The device's view of the ring memory.
struct Ring<'a> {
    mem: &'a GuestMemoryMmap,
    a: RingAddrs,
    size: u16,
}

impl Ring<'_> {
    fn r16(&self, at: u64) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(at)).expect("ring memory"))
    }
    fn r32(&self, at: u64) -> u32 {
        u32::from_le(self.mem.read_obj(GuestAddress(at)).expect("ring memory"))
    }
    fn r64(&self, at: u64) -> u64 {
        u64::from_le(self.mem.read_obj(GuestAddress(at)).expect("ring memory"))
    }
    fn w16(&self, at: u64, v: u16) {
        self.mem.write_obj(v.to_le(), GuestAddress(at)).expect("ring memory")
    }
    fn w32(&self, at: u64, v: u32) {
        self.mem.write_obj(v.to_le(), GuestAddress(at)).expect("ring memory")
    }
    fn desc(&self, table: u64, i: u16) -> (u64, u32, u16, u16) {
        let at = table + 16 * u64::from(i);
        (self.r64(at), self.r32(at + 8), self.r16(at + 12), self.r16(at + 14))
    }
    fn avail_entry(&self, slot: u16) -> u16 {
        self.r16(self.a.avail + 4 + 2 * u64::from(slot & (self.size - 1)))
    }
    fn avail_idx(&self) -> u16 {
        self.r16(self.a.avail + 2)
    }
    fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.load(GuestAddress(self.a.used + 2), Ordering::Acquire).expect("ring memory"))
    }
    fn set_used_idx(&self, v: u16) {
        self.mem.store(v.to_le(), GuestAddress(self.a.used + 2), Ordering::Release).expect("ring memory")
    }
    fn used_elem_at(&self, slot: u16) -> u64 {
        self.a.used + 4 + 8 * u64::from(slot & (self.size - 1))
    }
    /// Bytes from the descriptor table to the end of the used ring (avail_event included).
    fn span(&self) -> u64 {
        self.a.used + 4 + 8 * u64::from(self.size) + 2 - self.a.desc
    }
}

pub struct UsedRing {
    pool: DmaPool,
}

impl UsedRing {
    pub fn new() -> Self {
        let pool = DmaPool::new(PoolConfig::new(8 << 20).hugepages(HugePages::Never)).expect("DMA pool");
        UsedRing { pool }
    }
}

/// Reads one segment: a length (zero sometimes, to exercise the check) and an address.
fn segment(inp: &mut Input) -> Segment {
    let len = match inp.u8() % 8 {
        0 => 0,
        1 => inp.u32(),
        _ => u32::from(inp.u16()),
    };
    Segment::new(inp.u64(), len)
}

fn add(q: &mut SplitQueue, m: &mut Model, ring: &Ring, inp: &mut Input) {
    let ctl = inp.u8();
    let (nr, nw) = (usize::from(ctl & 7) % 5, usize::from(ctl >> 3 & 7) % 5);
    let readable: Vec<Segment> = (0..nr).map(|_| segment(inp)).collect();
    let writable: Vec<Segment> = (0..nw).map(|_| segment(inp)).collect();
    let token = m.next_token;
    m.next_token += 1;
    let result = q.add(&readable, &writable, token);

    let total = nr + nw;
    let zero = readable.iter().chain(&writable).position(|s| s.len == 0);
    let needed = if m.indirect && total > 1 { 1 } else { total as u16 };
    match result {
        Err(QueueError::Broken) => assert!(m.broken, "Broken from a working queue"),
        Err(QueueError::EmptyChain) => assert!(!m.broken && total == 0),
        Err(QueueError::TooManySegments { segments, max }) => {
            assert!(
                !m.broken && total > 0 && segments == total && max == m.max_segments && total > max as usize
            )
        }
        Err(QueueError::ZeroLengthSegment { index }) => {
            assert!(!m.broken && total > 0 && total <= m.max_segments as usize && zero == Some(index))
        }
        Err(QueueError::Full) => {
            assert!(!m.broken && total > 0 && total <= m.max_segments as usize && zero.is_none());
            assert!(needed > m.num_free, "Full with {} free for {needed}", m.num_free);
        }
        Err(e) => panic!("unexpected add error {e}"),
        Ok(()) => {
            hit(if needed == 1 && total > 1 { "add: indirect" } else { "add: direct" });
            assert!(!m.broken && total > 0 && total <= m.max_segments as usize && zero.is_none());
            assert!(needed <= m.num_free);
            // What the driver wrote, read back as a device would.
            let head = ring.avail_entry(m.next_avail);
            assert!(head < m.size, "head {head} out of range");
            assert_eq!(m.state[head as usize], St::Free, "head {head} was not free");
            let segs: Vec<(Segment, u16)> = readable
                .iter()
                .map(|s| (*s, 0))
                .chain(writable.iter().map(|s| (*s, VIRTQ_DESC_F_WRITE)))
                .collect();
            let check = |d: (u64, u32, u16, u16), i: usize, indirect_table: bool| {
                let (seg, wflag) = segs[i];
                let last = i + 1 == total;
                let flags = if last { wflag } else { wflag | VIRTQ_DESC_F_NEXT };
                assert_eq!((d.0, d.1, d.2), (seg.iova, seg.len, flags), "descriptor {i} as written");
                if indirect_table && !last {
                    assert_eq!(d.3 as usize, i + 1, "indirect table links in order");
                }
            };
            let mut chain = vec![head];
            let d = ring.desc(ring.a.desc, head);
            if needed == 1 && total > 1 {
                assert_eq!((d.1 as usize, d.2), (total * 16, VIRTQ_DESC_F_INDIRECT), "indirect descriptor");
                for i in 0..total {
                    check(ring.desc(d.0, i as u16), i, true);
                }
            } else {
                let mut idx = head;
                for i in 0..total {
                    let d = ring.desc(ring.a.desc, idx);
                    check(d, i, false);
                    if i > 0 {
                        assert!(idx < m.size && m.state[idx as usize] == St::Free, "chain reuses {idx}");
                        assert!(!chain.contains(&idx), "chain loops at {idx}");
                        chain.push(idx);
                    }
                    idx = d.3;
                }
            }
            for &i in &chain[1..] {
                m.state[i as usize] = St::Member { head };
            }
            let writable_bytes = writable.iter().map(|s| u64::from(s.len)).sum();
            m.state[head as usize] =
                St::Head { token, descs: needed, writable: writable_bytes, published: false, chain };
            m.num_free -= needed;
            m.next_avail = m.next_avail.wrapping_add(1);
            m.pending.push(head);
        }
    }
}

fn publish(q: &mut SplitQueue, m: &mut Model, ring: &Ring) {
    let kick = q.publish();
    if m.broken || m.pending.is_empty() {
        assert!(!kick, "a publish of nothing asked for a kick");
        return;
    }
    m.published_in_flight += m.pending.len() as u16;
    for h in m.pending.drain(..) {
        match &mut m.state[h as usize] {
            St::Head { published, .. } => *published = true,
            s => panic!("pending head {h} is {s:?}"),
        }
    }
    m.published_idx = m.next_avail;
    assert_eq!(ring.avail_idx(), m.next_avail, "avail index published");
}

/// What `pop_used` must do, from the model and the ring as the device left it.
fn expect_pop(m: &Model, ring: &Ring) -> Expect {
    if m.broken {
        return Expect::Broken;
    }
    let used_idx = ring.used_idx();
    if used_idx == m.last_used {
        return Expect::Nothing;
    }
    let ready = used_idx.wrapping_sub(m.last_used);
    if ready > m.published_in_flight {
        return Expect::Bug(DeviceBug::UsedIndexJump {
            last_used: m.last_used,
            used_idx,
            in_flight: m.published_in_flight,
        });
    }
    let elem = ring.used_elem_at(m.last_used);
    let (id, len) = (ring.r32(elem), ring.r32(elem + 4));
    if id >= u32::from(m.size) {
        return Expect::Bug(DeviceBug::IdOutOfRange { id, size: m.size });
    }
    match &m.state[id as usize] {
        St::Head { token, writable, published: true, .. } => {
            if u64::from(len) > *writable {
                if m.clamp {
                    Expect::Done { token: *token, len: *writable as u32, head: id as u16 }
                } else {
                    Expect::Bug(DeviceBug::LengthTooLarge { id, len, writable: *writable })
                }
            } else {
                Expect::Done { token: *token, len, head: id as u16 }
            }
        }
        St::Head { published: false, .. } => Expect::Bug(DeviceBug::NotPublished { id }),
        St::Member { head } => Expect::Bug(DeviceBug::NotAHead { id, head: *head }),
        St::Free => Expect::Bug(DeviceBug::NotInFlight { id }),
    }
}

fn pop(q: &mut SplitQueue, m: &mut Model, ring: &Ring) -> bool {
    let want = expect_pop(m, ring);
    let got = q.pop_used();
    match (&want, got) {
        (Expect::Broken, Err(QueueError::Broken)) | (Expect::Nothing, Ok(None)) => {
            hit(if m.broken { "pop: broken" } else { "pop: nothing" });
            false
        }
        (Expect::Done { token, len, head }, Ok(Some(c))) => {
            assert_eq!((c.token, c.len), (*token, *len), "completion");
            hit("pop: completion");
            let St::Head { descs, chain, .. } = std::mem::replace(&mut m.state[*head as usize], St::Free)
            else {
                unreachable!()
            };
            for &i in &chain[1..] {
                m.state[i as usize] = St::Free;
            }
            m.num_free += descs;
            m.published_in_flight -= 1;
            m.last_used = m.last_used.wrapping_add(1);
            true
        }
        (Expect::Bug(bug), Err(QueueError::DeviceBug(got))) => {
            assert_eq!(*bug, got, "device bug classified");
            hit(match got {
                DeviceBug::IdOutOfRange { .. } => "bug: id out of range",
                DeviceBug::NotInFlight { .. } => "bug: not in flight",
                DeviceBug::NotAHead { .. } => "bug: not a head",
                DeviceBug::NotPublished { .. } => "bug: not published",
                DeviceBug::LengthTooLarge { .. } => "bug: length too large",
                DeviceBug::UsedIndexJump { .. } => "bug: used index jump",
            });
            m.broken = true;
            false
        }
        (_, got) => panic!("pop_used returned {got:?}, expected {want:?}"),
    }
}

impl Target for UsedRing {
    fn seeds(&self) -> Vec<Vec<u8>> {
        // size 16 (1 << 4), then a feature byte, then max_segments - 1.
        let add = |s: Seed, nr: u8, nw: u8, len: u16| {
            let mut s = s.u8(0).u8(nr | nw << 3);
            for i in 0..(nr + nw) {
                s = s.u8(2).u16(len).u64(0x1_0000_0000 + u64::from(i) * 0x1000);
            }
            s
        };
        let publish = |s: Seed| s.u8(2);
        let honest = |s: Seed, pick: u8, lenmode: u8, raw: u32| s.u8(3).u8(pick).u8(lenmode).u32(raw);
        let pops = |s: Seed, n: u8| s.u8(6).u8(n);
        let mut seeds = Vec::new();
        for features in [0u8, 1, 2, 3, 4, 7] {
            // Three requests, published, completed honestly out of order, popped.
            let mut s = Seed::new().u8(4).u8(features).u8(3);
            for nw in [1u8, 2, 1] {
                s = add(s, 1, nw, 512);
            }
            s = publish(s);
            s = honest(s, 2, 0, 0);
            s = honest(s, 0, 1, 0);
            s = pops(s, 3);
            s = honest(s, 0, 2, 100);
            s = pops(s, 2);
            seeds.push(s.build());
        }
        // Hostile: a used entry with an id out of range, an index jump, a huge length.
        let base = |f: u8| {
            let s = Seed::new().u8(3).u8(f).u8(3);
            let s = add(add(s, 1, 1, 64), 1, 1, 64);
            publish(s)
        };
        seeds.push(pops(base(0).u8(4).u8(0).u32(1000).u32(8), 1).build());
        seeds.push(pops(base(0).u8(5).u16(9).u8(0), 1).build());
        seeds.push(pops(honest(base(0), 0, 3, u32::MAX), 1).build());
        seeds.push(pops(honest(base(4), 0, 3, u32::MAX), 1).build());
        // Duplicate completion of the same head; then a reset.
        seeds.push(pops(honest(honest(base(1), 0, 0, 0), 0, 0, 0), 4).u8(7).u8(0).build());
        seeds
    }

    fn run(&mut self, data: &[u8]) {
        let mut inp = Input::new(data);
        let size = 1u16 << (inp.u8() % 11);
        let flags = inp.u8();
        let features = QueueFeatures {
            event_idx: flags & 1 != 0,
            indirect: flags & 2 != 0,
            max_segments: 1 + u16::from(inp.u8() % 16),
        };
        let clamp = flags & 4 != 0;
        let mut q = SplitQueue::from_pool(&self.pool, size, features).expect("a queue in a fresh pool");
        q.clamp_used_len(clamp);
        let ring = Ring { mem: self.pool.memory(), a: q.addrs(), size };
        let mut m = Model::new(size, &features, clamp);
        // The device's next used slot.
        let mut dev_used: u16 = 0;

        for _ in 0..MAX_OPS {
            if inp.is_empty() {
                break;
            }
            match inp.u8() % 10 {
                0 | 1 => add(&mut q, &mut m, &ring, &mut inp),
                2 => publish(&mut q, &mut m, &ring),
                3 => {
                    // A completion of something in flight (possibly one already completed).
                    let heads = m.published_heads();
                    let (pick, mode, raw) = (inp.u8(), inp.u8(), inp.u32());
                    if let Some(&h) = heads.get(usize::from(pick) % heads.len().max(1)) {
                        let St::Head { writable, .. } = m.state[h as usize] else { unreachable!() };
                        let len = match mode % 4 {
                            0 => writable.min(u64::from(u32::MAX)) as u32,
                            1 => 0,
                            2 => (u64::from(raw) % (writable + 1)) as u32,
                            _ => raw,
                        };
                        let at = ring.used_elem_at(dev_used);
                        ring.w32(at, u32::from(h));
                        ring.w32(at + 4, len);
                        dev_used = dev_used.wrapping_add(1);
                        ring.set_used_idx(dev_used);
                    }
                }
                4 => {
                    // A hostile used entry: any id, any length, any slot.
                    let kind = inp.u8();
                    let id = match kind % 6 {
                        0 => inp.u32(),
                        1 => u32::from(size) + u32::from(inp.u8()),
                        2 => u32::MAX - u32::from(inp.u8()),
                        3 => m.members().first().map_or(0, |&i| u32::from(i)),
                        4 => u32::from(inp.u16()) % u32::from(size),
                        _ => m.pending.first().map_or(0, |&h| u32::from(h)),
                    };
                    let len = inp.u32();
                    let slot = if kind & 0x40 != 0 { inp.u16() } else { dev_used };
                    let at = ring.used_elem_at(slot);
                    ring.w32(at, id);
                    ring.w32(at + 4, len);
                    if kind & 0x80 == 0 {
                        dev_used = dev_used.wrapping_add(1);
                        ring.set_used_idx(dev_used);
                    }
                }
                5 => {
                    // The used index moves anywhere.
                    let v = inp.u16();
                    dev_used = match inp.u8() % 3 {
                        0 => v,
                        1 => m.last_used.wrapping_add(v % 8),
                        _ => m.last_used.wrapping_sub(v % 8),
                    };
                    ring.set_used_idx(dev_used);
                }
                6 => {
                    for _ in 0..=(inp.u8() as usize % MAX_POPS) {
                        if !pop(&mut q, &mut m, &ring) {
                            break;
                        }
                    }
                }
                7 => match inp.u8() % 4 {
                    0 => {
                        let mut got = q.reset();
                        got.sort_unstable();
                        assert_eq!(got, m.reset(), "tokens returned by reset");
                        dev_used = 0;
                        assert_eq!(ring.used_idx(), 0, "reset zeroes the rings");
                    }
                    1 => {
                        let waiting = q.enable_interrupts();
                        assert_eq!(waiting, !m.broken && ring.used_idx() != m.last_used, "enable_interrupts");
                    }
                    2 => q.disable_interrupts(),
                    _ => assert_eq!(q.has_used(), !m.broken && ring.used_idx() != m.last_used, "has_used"),
                },
                8 => {
                    // Scribbles anywhere in the rings: the driver must not trust any of it.
                    let off = (u64::from(inp.u32()) % (ring.span() - 2)) & !1;
                    ring.w16(ring.a.desc + off, inp.u16());
                }
                _ => {
                    // Scribbles on the used ring header and avail_event (flags, suppression).
                    let which = inp.u8() % 2;
                    let at = if which == 0 { ring.a.used } else { ring.a.used + 4 + 8 * u64::from(size) };
                    ring.w16(at, inp.u16());
                }
            }
            m.check(&q);
        }
        // Whatever the device did, the driver's own view stays consistent to the end.
        for _ in 0..usize::from(size) + 2 {
            if !pop(&mut q, &mut m, &ring) {
                break;
            }
            m.check(&q);
        }
    }
}
