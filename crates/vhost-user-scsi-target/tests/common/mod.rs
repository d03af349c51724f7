//! Shared by the integration tests: the real target process, and a vhost-user frontend of our
//! own, built from the `vhost` crate's `Frontend`, with rings and buffers in a DMA pool of the
//! initiator crate. Having every ring message at hand (GET_VRING_BASE, RESET_DEVICE, ADD_MEM_REG)
//! is what lets the tests stop, restart and starve rings the way a frontend may.

#![allow(dead_code)] // each test binary uses a part of it

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use virtio_initiator_core::memory::{DmaBuf, DmaPool, HugePages, PoolConfig, Region};
use virtio_initiator_core::queue::{Completion, QueueFeatures, Segment, SplitQueue};
use virtio_initiator_core::transport::vhost_user::VhostUserTransport;
use virtio_scsi_proto::{CmdRequest, CmdResponse, CDB_SIZE};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long a test waits for the target to answer anything.
pub const PATIENCE: Duration = Duration::from_secs(5);

const VERSION_1: u64 = 1 << 32;
const EVENT_IDX: u64 = 1 << 29;

/// The target binary, with a RAM LUN 0:0 of 4 MiB in 512-byte blocks and a control socket.
pub struct Target {
    child: Child,
    pub socket: PathBuf,
    pub control: PathBuf,
}

impl Target {
    pub fn start(name: &str, extra: &[&str]) -> Target {
        let mut args = vec!["--lun", "0:0:ram:4M:512"];
        args.extend_from_slice(extra);
        Target::spawn(name, &args)
    }

    /// The target with `--type blk` and one disk (`lun`, a 0:0 spec), with a control socket.
    pub fn start_blk(name: &str, lun: &str, extra: &[&str]) -> Target {
        let mut args = vec!["--type", "blk", "--lun", lun];
        args.extend_from_slice(extra);
        Target::spawn(name, &args)
    }

    fn spawn(name: &str, args: &[&str]) -> Target {
        let base = std::env::temp_dir().join(format!("vust-{name}-{}", std::process::id()));
        let socket = base.with_extension("sock");
        let control = base.with_extension("ctl");
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&control);
        let child = Command::new(env!("CARGO_BIN_EXE_vhost-user-scsi-target"))
            .args(["--socket", socket.to_str().unwrap(), "--control", control.to_str().unwrap()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the target");
        let start = Instant::now();
        while !socket.exists() || !control.exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "target did not create its sockets");
            std::thread::sleep(Duration::from_millis(10));
        }
        Target { child, socket, control }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends one control request and returns its reply, which must be a success.
    pub fn control(&self, request: &str) -> Value {
        let mut stream = UnixStream::connect(&self.control).expect("connect to the control socket");
        writeln!(stream, "{request}").unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        let reply: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(reply["ok"], true, "{request} -> {reply}");
        reply
    }

    /// Requests the target has taken from request queue `rq`.
    pub fn requests_seen(&self, rq: usize) -> u64 {
        self.control(r#"{"op":"stats"}"#)["queues"][rq]["requests"].as_u64().unwrap()
    }

    /// Checks that a target left without a frontend sleeps: in poll mode its threads stop
    /// spinning once no ring is running.
    pub fn assert_idle(&mut self) {
        std::thread::sleep(Duration::from_millis(300));
        let before = cpu_seconds(self.pid());
        std::thread::sleep(Duration::from_millis(600));
        let used = cpu_seconds(self.pid()) - before;
        assert!(used < 0.2, "an idle target used {used:.2} s of CPU in 0.6 s");
        assert!(self.running());
    }

    /// Waits until request queue `rq` has taken `n` requests.
    pub fn wait_requests(&self, rq: usize, n: u64) {
        let start = Instant::now();
        while self.requests_seen(rq) < n {
            assert!(start.elapsed() < PATIENCE, "request queue {rq} never took request {n}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.control);
    }
}

/// A frontend connection with its shared memory.
pub struct Rig {
    pub frontend: Frontend,
    pub pool: DmaPool,
    pub event_idx: bool,
}

impl Rig {
    /// Connects and negotiates VERSION_1 (and EVENT_IDX when asked), with every request
    /// acknowledged, and shares a 4 MiB pool.
    pub fn connect(t: &Target, event_idx: bool) -> Rig {
        let stream = UnixStream::connect(&t.socket).unwrap();
        let mut frontend = Frontend::from_stream(stream, 64);
        let offered = frontend.get_features().unwrap();
        let protocol = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE;
        assert!(frontend.get_protocol_features().unwrap().contains(protocol));
        frontend.set_protocol_features(protocol).unwrap();
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        frontend.set_owner().unwrap();
        let wanted = VERSION_1 | if event_idx { EVENT_IDX } else { 0 };
        assert_eq!(offered & wanted, wanted);
        frontend.set_features(wanted | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()).unwrap();
        let pool = DmaPool::new(PoolConfig::new(4 << 20).hugepages(HugePages::Never)).unwrap();
        let regions: Vec<_> = pool.regions().iter().map(VhostUserTransport::region_info).collect();
        frontend.set_mem_table(&regions).unwrap();
        Rig { frontend, pool, event_idx }
    }

    /// A buffer in shared memory, filled with 0xee so that whatever the target writes shows.
    pub fn buf(&self, len: usize) -> DmaBuf {
        let mut b = self.pool.alloc_shared(len).unwrap();
        b.fill(0xee);
        b
    }

    /// Grows the pool by a region and announces it with ADD_MEM_REG.
    pub fn grow(&mut self, bytes: u64) -> Region {
        let region = self.pool.grow(bytes).unwrap().clone();
        self.frontend.add_mem_region(&VhostUserTransport::region_info(&region)).unwrap();
        region
    }

    /// New rings of `size` entries for queue `index`, set up and enabled.
    pub fn ring(&mut self, index: u16, size: u16) -> Ring {
        let features = QueueFeatures { event_idx: self.event_idx, ..QueueFeatures::default() };
        let queue = SplitQueue::from_pool(&self.pool, size, features).unwrap();
        let mut ring = Ring {
            index,
            queue,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
            kicks: 0,
            kick_wanted: 0,
        };
        self.start(&mut ring);
        ring
    }

    /// SET_VRING_NUM, BASE, ADDR, CALL, KICK and ENABLE: the ring starts where its driver is.
    pub fn start(&mut self, ring: &mut Ring) {
        let i = ring.index as usize;
        let a = ring.queue.addrs();
        let host = |iova| self.pool.translate(iova, 1).unwrap() as u64;
        let size = ring.queue.size();
        let cfg = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: host(a.desc),
            used_ring_addr: host(a.used),
            avail_ring_addr: host(a.avail),
            log_addr: None,
        };
        self.frontend.set_vring_num(i, size).unwrap();
        self.frontend.set_vring_base(i, ring.queue.avail_idx()).unwrap();
        self.frontend.set_vring_addr(i, &cfg).unwrap();
        self.frontend.set_vring_call(i, &ring.call).unwrap();
        self.frontend.set_vring_kick(i, &ring.kick).unwrap();
        self.frontend.set_vring_enable(i, true).unwrap();
    }

    /// RESET_DEVICE.
    pub fn reset(&mut self) {
        self.frontend.reset_device().unwrap();
    }

    /// GET_VRING_BASE: stops the ring; returns the avail index the target stopped at.
    pub fn stop(&mut self, ring: &Ring) -> u32 {
        self.frontend.get_vring_base(ring.index as usize).unwrap()
    }
}

/// One virtqueue of the frontend.
pub struct Ring {
    pub index: u16,
    pub queue: SplitQueue,
    pub kick: EventFd,
    pub call: EventFd,
    /// Notifications sent to the target.
    pub kicks: usize,
    /// Publishes after which the target's suppression state asked for a notification.
    pub kick_wanted: usize,
}

impl Ring {
    /// Posts one chain; notifies the target when it asks for it and `kick` allows.
    pub fn submit(&mut self, readable: &[Segment], writable: &[Segment], token: u64, kick: bool) {
        self.queue.add(readable, writable, token).unwrap();
        if self.queue.publish() {
            self.kick_wanted += 1;
            if kick {
                self.kick.write(1).unwrap();
                self.kicks += 1;
            }
        }
    }

    /// Waits for the next completion.
    pub fn wait(&mut self) -> Completion {
        let start = Instant::now();
        loop {
            if let Some(c) = self.queue.pop_used().unwrap() {
                return c;
            }
            assert!(start.elapsed() < PATIENCE, "queue {}: the target never answered", self.index);
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Posts one chain, kicking as the target asks, and waits for it to come back.
    pub fn run(&mut self, readable: &[Segment], writable: &[Segment]) -> Completion {
        self.submit(readable, writable, 1, true);
        self.wait()
    }

    /// The device's notification suppression as it stands in the used ring: its flags and
    /// avail_event.
    pub fn suppression(&self, pool: &DmaPool) -> (u16, u16) {
        let used = self.queue.addrs().used;
        let avail_event = used + 4 + 8 * u64::from(self.queue.size());
        let mem = pool.memory();
        (mem.read_obj(GuestAddress(used)).unwrap(), mem.read_obj(GuestAddress(avail_event)).unwrap())
    }

    /// Waits until the target polls this ring, which it shows by asking not to be kicked:
    /// VRING_USED_F_NO_NOTIFY, or avail_event parked half the index space away from the
    /// driver's index.
    pub fn wait_polled(&self, rig: &Rig) {
        let start = Instant::now();
        loop {
            let (flags, avail_event) = self.suppression(&rig.pool);
            if (rig.event_idx && avail_event == 0x8000) || (!rig.event_idx && flags & 1 != 0) {
                return;
            }
            assert!(start.elapsed() < PATIENCE, "queue {} is not polled", self.index);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Whether the target has signalled the call eventfd since the last look.
    pub fn called(&self) -> bool {
        self.call.read().is_ok()
    }
}

pub fn header(lun: [u8; 8], cdb: &[u8]) -> [u8; CmdRequest::SIZE] {
    let mut c = [0u8; CDB_SIZE];
    c[..cdb.len()].copy_from_slice(cdb);
    CmdRequest { lun, tag: 1, task_attr: 0, prio: 0, crn: 0, cdb: c }.encode()
}

pub const INQUIRY: [u8; 6] = [0x12, 0, 0, 0, 36, 0];
pub const READ_10_ONE: [u8; 10] = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];

pub fn read_10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

pub fn write_10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read_10(lba, blocks);
    c[0] = 0x2a;
    c
}

pub fn seg(b: &DmaBuf, len: usize) -> Segment {
    Segment::new(b.iova(), len as u32)
}

pub fn response_of(b: &DmaBuf) -> CmdResponse {
    let mut raw = [0u8; CmdResponse::SIZE];
    b.read_at(0, &mut raw).unwrap();
    CmdResponse::decode(&raw).unwrap()
}

pub fn bytes_of(b: &DmaBuf) -> Vec<u8> {
    let mut v = vec![0u8; b.len()];
    b.read_at(0, &mut v).unwrap();
    v
}

/// A request header for LUN 0:0 in its own buffer.
pub fn request(rig: &Rig, cdb: &[u8]) -> DmaBuf {
    let mut req = rig.buf(CmdRequest::SIZE);
    req.write_at(0, &header(virtio_scsi_proto::LunAddress::new(0, 0).encode(), cdb)).unwrap();
    req
}

/// CPU time the process has used, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}
