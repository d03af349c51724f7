//! `scsi-response`: how the initiator reads virtio-scsi command responses a hostile device
//! wrote: `CmdResponse::decode` (and the other wire decoders) on arbitrary bytes and lengths,
//! then the real path: a controller and request channel over an in-process device that answers
//! each request with arbitrary response bytes (sense_len, residual, status, response), arbitrary
//! data-in and used lengths, in any order. Every completion record must say exactly what the
//! response area held (or FAILURE when it was not wholly written), sense no longer than 96
//! bytes, data no longer than the buffer, and a bounce buffer is never copied past the
//! caller's buffer. Event-queue entries are fuzzed the same way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use virtio_initiator_core::driver::{
    CompletionRecord, Controller, ControllerOptions, HostBuffer, RequestChannel, RESPONSE_REFUSED,
    SUBMIT_RECORD_SIZE,
};
use virtio_initiator_core::memory::{DmaBuf, HugePages};
use virtio_scsi_proto::{
    response, CmdRequest, CmdResponse, Config, Event, LunAddress, CONTROL_QUEUE, EVENT_QUEUE,
    FIRST_REQUEST_QUEUE, SENSE_SIZE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::fake::{Chain, DevQueue, FakeTransport, Script, State};
use super::Target;
use crate::input::{Input, Seed};
use crate::stats::hit;

const VERSION_1: u64 = 1 << 32;
const INDIRECT: u64 = 1 << 28;
const EVENT_IDX: u64 = 1 << 29;
/// Feature sets the device offers, one controller each.
const FEATURE_SETS: [u64; 4] =
    [VERSION_1, VERSION_1 | INDIRECT, VERSION_1 | EVENT_IDX, VERSION_1 | INDIRECT | EVENT_IDX];
const QUEUE_SIZE: u16 = 16;
const MEMORY: u64 = 4 << 20;
/// Bytes kept around each caller buffer to catch a copy past its end.
const GUARD: usize = 64;
const GUARD_BYTE: u8 = 0x5a;
const FILL_BYTE: u8 = 0xa5;
const MAX_DATA: usize = 16 << 10;

/// One controller with its request channel, and the device side of its queues.
struct Rig {
    controller: Arc<Controller>,
    channel: RequestChannel,
    _state: Arc<Mutex<State>>,
    rq: DevQueue,
    eq: DevQueue,
}

impl Rig {
    fn open(features: u64) -> Rig {
        let config = Config {
            num_queues: 1,
            seg_max: 126,
            max_sectors: 0xffff,
            cmd_per_lun: 128,
            ..Default::default()
        };
        let script = Script {
            features,
            config: Some(config.encode().to_vec()),
            queue_count: Some(3),
            max_queue_size: Vec::new(),
            fail_call: None,
        };
        let (t, state) = FakeTransport::new(script);
        let opts = ControllerOptions {
            request_queues: Some(1),
            queue_size: QUEUE_SIZE,
            memory_bytes: MEMORY,
            max_memory_bytes: Some(MEMORY),
            hugepages: HugePages::Never,
            device: None,
        };
        let controller = Controller::open(Box::new(t), &opts).expect("controller over the fake device");
        let channel = RequestChannel::open(&controller).expect("request channel");
        let (rq, eq) = {
            let st = state.lock().unwrap();
            assert!(st.queues.contains_key(&CONTROL_QUEUE));
            (DevQueue::new(st.queues[&FIRST_REQUEST_QUEUE]), DevQueue::new(st.queues[&EVENT_QUEUE]))
        };
        Rig { controller, channel, _state: state, rq, eq }
    }
}

/// What the completion of one taken record must look like.
#[derive(Debug)]
enum Want {
    Refused,
    /// Any record (a raw one the driver may or may not take).
    Any,
    Done {
        rec: CompletionRecord,
        sense: Vec<u8>,
        data: Vec<u8>,
    },
}

/// A request as submitted, with its caller buffer when it has one.
struct Sub {
    token: u32,
    kind: u8,
    /// Index into the caller buffers.
    buffer: Option<usize>,
}

pub struct ScsiResponse {
    rigs: Vec<Option<Rig>>,
    next_token: u32,
}

impl ScsiResponse {
    pub fn new() -> Self {
        ScsiResponse { rigs: (0..FEATURE_SETS.len()).map(|_| None).collect(), next_token: 1 }
    }
}

/// Decoders of what a device writes, on arbitrary bytes of every length.
fn decode_checks(data: &[u8]) {
    for cut in [data.len(), CmdResponse::SIZE, CmdResponse::SIZE - 1, data.len() / 2] {
        let b = &data[..cut.min(data.len())];
        match CmdResponse::decode(b) {
            None => assert!(b.len() < CmdResponse::SIZE),
            Some(r) => {
                assert_eq!(&r.encode()[..], &b[..CmdResponse::SIZE], "response round trip");
                let want = (r.sense_len as usize).min(SENSE_SIZE);
                assert_eq!(r.sense(), &b[12..12 + want], "sense of sense_len {}", r.sense_len);
                assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), r.resid);
                assert_eq!((r.status, r.response), (b[10], b[11]));
            }
        }
        match Event::decode(b) {
            None => assert!(b.len() < Event::SIZE),
            Some(e) => assert_eq!(&e.encode()[..], &b[..Event::SIZE]),
        }
        if let Ok(raw) = <[u8; 8]>::try_from(&b[..b.len().min(8)]) {
            if let Some(a) = LunAddress::decode(&raw) {
                assert!(a.lun <= virtio_scsi_proto::lun::MAX_LUN);
                assert_eq!(LunAddress::decode(&a.encode()), Some(a));
            }
            if let Some(l) = LunAddress::parse_report_luns_entry(&raw) {
                assert!(l <= virtio_scsi_proto::lun::MAX_LUN);
                assert_eq!(LunAddress::parse_report_luns_entry(&LunAddress::report_luns_entry(l)), Some(l));
            }
        }
    }
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).expect("device reads DMA memory");
    v
}

/// The device answers one request: response bytes, data-in, used length, all from the input.
fn answer(mem: &GuestMemoryMmap, chain: &Chain, inp: &mut Input) -> (u32, Vec<u8>, Vec<u8>) {
    let (resp_at, resp_len) = chain.writable[0];
    assert_eq!(resp_len as usize, CmdResponse::SIZE, "response descriptor");
    let mode = inp.u8();
    match mode % 4 {
        0 | 1 => {
            let s = inp.u8();
            let sense_len = match s % 4 {
                0 => 0,
                1 => 18,
                2 => SENSE_SIZE as u32 + u32::from(s >> 2),
                _ => inp.u32(),
            };
            let r = inp.u8();
            let resp = CmdResponse {
                sense_len,
                resid: inp.u32(),
                status: inp.u8(),
                response: match r % 4 {
                    0 | 1 => response::OK,
                    2 => r >> 2,
                    _ => 0xff,
                },
                status_qualifier: 0,
                sense: std::array::from_fn(|i| (i as u8).wrapping_mul(7).wrapping_add(s)),
            };
            mem.write_slice(&resp.encode(), GuestAddress(resp_at)).unwrap();
        }
        2 => {
            let n = inp.below(CmdResponse::SIZE + 1);
            mem.write_slice(&inp.bytes(n), GuestAddress(resp_at)).unwrap();
        }
        _ => {
            // Writes only the first k bytes, as a device that stops short would.
            let k = inp.below(CmdResponse::SIZE);
            mem.write_slice(&inp.bytes(k), GuestAddress(resp_at)).unwrap();
        }
    }
    let mut written = Vec::new();
    if let Some(&(at, len)) = chain.writable.get(1) {
        let w = match inp.u8() % 3 {
            0 => len as usize,
            1 => 0,
            _ => usize::from(inp.u16()) % (len as usize + 1),
        };
        let p = inp.u8();
        written = (0..w).map(|i| (i as u8).wrapping_mul(31).wrapping_add(p)).collect();
        mem.write_slice(&written, GuestAddress(at)).unwrap();
    }
    let writable: u64 = chain.writable.iter().map(|w| u64::from(w.1)).sum();
    let len = match inp.u8() % 6 {
        0 => (CmdResponse::SIZE + written.len()) as u32,
        1 => inp.u32(),
        2 => 0,
        3 => CmdResponse::SIZE as u32 - 1,
        4 => writable as u32,
        _ => u32::MAX,
    };
    let head = read(mem, resp_at, CmdResponse::SIZE);
    (len, head, written)
}

/// The record the driver must produce for a request answered with `head` and used length `len`.
fn expected(token: u32, head: &[u8], len: u32, writable: u64, data_in: u32) -> (CompletionRecord, Vec<u8>) {
    let len = u64::from(len).min(writable);
    let mut rec = CompletionRecord { token, response: response::FAILURE, ..Default::default() };
    let mut sense = Vec::new();
    if len >= CmdResponse::SIZE as u64 && head[11] != 0xff {
        let r = CmdResponse::decode(head).unwrap();
        rec.response = r.response;
        rec.status = r.status;
        rec.residual = r.resid;
        rec.data_len = ((len - CmdResponse::SIZE as u64) as u32).min(data_in);
        sense = r.sense().to_vec();
        rec.sense_len = sense.len() as u16;
    }
    (rec, sense)
}

/// One 64-byte submission record.
#[allow(clippy::too_many_arguments)]
fn record(
    token: u32,
    kind: u8,
    direction: u8,
    flags: u8,
    cdb: &[u8],
    lba: u64,
    blocks: u32,
    len: u32,
    data: u64,
) -> [u8; 64] {
    let mut r = [0u8; SUBMIT_RECORD_SIZE];
    r[0..4].copy_from_slice(&token.to_le_bytes());
    r[5] = direction;
    r[8..12].copy_from_slice(&len.to_le_bytes());
    r[12] = kind;
    r[14] = flags;
    if kind == 0 {
        r[15] = cdb.len() as u8;
        r[16..16 + cdb.len()].copy_from_slice(cdb);
    } else {
        r[16..24].copy_from_slice(&lba.to_le_bytes());
        r[24..28].copy_from_slice(&blocks.to_le_bytes());
    }
    r[48..56].copy_from_slice(&data.to_le_bytes());
    r
}

impl Target for ScsiResponse {
    fn seeds(&self) -> Vec<Vec<u8>> {
        let mut seeds = Vec::new();
        // The device's answer to one chain: taken first, a whole response (sense selector,
        // response selector, residual, status), all data-in, the honest used length.
        let answer = |s: Seed, sense: u8, status: u8, data_in: bool, later: bool| {
            let s = s.u8(0).u8(0).u8(sense).u8(0).u32(0).u8(status);
            let s = if data_in { s.u8(0).u8(1) } else { s };
            s.u8(0).u8(later.into())
        };
        for set in 0..FEATURE_SETS.len() as u8 {
            // A READ answered GOOD with all its data, a WRITE, a TEST UNIT READY with CHECK
            // CONDITION and 18 bytes of sense completed after a first poll, then two events.
            let s = Seed::new().u8(set).u8(2);
            let s = s.u8(0).u16(4095).u32(0).u32(8);
            let s = s.u8(2).u16(511).u8(0).u32(0).u32(1);
            let s = s.u8(3).u16(0).u8(0).bytes(&[0; 6]);
            let s = answer(s, 0, 0, true, false);
            let s = answer(s, 0, 0, false, false);
            let s = answer(s, 1, 2, false, true);
            let s = s.u8(2).u8(2);
            let s = s.u8(16).bytes(&[1, 0, 0, 0, 1, 0, 0, 5, 0, 0, 0, 0, 1, 0, 0, 0]).u8(0);
            seeds.push(s.u8(16).bytes(&[2, 0, 0, 0, 1, 2, 0x40, 3, 0, 0, 0, 0, 0, 0, 0, 0]).u8(0).build());
        }
        // A partial response, a huge sense_len, a used length past the buffers.
        seeds.push(Seed::new().u8(1).u8(0).u8(0).u16(600).u32(2).u8(1).u8(3).u8(50).u8(0).u8(5).build());
        seeds.push(
            Seed::new()
                .u8(0)
                .u8(0)
                .u8(4)
                .u16(100)
                .u8(0)
                .u8(3)
                .u32(u32::MAX)
                .u8(1)
                .u32(7)
                .u8(2)
                .u8(0)
                .u8(0)
                .u8(5)
                .build(),
        );
        // The wire decoders: a whole response with a sense_len past the buffer.
        let mut r = CmdResponse { sense_len: 1000, resid: 7, status: 2, ..Default::default() };
        r.sense[0] = 0x70;
        seeds.push(r.encode().to_vec());
        seeds
    }

    fn run(&mut self, data: &[u8]) {
        decode_checks(data);
        let mut inp = Input::new(data);
        let set = usize::from(inp.u8()) % FEATURE_SETS.len();
        let rig = self.rigs[set].get_or_insert_with(|| Rig::open(FEATURE_SETS[set]));
        let pool = rig.controller.pool();
        let mem = pool.memory();

        // The batch: each record with its caller buffer, if any.
        let count = 1 + inp.below(6);
        let mut batch = Vec::with_capacity(count * SUBMIT_RECORD_SIZE);
        let mut buffers: Vec<Vec<u8>> = Vec::new();
        let mut dma: Vec<DmaBuf> = Vec::new();
        let mut subs = Vec::new();
        for _ in 0..count {
            let token = self.next_token;
            self.next_token = self.next_token.wrapping_add(1).max(1);
            let kind = inp.u8() % 8;
            let len = 1 + usize::from(inp.u16()) % MAX_DATA;
            let mut buffer = None;
            let host = |buffers: &mut Vec<Vec<u8>>, fill: u8| {
                let mut v = vec![GUARD_BYTE; len + 2 * GUARD];
                v[GUARD..GUARD + len].fill(fill);
                buffers.push(v);
                buffers.len() - 1
            };
            let rec = match kind {
                0 | 1 => {
                    let k = host(&mut buffers, FILL_BYTE);
                    buffer = Some(k);
                    record(token, 1, 1, 0, &[], inp.u32().into(), inp.u32().max(1), 0, k as u64)
                }
                2 => {
                    let k = host(&mut buffers, 0x3c);
                    buffer = Some(k);
                    record(token, 2, 2, inp.u8() & 1, &[], inp.u32().into(), inp.u32().max(1), 0, k as u64)
                }
                3 => {
                    let n = 6 + inp.below(27);
                    record(token, 0, 0, 0, &inp.bytes(n), 0, 0, 0, 0)
                }
                4 => match rig.controller.alloc_dma(len, 64) {
                    // Data by address, inside DMA memory: no bounce buffer.
                    Ok(buf) => {
                        let r = record(
                            token,
                            0,
                            1,
                            2,
                            &[0x12, 0, 0, 0, 96, 0],
                            0,
                            0,
                            len as u32,
                            buf.as_ptr() as u64,
                        );
                        dma.push(buf);
                        r
                    }
                    Err(_) => record(token, 0, 0, 0, &[0; 6], 0, 0, 0, 0),
                },
                5 => {
                    // Data by address outside DMA memory: refused.
                    let k = host(&mut buffers, 0);
                    let p = buffers[k].as_ptr() as u64;
                    record(token, 0, 1, 2, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0, 0, 512, p)
                }
                6 => record(token, 3, 0, inp.u8() & 4, &[], 0, 0, 0, 0),
                _ => {
                    let mut r: [u8; 64] = inp.bytes(SUBMIT_RECORD_SIZE).try_into().unwrap();
                    r[0..4].copy_from_slice(&token.to_le_bytes());
                    if r[14] & 2 == 0 {
                        // No caller buffer behind any index.
                        r[48..56].copy_from_slice(&u64::MAX.to_le_bytes());
                    }
                    r
                }
            };
            batch.extend_from_slice(&rec);
            subs.push(Sub { token, kind, buffer });
        }
        let hosts: Vec<Option<HostBuffer>> = buffers
            .iter_mut()
            .map(|v| Some(HostBuffer { ptr: v[GUARD..].as_mut_ptr(), len: v.len() - 2 * GUARD }))
            .collect();
        // SAFETY: the buffers outlive every request: all of them complete before this returns.
        let taken =
            unsafe { rig.channel.submit(&batch, count, &hosts) }.expect("submit on a working controller");
        assert!(taken <= count);
        subs.truncate(taken);

        let mut want: HashMap<u32, (Want, Option<usize>, u8)> = subs
            .iter()
            .map(|s| {
                let w = match s.kind {
                    5 => Want::Refused,
                    7 => Want::Any,
                    _ => Want::Done { rec: CompletionRecord::default(), sense: Vec::new(), data: Vec::new() },
                };
                (s.token, (w, s.buffer, s.kind))
            })
            .collect();

        // The device takes every chain, answers each in an order of the input's choosing, some
        // only after the driver has polled once.
        let mut chains = Vec::new();
        while let Some(c) = rig.rq.pop(mem) {
            chains.push(c);
            assert!(chains.len() <= taken, "more chains than requests");
        }
        let mut later = Vec::new();
        while !chains.is_empty() {
            let c = chains.remove(inp.below(chains.len()));
            let hdr = read(mem, c.readable[0].0, CmdRequest::SIZE);
            let token = u64::from_le_bytes(hdr[8..16].try_into().unwrap()) as u32;
            let entry = want.get_mut(&token).expect("a chain for a request that was taken");
            // Data-out must reach the device as the caller wrote it.
            if let (Some(&(at, len)), Some(k)) = (c.readable.get(1), entry.1) {
                assert_eq!(read(mem, at, len as usize), &buffers[k][GUARD..GUARD + len as usize], "data-out");
            }
            let (len, head, written) = answer(mem, &c, &mut inp);
            let writable = c.writable.iter().map(|w| u64::from(w.1)).sum();
            let data_in = c.writable.get(1).map_or(0, |w| w.1);
            let (rec, sense) = expected(token, &head, len, writable, data_in);
            if let Want::Done { .. } = entry.0 {
                entry.0 = Want::Done { rec, sense, data: written };
            }
            if inp.bool() {
                later.push((c.head, len));
            } else {
                rig.rq.complete(mem, u32::from(c.head), len);
            }
        }

        let seen = std::cell::Cell::new(0usize);
        let mut check = |_: usize, rec: &CompletionRecord, sense: &[u8]| {
            let (w, buffer, kind) =
                want.remove(&rec.token).expect("a completion for a request in flight, once");
            assert_eq!(sense.len(), rec.sense_len as usize, "sense slice");
            assert!(rec.sense_len as usize <= SENSE_SIZE);
            match w {
                Want::Refused => {
                    hit("record: refused");
                    assert_eq!(rec.response, RESPONSE_REFUSED, "refused record: {rec:?}")
                }
                Want::Any => hit(if rec.response == RESPONSE_REFUSED {
                    "raw record: refused"
                } else {
                    "raw record: taken"
                }),
                Want::Done { rec: e, sense: es, data } => {
                    assert_eq!(
                        (rec.response, rec.status, rec.sense_len, rec.residual, rec.data_len),
                        (e.response, e.status, e.sense_len, e.residual, e.data_len),
                        "completion record"
                    );
                    assert_eq!(sense, &es[..], "sense bytes");
                    hit(match (e.response, e.sense_len, e.data_len) {
                        (response::FAILURE, ..) => "record: failure",
                        (_, 1.., _) => "record: with sense",
                        (_, _, 1..) => "record: with data",
                        _ => "record: other",
                    });
                    if let Some(k) = buffer {
                        let b = &buffers[k];
                        let n = b.len() - 2 * GUARD;
                        assert!(
                            b[..GUARD].iter().chain(&b[GUARD + n..]).all(|&x| x == GUARD_BYTE),
                            "guard bytes"
                        );
                        assert!(rec.data_len as usize <= n, "data length past the buffer");
                        let body = &b[GUARD..GUARD + n];
                        let copied = (rec.data_len as usize).min(data.len());
                        assert_eq!(&body[..copied], &data[..copied], "data-in copied back");
                        if kind <= 1 {
                            assert!(
                                body[rec.data_len as usize..].iter().all(|&x| x == FILL_BYTE),
                                "bytes past data_len"
                            );
                        }
                    }
                }
            }
            seen.set(seen.get() + 1);
        };
        let max = 1 + inp.below(count);
        rig.channel.complete(max, &mut check).expect("completions from a working controller");
        for (head, len) in later {
            rig.rq.complete(mem, u32::from(head), len);
        }
        for _ in 0..2 * count + 2 {
            if seen.get() == taken {
                break;
            }
            rig.channel.complete(count, &mut check).expect("completions from a working controller");
        }
        assert_eq!(seen.get(), taken, "every request completed once");
        assert_eq!(rig.channel.in_flight(), 0);
        drop(dma);

        // Event queue: arbitrary event bytes and lengths.
        let events = inp.u8() % 9;
        let mut posted = 0;
        for _ in 0..events {
            let Some(c) = rig.eq.pop(mem) else { break };
            assert_eq!(c.writable.len(), 1);
            let n = inp.below(Event::SIZE + 1);
            mem.write_slice(&inp.bytes(n), GuestAddress(c.writable[0].0)).unwrap();
            let len = match inp.u8() % 4 {
                0 => Event::SIZE as u32,
                1 => n as u32,
                2 => inp.u32(),
                _ => 0,
            };
            rig.eq.complete(mem, u32::from(c.head), len);
            posted += 1;
        }
        if posted > 0 {
            let got = rig.controller.poll_events().expect("events from a working controller");
            assert!(got.len() <= posted, "{} events from {posted} entries", got.len());
            if !got.is_empty() {
                hit("events: reported");
            }
        }
        assert!(rig.controller.failure().is_none(), "controller failed: {:?}", rig.controller.failure());
    }
}
