//! virtio-scsi request, response, task-management, event and configuration layouts.

/// Device ID of virtio-scsi.
pub const VIRTIO_ID_SCSI: u32 = 8;

/// Feature bits (virtio 1.2, 5.6.3).
pub mod feature {
    pub const INOUT: u32 = 0;
    pub const HOTPLUG: u32 = 1;
    pub const CHANGE: u32 = 2;
    pub const T10_PI: u32 = 3;
}

/// Fixed CDB and sense sizes this project uses (the spec's defaults).
pub const CDB_SIZE: usize = 32;
pub const SENSE_SIZE: usize = 96;

/// Queue indices: the control and event queues come first, request queues after them.
pub const CONTROL_QUEUE: u16 = 0;
pub const EVENT_QUEUE: u16 = 1;
pub const FIRST_REQUEST_QUEUE: u16 = 2;

/// `response` values of command, task-management and asynchronous-notification replies.
pub mod response {
    pub const OK: u8 = 0;
    pub const OVERRUN: u8 = 1;
    pub const ABORTED: u8 = 2;
    pub const BAD_TARGET: u8 = 3;
    pub const RESET: u8 = 4;
    pub const BUSY: u8 = 5;
    pub const TRANSPORT_FAILURE: u8 = 6;
    pub const TARGET_FAILURE: u8 = 7;
    pub const NEXUS_FAILURE: u8 = 8;
    pub const FAILURE: u8 = 9;
    pub const FUNCTION_SUCCEEDED: u8 = 10;
    pub const FUNCTION_REJECTED: u8 = 11;
    pub const INCORRECT_LUN: u8 = 12;

    /// Name of a response code, for errors and logs.
    pub fn name(code: u8) -> &'static str {
        match code {
            OK => "OK",
            OVERRUN => "OVERRUN",
            ABORTED => "ABORTED",
            BAD_TARGET => "BAD_TARGET",
            RESET => "RESET",
            BUSY => "BUSY",
            TRANSPORT_FAILURE => "TRANSPORT_FAILURE",
            TARGET_FAILURE => "TARGET_FAILURE",
            NEXUS_FAILURE => "NEXUS_FAILURE",
            FAILURE => "FAILURE",
            FUNCTION_SUCCEEDED => "FUNCTION_SUCCEEDED",
            FUNCTION_REJECTED => "FUNCTION_REJECTED",
            INCORRECT_LUN => "INCORRECT_LUN",
            _ => "UNKNOWN",
        }
    }
}

/// Control-queue request types.
pub mod ctrl {
    pub const TMF: u32 = 0;
    pub const AN_QUERY: u32 = 1;
    pub const AN_SUBSCRIBE: u32 = 2;
}

/// Task-management function subtypes.
pub mod tmf {
    pub const ABORT_TASK: u32 = 0;
    pub const ABORT_TASK_SET: u32 = 1;
    pub const CLEAR_ACA: u32 = 2;
    pub const CLEAR_TASK_SET: u32 = 3;
    pub const I_T_NEXUS_RESET: u32 = 4;
    pub const LOGICAL_UNIT_RESET: u32 = 5;
    pub const QUERY_TASK: u32 = 6;
    pub const QUERY_TASK_SET: u32 = 7;
}

/// Asynchronous notification event classes (bit numbers of the `event_requested` mask).
pub mod an {
    pub const OPERATIONAL_CHANGE: u32 = 1 << 1;
    pub const POWER_MGMT: u32 = 1 << 2;
    pub const EXTERNAL_REQUEST: u32 = 1 << 3;
    pub const MEDIA_CHANGE: u32 = 1 << 4;
    pub const MULTI_HOST: u32 = 1 << 5;
    pub const DEVICE_BUSY: u32 = 1 << 6;
}

/// Event-queue event codes and reasons.
pub mod event {
    pub const NO_EVENT: u32 = 0;
    pub const TRANSPORT_RESET: u32 = 1;
    pub const ASYNC_NOTIFY: u32 = 2;
    pub const PARAM_CHANGE: u32 = 3;
    /// Set in `event` when the device dropped events for lack of buffers.
    pub const EVENTS_MISSED: u32 = 0x8000_0000;

    pub const REASON_NONE: u32 = 0;
    pub const REASON_RESCAN: u32 = 1;
    pub const REASON_REMOVED: u32 = 2;
}

fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}
fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// `struct virtio_scsi_req_cmd` up to the data-out payload (with a 32-byte CDB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmdRequest {
    pub lun: [u8; 8],
    pub tag: u64,
    pub task_attr: u8,
    pub prio: u8,
    pub crn: u8,
    pub cdb: [u8; CDB_SIZE],
}

impl CmdRequest {
    pub const SIZE: usize = 19 + CDB_SIZE;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..8].copy_from_slice(&self.lun);
        b[8..16].copy_from_slice(&self.tag.to_le_bytes());
        b[16] = self.task_attr;
        b[17] = self.prio;
        b[18] = self.crn;
        b[19..].copy_from_slice(&self.cdb);
        b
    }

    /// Decodes a header; `b` must hold at least [`Self::SIZE`] bytes.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE {
            return None;
        }
        let mut lun = [0u8; 8];
        lun.copy_from_slice(&b[0..8]);
        let mut cdb = [0u8; CDB_SIZE];
        cdb.copy_from_slice(&b[19..Self::SIZE]);
        Some(CmdRequest { lun, tag: le64(&b[8..]), task_attr: b[16], prio: b[17], crn: b[18], cdb })
    }
}

/// `struct virtio_scsi_resp_cmd` up to the data-in payload (with 96 bytes of sense).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmdResponse {
    pub sense_len: u32,
    pub resid: u32,
    pub status_qualifier: u16,
    pub status: u8,
    pub response: u8,
    pub sense: [u8; SENSE_SIZE],
}

impl Default for CmdResponse {
    fn default() -> Self {
        CmdResponse {
            sense_len: 0,
            resid: 0,
            status_qualifier: 0,
            status: 0,
            response: 0,
            sense: [0; SENSE_SIZE],
        }
    }
}

impl CmdResponse {
    pub const SIZE: usize = 12 + SENSE_SIZE;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.sense_len.to_le_bytes());
        b[4..8].copy_from_slice(&self.resid.to_le_bytes());
        b[8..10].copy_from_slice(&self.status_qualifier.to_le_bytes());
        b[10] = self.status;
        b[11] = self.response;
        b[12..].copy_from_slice(&self.sense);
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE {
            return None;
        }
        let mut sense = [0u8; SENSE_SIZE];
        sense.copy_from_slice(&b[12..Self::SIZE]);
        Some(CmdResponse {
            sense_len: le32(&b[0..]),
            resid: le32(&b[4..]),
            status_qualifier: le16(&b[8..]),
            status: b[10],
            response: b[11],
            sense,
        })
    }

    /// The valid part of the sense buffer.
    pub fn sense(&self) -> &[u8] {
        &self.sense[..(self.sense_len as usize).min(SENSE_SIZE)]
    }
}

/// `struct virtio_scsi_ctrl_tmf_req`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TmfRequest {
    pub subtype: u32,
    pub lun: [u8; 8],
    pub tag: u64,
}

impl TmfRequest {
    pub const SIZE: usize = 24;
    /// Size of `struct virtio_scsi_ctrl_tmf_resp`: one response byte.
    pub const RESPONSE_SIZE: usize = 1;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&ctrl::TMF.to_le_bytes());
        b[4..8].copy_from_slice(&self.subtype.to_le_bytes());
        b[8..16].copy_from_slice(&self.lun);
        b[16..24].copy_from_slice(&self.tag.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE || le32(b) != ctrl::TMF {
            return None;
        }
        let mut lun = [0u8; 8];
        lun.copy_from_slice(&b[8..16]);
        Some(TmfRequest { subtype: le32(&b[4..]), lun, tag: le64(&b[16..]) })
    }
}

/// `struct virtio_scsi_ctrl_an_req` (query or subscribe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnRequest {
    pub kind: u32,
    pub lun: [u8; 8],
    pub event_requested: u32,
}

impl AnRequest {
    pub const SIZE: usize = 16;
    /// Size of `struct virtio_scsi_ctrl_an_resp`: event_actual (le32) and response.
    pub const RESPONSE_SIZE: usize = 5;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.kind.to_le_bytes());
        b[4..12].copy_from_slice(&self.lun);
        b[12..16].copy_from_slice(&self.event_requested.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE {
            return None;
        }
        let kind = le32(b);
        if kind != ctrl::AN_QUERY && kind != ctrl::AN_SUBSCRIBE {
            return None;
        }
        let mut lun = [0u8; 8];
        lun.copy_from_slice(&b[4..12]);
        Some(AnRequest { kind, lun, event_requested: le32(&b[12..]) })
    }

    pub fn encode_response(event_actual: u32, response: u8) -> [u8; Self::RESPONSE_SIZE] {
        let mut b = [0u8; Self::RESPONSE_SIZE];
        b[0..4].copy_from_slice(&event_actual.to_le_bytes());
        b[4] = response;
        b
    }
}

/// `struct virtio_scsi_event`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub event: u32,
    pub lun: [u8; 8],
    pub reason: u32,
}

impl Event {
    pub const SIZE: usize = 16;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.event.to_le_bytes());
        b[4..12].copy_from_slice(&self.lun);
        b[12..16].copy_from_slice(&self.reason.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE {
            return None;
        }
        let mut lun = [0u8; 8];
        lun.copy_from_slice(&b[4..12]);
        Some(Event { event: le32(b), lun, reason: le32(&b[12..]) })
    }
}

/// `struct virtio_scsi_config`, the device configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    pub num_queues: u32,
    pub seg_max: u32,
    pub max_sectors: u32,
    pub cmd_per_lun: u32,
    pub event_info_size: u32,
    pub sense_size: u32,
    pub cdb_size: u32,
    pub max_channel: u16,
    pub max_target: u16,
    pub max_lun: u32,
}

impl Config {
    pub const SIZE: usize = 36;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        let words = [
            self.num_queues,
            self.seg_max,
            self.max_sectors,
            self.cmd_per_lun,
            self.event_info_size,
            self.sense_size,
            self.cdb_size,
        ];
        for (i, w) in words.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        b[28..30].copy_from_slice(&self.max_channel.to_le_bytes());
        b[30..32].copy_from_slice(&self.max_target.to_le_bytes());
        b[32..36].copy_from_slice(&self.max_lun.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE {
            return None;
        }
        Some(Config {
            num_queues: le32(b),
            seg_max: le32(&b[4..]),
            max_sectors: le32(&b[8..]),
            cmd_per_lun: le32(&b[12..]),
            event_info_size: le32(&b[16..]),
            sense_size: le32(&b[20..]),
            cdb_size: le32(&b[24..]),
            max_channel: le16(&b[28..]),
            max_target: le16(&b[30..]),
            max_lun: le32(&b[32..]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmd_request_layout() {
        let mut cdb = [0u8; CDB_SIZE];
        cdb[0] = 0x28;
        let r =
            CmdRequest { lun: [1, 2, 0x40, 3, 0, 0, 0, 0], tag: 0x1122, task_attr: 0, prio: 0, crn: 0, cdb };
        let b = r.encode();
        assert_eq!(b.len(), 51);
        assert_eq!(b[8], 0x22);
        assert_eq!(b[19], 0x28);
        assert_eq!(CmdRequest::decode(&b), Some(r));
        assert_eq!(CmdRequest::decode(&b[..50]), None);
    }

    #[test]
    fn cmd_response_layout() {
        let mut r = CmdResponse { sense_len: 18, resid: 512, status: 2, ..Default::default() };
        r.sense[0] = 0x70;
        let b = r.encode();
        assert_eq!(b.len(), 108);
        assert_eq!(&b[4..8], &512u32.to_le_bytes());
        assert_eq!(b[10], 2);
        assert_eq!(CmdResponse::decode(&b), Some(r));
        assert_eq!(r.sense().len(), 18);
    }

    #[test]
    fn config_layout() {
        let c = Config {
            num_queues: 4,
            max_target: 7,
            max_lun: 16383,
            sense_size: 96,
            cdb_size: 32,
            ..Default::default()
        };
        let b = c.encode();
        assert_eq!(&b[30..32], &7u16.to_le_bytes());
        assert_eq!(Config::decode(&b), Some(c));
    }

    #[test]
    fn control_layouts() {
        let t = TmfRequest { subtype: tmf::LOGICAL_UNIT_RESET, lun: [1, 0, 0x40, 0, 0, 0, 0, 0], tag: 9 };
        assert_eq!(TmfRequest::decode(&t.encode()), Some(t));
        let a = AnRequest {
            kind: ctrl::AN_SUBSCRIBE,
            lun: [1, 0, 0, 0, 0, 0, 0, 0],
            event_requested: an::MEDIA_CHANGE,
        };
        assert_eq!(AnRequest::decode(&a.encode()), Some(a));
        let e = Event {
            event: event::TRANSPORT_RESET,
            lun: [1, 1, 0x40, 2, 0, 0, 0, 0],
            reason: event::REASON_RESCAN,
        };
        assert_eq!(Event::decode(&e.encode()), Some(e));
    }
}
