//! The packed request and completion records that cross the JavaScript boundary. Batches of
//! them travel in one Buffer each way, so a native call carries many requests.

use virtio_scsi_proto::{CmdResponse, LunAddress, CDB_SIZE, SENSE_SIZE};

pub const SUBMIT_RECORD_SIZE: usize = 64;
pub const COMPLETION_RECORD_SIZE: usize = 16 + SENSE_SIZE;

/// Data direction of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    None,
    /// The device writes the buffer (READ).
    FromDevice,
    /// The device reads the buffer (WRITE).
    ToDevice,
}

/// One request as the caller packed it.
#[derive(Clone, Copy, Debug)]
pub struct SubmitRecord {
    pub token: u32,
    pub addr: LunAddress,
    pub direction: Direction,
    pub buffer: u32,
    pub cdb_len: u8,
    pub task_attr: u8,
    pub cdb: [u8; CDB_SIZE],
}

impl SubmitRecord {
    /// Decodes record `i` of a batch.
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
        let cdb_len = raw[12];
        if !(6..=CDB_SIZE as u8).contains(&cdb_len) {
            return Err(format!("CDB length {cdb_len} is outside 6..=32"));
        }
        let lun = u16::from_le_bytes([raw[6], raw[7]]);
        if lun > virtio_scsi_proto::lun::MAX_LUN {
            return Err(format!("LUN {lun} is above {}", virtio_scsi_proto::lun::MAX_LUN));
        }
        let mut cdb = [0u8; CDB_SIZE];
        cdb.copy_from_slice(&raw[16..16 + CDB_SIZE]);
        Ok(SubmitRecord {
            token: u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]),
            addr: LunAddress::new(raw[4], lun),
            direction,
            buffer: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
            cdb_len,
            task_attr: raw[13],
            cdb,
        })
    }
}

/// One finished request, as handed back.
#[derive(Clone, Copy, Debug)]
pub struct CompletionRecord {
    pub token: u32,
    pub response: CmdResponse,
    /// Bytes the device wrote into the data-in buffer.
    pub data_len: u32,
}

impl CompletionRecord {
    pub fn encode(&self, out: &mut [u8]) {
        let r = &self.response;
        out[0..4].copy_from_slice(&self.token.to_le_bytes());
        out[4] = r.response;
        out[5] = r.status;
        out[6..8].copy_from_slice(&(r.sense().len() as u16).to_le_bytes());
        out[8..12].copy_from_slice(&r.resid.to_le_bytes());
        out[12..16].copy_from_slice(&self.data_len.to_le_bytes());
        out[16..16 + SENSE_SIZE].copy_from_slice(&r.sense);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submit_record_fields() {
        let mut raw = [0u8; SUBMIT_RECORD_SIZE];
        raw[0..4].copy_from_slice(&77u32.to_le_bytes());
        raw[4] = 3;
        raw[5] = 1;
        raw[6..8].copy_from_slice(&300u16.to_le_bytes());
        raw[8..12].copy_from_slice(&2u32.to_le_bytes());
        raw[12] = 10;
        raw[16] = 0x28;
        let r = SubmitRecord::decode(&raw).unwrap();
        assert_eq!(
            (r.token, r.addr, r.direction, r.buffer, r.cdb[0]),
            (77, LunAddress::new(3, 300), Direction::FromDevice, 2, 0x28)
        );
        raw[5] = 7;
        assert!(SubmitRecord::decode(&raw).unwrap_err().contains("direction 7"));
        raw[5] = 0;
        raw[12] = 40;
        assert!(SubmitRecord::decode(&raw).unwrap_err().contains("CDB length 40"));
    }

    #[test]
    fn completion_record_layout() {
        let mut resp = CmdResponse { status: 2, resid: 512, sense_len: 18, ..Default::default() };
        resp.sense[2] = 5;
        let mut out = [0u8; COMPLETION_RECORD_SIZE];
        CompletionRecord { token: 9, response: resp, data_len: 100 }.encode(&mut out);
        assert_eq!(&out[0..4], &9u32.to_le_bytes());
        assert_eq!((out[5], u16::from_le_bytes([out[6], out[7]])), (2, 18));
        assert_eq!(&out[8..12], &512u32.to_le_bytes());
        assert_eq!(&out[12..16], &100u32.to_le_bytes());
        assert_eq!(out[18], 5);
    }
}
