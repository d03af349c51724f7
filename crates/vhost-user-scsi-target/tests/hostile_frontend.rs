//! A frontend that breaks the rules: the real target process, reached over its socket with rings
//! in shared memory, gets malformed descriptor chains. Each must be answered with a failure (or
//! returned unused when there is nowhere to answer), and the target must keep serving.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use virtio_initiator_core::memory::{DmaBuf, DmaPool, HugePages, PoolConfig};
use virtio_initiator_core::queue::{Completion, QueueFeatures, Segment, SplitQueue};
use virtio_initiator_core::transport::vhost_user::VhostUserTransport;
use virtio_initiator_core::transport::{QueueHandle, RingAddresses, Transport};
use virtio_scsi_proto::{response, scsi::status, CmdRequest, CmdResponse, LunAddress, CDB_SIZE};

struct Target {
    child: Child,
    socket: PathBuf,
}

impl Target {
    fn start(name: &str) -> Target {
        let socket = std::env::temp_dir().join(format!("hostile-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(env!("CARGO_BIN_EXE_vhost-user-scsi-target"))
            .args(["--socket", socket.to_str().unwrap(), "--lun", "0:0:ram:4M:512"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the target");
        let start = Instant::now();
        while !socket.exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "target did not create its socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Target { child, socket }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Request queue 0 of the target, set up by hand.
struct Rig {
    _transport: VhostUserTransport,
    pool: DmaPool,
    queue: SplitQueue,
    handle: QueueHandle,
}

impl Rig {
    fn connect(t: &Target) -> Rig {
        let mut transport = VhostUserTransport::connect(t.socket.to_str().unwrap()).unwrap();
        let offered = transport.device_features().unwrap();
        transport.set_features(offered & (1 << 32)).unwrap();
        let pool = DmaPool::new(PoolConfig::new(4 << 20).hugepages(HugePages::Never)).unwrap();
        transport.set_memory(pool.regions()).unwrap();
        let mut queue = SplitQueue::from_pool(&pool, 16, QueueFeatures::default()).unwrap();
        queue.disable_interrupts();
        let a = queue.addrs();
        let host = |iova| pool.translate(iova, 1).unwrap() as u64;
        let rings = RingAddresses {
            size: 16,
            desc_iova: a.desc,
            avail_iova: a.avail,
            used_iova: a.used,
            desc_host: host(a.desc),
            avail_host: host(a.avail),
            used_host: host(a.used),
        };
        let handle = transport.setup_queue(virtio_scsi_proto::FIRST_REQUEST_QUEUE, &rings).unwrap();
        transport.start().unwrap();
        Rig { _transport: transport, pool, queue, handle }
    }

    fn buf(&self, len: usize) -> DmaBuf {
        let mut b = self.pool.alloc_shared(len).unwrap();
        b.fill(0xee);
        b
    }

    /// Posts one chain and waits for the device to hand it back.
    fn run(&mut self, readable: &[Segment], writable: &[Segment]) -> Completion {
        self.queue.add(readable, writable, 1).unwrap();
        if self.queue.publish() {
            self.handle.notifier.notify().unwrap();
        }
        let start = Instant::now();
        loop {
            if let Some(c) = self.queue.pop_used().unwrap() {
                return c;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "the target never answered");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn header(lun: [u8; 8], cdb: &[u8]) -> [u8; CmdRequest::SIZE] {
    let mut c = [0u8; CDB_SIZE];
    c[..cdb.len()].copy_from_slice(cdb);
    CmdRequest { lun, tag: 1, task_attr: 0, prio: 0, crn: 0, cdb: c }.encode()
}

const INQUIRY: [u8; 6] = [0x12, 0, 0, 0, 36, 0];
const READ_10_ONE: [u8; 10] = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];

fn seg(b: &DmaBuf, len: usize) -> Segment {
    Segment::new(b.iova(), len as u32)
}

fn response_of(b: &DmaBuf) -> CmdResponse {
    let mut raw = [0u8; CmdResponse::SIZE];
    b.read_at(0, &mut raw).unwrap();
    CmdResponse::decode(&raw).unwrap()
}

/// A well-formed INQUIRY: proves the target still answers properly.
fn inquiry_works(rig: &mut Rig) {
    let req = rig.buf(CmdRequest::SIZE);
    let mut req = req;
    req.write_at(0, &header(LunAddress::new(0, 0).encode(), &INQUIRY)).unwrap();
    let resp = rig.buf(CmdResponse::SIZE + 36);
    let done = rig.run(&[seg(&req, CmdRequest::SIZE)], &[seg(&resp, CmdResponse::SIZE + 36)]);
    let r = response_of(&resp);
    assert_eq!((r.response, r.status), (response::OK, status::GOOD));
    assert_eq!(done.len as usize, CmdResponse::SIZE + 36);
}

#[test]
fn malformed_chains_get_failures_and_the_target_survives() {
    let mut t = Target::start("chains");
    let mut rig = Rig::connect(&t);
    inquiry_works(&mut rig);

    // A request header shorter than 51 bytes: VIRTIO_SCSI_S_FAILURE.
    let mut short = rig.buf(20);
    short.write_at(0, &header(LunAddress::new(0, 0).encode(), &INQUIRY)[..20]).unwrap();
    let resp = rig.buf(CmdResponse::SIZE);
    let done = rig.run(&[seg(&short, 20)], &[seg(&resp, CmdResponse::SIZE)]);
    assert_eq!(done.len as usize, CmdResponse::SIZE);
    assert_eq!(response_of(&resp).response, response::FAILURE);

    // No room for a response: handed back with nothing written.
    let mut req = rig.buf(CmdRequest::SIZE);
    req.write_at(0, &header(LunAddress::new(0, 0).encode(), &INQUIRY)).unwrap();
    let tiny = rig.buf(16);
    assert_eq!(rig.run(&[seg(&req, CmdRequest::SIZE)], &[seg(&tiny, 16)]).len, 0);
    // No writable descriptor at all.
    assert_eq!(rig.run(&[seg(&req, CmdRequest::SIZE)], &[]).len, 0);

    // A LUN field that is not virtio-scsi addressing: BAD_TARGET.
    let mut bad_lun = rig.buf(CmdRequest::SIZE);
    bad_lun.write_at(0, &header([0, 0, 0, 0, 0, 0, 0, 0], &INQUIRY)).unwrap();
    let resp = rig.buf(CmdResponse::SIZE);
    rig.run(&[seg(&bad_lun, CmdRequest::SIZE)], &[seg(&resp, CmdResponse::SIZE)]);
    assert_eq!(response_of(&resp).response, response::BAD_TARGET);

    // A data-in buffer outside the memory the target was given: no crash, not a success.
    let mut read = rig.buf(CmdRequest::SIZE);
    read.write_at(0, &header(LunAddress::new(0, 0).encode(), &READ_10_ONE)).unwrap();
    let resp = rig.buf(CmdResponse::SIZE);
    let wild = Segment::new(0x7000_0000_0000, 512);
    rig.run(&[seg(&read, CmdRequest::SIZE)], &[seg(&resp, CmdResponse::SIZE), wild]);
    let r = response_of(&resp);
    assert!(
        r.response != response::OK || r.status != status::GOOD,
        "a read into unmapped memory succeeded: {r:?}"
    );

    // The request header itself outside shared memory: nothing can be read, so FAILURE.
    let resp = rig.buf(CmdResponse::SIZE);
    rig.run(&[Segment::new(0x7000_0000_0000, CmdRequest::SIZE as u32)], &[seg(&resp, CmdResponse::SIZE)]);
    assert_eq!(response_of(&resp).response, response::FAILURE);

    // A data-in buffer smaller than the transfer: the command fails, nothing overflows.
    let small = rig.buf(100);
    let resp = rig.buf(CmdResponse::SIZE);
    rig.run(&[seg(&read, CmdRequest::SIZE)], &[seg(&resp, CmdResponse::SIZE), seg(&small, 100)]);
    assert_ne!(response_of(&resp).status, status::GOOD);

    inquiry_works(&mut rig);
    assert!(t.running(), "the target exited");
}
