//! The target's virtio-blk device (`--type blk`), reached over its socket by a frontend of our
//! own: configuration space and features, data written and read back, flush, the device ID,
//! discard and write-zeroes, requests the disk refuses, and polled request queues.

mod common;

use common::{bytes_of, seg, Rig, Ring, Target};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use virtio_blk_proto::{feature, request, status, Config, RangeSegment, RequestHeader};

fn header(rig: &Rig, request_type: u32, sector: u64) -> virtio_initiator_core::memory::DmaBuf {
    let mut b = rig.buf(RequestHeader::SIZE);
    b.write_at(0, &RequestHeader { request_type, ioprio: 0, sector }.encode()).unwrap();
    b
}

fn status_of(b: &virtio_initiator_core::memory::DmaBuf) -> u8 {
    bytes_of(b)[0]
}

#[test]
fn config_features_and_verified_io() {
    let t = Target::start_blk("blk-io", "0:0:ram:8M:4096", &["--queues", "2"]);
    let mut rig = Rig::connect(&t, true);
    let offered = rig.frontend.get_features().unwrap();
    for bit in [
        feature::BLK_SIZE,
        feature::SEG_MAX,
        feature::FLUSH,
        feature::DISCARD,
        feature::WRITE_ZEROES,
        feature::MQ,
    ] {
        assert_ne!(offered & (1 << bit), 0, "feature bit {bit} offered");
    }
    assert_eq!(offered & (1 << feature::RO), 0);
    assert_eq!(rig.frontend.get_queue_num().unwrap(), 2);
    let zeros = [0u8; Config::SIZE];
    let (_, raw) =
        rig.frontend.get_config(0, Config::SIZE as u32, VhostUserConfigFlags::empty(), &zeros).unwrap();
    let cfg = Config::decode(&raw).unwrap();
    assert_eq!((cfg.capacity, cfg.blk_size, cfg.num_queues), ((8 << 20) / 512, 4096, 2));
    assert_eq!((cfg.discard_sector_alignment, cfg.write_zeroes_may_unmap), (8, 1));

    let mut ring = rig.ring(1, 64);
    // Write 8 KiB at block 3 (sector 24), read it back.
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 13 + 1) as u8).collect();
    let mut out = rig.buf(8192);
    out.write_at(0, &data).unwrap();
    let h = header(&rig, request::OUT, 24);
    let st = rig.buf(1);
    let done = ring.run(&[seg(&h, 16), seg(&out, 8192)], &[seg(&st, 1)]);
    assert_eq!((status_of(&st), done.len), (status::OK, 1));
    let h = header(&rig, request::IN, 24);
    let back = rig.buf(8192);
    let st = rig.buf(1);
    let done = ring.run(&[seg(&h, 16)], &[seg(&back, 8192), seg(&st, 1)]);
    assert_eq!((status_of(&st), done.len), (status::OK, 8193));
    assert_eq!(bytes_of(&back), data);

    // FLUSH and GET_ID.
    let h = header(&rig, request::FLUSH, 0);
    let st = rig.buf(1);
    ring.run(&[seg(&h, 16)], &[seg(&st, 1)]);
    assert_eq!(status_of(&st), status::OK);
    let h = header(&rig, request::GET_ID, 0);
    let id = rig.buf(20);
    let st = rig.buf(1);
    let done = ring.run(&[seg(&h, 16)], &[seg(&id, 20), seg(&st, 1)]);
    assert_eq!((status_of(&st), done.len), (status::OK, 21));
    assert!(bytes_of(&id).starts_with(b"VIRTINIT-ram"));

    // WRITE ZEROES over the written blocks: they read back as zeros.
    let h = header(&rig, request::WRITE_ZEROES, 0);
    let mut range = rig.buf(RangeSegment::SIZE);
    range.write_at(0, &RangeSegment { sector: 24, num_sectors: 16, unmap: true }.encode()).unwrap();
    let st = rig.buf(1);
    ring.run(&[seg(&h, 16), seg(&range, 16)], &[seg(&st, 1)]);
    assert_eq!(status_of(&st), status::OK);
    let h = header(&rig, request::IN, 24);
    let back = rig.buf(8192);
    let st = rig.buf(1);
    ring.run(&[seg(&h, 16)], &[seg(&back, 8192), seg(&st, 1)]);
    assert!(bytes_of(&back).iter().all(|&b| b == 0));
    // Everything went through the second queue, and is counted there.
    assert_eq!((t.requests_seen(0), t.requests_seen(1)), (0, 6));

    // Past the end, not whole blocks, an unknown request: refused, and the device goes on.
    for (t, sector, len, want) in [
        (request::IN, (8 << 20) / 512, 4096, status::IOERR),
        (request::IN, 1, 4096, status::IOERR),
        (request::IN, 0, 512, status::IOERR),
        (77, 0, 0, status::UNSUPP),
    ] {
        let h = header(&rig, t, sector);
        let st = rig.buf(1);
        let buf = rig.buf(4096);
        let writable = if len > 0 { vec![seg(&buf, len), seg(&st, 1)] } else { vec![seg(&st, 1)] };
        let done = ring.run(&[seg(&h, 16)], &writable);
        assert_eq!((status_of(&st), done.len), (want, 1), "type {t} sector {sector} len {len}");
    }
}

#[test]
fn a_read_only_disk_says_so_and_refuses_writes() {
    let t = Target::start_blk("blk-ro", "0:0:null:1M:512:ro", &[]);
    let mut rig = Rig::connect(&t, false);
    assert_ne!(rig.frontend.get_features().unwrap() & (1 << feature::RO), 0);
    let mut ring = rig.ring(0, 16);
    let h = header(&rig, request::OUT, 0);
    let out = rig.buf(512);
    let st = rig.buf(1);
    ring.run(&[seg(&h, 16), seg(&out, 512)], &[seg(&st, 1)]);
    assert_eq!(status_of(&st), status::IOERR);
}

#[test]
fn blk_command_lines_are_checked() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vhost-user-scsi-target")).args(args).output().unwrap()
    };
    let o = run(&["--type", "blk", "--socket", "/tmp/x.sock", "--lun", "0:1:ram:1M"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("exactly one --lun 0:0"));
    let o = run(&["--type", "blk", "--socket", "/tmp/x.sock", "--lun", "0:0:ram:1M", "--max-target", "1"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--max-target is for --type scsi only"));
    let o = run(&["--type", "tape", "--socket", "/tmp/x.sock"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("'tape' is not scsi or blk"));
}

#[test]
fn faults_stats_and_disconnect_through_the_control_socket() {
    let t = Target::start_blk("blk-ctl", "0:0:ram:1M:512", &[]);
    let mut rig = Rig::connect(&t, false);
    let mut ring = rig.ring(0, 16);
    let read = |rig: &Rig, ring: &mut common::Ring| {
        let h = header(rig, request::IN, 0);
        let buf = rig.buf(512);
        let st = rig.buf(1);
        let done = ring.run(&[seg(&h, 16)], &[seg(&buf, 512), seg(&st, 1)]);
        (status_of(&st), done.len)
    };
    assert_eq!(read(&rig, &mut ring), (status::OK, 513));

    t.control(r#"{"op":"inject","target":0,"lun":0,"fault":"io_error","count":2}"#);
    assert_eq!(read(&rig, &mut ring), (status::IOERR, 1));
    assert_eq!(read(&rig, &mut ring), (status::IOERR, 1));
    assert_eq!(read(&rig, &mut ring), (status::OK, 513), "the fault is used up");

    t.control(r#"{"op":"inject","target":0,"lun":0,"fault":"delay","ms":150}"#);
    let start = std::time::Instant::now();
    assert_eq!(read(&rig, &mut ring), (status::OK, 513));
    assert!(start.elapsed() >= std::time::Duration::from_millis(150));

    let stats = t.control(r#"{"op":"stats"}"#);
    assert_eq!(stats["queues"][0]["requests"], 5);
    assert_eq!(stats["queues"][0]["errors"], 2);
    assert_eq!(stats["queues"][0]["bytes_in"], 3 * 512);
    let list = t.control(r#"{"op":"list"}"#);
    assert_eq!(
        (list["disk"]["kind"].as_str(), list["config"]["capacity"].as_u64()),
        (Some("ram"), Some(2048))
    );

    // A request held for ever: no answer, until the connection is cut.
    t.control(r#"{"op":"inject","target":0,"lun":0,"fault":"never"}"#);
    let h = header(&rig, request::IN, 0);
    let buf = rig.buf(512);
    let st = rig.buf(1);
    ring.submit(&[seg(&h, 16)], &[seg(&buf, 512), seg(&st, 1)], 9, true);
    t.wait_requests(0, 6);
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(ring.queue.pop_used().unwrap().is_none(), "the held request is not answered");
    assert_eq!(t.control(r#"{"op":"disconnect"}"#)["connections"], 1);

    // What a virtio-blk target does not do is refused by name.
    let bad = |req: &str| {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&t.control).unwrap();
        writeln!(s, "{req}").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()["error"].as_str().unwrap().to_string()
    };
    assert!(bad(r#"{"op":"add_lun","spec":"0:1:ram:1M"}"#).contains("one disk"));
    assert!(bad(r#"{"op":"resize_lun","target":0,"lun":0,"size":100}"#).contains("no block of 512 bytes"));

    // A resize shows in the configuration space of a new connection, cut to whole blocks.
    assert_eq!(t.control(r#"{"op":"resize_lun","target":0,"lun":0,"size":"2M"}"#)["bytes"], 2 << 20);
    assert_eq!(t.control(r#"{"op":"resize_lun","target":0,"lun":0,"size":3000000}"#)["bytes"], 2_999_808);
    let mut rig = Rig::connect(&t, false);
    let zeros = [0u8; Config::SIZE];
    let (_, raw) =
        rig.frontend.get_config(0, Config::SIZE as u32, VhostUserConfigFlags::empty(), &zeros).unwrap();
    assert_eq!(Config::decode(&raw).unwrap().capacity, 2_999_808 / 512);
    assert!(bad(r#"{"op":"inject","target":0,"lun":0,"fault":"busy"}"#).contains("io_error, delay and never"));
    assert!(bad(r#"{"op":"inject","target":0,"lun":1,"fault":"never"}"#).contains("not 0:1"));
}

/// Writes `data` at `sector` through `ring`, without kicking.
fn write_unkicked(rig: &Rig, ring: &mut Ring, sector: u64, data: &[u8]) {
    let h = header(rig, request::OUT, sector);
    let mut out = rig.buf(data.len());
    out.write_at(0, data).unwrap();
    let st = rig.buf(1);
    ring.submit(&[seg(&h, 16), seg(&out, data.len())], &[seg(&st, 1)], 1, false);
    let done = ring.wait();
    assert_eq!((status_of(&st), done.len), (status::OK, 1));
}

/// Reads `len` bytes at `sector` through `ring`, without kicking.
fn read_unkicked(rig: &Rig, ring: &mut Ring, sector: u64, len: usize) -> Vec<u8> {
    let h = header(rig, request::IN, sector);
    let back = rig.buf(len);
    let st = rig.buf(1);
    ring.submit(&[seg(&h, 16)], &[seg(&back, len), seg(&st, 1)], 1, false);
    let done = ring.wait();
    assert_eq!((status_of(&st), done.len as usize), (status::OK, len + 1));
    bytes_of(&back)
}

#[test]
fn polled_queues_need_no_kick_and_follow_reconnection() {
    for event_idx in [true, false] {
        let mut t = Target::start_blk(
            &format!("blk-poll-{event_idx}"),
            "0:0:ram:8M:512",
            &["--queues", "3", "--poll", "--poll-threads", "2"],
        );
        let mut rig = Rig::connect(&t, event_idx);
        let mut rings: Vec<Ring> = (0..3).map(|q| rig.ring(q, 16)).collect();
        for ring in &rings {
            ring.wait_polled(&rig);
        }
        // Nothing ever kicks, and the driver's publishes never ask to.
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8 | 0x40).collect();
        write_unkicked(&rig, &mut rings[0], 8, &data);
        for round in 0..20u64 {
            for ring in rings.iter_mut() {
                let back = read_unkicked(&rig, ring, 8 + round % 8, 512);
                assert_eq!(
                    back,
                    data[(round % 8) as usize * 512..][..512],
                    "round {round} queue {}",
                    ring.index
                );
            }
        }
        for ring in &rings {
            assert_eq!((ring.kicks, ring.kick_wanted), (0, 0), "queue {}: a kick was asked for", ring.index);
            assert!(!ring.called(), "queue {}: interrupt although the driver suppresses them", ring.index);
        }
        let seen: Vec<u64> = (0..3).map(|q| t.requests_seen(q)).collect();
        assert_eq!(seen, [21, 20, 20]);

        // Memory added while polling (ADD_MEM_REG) is served.
        let region = rig.grow(4 << 20);
        let big = rig.pool.alloc_shared(4 << 20).unwrap();
        assert!(region.contains(big.iova(), 4 << 20), "the buffer is not in the new region");
        drop(big);
        let back = read_unkicked(&rig, &mut rings[1], 0, 4 << 20);
        assert_eq!(back[8 * 512..][..data.len()], data[..]);

        // A new connection is polled again; without one the poll threads sleep.
        drop(rings);
        drop(rig);
        let mut rig = Rig::connect(&t, event_idx);
        let mut ring = rig.ring(2, 16);
        ring.wait_polled(&rig);
        assert_eq!(read_unkicked(&rig, &mut ring, 8, data.len()), data);
        drop(ring);
        drop(rig);
        t.assert_idle();
    }
}
