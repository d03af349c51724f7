//! A frontend that breaks the rules: the real target process, reached over its socket with rings
//! in shared memory, gets malformed descriptor chains. Each must be answered with a failure (or
//! returned unused when there is nowhere to answer), and the target must keep serving.

mod common;

use common::{header, request, response_of, seg, Rig, Ring, Target, INQUIRY, READ_10_ONE};
use virtio_initiator_core::queue::Segment;
use virtio_scsi_proto::{response, scsi::status, CmdRequest, CmdResponse, LunAddress, FIRST_REQUEST_QUEUE};

/// A well-formed INQUIRY: proves the target still answers properly.
fn inquiry_works(rig: &Rig, ring: &mut Ring) {
    let req = request(rig, &INQUIRY);
    let resp = rig.buf(CmdResponse::SIZE + 36);
    let done = ring.run(&[seg(&req, CmdRequest::SIZE)], &[seg(&resp, CmdResponse::SIZE + 36)]);
    let r = response_of(&resp);
    assert_eq!((r.response, r.status), (response::OK, status::GOOD));
    assert_eq!(done.len as usize, CmdResponse::SIZE + 36);
}

#[test]
fn malformed_chains_get_failures_and_the_target_survives() {
    let mut t = Target::start("hostile-chains", &[]);
    let mut rig = Rig::connect(&t, false);
    let mut ring = rig.ring(FIRST_REQUEST_QUEUE, 16);
    inquiry_works(&rig, &mut ring);

    // A request header shorter than 51 bytes: VIRTIO_SCSI_S_FAILURE.
    let mut short = rig.buf(20);
    short.write_at(0, &header(LunAddress::new(0, 0).encode(), &INQUIRY)[..20]).unwrap();
    let resp = rig.buf(CmdResponse::SIZE);
    let done = ring.run(&[seg(&short, 20)], &[seg(&resp, CmdResponse::SIZE)]);
    assert_eq!(done.len as usize, CmdResponse::SIZE);
    assert_eq!(response_of(&resp).response, response::FAILURE);

    // No room for a response: handed back with nothing written.
    let mut req = rig.buf(CmdRequest::SIZE);
    req.write_at(0, &header(LunAddress::new(0, 0).encode(), &INQUIRY)).unwrap();
    let tiny = rig.buf(16);
    assert_eq!(ring.run(&[seg(&req, CmdRequest::SIZE)], &[seg(&tiny, 16)]).len, 0);
    // No writable descriptor at all.
    assert_eq!(ring.run(&[seg(&req, CmdRequest::SIZE)], &[]).len, 0);

    // A LUN field that is not virtio-scsi addressing: BAD_TARGET.
    let mut bad_lun = rig.buf(CmdRequest::SIZE);
    bad_lun.write_at(0, &header([0, 0, 0, 0, 0, 0, 0, 0], &INQUIRY)).unwrap();
    let resp = rig.buf(CmdResponse::SIZE);
    ring.run(&[seg(&bad_lun, CmdRequest::SIZE)], &[seg(&resp, CmdResponse::SIZE)]);
    assert_eq!(response_of(&resp).response, response::BAD_TARGET);

    // A data-in buffer outside the memory the target was given: no crash, not a success.
    let mut read = rig.buf(CmdRequest::SIZE);
    read.write_at(0, &header(LunAddress::new(0, 0).encode(), &READ_10_ONE)).unwrap();
    let resp = rig.buf(CmdResponse::SIZE);
    let wild = Segment::new(0x7000_0000_0000, 512);
    ring.run(&[seg(&read, CmdRequest::SIZE)], &[seg(&resp, CmdResponse::SIZE), wild]);
    let r = response_of(&resp);
    assert!(
        r.response != response::OK || r.status != status::GOOD,
        "a read into unmapped memory succeeded: {r:?}"
    );

    // The request header itself outside shared memory: nothing can be read, so FAILURE.
    let resp = rig.buf(CmdResponse::SIZE);
    ring.run(&[Segment::new(0x7000_0000_0000, CmdRequest::SIZE as u32)], &[seg(&resp, CmdResponse::SIZE)]);
    assert_eq!(response_of(&resp).response, response::FAILURE);

    // A data-in buffer smaller than the transfer: the command fails, nothing overflows.
    let small = rig.buf(100);
    let resp = rig.buf(CmdResponse::SIZE);
    ring.run(&[seg(&read, CmdRequest::SIZE)], &[seg(&resp, CmdResponse::SIZE), seg(&small, 100)]);
    assert_ne!(response_of(&resp).status, status::GOOD);

    inquiry_works(&rig, &mut ring);
    assert!(t.running(), "the target exited");
}
