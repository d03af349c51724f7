//! The controller's set of targets and logical units, and the commands answered for addresses
//! that have no logical unit.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::ser::{Serialize, SerializeStruct, Serializer};
use virtio_scsi_proto::lun::MAX_LUN;
use virtio_scsi_proto::scsi::{asc, opcode};
use virtio_scsi_proto::LunAddress;

use super::cdb::{self, be32, INVALID_FIELD};
use super::config::{valid_block_size, Backing, LunConfig, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use super::fault::ArmedFault;
use super::unit::{send, CmdResult, LogicalUnit};
use super::{inquiry, Completion, DataIn, DataOut, Fault, Sense};
use crate::storage::{Storage, StorageError};

const LUN_NOT_SUPPORTED: Sense = Sense::illegal_request(asc::LOGICAL_UNIT_NOT_SUPPORTED);

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("LUN {}:{} already exists", .0.target, .0.lun)]
    Exists(LunAddress),
    #[error("LUN {}:{} does not exist", .0.target, .0.lun)]
    NoSuchLun(LunAddress),
    #[error("LUN {}:{}: target {} is above the highest target {max}", .addr.target, .addr.lun, .addr.target)]
    TargetOutOfRange { addr: LunAddress, max: u8 },
    #[error("LUN {}:{}: LUN number is above {MAX_LUN}", .0.target, .0.lun)]
    LunOutOfRange(LunAddress),
    #[error(
        "LUN {}:{}: block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}",
        .addr.target, .addr.lun
    )]
    BadBlockSize { addr: LunAddress, block_size: u32 },
    #[error("LUN {}:{}: {bytes} bytes hold no whole {block_size}-byte block", .addr.target, .addr.lun)]
    ZeroBlocks { addr: LunAddress, bytes: u64, block_size: u32 },
    #[error(
        "LUN {}:{}: file '{}' is {len} bytes, not a multiple of the block size {block_size}",
        .addr.target, .addr.lun, .path.display()
    )]
    FileSize { addr: LunAddress, path: PathBuf, len: u64, block_size: u32 },
    #[error("LUN {}:{}: {source}", .addr.target, .addr.lun)]
    Storage {
        addr: LunAddress,
        #[source]
        source: StorageError,
    },
}

/// A logical unit as `Bus::list` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LunInfo {
    pub addr: LunAddress,
    /// "ram", "null" or "file".
    pub kind: &'static str,
    pub path: Option<PathBuf>,
    pub block_size: u32,
    pub blocks: u64,
    pub read_only: bool,
}

/// Serialized flat: `{"target", "lun", "kind", "path", "block_size", "blocks", "read_only"}`.
impl Serialize for LunInfo {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("LunInfo", 7)?;
        st.serialize_field("target", &self.addr.target)?;
        st.serialize_field("lun", &self.addr.lun)?;
        st.serialize_field("kind", self.kind)?;
        st.serialize_field("path", &self.path)?;
        st.serialize_field("block_size", &self.block_size)?;
        st.serialize_field("blocks", &self.blocks)?;
        st.serialize_field("read_only", &self.read_only)?;
        st.end()
    }
}

/// All targets and LUNs of one controller, shared by the request-queue workers.
pub struct Bus {
    max_target: u8,
    luns: RwLock<BTreeMap<LunAddress, Arc<LogicalUnit>>>,
}

impl Bus {
    /// `max_target` is the highest target id reported in the device's config space.
    pub fn new(max_target: u8) -> Bus {
        Bus { max_target, luns: RwLock::new(BTreeMap::new()) }
    }

    pub fn max_target(&self) -> u8 {
        self.max_target
    }

    // Map updates are single inserts and removes, so a poisoned lock still holds a valid map.
    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<LunAddress, Arc<LogicalUnit>>> {
        self.luns.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<LunAddress, Arc<LogicalUnit>>> {
        self.luns.write().unwrap_or_else(|e| e.into_inner())
    }

    fn unit(&self, addr: LunAddress) -> Result<Arc<LogicalUnit>, BusError> {
        self.read().get(&addr).cloned().ok_or(BusError::NoSuchLun(addr))
    }

    fn on_target(
        map: &BTreeMap<LunAddress, Arc<LogicalUnit>>,
        target: u8,
    ) -> impl Iterator<Item = &Arc<LogicalUnit>> {
        map.range(LunAddress::new(target, 0)..=LunAddress::new(target, u16::MAX)).map(|(_, u)| u)
    }

    /// Creates a LUN. Its first command reports POWER ON RESET; the target's other LUNs report
    /// REPORTED LUNS DATA HAS CHANGED.
    pub fn add(&self, addr: LunAddress, cfg: LunConfig) -> Result<(), BusError> {
        if addr.target > self.max_target {
            return Err(BusError::TargetOutOfRange { addr, max: self.max_target });
        }
        if addr.lun > MAX_LUN {
            return Err(BusError::LunOutOfRange(addr));
        }
        let block_size = cfg.block_size;
        if self.read().contains_key(&addr) {
            return Err(BusError::Exists(addr));
        }
        let (storage, path) = open_storage(addr, &cfg)?;
        let unit = Arc::new(LogicalUnit::new(addr, storage, path, block_size, cfg.read_only));
        let mut map = self.write();
        if map.contains_key(&addr) {
            return Err(BusError::Exists(addr));
        }
        for other in Self::on_target(&map, addr.target) {
            other.push_ua(Sense::unit_attention(asc::REPORTED_LUNS_DATA_CHANGED));
        }
        map.insert(addr, unit);
        Ok(())
    }

    /// Removes a LUN; the target's remaining LUNs report REPORTED LUNS DATA HAS CHANGED.
    /// Commands already running on it finish against its store.
    pub fn remove(&self, addr: LunAddress) -> Result<(), BusError> {
        let mut map = self.write();
        map.remove(&addr).ok_or(BusError::NoSuchLun(addr))?;
        for other in Self::on_target(&map, addr.target) {
            other.push_ua(Sense::unit_attention(asc::REPORTED_LUNS_DATA_CHANGED));
        }
        Ok(())
    }

    /// Changes a LUN's size, rounded down to whole blocks, and raises CAPACITY DATA HAS CHANGED.
    /// A file LUN's file is truncated or extended.
    pub fn resize(&self, addr: LunAddress, bytes: u64) -> Result<(), BusError> {
        let unit = self.unit(addr)?;
        let bytes = whole_blocks(addr, bytes, unit.block_size)?;
        unit.storage.resize(bytes).map_err(|source| BusError::Storage { addr, source })?;
        unit.push_ua(Sense::unit_attention(asc::CAPACITY_DATA_CHANGED));
        Ok(())
    }

    /// Makes the next `count` commands to the LUN (other than INQUIRY, REPORT LUNS and REQUEST
    /// SENSE) answer `fault`; replaces any fault already armed. A count of 0 clears it.
    pub fn inject(&self, addr: LunAddress, fault: Fault, count: u32) -> Result<(), BusError> {
        let unit = self.unit(addr)?;
        unit.set_fault((count > 0).then_some(ArmedFault { fault, remaining: count }));
        Ok(())
    }

    pub fn clear_faults(&self, addr: LunAddress) -> Result<(), BusError> {
        self.unit(addr)?.set_fault(None);
        Ok(())
    }

    pub fn list(&self) -> Vec<LunInfo> {
        self.read()
            .values()
            .map(|u| LunInfo {
                addr: u.addr,
                kind: u.storage.kind(),
                path: u.path.clone(),
                block_size: u.block_size,
                blocks: u.blocks(),
                read_only: u.read_only,
            })
            .collect()
    }

    /// Whether any LUN exists on `target`.
    pub fn target_exists(&self, target: u8) -> bool {
        Self::on_target(&self.read(), target).next().is_some()
    }

    /// Executes one command. `None` means there is no such target (the transport answers
    /// VIRTIO_SCSI_S_BAD_TARGET); a missing LUN on an existing target gets a SCSI answer.
    pub fn execute(
        &self,
        addr: LunAddress,
        cdb: &[u8],
        out: &dyn DataOut,
        inp: &mut dyn DataIn,
    ) -> Option<Completion> {
        let (unit, target_exists) = {
            let map = self.read();
            let unit = map.get(&addr).cloned();
            let exists = unit.is_some() || Self::on_target(&map, addr.target).next().is_some();
            (unit, exists)
        };
        if !target_exists {
            return None;
        }
        let op = cdb.first().copied();
        if op == Some(opcode::REPORT_LUNS) {
            if let Some(u) = &unit {
                u.clear_luns_changed();
            }
            return Some(result(self.report_luns(addr.target, cdb, inp)));
        }
        match unit {
            Some(unit) => Some(unit.execute(cdb, out, inp)),
            None => Some(result(missing_lun(cdb, inp))),
        }
    }

    fn report_luns(&self, target: u8, cdb: &[u8], inp: &mut dyn DataIn) -> CmdResult {
        cdb::check_len(cdb)?;
        let alloc = be32(&cdb[6..10]) as usize;
        // SPC-4 6.33: an allocation length under 16 is an error.
        if alloc < 16 {
            return Err(INVALID_FIELD);
        }
        let luns: Vec<u16> = match cdb[2] {
            // All logical units (0) or all of those plus well-known ones (2), of which there are none.
            0x00 | 0x02 => Self::on_target(&self.read(), target).map(|u| u.addr.lun).collect(),
            0x01 => Vec::new(),
            _ => return Err(INVALID_FIELD),
        };
        let mut data = Vec::with_capacity(8 + 8 * luns.len());
        data.extend_from_slice(&((8 * luns.len()) as u32).to_be_bytes());
        data.extend_from_slice(&[0; 4]);
        for lun in luns {
            data.extend_from_slice(&LunAddress::report_luns_entry(lun));
        }
        send(inp, &data, alloc)
    }

    /// Resets a LUN: it reports BUS DEVICE RESET FUNCTION OCCURRED.
    pub fn lun_reset(&self, addr: LunAddress) -> Result<(), BusError> {
        self.unit(addr)?.push_ua(Sense::unit_attention(asc::BUS_DEVICE_RESET));
        Ok(())
    }

    /// Resets the I_T nexus to a target: each of its LUNs reports I_T NEXUS LOSS OCCURRED.
    pub fn nexus_reset(&self, target: u8) {
        for unit in Self::on_target(&self.read(), target) {
            unit.push_ua(Sense::unit_attention(asc::I_T_NEXUS_LOSS));
        }
    }
}

/// The store a LUN's configuration asks for (and the file's path, for a file): whole blocks of a
/// valid block size.
pub fn open_storage(addr: LunAddress, cfg: &LunConfig) -> Result<(Storage, Option<PathBuf>), BusError> {
    let block_size = cfg.block_size;
    if !valid_block_size(block_size) {
        return Err(BusError::BadBlockSize { addr, block_size });
    }
    Ok(match &cfg.backing {
        Backing::Ram { bytes } => (Storage::ram(whole_blocks(addr, *bytes, block_size)?), None),
        Backing::Null { bytes } => (Storage::null(whole_blocks(addr, *bytes, block_size)?), None),
        Backing::File { path } => {
            let storage = Storage::open_file(path, cfg.read_only)
                .map_err(|source| BusError::Storage { addr, source })?;
            let len = storage.len();
            if len == 0 || len % u64::from(block_size) != 0 {
                return Err(BusError::FileSize { addr, path: path.clone(), len, block_size });
            }
            (storage, Some(path.clone()))
        }
    })
}

fn whole_blocks(addr: LunAddress, bytes: u64, block_size: u32) -> Result<u64, BusError> {
    let whole = bytes - bytes % u64::from(block_size);
    if whole == 0 {
        return Err(BusError::ZeroBlocks { addr, bytes, block_size });
    }
    Ok(whole)
}

fn result(r: CmdResult) -> Completion {
    match r {
        Ok(n) => Completion::good(n),
        Err(sense) => Completion::check_condition(sense),
    }
}

/// A LUN address with no unit on an existing target (SPC-4 4.6.9 / 6.37): INQUIRY answers
/// "no logical unit", REQUEST SENSE returns LOGICAL UNIT NOT SUPPORTED as data with GOOD
/// status, everything else fails with it.
fn missing_lun(cdb: &[u8], inp: &mut dyn DataIn) -> CmdResult {
    match cdb.first().copied() {
        Some(opcode::INQUIRY) => {
            cdb::check_len(cdb)?;
            let data = inquiry::inquiry(None, cdb)?;
            send(inp, &data, cdb::allocation_length(cdb))
        }
        Some(opcode::REQUEST_SENSE) => {
            cdb::check_len(cdb)?;
            send(inp, &LUN_NOT_SUPPORTED.to_fixed(), cdb::allocation_length(cdb))
        }
        _ => Err(LUN_NOT_SUPPORTED),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testutil::*;
    use super::super::{Action, NoData, CORRUPT_INTERVAL};
    use super::*;
    use crate::storage::tests::TempFile;
    use virtio_scsi_proto::scsi::{opcode::*, sense_key, status};

    const A: LunAddress = LunAddress::new(0, 0);
    const TUR: [u8; 6] = [TEST_UNIT_READY, 0, 0, 0, 0, 0];

    fn ram(bytes: u64, block_size: u32) -> LunConfig {
        LunConfig { backing: Backing::Ram { bytes }, block_size, read_only: false }
    }

    fn report_luns(bus: &Bus, addr: LunAddress, select: u8) -> (Completion, Vec<u16>) {
        let cdb = [REPORT_LUNS, 0, select, 0, 0, 0, 0, 0, 4, 0, 0, 0];
        let (c, d) = run(bus, addr, &cdb, &[], 1024);
        if c.status != 0 {
            return (c, Vec::new());
        }
        let len = be32(&d[0..4]) as usize;
        assert_eq!(len, d.len() - 8);
        let luns = d[8..]
            .chunks_exact(8)
            .map(|e| LunAddress::parse_report_luns_entry(e.try_into().unwrap()).unwrap())
            .collect();
        (c, luns)
    }

    #[test]
    fn report_luns_follows_add_and_remove() {
        let bus = ram_bus(&[(1, 0, 1 << 20, 512), (1, 5, 1 << 20, 512), (2, 0, 1 << 20, 512)]);
        assert_eq!(report_luns(&bus, LunAddress::new(1, 0), 0).1, vec![0, 5]);
        // Any address of an existing target works, with or without a LUN behind it.
        assert_eq!(report_luns(&bus, LunAddress::new(1, 9), 2).1, vec![0, 5]);
        assert_eq!(report_luns(&bus, LunAddress::new(1, 0), 1).1, Vec::<u16>::new());
        clear_ua(&bus, LunAddress::new(1, 0));

        bus.add(LunAddress::new(1, 300), ram(1 << 20, 512)).unwrap();
        // The other LUNs of target 1 are told; target 2 is not.
        let (c, _) = run(&bus, LunAddress::new(1, 0), &TUR, &[], 0);
        expect_sense(&c, sense_key::UNIT_ATTENTION, asc::REPORTED_LUNS_DATA_CHANGED);
        clear_ua(&bus, LunAddress::new(2, 0));
        assert_eq!(run(&bus, LunAddress::new(2, 0), &TUR, &[], 0).0.status, 0);
        assert_eq!(report_luns(&bus, LunAddress::new(1, 0), 0).1, vec![0, 5, 300]);

        bus.remove(LunAddress::new(1, 5)).unwrap();
        // REPORT LUNS itself clears REPORTED LUNS DATA HAS CHANGED on the LUN it is sent to.
        assert_eq!(report_luns(&bus, LunAddress::new(1, 0), 0).1, vec![0, 300]);
        assert_eq!(run(&bus, LunAddress::new(1, 0), &TUR, &[], 0).0.status, 0);

        // Allocation length below 16 and unknown select report values are invalid.
        let cdb = [REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0];
        expect_sense(&run(&bus, LunAddress::new(1, 0), &cdb, &[], 64).0, 5, asc::INVALID_FIELD_IN_CDB);
        expect_sense(&report_luns(&bus, LunAddress::new(1, 0), 0x10).0, 5, asc::INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn missing_luns_and_targets() {
        let bus = ram_bus(&[(0, 0, 1 << 20, 512)]);
        let missing = LunAddress::new(0, 3);
        assert!(bus.target_exists(0));
        assert!(!bus.target_exists(1));
        assert!(bus.execute(LunAddress::new(1, 0), &TUR, &NoData, &mut NoData).is_none());
        let (c, d) = run(&bus, missing, &[INQUIRY, 0, 0, 0, 36, 0], &[], 36);
        assert_eq!(c, Completion::good(36));
        assert_eq!(d[0], 0x7f);
        let (c, d) = run(&bus, missing, &[REQUEST_SENSE, 0, 0, 0, 18, 0], &[], 18);
        assert_eq!(c.status, status::GOOD);
        assert_eq!(Sense::from_fixed(&d), Some(LUN_NOT_SUPPORTED));
        for cdb in [&TUR[..], &[READ_10, 0, 0, 0, 0, 0, 0, 0, 1, 0][..]] {
            expect_sense(&run(&bus, missing, cdb, &[], 512).0, 5, asc::LOGICAL_UNIT_NOT_SUPPORTED);
        }
        assert!(matches!(bus.remove(missing), Err(BusError::NoSuchLun(_))));
        assert!(matches!(bus.resize(missing, 1 << 20), Err(BusError::NoSuchLun(_))));
        assert!(matches!(bus.inject(missing, Fault::Busy, 1), Err(BusError::NoSuchLun(_))));
        assert!(matches!(bus.lun_reset(missing), Err(BusError::NoSuchLun(_))));
        // Once its last LUN goes, the target is gone.
        bus.remove(A).unwrap();
        assert!(bus.execute(A, &TUR, &NoData, &mut NoData).is_none());
    }

    #[test]
    fn add_validates_the_config() {
        let bus = Bus::new(3);
        bus.add(A, ram(1 << 20, 512)).unwrap();
        let e = bus.add(A, ram(1 << 20, 512)).unwrap_err();
        assert_eq!(e.to_string(), "LUN 0:0 already exists");
        let e = bus.add(LunAddress::new(4, 0), ram(1 << 20, 512)).unwrap_err();
        assert!(e.to_string().contains("target 4 is above the highest target 3"), "{e}");
        let e = bus.add(LunAddress::new(0, 0x4000), ram(1 << 20, 512)).unwrap_err();
        assert!(matches!(e, BusError::LunOutOfRange(_)), "{e}");
        for bs in [0, 256, 1000, 4097, 131072] {
            let e = bus.add(LunAddress::new(0, 1), ram(1 << 20, bs)).unwrap_err();
            assert!(e.to_string().contains(&format!("block size {bs} is not a power of two")), "{e}");
        }
        let e = bus.add(LunAddress::new(0, 1), ram(4095, 4096)).unwrap_err();
        assert!(e.to_string().contains("LUN 0:1: 4095 bytes hold no whole 4096-byte block"), "{e}");
        // Sizes round down to whole blocks.
        bus.add(LunAddress::new(0, 2), ram(10_000, 4096)).unwrap();
        let info = bus.list().into_iter().find(|i| i.addr.lun == 2).unwrap();
        assert_eq!(info.blocks, 2);
    }

    #[test]
    fn resize_raises_capacity_changed() {
        let bus = ram_bus(&[(0, 0, 1 << 20, 4096)]);
        clear_ua(&bus, A);
        let data = pattern(4096, 2);
        assert_eq!(run(&bus, A, &rw10(WRITE_10, 255, 1), &data, 0).0.status, 0);
        bus.resize(A, 2 << 20).unwrap();
        let rc10 = [READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        expect_sense(&run(&bus, A, &rc10, &[], 8).0, sense_key::UNIT_ATTENTION, asc::CAPACITY_DATA_CHANGED);
        let (c, d) = run(&bus, A, &rc10, &[], 8);
        assert_eq!(c.status, 0);
        assert_eq!(be32(&d[0..4]), 511);
        // Old data survives growth; the new space is zeros and addressable.
        assert_eq!(run(&bus, A, &rw10(READ_10, 255, 1), &[], 4096).1, data);
        let (c, d) = run(&bus, A, &rw10(READ_10, 511, 1), &[], 4096);
        assert_eq!(c.status, 0);
        assert!(d.iter().all(|&b| b == 0));
        bus.resize(A, 1 << 20).unwrap();
        clear_ua(&bus, A);
        expect_sense(&run(&bus, A, &rw10(READ_10, 256, 1), &[], 4096).0, 5, asc::LBA_OUT_OF_RANGE);
        assert!(matches!(bus.resize(A, 100), Err(BusError::ZeroBlocks { .. })));
    }

    #[test]
    fn faults_apply_to_the_next_count_commands() {
        let bus = ram_bus(&[(0, 0, 1 << 20, 512)]);
        clear_ua(&bus, A);
        let fault = Fault::CheckCondition { key: sense_key::MEDIUM_ERROR, asc: 0x11, ascq: 0x00 };
        bus.inject(A, fault, 2).unwrap();
        // Scan commands are not affected and do not use up the count.
        assert_eq!(run(&bus, A, &[INQUIRY, 0, 0, 0, 36, 0], &[], 36).0.status, 0);
        assert_eq!(report_luns(&bus, A, 0).1, vec![0]);
        for _ in 0..2 {
            expect_sense(&run(&bus, A, &rw10(READ_10, 0, 1), &[], 512).0, sense_key::MEDIUM_ERROR, (0x11, 0));
        }
        assert_eq!(run(&bus, A, &rw10(READ_10, 0, 1), &[], 512).0, Completion::good(512));

        bus.inject(A, Fault::Busy, 1).unwrap();
        assert_eq!(run(&bus, A, &TUR, &[], 0).0, Completion::status(status::BUSY));
        bus.inject(A, Fault::TaskSetFull, 1).unwrap();
        assert_eq!(run(&bus, A, &TUR, &[], 0).0, Completion::status(status::TASK_SET_FULL));
        assert_eq!(run(&bus, A, &TUR, &[], 0).0.status, 0);

        // A dropped command is not executed: the write never lands.
        bus.inject(A, Fault::Never, 1).unwrap();
        let (c, _) = run(&bus, A, &rw10(WRITE_10, 0, 1), &[0xab; 512], 0);
        assert_eq!(c.action, Action::Never);
        assert!(run(&bus, A, &rw10(READ_10, 0, 1), &[], 512).1.iter().all(|&b| b == 0));

        // A delayed command executes and carries the delay, also when it reports an attention.
        let d = Duration::from_millis(30);
        bus.inject(A, Fault::Delay(d), 2).unwrap();
        let (c, _) = run(&bus, A, &rw10(WRITE_10, 0, 1), &[0xcd; 512], 0);
        assert_eq!((c.status, c.action), (0, Action::After(d)));
        bus.lun_reset(A).unwrap();
        let (c, _) = run(&bus, A, &TUR, &[], 0);
        assert_eq!(c.action, Action::After(d));
        expect_sense(&c, sense_key::UNIT_ATTENTION, asc::BUS_DEVICE_RESET);
        let (c, d) = run(&bus, A, &rw10(READ_10, 0, 1), &[], 512);
        assert_eq!(c.action, Action::Now);
        assert!(d.iter().all(|&b| b == 0xcd));

        // Count 0 and clear_faults disarm.
        bus.inject(A, Fault::Busy, 0).unwrap();
        assert_eq!(run(&bus, A, &TUR, &[], 0).0.status, 0);
        bus.inject(A, Fault::Busy, 100).unwrap();
        bus.clear_faults(A).unwrap();
        assert_eq!(run(&bus, A, &TUR, &[], 0).0.status, 0);
    }

    /// A data-in area that records whether it was asked to hold back its writes.
    struct Recording {
        data: Vec<u8>,
        held_from: Option<usize>,
        writes: usize,
    }

    impl DataIn for Recording {
        fn capacity(&self) -> usize {
            self.data.len()
        }

        fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<(), crate::scsi::DataError> {
            self.writes += 1;
            self.data.write_at(offset, src)
        }

        fn hold_back(&mut self) {
            self.held_from.get_or_insert(self.writes);
        }
    }

    #[test]
    fn late_holds_back_the_data_before_anything_is_written() {
        let bus = ram_bus(&[(0, 0, 1 << 20, 512)]);
        clear_ua(&bus, A);
        let data = pattern(1024, 9);
        assert_eq!(run(&bus, A, &rw10(WRITE_10, 4, 2), &data, 0).0.status, 0);
        let d = Duration::from_millis(40);
        bus.inject(A, Fault::Late(d), 2).unwrap();
        let mut inp = Recording { data: vec![0; 1024], held_from: None, writes: 0 };
        let c = bus.execute(A, &rw10(READ_10, 4, 2), &NoData, &mut inp).unwrap();
        assert_eq!((c.status, c.action, c.data_in_len), (0, Action::Late(d), 1024));
        assert_eq!(inp.held_from, Some(0), "held back before the first write");
        assert_eq!(inp.data, data);
        // A unit attention reported by a late command is held back too.
        bus.lun_reset(A).unwrap();
        let mut inp = Recording { data: vec![0; 512], held_from: None, writes: 0 };
        let c = bus.execute(A, &TUR, &NoData, &mut inp).unwrap();
        assert_eq!(c.action, Action::Late(d));
        expect_sense(&c, sense_key::UNIT_ATTENTION, asc::BUS_DEVICE_RESET);
        assert_eq!(inp.held_from, Some(0));
        // The count is used up: the next command is neither late nor held back.
        let mut inp = Recording { data: vec![0; 512], held_from: None, writes: 0 };
        let c = bus.execute(A, &rw10(READ_10, 4, 1), &NoData, &mut inp).unwrap();
        assert_eq!((c.action, inp.held_from), (Action::Now, None));
    }

    #[test]
    fn corrupt_flips_read_data_with_good_status() {
        let bus = ram_bus(&[(0, 0, 1 << 20, 512), (0, 1, 1 << 20, 4096)]);
        for (lun, bs) in [(0u16, 512usize), (1, 4096)] {
            let a = LunAddress::new(0, lun);
            clear_ua(&bus, a);
            let data = pattern(4 * bs, lun as u8);
            assert_eq!(run(&bus, a, &rw10(WRITE_10, 0, 4), &data, 0).0.status, 0);
            bus.inject(a, Fault::Corrupt, 2).unwrap();
            // Writes and other commands pass untouched and do not use up the count.
            assert_eq!(run(&bus, a, &rw10(WRITE_10, 8, 1), &data[..bs], 0).0, Completion::good(0));
            assert_eq!(run(&bus, a, &TUR, &[], 0).0.status, 0);
            for read in [rw10(READ_10, 0, 4).to_vec(), rw16(READ_16, 0, 4).to_vec()] {
                let (c, got) = run(&bus, a, &read, &[], 4 * bs);
                assert_eq!(c, Completion::good(4 * bs));
                for (i, (&g, &w)) in got.iter().zip(&data).enumerate() {
                    let want = if i % CORRUPT_INTERVAL == 0 { w ^ 0xff } else { w };
                    assert_eq!(g, want, "LUN {lun} byte {i}");
                }
            }
            // Two reads used it up; the stored data was never touched.
            assert_eq!(run(&bus, a, &rw10(READ_10, 0, 4), &[], 4 * bs).1, data);
        }
    }

    #[test]
    fn resets_raise_their_attentions() {
        let bus = ram_bus(&[(0, 0, 1 << 20, 512), (0, 1, 1 << 20, 512), (1, 0, 1 << 20, 512)]);
        for a in [A, LunAddress::new(0, 1), LunAddress::new(1, 0)] {
            clear_ua(&bus, a);
        }
        bus.nexus_reset(0);
        for a in [A, LunAddress::new(0, 1)] {
            expect_sense(&run(&bus, a, &TUR, &[], 0).0, sense_key::UNIT_ATTENTION, asc::I_T_NEXUS_LOSS);
        }
        assert_eq!(run(&bus, LunAddress::new(1, 0), &TUR, &[], 0).0.status, 0);
        bus.lun_reset(LunAddress::new(0, 1)).unwrap();
        assert_eq!(run(&bus, A, &TUR, &[], 0).0.status, 0);
        let (c, _) = run(&bus, LunAddress::new(0, 1), &TUR, &[], 0);
        expect_sense(&c, sense_key::UNIT_ATTENTION, asc::BUS_DEVICE_RESET);
    }

    #[test]
    fn file_lun_round_trip_and_hole_punch() {
        let tmp = TempFile::new("lun", 1 << 20);
        let bus = Bus::new(0);
        let cfg =
            LunConfig { backing: Backing::File { path: tmp.0.clone() }, block_size: 4096, read_only: false };
        bus.add(A, cfg).unwrap();
        clear_ua(&bus, A);
        let data = pattern(8 * 4096, 4);
        assert_eq!(run(&bus, A, &rw16(WRITE_16, 0, 8), &data, 0).0.status, 0);
        let mut fua = rw16(WRITE_16, 255, 1);
        fua[1] = 0x08;
        assert_eq!(run(&bus, A, &fua, &data[..4096], 0).0.status, 0);
        assert_eq!(run(&bus, A, &rw10(SYNCHRONIZE_CACHE_10, 0, 0), &[], 0).0.status, 0);
        // The bytes are in the file itself.
        let on_disk = std::fs::read(&tmp.0).unwrap();
        assert_eq!(&on_disk[..8 * 4096], &data[..]);
        assert_eq!(&on_disk[255 * 4096..], &data[..4096]);
        assert_eq!(run(&bus, A, &rw16(READ_16, 0, 8), &[], 8 * 4096).1, data);

        let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
        list.extend_from_slice(&2u64.to_be_bytes());
        list.extend_from_slice(&3u32.to_be_bytes());
        list.extend_from_slice(&[0; 4]);
        assert_eq!(run(&bus, A, &[UNMAP, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list, 0).0.status, 0);
        let back = run(&bus, A, &rw16(READ_16, 0, 8), &[], 8 * 4096).1;
        assert_eq!(&back[..2 * 4096], &data[..2 * 4096]);
        assert!(back[2 * 4096..5 * 4096].iter().all(|&b| b == 0));
        assert_eq!(&back[5 * 4096..], &data[5 * 4096..]);

        let info = &bus.list()[0];
        assert_eq!((info.kind, info.blocks, info.block_size), ("file", 256, 4096));
        assert_eq!(info.path.as_deref(), Some(tmp.0.as_path()));
    }

    #[test]
    fn file_lun_errors_name_the_path() {
        let tmp = TempFile::new("odd", 4096 + 100);
        let bus = Bus::new(0);
        let file =
            |path: PathBuf| LunConfig { backing: Backing::File { path }, block_size: 512, read_only: true };
        let e = bus.add(A, file(tmp.0.clone())).unwrap_err();
        assert!(e.to_string().contains(&format!("file '{}' is 4196 bytes", tmp.0.display())), "{e}");
        let missing = std::env::temp_dir().join("vust-no-such-file.img");
        let e = bus.add(A, file(missing.clone())).unwrap_err();
        assert!(e.to_string().contains(&format!("cannot open '{}'", missing.display())), "{e}");
        assert!(bus.list().is_empty());
    }

    #[test]
    fn list_reports_and_serializes() {
        let bus = Bus::new(1);
        bus.add(LunAddress::new(1, 2), ram(1 << 20, 4096)).unwrap();
        let cfg = LunConfig { backing: Backing::Null { bytes: 1 << 30 }, block_size: 512, read_only: true };
        bus.add(A, cfg).unwrap();
        let list = bus.list();
        assert_eq!(list.len(), 2);
        assert_eq!(
            list[0],
            LunInfo { addr: A, kind: "null", path: None, block_size: 512, blocks: 1 << 21, read_only: true }
        );
        assert_eq!((list[1].addr, list[1].kind, list[1].blocks), (LunAddress::new(1, 2), "ram", 256));
        let json = serde_json::to_value(&list[1]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"target": 1, "lun": 2, "kind": "ram", "path": null,
                "block_size": 4096, "blocks": 256, "read_only": false})
        );
    }

    #[test]
    fn concurrent_workers_keep_their_data() {
        let bus = Arc::new(ram_bus(&[(0, 0, 4 << 20, 512)]));
        clear_ua(&bus, A);
        let workers: Vec<_> = (0..4u8)
            .map(|w| {
                let bus = Arc::clone(&bus);
                std::thread::spawn(move || {
                    for i in 0..64u32 {
                        let lba = u32::from(w) * 2048 + i * 16;
                        let data = pattern(16 * 512, w.wrapping_add(i as u8));
                        assert_eq!(run(&bus, A, &rw10(WRITE_10, lba, 16), &data, 0).0.status, 0);
                        assert_eq!(run(&bus, A, &rw10(READ_10, lba, 16), &[], 16 * 512).1, data);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
    }
}
