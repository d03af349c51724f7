//! MODE SENSE and MODE SELECT (SPC-4 7.5) with the caching and control pages.

use virtio_scsi_proto::scsi::{asc, opcode, sense_key};

use super::cdb::{be16, INVALID_FIELD};
use super::unit::LogicalUnit;
use super::{DataOut, Sense};

const CACHING: u8 = 0x08;
const CONTROL: u8 = 0x0a;
const ALL_PAGES: u8 = 0x3f;
const CACHING_LEN: usize = 20;
const CONTROL_LEN: usize = 12;

/// Page control values of MODE SENSE byte 2.
const PC_CHANGEABLE: u8 = 1;
const PC_SAVED: u8 = 3;

fn caching_page(pc: u8) -> [u8; CACHING_LEN] {
    let mut p = [0u8; CACHING_LEN];
    p[0] = CACHING;
    p[1] = (CACHING_LEN - 2) as u8;
    if pc != PC_CHANGEABLE {
        p[2] = 0x04; // WCE: writes complete before reaching stable storage; flushes are needed
    }
    p
}

fn control_page(pc: u8) -> [u8; CONTROL_LEN] {
    let mut p = [0u8; CONTROL_LEN];
    p[0] = CONTROL;
    p[1] = (CONTROL_LEN - 2) as u8;
    if pc != PC_CHANGEABLE {
        p[3] = 0x10; // queue algorithm modifier 1: unrestricted reordering
    }
    p
}

pub(crate) fn mode_sense(unit: &LogicalUnit, cdb: &[u8]) -> Result<Vec<u8>, Sense> {
    let ten = cdb[0] == opcode::MODE_SENSE_10;
    let dbd = cdb[1] & 0x08 != 0;
    let llbaa = ten && cdb[1] & 0x10 != 0;
    let pc = cdb[2] >> 6;
    let (page, subpage) = (cdb[2] & 0x3f, cdb[3]);
    if pc == PC_SAVED {
        return Err(Sense::illegal_request(asc::SAVING_PARAMETERS_NOT_SUPPORTED));
    }
    let mut pages = Vec::new();
    match (page, subpage) {
        (CACHING, 0) => pages.extend_from_slice(&caching_page(pc)),
        (CONTROL, 0) => pages.extend_from_slice(&control_page(pc)),
        (ALL_PAGES, 0 | 0xff) => {
            pages.extend_from_slice(&caching_page(pc));
            pages.extend_from_slice(&control_page(pc));
        }
        _ => return Err(INVALID_FIELD),
    }

    let blocks = unit.blocks();
    let mut desc = Vec::new();
    if !dbd {
        if llbaa {
            desc.extend_from_slice(&blocks.to_be_bytes());
            desc.extend_from_slice(&[0; 4]);
            desc.extend_from_slice(&unit.block_size.to_be_bytes());
        } else {
            // A count that does not fit reads as all ones (SBC-3 6.4.2).
            desc.extend_from_slice(&(blocks.min(u64::from(u32::MAX)) as u32).to_be_bytes());
            desc.push(0);
            desc.extend_from_slice(&unit.block_size.to_be_bytes()[1..]);
        }
    }
    // Device-specific parameter: WP for a read-only unit, DPOFUA as FUA is accepted.
    let device_specific = if unit.read_only { 0x80 } else { 0 } | 0x10;

    let mut data = Vec::with_capacity(8 + desc.len() + pages.len());
    if ten {
        let total = 8 + desc.len() + pages.len();
        data.extend_from_slice(&((total - 2) as u16).to_be_bytes());
        data.extend_from_slice(&[0, device_specific, u8::from(llbaa && !dbd), 0]);
        data.extend_from_slice(&(desc.len() as u16).to_be_bytes());
    } else {
        let total = 4 + desc.len() + pages.len();
        data.extend_from_slice(&[(total - 1) as u8, 0, device_specific, desc.len() as u8]);
    }
    data.extend_from_slice(&desc);
    data.extend_from_slice(&pages);
    Ok(data)
}

/// Accepts the caching and control pages and ignores their contents: the target's behaviour
/// is fixed, and refusing would make initiators that tune the write cache fail to attach.
pub(crate) fn mode_select(_unit: &LogicalUnit, cdb: &[u8], out: &dyn DataOut) -> Result<(), Sense> {
    let ten = cdb[0] == opcode::MODE_SELECT_10;
    // SP (save pages) cannot be honoured.
    if cdb[1] & 0x01 != 0 {
        return Err(INVALID_FIELD);
    }
    let len = if ten { usize::from(be16(&cdb[7..9])) } else { usize::from(cdb[4]) };
    if len == 0 {
        return Ok(());
    }
    if out.len() < len {
        return Err(INVALID_FIELD);
    }
    let mut list = vec![0u8; len];
    out.read_at(0, &mut list).map_err(|e| {
        log::warn!("MODE SELECT parameter list: {e}");
        Sense::new(sense_key::HARDWARE_ERROR, asc::INTERNAL_TARGET_FAILURE)
    })?;
    let length_error = Sense::illegal_request(asc::PARAMETER_LIST_LENGTH_ERROR);
    let header = if ten { 8 } else { 4 };
    if len < header {
        return Err(length_error);
    }
    let desc_len = if ten { usize::from(be16(&list[6..8])) } else { usize::from(list[3]) };
    let mut pos = header + desc_len;
    if pos > len {
        return Err(length_error);
    }
    while pos < len {
        if pos + 2 > len {
            return Err(length_error);
        }
        let code = list[pos] & 0x3f;
        let subpage_format = list[pos] & 0x40 != 0;
        let page_len = if subpage_format {
            if pos + 4 > len {
                return Err(length_error);
            }
            usize::from(be16(&list[pos + 2..pos + 4])) + 4
        } else {
            usize::from(list[pos + 1]) + 2
        };
        if pos + page_len > len {
            return Err(length_error);
        }
        match (code, subpage_format, page_len) {
            (CACHING, false, CACHING_LEN) | (CONTROL, false, CONTROL_LEN) => {}
            _ => return Err(Sense::illegal_request(asc::INVALID_FIELD_IN_PARAMETER_LIST)),
        }
        pos += page_len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{Backing, Bus, Completion, LunConfig};
    use super::*;
    use virtio_scsi_proto::LunAddress;

    const A: LunAddress = LunAddress::new(0, 0);

    fn bus(read_only: bool) -> Bus {
        let bus = Bus::new(0);
        let cfg = LunConfig { backing: Backing::Ram { bytes: 8 << 20 }, block_size: 4096, read_only };
        bus.add(A, cfg).unwrap();
        clear_ua(&bus, A);
        bus
    }

    #[test]
    fn mode_sense_6_caching_page_with_block_descriptor() {
        let bus = bus(false);
        let (c, d) = run(&bus, A, &[opcode::MODE_SENSE_6, 0, CACHING, 0, 255, 0], &[], 255);
        assert_eq!(c, Completion::good(4 + 8 + CACHING_LEN));
        assert_eq!(usize::from(d[0]), d.len() - 1);
        assert_eq!(d[2], 0x10, "not write protected, DPOFUA");
        assert_eq!(d[3], 8);
        assert_eq!(&d[4..8], &2048u32.to_be_bytes());
        assert_eq!(&d[9..12], &[0x00, 0x10, 0x00]);
        assert_eq!((d[12], d[13]), (CACHING, 0x12));
        assert_eq!(d[14] & 0x04, 0x04, "WCE");
        // Allocation length truncates.
        let (c, _) = run(&bus, A, &[opcode::MODE_SENSE_6, 0, CACHING, 0, 4, 0], &[], 255);
        assert_eq!(c.data_in_len, 4);
    }

    #[test]
    fn mode_sense_10_all_pages_dbd_and_llbaa() {
        let bus = bus(true);
        let mut cdb = [opcode::MODE_SENSE_10, 0x08, ALL_PAGES, 0, 0, 0, 0, 1, 0, 0];
        let (c, d) = run(&bus, A, &cdb, &[], 256);
        assert_eq!(c.data_in_len, 8 + CACHING_LEN + CONTROL_LEN);
        assert_eq!(usize::from(be16(&d[0..2])), d.len() - 2);
        assert_eq!(d[3] & 0x80, 0x80, "write protected");
        assert_eq!(be16(&d[6..8]), 0, "DBD");
        assert_eq!((d[8], d[8 + CACHING_LEN]), (CACHING, CONTROL));

        cdb[1] = 0x10; // LLBAA
        let (_, d) = run(&bus, A, &cdb, &[], 256);
        assert_eq!((d[4] & 1, be16(&d[6..8])), (1, 16));
        assert_eq!(&d[8..16], &2048u64.to_be_bytes());
        assert_eq!(&d[20..24], &4096u32.to_be_bytes());
        assert_eq!(d[24], CACHING);

        // Changeable values: nothing is changeable.
        cdb[2] = 0x40 | CACHING;
        let (_, d) = run(&bus, A, &cdb, &[], 256);
        assert_eq!(d[24 + 2], 0);
        // Saved values are not supported; unknown pages are invalid.
        cdb[2] = 0xc0 | CACHING;
        expect_sense(&run(&bus, A, &cdb, &[], 256).0, 5, asc::SAVING_PARAMETERS_NOT_SUPPORTED);
        cdb[2] = 0x1c;
        expect_sense(&run(&bus, A, &cdb, &[], 256).0, 5, asc::INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn mode_select_accepts_caching_page() {
        let bus = bus(false);
        let (_, sensed) = run(&bus, A, &[opcode::MODE_SENSE_6, 0, CACHING, 0, 255, 0], &[], 255);
        let mut list = sensed.clone();
        list[0] = 0; // mode data length is reserved in MODE SELECT
        let cdb = [opcode::MODE_SELECT_6, 0x10, 0, 0, list.len() as u8, 0];
        assert_eq!(run(&bus, A, &cdb, &list, 0).0, Completion::good(0));
        // A page this target does not have.
        let mut bad = list.clone();
        bad[12] = 0x1c;
        expect_sense(&run(&bus, A, &cdb, &bad, 0).0, 5, asc::INVALID_FIELD_IN_PARAMETER_LIST);
        // A page running past the list.
        let cut = [opcode::MODE_SELECT_6, 0x10, 0, 0, (list.len() - 3) as u8, 0];
        expect_sense(&run(&bus, A, &cut, &list, 0).0, 5, asc::PARAMETER_LIST_LENGTH_ERROR);
        // Saving pages is refused.
        let sp = [opcode::MODE_SELECT_6, 0x11, 0, 0, list.len() as u8, 0];
        expect_sense(&run(&bus, A, &sp, &list, 0).0, 5, asc::INVALID_FIELD_IN_CDB);
    }
}
