//! virtio-scsi LUN addressing: byte 0 is 1, byte 1 the target, bytes 2-3 a SAM flat-space LUN.

/// A (target, LUN) pair as carried in the 8-byte `lun` field of every virtio-scsi request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LunAddress {
    pub target: u8,
    pub lun: u16,
}

/// Largest LUN the single-level flat-space encoding can carry.
pub const MAX_LUN: u16 = 0x3fff;

impl LunAddress {
    pub const fn new(target: u8, lun: u16) -> Self {
        LunAddress { target, lun }
    }

    /// Encodes as Linux and the spec do: flat-space addressing (0x40) on bytes 2-3.
    pub fn encode(&self) -> [u8; 8] {
        let lun = self.lun & MAX_LUN;
        [1, self.target, 0x40 | (lun >> 8) as u8, lun as u8, 0, 0, 0, 0]
    }

    /// The LUN field of an event-queue event. Initiators read bytes 2-3 as the LUN number the
    /// way REPORT LUNS lists it (Linux takes them as they are), so they carry the REPORT LUNS
    /// entry: peripheral addressing below 256, flat space above.
    pub fn encode_for_event(&self) -> [u8; 8] {
        let e = Self::report_luns_entry(self.lun & MAX_LUN);
        [1, self.target, e[0], e[1], 0, 0, 0, 0]
    }

    /// Decodes a request's LUN field. LUN 0 is accepted with or without the flat-space bit,
    /// as initiators differ there; any other address method, or a byte 0 that is not 1, is
    /// not a LUN this transport can reach and yields `None`.
    pub fn decode(raw: &[u8; 8]) -> Option<Self> {
        if raw[0] != 1 || raw[4..].iter().any(|&b| b != 0) {
            return None;
        }
        let method = raw[2] >> 6;
        let lun = (u16::from(raw[2] & 0x3f) << 8) | u16::from(raw[3]);
        match method {
            1 => Some(LunAddress::new(raw[1], lun)),
            // Peripheral addressing, bus 0: only LUN 0 (all-zero bytes) is in use by initiators.
            0 if raw[2] == 0 => Some(LunAddress::new(raw[1], u16::from(raw[3]))),
            _ => None,
        }
    }

    /// SAM-5 8-byte LUN as REPORT LUNS lists it: flat space for LUNs above 255, peripheral
    /// (plain) addressing below, which is what real targets report for small LUNs.
    pub fn report_luns_entry(lun: u16) -> [u8; 8] {
        if lun < 256 {
            [0, lun as u8, 0, 0, 0, 0, 0, 0]
        } else {
            [0x40 | ((lun >> 8) as u8 & 0x3f), lun as u8, 0, 0, 0, 0, 0, 0]
        }
    }

    /// Parses one REPORT LUNS entry (peripheral or flat-space, single level).
    pub fn parse_report_luns_entry(entry: &[u8; 8]) -> Option<u16> {
        if entry[2..].iter().any(|&b| b != 0) {
            return None;
        }
        match entry[0] >> 6 {
            0 if entry[0] == 0 => Some(u16::from(entry[1])),
            1 => Some((u16::from(entry[0] & 0x3f) << 8) | u16::from(entry[1])),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        for (t, l) in [(0, 0), (3, 1), (255, 0x3fff), (7, 300)] {
            let a = LunAddress::new(t, l);
            assert_eq!(LunAddress::decode(&a.encode()), Some(a));
        }
        assert_eq!(LunAddress::new(2, 5).encode(), [1, 2, 0x40, 5, 0, 0, 0, 0]);
    }

    #[test]
    fn lun_zero_without_flat_space_bit() {
        assert_eq!(LunAddress::decode(&[1, 4, 0, 0, 0, 0, 0, 0]), Some(LunAddress::new(4, 0)));
    }

    #[test]
    fn rejects_foreign_addresses() {
        assert_eq!(LunAddress::decode(&[0, 0, 0x40, 0, 0, 0, 0, 0]), None);
        assert_eq!(LunAddress::decode(&[1, 0, 0x80, 0, 0, 0, 0, 0]), None);
        assert_eq!(LunAddress::decode(&[1, 0, 0x40, 0, 1, 0, 0, 0]), None);
    }

    #[test]
    fn event_encoding_matches_report_luns() {
        assert_eq!(LunAddress::new(0, 4).encode_for_event(), [1, 0, 0, 4, 0, 0, 0, 0]);
        assert_eq!(LunAddress::new(2, 300).encode_for_event(), [1, 2, 0x41, 44, 0, 0, 0, 0]);
        for l in [0u16, 4, 255, 256, 0x3fff] {
            let a = LunAddress::new(1, l);
            assert_eq!(LunAddress::decode(&a.encode_for_event()), Some(a));
        }
    }

    #[test]
    fn report_luns_entries() {
        for l in [0u16, 1, 255, 256, 0x3fff] {
            assert_eq!(LunAddress::parse_report_luns_entry(&LunAddress::report_luns_entry(l)), Some(l));
        }
    }
}
