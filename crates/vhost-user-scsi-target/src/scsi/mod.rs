//! Device-side SCSI emulation (SPC-4 / SBC-3 direct-access block devices) for the bundled
//! target: logical units over RAM, null and file stores, unit attentions and fault injection.
//!
//! The transport hands each request to [`Bus::execute`] with its CDB and data buffers; the
//! returned [`Completion`] carries the SAM status, sense data and how much data-in was produced.

mod bus;
mod cdb;
mod config;
mod fault;
mod inquiry;
mod mode;
pub mod sense;
mod unit;

use std::time::Duration;

pub use bus::{open_storage, Bus, BusError, LunInfo};
pub use config::{Backing, LunConfig, LunSpec, LunSpecError, DEFAULT_BLOCK_SIZE};
pub use fault::{Fault, CORRUPT_INTERVAL};
pub use sense::Sense;
pub use unit::{MAX_TRANSFER_BYTES, MAX_UNMAP_BYTES, MAX_UNMAP_DESCRIPTORS};

/// Where READ-type data goes: the request's device-writable buffers after the response header.
pub trait DataIn {
    fn capacity(&self) -> usize;
    /// Copies `src` at byte `offset` of the data-in area. Err when out of range or memory fails.
    fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<(), DataError>;

    /// Asks that what is written from now on reach its destination only when the transport
    /// completes the command, not at once (the `late` fault). Plain buffers ignore it.
    fn hold_back(&mut self) {}
}

/// Where WRITE-type data comes from: the request's device-readable buffers after the header.
pub trait DataOut {
    fn len(&self) -> usize;
    fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), DataError>;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("data buffer access of {len} bytes at offset {offset} exceeds its size of {capacity} bytes")]
    OutOfRange { offset: usize, len: usize, capacity: usize },
    #[error("data buffer memory access failed: {0}")]
    Memory(String),
}

/// A request without data buffers in one or both directions.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoData;

impl DataIn for NoData {
    fn capacity(&self) -> usize {
        0
    }

    fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<(), DataError> {
        Err(DataError::OutOfRange { offset, len: src.len(), capacity: 0 })
    }
}

impl DataOut for NoData {
    fn len(&self) -> usize {
        0
    }

    fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), DataError> {
        Err(DataError::OutOfRange { offset, len: dst.len(), capacity: 0 })
    }
}

/// A plain byte vector is a data-in area of its current length.
impl DataIn for Vec<u8> {
    fn capacity(&self) -> usize {
        self.len()
    }

    fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<(), DataError> {
        let size = self.len();
        match offset.checked_add(src.len()) {
            Some(end) if end <= size => {
                self[offset..end].copy_from_slice(src);
                Ok(())
            }
            _ => Err(DataError::OutOfRange { offset, len: src.len(), capacity: size }),
        }
    }
}

impl DataOut for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), DataError> {
        let size = <[u8]>::len(self);
        match offset.checked_add(dst.len()) {
            Some(end) if end <= size => {
                dst.copy_from_slice(&self[offset..end]);
                Ok(())
            }
            _ => Err(DataError::OutOfRange { offset, len: dst.len(), capacity: size }),
        }
    }
}

impl<T: DataOut + ?Sized> DataOut for &T {
    fn len(&self) -> usize {
        (**self).len()
    }

    fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), DataError> {
        (**self).read_at(offset, dst)
    }
}

impl DataOut for Vec<u8> {
    fn len(&self) -> usize {
        Vec::len(self)
    }

    fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), DataError> {
        self.as_slice().read_at(offset, dst)
    }
}

/// What the transport does with a finished command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Complete it at once.
    Now,
    /// Complete it after this delay (injected latency); data and response are written at once.
    After(Duration),
    /// Write its data and response and complete it only after this delay: the data-in area
    /// was asked to hold back its writes.
    Late(Duration),
    /// Never complete it (injected lost completion); the command was not executed.
    Never,
}

/// The outcome of one SCSI command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// SAM status (`scsi::status::*`).
    pub status: u8,
    /// Fixed-format sense (18 bytes) with CHECK CONDITION, else empty.
    pub sense: Vec<u8>,
    /// Bytes written to the data-in area.
    pub data_in_len: usize,
    pub action: Action,
}

impl Completion {
    pub fn good(data_in_len: usize) -> Completion {
        Completion {
            status: virtio_scsi_proto::scsi::status::GOOD,
            sense: Vec::new(),
            data_in_len,
            action: Action::Now,
        }
    }

    pub fn check_condition(sense: Sense) -> Completion {
        Completion {
            status: virtio_scsi_proto::scsi::status::CHECK_CONDITION,
            sense: sense.to_fixed().to_vec(),
            data_in_len: 0,
            action: Action::Now,
        }
    }

    /// A status without sense or data, e.g. BUSY or TASK SET FULL.
    pub fn status(status: u8) -> Completion {
        Completion { status, sense: Vec::new(), data_in_len: 0, action: Action::Now }
    }

    /// The sense data decoded, when there is fixed-format sense.
    pub fn sense(&self) -> Option<Sense> {
        Sense::from_fixed(&self.sense)
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Helpers shared by the module tests: a bus with LUNs and one-call command execution.

    use super::*;
    use virtio_scsi_proto::LunAddress;

    pub(crate) fn ram_bus(luns: &[(u8, u16, u64, u32)]) -> Bus {
        let bus = Bus::new(7);
        for &(t, l, bytes, block_size) in luns {
            let cfg = LunConfig { backing: Backing::Ram { bytes }, block_size, read_only: false };
            bus.add(LunAddress::new(t, l), cfg).unwrap();
        }
        bus
    }

    /// Runs one command with `data_out` and a data-in area of `capacity` bytes; returns the
    /// completion and the data-in bytes actually produced.
    pub(crate) fn run(
        bus: &Bus,
        addr: LunAddress,
        cdb: &[u8],
        data_out: &[u8],
        capacity: usize,
    ) -> (Completion, Vec<u8>) {
        let mut inp = vec![0u8; capacity];
        let c = bus.execute(addr, cdb, &data_out, &mut inp).expect("target exists");
        inp.truncate(c.data_in_len);
        (c, inp)
    }

    pub(crate) fn clear_ua(bus: &Bus, addr: LunAddress) {
        for _ in 0..8 {
            let (c, _) = run(bus, addr, &[0; 6], &[], 0);
            if c.status == 0 {
                return;
            }
        }
        panic!("unit attentions did not clear");
    }

    pub(crate) fn expect_sense(c: &Completion, key: u8, asc: (u8, u8)) {
        assert_eq!(c.status, 2, "expected CHECK CONDITION, got {c:?}");
        let s = c.sense().expect("fixed sense");
        assert_eq!((s.key, s.asc, s.ascq), (key, asc.0, asc.1), "sense {s:?}");
    }

    pub(crate) fn rw10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = op;
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    pub(crate) fn rw16(op: u8, lba: u64, blocks: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = op;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    pub(crate) fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 1).collect()
    }
}
