//! `blk-response`: how the initiator frames virtio-blk requests and reads what a hostile device
//! answers. A controller of a virtio-blk device (an in-process one, offering INDIRECT_DESC,
//! EVENT_IDX, BLK_SIZE of 512 or 4096 bytes, FLUSH, DISCARD, WRITE_ZEROES, RO and one or two
//! request queues in various combinations) takes batches of submission records: READ, WRITE,
//! FLUSH, DISCARD, WRITE ZEROES and GET ID built with and without faults, SCSI CDBs, and raw
//! records. A model of the channel predicts, for every record, the refusal and its reason, or
//! the exact descriptor chain the device must find (segment count, lengths and order, the
//! header's type and sector, the range segment, the data-out bytes, the status byte preset to
//! 0xff). The device answers each chain with arbitrary status bytes (0xff and values above 2
//! included), data-in bytes and used lengths, in any order, after a poll, late, or never (the
//! queue is then given back with the requests on it); now and then it posts a used entry for
//! no request, which must fail the controller.
//!
//! Every completion must follow the virtio-blk rule: with a used length of at least 1 and a
//! status byte other than 0xff, response 0, that status and `min(used - 1, data-in bytes)`
//! bytes of data; otherwise response 9 (FAILURE), status 0 and no data. Data-in goes back into
//! the caller's buffer (through a bounce buffer for memory outside DMA memory) never past its
//! end and never beyond `data_len`; nothing else of the caller's memory changes.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use virtio_blk_proto::{feature, request, Config, RangeSegment, RequestHeader};
use virtio_initiator_core::driver::{
    CompletionRecord, Controller, ControllerOptions, DeviceType, DriverError, HostBuffer, RequestChannel,
    Span, FLAG_DATA_ADDRESS, FLAG_FUA, FLAG_LONG_CDB, FLAG_UNMAP, RESPONSE_REFUSED, SUBMIT_RECORD_SIZE,
};
use virtio_initiator_core::memory::{DmaBuf, HugePages};
use virtio_scsi_proto::{lun::MAX_LUN, response, SENSE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::fake::{Chain, DevQueue, FakeTransport, Script, State};
use super::Target;
use crate::input::{Input, Seed};
use crate::stats::hit;

const VERSION_1: u64 = 1 << 32;
const INDIRECT: u64 = 1 << 28;
const EVENT_IDX: u64 = 1 << 29;
const fn bit(b: u32) -> u64 {
    1 << b
}
/// Device variants, one controller each (see [`Variant::of`]).
const VARIANTS: usize = 48;
const QUEUE_SIZE: u16 = 16;
const MEMORY: u64 = 2 << 20;
/// Records per batch, at most.
const MAX_BATCH: usize = 6;
/// Bytes of a raw record's own buffer, at most.
const MAX_DATA: usize = 16 << 10;
/// Bytes kept around each caller buffer to catch a copy past its end.
const GUARD: usize = 64;
const GUARD_BYTE: u8 = 0x5a;
/// What a data-in buffer holds before the device answers.
const FILL_BYTE: u8 = 0xa5;
/// The status byte the driver presets: a device that never writes one is caught.
const NO_STATUS: u8 = 0xff;
/// GET ID's data, as every caller sizes it.
const ID_BYTES: usize = virtio_blk_proto::ID_BYTES;

/// What one controller's device offers.
#[derive(Clone, Copy, Debug)]
struct Variant {
    features: u64,
    config: Config,
    queues: u16,
    /// The logical block size the driver must take (512 unless BLK_SIZE was offered).
    block_size: u32,
    read_only: bool,
}

impl Variant {
    /// Variant `i` (below [`VARIANTS`]): INDIRECT_DESC (bit 0), EVENT_IDX (bit 1), RO (bit 2),
    /// two request queues with MQ (bit 3), and BLK_SIZE from `i >> 4`: not offered (with 4096
    /// in the configuration space, to be ignored), 512, or 4096. FLUSH, DISCARD and
    /// WRITE_ZEROES are offered when INDIRECT_DESC and EVENT_IDX are both on or both off.
    fn of(i: usize) -> Variant {
        let indirect = i & 1 != 0;
        let event_idx = i & 2 != 0;
        let read_only = i & 4 != 0;
        let queues = if i & 8 != 0 { 2 } else { 1 };
        let mut features = VERSION_1;
        if indirect {
            features |= INDIRECT;
        }
        if event_idx {
            features |= EVENT_IDX;
        }
        if read_only {
            features |= bit(feature::RO);
        }
        if queues > 1 {
            features |= bit(feature::MQ);
        }
        if indirect == event_idx {
            features |= bit(feature::FLUSH) | bit(feature::DISCARD) | bit(feature::WRITE_ZEROES);
        }
        let (blk_size, block_size) = match (i >> 4) % 3 {
            0 => (4096, 512),
            1 => {
                features |= bit(feature::BLK_SIZE);
                (512, 512)
            }
            _ => {
                features |= bit(feature::BLK_SIZE);
                (4096, 4096)
            }
        };
        let config = Config {
            capacity: 1 << 24,
            seg_max: 126,
            blk_size,
            num_queues: queues,
            max_discard_sectors: 0xffff,
            max_discard_seg: 1,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 0xffff,
            max_write_zeroes_seg: 1,
            write_zeroes_may_unmap: 1,
            ..Default::default()
        };
        Variant { features, config, queues, block_size, read_only }
    }

    fn indirect(&self) -> bool {
        self.features & INDIRECT != 0
    }

    fn shift(&self) -> u32 {
        self.block_size.trailing_zeros() - 9
    }
}

/// One request queue: the channel over it and the device side of its ring.
struct Lane {
    channel: RequestChannel,
    dev: DevQueue,
}

/// One controller with a channel on each of its request queues.
struct Rig {
    lanes: Vec<Lane>,
    controller: Arc<Controller>,
    state: Arc<Mutex<State>>,
    variant: Variant,
}

impl Rig {
    fn open(variant: Variant) -> Rig {
        let script = Script {
            features: variant.features,
            config: Some(variant.config.encode().to_vec()),
            queue_count: Some(variant.queues),
            max_queue_size: Vec::new(),
            fail_call: None,
        };
        let (t, state) = FakeTransport::new(script);
        let opts = ControllerOptions {
            request_queues: None,
            queue_size: QUEUE_SIZE,
            memory_bytes: MEMORY,
            max_memory_bytes: Some(MEMORY),
            hugepages: HugePages::Never,
            device: Some(DeviceType::Blk),
        };
        let controller = Controller::open(Box::new(t), &opts).expect("controller over the fake blk device");
        let info = controller.info();
        let blk = info.blk().expect("a virtio-blk configuration");
        assert_eq!(
            (blk.block_size, blk.read_only, info.request_queues, info.indirect, info.event_idx),
            (
                variant.block_size,
                variant.read_only,
                variant.queues,
                variant.indirect(),
                variant.features & EVENT_IDX != 0
            ),
            "what the controller took from {variant:?}"
        );
        {
            let st = state.lock().unwrap();
            // Every feature offered here is one the driver takes.
            assert_eq!(st.acked, Some(variant.features), "features acked");
            // No control or event queue: the request queues are virtqueues 0 and up.
            assert_eq!(
                st.queues.keys().copied().collect::<Vec<_>>(),
                (0..variant.queues).collect::<Vec<_>>()
            );
        }
        let lanes = (0..variant.queues).map(|_| Lane::open(&controller, &state)).collect();
        hit("rig: opened");
        Rig { lanes, controller, state, variant }
    }
}

impl Lane {
    fn open(controller: &Arc<Controller>, state: &Arc<Mutex<State>>) -> Lane {
        let channel = RequestChannel::open(controller).expect("request channel");
        let rings = state.lock().unwrap().queues[&channel.queue_index()];
        Lane { channel, dev: DevQueue::new(rings) }
    }
}

/// Why the driver refuses a record: a piece of the reason it gives, and a stats label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Why {
    key: &'static str,
    label: &'static str,
}

const BAD_DIRECTION: Why =
    Why { key: "1 (data-in) or 2 (data-out)", label: "refused: direction out of range" };
const LUN_RANGE: Why = Why { key: "is above", label: "refused: LUN out of range" };
const ZERO_LENGTH: Why = Why { key: "data length 0", label: "refused: by-address data of 0 bytes" };
const CDB_LENGTH: Why = Why { key: "is outside 6..=32", label: "refused: CDB length" };
const BAD_KIND: Why = Why { key: "is not 0 (CDB)", label: "refused: unknown kind" };
const KIND_DIRECTION: Why = Why { key: "record needs direction", label: "refused: direction for the kind" };
const ZERO_BLOCKS: Why = Why { key: "of 0 blocks", label: "refused: 0 blocks" };
const MISSING: Why = Why { key: "is missing", label: "refused: no buffer at the index" };
const NOT_DMA: Why = Why { key: "is not DMA memory", label: "refused: address outside DMA memory" };
const ONE_DISK: Why = Why { key: "is one disk", label: "refused: nonzero target or LUN" };
const SCSI: Why = Why { key: "go to virtio-scsi devices", label: "refused: CDB kind" };
const FUA: Why = Why { key: "no forced unit access", label: "refused: FUA write" };
const READ_ONLY: Why = Why { key: "is read-only", label: "refused: write on a read-only device" };
const LENGTH: Why = Why { key: "-byte buffer", label: "refused: data length is not blocks * block size" };
const LBA: Why = Why { key: "is beyond any device", label: "refused: LBA overflows in sectors" };
const RANGE: Why = Why { key: "more than one", label: "refused: range too long in sectors" };

/// The data segment a request must carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Data {
    len: u32,
    /// The device writes it (READ, GET ID), else reads it (WRITE).
    device_writes: bool,
    /// Where it is when the caller's memory is DMA memory; None: a bounce buffer.
    iova: Option<u64>,
}

/// The chain the device must find for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    request_type: u32,
    sector: u64,
    range: Option<RangeSegment>,
    data: Option<Data>,
}

impl Layout {
    fn segments(&self) -> u16 {
        2 + u16::from(self.range.is_some()) + u16::from(self.data.is_some())
    }

    fn data_in(&self) -> u32 {
        self.data.filter(|d| d.device_writes).map_or(0, |d| d.len)
    }

    fn label(&self) -> &'static str {
        match (self.request_type, self.range.map(|r| r.unmap), self.data.map(|d| d.iova.is_some())) {
            (request::IN, _, Some(false)) => "chain: READ through a bounce buffer",
            (request::IN, _, _) => "chain: READ into DMA memory",
            (request::OUT, _, Some(false)) => "chain: WRITE through a bounce buffer",
            (request::OUT, _, _) => "chain: WRITE from DMA memory",
            (request::FLUSH, ..) => "chain: FLUSH",
            (request::DISCARD, ..) => "chain: DISCARD",
            (request::WRITE_ZEROES, Some(true), _) => "chain: WRITE ZEROES, unmap",
            (request::WRITE_ZEROES, ..) => "chain: WRITE ZEROES",
            (request::GET_ID, _, Some(false)) => "chain: GET ID through a bounce buffer",
            _ => "chain: GET ID into DMA memory",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Refused(Why),
    Device(Layout),
}

/// What the model needs to know of the channel's surroundings.
struct Ctx<'a> {
    hosts: &'a [Option<HostBuffer>],
    spans: &'a [Span],
    variant: Variant,
}

fn u32_at(r: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(r[at..at + 4].try_into().unwrap())
}

fn u64_at(r: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(r[at..at + 8].try_into().unwrap())
}

/// True when `len` bytes at `host` lie in DMA memory (regions adjacent in our address space
/// count as one).
fn covered(spans: &[Span], host: u64, len: u64) -> bool {
    let Some(end) = host.checked_add(len) else { return false };
    let mut at = host;
    while at < end {
        match spans.iter().find(|s| at >= s.host && at - s.host < s.size) {
            Some(s) => at = s.host + s.size,
            None => return false,
        }
    }
    true
}

/// What the channel must make of one 64-byte record on a virtio-blk device: the first reason
/// to refuse it, in the order the driver checks, or the chain it goes down as.
fn predict(r: &[u8; SUBMIT_RECORD_SIZE], c: &Ctx) -> Expect {
    use Expect::Refused;
    let direction = r[5];
    if direction > 2 {
        return Refused(BAD_DIRECTION);
    }
    let lun = u16::from_le_bytes([r[6], r[7]]);
    if lun > MAX_LUN {
        return Refused(LUN_RANGE);
    }
    let flags = r[14];
    // Index into the buffer list, or (address, length).
    let data = match direction {
        0 => None,
        _ if flags & FLAG_DATA_ADDRESS != 0 => {
            let len = u32_at(r, 8);
            if len == 0 {
                return Refused(ZERO_LENGTH);
            }
            Some(Err((u64_at(r, 48), len)))
        }
        _ => Some(Ok(u32_at(r, 48))),
    };
    let kind = r[12];
    let wanted = match kind {
        0 => {
            if !(6..=32).contains(&r[15]) {
                return Refused(CDB_LENGTH);
            }
            None
        }
        1 | 6 => Some(1),
        2 => Some(2),
        3..=5 => Some(0),
        _ => return Refused(BAD_KIND),
    };
    if wanted.is_some_and(|w| w != direction) {
        return Refused(KIND_DIRECTION);
    }
    let (lba, blocks) = (u64_at(r, 16), u32_at(r, 24));
    if matches!(kind, 1 | 2 | 4 | 5) && blocks == 0 {
        return Refused(ZERO_BLOCKS);
    }
    let (host, len) = match data {
        None => (0, 0),
        Some(Ok(k)) => match c.hosts.get(k as usize).copied().flatten() {
            Some(b) => (b.ptr as u64, b.len as u32),
            None => return Refused(MISSING),
        },
        Some(Err((addr, len))) => {
            if !covered(c.spans, addr, u64::from(len)) {
                return Refused(NOT_DMA);
            }
            (addr, len)
        }
    };
    let iova = c.spans.iter().find_map(|s| s.iova_of(host, u64::from(len)));
    if r[4] != 0 || lun != 0 {
        return Refused(ONE_DISK);
    }
    let shift = c.variant.shift();
    let sectors = |lba: u64| (shift == 0 || lba >> (64 - shift) == 0).then(|| lba << shift);
    let data = |device_writes| Some(Data { len, device_writes, iova });
    // Whatever changes the medium, a read-only device refuses first.
    if matches!(kind, 2 | 4 | 5) && c.variant.read_only {
        return Refused(READ_ONLY);
    }
    let layout = match kind {
        0 => return Refused(SCSI),
        1 | 2 => {
            if kind == 2 && flags & FLAG_FUA != 0 {
                return Refused(FUA);
            }
            if u64::from(len) != u64::from(blocks) * u64::from(c.variant.block_size) {
                return Refused(LENGTH);
            }
            let Some(sector) = sectors(lba) else { return Refused(LBA) };
            let request_type = if kind == 1 { request::IN } else { request::OUT };
            Layout { request_type, sector, range: None, data: data(kind == 1) }
        }
        3 => Layout { request_type: request::FLUSH, sector: 0, range: None, data: None },
        4 | 5 => {
            let num_sectors = u64::from(blocks) << shift;
            if num_sectors > u64::from(u32::MAX) {
                return Refused(RANGE);
            }
            let Some(sector) = sectors(lba) else { return Refused(LBA) };
            let unmap = kind == 5 && flags & FLAG_UNMAP != 0;
            let range = RangeSegment { sector, num_sectors: num_sectors as u32, unmap };
            let request_type = if kind == 4 { request::DISCARD } else { request::WRITE_ZEROES };
            Layout { request_type, sector: 0, range: Some(range), data: None }
        }
        _ => Layout { request_type: request::GET_ID, sector: 0, range: None, data: data(true) },
    };
    Expect::Device(layout)
}

/// One 64-byte submission record.
#[allow(clippy::too_many_arguments)]
fn record(
    token: u32,
    target: u8,
    direction: u8,
    lun: u16,
    len: u32,
    kind: u8,
    flags: u8,
    lba: u64,
    blocks: u32,
    data: u64,
) -> [u8; SUBMIT_RECORD_SIZE] {
    let mut r = [0u8; SUBMIT_RECORD_SIZE];
    r[0..4].copy_from_slice(&token.to_le_bytes());
    r[4] = target;
    r[5] = direction;
    r[6..8].copy_from_slice(&lun.to_le_bytes());
    r[8..12].copy_from_slice(&len.to_le_bytes());
    r[12] = kind;
    r[14] = flags;
    r[16..24].copy_from_slice(&lba.to_le_bytes());
    r[24..28].copy_from_slice(&blocks.to_le_bytes());
    r[48..56].copy_from_slice(&data.to_le_bytes());
    r
}

/// Caller memory a record's data names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mem {
    /// `buffers[k]`: plain memory, between guard bytes.
    Host(usize),
    /// `dma[d]`: DMA memory of the controller.
    Dma(usize),
}

/// The caller's memory of one execution, and what it held before the batch.
#[derive(Default)]
struct Memory {
    buffers: Vec<Vec<u8>>,
    buffers_before: Vec<Vec<u8>>,
    dma: Vec<DmaBuf>,
    dma_before: Vec<Vec<u8>>,
    /// What the buffer list passed with the batch holds, by index.
    list: Vec<Option<Mem>>,
}

impl Memory {
    /// A buffer of `len` bytes, filled with `fill` (of the byte offset), in plain memory or in
    /// DMA memory; plain memory when DMA memory is short.
    fn buffer(&mut self, controller: &Controller, len: usize, dma: bool, fill: impl Fn(usize) -> u8) -> Mem {
        let body: Vec<u8> = (0..len).map(fill).collect();
        if dma {
            if let Ok(mut b) = controller.alloc_dma(len, 64) {
                b.write_at(0, &body).expect("fill a DMA buffer");
                self.dma.push(b);
                self.dma_before.push(body);
                return Mem::Dma(self.dma.len() - 1);
            }
        }
        let mut v = vec![GUARD_BYTE; len + 2 * GUARD];
        v[GUARD..GUARD + len].copy_from_slice(&body);
        self.buffers_before.push(v.clone());
        self.buffers.push(v);
        Mem::Host(self.buffers.len() - 1)
    }

    /// Puts `m` (or nothing) on the buffer list; its index.
    fn list(&mut self, m: Option<Mem>) -> u64 {
        self.list.push(m);
        (self.list.len() - 1) as u64
    }

    /// Host address of `m`'s first byte; plain buffers do not move (their heap allocation
    /// stays where it is when the list of them grows).
    fn ptr(&mut self, m: Mem) -> *mut u8 {
        match m {
            Mem::Host(k) => self.buffers[k][GUARD..].as_mut_ptr(),
            Mem::Dma(d) => self.dma[d].as_ptr(),
        }
    }

    fn len(&self, m: Mem) -> usize {
        match m {
            Mem::Host(k) => self.buffers[k].len() - 2 * GUARD,
            Mem::Dma(d) => self.dma[d].len(),
        }
    }

    /// The bytes of `m` now (a plain buffer with its guards).
    fn now(&self, m: Mem) -> Vec<u8> {
        match m {
            Mem::Host(k) => self.buffers[k].clone(),
            Mem::Dma(d) => {
                let mut v = vec![0u8; self.dma[d].len()];
                self.dma[d].read_at(0, &mut v).expect("read a DMA buffer");
                v
            }
        }
    }

    fn before(&self, m: Mem) -> &[u8] {
        match m {
            Mem::Host(k) => &self.buffers_before[k],
            Mem::Dma(d) => &self.dma_before[d],
        }
    }

    /// The buffer list for `submit`.
    fn host_list(&mut self) -> Vec<Option<HostBuffer>> {
        let list = self.list.clone();
        list.into_iter().map(|m| m.map(|m| HostBuffer { ptr: self.ptr(m), len: self.len(m) })).collect()
    }

    /// `m` holds what it held before the batch.
    fn assert_untouched(&self, m: Mem, what: &str) {
        assert!(self.now(m) == self.before(m), "{what}: caller memory {m:?} changed");
    }
}

/// A record as submitted.
struct Sub {
    token: u32,
    raw: [u8; SUBMIT_RECORD_SIZE],
    /// The caller memory its data names, when it names any of ours.
    mem: Option<Mem>,
    expect: Expect,
}

/// A constructed record's deliberate fault.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Length,
    Target,
    Lun,
    Fua,
    HugeLba,
    HugeBlocks,
    Outside,
    Missing,
}

/// A record and the caller memory its data names, when it names any of ours.
type Built = ([u8; SUBMIT_RECORD_SIZE], Option<Mem>);

/// Reads one record from the input and builds it with its memory.
fn build(inp: &mut Input, token: u32, v: Variant, controller: &Controller, m: &mut Memory) -> Built {
    let sel = inp.u8() % 9;
    if sel == 8 {
        return build_raw(inp, token, v, controller, m);
    }
    let place = inp.u8() % 4;
    let blocks = 1 + u32::from(inp.u8() % 8);
    let lba = u64::from(inp.u32());
    let fault = match inp.u8() % 20 {
        12 => Fault::Length,
        13 => Fault::Target,
        14 => Fault::Lun,
        15 => Fault::Fua,
        16 => Fault::HugeLba,
        17 => Fault::HugeBlocks,
        18 => Fault::Outside,
        19 => Fault::Missing,
        _ => Fault::None,
    };
    let extra = inp.u8();
    let target = if fault == Fault::Target { 1 + extra % 255 } else { 0 };
    let lun = if fault == Fault::Lun { 1 + u16::from(extra) } else { 0 };
    let lba = if fault == Fault::HugeLba { u64::MAX >> (extra % 4) } else { lba };
    let blocks = if fault == Fault::HugeBlocks { u32::MAX >> (extra % 4) } else { blocks };
    let (kind, direction) = match sel {
        0 | 1 => (1, 1),
        2 => (2, 2),
        3 => (3, 0),
        4 => (4, 0),
        5 => (5, 0),
        6 => (6, 1),
        _ => (0, 0),
    };
    let mut flags = match kind {
        1 | 2 if fault == Fault::Fua => FLAG_FUA,
        // Flags the request does not take change nothing.
        3 if extra & 1 != 0 => FLAG_LONG_CDB,
        4 if extra & 2 != 0 => FLAG_UNMAP,
        5 if extra & 1 != 0 => FLAG_UNMAP,
        _ => 0,
    };
    let (mut len, mut data) = (0u32, 0u64);
    let mut mem = None;
    if direction != 0 {
        let right = if kind == 6 { ID_BYTES } else { (blocks as usize).min(8) * v.block_size as usize };
        let n = match fault {
            Fault::Length if kind == 6 => 1 + usize::from(extra % 64),
            Fault::Length if extra & 1 == 0 => right + 1 + usize::from(extra),
            Fault::Length => right - 1 - usize::from(extra) % 511,
            _ => right,
        };
        let fill = |i: usize| {
            if direction == 1 {
                FILL_BYTE
            } else {
                (i as u8).wrapping_mul(13).wrapping_add(token as u8)
            }
        };
        match fault {
            Fault::Outside => {
                // By address, but plain memory: never DMA memory.
                let b = m.buffer(controller, n, false, fill);
                (flags, len, data, mem) = (flags | FLAG_DATA_ADDRESS, n as u32, m.ptr(b) as u64, Some(b));
            }
            Fault::Missing => data = m.list(None),
            _ => {
                let b = m.buffer(controller, n, place >= 2, fill);
                mem = Some(b);
                if place == 2 && matches!(b, Mem::Dma(_)) {
                    (flags, len, data) = (flags | FLAG_DATA_ADDRESS, n as u32, m.ptr(b) as u64);
                } else {
                    data = m.list(Some(b));
                }
            }
        }
    }
    let mut r = record(token, target, direction, lun, len, kind, flags, lba, blocks, data);
    if kind == 0 {
        let n = 6 + usize::from(extra % 11);
        r[15] = n as u8;
        r[16..16 + n].copy_from_slice(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0][..n]);
    }
    (r, mem)
}

/// A record of arbitrary bytes, given memory of its own where it names some.
fn build_raw(inp: &mut Input, token: u32, v: Variant, controller: &Controller, m: &mut Memory) -> Built {
    let mut r: [u8; SUBMIT_RECORD_SIZE] = inp.bytes(SUBMIT_RECORD_SIZE).try_into().unwrap();
    let mode = inp.u8();
    let size = 1 + usize::from(inp.u16()) % MAX_DATA;
    r[0..4].copy_from_slice(&token.to_le_bytes());
    if mode & 1 != 0 {
        // Mostly well formed: to reach the device as often as not.
        r[4] = 0;
        r[5] %= 3;
        r[6..8].fill(0);
        r[12] %= 7;
        let blocks = 1 + u32::from(r[24] % 8);
        r[24..28].copy_from_slice(&blocks.to_le_bytes());
        r[20..24].fill(0);
    }
    let mut mem = None;
    if matches!(r[5], 1 | 2) {
        let n = match r[12] {
            1 | 2 if mode & 1 != 0 => u32_at(&r, 24) as usize * v.block_size as usize,
            6 => ID_BYTES,
            _ => size,
        };
        let writes = r[5] == 1;
        let fill = |i: usize| if writes { FILL_BYTE } else { (i as u8).wrapping_mul(7).wrapping_add(0x11) };
        // Bits 1-2 of the mode: a buffer of its own by index, in plain memory (0) or DMA memory
        // (2); DMA memory of its own by address (1); the data field as it came (3).
        match (mode >> 1) & 3 {
            0 | 2 => {
                let b = m.buffer(controller, n, mode & 4 != 0, fill);
                mem = Some(b);
                r[14] &= !FLAG_DATA_ADDRESS;
                let k = m.list(Some(b));
                r[48..56].copy_from_slice(&k.to_le_bytes());
            }
            1 => {
                let b = m.buffer(controller, n, true, fill);
                mem = Some(b);
                let p = m.ptr(b) as u64;
                r[14] |= FLAG_DATA_ADDRESS;
                r[8..12].copy_from_slice(&(n as u32).to_le_bytes());
                r[48..56].copy_from_slice(&p.to_le_bytes());
            }
            _ if r[14] & FLAG_DATA_ADDRESS != 0 => {
                // An arbitrary address (of 0 bytes with bit 3): never one inside DMA memory,
                // where the device would write over whatever lives there.
                if mode & 8 != 0 {
                    r[8..12].fill(0);
                }
                let (addr, len) = (u64_at(&r, 48), u32_at(&r, 8));
                if covered(&controller.memory_spans().1, addr, u64::from(len)) {
                    r[48..56].copy_from_slice(&(u64::MAX - 7).to_le_bytes());
                }
            }
            _ => {
                // By index, but no buffer there (an index into other records' buffers would
                // share them).
                let k = m.list(None);
                r[48..56].copy_from_slice(&k.to_le_bytes());
            }
        }
    }
    (r, mem)
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).expect("device reads DMA memory");
    v
}

/// Checks a chain against the layout the model predicted for its request.
fn check_chain(mem: &GuestMemoryMmap, c: &Chain, l: &Layout, sub: &Sub, m: &Memory) {
    let head = |what: &str| format!("{what} of {:?} (chain {c:?})", l.request_type);
    let readable: Vec<u32> = c.readable.iter().map(|s| s.1).collect();
    let writable: Vec<u32> = c.writable.iter().map(|s| s.1).collect();
    let (want_r, want_w) = match (l.range, l.data) {
        (Some(_), _) => (vec![16, 16], vec![1]),
        (None, Some(d)) if d.device_writes => (vec![16], vec![d.len, 1]),
        (None, Some(d)) => (vec![16, d.len], vec![1]),
        (None, None) => (vec![16], vec![1]),
    };
    assert_eq!((readable, writable), (want_r, want_w), "{}", head("segment lengths"));
    let h = RequestHeader::decode(&read(mem, c.readable[0].0, RequestHeader::SIZE)).unwrap();
    assert_eq!((h.request_type, h.ioprio, h.sector), (l.request_type, 0, l.sector), "{}", head("header"));
    if let Some(want) = l.range {
        let raw = read(mem, c.readable[1].0, RangeSegment::SIZE);
        assert_eq!(raw, want.encode(), "{}", head("range segment"));
    }
    let status = *c.writable.last().unwrap();
    assert_eq!(read(mem, status.0, 1)[0], NO_STATUS, "{}", head("status byte preset"));
    if let Some(d) = l.data {
        let seg = if d.device_writes { c.writable[0] } else { c.readable[1] };
        if let Some(iova) = d.iova {
            assert_eq!(seg.0, iova, "{}", head("data in place"));
        }
        if !d.device_writes {
            let b = sub.mem.expect("a WRITE with our memory");
            let want = match b {
                Mem::Host(k) => &m.buffers_before[k][GUARD..GUARD + d.len as usize],
                Mem::Dma(i) => &m.dma_before[i][..],
            };
            assert!(read(mem, seg.0, seg.1 as usize) == want, "{}", head("data-out as the caller wrote it"));
        }
    }
}

/// No two segments of the chains on the ring overlap.
fn check_disjoint(chains: &[Chain]) {
    let mut segs: Vec<(u64, u64)> = chains
        .iter()
        .flat_map(|c| c.readable.iter().chain(&c.writable))
        .map(|&(a, l)| (a, a + u64::from(l)))
        .collect();
    segs.sort_unstable();
    for w in segs.windows(2) {
        assert!(w[0].1 <= w[1].0, "segments {:#x?} and {:#x?} overlap", w[0], w[1]);
    }
}

/// What a completion must say.
#[derive(Debug)]
enum Want {
    Refused(Why),
    Done {
        response: u8,
        status: u8,
        data_len: u32,
        /// The data-in segment as it was when the device answered (what it wrote, then what
        /// the buffer held before).
        data_in: Vec<u8>,
        sub: usize,
    },
}

/// The device's answer to one chain, from the input: data-in bytes, a status byte (or none),
/// a used length. Returns the used length and what the completion must say.
fn answer(mem: &GuestMemoryMmap, c: &Chain, l: &Layout, sub: usize, inp: &mut Input) -> (u32, Want) {
    let w_sel = inp.u8();
    let pattern = inp.u8();
    let (mut written, mut data_in) = (0, Vec::new());
    if l.data_in() > 0 {
        let (at, len) = c.writable[0];
        written = match w_sel % 4 {
            0 | 1 => len as usize,
            2 => 0,
            _ => usize::from(inp.u16()) % (len as usize + 1),
        };
        let bytes: Vec<u8> = (0..written).map(|i| (i as u8).wrapping_mul(29).wrapping_add(pattern)).collect();
        mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        data_in = read(mem, at, len as usize);
    }
    let status_at = c.writable.last().unwrap().0;
    let status = match inp.u8() % 8 {
        0..=2 => Some(virtio_blk_proto::status::OK),
        3 => Some(virtio_blk_proto::status::IOERR),
        4 => Some(virtio_blk_proto::status::UNSUPP),
        5 => Some(inp.u8()),
        6 => Some(NO_STATUS),
        _ => None,
    };
    if let Some(s) = status {
        mem.write_slice(&[s], GuestAddress(status_at)).unwrap();
    }
    let writable: u64 = c.writable.iter().map(|s| u64::from(s.1)).sum();
    let used = match inp.u8() % 8 {
        0..=2 => written as u32 + 1,
        3 => 0,
        4 => 1,
        5 => writable as u32,
        6 => u32::MAX,
        _ => inp.u32(),
    };
    // The rule: the queue takes a used length past the writable bytes as all of them.
    let len = u64::from(used).min(writable);
    let byte = read(mem, status_at, 1)[0];
    let want = if len >= 1 && byte != NO_STATUS {
        let data_len = ((len - 1) as u32).min(l.data_in());
        Want::Done { response: response::OK, status: byte, data_len, data_in, sub }
    } else {
        Want::Done { response: response::FAILURE, status: 0, data_len: 0, data_in, sub }
    };
    (used, want)
}

/// Checks one completion against what it must say; `touched` collects the caller memory the
/// device legitimately changed.
fn check_completion(
    rec: &CompletionRecord,
    sense: &[u8],
    want: Want,
    subs: &[Sub],
    m: &Memory,
    touched: &mut Vec<Mem>,
) {
    assert_eq!(sense.len(), rec.sense_len as usize, "sense slice of {rec:?}");
    match want {
        Want::Refused(why) => {
            assert_eq!(rec.response, RESPONSE_REFUSED, "refused record ({}): {rec:?}", why.label);
            assert_eq!((rec.status, rec.residual, rec.data_len, rec.latency_ns), (0, 0, 0, 0), "{rec:?}");
            assert!(!sense.is_empty() && sense.len() <= SENSE_SIZE, "a reason, in the sense slot");
            let text = String::from_utf8_lossy(sense);
            assert!(text.contains(why.key), "{}: reason {text:?} lacks {:?}", why.label, why.key);
            hit(why.label);
        }
        Want::Done { response, status, data_len, data_in, sub } => {
            assert_eq!(
                (rec.response, rec.status, rec.sense_len, rec.residual, rec.data_len),
                (response, status, 0, 0, data_len),
                "completion record of token {}",
                rec.token
            );
            hit(match (response, status) {
                (response::FAILURE, _) => "completion: FAILURE (no status byte, or used length 0)",
                (_, 0) => "completion: status OK",
                (_, 1) => "completion: status IOERR",
                (_, 2) => "completion: status UNSUPP",
                _ => "completion: status above 2, passed on",
            });
            let s = &subs[sub];
            let Expect::Device(l) = s.expect else { unreachable!() };
            let Some(b) = s.mem.filter(|_| l.data_in() > 0) else { return };
            touched.push(b);
            let n = m.len(b);
            assert!(data_len as usize <= n, "data length {data_len} past a {n}-byte buffer");
            if data_len > 0 {
                hit(if data_len as usize == n {
                    "completion: data-in fills the buffer"
                } else {
                    "completion: data-in shorter than the buffer"
                });
            }
            let now = m.now(b);
            match b {
                Mem::Host(_) => {
                    assert!(
                        now[..GUARD].iter().chain(&now[GUARD + n..]).all(|&x| x == GUARD_BYTE),
                        "guard bytes around a {n}-byte buffer"
                    );
                    // Exactly data_len bytes of the bounce buffer come back (past what the
                    // device wrote, what the bounce buffer held); nothing past them.
                    let body = &now[GUARD..GUARD + n];
                    let d = data_len as usize;
                    assert!(body[..d] == data_in[..d], "data-in copied back from the bounce buffer");
                    assert!(body[d..] == m.before(b)[GUARD + d..GUARD + n], "bytes past data_len changed");
                }
                // In place: what the device left there, and nothing else.
                Mem::Dma(_) => assert!(now == data_in, "data-in in DMA memory"),
            }
            if matches!(b, Mem::Host(_)) && response == response::FAILURE {
                hit("completion: FAILURE leaves the caller's buffer alone");
            }
        }
    }
}

pub struct BlkResponse {
    rigs: Vec<Option<Rig>>,
    next_token: u32,
}

impl BlkResponse {
    pub fn new() -> Self {
        BlkResponse { rigs: (0..VARIANTS).map(|_| None).collect(), next_token: 1 }
    }
}

impl Target for BlkResponse {
    fn seeds(&self) -> Vec<Vec<u8>> {
        let mut seeds = Vec::new();
        // An execution starts with the variant, the queue and the records in the batch, less 1.
        let batch = |variant: u8, lane: u8, records: u8| Seed::new().u8(variant).u8(lane).u8(records - 1);
        // A constructed record: selector, placement, blocks - 1, LBA, fault, extra.
        let rec = |s: Seed, sel: u8, place: u8, blocks: u8, lba: u32, fault: u8, extra: u8| {
            s.u8(sel).u8(place).u8(blocks).u32(lba).u8(fault).u8(extra)
        };
        // The device's answer to the first chain left: all data-in, a status, the honest used
        // length, completed now (when 0), after a poll (10) or never (15).
        let ans = |s: Seed, status: u8, when: u8| s.u8(0).u8(0).u8(0x40).u8(status).u8(0).u8(when);
        for variant in [0u8, 3, 5, 10, 17, 22, 33, 36, 47] {
            // READ 4 blocks into plain memory, WRITE 2 blocks from DMA memory by address,
            // FLUSH, DISCARD, WRITE ZEROES with unmap, GET ID; no bad used entry; all answered
            // OK (on a ring without indirect descriptors the GET ID does not fit).
            let s = batch(variant, 0, 6);
            let s = rec(s, 0, 0, 3, 100, 0, 0);
            let s = rec(s, 2, 2, 1, 7, 0, 0);
            let s = rec(s, 3, 0, 0, 0, 0, 0);
            let s = rec(s, 4, 0, 5, 9, 0, 0);
            let s = rec(s, 5, 0, 2, 11, 0, 1);
            let s = rec(s, 6, 0, 0, 0, 0, 0).u8(0);
            let s = (0..6).fold(s, |s, _| ans(s, 0, 0));
            seeds.push(s.u8(5).u8(0).build());
        }
        // Statuses other than OK, an arbitrary one, a status byte never written, a used length
        // of 0, data in DMA memory taken by index, answers after a poll.
        let s = batch(1, 0, 5);
        let s = rec(s, 0, 3, 0, 1, 0, 0);
        let s = rec(s, 1, 1, 7, 2, 0, 0);
        let s = rec(s, 6, 3, 0, 0, 0, 0);
        let s = rec(s, 3, 0, 0, 0, 0, 0);
        let s = rec(s, 4, 0, 0, 3, 0, 0).u8(0);
        let s = ans(s, 3, 0);
        let s = s.u8(0).u8(0).u8(0).u8(5).u8(0xfe).u8(0).u8(10);
        let s = s.u8(0).u8(2).u8(0).u8(7).u8(0).u8(0);
        let s = s.u8(0).u8(0).u8(0).u8(0).u8(3).u8(0);
        let s = ans(s, 4, 10);
        seeds.push(s.u8(2).u8(0).build());
        // Every fault on a device with 4096-byte blocks: wrong length, nonzero target, nonzero
        // LUN, FUA, an LBA too large in sectors, an address outside DMA memory, a missing
        // buffer, a CDB; each with a WRITE ZEROES too long in sectors.
        for (sel, fault) in [(0u8, 12u8), (2, 13), (1, 14), (2, 15), (0, 16), (0, 18), (6, 19), (7, 0)] {
            let s = batch(34, 0, 2);
            let s = rec(s, sel, 0, 1, 5, fault, 2);
            let s = rec(s, 5, 0, 3, 1 << 30, 17, 0).u8(0);
            seeds.push(ans(s, 0, 0).u8(1).u8(0).build());
        }
        // A read-only device: WRITE, DISCARD and WRITE ZEROES refused, READ and FLUSH not.
        let s = batch(38, 0, 5);
        let s = rec(s, 2, 0, 1, 5, 0, 0);
        let s = rec(s, 4, 0, 1, 5, 0, 0);
        let s = rec(s, 5, 0, 1, 5, 0, 0);
        let s = rec(s, 0, 0, 1, 5, 0, 0);
        let s = rec(s, 3, 0, 0, 0, 0, 0).u8(0);
        seeds.push(ans(ans(s, 0, 0), 0, 0).u8(4).u8(0).build());
        // A raw record, mostly well formed: a READ of 2 blocks into its own plain buffer.
        let mut raw = [0u8; SUBMIT_RECORD_SIZE];
        (raw[5], raw[12], raw[24]) = (1, 1, 1);
        let s = batch(2, 0, 1).u8(8).bytes(&raw).u8(1).u16(0).u8(0);
        seeds.push(ans(s, 0, 0).u8(0).u8(0).build());
        // A READ and a WRITE on the second of two queues, never answered: then answered late
        // (end 0), or the queue is given back with them on it (end 1).
        for end in [0u8, 1] {
            let s = batch(8, 1, 2);
            let s = rec(s, 0, 0, 1, 3, 0, 0);
            let s = rec(s, 2, 0, 0, 4, 0, 0).u8(0);
            let s = ans(ans(s, 0, 15), 0, 15);
            seeds.push(s.u8(1).u8(end).build());
        }
        // A used entry for no request while a READ is in flight.
        let s = rec(batch(4, 0, 1), 0, 0, 0, 0, 0, 0);
        seeds.push(s.u8(31).u8(0).u8(3).build());
        seeds
    }

    fn run(&mut self, data: &[u8]) {
        let mut inp = Input::new(data);
        let vi = inp.below(VARIANTS);
        let rig = self.rigs[vi].get_or_insert_with(|| Rig::open(Variant::of(vi)));
        let v = rig.variant;
        let li = inp.below(rig.lanes.len());
        if li > 0 {
            hit("lane: second request queue");
        }
        let pool = rig.controller.pool();
        let mem = pool.memory();

        // The batch.
        let count = 1 + inp.below(MAX_BATCH);
        let mut m = Memory::default();
        let mut built = Vec::with_capacity(count);
        for _ in 0..count {
            let token = self.next_token;
            self.next_token = self.next_token.wrapping_add(1).max(1);
            built.push((token, build(&mut inp, token, v, &rig.controller, &mut m)));
        }
        let hosts = m.host_list();
        let spans = rig.controller.memory_spans().1;
        let ctx = Ctx { hosts: &hosts, spans: &spans, variant: v };
        let mut subs: Vec<Sub> = built
            .into_iter()
            .map(|(token, (raw, mem))| {
                let expect = predict(&raw, &ctx);
                if let (Expect::Device(l), Some(Mem::Host(_))) = (expect, mem) {
                    assert_eq!(l.data.and_then(|d| d.iova), None, "plain memory is not DMA memory");
                }
                Sub { token, raw, mem, expect }
            })
            .collect();
        let batch: Vec<u8> = subs.iter().flat_map(|s| s.raw).collect();
        let lane = &mut rig.lanes[li];
        // SAFETY: the buffers outlive every request: all of them complete, or their queue is
        // stopped, before this returns.
        let taken =
            unsafe { lane.channel.submit(&batch, count, &hosts) }.expect("submit on a working controller");

        // Where the ring fills up: each request takes one descriptor with INDIRECT_DESC, one
        // per segment without; the ring is empty at the start of every execution.
        let mut free = QUEUE_SIZE;
        let mut fits = count;
        for (i, s) in subs.iter().enumerate() {
            if let Expect::Device(l) = s.expect {
                let need = if v.indirect() { 1 } else { l.segments() };
                if need > free {
                    fits = i;
                    break;
                }
                free -= need;
            }
        }
        assert_eq!(
            taken,
            fits,
            "records taken before the ring is full: {:?}",
            subs.iter().map(|s| s.expect).collect::<Vec<_>>()
        );
        if taken < count {
            hit("batch: ring full, the rest left to the caller");
        }
        subs.truncate(taken);

        // The chains, in the order their requests were queued.
        let mut chains = Vec::new();
        while let Some(c) = lane.dev.pop(mem) {
            chains.push(c);
        }
        let on_device: Vec<usize> =
            (0..subs.len()).filter(|&i| matches!(subs[i].expect, Expect::Device(_))).collect();
        assert_eq!(chains.len(), on_device.len(), "one chain per request the driver did not refuse");
        check_disjoint(&chains);
        let mut want: HashMap<u32, Want> = HashMap::new();
        for s in &subs {
            if let Expect::Refused(why) = s.expect {
                want.insert(s.token, Want::Refused(why));
            }
        }
        let mut flights: Vec<(usize, Chain)> = Vec::new();
        for (c, &i) in chains.into_iter().zip(&on_device) {
            let Expect::Device(l) = subs[i].expect else { unreachable!() };
            check_chain(mem, &c, &l, &subs[i], &m);
            hit(l.label());
            flights.push((i, c));
        }

        // A device that posts a used entry for no request in flight: the controller fails, and
        // no request completes from then on.
        if inp.u8() % 32 == 31 {
            let heads: Vec<u16> = flights.iter().map(|(_, c)| c.head).collect();
            let id = match inp.u8() % 3 {
                0 => u32::from(QUEUE_SIZE) + u32::from(inp.u8()),
                1 => u32::MAX,
                _ => {
                    let from = u16::from(inp.u8());
                    (0..QUEUE_SIZE)
                        .map(|d| (d + from) % QUEUE_SIZE)
                        .find(|d| !heads.contains(d))
                        .unwrap()
                        .into()
                }
            };
            lane.dev.complete(mem, id, inp.u32());
            let mut touched = Vec::new();
            let r = lane.channel.complete(count + 1, |_, rec, sense| {
                let w = want.remove(&rec.token).expect("a completion for a request in flight, once");
                assert!(matches!(w, Want::Refused(_)), "a request completed past a bad used entry: {rec:?}");
                check_completion(rec, sense, w, &subs, &m, &mut touched);
            });
            let failed = matches!(r, Err(DriverError::Failed(_)));
            assert!(failed, "a used entry for no request: {r:?}");
            assert!(rig.controller.failure().is_some(), "the controller failed");
            for s in &subs {
                if let Some(b) = s.mem {
                    m.assert_untouched(b, "after a bad used entry");
                }
            }
            hit("device: used entry for no request, controller failed");
            // A new controller for the next execution; the queues are stopped first.
            self.rigs[vi] = None;
            drop(m);
            return;
        }

        // The device answers in an order of the input's choosing: now, after the driver has
        // polled once, or never.
        let mut later = Vec::new();
        let mut silent: Vec<(u16, u32, u32, Want)> = Vec::new();
        while !flights.is_empty() {
            let (i, c) = flights.remove(inp.below(flights.len()));
            let Expect::Device(l) = subs[i].expect else { unreachable!() };
            let (used, w) = answer(mem, &c, &l, i, &mut inp);
            match inp.u8() % 16 {
                0..=9 => {
                    want.insert(subs[i].token, w);
                    lane.dev.complete(mem, u32::from(c.head), used);
                }
                10..=14 => {
                    want.insert(subs[i].token, w);
                    later.push((c.head, used));
                }
                _ => silent.push((c.head, used, subs[i].token, w)),
            }
        }

        let mut touched = Vec::new();
        let seen = Cell::new(0usize);
        let want = RefCell::new(want);
        let mut check = |_: usize, rec: &CompletionRecord, sense: &[u8]| {
            let Some(w) = want.borrow_mut().remove(&rec.token) else {
                panic!("a completion for no request in flight, or for one the device never answered: {rec:?}")
            };
            check_completion(rec, sense, w, &subs, &m, &mut touched);
            seen.set(seen.get() + 1);
        };
        let expected = taken - silent.len();
        let max = 1 + inp.below(count);
        lane.channel.complete(max, &mut check).expect("completions from a working controller");
        if !later.is_empty() {
            hit("device: answered after a poll");
        }
        for (head, used) in later {
            lane.dev.complete(mem, u32::from(head), used);
        }
        for _ in 0..2 * count + 2 {
            if seen.get() == expected {
                break;
            }
            lane.channel.complete(count, &mut check).expect("completions from a working controller");
        }
        assert_eq!(seen.get(), expected, "every answered request completed once");
        assert_eq!(lane.channel.complete(count, &mut check).expect("a quiet poll"), 0, "nothing more");
        assert_eq!(lane.channel.in_flight(), silent.len());

        let end = inp.u8();
        if !silent.is_empty() && end & 1 == 0 {
            // The device answers at last.
            let n = silent.len();
            for (head, used, token, w) in silent.drain(..) {
                want.borrow_mut().insert(token, w);
                lane.dev.complete(mem, u32::from(head), used);
            }
            let before = seen.get();
            for _ in 0..2 * n + 2 {
                if seen.get() == before + n {
                    break;
                }
                lane.channel.complete(count, &mut check).expect("completions from a working controller");
            }
            assert_eq!(seen.get(), before + n, "late answers completed once each");
            hit("device: answered late");
        }
        if !silent.is_empty() {
            // The device never answers: the queue is given back with the requests on it, so it
            // is stopped first, and set up clean for the next channel; the caller's memory of
            // those requests is never written.
            let index = lane.channel.queue_index();
            let stops = rig.state.lock().unwrap().stops;
            drop(rig.lanes.remove(li));
            assert_eq!(rig.state.lock().unwrap().stops, stops + 1, "a queue with requests on it is stopped");
            let fresh = Lane::open(&rig.controller, &rig.state);
            assert_eq!(fresh.channel.queue_index(), index, "the queue given back serves the next channel");
            rig.lanes.insert(li, fresh);
            for (_, _, token, w) in &silent {
                let s = subs.iter().find(|s| s.token == *token).unwrap();
                match (s.mem, w) {
                    (Some(b @ Mem::Host(_)), _) => {
                        m.assert_untouched(b, "memory of a request abandoned on a stopped queue")
                    }
                    // Written in place by the device itself, and by no one else.
                    (Some(b @ Mem::Dma(_)), Want::Done { data_in, .. }) if !data_in.is_empty() => {
                        assert!(m.now(b) == *data_in, "DMA memory of an abandoned request");
                        touched.push(b);
                    }
                    _ => {}
                }
            }
            hit("device: never answered, queue given back");
        }
        assert_eq!(rig.lanes[li].channel.in_flight(), 0);
        for s in &subs {
            if let Some(b) = s.mem {
                if !touched.contains(&b) {
                    m.assert_untouched(b, "memory of a request with no data-in completion");
                }
            }
        }
        assert!(rig.controller.failure().is_none(), "controller failed: {:?}", rig.controller.failure());
    }
}
