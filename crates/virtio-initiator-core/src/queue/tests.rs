use super::sim::{Chain, SimDevice};
use super::*;
use crate::memory::{Arena, DmaPool, HugePages, PoolConfig};

const MIB: u64 = 1 << 20;

fn pool() -> DmaPool {
    DmaPool::new(PoolConfig::new(8 * MIB).hugepages(HugePages::Never)).unwrap()
}

fn features(event_idx: bool, indirect: bool) -> QueueFeatures {
    QueueFeatures { event_idx, indirect, ..Default::default() }
}

fn seg(buf: &DmaBuf) -> Segment {
    Segment::try_from(buf).unwrap()
}

/// Distinct bytes for a (token, offset) pair.
fn fill_for(token: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (token as usize).wrapping_mul(31).wrapping_add(i * 7) as u8).collect()
}

#[test]
fn rings_are_placed_with_the_spec_alignments() {
    let pool = pool();
    for size in [1u16, 2, 64, 256, 1024] {
        let q = SplitQueue::from_pool(&pool, size, QueueFeatures::default()).unwrap();
        let a = q.addrs();
        assert_eq!(a.desc % 16, 0);
        assert_eq!(a.avail % 2, 0);
        assert_eq!(a.used % 4, 0);
        assert!(a.avail >= a.desc + 16 * size as u64);
        assert!(a.used >= a.avail + 6 + 2 * size as u64);
        assert!(pool.translate(a.used, 6 + 8 * size as usize).is_ok());
        assert_eq!(q.free_slots(), size);
    }
}

#[test]
fn invalid_parameters_are_errors() {
    let pool = pool();
    for size in [0u16, 3, 12, 2048] {
        assert!(matches!(
            SplitQueue::from_pool(&pool, size, QueueFeatures::default()),
            Err(QueueError::InvalidSize(s)) if s == size
        ));
    }
    for max_segments in [0u16, 1025] {
        let f = QueueFeatures { max_segments, ..Default::default() };
        assert!(matches!(SplitQueue::from_pool(&pool, 8, f), Err(QueueError::InvalidMaxSegments(_))));
    }
    let mut q = SplitQueue::from_pool(&pool, 8, QueueFeatures::default()).unwrap();
    assert!(matches!(q.add(&[], &[], 1), Err(QueueError::EmptyChain)));
    let s = Segment::new(0x1_0000_0000, 16);
    let z = Segment::new(0x1_0000_0000, 0);
    assert!(matches!(q.add(&[s], &[s, z], 1), Err(QueueError::ZeroLengthSegment { index: 2 })));
    assert_eq!(q.free_slots(), 8, "a refused request takes nothing");

    let buf = pool.alloc_shared(100).unwrap();
    assert!(matches!(Segment::within(&buf, 90, 11), Err(QueueError::SegmentOutOfBuffer { .. })));
    assert!(matches!(Segment::within(&buf, usize::MAX, 2), Err(QueueError::SegmentOutOfBuffer { .. })));
    assert_eq!(Segment::within(&buf, 10, 20).unwrap(), Segment::new(buf.iova() + 10, 20));

    // A pool too small for the rings is a memory error, not a panic.
    let tiny = DmaPool::new(PoolConfig::new(4096).hugepages(HugePages::Never)).unwrap();
    assert!(matches!(
        SplitQueue::from_pool(&tiny, 1024, features(false, true)),
        Err(QueueError::Memory(crate::MemoryError::Exhausted { .. }))
    ));
}

/// Device side of a request: check the readable bytes, answer into the writable ones.
fn serve(dev: &mut SimDevice, chain: &Chain, expect: &[u8], reply: &[u8]) -> u32 {
    let mut got = Vec::new();
    for &(addr, len) in &chain.readable {
        got.extend(dev.read(addr, len));
    }
    assert_eq!(got, expect, "device read what the driver wrote");
    let mut rest = reply;
    let mut written = 0;
    for &(addr, len) in &chain.writable {
        let n = rest.len().min(len as usize);
        dev.write(addr, &rest[..n]);
        rest = &rest[n..];
        written += n as u32;
    }
    written
}

#[test]
fn batched_round_trip_with_out_of_order_completion() {
    let pool = pool();
    let mut arena: Arena = pool.carve(MIB).unwrap();
    let mut q = SplitQueue::new(&mut arena, 16, QueueFeatures::default()).unwrap();
    let mut dev = SimDevice::new(pool.memory(), q.addrs(), 16);

    let mut reqs = Vec::new();
    for token in 0..8u64 {
        let mut out = arena.alloc(64, 16).unwrap();
        out.write_at(0, &fill_for(token, 64)).unwrap();
        let mut input = arena.alloc(512, 512).unwrap();
        input.fill(0);
        q.add(&[seg(&out)], &[seg(&input)], 100 + token).unwrap();
        reqs.push((out, input));
    }
    assert_eq!(q.in_flight(), 8);
    assert!(dev.pop().is_none(), "nothing visible before publish");
    assert!(q.publish(), "device asked for notifications");
    assert!(!q.publish(), "nothing new to publish");

    let mut chains: Vec<Chain> = std::iter::from_fn(|| dev.pop()).collect();
    assert_eq!(chains.len(), 8);
    chains.reverse();
    for chain in &chains {
        let token = (chains.len() - 1 - chains.iter().position(|c| c == chain).unwrap()) as u64;
        let reply = fill_for(1000 + token, 200 + token as usize);
        let n = serve(&mut dev, chain, &fill_for(token, 64), &reply);
        dev.complete(chain.head, n);
    }
    let mut seen = Vec::new();
    while let Some(c) = q.pop_used().unwrap() {
        let token = c.token - 100;
        assert_eq!(c.len as usize, 200 + token as usize);
        let (_, input) = &reqs[token as usize];
        assert_eq!(&input.as_slice()[..c.len as usize], &fill_for(1000 + token, c.len as usize)[..]);
        assert!(input.as_slice()[c.len as usize..].iter().all(|&b| b == 0));
        seen.push(c.token);
    }
    assert_eq!(seen, (100..108).rev().collect::<Vec<_>>());
    assert_eq!(q.in_flight(), 0);
    assert_eq!(q.free_slots(), 16);
    for (out, input) in reqs {
        arena.free(out).unwrap();
        arena.free(input).unwrap();
    }
}

/// Runs more than 2^16 requests through a small ring so every 16-bit index wraps, checking
/// data and tokens all along. With EVENT_IDX and interrupts off, also checks that the
/// device would never have raised an interrupt.
fn wrap_around(features: QueueFeatures) {
    let pool = pool();
    let size = 4u16;
    let mut q = SplitQueue::from_pool(&pool, size, features).unwrap();
    let mut dev = SimDevice::new(pool.memory(), q.addrs(), size);
    let mut bufs: Vec<(DmaBuf, DmaBuf)> =
        (0..size).map(|_| (pool.alloc_shared(8).unwrap(), pool.alloc_shared(16).unwrap())).collect();
    let total = 70_000u64;
    let (mut next_token, mut done) = (0u64, 0u64);
    let mut kicks = 0;
    while done < total {
        while next_token < total {
            if q.in_flight() == size {
                break; // the next buffer pair is still in use
            }
            let (out, input) = &mut bufs[(next_token % size as u64) as usize];
            out.write_at(0, &next_token.to_le_bytes()).unwrap();
            // Two writable segments: 8 + 8 bytes of one buffer.
            let w = [Segment::within(input, 0, 8).unwrap(), Segment::within(input, 8, 8).unwrap()];
            match q.add(&[seg(out)], &w, next_token) {
                Ok(()) => next_token += 1,
                Err(QueueError::Full) => break,
                Err(e) => panic!("{e}"),
            }
        }
        if features.event_idx {
            dev.set_avail_event(dev.last_avail);
        }
        if q.publish() {
            kicks += 1;
        }
        while let Some(chain) = dev.pop() {
            assert_eq!(chain.indirect, features.indirect);
            let token = u64::from_le_bytes(dev.read(chain.readable[0].0, 8).try_into().unwrap());
            dev.write(chain.writable[0].0, &(!token).to_le_bytes());
            dev.write(chain.writable[1].0, &token.wrapping_mul(3).to_le_bytes());
            let old = dev.used_idx;
            dev.complete(chain.head, 16);
            if features.event_idx {
                let irq = vring_need_event(dev.used_event(), dev.used_idx, old);
                assert!(!irq, "interrupt requested while disabled, at used index {}", dev.used_idx);
            }
        }
        while let Some(c) = q.pop_used().unwrap() {
            assert_eq!(c.token, done, "completions in order");
            assert_eq!(c.len, 16);
            let input = &bufs[(done % size as u64) as usize].1;
            let mut v = [0u8; 16];
            input.read_at(0, &mut v).unwrap();
            assert_eq!(u64::from_le_bytes(v[..8].try_into().unwrap()), !done);
            assert_eq!(u64::from_le_bytes(v[8..].try_into().unwrap()), done.wrapping_mul(3));
            done += 1;
        }
    }
    assert_eq!(q.last_used_idx(), (total % 65536) as u16);
    assert_eq!(q.avail_idx(), (total % 65536) as u16);
    assert_eq!(q.free_slots(), size);
    assert!(kicks > 0);
}

#[test]
fn indices_wrap_around_direct() {
    wrap_around(features(false, false));
}

#[test]
fn indices_wrap_around_indirect_event_idx() {
    wrap_around(features(true, true));
}

#[test]
fn full_ring_then_recovers() {
    let pool = pool();
    let buf = pool.alloc_shared(4096).unwrap();
    let s = Segment::within(&buf, 0, 512).unwrap();

    // Direct: descriptors run out.
    let mut q = SplitQueue::from_pool(&pool, 8, QueueFeatures::default()).unwrap();
    let mut dev = SimDevice::new(pool.memory(), q.addrs(), 8);
    q.add(&[s, s], &[s], 1).unwrap();
    q.add(&[s], &[s, s], 2).unwrap();
    assert_eq!(q.free_slots(), 2);
    assert!(matches!(q.add(&[s, s], &[s], 3), Err(QueueError::Full)));
    assert_eq!(q.free_slots(), 2, "a refused request takes nothing");
    q.add(&[s], &[s], 4).unwrap();
    assert!(matches!(q.add(&[s], &[], 5), Err(QueueError::Full)));
    assert_eq!(q.in_flight(), 3);
    q.publish();
    let first = dev.pop().unwrap();
    dev.complete(first.head, 0);
    assert_eq!(q.pop_used().unwrap(), Some(Completion { token: 1, len: 0 }));
    assert_eq!(q.free_slots(), 3);
    q.add(&[s, s], &[s], 3).unwrap();
    q.publish();
    let rest: Vec<_> = std::iter::from_fn(|| dev.pop()).collect();
    assert_eq!(rest.len(), 3);
    for c in &rest {
        dev.complete(c.head, 512);
    }
    let tokens: Vec<_> = std::iter::from_fn(|| q.pop_used().unwrap()).map(|c| c.token).collect();
    assert_eq!(tokens, [2, 4, 3]);
    assert_eq!(q.free_slots(), 8);

    // Indirect: every request takes one ring slot whatever its length.
    let mut q = SplitQueue::from_pool(&pool, 4, features(false, true)).unwrap();
    let mut dev = SimDevice::new(pool.memory(), q.addrs(), 4);
    for t in 0..4 {
        q.add(&[s; 3], &[s; 2], t).unwrap();
    }
    assert!(matches!(q.add(&[s], &[], 9), Err(QueueError::Full)));
    q.publish();
    let c = dev.pop().unwrap();
    assert!(c.indirect);
    dev.complete(c.head, 1024);
    assert_eq!(q.pop_used().unwrap(), Some(Completion { token: 0, len: 1024 }));
    q.add(&[s; 3], &[s; 2], 9).unwrap();
}

#[test]
fn long_chains_direct_and_indirect() {
    let pool = pool();
    let data = pool.alloc_shared(64 * 1024).unwrap();
    let segs: Vec<Segment> = (0..64).map(|i| Segment::within(&data, i * 1024, 1000).unwrap()).collect();

    for (indirect, size, r, w) in [(false, 64u16, 10usize, 20usize), (true, 8, 30, 34), (false, 32, 0, 32)] {
        let f = features(false, indirect);
        let mut q = SplitQueue::from_pool(&pool, size, f).unwrap();
        let mut dev = SimDevice::new(pool.memory(), q.addrs(), size);
        let (readable, writable) = (&segs[..r], &segs[r..r + w]);
        q.add(readable, writable, 77).unwrap();
        assert_eq!(q.free_slots(), if indirect { size - 1 } else { size - (r + w) as u16 });
        q.publish();
        let chain = dev.pop().unwrap();
        assert_eq!(chain.indirect, indirect);
        let as_pairs = |s: &[Segment]| s.iter().map(|s| (s.iova, s.len)).collect::<Vec<_>>();
        assert_eq!(chain.readable, as_pairs(readable), "readable segments in order");
        assert_eq!(chain.writable, as_pairs(writable), "writable segments in order");
        for (i, &(addr, len)) in chain.writable.iter().enumerate() {
            dev.write(addr, &vec![i as u8 + 1; len as usize]);
        }
        dev.complete(chain.head, chain.writable_len());
        let c = q.pop_used().unwrap().unwrap();
        assert_eq!(c, Completion { token: 77, len: 1000 * w as u32 });
        for (i, s) in writable.iter().enumerate() {
            let mut v = vec![0u8; s.len as usize];
            data.read_at((s.iova - data.iova()) as usize, &mut v).unwrap();
            assert!(v.iter().all(|&b| b == i as u8 + 1));
        }
        assert_eq!(q.free_slots(), size);
    }

    // Limits: the indirect table size, and the ring size without indirect.
    let mut q = SplitQueue::from_pool(&pool, 8, features(false, true)).unwrap();
    let many: Vec<Segment> = (0..65).map(|_| segs[0]).collect();
    assert!(matches!(q.add(&many, &[], 1), Err(QueueError::TooManySegments { segments: 65, max: 64 })));
    let mut q = SplitQueue::from_pool(&pool, 8, features(false, false)).unwrap();
    assert!(matches!(q.add(&many[..9], &[], 1), Err(QueueError::TooManySegments { segments: 9, max: 8 })));
    q.add(&many[..8], &[], 1).unwrap();

    // A single segment stays direct even with indirect negotiated.
    let mut q = SplitQueue::from_pool(&pool, 8, features(false, true)).unwrap();
    let mut dev = SimDevice::new(pool.memory(), q.addrs(), 8);
    q.add(&[], &[segs[0]], 5).unwrap();
    q.publish();
    assert!(!dev.pop().unwrap().indirect);
}

#[test]
fn notification_suppression_by_flag() {
    let pool = pool();
    let buf = pool.alloc_shared(64).unwrap();
    let mut q = SplitQueue::from_pool(&pool, 8, QueueFeatures::default()).unwrap();
    let dev = SimDevice::new(pool.memory(), q.addrs(), 8);
    q.add(&[seg(&buf)], &[], 1).unwrap();
    assert!(q.publish());
    dev.set_used_flags(VIRTQ_USED_F_NO_NOTIFY);
    q.add(&[seg(&buf)], &[], 2).unwrap();
    q.add(&[seg(&buf)], &[], 3).unwrap();
    assert!(!q.publish(), "device said NO_NOTIFY");
    dev.set_used_flags(0);
    q.add(&[seg(&buf)], &[], 4).unwrap();
    assert!(q.publish());
    assert_eq!(dev.avail_idx(), 4);
}

#[test]
fn notification_suppression_by_avail_event() {
    let pool = pool();
    let buf = pool.alloc_shared(64).unwrap();
    let mut q = SplitQueue::from_pool(&pool, 16, features(true, false)).unwrap();
    let dev = SimDevice::new(pool.memory(), q.addrs(), 16);
    let add = |q: &mut SplitQueue, n: u64| {
        for t in 0..n {
            q.add(&[seg(&buf)], &[], t).unwrap();
        }
    };
    // avail_event starts at 0: publishing index 0 -> 1 crosses it.
    add(&mut q, 1);
    assert!(q.publish());
    // Device: wake me when the entry at index 5 is published.
    dev.set_avail_event(5);
    add(&mut q, 2);
    assert!(!q.publish(), "1 -> 3 does not reach 5");
    add(&mut q, 2);
    assert!(!q.publish(), "3 -> 5 does not include 5");
    add(&mut q, 1);
    assert!(q.publish(), "5 -> 6 publishes entry 5");
    add(&mut q, 3);
    assert!(!q.publish(), "the device did not ask again");
    // The NO_NOTIFY flag means nothing with EVENT_IDX.
    dev.set_used_flags(VIRTQ_USED_F_NO_NOTIFY);
    dev.set_avail_event(9);
    add(&mut q, 1);
    assert!(q.publish());
}

#[test]
fn interrupt_suppression_both_modes() {
    let pool = pool();
    let buf = pool.alloc_shared(64).unwrap();

    // Flag mode.
    let mut q = SplitQueue::from_pool(&pool, 8, QueueFeatures::default()).unwrap();
    let mut dev = SimDevice::new(pool.memory(), q.addrs(), 8);
    assert_eq!(dev.avail_flags(), VIRTQ_AVAIL_F_NO_INTERRUPT, "polling by default");
    assert!(!q.enable_interrupts(), "nothing pending");
    assert_eq!(dev.avail_flags(), 0);
    q.add(&[], &[seg(&buf)], 1).unwrap();
    q.publish();
    q.disable_interrupts();
    assert_eq!(dev.avail_flags(), VIRTQ_AVAIL_F_NO_INTERRUPT);
    let c = dev.pop().unwrap();
    dev.complete(c.head, 4);
    assert!(q.enable_interrupts(), "a completion arrived while interrupts were off");
    assert!(q.pop_used().unwrap().is_some());

    // EVENT_IDX mode.
    let mut q = SplitQueue::from_pool(&pool, 8, features(true, false)).unwrap();
    let mut dev = SimDevice::new(pool.memory(), q.addrs(), 8);
    assert_eq!(dev.avail_flags(), 0, "flags stay 0 with EVENT_IDX");
    assert_eq!(dev.used_event(), 0xffff, "parked behind the next completion");
    assert!(!q.enable_interrupts());
    assert_eq!(dev.used_event(), 0);
    for t in 0..3 {
        q.add(&[], &[seg(&buf)], t).unwrap();
    }
    q.publish();
    for _ in 0..3 {
        let c = dev.pop().unwrap();
        let old = dev.used_idx;
        dev.complete(c.head, 1);
        let irq = vring_need_event(dev.used_event(), dev.used_idx, old);
        assert_eq!(irq, old == 0, "only the first completion interrupts until the driver pops");
    }
    assert!(q.pop_used().unwrap().is_some());
    assert_eq!(dev.used_event(), 1, "re-armed for the next completion");
    q.disable_interrupts();
    assert_eq!(dev.used_event(), 0, "parked one behind");
    assert_eq!(dev.avail_flags(), 0);
}

/// A queue with three requests in flight: tokens 10 (3 direct descriptors, 100 writable
/// bytes), 11 (1 descriptor, 8 writable), and 12 added but not published.
fn hostile_setup(pool: &DmaPool) -> (SplitQueue, Vec<Chain>) {
    let mut q = SplitQueue::from_pool(pool, 8, QueueFeatures::default()).unwrap();
    let mut dev = SimDevice::new(pool.memory(), q.addrs(), 8);
    let s = |iova_off: u64, len| Segment::new(pool.regions()[0].iova + iova_off, len);
    q.add(&[s(0, 16)], &[s(4096, 60), s(8192, 40)], 10).unwrap();
    q.add(&[], &[s(0, 8)], 11).unwrap();
    q.publish();
    q.add(&[s(0, 16)], &[], 12).unwrap();
    let chains = vec![dev.pop().unwrap(), dev.pop().unwrap()];
    assert!(dev.pop().is_none());
    (q, chains)
}

fn expect_bug(pool: &DmaPool, hostile: impl FnOnce(&mut SimDevice, &[Chain]), bug: DeviceBug) {
    let (mut q, chains) = hostile_setup(pool);
    let free = q.free_slots();
    let mut dev = SimDevice::new(pool.memory(), q.addrs(), 8);
    dev.last_avail = 2;
    hostile(&mut dev, &chains);
    match q.pop_used() {
        Err(QueueError::DeviceBug(b)) => assert_eq!(b, bug),
        other => panic!("expected {bug:?}, got {other:?}"),
    }
    assert!(q.is_broken());
    assert_eq!(q.free_slots(), free, "nothing was freed by the bad entry");
    assert!(matches!(q.pop_used(), Err(QueueError::Broken)));
    assert!(matches!(q.add(&[Segment::new(pool.regions()[0].iova, 1)], &[], 1), Err(QueueError::Broken)));
    assert!(!q.publish());

    // Reset hands back every request in flight and the queue works again.
    let mut tokens = q.reset();
    tokens.sort();
    assert_eq!(tokens, [10, 11, 12]);
    assert_eq!(q.free_slots(), 8);
    let mut dev = SimDevice::new(pool.memory(), q.addrs(), 8);
    q.add(&[], &[Segment::new(pool.regions()[0].iova, 4)], 99).unwrap();
    q.publish();
    let c = dev.pop().unwrap();
    dev.complete(c.head, 4);
    assert_eq!(q.pop_used().unwrap(), Some(Completion { token: 99, len: 4 }));
}

#[test]
fn hostile_used_entries_are_device_bugs() {
    let pool = pool();
    expect_bug(&pool, |d, _| d.complete(8, 0), DeviceBug::IdOutOfRange { id: 8, size: 8 });
    expect_bug(&pool, |d, _| d.complete_raw(u32::MAX, 0), DeviceBug::IdOutOfRange { id: u32::MAX, size: 8 });
    expect_bug(&pool, |d, _| d.complete_raw(0x1_0001, 0), DeviceBug::IdOutOfRange { id: 0x1_0001, size: 8 });
    // Descriptors 0-2 hold request 10, 3 request 11, 4 the unpublished 12; 5-7 are free.
    expect_bug(&pool, |d, _| d.complete(6, 0), DeviceBug::NotInFlight { id: 6 });
    expect_bug(&pool, |d, c| d.complete(c[0].head + 1, 0), DeviceBug::NotAHead { id: 1, head: 0 });
    expect_bug(&pool, |d, c| d.complete(c[0].head + 2, 0), DeviceBug::NotAHead { id: 2, head: 0 });
    expect_bug(&pool, |d, _| d.complete(4, 0), DeviceBug::NotPublished { id: 4 });
    expect_bug(
        &pool,
        |d, c| d.complete(c[0].head, 101),
        DeviceBug::LengthTooLarge { id: 0, len: 101, writable: 100 },
    );
    expect_bug(
        &pool,
        |d, c| d.complete(c[1].head, u32::MAX),
        DeviceBug::LengthTooLarge { id: 3, len: u32::MAX, writable: 8 },
    );
    // Used index far ahead (more than the ring size), just beyond what is in flight, and
    // backwards.
    expect_bug(
        &pool,
        |d, _| d.set_used_idx(8 + 3),
        DeviceBug::UsedIndexJump { last_used: 0, used_idx: 11, in_flight: 2 },
    );
    expect_bug(
        &pool,
        |d, _| d.set_used_idx(3),
        DeviceBug::UsedIndexJump { last_used: 0, used_idx: 3, in_flight: 2 },
    );
    expect_bug(
        &pool,
        |d, _| d.set_used_idx(0xffff),
        DeviceBug::UsedIndexJump { last_used: 0, used_idx: 0xffff, in_flight: 2 },
    );
}

#[test]
fn duplicate_completion_is_refused_without_double_free() {
    let pool = pool();
    let (mut q, chains) = hostile_setup(&pool);
    let mut dev = SimDevice::new(pool.memory(), q.addrs(), 8);
    dev.put_used(chains[1].head as u32, 8);
    dev.put_used(chains[1].head as u32, 8);
    dev.publish_used();
    assert_eq!(q.pop_used().unwrap(), Some(Completion { token: 11, len: 8 }));
    assert_eq!(q.free_slots(), 4);
    assert!(matches!(q.pop_used(), Err(QueueError::DeviceBug(DeviceBug::NotInFlight { id: 3 }))));
    assert_eq!(q.free_slots(), 4, "the descriptor was not freed twice");
    assert_eq!(q.reset(), vec![10, 12]);
}

#[test]
fn interop_with_rust_vmm_device_queue() {
    use virtio_queue::{Queue, QueueT};

    let pool = pool();
    let mem = pool.memory();
    let size = 32u16;
    for (event_idx, indirect) in [(false, false), (true, true), (true, false), (false, true)] {
        let mut q = SplitQueue::from_pool(&pool, size, features(event_idx, indirect)).unwrap();
        let a = q.addrs();
        let mut dq = Queue::new(size).unwrap();
        dq.set_size(size);
        dq.set_desc_table_address(Some(a.desc as u32), Some((a.desc >> 32) as u32));
        dq.set_avail_ring_address(Some(a.avail as u32), Some((a.avail >> 32) as u32));
        dq.set_used_ring_address(Some(a.used as u32), Some((a.used >> 32) as u32));
        dq.set_event_idx(event_idx);
        dq.set_ready(true);
        assert!(dq.is_valid(mem));

        let mut outs: Vec<DmaBuf> = (0..size).map(|_| pool.alloc_shared(48).unwrap()).collect();
        let mut ins: Vec<DmaBuf> = (0..size).map(|_| pool.alloc_shared(96).unwrap()).collect();
        let mut expected_len = std::collections::HashMap::new();
        let mut token = 0u64;
        for round in 0..40 {
            // The device wants a notification in even rounds only.
            if round % 2 == 0 {
                dq.enable_notification(mem).unwrap();
            } else {
                dq.disable_notification(mem).unwrap();
            }
            let batch = 1 + round % 8;
            for i in 0..batch {
                let slot = (token % size as u64) as usize;
                // Request: the token, then bytes derived from it.
                outs[slot].write_at(0, &token.to_le_bytes()).unwrap();
                outs[slot].write_at(8, &fill_for(token, 40)).unwrap();
                ins[slot].fill(0);
                let r = [
                    Segment::within(&outs[slot], 0, 16).unwrap(),
                    Segment::within(&outs[slot], 16, 32).unwrap(),
                ];
                let w = [
                    Segment::within(&ins[slot], 0, 40).unwrap(),
                    Segment::within(&ins[slot], 40, 56).unwrap(),
                ];
                let w = if i % 3 == 0 { &w[..1] } else { &w[..] };
                q.add(&r, w, token).unwrap();
                expected_len.insert(token, w.iter().map(|s| s.len).sum::<u32>());
                token += 1;
            }
            let kick = q.publish();
            if round % 2 == 0 {
                assert!(kick, "round {round}: device enabled notifications");
            } else if !event_idx {
                assert!(!kick, "round {round}: NO_NOTIFY set by the device");
            } else {
                assert!(!kick, "round {round}: avail_event not re-armed");
            }

            // Interrupts requested in rounds divisible by 3.
            let want_irq = round % 3 == 0;
            if want_irq {
                q.enable_interrupts();
            } else {
                q.disable_interrupts();
            }
            let mut irqs = 0;
            while let Some(chain) = dq.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let descs: Vec<_> = chain.collect();
                let mut request = Vec::new();
                for d in descs.iter().filter(|d| !d.is_write_only()) {
                    let mut v = vec![0; d.len() as usize];
                    vm_memory::Bytes::read_slice(mem, &mut v, d.addr()).unwrap();
                    request.extend(v);
                }
                assert_eq!(request.len(), 48);
                let t = u64::from_le_bytes(request[..8].try_into().unwrap());
                assert_eq!(&request[8..], &fill_for(t, 40)[..], "device read the request");
                let mut reply = fill_for(!t, 96).into_iter();
                let mut written = 0u32;
                for d in descs.iter().filter(|d| d.is_write_only()) {
                    let v: Vec<u8> = reply.by_ref().take(d.len() as usize).collect();
                    vm_memory::Bytes::write_slice(mem, &v, d.addr()).unwrap();
                    written += d.len();
                }
                dq.add_used(mem, head, written).unwrap();
                if dq.needs_notification(mem).unwrap() {
                    irqs += 1;
                }
            }
            // virtio-queue only implements suppression with EVENT_IDX.
            if event_idx && want_irq {
                assert!(irqs >= 1, "round {round}: interrupt expected");
            } else if event_idx {
                assert_eq!(irqs, 0, "round {round}: interrupts were disabled");
            }
            let mut got = 0;
            while let Some(c) = q.pop_used().unwrap() {
                let slot = (c.token % size as u64) as usize;
                let len = c.len as usize;
                assert_eq!(Some(&c.len), expected_len.get(&c.token));
                assert_eq!(&ins[slot].as_slice()[..len], &fill_for(!c.token, len)[..]);
                assert!(ins[slot].as_slice()[len..].iter().all(|&b| b == 0));
                got += 1;
            }
            assert_eq!(got, batch);
            assert_eq!(q.in_flight(), 0);
        }
    }
}

#[test]
fn required_bytes_is_enough_for_an_arena() {
    let pool = DmaPool::new(PoolConfig::new(16 * MIB).hugepages(HugePages::Never)).unwrap();
    for size in [1u16, 8, 256, 1024] {
        for f in [features(false, false), features(true, true)] {
            let bytes = SplitQueue::required_bytes(size, &f);
            let mut arena = pool.carve(bytes as u64).unwrap();
            let q = SplitQueue::new(&mut arena, size, f).unwrap();
            assert!(q.addrs().desc >= arena.iova());
            assert!(q.addrs().used + 6 + 8 * size as u64 <= arena.iova() + arena.len());
        }
    }
}

#[test]
fn over_reported_used_length_is_clamped_when_asked() {
    // QEMU's virtio-scsi counts data-out bytes into the used length of a WRITE.
    let pool = pool();
    let (mut q, chains) = hostile_setup(&pool);
    q.clamp_used_len(true);
    let mut dev = SimDevice::new(pool.memory(), q.addrs(), 8);
    dev.last_avail = 2;
    dev.complete(chains[0].head, 4096 + 100);
    assert_eq!(q.pop_used().unwrap(), Some(Completion { token: 10, len: 100 }));
    dev.complete(chains[1].head, u32::MAX);
    assert_eq!(q.pop_used().unwrap(), Some(Completion { token: 11, len: 8 }));
    assert!(!q.is_broken());
}
