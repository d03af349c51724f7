//! Fixed-format sense data (SPC-4 4.5.3).

use virtio_scsi_proto::scsi::{asc, sense_key};

/// Length of the fixed-format sense this target returns.
pub const FIXED_SENSE_LEN: usize = 18;
/// Response code of current-error fixed-format sense.
pub const RESPONSE_CURRENT_FIXED: u8 = 0x70;

/// A sense key with its additional sense code and qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    pub const fn new(key: u8, code: (u8, u8)) -> Sense {
        Sense { key, asc: code.0, ascq: code.1 }
    }

    pub const fn illegal_request(code: (u8, u8)) -> Sense {
        Sense::new(sense_key::ILLEGAL_REQUEST, code)
    }

    pub const fn unit_attention(code: (u8, u8)) -> Sense {
        Sense::new(sense_key::UNIT_ATTENTION, code)
    }

    /// NO SENSE, as REQUEST SENSE reports when nothing is pending.
    pub const fn none() -> Sense {
        Sense::new(sense_key::NO_SENSE, asc::NO_ADDITIONAL_SENSE)
    }

    /// Encodes as current-error fixed-format sense with additional length 10.
    pub fn to_fixed(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut b = [0u8; FIXED_SENSE_LEN];
        b[0] = RESPONSE_CURRENT_FIXED;
        b[2] = self.key & 0x0f;
        b[7] = (FIXED_SENSE_LEN - 8) as u8;
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }

    /// Decodes fixed-format sense (current or deferred); `None` for anything else or short data.
    pub fn from_fixed(b: &[u8]) -> Option<Sense> {
        if b.len() < 14 || !matches!(b[0] & 0x7f, 0x70 | 0x71) {
            return None;
        }
        Some(Sense { key: b[2] & 0x0f, asc: b[12], ascq: b[13] })
    }
}

/// Fixed-format sense bytes for a key and ASC/ASCQ pair.
pub fn fixed_sense(key: u8, code: (u8, u8)) -> Vec<u8> {
    Sense::new(key, code).to_fixed().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_layout() {
        let b = Sense::illegal_request(asc::LBA_OUT_OF_RANGE).to_fixed();
        assert_eq!(b[0], 0x70);
        assert_eq!(b[2], 0x05);
        assert_eq!(b[7], 10);
        assert_eq!((b[12], b[13]), (0x21, 0x00));
        assert_eq!(Sense::from_fixed(&b), Some(Sense::new(5, (0x21, 0))));
        assert_eq!(fixed_sense(6, asc::POWER_ON_RESET)[12], 0x29);
        assert_eq!(Sense::from_fixed(&[0x72, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(Sense::from_fixed(&b[..10]), None);
    }
}
