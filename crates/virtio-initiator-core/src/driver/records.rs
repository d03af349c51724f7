//! The packed request and completion records that cross the JavaScript boundary. Batches of
//! them travel in fixed buffers each way, so one native call carries many requests. This is the
//! one definition of the layout on the Rust side; `ts/records.ts` is its TypeScript twin. The
//! records name requests, not wire formats: the channel frames each one for its device
//! (virtio-scsi CDBs, or virtio-blk request headers).
//!
//! Submission record, 64 bytes, little-endian:
//!
//! | offset | field |
//! |---|---|
//! | 0 | u32 token, echoed in the completion |
//! | 4 | u8 target |
//! | 5 | u8 direction: 0 none, 1 data-in (device writes), 2 data-out (device reads) |
//! | 6 | u16 LUN |
//! | 8 | u32 data length (by-address data) |
//! | 12 | u8 kind: 0 CDB as given (SCSI), 1 READ, 2 WRITE, 3 FLUSH (SYNCHRONIZE CACHE), 4 DISCARD, 5 WRITE ZEROES, 6 GET ID (blk) |
//! | 13 | u8 SAM task attribute |
//! | 14 | u8 flags: FUA, data by address, 16-byte CDB, unmap (WRITE ZEROES) |
//! | 15 | u8 CDB length (kind CDB) |
//! | 16 | CDB (kind CDB, 32 bytes), or u64 LBA at 16 and u32 blocks at 24 (READ, WRITE, DISCARD, WRITE ZEROES; in logical blocks) |
//! | 48 | u64 data: a host address inside DMA memory (flag), else an index into the buffer list |
//!
//! Completion record, 24 bytes, followed in the completion area by one 96-byte sense slot per
//! record (sense bytes are copied only when the device returned some):
//!
//! | offset | field |
//! |---|---|
//! | 0 | u32 token |
//! | 4 | u8 response: virtio-scsi's (0 OK); virtio-blk: 0 when the device wrote a status |
//! | 5 | u8 status: SAM status (SCSI), or the virtio-blk status byte (0 OK, 1 IOERR, 2 UNSUPP) |
//! | 6 | u16 sense length |
//! | 8 | u32 residual |
//! | 12 | u32 bytes written into the data-in buffer |
//! | 16 | u64 nanoseconds from submission to the poll that found the completion |

use virtio_scsi_proto::{LunAddress, CDB_SIZE, SENSE_SIZE};

pub const SUBMIT_RECORD_SIZE: usize = 64;
pub const COMPLETION_RECORD_SIZE: usize = 24;
/// Bytes of the completion area per record: the record and its sense slot.
pub const COMPLETION_SLOT_SIZE: usize = COMPLETION_RECORD_SIZE + SENSE_SIZE;

/// Flag: force unit access (READ, WRITE).
pub const FLAG_FUA: u8 = 1;
/// Flag: the data field is a host address inside DMA memory, not a buffer index.
pub const FLAG_DATA_ADDRESS: u8 = 2;
/// Flag: use the 16-byte form (SYNCHRONIZE CACHE; READ and WRITE choose by themselves).
pub const FLAG_LONG_CDB: u8 = 4;
/// Flag: WRITE ZEROES may deallocate the blocks.
pub const FLAG_UNMAP: u8 = 8;

const OP_READ_10: u8 = 0x28;
const OP_WRITE_10: u8 = 0x2a;
const OP_SYNC_10: u8 = 0x35;
const OP_READ_16: u8 = 0x88;
const OP_WRITE_16: u8 = 0x8a;
const OP_SYNC_16: u8 = 0x91;

/// Data direction of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    None,
    /// The device writes the buffer (READ).
    FromDevice,
    /// The device reads the buffer (WRITE).
    ToDevice,
}

/// Where a request's data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataRef {
    None,
    /// Entry of the buffer list passed with the batch.
    Index(u32),
    /// Host address and length, to be checked against DMA memory.
    Address {
        addr: u64,
        len: u32,
    },
}

/// What a record asks for, before it is framed for a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// A SCSI command as given (virtio-scsi only).
    Cdb {
        cdb: [u8; CDB_SIZE],
        len: u8,
    },
    Read {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    Write {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    /// The whole medium to stable storage; `long`: the 16-byte SYNCHRONIZE CACHE.
    Flush {
        long: bool,
    },
    Discard {
        lba: u64,
        blocks: u32,
    },
    WriteZeroes {
        lba: u64,
        blocks: u32,
        unmap: bool,
    },
    /// The device's ID string (virtio-blk only).
    GetId,
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Request::Cdb { .. } => "SCSI command",
            Request::Read { .. } => "READ",
            Request::Write { .. } => "WRITE",
            Request::Flush { .. } => "FLUSH",
            Request::Discard { .. } => "DISCARD",
            Request::WriteZeroes { .. } => "WRITE ZEROES",
            Request::GetId => "GET ID",
        }
    }
}

/// One request as the caller packed it.
#[derive(Clone, Copy, Debug)]
pub struct SubmitRecord {
    pub token: u32,
    pub addr: LunAddress,
    pub direction: Direction,
    pub data: DataRef,
    pub task_attr: u8,
    pub request: Request,
}

fn u16_at(raw: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([raw[at], raw[at + 1]])
}

fn u32_at(raw: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(raw[at..at + 4].try_into().unwrap())
}

fn u64_at(raw: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(raw[at..at + 8].try_into().unwrap())
}

/// READ or WRITE, 10-byte when the start LBA and length fit it, else 16-byte (as Linux's sd).
pub fn read_write_cdb(write: bool, lba: u64, blocks: u32, fua: bool) -> ([u8; CDB_SIZE], u8) {
    let mut cdb = [0u8; CDB_SIZE];
    cdb[1] = if fua { 0x08 } else { 0 };
    if lba <= u64::from(u32::MAX) && blocks <= u32::from(u16::MAX) {
        cdb[0] = if write { OP_WRITE_10 } else { OP_READ_10 };
        cdb[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
        cdb[7..9].copy_from_slice(&(blocks as u16).to_be_bytes());
        (cdb, 10)
    } else {
        cdb[0] = if write { OP_WRITE_16 } else { OP_READ_16 };
        cdb[2..10].copy_from_slice(&lba.to_be_bytes());
        cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
        (cdb, 16)
    }
}

/// The CDB of a request on a virtio-scsi device.
pub fn scsi_cdb(request: &Request) -> Result<([u8; CDB_SIZE], u8), String> {
    match *request {
        Request::Cdb { cdb, len } => Ok((cdb, len)),
        Request::Read { lba, blocks, fua } => Ok(read_write_cdb(false, lba, blocks, fua)),
        Request::Write { lba, blocks, fua } => Ok(read_write_cdb(true, lba, blocks, fua)),
        Request::Flush { long } => {
            // Zero LBA and zero blocks: the whole medium.
            let mut cdb = [0u8; CDB_SIZE];
            cdb[0] = if long { OP_SYNC_16 } else { OP_SYNC_10 };
            Ok((cdb, if long { 16 } else { 10 }))
        }
        Request::Discard { .. } | Request::WriteZeroes { .. } | Request::GetId => Err(format!(
            "a {} record is for virtio-blk devices; a virtio-scsi device takes a CDB",
            request.name()
        )),
    }
}

impl SubmitRecord {
    /// Decodes one record, checking that its direction and data suit its kind.
    pub fn decode(raw: &[u8]) -> Result<Self, String> {
        if raw.len() < SUBMIT_RECORD_SIZE {
            return Err(format!("record is {} bytes, {SUBMIT_RECORD_SIZE} needed", raw.len()));
        }
        let direction = match raw[5] {
            0 => Direction::None,
            1 => Direction::FromDevice,
            2 => Direction::ToDevice,
            d => return Err(format!("direction {d} is not 0 (none), 1 (data-in) or 2 (data-out)")),
        };
        let lun = u16_at(raw, 6);
        if lun > virtio_scsi_proto::lun::MAX_LUN {
            return Err(format!("LUN {lun} is above {}", virtio_scsi_proto::lun::MAX_LUN));
        }
        let flags = raw[14];
        let data = match direction {
            Direction::None => DataRef::None,
            _ if flags & FLAG_DATA_ADDRESS != 0 => {
                let len = u32_at(raw, 8);
                if len == 0 {
                    return Err("data length 0 with a data direction".into());
                }
                DataRef::Address { addr: u64_at(raw, 48), len }
            }
            _ => DataRef::Index(u32_at(raw, 48)),
        };
        let lba = u64_at(raw, 16);
        let blocks = u32_at(raw, 24);
        let (request, want) = match raw[12] {
            0 => {
                let len = raw[15];
                if !(6..=CDB_SIZE as u8).contains(&len) {
                    return Err(format!("CDB length {len} is outside 6..=32"));
                }
                let mut cdb = [0u8; CDB_SIZE];
                cdb[..len as usize].copy_from_slice(&raw[16..16 + len as usize]);
                (Request::Cdb { cdb, len }, None)
            }
            1 => (Request::Read { lba, blocks, fua: flags & FLAG_FUA != 0 }, Some(Direction::FromDevice)),
            2 => (Request::Write { lba, blocks, fua: flags & FLAG_FUA != 0 }, Some(Direction::ToDevice)),
            3 => (Request::Flush { long: flags & FLAG_LONG_CDB != 0 }, Some(Direction::None)),
            4 => (Request::Discard { lba, blocks }, Some(Direction::None)),
            5 => {
                (Request::WriteZeroes { lba, blocks, unmap: flags & FLAG_UNMAP != 0 }, Some(Direction::None))
            }
            6 => (Request::GetId, Some(Direction::FromDevice)),
            k => {
                return Err(format!(
                    "kind {k} is not 0 (CDB), 1 (READ), 2 (WRITE), 3 (FLUSH), 4 (DISCARD), 5 (WRITE ZEROES) \
                     or 6 (GET ID)"
                ))
            }
        };
        if let Some(want) = want {
            if direction != want {
                let code = match want {
                    Direction::None => 0,
                    Direction::FromDevice => 1,
                    Direction::ToDevice => 2,
                };
                return Err(format!("a {} record needs direction {code}", request.name()));
            }
        }
        if matches!(
            request,
            Request::Read { .. }
                | Request::Write { .. }
                | Request::Discard { .. }
                | Request::WriteZeroes { .. }
        ) && blocks == 0
        {
            return Err(format!("{} of 0 blocks", request.name()));
        }
        Ok(SubmitRecord {
            token: u32_at(raw, 0),
            addr: LunAddress::new(raw[4], lun),
            direction,
            data,
            task_attr: raw[13],
            request,
        })
    }
}

/// One finished request, as handed back.
#[derive(Clone, Copy, Debug, Default)]
pub struct CompletionRecord {
    pub token: u32,
    pub response: u8,
    pub status: u8,
    pub sense_len: u16,
    pub residual: u32,
    /// Bytes the device wrote into the data-in buffer.
    pub data_len: u32,
    /// From the submission to the poll that found the completion (0 for a refused request).
    pub latency_ns: u64,
}

impl CompletionRecord {
    /// Writes the record at `out[0..24]`.
    pub fn encode(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.token.to_le_bytes());
        out[4] = self.response;
        out[5] = self.status;
        out[6..8].copy_from_slice(&self.sense_len.to_le_bytes());
        out[8..12].copy_from_slice(&self.residual.to_le_bytes());
        out[12..16].copy_from_slice(&self.data_len.to_le_bytes());
        out[16..24].copy_from_slice(&self.latency_ns.to_le_bytes());
    }
}

/// A completion area for `max` records: records first, then their sense slots.
pub struct CompletionArea<'a> {
    out: &'a mut [u8],
    max: usize,
}

impl<'a> CompletionArea<'a> {
    /// Holds as many records as `out` has room for, at most `max`.
    pub fn new(out: &'a mut [u8], max: usize) -> Self {
        let max = max.min(out.len() / COMPLETION_SLOT_SIZE);
        CompletionArea { out, max }
    }

    pub fn capacity(&self) -> usize {
        self.max
    }

    /// Writes record `n` (every byte of it).
    pub fn put(&mut self, n: usize, rec: &CompletionRecord) {
        rec.encode(&mut self.out[n * COMPLETION_RECORD_SIZE..(n + 1) * COMPLETION_RECORD_SIZE]);
    }

    /// The sense slot of record `n`.
    pub fn sense_mut(&mut self, n: usize) -> &mut [u8] {
        let base = self.max * COMPLETION_RECORD_SIZE + n * SENSE_SIZE;
        &mut self.out[base..base + SENSE_SIZE]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u8, direction: u8, flags: u8) -> [u8; SUBMIT_RECORD_SIZE] {
        let mut raw = [0u8; SUBMIT_RECORD_SIZE];
        raw[0..4].copy_from_slice(&77u32.to_le_bytes());
        raw[4] = 3;
        raw[5] = direction;
        raw[6..8].copy_from_slice(&300u16.to_le_bytes());
        raw[8..12].copy_from_slice(&4096u32.to_le_bytes());
        raw[12] = kind;
        raw[14] = flags;
        raw[48..56].copy_from_slice(&0x7f00_1000u64.to_le_bytes());
        raw
    }

    #[test]
    fn cdb_record_fields() {
        let mut raw = record(0, 1, 0);
        raw[15] = 10;
        raw[16] = 0x28;
        raw[48..56].copy_from_slice(&2u64.to_le_bytes());
        let r = SubmitRecord::decode(&raw).unwrap();
        let (cdb, cdb_len) = scsi_cdb(&r.request).unwrap();
        assert_eq!(
            (r.token, r.addr, r.direction, r.data, cdb_len, cdb[0]),
            (77, LunAddress::new(3, 300), Direction::FromDevice, DataRef::Index(2), 10, 0x28)
        );
        raw[5] = 7;
        assert!(SubmitRecord::decode(&raw).unwrap_err().contains("direction 7"));
        raw[5] = 0;
        raw[15] = 40;
        assert!(SubmitRecord::decode(&raw).unwrap_err().contains("CDB length 40"));
        raw[12] = 9;
        assert!(SubmitRecord::decode(&raw).unwrap_err().contains("kind 9"));
    }

    #[test]
    fn read_write_records_build_their_cdb() {
        let mut raw = record(1, 1, FLAG_DATA_ADDRESS);
        raw[16..24].copy_from_slice(&0x1234u64.to_le_bytes());
        raw[24..28].copy_from_slice(&8u32.to_le_bytes());
        let r = SubmitRecord::decode(&raw).unwrap();
        assert_eq!(r.data, DataRef::Address { addr: 0x7f00_1000, len: 4096 });
        let (cdb, cdb_len) = scsi_cdb(&r.request).unwrap();
        assert_eq!((cdb_len, &cdb[..10]), (10, &[0x28, 0, 0, 0, 0x12, 0x34, 0, 0, 8, 0][..]));

        // Above 32-bit LBAs and 16-bit lengths: the 16-byte form, FUA set.
        let mut raw = record(2, 2, FLAG_DATA_ADDRESS | FLAG_FUA);
        raw[16..24].copy_from_slice(&0x1_0000_0000u64.to_le_bytes());
        raw[24..28].copy_from_slice(&0x1_0000u32.to_le_bytes());
        let r = SubmitRecord::decode(&raw).unwrap();
        let (cdb, cdb_len) = scsi_cdb(&r.request).unwrap();
        assert_eq!(cdb_len, 16);
        assert_eq!(&cdb[..14], &[0x8a, 0x08, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0]);

        // The direction must match the kind; zero blocks and zero lengths are refused.
        assert!(SubmitRecord::decode(&record(1, 2, 0))
            .unwrap_err()
            .contains("READ record needs direction 1"));
        let mut raw = record(2, 2, FLAG_DATA_ADDRESS);
        assert!(SubmitRecord::decode(&raw).unwrap_err().contains("0 blocks"));
        raw[24] = 1;
        raw[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(SubmitRecord::decode(&raw).unwrap_err().contains("data length 0"));
    }

    #[test]
    fn synchronize_cache_records() {
        let r = SubmitRecord::decode(&record(3, 0, 0)).unwrap();
        let (cdb, cdb_len) = scsi_cdb(&r.request).unwrap();
        assert_eq!((cdb_len, cdb[0], r.data), (10, 0x35, DataRef::None));
        let r = SubmitRecord::decode(&record(3, 0, FLAG_LONG_CDB)).unwrap();
        let (cdb, cdb_len) = scsi_cdb(&r.request).unwrap();
        assert_eq!((cdb_len, cdb[0]), (16, 0x91));
        assert!(SubmitRecord::decode(&record(3, 1, 0))
            .unwrap_err()
            .contains("FLUSH record needs direction 0"));
    }

    #[test]
    fn block_device_records() {
        let mut raw = record(4, 0, 0);
        raw[16..24].copy_from_slice(&9u64.to_le_bytes());
        raw[24..28].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(SubmitRecord::decode(&raw).unwrap().request, Request::Discard { lba: 9, blocks: 3 });
        raw[12] = 5;
        raw[14] = FLAG_UNMAP;
        let r = SubmitRecord::decode(&raw).unwrap();
        assert_eq!(r.request, Request::WriteZeroes { lba: 9, blocks: 3, unmap: true });
        assert!(scsi_cdb(&r.request).unwrap_err().contains("WRITE ZEROES record is for virtio-blk"));
        raw[24..28].copy_from_slice(&0u32.to_le_bytes());
        assert!(SubmitRecord::decode(&raw).unwrap_err().contains("WRITE ZEROES of 0 blocks"));
        assert_eq!(SubmitRecord::decode(&record(6, 1, 0)).unwrap().request, Request::GetId);
        assert!(SubmitRecord::decode(&record(6, 0, 0))
            .unwrap_err()
            .contains("GET ID record needs direction 1"));
    }

    #[test]
    fn completion_area_layout() {
        let mut out = vec![0xaau8; 4 * COMPLETION_SLOT_SIZE];
        let mut area = CompletionArea::new(&mut out, 8);
        assert_eq!(area.capacity(), 4);
        area.put(
            1,
            &CompletionRecord {
                token: 9,
                response: 0,
                status: 2,
                sense_len: 18,
                residual: 512,
                data_len: 100,
                latency_ns: 1 << 40 | 7,
            },
        );
        area.sense_mut(1)[2] = 5;
        let rec = &out[COMPLETION_RECORD_SIZE..2 * COMPLETION_RECORD_SIZE];
        assert_eq!(&rec[0..4], &9u32.to_le_bytes());
        assert_eq!((rec[5], u16::from_le_bytes([rec[6], rec[7]])), (2, 18));
        assert_eq!(&rec[8..12], &512u32.to_le_bytes());
        assert_eq!(&rec[12..16], &100u32.to_le_bytes());
        assert_eq!(&rec[16..24], &(1u64 << 40 | 7).to_le_bytes());
        assert_eq!(out[4 * COMPLETION_RECORD_SIZE + SENSE_SIZE + 2], 5);
    }
}
