//! CDB field decoding shared by the command handlers.

use virtio_scsi_proto::scsi::{asc, opcode};

use super::Sense;

pub(crate) const INVALID_FIELD: Sense = Sense::illegal_request(asc::INVALID_FIELD_IN_CDB);

/// CDB length implied by the opcode's group code (SPC-4 4.2.5.1); `None` for the groups that
/// are reserved or vendor specific.
pub(crate) fn cdb_len(op: u8) -> Option<usize> {
    match op >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

pub(crate) fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub(crate) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Starting LBA and number of blocks of a block command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    pub lba: u64,
    pub blocks: u32,
}

/// Decodes the LBA and length fields by CDB size, as SBC-3 lays them out for READ, WRITE,
/// VERIFY, SYNCHRONIZE CACHE and WRITE SAME. The caller has checked the CDB length.
pub(crate) fn extent(cdb: &[u8]) -> Extent {
    match cdb_len(cdb[0]) {
        Some(6) => {
            let lba = u64::from(cdb[1] & 0x1f) << 16 | u64::from(be16(&cdb[2..4]));
            // READ (6) and WRITE (6): a length of 0 means 256 blocks.
            let blocks = if cdb[4] == 0 { 256 } else { u32::from(cdb[4]) };
            Extent { lba, blocks }
        }
        Some(16) => Extent { lba: be64(&cdb[2..10]), blocks: be32(&cdb[10..14]) },
        Some(12) => Extent { lba: u64::from(be32(&cdb[2..6])), blocks: be32(&cdb[6..10]) },
        _ => Extent { lba: u64::from(be32(&cdb[2..6])), blocks: u32::from(be16(&cdb[7..9])) },
    }
}

/// Allocation length of the data-in commands this target implements.
pub(crate) fn allocation_length(cdb: &[u8]) -> usize {
    match cdb[0] {
        opcode::INQUIRY => usize::from(be16(&cdb[3..5])),
        opcode::REQUEST_SENSE | opcode::MODE_SENSE_6 => usize::from(cdb[4]),
        opcode::MODE_SENSE_10 => usize::from(be16(&cdb[7..9])),
        opcode::SERVICE_ACTION_IN_16 => be32(&cdb[10..14]) as usize,
        opcode::REPORT_LUNS => be32(&cdb[6..10]) as usize,
        opcode::READ_CAPACITY_10 => 8,
        _ => 0,
    }
}

/// Checks that the CDB is at least as long as its opcode requires.
pub(crate) fn check_len(cdb: &[u8]) -> Result<(), Sense> {
    match cdb.first().and_then(|&op| cdb_len(op)) {
        Some(n) if cdb.len() >= n => Ok(()),
        _ => Err(INVALID_FIELD),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_lengths() {
        assert_eq!(cdb_len(opcode::INQUIRY), Some(6));
        assert_eq!(cdb_len(opcode::READ_10), Some(10));
        assert_eq!(cdb_len(opcode::MODE_SENSE_10), Some(10));
        assert_eq!(cdb_len(opcode::READ_16), Some(16));
        assert_eq!(cdb_len(opcode::REPORT_LUNS), Some(12));
        assert_eq!(cdb_len(0x7f), None);
        assert_eq!(cdb_len(0xc0), None);
    }

    #[test]
    fn six_byte_extent() {
        // 21-bit LBA 0x1abcde; the top three bits of byte 1 are not part of it.
        let e = extent(&[opcode::READ_6, 0xfa, 0xbc, 0xde, 8, 0]);
        assert_eq!(e, Extent { lba: 0x1abcde, blocks: 8 });
        assert_eq!(extent(&[opcode::WRITE_6, 0, 0, 1, 0, 0]).blocks, 256);
    }

    #[test]
    fn ten_byte_extent() {
        let e = extent(&[opcode::READ_10, 0, 0x12, 0x34, 0x56, 0x78, 0, 0xab, 0xcd, 0]);
        assert_eq!(e, Extent { lba: 0x1234_5678, blocks: 0xabcd });
    }

    #[test]
    fn sixteen_byte_extent() {
        let mut cdb = [0u8; 16];
        cdb[0] = opcode::WRITE_16;
        cdb[2..10].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        cdb[10..14].copy_from_slice(&0x8000_0001u32.to_be_bytes());
        assert_eq!(extent(&cdb), Extent { lba: 0x0102_0304_0506_0708, blocks: 0x8000_0001 });
    }

    #[test]
    fn short_cdbs_are_rejected() {
        assert_eq!(check_len(&[opcode::READ_10, 0, 0, 0, 0, 0, 0, 0, 1]), Err(INVALID_FIELD));
        assert_eq!(check_len(&[opcode::READ_16; 10]), Err(INVALID_FIELD));
        assert_eq!(check_len(&[]), Err(INVALID_FIELD));
        assert!(check_len(&[0u8; 6]).is_ok());
        assert_eq!(allocation_length(&[opcode::INQUIRY, 0, 0, 0x01, 0x02, 0]), 0x102);
    }
}
