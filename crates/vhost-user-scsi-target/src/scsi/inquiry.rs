//! INQUIRY: standard data and the vital product data pages a block initiator reads.

use virtio_scsi_proto::scsi::device_type;

use super::cdb::INVALID_FIELD;
use super::unit::{LogicalUnit, MAX_UNMAP_DESCRIPTORS};
use super::Sense;

pub(crate) const VENDOR: &[u8; 8] = b"VIRTINIT";
pub(crate) const REVISION: &[u8; 4] = b"0001";
const STANDARD_LEN: usize = 36;
/// Pages listed by VPD 0x00, in ascending order as SPC-4 requires.
pub(crate) const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

fn product(unit: Option<&LogicalUnit>) -> &'static str {
    match unit.map(|u| u.storage.kind()) {
        Some("ram") => "RAM DISK",
        Some("null") => "NULL DISK",
        Some("file") => "FILE DISK",
        _ => "NO LUN",
    }
}

/// Handles INQUIRY for a LUN, or for an address with no LUN behind it (`None`), which answers
/// peripheral qualifier 3 / type 0x1f.
pub(crate) fn inquiry(unit: Option<&LogicalUnit>, cdb: &[u8]) -> Result<Vec<u8>, Sense> {
    // Only EVPD may be set in byte 1 (CMDDT is obsolete).
    if cdb[1] & !0x01 != 0 {
        return Err(INVALID_FIELD);
    }
    let page = cdb[2];
    if cdb[1] & 0x01 == 0 {
        if page != 0 {
            return Err(INVALID_FIELD);
        }
        return Ok(standard(unit));
    }
    let Some(unit) = unit else {
        return Ok(vec![device_type::NO_LUN, page, 0, 0]);
    };
    let body = match page {
        0x00 => VPD_PAGES.to_vec(),
        0x80 => unit.serial.as_bytes().to_vec(),
        0x83 => device_identification(unit),
        0xb0 => block_limits(unit),
        0xb1 => block_characteristics(),
        0xb2 => provisioning(),
        _ => return Err(INVALID_FIELD),
    };
    let mut data = vec![device_type::DISK, page];
    data.extend_from_slice(&(body.len() as u16).to_be_bytes());
    data.extend_from_slice(&body);
    Ok(data)
}

fn standard(unit: Option<&LogicalUnit>) -> Vec<u8> {
    let mut d = vec![0u8; STANDARD_LEN];
    d[0] = if unit.is_some() { device_type::DISK } else { device_type::NO_LUN };
    d[2] = 0x06; // SPC-4
    d[3] = 0x10 | 0x02; // HISUP (hierarchical LUNs), response data format 2
    d[4] = (STANDARD_LEN - 5) as u8;
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(VENDOR);
    let mut prod = [b' '; 16];
    let p = product(unit).as_bytes();
    prod[..p.len()].copy_from_slice(p);
    d[16..32].copy_from_slice(&prod);
    d[32..36].copy_from_slice(REVISION);
    d
}

/// VPD 0x83: an NAA locally assigned designator and a T10 vendor ID designator, both
/// associated with the logical unit.
fn device_identification(unit: &LogicalUnit) -> Vec<u8> {
    let mut d = vec![0x01, 0x03, 0x00, 0x08]; // binary, LU association, type NAA, 8 bytes
    d.extend_from_slice(&unit.naa.to_be_bytes());
    let mut t10 = VENDOR.to_vec();
    t10.extend_from_slice(unit.serial.as_bytes());
    d.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]); // ASCII, LU association, T10 vendor ID
    d.extend_from_slice(&t10);
    d
}

/// VPD 0xB0 (SBC-3 6.5.3).
fn block_limits(unit: &LogicalUnit) -> Vec<u8> {
    let bs = unit.block_size;
    let mut d = vec![0u8; 0x3c];
    // Offsets below are relative to byte 4 of the page.
    d[0] = 0x01; // WSNZ: WRITE SAME with zero blocks is rejected
    d[2..4].copy_from_slice(&((4096 / bs).max(1) as u16).to_be_bytes()); // optimal granularity
    d[4..8].copy_from_slice(&unit.max_transfer_blocks().to_be_bytes());
    d[8..12].copy_from_slice(&(((1u32 << 20) / bs).max(1)).to_be_bytes()); // optimal transfer
    d[16..20].copy_from_slice(&unit.max_unmap_blocks().to_be_bytes());
    d[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
    d[24..28].copy_from_slice(&unit.unmap_granularity().to_be_bytes());
    d[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
    d[32..40].copy_from_slice(&u64::from(unit.max_unmap_blocks()).to_be_bytes()); // max WRITE SAME
    d
}

/// VPD 0xB1: a non-rotating medium.
fn block_characteristics() -> Vec<u8> {
    let mut d = vec![0u8; 0x3c];
    d[0..2].copy_from_slice(&1u16.to_be_bytes());
    d
}

/// VPD 0xB2: thin provisioning with UNMAP, WRITE SAME (16) and (10) unmapping, and unmapped
/// blocks that read as zeros.
fn provisioning() -> Vec<u8> {
    vec![0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00]
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::Completion;
    use virtio_scsi_proto::scsi::{asc, opcode::INQUIRY};
    use virtio_scsi_proto::LunAddress;

    const A: LunAddress = LunAddress::new(0, 0);

    fn vpd(bus: &super::super::Bus, addr: LunAddress, page: u8) -> Vec<u8> {
        let (c, d) = run(bus, addr, &[INQUIRY, 1, page, 1, 0, 0], &[], 256);
        assert_eq!(c.status, 0, "page {page:#x}: {c:?}");
        assert_eq!((d[0], d[1]), (0, page));
        assert_eq!(usize::from(u16::from_be_bytes([d[2], d[3]])), d.len() - 4);
        d
    }

    #[test]
    fn standard_inquiry_fields() {
        let bus = ram_bus(&[(0, 0, 1 << 20, 512)]);
        let (c, d) = run(&bus, A, &[INQUIRY, 0, 0, 0, 96, 0], &[], 96);
        assert_eq!(c, Completion::good(36));
        assert_eq!(d[0], 0x00, "PQ 0, direct access");
        assert_eq!(d[2], 0x06, "SPC-4");
        assert_eq!(d[3] & 0x0f, 2, "response data format");
        assert_eq!(usize::from(d[4]), d.len() - 5);
        assert_eq!(d[7] & 0x02, 0x02, "CmdQue");
        assert_eq!(&d[8..16], b"VIRTINIT");
        assert_eq!(&d[16..32], b"RAM DISK        ");
        assert_eq!(&d[32..36], b"0001");
        // Allocation length truncates.
        let (c, d) = run(&bus, A, &[INQUIRY, 0, 0, 0, 5, 0], &[], 96);
        assert_eq!((c.data_in_len, d.len()), (5, 5));
        // A page code without EVPD, CMDDT, and unknown VPD pages are invalid.
        for cdb in [[INQUIRY, 0, 0x80, 0, 96, 0], [INQUIRY, 2, 0, 0, 96, 0], [INQUIRY, 1, 0x99, 0, 96, 0]] {
            expect_sense(&run(&bus, A, &cdb, &[], 96).0, 5, asc::INVALID_FIELD_IN_CDB);
        }
    }

    #[test]
    fn vpd_pages() {
        let bus = ram_bus(&[(0, 0, 1 << 20, 4096), (0, 1, 1 << 20, 512)]);
        assert_eq!(&vpd(&bus, A, 0x00)[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);

        let serial0 = vpd(&bus, A, 0x80)[4..].to_vec();
        let serial1 = vpd(&bus, LunAddress::new(0, 1), 0x80)[4..].to_vec();
        assert!(!serial0.is_empty() && serial0.iter().all(|b| b.is_ascii_graphic()));
        assert_ne!(serial0, serial1);

        let id0 = vpd(&bus, A, 0x83);
        let id1 = vpd(&bus, LunAddress::new(0, 1), 0x83);
        // First designator: binary NAA, 8 bytes, NAA type 3 (locally assigned).
        assert_eq!(&id0[4..8], &[0x01, 0x03, 0x00, 0x08]);
        assert_eq!(id0[8] >> 4, 3);
        assert_ne!(&id0[8..16], &id1[8..16]);
        // Second: ASCII T10 vendor ID starting with the vendor.
        assert_eq!(&id0[16..19], &[0x02, 0x01, 0x00]);
        assert_eq!(&id0[20..28], b"VIRTINIT");
        assert_eq!(usize::from(id0[19]) + 20, id0.len());

        let b0 = vpd(&bus, A, 0xb0);
        assert_eq!(b0.len(), 64);
        let be32 = |o: usize| u32::from_be_bytes([b0[o], b0[o + 1], b0[o + 2], b0[o + 3]]);
        assert_eq!(be32(8), (8 << 20) / 4096, "max transfer length");
        assert_eq!(be32(12), (1 << 20) / 4096, "optimal transfer length");
        assert_eq!(be32(20), ((4u64 << 30) / 4096) as u32, "max unmap LBA count");
        assert_eq!(be32(24), 256, "max unmap descriptors");
        assert_eq!(be32(28), 16, "unmap granularity: one 64 KiB chunk");
        assert_eq!(u64::from_be_bytes(b0[36..44].try_into().unwrap()), (4u64 << 30) / 4096);

        let b1 = vpd(&bus, A, 0xb1);
        assert_eq!((b1.len(), b1[4], b1[5]), (64, 0, 1), "non-rotating");

        let b2 = vpd(&bus, A, 0xb2);
        assert_eq!(b2[5] & 0xe4, 0xe4, "LBPU, LBPWS, LBPWS10, LBPRZ");
        assert_eq!(b2[6] & 0x07, 2, "thin provisioning");
    }

    #[test]
    fn product_names_by_kind() {
        let bus = super::super::Bus::new(0);
        let cfg = super::super::LunConfig {
            backing: super::super::Backing::Null { bytes: 1 << 20 },
            block_size: 512,
            read_only: false,
        };
        bus.add(A, cfg).unwrap();
        let (_, d) = run(&bus, A, &[INQUIRY, 0, 0, 0, 36, 0], &[], 36);
        assert_eq!(&d[16..32], b"NULL DISK       ");
    }
}
