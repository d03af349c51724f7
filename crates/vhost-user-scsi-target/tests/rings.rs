//! The target's rings as a frontend sees them: polled request queues that never need a kick,
//! late completions that write nothing before their time, ring stops (GET_VRING_BASE,
//! RESET_DEVICE) that finish whatever the target still holds before they return, after which
//! the ring can be set up again, and a disconnect that drops what is held without a write.

mod common;

use std::time::{Duration, Instant};

use common::{bytes_of, read_10, request, response_of, seg, write_10, Rig, Ring, Target, INQUIRY};
use virtio_initiator_core::memory::DmaBuf;
use virtio_scsi_proto::{response, scsi::status, CmdRequest, CmdResponse, FIRST_REQUEST_QUEUE};

const TEST_UNIT_READY: [u8; 6] = [0; 6];
const RQ0: u16 = FIRST_REQUEST_QUEUE;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 0x10).collect()
}

/// Runs TEST UNIT READY until the power-on and nexus-loss attentions are reported, so that
/// later commands (and injected faults) see no unit attention.
fn settle(rig: &Rig, ring: &mut Ring, kick: bool) {
    for _ in 0..8 {
        let req = request(rig, &TEST_UNIT_READY);
        let resp = rig.buf(CmdResponse::SIZE);
        ring.submit(&[seg(&req, CmdRequest::SIZE)], &[seg(&resp, CmdResponse::SIZE)], 1, kick);
        ring.wait();
        if response_of(&resp).status == status::GOOD {
            return;
        }
    }
    panic!("unit attentions did not clear");
}

/// Writes `data` at `lba` and checks the answer.
fn write(rig: &Rig, ring: &mut Ring, lba: u32, data: &[u8], kick: bool) {
    let req = request(rig, &write_10(lba, (data.len() / 512) as u16));
    let mut out = rig.buf(data.len());
    out.write_at(0, data).unwrap();
    let resp = rig.buf(CmdResponse::SIZE);
    ring.submit(
        &[seg(&req, CmdRequest::SIZE), seg(&out, data.len())],
        &[seg(&resp, CmdResponse::SIZE)],
        1,
        kick,
    );
    let done = ring.wait();
    let r = response_of(&resp);
    assert_eq!((r.response, r.status, done.len as usize), (response::OK, status::GOOD, CmdResponse::SIZE));
}

/// Reads `len` bytes at `lba` and returns them.
fn read(rig: &Rig, ring: &mut Ring, lba: u32, len: usize, kick: bool) -> Vec<u8> {
    let req = request(rig, &read_10(lba, (len / 512) as u16));
    let resp = rig.buf(CmdResponse::SIZE);
    let data = rig.buf(len);
    ring.submit(&[seg(&req, CmdRequest::SIZE)], &[seg(&resp, CmdResponse::SIZE), seg(&data, len)], 1, kick);
    let done = ring.wait();
    let r = response_of(&resp);
    assert_eq!(
        (r.response, r.status, done.len as usize),
        (response::OK, status::GOOD, CmdResponse::SIZE + len)
    );
    bytes_of(&data)
}

/// A READ of one block at LBA 0 posted and left in flight, with its buffers.
struct Pending {
    _req: DmaBuf,
    resp: DmaBuf,
    data: DmaBuf,
}

fn post_read(t: &Target, rig: &Rig, ring: &mut Ring, token: u64, kick: bool) -> Pending {
    let seen = t.requests_seen(0);
    let req = request(rig, &read_10(0, 1));
    let resp = rig.buf(CmdResponse::SIZE);
    let data = rig.buf(512);
    ring.submit(
        &[seg(&req, CmdRequest::SIZE)],
        &[seg(&resp, CmdResponse::SIZE), seg(&data, 512)],
        token,
        kick,
    );
    // The target has taken it (and used up the fault armed for it) once its count moves.
    t.wait_requests(0, seen + 1);
    Pending { _req: req, resp, data }
}

fn untouched(b: &DmaBuf) -> bool {
    bytes_of(b).iter().all(|&x| x == 0xee)
}

#[test]
fn polled_queues_need_no_kick_and_follow_memory_and_reconnection() {
    for event_idx in [true, false] {
        let mut t =
            Target::start(&format!("poll-{event_idx}"), &["--queues", "3", "--poll", "--poll-threads", "2"]);
        let mut rig = Rig::connect(&t, event_idx);
        let mut rings: Vec<Ring> = (0..3).map(|q| rig.ring(RQ0 + q, 16)).collect();

        // Once a ring is polled the target asks not to be kicked: VRING_USED_F_NO_NOTIFY, or
        // avail_event parked half the index space away from the driver's index.
        for ring in &rings {
            ring.wait_polled(&rig);
        }
        // Nothing ever kicks, and the driver's publishes never ask to: the poll threads find
        // every request on their own.
        settle(&rig, &mut rings[0], false);
        let data = pattern(8 * 512, 3);
        write(&rig, &mut rings[0], 0, &data, false);
        for ring in rings.iter_mut() {
            assert_eq!(read(&rig, ring, 0, 8 * 512, false), data);
        }
        for round in 0..30u32 {
            for ring in rings.iter_mut() {
                let lba = round % 8;
                let back = read(&rig, ring, lba, 512, false);
                assert_eq!(back, data[lba as usize * 512..][..512], "round {round} queue {}", ring.index);
            }
        }
        for ring in &rings {
            assert_eq!((ring.kicks, ring.kick_wanted), (0, 0), "queue {}: a kick was asked for", ring.index);
            assert!(!ring.called(), "queue {}: interrupt although the driver suppresses them", ring.index);
        }

        // Memory added while polling (ADD_MEM_REG) is served.
        let region = rig.grow(4 << 20);
        let big = rig.pool.alloc_shared(4 << 20).unwrap();
        assert!(region.contains(big.iova(), 4 << 20), "the buffer is not in the new region");
        drop(big);
        let back = read(&rig, &mut rings[1], 0, 4 << 20, false);
        assert_eq!(back[..data.len()], data[..]);
        assert!(back[data.len()..].iter().all(|&b| b == 0));

        // A new connection is polled again; without one the poll threads sleep.
        drop(rings);
        drop(rig);
        let mut rig = Rig::connect(&t, event_idx);
        let mut ring = rig.ring(RQ0 + 2, 16);
        settle(&rig, &mut ring, false);
        assert_eq!(read(&rig, &mut ring, 0, 8 * 512, false), data);
        drop(ring);
        drop(rig);
        t.assert_idle();
    }
}

#[test]
fn late_writes_nothing_before_its_time() {
    for poll in [false, true] {
        let args: &[&str] = if poll { &["--poll"] } else { &[] };
        let t = Target::start(&format!("late-{poll}"), args);
        let mut rig = Rig::connect(&t, true);
        let mut ring = rig.ring(RQ0, 16);
        settle(&rig, &mut ring, true);
        let data = pattern(1024, 7);
        write(&rig, &mut ring, 0, &data, true);

        t.control(r#"{"op":"inject","target":0,"lun":0,"fault":"late","ms":400,"count":1}"#);
        let seen = t.requests_seen(0);
        let start = Instant::now();
        let req = request(&rig, &read_10(0, 2));
        let resp = rig.buf(CmdResponse::SIZE);
        let buf = rig.buf(1024);
        ring.submit(
            &[seg(&req, CmdRequest::SIZE)],
            &[seg(&resp, CmdResponse::SIZE), seg(&buf, 1024)],
            9,
            true,
        );
        t.wait_requests(0, seen + 1);
        let mut looks = 0;
        loop {
            let (used, resp_clean, buf_clean) = (ring.queue.has_used(), untouched(&resp), untouched(&buf));
            // Only what was seen before the time counts (this thread may be descheduled).
            let elapsed = start.elapsed();
            if elapsed >= Duration::from_millis(400) {
                break;
            }
            assert!(!used, "a used entry before the time (poll {poll})");
            assert!(resp_clean, "the response was written before the time (poll {poll})");
            assert!(buf_clean, "data was written before the time (poll {poll})");
            looks += 1;
            if elapsed >= Duration::from_millis(250) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(looks > 0, "the test thread never looked before the time");
        let done = ring.wait();
        assert!(start.elapsed() >= Duration::from_millis(400));
        assert_eq!((done.token, done.len as usize), (9, CmdResponse::SIZE + 1024));
        let r = response_of(&resp);
        assert_eq!((r.response, r.status), (response::OK, status::GOOD));
        assert_eq!(bytes_of(&buf), data);

        // The fault is used up: the next read is answered at once.
        assert_eq!(read(&rig, &mut ring, 0, 1024, true), data);
    }
}

#[test]
fn get_vring_base_finishes_held_requests_before_it_returns() {
    for poll in [false, true] {
        let args: &[&str] = if poll { &["--poll"] } else { &[] };
        let t = Target::start(&format!("stop-{poll}"), args);
        let mut rig = Rig::connect(&t, true);
        let mut ring = rig.ring(RQ0, 16);
        settle(&rig, &mut ring, true);
        let data = pattern(512, 1);
        write(&rig, &mut ring, 0, &data, true);

        t.control(r#"{"op":"inject","target":0,"lun":0,"fault":"late","ms":5000}"#);
        let late = post_read(&t, &rig, &mut ring, 1, true);
        t.control(r#"{"op":"inject","target":0,"lun":0,"fault":"delay","ms":5000}"#);
        let delayed = post_read(&t, &rig, &mut ring, 2, true);
        t.control(r#"{"op":"inject","target":0,"lun":0,"fault":"never"}"#);
        let never = post_read(&t, &rig, &mut ring, 3, true);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!ring.queue.has_used());
        assert!(untouched(&late.resp) && untouched(&late.data));
        // A delay answers at once and holds only the used entry.
        assert_eq!(bytes_of(&delayed.data), data);
        assert!(untouched(&never.resp) && untouched(&never.data));

        let start = Instant::now();
        let base = rig.stop(&ring);
        assert!(start.elapsed() < Duration::from_secs(2), "GET_VRING_BASE waited for the faults' time");
        assert_eq!(base, u32::from(ring.queue.avail_idx()));
        // All three are on the used ring by the time the reply is in: no waiting here.
        let mut done: Vec<_> =
            (0..3).map(|_| ring.queue.pop_used().unwrap().expect("completed before the reply")).collect();
        assert_eq!(ring.queue.pop_used().unwrap(), None);
        done.sort_by_key(|c| c.token);
        let lens: Vec<usize> = done.iter().map(|c| c.len as usize).collect();
        assert_eq!(lens, [CmdResponse::SIZE + 512, CmdResponse::SIZE + 512, CmdResponse::SIZE]);
        for p in [&late, &delayed] {
            let r = response_of(&p.resp);
            assert_eq!((r.response, r.status), (response::OK, status::GOOD));
            assert_eq!(bytes_of(&p.data), data);
        }
        assert_eq!(response_of(&never.resp).response, response::ABORTED);
        assert!(untouched(&never.data), "an aborted request got data");

        // Nothing of the stopped ring is written afterwards.
        let mut late = late;
        late.data.fill(0xee);
        std::thread::sleep(Duration::from_millis(100));
        assert!(untouched(&late.data));
        assert_eq!(ring.queue.pop_used().unwrap(), None);

        // The queue can be set up again, on new rings...
        let mut fresh = rig.ring(RQ0, 16);
        assert_eq!(read(&rig, &mut fresh, 0, 512, true), data);
        let req = request(&rig, &INQUIRY);
        let resp = rig.buf(CmdResponse::SIZE + 36);
        let c = fresh.run(&[seg(&req, CmdRequest::SIZE)], &[seg(&resp, CmdResponse::SIZE + 36)]);
        assert_eq!(c.len as usize, CmdResponse::SIZE + 36);
        // ...and on the old ones, where they stopped.
        assert_eq!(rig.stop(&fresh), 2);
        rig.start(&mut ring);
        assert_eq!(read(&rig, &mut ring, 0, 512, true), data);
        assert_eq!(read(&rig, &mut ring, 0, 512, true), data);
    }
}

#[test]
fn reset_finishes_and_disconnect_drops_held_requests() {
    let mut t = Target::start("reset", &[]);
    let mut rig = Rig::connect(&t, true);
    let mut ring = rig.ring(RQ0, 16);
    settle(&rig, &mut ring, true);
    let data = pattern(512, 5);
    write(&rig, &mut ring, 0, &data, true);

    // RESET_DEVICE.
    t.control(r#"{"op":"inject","target":0,"lun":0,"fault":"late","ms":5000}"#);
    let late = post_read(&t, &rig, &mut ring, 1, true);
    t.control(r#"{"op":"inject","target":0,"lun":0,"fault":"never"}"#);
    let never = post_read(&t, &rig, &mut ring, 2, true);
    assert!(untouched(&late.data));
    rig.reset();
    let mut done: Vec<_> =
        (0..2).map(|_| ring.queue.pop_used().unwrap().expect("completed before the reply")).collect();
    done.sort_by_key(|c| c.token);
    assert_eq!(done[0].len as usize, CmdResponse::SIZE + 512);
    assert_eq!(bytes_of(&late.data), data);
    assert_eq!(response_of(&never.resp).response, response::ABORTED);
    drop(ring);
    drop(rig);

    // Disconnect: the held request is dropped; nothing is written into the departed
    // frontend's memory, not even when its time comes.
    let mut rig = Rig::connect(&t, true);
    let mut ring = rig.ring(RQ0, 16);
    settle(&rig, &mut ring, true);
    t.control(r#"{"op":"inject","target":0,"lun":0,"fault":"late","ms":300}"#);
    let late = post_read(&t, &rig, &mut ring, 1, true);
    let Rig { frontend, pool, .. } = rig;
    drop(frontend);
    std::thread::sleep(Duration::from_millis(700));
    assert!(ring.queue.pop_used().unwrap().is_none(), "no used entry after the disconnect");
    assert!(untouched(&late.data), "no data after the disconnect");
    drop(ring);
    drop(pool);

    // And the target takes the next frontend.
    let mut rig = Rig::connect(&t, true);
    let mut ring = rig.ring(RQ0, 16);
    settle(&rig, &mut ring, true);
    assert_eq!(read(&rig, &mut ring, 0, 512, true), data);
    assert!(t.running());
}
