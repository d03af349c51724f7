//! `target-request`: the bundled target against a hostile driver.
//!
//! Bus mode: sequences of commands straight to the SCSI emulation (`Bus::execute`) on small RAM
//! and null LUNs: every opcode, CDBs of any length, arbitrary LBAs, transfer and allocation
//! lengths, parameter lists, data buffers of any size, with faults injected and LUNs reset,
//! resized, removed and added between commands. The data-in area records every write: none may
//! fall outside it, and the reported data length must be bytes actually written.
//!
//! Chain mode: the whole request path of the device (`ScsiBackend`): a split ring in guest
//! memory holding well-formed, indirect, misordered and hostile descriptor chains, served as a
//! kick would (as a request queue, or now and then as the control queue with task-management
//! and notification requests). Guest memory is compared before and after: only the used ring
//! and buffers the driver marked device-writable may change; each used length stays within its
//! chain's writable bytes, and responses are consistent with the buffers given.

use std::sync::Arc;

use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vhost_user_scsi_target::device::{DeviceOptions, Quirks, ScsiBackend};
use vhost_user_scsi_target::scsi::{Action, Backing, Bus, DataError, DataIn, Fault, LunConfig};
use virtio_scsi_proto::scsi::{opcode, status};
use virtio_scsi_proto::{
    ctrl, response, CmdRequest, CmdResponse, LunAddress, CONTROL_QUEUE, FIRST_REQUEST_QUEUE, SENSE_SIZE,
};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::Target;
use crate::input::{Input, Seed};
use crate::stats::hit;

/// (target, LUN, backing, block size, read-only) of the LUNs each execution starts with.
const LUNS: [(u8, u16, Backing, u32, bool); 5] = [
    (0, 0, Backing::Ram { bytes: 1 << 20 }, 512, false),
    (0, 1, Backing::Ram { bytes: 512 << 10 }, 4096, false),
    (0, 5, Backing::Null { bytes: 1 << 40 }, 512, false),
    (1, 0, Backing::Ram { bytes: 64 << 10 }, 512, true),
    (2, 300, Backing::Null { bytes: 1 << 20 }, 65536, false),
];
const MAX_TARGET: u8 = 3;
const OPS: [u8; 28] = [
    opcode::TEST_UNIT_READY,
    opcode::REQUEST_SENSE,
    opcode::READ_6,
    opcode::WRITE_6,
    opcode::INQUIRY,
    opcode::MODE_SELECT_6,
    opcode::MODE_SENSE_6,
    opcode::START_STOP_UNIT,
    opcode::PREVENT_ALLOW_MEDIUM_REMOVAL,
    opcode::READ_CAPACITY_10,
    opcode::READ_10,
    opcode::WRITE_10,
    opcode::VERIFY_10,
    opcode::SYNCHRONIZE_CACHE_10,
    opcode::WRITE_SAME_10,
    opcode::UNMAP,
    opcode::MODE_SELECT_10,
    opcode::MODE_SENSE_10,
    opcode::READ_16,
    opcode::WRITE_16,
    opcode::VERIFY_16,
    opcode::SYNCHRONIZE_CACHE_16,
    opcode::WRITE_SAME_16,
    opcode::SERVICE_ACTION_IN_16,
    opcode::REPORT_LUNS,
    opcode::MAINTENANCE_IN,
    0x2e, // WRITE AND VERIFY (10): not implemented
    0xa8, // READ (12): not implemented
];
const MAX_CMDS: usize = 32;
const MAX_DATA_IN: usize = 16 << 10;
const MAX_DATA_OUT: usize = 8 << 10;

fn lun_config(i: usize) -> (LunAddress, LunConfig) {
    let (t, l, backing, block_size, read_only) = LUNS[i].clone();
    (LunAddress::new(t, l), LunConfig { backing, block_size, read_only })
}

fn fresh_bus() -> Bus {
    let bus = Bus::new(MAX_TARGET);
    for i in 0..LUNS.len() {
        let (addr, cfg) = lun_config(i);
        bus.add(addr, cfg).expect("LUN");
    }
    bus
}

/// A LUN address: mostly one of the LUNs, sometimes one next to them or anything.
fn address(inp: &mut Input) -> LunAddress {
    let sel = inp.u8();
    match sel {
        0..=0xdf => {
            let (t, l, ..) = LUNS[usize::from(sel) % LUNS.len()];
            LunAddress::new(t, l)
        }
        0xe0..=0xef => LunAddress::new(sel % 5, u16::from(inp.u8() % 8)),
        _ => LunAddress::new(inp.u8(), inp.u16()),
    }
}

/// A 32-byte CDB: raw, or with a known opcode, or with its LBA and length fields brought into
/// the range of the small LUNs so that data actually moves.
fn cdb(inp: &mut Input) -> [u8; 32] {
    let shape = inp.u8();
    let mut c: [u8; 32] = inp.bytes(32).try_into().unwrap();
    if shape & 1 != 0 {
        c[0] = OPS[usize::from(c[0]) % OPS.len()];
    }
    if shape & 2 != 0 {
        let (lba, blocks) = (u64::from(c[2] % 64), 1 + u32::from(c[3] % 8));
        match c[0] >> 5 {
            0 => {
                c[1] &= 0xe0;
                c[2] = 0;
                c[3] = lba as u8;
                c[4] = blocks as u8;
            }
            1 | 2 => {
                c[1] &= 0x1f;
                c[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
                c[7..9].copy_from_slice(&(blocks as u16).to_be_bytes());
            }
            4 => {
                c[1] &= 0x1f;
                c[2..10].copy_from_slice(&lba.to_be_bytes());
                c[10..14].copy_from_slice(&blocks.to_be_bytes());
            }
            _ => {}
        }
    }
    if shape & 4 != 0 {
        // A plausible allocation or parameter list length.
        let n = u16::from(shape >> 3) * 8;
        match c[0] {
            opcode::INQUIRY => c[3..5].copy_from_slice(&n.to_be_bytes()),
            opcode::MODE_SENSE_6 | opcode::REQUEST_SENSE | opcode::MODE_SELECT_6 => c[4] = n as u8,
            opcode::MODE_SENSE_10 | opcode::MODE_SELECT_10 | opcode::UNMAP => {
                c[7..9].copy_from_slice(&n.to_be_bytes())
            }
            opcode::SERVICE_ACTION_IN_16 => c[10..14].copy_from_slice(&u32::from(n).to_be_bytes()),
            opcode::REPORT_LUNS => c[6..10].copy_from_slice(&u32::from(n).to_be_bytes()),
            _ => {}
        }
    }
    c
}

/// Data-out: arbitrary bytes, or an UNMAP parameter list of a few descriptors.
fn data_out(inp: &mut Input, c: &[u8]) -> Vec<u8> {
    let sel = inp.u16();
    if c[0] == opcode::UNMAP && sel & 0x8000 != 0 {
        let n = usize::from(sel) % 6;
        let mut l = vec![0u8; 8];
        l[0..2].copy_from_slice(&((6 + 16 * n) as u16).to_be_bytes());
        l[2..4].copy_from_slice(&((16 * n) as u16).to_be_bytes());
        for _ in 0..n {
            l.extend_from_slice(&u64::from(inp.u8()).to_be_bytes());
            l.extend_from_slice(&u32::from(inp.u8()).to_be_bytes());
            l.extend_from_slice(&[0; 4]);
        }
        return l;
    }
    let n = usize::from(sel & 0x7fff) % (MAX_DATA_OUT + 1);
    let fill = inp.u8();
    let mut v = inp.bytes(n.min(64));
    v.resize(n, fill);
    v
}

/// A data-in area that records every write made to it.
struct CheckedIn {
    buf: Vec<u8>,
    written: Vec<bool>,
}

impl DataIn for CheckedIn {
    fn capacity(&self) -> usize {
        self.buf.len()
    }

    fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<(), DataError> {
        let cap = self.buf.len();
        match offset.checked_add(src.len()) {
            Some(end) if end <= cap => {
                self.buf[offset..end].copy_from_slice(src);
                self.written[offset..end].fill(true);
                Ok(())
            }
            _ => Err(DataError::OutOfRange { offset, len: src.len(), capacity: cap }),
        }
    }
}

fn check_sense(st: u8, sense: &[u8]) {
    if st == status::CHECK_CONDITION {
        assert_eq!(sense.len(), 18, "fixed sense");
        assert_eq!((sense[0], sense[7]), (0x70, 10), "fixed sense format");
    } else {
        assert!(sense.is_empty(), "sense without CHECK CONDITION");
    }
}

/// One command through `Bus::execute`, with the checks of what it reported.
fn bus_command(bus: &Bus, present: &[bool], faulted: &[bool], inp: &mut Input) {
    let addr = address(inp);
    let full = cdb(inp);
    let len_sel = inp.u8();
    let cdb = if len_sel < 0xc0 { &full[..] } else { &full[..usize::from(len_sel) % 33] };
    let out = data_out(inp, &full);
    let cap = usize::from(inp.u16()) % (MAX_DATA_IN + 1);
    let mut din = CheckedIn { buf: vec![0; cap], written: vec![false; cap] };
    let lun = LUNS.iter().position(|&(t, l, ..)| LunAddress::new(t, l) == addr);
    let target_has_luns = LUNS.iter().enumerate().any(|(i, l)| l.0 == addr.target && present[i]);

    let done = bus.execute(addr, cdb, &out, &mut din);
    hit(match &done {
        None => "bus: bad target",
        Some(c) if c.status == status::GOOD && c.data_in_len > 0 => "bus: good with data",
        Some(c) if c.status == status::GOOD => "bus: good",
        Some(c) if c.status == status::CHECK_CONDITION => "bus: check condition",
        Some(_) => "bus: other status",
    });
    let Some(c) = done else {
        assert!(!target_has_luns, "BAD_TARGET for target {} which has LUNs", addr.target);
        return;
    };
    assert!(target_has_luns, "an answer from target {} which has no LUN", addr.target);
    assert!(c.data_in_len <= cap, "{} bytes of data-in in a {cap}-byte area", c.data_in_len);
    assert!(din.written[..c.data_in_len].iter().all(|&w| w), "data_in_len counts bytes never written");
    check_sense(c.status, &c.sense);
    if c.status == status::CHECK_CONDITION {
        assert_eq!(c.data_in_len, 0, "data with CHECK CONDITION");
    }
    let faulted = lun.is_some_and(|i| faulted[i]);
    if !faulted {
        assert_eq!(c.action, Action::Now, "deferred without a fault");
    }
    if c.status == status::GOOD && cdb.len() >= 6 && !faulted {
        let alloc = match cdb[0] {
            opcode::INQUIRY => Some(usize::from(u16::from_be_bytes([cdb[3], cdb[4]]))),
            opcode::REQUEST_SENSE | opcode::MODE_SENSE_6 => Some(usize::from(cdb[4])),
            opcode::MODE_SENSE_10 if cdb.len() >= 10 => {
                Some(usize::from(u16::from_be_bytes([cdb[7], cdb[8]])))
            }
            opcode::REPORT_LUNS if cdb.len() >= 12 => {
                Some(u32::from_be_bytes(cdb[6..10].try_into().unwrap()) as usize)
            }
            opcode::READ_CAPACITY_10 => Some(8),
            opcode::WRITE_6
            | opcode::WRITE_10
            | opcode::WRITE_16
            | opcode::UNMAP
            | opcode::TEST_UNIT_READY => Some(0),
            _ => None,
        };
        if let Some(a) = alloc {
            assert!(c.data_in_len <= a, "{} bytes for an allocation length of {a}", c.data_in_len);
        }
        if let (Some(i), opcode::READ_10) = (lun, cdb[0]) {
            let blocks = usize::from(u16::from_be_bytes([cdb[7], cdb[8]]));
            assert_eq!(c.data_in_len, blocks * LUNS[i].3 as usize, "READ (10) data length");
        }
    }
}

fn fault(inp: &mut Input) -> Fault {
    use std::time::Duration;
    match inp.u8() % 7 {
        0 => Fault::CheckCondition { key: inp.u8(), asc: inp.u8(), ascq: inp.u8() },
        1 => Fault::Busy,
        2 => Fault::TaskSetFull,
        3 => Fault::Delay(Duration::from_millis(u64::from(inp.u8()))),
        4 => Fault::Late(Duration::from_millis(u64::from(inp.u8()))),
        5 => Fault::Never,
        _ => Fault::Corrupt,
    }
}

fn run_bus(inp: &mut Input) {
    let bus = fresh_bus();
    let mut present = [true; LUNS.len()];
    let mut faulted = [false; LUNS.len()];
    for _ in 0..MAX_CMDS {
        if inp.is_empty() {
            break;
        }
        let op = inp.u8();
        let i = usize::from(inp.u8()) % LUNS.len();
        let (addr, cfg) = lun_config(i);
        match op % 16 {
            0..=11 => bus_command(&bus, &present, &faulted, inp),
            12 => {
                let f = fault(inp);
                let count = u32::from(inp.u8() % 4);
                if bus.inject(addr, f, count).is_ok() {
                    faulted[i] = true;
                }
            }
            13 => match inp.u8() % 4 {
                0 => drop(bus.clear_faults(addr)),
                1 => drop(bus.lun_reset(addr)),
                2 => bus.nexus_reset(addr.target),
                _ => drop(bus.list()),
            },
            14 => {
                // Any size, including less than one block (an error) and a bit more than before.
                let bytes = u64::from(inp.u32()) % (2 << 20);
                let _ = bus.resize(addr, bytes);
            }
            _ => {
                if present[i] {
                    bus.remove(addr).expect("remove a present LUN");
                    present[i] = false;
                    faulted[i] = false;
                } else {
                    bus.add(addr, cfg).expect("add an absent LUN");
                    present[i] = true;
                }
            }
        }
    }
}

// Guest memory of the chain mode.
const MEM: u64 = 256 << 10;
const DESC: u64 = 0x0000;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const INDIRECT: u64 = 0x3000;
const DATA: u64 = 0x4000;
const QUEUE_MAX: u16 = 256;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A chain as the harness built it: well-formed ones carry what the checks need.
struct Built {
    head: u16,
    well_formed: bool,
    /// Response buffer (GPA, length), for well-formed chains.
    response: Option<(u64, u32)>,
    /// Device-readable and device-writable bytes of the chain.
    readable: u64,
    writable: u64,
}

struct Layout {
    q: u16,
    table: Vec<Option<Desc>>,
    indirect: Vec<Option<Desc>>,
    data_next: u64,
    /// No chain can write into another's buffers (no hostile or broken chain, no reused
    /// memory, no extra ring entries): responses can then be checked against their chain.
    clean: bool,
}

impl Layout {
    fn alloc(&mut self, len: u32) -> u64 {
        let at = self.data_next;
        self.data_next = (at + u64::from(len) + 7) & !7;
        if self.data_next > MEM {
            // Out of room: wrap around; overlapping buffers are allowed.
            self.data_next = DATA;
            self.clean = false;
            return DATA;
        }
        at
    }

    fn free_slot(&self, from: u16) -> Option<u16> {
        (0..self.q).map(|i| (from + i) % self.q).find(|&i| self.table[i as usize].is_none())
    }

    /// Places a linked list of descriptors in the ring's table; returns the head.
    fn place_direct(&mut self, descs: &[(u64, u32, u16)], start: u16) -> Option<u16> {
        let mut slots = Vec::new();
        for k in 0..descs.len() {
            let s = self.free_slot(start.wrapping_add(k as u16 * 7))?;
            self.table[s as usize] = Some(Desc { addr: 0, len: 0, flags: 0, next: 0 });
            slots.push(s);
        }
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let last = k + 1 == descs.len();
            let next = if last { 0 } else { slots[k + 1] };
            let flags = if last { flags } else { flags | F_NEXT };
            self.table[slots[k] as usize] = Some(Desc { addr, len, flags, next });
        }
        slots.first().copied()
    }

    /// Places the descriptors in an indirect table and one INDIRECT descriptor in the ring.
    fn place_indirect(&mut self, descs: &[(u64, u32, u16)], start: u16) -> Option<u16> {
        let base = self.indirect.iter().position(|d| d.is_none())?;
        if base + descs.len() > self.indirect.len() || descs.is_empty() {
            return None;
        }
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let last = k + 1 == descs.len();
            let flags = if last { flags } else { flags | F_NEXT };
            self.indirect[base + k] =
                Some(Desc { addr, len, flags, next: if last { 0 } else { k as u16 + 1 } });
        }
        let table = INDIRECT + 16 * base as u64;
        self.place_direct(&[(table, 16 * descs.len() as u32, F_INDIRECT)], start)
    }
}

struct ChainMode {
    backend: ScsiBackend,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
}

impl ChainMode {
    fn new() -> Self {
        let bus = Arc::new(fresh_bus());
        let opts = DeviceOptions {
            request_queues: 1,
            queue_size: QUEUE_MAX,
            poll_threads: None,
            quirks: Quirks::default(),
        };
        let backend = ScsiBackend::new(bus, opts);
        let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("guest memory");
        let mem = GuestMemoryAtomic::new(mmap);
        backend.update_memory(mem.clone()).expect("memory");
        ChainMode { backend, mem }
    }

    /// Builds one chain from the input; `None` when the ring has no room for it.
    fn chain(&self, l: &mut Layout, inp: &mut Input, gm: &GuestMemoryMmap, control: bool) -> Option<Built> {
        let mode = inp.u8();
        let start = u16::from(inp.u8());
        if mode % 8 == 6 {
            l.clean = false;
            // Hostile: descriptors with arbitrary lengths, flags and links; addresses in the
            // data area or outside memory, indirect tables inside the indirect area.
            let n = 1 + inp.below(6);
            let mut head = None;
            for k in 0..n {
                let slot = l.free_slot(start.wrapping_add(k as u16))?;
                let flags = inp.u16() & (F_NEXT | F_WRITE | F_INDIRECT | 0x8);
                let (addr, len) = if flags & F_INDIRECT != 0 {
                    let first = u64::from(inp.u8());
                    let count = u32::from(inp.u8()) % (256 - first as u32 + 1);
                    let odd = if inp.u8() % 8 == 0 { 1 + u32::from(inp.u8() % 15) } else { 0 };
                    (INDIRECT + 16 * first, 16 * count + odd)
                } else {
                    let addr = match inp.u8() % 4 {
                        0 => MEM - u64::from(inp.u8()),
                        1 => u64::MAX - u64::from(inp.u16()),
                        _ => DATA + u64::from(inp.u32()) % (MEM - DATA),
                    };
                    (addr, inp.u32() % (1 << 17))
                };
                let next = match inp.u8() % 3 {
                    0 => slot.wrapping_add(1) % l.q,
                    1 => inp.u16(),
                    _ => start,
                };
                l.table[slot as usize] = Some(Desc { addr, len, flags, next });
                head.get_or_insert(slot);
            }
            return Some(Built { head: head?, well_formed: false, response: None, readable: 0, writable: 0 });
        }

        let addr = address(inp);
        let mut lun = addr.encode();
        if inp.u8() == 0xff {
            lun = inp.bytes(8).try_into().unwrap();
        }
        if control {
            // A task-management or asynchronous-notification request of any length, and a
            // reply buffer of any size.
            let kind = match inp.u8() % 4 {
                0 => ctrl::TMF,
                1 => ctrl::AN_QUERY,
                2 => ctrl::AN_SUBSCRIBE,
                _ => inp.u32(),
            };
            let mut req = kind.to_le_bytes().to_vec();
            if kind == ctrl::TMF {
                req.extend_from_slice(&(inp.u32() % 10).to_le_bytes());
                req.extend_from_slice(&lun);
                req.extend_from_slice(&inp.u64().to_le_bytes());
            } else {
                req.extend_from_slice(&lun);
                req.extend_from_slice(&inp.u32().to_le_bytes());
            }
            let len = match inp.u8() % 4 {
                0 => req.len(),
                _ => inp.below(33),
            };
            req.resize(len, 0);
            let reply = 1 + inp.below(8) as u32;
            let mut descs = Vec::new();
            if !req.is_empty() {
                let at = l.alloc(req.len() as u32);
                gm.write_slice(&req, GuestAddress(at)).unwrap();
                descs.push((at, req.len() as u32, 0));
            }
            descs.push((l.alloc(reply), reply, F_WRITE));
            let head = l.place_direct(&descs, start)?;
            let readable = req.len() as u64;
            return Some(Built {
                head,
                well_formed: true,
                response: None,
                readable,
                writable: u64::from(reply),
            });
        }
        let c = cdb(inp);
        let header = CmdRequest { lun, tag: inp.u64(), task_attr: 0, prio: 0, crn: 0, cdb: c }.encode();
        let out = data_out(inp, &c);
        let in_len = u32::from(inp.u16()) % (MAX_DATA_IN as u32 + 1);
        let split = inp.u8();
        // Bit 0: header and data-out in one descriptor; bit 1: response and data-in in one.
        let merge = inp.u8();

        // Readable: the header (split in two at `split` sometimes), then data-out.
        let mut descs: Vec<(u64, u32, u16)> = Vec::new();
        let h = l.alloc(CmdRequest::SIZE as u32 + out.len() as u32);
        gm.write_slice(&header, GuestAddress(h)).unwrap();
        gm.write_slice(&out, GuestAddress(h + CmdRequest::SIZE as u64)).unwrap();
        let cut = u32::from(split % 64).min(CmdRequest::SIZE as u32);
        let whole = CmdRequest::SIZE as u32 + out.len() as u32;
        if split & 0x40 != 0 && cut > 0 && cut < CmdRequest::SIZE as u32 {
            descs.push((h, cut, 0));
            descs.push((h + u64::from(cut), CmdRequest::SIZE as u32 - cut, 0));
        } else if merge & 1 != 0 {
            descs.push((h, whole, 0));
        } else {
            descs.push((h, CmdRequest::SIZE as u32, 0));
        }
        if !out.is_empty() && (merge & 1 == 0 || split & 0x40 != 0) {
            descs.push((h + CmdRequest::SIZE as u64, out.len() as u32, 0));
        }
        // Writable: the response (sometimes too short), then data-in.
        let resp_len = if split & 0x80 != 0 { u32::from(split % 128) } else { CmdResponse::SIZE as u32 };
        let r = l.alloc(resp_len.max(1) + in_len);
        if merge & 2 != 0 && resp_len + in_len > 0 {
            descs.push((r, resp_len + in_len, F_WRITE));
        } else {
            if resp_len > 0 {
                descs.push((r, resp_len, F_WRITE));
            }
            if in_len > 0 {
                descs.push((r + u64::from(resp_len.max(1)), in_len, F_WRITE));
            }
        }
        let mut well_formed = true;
        if mode % 8 == 7 {
            // A broken variant of a good chain.
            well_formed = false;
            l.clean = false;
            match inp.u8() % 5 {
                0 => descs.reverse(),
                1 => descs.push((l.alloc(8), 8, 0)),
                2 => {
                    let i = inp.below(descs.len());
                    descs[i].1 = 0;
                }
                3 => {
                    let i = inp.below(descs.len());
                    descs[i].0 = MEM - 16;
                }
                _ => {
                    // At the top of the address space, so that offsets into it wrap.
                    let i = inp.below(descs.len());
                    descs[i].0 = u64::MAX - u64::from(inp.u8());
                }
            }
        }
        let bytes = |w: u16| descs.iter().filter(|d| d.2 & F_WRITE == w).map(|d| u64::from(d.1)).sum();
        let (readable, writable) = (bytes(0), bytes(F_WRITE));
        let head =
            if mode % 8 == 5 { l.place_indirect(&descs, start)? } else { l.place_direct(&descs, start)? };
        let response = (resp_len > 0).then_some((r, resp_len));
        Some(Built { head, well_formed, response, readable, writable })
    }

    fn run(&mut self, inp: &mut Input) {
        // Fresh LUNs, so that an execution does not depend on the ones before.
        let bus = self.backend.bus();
        for i in 0..LUNS.len() {
            let (addr, cfg) = lun_config(i);
            let _ = bus.remove(addr);
            bus.add(addr, cfg).expect("LUN");
        }
        let guard = self.mem.memory();
        let gm: &GuestMemoryMmap = &guard;
        let zeros = vec![0u8; MEM as usize];
        gm.write_slice(&zeros, GuestAddress(0)).unwrap();

        let q = 1u16 << (inp.u8() % 9);
        let flags = inp.u8();
        let event_idx = flags & 1 != 0;
        // One execution in eight serves the ring as the control queue.
        let control = flags & 0x0e == 0x0e;
        let mut l = Layout {
            q,
            table: vec![None; q as usize],
            indirect: vec![None; 256],
            data_next: DATA,
            clean: true,
        };
        let n = 1 + inp.below(6);
        let mut built = Vec::new();
        for _ in 0..n {
            match self.chain(&mut l, inp, gm, control) {
                Some(b) => built.push(b),
                None => break,
            }
        }
        // Unused descriptor slots hold garbage too; it must never be followed outside a chain.
        let junk = Desc { addr: MEM + 0x1000, len: 512, flags: F_NEXT, next: 0 };
        let write_desc = |at: u64, d: &Desc| {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&d.addr.to_le_bytes());
            b[8..12].copy_from_slice(&d.len.to_le_bytes());
            b[12..14].copy_from_slice(&d.flags.to_le_bytes());
            b[14..16].copy_from_slice(&d.next.to_le_bytes());
            gm.write_slice(&b, GuestAddress(at)).unwrap();
        };
        for (i, d) in l.table.iter().enumerate() {
            write_desc(DESC + 16 * i as u64, d.as_ref().unwrap_or(&junk));
        }
        for (i, d) in l.indirect.iter().enumerate() {
            write_desc(INDIRECT + 16 * i as u64, d.as_ref().unwrap_or(&junk));
        }
        // The available ring: the heads, sometimes a hostile extra entry or index.
        let mut heads: Vec<u16> = built.iter().map(|b| b.head).collect();
        if inp.u8() % 8 == 0 {
            heads.push(inp.u16());
            l.clean = false;
        }
        heads.truncate(q as usize);
        for (i, h) in heads.iter().enumerate() {
            gm.write_obj(h.to_le(), GuestAddress(AVAIL + 4 + 2 * i as u64)).unwrap();
        }
        let avail_idx = if inp.u8() % 16 == 0 {
            l.clean = false;
            inp.u16()
        } else {
            heads.len() as u16
        };
        gm.write_obj(avail_idx.to_le(), GuestAddress(AVAIL + 2)).unwrap();
        // With a hostile index the device may take any slot of the ring (zero when unwritten).
        let slots: Vec<u16> = (0..q).map(|i| heads.get(i as usize).copied().unwrap_or(0)).collect();

        let vring = VringRwLock::new(self.mem.clone(), QUEUE_MAX).expect("vring");
        vring.set_queue_size(q);
        vring.set_queue_info(DESC, AVAIL, USED).expect("ring addresses");
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        self.backend.set_event_idx(event_idx);

        let mut before = vec![0u8; MEM as usize];
        gm.read_slice(&mut before, GuestAddress(0)).unwrap();
        let queue = if control { CONTROL_QUEUE } else { FIRST_REQUEST_QUEUE };
        let _ = self.backend.serve_queue(queue, &vring);
        let mut after = vec![0u8; MEM as usize];
        gm.read_slice(&mut after, GuestAddress(0)).unwrap();

        // Only the used ring and device-writable buffers may have changed.
        let mut allowed = vec![false; MEM as usize];
        let used_end = USED + 4 + 8 * u64::from(q) + 2;
        allowed[USED as usize..used_end as usize].fill(true);
        for d in l.table.iter().chain(l.indirect.iter()).flatten() {
            if d.flags & F_WRITE != 0 && d.flags & F_INDIRECT == 0 && d.addr < MEM {
                let end = d.addr.saturating_add(u64::from(d.len)).min(MEM);
                allowed[d.addr as usize..end as usize].fill(true);
            }
        }
        for (k, (b, a)) in before.chunks(64).zip(after.chunks(64)).enumerate() {
            if b != a {
                let base = k * 64;
                if let Some(i) = (0..b.len()).find(|&i| b[i] != a[i] && !allowed[base + i]) {
                    panic!(
                        "the target wrote guest memory at {:#x}, outside every device-writable buffer",
                        base + i
                    );
                }
            }
        }

        // The used entries: heads that were made available, lengths within their chains.
        let used_idx = u16::from_le_bytes([after[USED as usize + 2], after[USED as usize + 3]]);
        assert!(used_idx <= q, "{used_idx} used entries in a ring of {q}");
        for k in 0..used_idx.min(q) {
            let at = (USED + 4 + 8 * u64::from(k)) as usize;
            let id = u32::from_le_bytes(after[at..at + 4].try_into().unwrap());
            let len = u32::from_le_bytes(after[at + 4..at + 8].try_into().unwrap());
            assert!(slots.iter().any(|&h| u32::from(h) == id), "used id {id} was never made available");
            hit("chain: used entry");
            let Some(b) = built.iter().find(|b| u32::from(b.head) == id && b.well_formed) else { continue };
            assert!(u64::from(len) <= b.writable, "used length {len} past {} writable bytes", b.writable);
            let Some((r, rlen)) = b.response.filter(|_| l.clean) else { continue };
            if len == 0 || (rlen as usize) < CmdResponse::SIZE {
                continue;
            }
            assert!(len as usize >= CmdResponse::SIZE, "used length {len} without a whole response");
            let resp = CmdResponse::decode(&after[r as usize..r as usize + CmdResponse::SIZE]).unwrap();
            assert!(resp.sense_len as usize <= SENSE_SIZE, "sense_len {}", resp.sense_len);
            // Data-in is whatever writable space follows the response header.
            let (data, cap_in) =
                (u64::from(len) - CmdResponse::SIZE as u64, b.writable - CmdResponse::SIZE as u64);
            assert!(data <= cap_in, "{data} bytes of data-in in {cap_in}");
            if resp.response == response::OK {
                let data_out = b.readable - CmdRequest::SIZE as u64;
                let resid = u64::from(resp.resid);
                if cap_in > 0 {
                    assert_eq!(resid, cap_in - data, "residual of a {cap_in}-byte data-in area");
                } else if resp.status == status::GOOD {
                    assert_eq!(resid, 0, "residual without data");
                } else {
                    assert_eq!(resid, data_out, "residual of a failed data-out");
                }
                check_sense(resp.status, resp.sense());
                hit(match resp.status {
                    status::GOOD if data > 0 => "chain: good with data",
                    status::GOOD => "chain: good",
                    _ => "chain: check condition",
                });
            } else {
                hit("chain: failure response");
                assert_eq!(data, 0, "data with response {}", resp.response);
            }
        }
    }
}

pub struct TargetRequest {
    chains: ChainMode,
}

impl TargetRequest {
    pub fn new() -> Self {
        TargetRequest { chains: ChainMode::new() }
    }
}

/// Seed pieces: one bus-mode command on LUN `lun` (index), CDB as given, data sizes.
fn seed_cmd(s: Seed, lun: u8, cdb: &[u8], out: &[u8], cap: u16) -> Seed {
    let mut c = [0u8; 32];
    c[..cdb.len()].copy_from_slice(cdb);
    let s = s.u8(0).u8(lun).u8(lun).u8(0).bytes(&c).u8(0);
    let fill = out.last().copied().unwrap_or(0);
    let s = s.u16(out.len() as u16).u8(fill).bytes(&out[..out.len().min(64)]);
    s.u16(cap)
}

impl Target for TargetRequest {
    fn seeds(&self) -> Vec<Vec<u8>> {
        use opcode::*;
        let mut seeds = Vec::new();
        // Bus mode (first byte even): clear the unit attention, then a command mix.
        let mut s = Seed::new().u8(0);
        s = seed_cmd(s, 0, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], &[], 0);
        s = seed_cmd(s, 0, &[WRITE_10, 0, 0, 0, 0, 4, 0, 0, 2, 0], &[0xab; 1024], 0);
        s = seed_cmd(s, 0, &[READ_10, 0, 0, 0, 0, 4, 0, 0, 2, 0], &[], 1024);
        s = seed_cmd(s, 0, &[INQUIRY, 1, 0xb0, 0, 255, 0], &[], 255);
        s = seed_cmd(s, 0, &[MODE_SENSE_10, 0x10, 0x3f, 0, 0, 0, 0, 1, 0, 0], &[], 256);
        s = seed_cmd(s, 0, &[REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[], 256);
        s = seed_cmd(s, 0, &[SERVICE_ACTION_IN_16, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], &[], 32);
        s = seed_cmd(s, 0, &[WRITE_SAME_16, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 16, 0, 0], &[1; 512], 0);
        seeds.push(s.build());
        let mut s = Seed::new().u8(2);
        s = seed_cmd(s, 1, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], &[], 0);
        let mut unmap = vec![0, 22, 0, 16, 0, 0, 0, 0];
        unmap.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0]);
        s = seed_cmd(s, 1, &[UNMAP, 0, 0, 0, 0, 0, 0, 0, 24, 0], &unmap, 0);
        s = seed_cmd(s, 1, &[MODE_SELECT_6, 0x10, 0, 0, 24, 0], &[0, 0, 0x10, 0, 8, 18, 4, 0], 0);
        s = seed_cmd(s, 2, &[READ_16, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0, 0, 0, 0, 8, 0, 0], &[], 4096);
        s = seed_cmd(s, 4, &[REQUEST_SENSE, 0, 0, 0, 18, 0], &[], 18);
        // A fault on LUN 0 (late completion), then a read.
        s = s.u8(12).u8(0).u8(4).u8(5).u8(3);
        s = seed_cmd(s, 0, &[READ_6, 0, 0, 1, 1, 0], &[], 512);
        seeds.push(s.build());
        // Chain mode (first byte odd): queue of 16, one INQUIRY and one READ (10) chain.
        let chain = |s: Seed, mode: u8, cdb: &[u8], in_len: u16, split: u8, merge: u8| {
            let mut c = [0u8; 32];
            c[..cdb.len()].copy_from_slice(cdb);
            s.u8(mode).u8(3).u8(0).u8(0).u8(0).bytes(&c).u64(7).u16(0).u8(0).u16(in_len).u8(split).u8(merge)
        };
        for mode in [0u8, 5] {
            let s = Seed::new().u8(1).u8(4).u8(0).u8(1);
            let s = chain(s, mode, &[INQUIRY, 0, 0, 0, 96, 0], 96, 0, 2);
            let s = chain(s, mode, &[READ_10, 0, 0, 0, 0, 1, 0, 0, 1, 0], 512, 0x40 | 20, 0);
            seeds.push(s.u8(1).u8(1).build());
        }
        seeds
    }

    fn run(&mut self, data: &[u8]) {
        let mut inp = Input::new(data);
        if inp.u8() & 1 == 0 {
            run_bus(&mut inp);
        } else {
            self.chains.run(&mut inp);
        }
    }
}
