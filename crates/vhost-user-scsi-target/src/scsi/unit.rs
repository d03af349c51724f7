//! One logical unit: command dispatch, block commands, unit attentions and armed faults.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use virtio_scsi_proto::scsi::{asc, opcode, sense_key};
use virtio_scsi_proto::LunAddress;

use super::cdb::{self, be16, be32, be64, Extent, INVALID_FIELD};
use super::fault::{ArmedFault, Corrupting, Effect};
use super::{inquiry, mode, Action, Completion, DataError, DataIn, DataOut, Sense};
use crate::storage::{Storage, StorageError};

/// Largest READ or WRITE this target accepts, reported in the Block Limits VPD page.
pub const MAX_TRANSFER_BYTES: u32 = 8 << 20;
/// Largest range one UNMAP or WRITE SAME may cover.
pub const MAX_UNMAP_BYTES: u64 = 4 << 30;
/// Most block descriptors one UNMAP may carry.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// Pending unit attentions kept per LUN; later ones are dropped once this many wait.
const MAX_PENDING_UA: usize = 16;
/// WRITE SAME replicates its pattern into a buffer of at most this size.
const PATTERN_BUFFER: usize = 1 << 20;

pub(crate) type CmdResult = Result<usize, Sense>;
type Handler = fn(&LogicalUnit, &[u8], &dyn DataOut, &mut dyn DataIn) -> CmdResult;

const WRITE_PROTECTED: Sense = Sense::new(sense_key::DATA_PROTECT, asc::WRITE_PROTECTED);
const LBA_OUT_OF_RANGE: Sense = Sense::illegal_request(asc::LBA_OUT_OF_RANGE);
const NOT_READY: Sense = Sense::new(sense_key::NOT_READY, asc::LUN_NOT_READY_INIT_REQUIRED);
const PARAM_LIST_LENGTH: Sense = Sense::illegal_request(asc::PARAMETER_LIST_LENGTH_ERROR);
const INVALID_PARAM: Sense = Sense::illegal_request(asc::INVALID_FIELD_IN_PARAMETER_LIST);
const INTERNAL_FAILURE: Sense = Sense::new(sense_key::HARDWARE_ERROR, asc::INTERNAL_TARGET_FAILURE);

/// Distinguishes LUNs across add/remove cycles in serial numbers and identifiers.
static GENERATION: AtomicU32 = AtomicU32::new(0);

/// 32 bits that tell one file from another (its device and inode number), for identifiers
/// that stay the same whenever the file is served.
fn file_identity(path: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    let x = m.dev().wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ m.ino();
    Some((x ^ (x >> 32)) as u32)
}

struct State {
    /// Pending unit attentions, oldest first (one initiator, so one queue).
    ua: VecDeque<Sense>,
    fault: Option<ArmedFault>,
}

pub(crate) struct LogicalUnit {
    pub addr: LunAddress,
    pub storage: Storage,
    pub path: Option<PathBuf>,
    pub block_size: u32,
    pub shift: u32,
    pub read_only: bool,
    /// Unit serial number (VPD 0x80).
    pub serial: String,
    /// NAA locally assigned identifier (VPD 0x83).
    pub naa: u64,
    stopped: AtomicBool,
    /// Set while `state` holds a unit attention or fault, so the common path takes no lock.
    slow: AtomicBool,
    state: Mutex<State>,
}

enum IoError {
    Data(DataError),
    Storage(StorageError),
}

impl From<StorageError> for IoError {
    fn from(e: StorageError) -> IoError {
        IoError::Storage(e)
    }
}

impl LogicalUnit {
    /// A unit over `storage`, whose size the caller has made a non-zero multiple of `block_size`.
    pub fn new(
        addr: LunAddress,
        storage: Storage,
        path: Option<PathBuf>,
        block_size: u32,
        read_only: bool,
    ) -> LogicalUnit {
        // A file's unit is the same unit whenever the file is served (a restarted target, the
        // file added again): its identity comes from the file. Other units exist only in this
        // process, as this instance: the process id and a generation.
        let (origin, generation) = match path.as_deref().and_then(file_identity) {
            Some(id) => (id, 0),
            None => (std::process::id(), GENERATION.fetch_add(1, Ordering::Relaxed)),
        };
        let serial = format!("{origin:08X}{:02X}{:04X}{:04X}", addr.target, addr.lun, generation & 0xffff);
        // NAA 3 (locally assigned): 60 bits of origin, target, LUN and generation.
        let naa = 3u64 << 60
            | (u64::from(origin) & 0x3f_ffff) << 38
            | u64::from(addr.target) << 30
            | (u64::from(addr.lun) & 0x3fff) << 16
            | u64::from(generation & 0xffff);
        let mut ua = VecDeque::new();
        ua.push_back(Sense::unit_attention(asc::POWER_ON_RESET));
        LogicalUnit {
            addr,
            storage,
            path,
            block_size,
            shift: block_size.trailing_zeros(),
            read_only,
            serial,
            naa,
            stopped: AtomicBool::new(false),
            slow: AtomicBool::new(true),
            state: Mutex::new(State { ua, fault: None }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic (plain queue operations), so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update_slow(&self, st: &State) {
        self.slow.store(!st.ua.is_empty() || st.fault.is_some(), Ordering::Release);
    }

    pub fn blocks(&self) -> u64 {
        self.storage.len() >> self.shift
    }

    pub fn max_transfer_blocks(&self) -> u32 {
        MAX_TRANSFER_BYTES >> self.shift
    }

    pub fn max_unmap_blocks(&self) -> u32 {
        (MAX_UNMAP_BYTES >> self.shift).min(u64::from(u32::MAX)) as u32
    }

    /// Unmap granularity in blocks: the unit a discard actually frees.
    pub fn unmap_granularity(&self) -> u32 {
        let bytes = match self.storage {
            Storage::Ram(_) => crate::storage::CHUNK_SIZE as u32,
            Storage::File(_) => 4096,
            Storage::Null(_) => 0,
        };
        (bytes >> self.shift).max(1)
    }

    /// Queues a unit attention unless the same one is already pending. A power-on or reset
    /// condition (ASC 29h) replaces every other pending one and absorbs later ones until it is
    /// reported, as SPC-4 ranks it first: the initiator re-reads everything after it anyway.
    pub fn push_ua(&self, sense: Sense) {
        const RESET_CLASS: u8 = 0x29;
        let mut st = self.lock();
        let reset_pending = st.ua.iter().any(|s| s.asc == RESET_CLASS);
        if sense.asc == RESET_CLASS && !reset_pending {
            st.ua.clear();
            st.ua.push_back(sense);
        } else if !reset_pending && !st.ua.contains(&sense) && st.ua.len() < MAX_PENDING_UA {
            st.ua.push_back(sense);
        }
        self.update_slow(&st);
    }

    /// Drops pending REPORTED LUNS DATA HAS CHANGED attentions: REPORT LUNS clears them.
    pub fn clear_luns_changed(&self) {
        if self.slow.load(Ordering::Acquire) {
            let mut st = self.lock();
            st.ua.retain(|s| *s != Sense::unit_attention(asc::REPORTED_LUNS_DATA_CHANGED));
            self.update_slow(&st);
        }
    }

    pub fn set_fault(&self, fault: Option<ArmedFault>) {
        let mut st = self.lock();
        st.fault = fault;
        self.update_slow(&st);
    }

    pub fn execute(&self, cdb: &[u8], out: &dyn DataOut, inp: &mut dyn DataIn) -> Completion {
        let Some(&op) = cdb.first() else {
            return Completion::check_condition(INVALID_FIELD);
        };
        let mut action = Action::Now;
        let mut corrupt = false;
        // INQUIRY, REPORT LUNS and REQUEST SENSE neither report unit attentions (SPC-4 5.14)
        // nor take injected faults, so a scan always works.
        let exempt = matches!(op, opcode::INQUIRY | opcode::REPORT_LUNS | opcode::REQUEST_SENSE);
        if !exempt && self.slow.load(Ordering::Acquire) {
            let mut st = self.lock();
            if let Some(armed) = st.fault.as_mut().filter(|a| a.fault.applies_to(op)) {
                let effect = armed.fault.effect();
                armed.remaining = armed.remaining.saturating_sub(1);
                if armed.remaining == 0 {
                    st.fault = None;
                }
                match effect {
                    Effect::Replace(c) => {
                        self.update_slow(&st);
                        return c;
                    }
                    Effect::Defer(a) => action = a,
                    Effect::Corrupt => corrupt = true,
                }
            }
            if matches!(action, Action::Late(_)) {
                // Before anything is written, the unit attention's sense included.
                inp.hold_back();
            }
            let ua = st.ua.pop_front();
            self.update_slow(&st);
            drop(st);
            if let Some(ua) = ua {
                return Completion { action, ..Completion::check_condition(ua) };
            }
        }
        let result = if corrupt {
            self.dispatch(op, cdb, out, &mut Corrupting { inner: inp })
        } else {
            self.dispatch(op, cdb, out, inp)
        };
        let mut c = match result {
            Ok(n) => Completion::good(n),
            Err(sense) => Completion::check_condition(sense),
        };
        c.action = action;
        c
    }

    fn dispatch(&self, op: u8, cdb: &[u8], out: &dyn DataOut, inp: &mut dyn DataIn) -> CmdResult {
        use opcode::*;
        let handler: Handler = match op {
            TEST_UNIT_READY => |u, _, _, _| u.ready().map(|_| 0),
            REQUEST_SENSE => LogicalUnit::request_sense,
            INQUIRY => |u, cdb, _, inp| {
                let data = inquiry::inquiry(Some(u), cdb)?;
                send(inp, &data, cdb::allocation_length(cdb))
            },
            MODE_SENSE_6 | MODE_SENSE_10 => |u, cdb, _, inp| {
                let data = mode::mode_sense(u, cdb)?;
                send(inp, &data, cdb::allocation_length(cdb))
            },
            MODE_SELECT_6 | MODE_SELECT_10 => |u, cdb, out, _| mode::mode_select(u, cdb, out).map(|_| 0),
            START_STOP_UNIT => LogicalUnit::start_stop,
            PREVENT_ALLOW_MEDIUM_REMOVAL => |_, _, _, _| Ok(0),
            READ_CAPACITY_10 => LogicalUnit::read_capacity_10,
            SERVICE_ACTION_IN_16 => LogicalUnit::read_capacity_16,
            READ_6 | READ_10 | READ_16 => LogicalUnit::read,
            WRITE_6 | WRITE_10 | WRITE_16 => LogicalUnit::write,
            VERIFY_10 | VERIFY_16 => LogicalUnit::verify,
            SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 => LogicalUnit::synchronize_cache,
            UNMAP => LogicalUnit::unmap,
            WRITE_SAME_10 | WRITE_SAME_16 => LogicalUnit::write_same,
            _ => return Err(Sense::illegal_request(asc::INVALID_COMMAND_OPERATION_CODE)),
        };
        cdb::check_len(cdb)?;
        handler(self, cdb, out, inp)
    }

    fn ready(&self) -> Result<(), Sense> {
        if self.stopped.load(Ordering::Relaxed) {
            Err(NOT_READY)
        } else {
            Ok(())
        }
    }

    fn writable(&self) -> Result<(), Sense> {
        if self.read_only {
            Err(WRITE_PROTECTED)
        } else {
            Ok(())
        }
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        let capacity = self.blocks();
        if lba >= capacity || blocks > capacity - lba {
            Err(LBA_OUT_OF_RANGE)
        } else {
            Ok(())
        }
    }

    /// Validates a READ or WRITE extent and returns its length in bytes.
    fn transfer(&self, ext: Extent) -> Result<usize, Sense> {
        if ext.blocks > self.max_transfer_blocks() {
            return Err(INVALID_FIELD);
        }
        self.check_range(ext.lba, u64::from(ext.blocks))?;
        Ok((ext.blocks as usize) << self.shift)
    }

    fn request_sense(&self, cdb: &[u8], _: &dyn DataOut, inp: &mut dyn DataIn) -> CmdResult {
        // Descriptor-format sense is not offered.
        if cdb[1] & 0x01 != 0 {
            return Err(INVALID_FIELD);
        }
        let pending = {
            let mut st = self.lock();
            let ua = st.ua.pop_front();
            self.update_slow(&st);
            ua
        };
        let sense = pending.unwrap_or(if self.ready().is_err() { NOT_READY } else { Sense::none() });
        send(inp, &sense.to_fixed(), cdb::allocation_length(cdb))
    }

    fn start_stop(&self, cdb: &[u8], _: &dyn DataOut, _: &mut dyn DataIn) -> CmdResult {
        // Only power condition 0 (START_VALID) changes state; others and LOEJ are accepted as
        // no-ops, as there is no medium to eject and no power management.
        if cdb[4] >> 4 == 0 {
            self.stopped.store(cdb[4] & 0x01 == 0, Ordering::Relaxed);
        }
        Ok(0)
    }

    fn read_capacity_10(&self, cdb: &[u8], _: &dyn DataOut, inp: &mut dyn DataIn) -> CmdResult {
        // Without PMI the LBA field must be zero (SBC-3 5.16).
        if cdb[8] & 0x01 == 0 && be32(&cdb[2..6]) != 0 {
            return Err(INVALID_FIELD);
        }
        let last = self.blocks().saturating_sub(1).min(u64::from(u32::MAX)) as u32;
        let mut data = [0u8; 8];
        data[0..4].copy_from_slice(&last.to_be_bytes());
        data[4..8].copy_from_slice(&self.block_size.to_be_bytes());
        send(inp, &data, 8)
    }

    fn read_capacity_16(&self, cdb: &[u8], _: &dyn DataOut, inp: &mut dyn DataIn) -> CmdResult {
        if cdb[1] & 0x1f != opcode::SAI_READ_CAPACITY_16 {
            return Err(INVALID_FIELD);
        }
        let mut data = [0u8; 32];
        data[0..8].copy_from_slice(&self.blocks().saturating_sub(1).to_be_bytes());
        data[8..12].copy_from_slice(&self.block_size.to_be_bytes());
        // LBPME (thin provisioning) and LBPRZ (unmapped blocks read as zeros); one logical block
        // per physical block, lowest aligned LBA 0.
        data[14] = 0x80 | 0x40;
        send(inp, &data, cdb::allocation_length(cdb))
    }

    fn read(&self, cdb: &[u8], _: &dyn DataOut, inp: &mut dyn DataIn) -> CmdResult {
        // RDPROTECT must be 0: there is no protection information.
        if cdb[0] != opcode::READ_6 && cdb[1] >> 5 != 0 {
            return Err(INVALID_FIELD);
        }
        self.ready()?;
        let ext = cdb::extent(cdb);
        let bytes = self.transfer(ext)?;
        if inp.capacity() < bytes {
            return Err(INVALID_FIELD);
        }
        self.storage
            .read_with(ext.lba << self.shift, bytes, |pos, seg: &[u8]| {
                inp.write_at(pos, seg).map_err(IoError::Data)
            })
            .map_err(|e| self.io_sense(e, false))?;
        Ok(bytes)
    }

    fn write(&self, cdb: &[u8], out: &dyn DataOut, _: &mut dyn DataIn) -> CmdResult {
        if cdb[0] != opcode::WRITE_6 && cdb[1] >> 5 != 0 {
            return Err(INVALID_FIELD);
        }
        self.ready()?;
        self.writable()?;
        let ext = cdb::extent(cdb);
        let bytes = self.transfer(ext)?;
        if out.len() < bytes {
            return Err(INVALID_FIELD);
        }
        self.storage
            .write_with(ext.lba << self.shift, bytes, |pos, seg: &mut [u8]| {
                out.read_at(pos, seg).map_err(IoError::Data)
            })
            .map_err(|e| self.io_sense(e, true))?;
        // FUA: the data must be on stable storage before completion; the stores have no finer
        // tool than a flush (a no-op for RAM and null).
        let fua = cdb[0] != opcode::WRITE_6 && cdb[1] & 0x08 != 0;
        if fua {
            self.storage.flush().map_err(|e| self.io_sense(e.into(), true))?;
        }
        Ok(0)
    }

    fn verify(&self, cdb: &[u8], _: &dyn DataOut, _: &mut dyn DataIn) -> CmdResult {
        // VRPROTECT must be 0, and only BYTCHK 0 (medium verification) is offered.
        if cdb[1] >> 5 != 0 || cdb[1] & 0x06 != 0 {
            return Err(INVALID_FIELD);
        }
        self.ready()?;
        let ext = cdb::extent(cdb);
        self.check_range(ext.lba, u64::from(ext.blocks))?;
        Ok(0)
    }

    fn synchronize_cache(&self, cdb: &[u8], _: &dyn DataOut, _: &mut dyn DataIn) -> CmdResult {
        self.ready()?;
        // A length of zero means "to the end of the medium"; the range only needs checking.
        let ext = cdb::extent(cdb);
        self.check_range(ext.lba, u64::from(ext.blocks))?;
        self.storage.flush().map_err(|e| self.io_sense(e.into(), true))?;
        Ok(0)
    }

    fn unmap(&self, cdb: &[u8], out: &dyn DataOut, _: &mut dyn DataIn) -> CmdResult {
        // ANCHOR is not supported (ANC_SUP = 0 in VPD 0xB2).
        if cdb[1] & 0x01 != 0 {
            return Err(INVALID_FIELD);
        }
        self.ready()?;
        self.writable()?;
        let len = usize::from(be16(&cdb[7..9]));
        if len == 0 {
            return Ok(0);
        }
        if len < 8 {
            return Err(PARAM_LIST_LENGTH);
        }
        if out.len() < len {
            return Err(INVALID_FIELD);
        }
        let mut list = vec![0u8; len];
        out.read_at(0, &mut list).map_err(|e| self.io_sense(IoError::Data(e), false))?;
        let data_len = usize::from(be16(&list[0..2]));
        let desc_len = usize::from(be16(&list[2..4]));
        if desc_len + 8 > len || data_len < desc_len + 6 {
            return Err(PARAM_LIST_LENGTH);
        }
        if desc_len % 16 != 0 || desc_len / 16 > MAX_UNMAP_DESCRIPTORS as usize {
            return Err(INVALID_PARAM);
        }
        // Validate every descriptor before discarding anything.
        let mut ranges = Vec::with_capacity(desc_len / 16);
        let mut total = 0u64;
        for d in list[8..8 + desc_len].chunks_exact(16) {
            let (lba, blocks) = (be64(&d[0..8]), u64::from(be32(&d[8..12])));
            if blocks == 0 {
                continue;
            }
            self.check_range(lba, blocks)?;
            total += blocks;
            ranges.push((lba, blocks));
        }
        if total > u64::from(self.max_unmap_blocks()) {
            return Err(INVALID_PARAM);
        }
        for (lba, blocks) in ranges {
            self.storage
                .discard(lba << self.shift, blocks << self.shift)
                .map_err(|e| self.io_sense(e.into(), true))?;
        }
        Ok(0)
    }

    fn write_same(&self, cdb: &[u8], out: &dyn DataOut, _: &mut dyn DataIn) -> CmdResult {
        const UNMAP: u8 = 0x08;
        const NDOB: u8 = 0x01;
        // WRPROTECT, ANCHOR, PBDATA and LBDATA are not supported; NDOB exists in the 16-byte form.
        let allowed = if cdb[0] == opcode::WRITE_SAME_16 { UNMAP | NDOB } else { UNMAP };
        if cdb[1] & !allowed != 0 {
            return Err(INVALID_FIELD);
        }
        let ext = cdb::extent(cdb);
        // WSNZ is set in VPD 0xB0: a zero length is not "to the end of the medium".
        if ext.blocks == 0 || ext.blocks > self.max_unmap_blocks() {
            return Err(INVALID_FIELD);
        }
        self.ready()?;
        self.writable()?;
        self.check_range(ext.lba, u64::from(ext.blocks))?;
        let bs = self.block_size as usize;
        let pattern = if cdb[1] & NDOB != 0 {
            None
        } else {
            if out.len() < bs {
                return Err(INVALID_FIELD);
            }
            let mut block = vec![0u8; bs];
            out.read_at(0, &mut block).map_err(|e| self.io_sense(IoError::Data(e), false))?;
            Some(block)
        };
        let offset = ext.lba << self.shift;
        let len = u64::from(ext.blocks) << self.shift;
        let pattern = match pattern {
            Some(p) if p.iter().any(|&b| b != 0) => p,
            // Zeros, with or without UNMAP: unmapped blocks read as zeros (LBPRZ), and
            // deallocating is cheaper than writing them.
            _ => {
                self.storage.discard(offset, len).map_err(|e| self.io_sense(e.into(), true))?;
                return Ok(0);
            }
        };
        let fill = (len as usize).min(PATTERN_BUFFER);
        let mut buf = vec![0u8; fill];
        for block in buf.chunks_exact_mut(bs) {
            block.copy_from_slice(&pattern);
        }
        let mut pos = 0u64;
        while pos < len {
            let n = (len - pos).min(fill as u64) as usize;
            self.storage.write(offset + pos, &buf[..n]).map_err(|e| self.io_sense(e.into(), true))?;
            pos += n as u64;
        }
        Ok(0)
    }

    fn io_sense(&self, e: IoError, write: bool) -> Sense {
        let (t, l) = (self.addr.target, self.addr.lun);
        match e {
            IoError::Data(e) => {
                log::warn!("LUN {t}:{l}: {e}");
                INTERNAL_FAILURE
            }
            // The store shrank under a command that passed the range check.
            IoError::Storage(StorageError::OutOfRange { .. }) => LBA_OUT_OF_RANGE,
            IoError::Storage(StorageError::ReadOnly { .. }) => WRITE_PROTECTED,
            IoError::Storage(e) => {
                log::warn!("LUN {t}:{l}: {e}");
                if write {
                    Sense::new(sense_key::MEDIUM_ERROR, asc::WRITE_ERROR)
                } else {
                    Sense::new(sense_key::MEDIUM_ERROR, asc::UNRECOVERED_READ_ERROR)
                }
            }
        }
    }
}

/// Copies a response to the data-in area, truncated to the allocation length and the buffer.
pub(crate) fn send(inp: &mut dyn DataIn, data: &[u8], alloc: usize) -> CmdResult {
    let n = data.len().min(alloc).min(inp.capacity());
    if n > 0 {
        inp.write_at(0, &data[..n]).map_err(|e| {
            log::warn!("data-in copy failed: {e}");
            INTERNAL_FAILURE
        })?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{Backing, Bus, LunConfig};
    use super::*;
    use virtio_scsi_proto::scsi::opcode::*;

    const A: LunAddress = LunAddress::new(0, 0);

    fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
        let mut l = vec![0u8; 8];
        l[0..2].copy_from_slice(&((6 + 16 * descs.len()) as u16).to_be_bytes());
        l[2..4].copy_from_slice(&((16 * descs.len()) as u16).to_be_bytes());
        for &(lba, n) in descs {
            l.extend_from_slice(&lba.to_be_bytes());
            l.extend_from_slice(&n.to_be_bytes());
            l.extend_from_slice(&[0; 4]);
        }
        l
    }

    fn unmap_cdb(len: usize) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = UNMAP;
        c[7..9].copy_from_slice(&(len as u16).to_be_bytes());
        c
    }

    fn read_blocks(bus: &Bus, lba: u64, blocks: u32, bs: usize) -> Vec<u8> {
        let (c, data) = run(bus, A, &rw16(READ_16, lba, blocks), &[], blocks as usize * bs);
        assert_eq!(c, Completion::good(blocks as usize * bs));
        data
    }

    #[test]
    fn first_and_last_lba_round_trip() {
        for bs in [512usize, 4096] {
            let bus = ram_bus(&[(0, 0, 1 << 20, bs as u32)]);
            clear_ua(&bus, A);
            let last = (1u64 << 20) / bs as u64 - 1;
            let first_data = pattern(2 * bs, 3);
            let last_data = pattern(bs, 9);
            let (c, _) = run(&bus, A, &rw10(WRITE_10, 0, 2), &first_data, 0);
            assert_eq!(c, Completion::good(0));
            let (c, _) = run(&bus, A, &rw16(WRITE_16, last, 1), &last_data, 0);
            assert_eq!(c, Completion::good(0));
            let (c, data) = run(&bus, A, &rw10(READ_10, 0, 2), &[], 2 * bs);
            assert_eq!((c.status, data), (0, first_data.clone()));
            assert_eq!(read_blocks(&bus, last, 1, bs), last_data);
            // READ (6) of the same blocks, and WRITE (6) back at block 1.
            let (c, data) = run(&bus, A, &[READ_6, 0, 0, 0, 1, 0], &[], bs);
            assert_eq!((c.status, &data[..]), (0, &first_data[..bs]));
            let (c, _) = run(&bus, A, &[WRITE_6, 0, 0, 1, 1, 0], &last_data, 0);
            assert_eq!(c.status, 0);
            assert_eq!(read_blocks(&bus, 1, 1, bs), last_data);
            // Blocks in between were never written and read as zeros.
            assert!(read_blocks(&bus, 2, 4, bs).iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn lba_out_of_range_just_past_the_end() {
        let bus = ram_bus(&[(0, 0, 1 << 20, 512)]);
        clear_ua(&bus, A);
        let blocks = 2048u64;
        let (c, _) = run(&bus, A, &rw16(READ_16, blocks, 1), &[], 512);
        expect_sense(&c, sense_key::ILLEGAL_REQUEST, asc::LBA_OUT_OF_RANGE);
        let (c, _) = run(&bus, A, &rw10(WRITE_10, blocks as u32 - 1, 2), &[0; 1024], 0);
        expect_sense(&c, sense_key::ILLEGAL_REQUEST, asc::LBA_OUT_OF_RANGE);
        let (c, _) = run(&bus, A, &rw16(READ_16, u64::MAX, 2), &[], 1024);
        expect_sense(&c, sense_key::ILLEGAL_REQUEST, asc::LBA_OUT_OF_RANGE);
        // The last block itself is fine, and a zero-length transfer moves nothing.
        let (c, _) = run(&bus, A, &rw16(READ_16, blocks - 1, 1), &[], 512);
        assert_eq!(c, Completion::good(512));
        let (c, _) = run(&bus, A, &rw10(READ_10, 5, 0), &[], 512);
        assert_eq!(c, Completion::good(0));
    }

    #[test]
    fn transfer_limits_and_buffer_sizes() {
        let bus = ram_bus(&[(0, 0, 64 << 20, 4096)]);
        clear_ua(&bus, A);
        let max = MAX_TRANSFER_BYTES / 4096;
        let (c, _) = run(&bus, A, &rw16(READ_16, 0, max + 1), &[], (max as usize + 1) * 4096);
        expect_sense(&c, sense_key::ILLEGAL_REQUEST, asc::INVALID_FIELD_IN_CDB);
        let (c, _) = run(&bus, A, &rw16(READ_16, 0, max), &[], max as usize * 4096);
        assert_eq!(c, Completion::good(MAX_TRANSFER_BYTES as usize));
        // Data-in or data-out smaller than the transfer is refused; larger leaves a residual.
        let (c, _) = run(&bus, A, &rw10(READ_10, 0, 2), &[], 8191);
        expect_sense(&c, sense_key::ILLEGAL_REQUEST, asc::INVALID_FIELD_IN_CDB);
        let (c, _) = run(&bus, A, &rw10(WRITE_10, 0, 2), &[1; 4096], 0);
        expect_sense(&c, sense_key::ILLEGAL_REQUEST, asc::INVALID_FIELD_IN_CDB);
        let (c, _) = run(&bus, A, &rw10(READ_10, 0, 1), &[], 3 * 4096);
        assert_eq!(c, Completion::good(4096));
        // RDPROTECT / WRPROTECT are not supported.
        let mut cdb = rw10(READ_10, 0, 1);
        cdb[1] = 0x20;
        expect_sense(&run(&bus, A, &cdb, &[], 4096).0, sense_key::ILLEGAL_REQUEST, asc::INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn unknown_opcodes_and_short_cdbs() {
        let bus = ram_bus(&[(0, 0, 1 << 20, 512)]);
        clear_ua(&bus, A);
        let (c, _) = run(&bus, A, &[0x02, 0, 0, 0, 0, 0], &[], 0);
        expect_sense(&c, sense_key::ILLEGAL_REQUEST, asc::INVALID_COMMAND_OPERATION_CODE);
        let (c, _) = run(&bus, A, &[0xc5; 16], &[], 0);
        expect_sense(&c, sense_key::ILLEGAL_REQUEST, asc::INVALID_COMMAND_OPERATION_CODE);
        let (c, _) = run(&bus, A, &[READ_16, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 512);
        expect_sense(&c, sense_key::ILLEGAL_REQUEST, asc::INVALID_FIELD_IN_CDB);
        let (c, _) = run(&bus, A, &[], &[], 0);
        expect_sense(&c, sense_key::ILLEGAL_REQUEST, asc::INVALID_FIELD_IN_CDB);
        // A 32-byte CDB buffer, as virtio carries it, is fine.
        let mut cdb = [0u8; 32];
        cdb[..10].copy_from_slice(&rw10(READ_10, 0, 1));
        assert_eq!(run(&bus, A, &cdb, &[], 512).0, Completion::good(512));
    }

    #[test]
    fn read_capacity_10_and_16() {
        let bus = ram_bus(&[(0, 0, 3 << 20, 4096)]);
        clear_ua(&bus, A);
        let (c, d) = run(&bus, A, &[READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
        assert_eq!(c.status, 0);
        assert_eq!(d, [0, 0, 0x02, 0xff, 0, 0, 0x10, 0]);
        let mut cdb = [0u8; 16];
        cdb[0] = SERVICE_ACTION_IN_16;
        cdb[1] = SAI_READ_CAPACITY_16;
        cdb[13] = 32;
        let (c, d) = run(&bus, A, &cdb, &[], 64);
        assert_eq!(c, Completion::good(32));
        assert_eq!(be64(&d[0..8]), 767);
        assert_eq!(be32(&d[8..12]), 4096);
        assert_eq!(d[13] & 0x0f, 0);
        assert_eq!(d[14] & 0xc0, 0xc0, "LBPME and LBPRZ");
        // Allocation length truncates.
        cdb[13] = 12;
        assert_eq!(run(&bus, A, &cdb, &[], 64).1.len(), 12);
        cdb[1] = 0x11;
        expect_sense(&run(&bus, A, &cdb, &[], 64).0, sense_key::ILLEGAL_REQUEST, asc::INVALID_FIELD_IN_CDB);

        // 4 TiB of 512-byte blocks: the last LBA does not fit READ CAPACITY (10).
        let big = Bus::new(0);
        let cfg = LunConfig { backing: Backing::Null { bytes: 4 << 40 }, block_size: 512, read_only: false };
        big.add(A, cfg).unwrap();
        clear_ua(&big, A);
        let (_, d) = run(&big, A, &[READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
        assert_eq!(d, [0xff, 0xff, 0xff, 0xff, 0, 0, 0x02, 0]);
        cdb[1] = SAI_READ_CAPACITY_16;
        cdb[13] = 32;
        assert_eq!(be64(&run(&big, A, &cdb, &[], 32).1[0..8]), (4u64 << 31) - 1);
    }

    #[test]
    fn unit_attention_sequence() {
        let bus = ram_bus(&[(0, 0, 1 << 20, 512)]);
        // INQUIRY does not report the power-on attention.
        let (c, _) = run(&bus, A, &[INQUIRY, 0, 0, 0, 36, 0], &[], 36);
        assert_eq!(c, Completion::good(36));
        let (c, _) = run(&bus, A, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], &[], 0);
        expect_sense(&c, sense_key::UNIT_ATTENTION, asc::POWER_ON_RESET);
        let (c, _) = run(&bus, A, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], &[], 0);
        assert_eq!(c, Completion::good(0));

        // REQUEST SENSE returns and clears a pending attention, then reports NO SENSE.
        bus.lun_reset(A).unwrap();
        let (c, d) = run(&bus, A, &[REQUEST_SENSE, 0, 0, 0, 18, 0], &[], 252);
        assert_eq!(c, Completion::good(18));
        assert_eq!(Sense::from_fixed(&d), Some(Sense::unit_attention(asc::BUS_DEVICE_RESET)));
        let (_, d) = run(&bus, A, &[REQUEST_SENSE, 0, 0, 0, 18, 0], &[], 252);
        assert_eq!(Sense::from_fixed(&d), Some(Sense::none()));
        assert_eq!(run(&bus, A, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], &[], 0).0.status, 0);
        let (c, _) = run(&bus, A, &[REQUEST_SENSE, 1, 0, 0, 18, 0], &[], 18);
        expect_sense(&c, sense_key::ILLEGAL_REQUEST, asc::INVALID_FIELD_IN_CDB);

        // A reset condition absorbs later ones and anything lesser until it is reported;
        // lesser ones come out oldest first, one per command, without duplicates.
        bus.nexus_reset(0);
        bus.lun_reset(A).unwrap();
        bus.resize(A, 2 << 20).unwrap();
        let (c, _) = run(&bus, A, &rw10(READ_10, 0, 1), &[], 512);
        expect_sense(&c, sense_key::UNIT_ATTENTION, asc::I_T_NEXUS_LOSS);
        assert_eq!(run(&bus, A, &[0; 6], &[], 0).0.status, 0);
        bus.resize(A, 4 << 20).unwrap();
        bus.resize(A, 1 << 20).unwrap();
        bus.lun_reset(A).unwrap();
        expect_sense(&run(&bus, A, &[0; 6], &[], 0).0, sense_key::UNIT_ATTENTION, asc::BUS_DEVICE_RESET);
        assert_eq!(run(&bus, A, &rw10(READ_10, 0, 1), &[], 512).0, Completion::good(512));
    }

    #[test]
    fn start_stop_unit() {
        let bus = ram_bus(&[(0, 0, 1 << 20, 512)]);
        clear_ua(&bus, A);
        assert_eq!(run(&bus, A, &[START_STOP_UNIT, 0, 0, 0, 0, 0], &[], 0).0.status, 0);
        let not_ready = (sense_key::NOT_READY, asc::LUN_NOT_READY_INIT_REQUIRED);
        expect_sense(&run(&bus, A, &[0; 6], &[], 0).0, not_ready.0, not_ready.1);
        expect_sense(&run(&bus, A, &rw10(READ_10, 0, 1), &[], 512).0, not_ready.0, not_ready.1);
        let (_, d) = run(&bus, A, &[REQUEST_SENSE, 0, 0, 0, 18, 0], &[], 18);
        assert_eq!(Sense::from_fixed(&d), Some(Sense::new(not_ready.0, not_ready.1)));
        // INQUIRY and READ CAPACITY still work while stopped.
        assert_eq!(run(&bus, A, &[INQUIRY, 0, 0, 0, 36, 0], &[], 36).0.status, 0);
        assert_eq!(run(&bus, A, &[READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8).0.status, 0);
        assert_eq!(run(&bus, A, &[START_STOP_UNIT, 0, 0, 0, 1, 0], &[], 0).0.status, 0);
        assert_eq!(run(&bus, A, &rw10(READ_10, 0, 1), &[], 512).0, Completion::good(512));
    }

    #[test]
    fn read_only_unit() {
        let bus = Bus::new(0);
        let cfg = LunConfig { backing: Backing::Ram { bytes: 1 << 20 }, block_size: 512, read_only: true };
        bus.add(A, cfg).unwrap();
        clear_ua(&bus, A);
        let wp = (sense_key::DATA_PROTECT, asc::WRITE_PROTECTED);
        expect_sense(&run(&bus, A, &rw10(WRITE_10, 0, 1), &[1; 512], 0).0, wp.0, wp.1);
        let list = unmap_list(&[(0, 8)]);
        expect_sense(&run(&bus, A, &unmap_cdb(list.len()), &list, 0).0, wp.0, wp.1);
        expect_sense(&run(&bus, A, &rw16(WRITE_SAME_16, 0, 8), &[1; 512], 0).0, wp.0, wp.1);
        assert_eq!(run(&bus, A, &rw10(READ_10, 0, 1), &[], 512).0, Completion::good(512));
    }

    #[test]
    fn verify_and_synchronize_cache() {
        let bus = ram_bus(&[(0, 0, 1 << 20, 512)]);
        clear_ua(&bus, A);
        assert_eq!(run(&bus, A, &rw10(VERIFY_10, 0, 16), &[], 0).0, Completion::good(0));
        assert_eq!(run(&bus, A, &rw16(VERIFY_16, 2047, 1), &[], 0).0, Completion::good(0));
        expect_sense(&run(&bus, A, &rw16(VERIFY_16, 2047, 2), &[], 0).0, 5, asc::LBA_OUT_OF_RANGE);
        let mut bytchk = rw10(VERIFY_10, 0, 1);
        bytchk[1] = 0x02;
        expect_sense(&run(&bus, A, &bytchk, &[0; 512], 0).0, 5, asc::INVALID_FIELD_IN_CDB);
        assert_eq!(run(&bus, A, &rw10(SYNCHRONIZE_CACHE_10, 0, 0), &[], 0).0, Completion::good(0));
        assert_eq!(run(&bus, A, &rw16(SYNCHRONIZE_CACHE_16, 100, 10), &[], 0).0, Completion::good(0));
        expect_sense(&run(&bus, A, &rw16(SYNCHRONIZE_CACHE_16, 2048, 0), &[], 0).0, 5, asc::LBA_OUT_OF_RANGE);
    }

    #[test]
    fn unmap_reads_back_zeros() {
        let bus = ram_bus(&[(0, 0, 1 << 20, 512)]);
        clear_ua(&bus, A);
        let data = pattern(64 * 512, 5);
        assert_eq!(run(&bus, A, &rw10(WRITE_10, 0, 64), &data, 0).0.status, 0);
        let list = unmap_list(&[(4, 8), (40, 1), (50, 0)]);
        assert_eq!(run(&bus, A, &unmap_cdb(list.len()), &list, 0).0, Completion::good(0));
        let back = read_blocks(&bus, 0, 64, 512);
        for block in 0..64 {
            let got = &back[block * 512..(block + 1) * 512];
            if (4..12).contains(&block) || block == 40 {
                assert!(got.iter().all(|&b| b == 0), "block {block} not zero");
            } else {
                assert_eq!(got, &data[block * 512..(block + 1) * 512], "block {block}");
            }
        }
        // A parameter list length of zero is no operation.
        assert_eq!(run(&bus, A, &unmap_cdb(0), &[], 0).0, Completion::good(0));
    }

    #[test]
    fn unmap_rejects_bad_lists() {
        let bus = ram_bus(&[(0, 0, 1 << 20, 512)]);
        clear_ua(&bus, A);
        let data = pattern(512, 1);
        assert_eq!(run(&bus, A, &rw10(WRITE_10, 0, 1), &data, 0).0.status, 0);
        // Shorter than the header.
        expect_sense(&run(&bus, A, &unmap_cdb(4), &[0; 4], 0).0, 5, asc::PARAMETER_LIST_LENGTH_ERROR);
        // Descriptor length claims more than was sent.
        let mut list = unmap_list(&[(0, 1)]);
        list[3] = 32;
        expect_sense(&run(&bus, A, &unmap_cdb(list.len()), &list, 0).0, 5, asc::PARAMETER_LIST_LENGTH_ERROR);
        // Descriptor length not a multiple of 16.
        let mut list = unmap_list(&[(0, 1)]);
        list[3] = 12;
        expect_sense(
            &run(&bus, A, &unmap_cdb(list.len()), &list, 0).0,
            5,
            asc::INVALID_FIELD_IN_PARAMETER_LIST,
        );
        // A later descriptor out of range fails the whole command before anything is unmapped.
        let list = unmap_list(&[(0, 1), (2047, 2)]);
        expect_sense(&run(&bus, A, &unmap_cdb(list.len()), &list, 0).0, 5, asc::LBA_OUT_OF_RANGE);
        // Too many descriptors.
        let many: Vec<(u64, u32)> = (0..=MAX_UNMAP_DESCRIPTORS as u64).map(|i| (i, 1)).collect();
        let list = unmap_list(&many);
        expect_sense(
            &run(&bus, A, &unmap_cdb(list.len()), &list, 0).0,
            5,
            asc::INVALID_FIELD_IN_PARAMETER_LIST,
        );
        // Data-out shorter than the parameter list length.
        let list = unmap_list(&[(0, 1)]);
        expect_sense(&run(&bus, A, &unmap_cdb(list.len() + 16), &list, 0).0, 5, asc::INVALID_FIELD_IN_CDB);
        assert_eq!(read_blocks(&bus, 0, 1, 512), data);
    }

    #[test]
    fn write_same_replicates_and_unmaps() {
        let bus = ram_bus(&[(0, 0, 1 << 20, 4096)]);
        clear_ua(&bus, A);
        let block = pattern(4096, 7);
        assert_eq!(run(&bus, A, &rw16(WRITE_SAME_16, 10, 20), &block, 0).0, Completion::good(0));
        let back = read_blocks(&bus, 9, 22, 4096);
        assert!(back[..4096].iter().all(|&b| b == 0));
        for i in 1..21 {
            assert_eq!(&back[i * 4096..(i + 1) * 4096], &block[..], "block {}", 9 + i);
        }
        assert!(back[21 * 4096..].iter().all(|&b| b == 0));

        // WRITE SAME (10) with the UNMAP bit and a zero block deallocates.
        let mut cdb = rw10(WRITE_SAME_10, 12, 4);
        cdb[1] = 0x08;
        assert_eq!(run(&bus, A, &cdb, &[0; 4096], 0).0, Completion::good(0));
        let back = read_blocks(&bus, 10, 20, 4096);
        assert_eq!(&back[..2 * 4096], &[block.clone(), block.clone()].concat()[..]);
        assert!(back[2 * 4096..6 * 4096].iter().all(|&b| b == 0));
        assert_eq!(&back[6 * 4096..7 * 4096], &block[..]);

        // NDOB writes zeros without a data-out buffer.
        let mut cdb = rw16(WRITE_SAME_16, 20, 10);
        cdb[1] = 0x08 | 0x01;
        assert_eq!(run(&bus, A, &cdb, &[], 0).0, Completion::good(0));
        assert!(read_blocks(&bus, 20, 10, 4096).iter().all(|&b| b == 0));

        // Zero blocks (WSNZ), a missing pattern block, range and unsupported flags.
        expect_sense(&run(&bus, A, &rw16(WRITE_SAME_16, 0, 0), &block, 0).0, 5, asc::INVALID_FIELD_IN_CDB);
        expect_sense(
            &run(&bus, A, &rw16(WRITE_SAME_16, 0, 1), &block[..100], 0).0,
            5,
            asc::INVALID_FIELD_IN_CDB,
        );
        expect_sense(&run(&bus, A, &rw16(WRITE_SAME_16, 250, 7), &block, 0).0, 5, asc::LBA_OUT_OF_RANGE);
        let mut cdb = rw10(WRITE_SAME_10, 0, 1);
        cdb[1] = 0x01;
        expect_sense(&run(&bus, A, &cdb, &block, 0).0, 5, asc::INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn null_unit_reads_zeros_and_accepts_writes() {
        let bus = Bus::new(0);
        let cfg = LunConfig { backing: Backing::Null { bytes: 1 << 30 }, block_size: 4096, read_only: false };
        bus.add(A, cfg).unwrap();
        clear_ua(&bus, A);
        assert_eq!(run(&bus, A, &rw10(WRITE_10, 7, 2), &[0xee; 8192], 0).0, Completion::good(0));
        let (c, d) = run(&bus, A, &rw10(READ_10, 7, 2), &[], 8192);
        assert_eq!(c, Completion::good(8192));
        assert!(d.iter().all(|&b| b == 0));
    }
}
