//! Injected faults: what the next commands to a logical unit answer instead of their result.

use std::time::Duration;

use virtio_scsi_proto::scsi::{opcode, status};

use super::{Action, Completion, DataError, DataIn, Sense};

/// A fault that `Bus::inject` arms for a number of commands. INQUIRY, REPORT LUNS and REQUEST
/// SENSE are never affected, so scans keep working.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// CHECK CONDITION with this sense key and ASC/ASCQ.
    CheckCondition { key: u8, asc: u8, ascq: u8 },
    /// BUSY status.
    Busy,
    /// TASK SET FULL status.
    TaskSetFull,
    /// Execute normally and write the data and response at once; put the request on the used
    /// ring only after the delay.
    Delay(Duration),
    /// Execute normally, but write nothing to the initiator's memory (data, response, used
    /// entry) until the delay has passed; then all of it at once.
    Late(Duration),
    /// Do not execute and never complete.
    Never,
    /// READ commands only: execute normally and report GOOD, with one byte in every
    /// [`CORRUPT_INTERVAL`] of the data flipped. Other commands pass untouched and do not use up
    /// the count.
    Corrupt,
}

/// The `corrupt` fault flips the first byte of every this many bytes of data-in.
pub const CORRUPT_INTERVAL: usize = 512;

/// A fault armed for `remaining` more commands.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ArmedFault {
    pub fault: Fault,
    pub remaining: u32,
}

/// What an armed fault does to one command.
pub(crate) enum Effect {
    /// Answer this instead of executing.
    Replace(Completion),
    /// Execute, then complete with this action.
    Defer(Action),
    /// Execute, with the data-in corrupted.
    Corrupt,
}

impl Fault {
    /// Whether the fault takes a command with this operation code (and uses up its count).
    pub(crate) fn applies_to(&self, op: u8) -> bool {
        match self {
            Fault::Corrupt => matches!(op, opcode::READ_6 | opcode::READ_10 | opcode::READ_16),
            _ => true,
        }
    }

    pub(crate) fn effect(&self) -> Effect {
        match *self {
            Fault::CheckCondition { key, asc, ascq } => {
                Effect::Replace(Completion::check_condition(Sense::new(key, (asc, ascq))))
            }
            Fault::Busy => Effect::Replace(Completion::status(status::BUSY)),
            Fault::TaskSetFull => Effect::Replace(Completion::status(status::TASK_SET_FULL)),
            Fault::Delay(d) => Effect::Defer(Action::After(d)),
            Fault::Late(d) => Effect::Defer(Action::Late(d)),
            Fault::Never => Effect::Replace(Completion { action: Action::Never, ..Completion::good(0) }),
            Fault::Corrupt => Effect::Corrupt,
        }
    }
}

/// Flips the first byte of every [`CORRUPT_INTERVAL`] bytes written through it.
pub(crate) struct Corrupting<'a> {
    pub inner: &'a mut dyn DataIn,
}

impl DataIn for Corrupting<'_> {
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<(), DataError> {
        let mut bytes = src.to_vec();
        let first = offset.next_multiple_of(CORRUPT_INTERVAL) - offset;
        for i in (first..bytes.len()).step_by(CORRUPT_INTERVAL) {
            bytes[i] ^= 0xff;
        }
        self.inner.write_at(offset, &bytes)
    }

    fn hold_back(&mut self) {
        self.inner.hold_back()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupting_flips_one_byte_in_every_interval_across_pieces() {
        let mut area = vec![0u8; 2048];
        let mut c = Corrupting { inner: &mut area };
        // Pieces that do not start on an interval boundary still flip at absolute offsets.
        c.write_at(0, &[0x11; 700]).unwrap();
        c.write_at(700, &[0x11; 1348]).unwrap();
        for (i, &b) in area.iter().enumerate() {
            let want = if i % CORRUPT_INTERVAL == 0 { 0x11 ^ 0xff } else { 0x11 };
            assert_eq!(b, want, "byte {i}");
        }
        let mut c = Corrupting { inner: &mut area };
        assert!(c.write_at(2000, &[0; 100]).is_err(), "range errors pass through");
    }

    #[test]
    fn corrupt_takes_reads_only() {
        assert!(Fault::Corrupt.applies_to(opcode::READ_10));
        assert!(Fault::Corrupt.applies_to(opcode::READ_6));
        assert!(Fault::Corrupt.applies_to(opcode::READ_16));
        assert!(!Fault::Corrupt.applies_to(opcode::WRITE_10));
        assert!(!Fault::Corrupt.applies_to(opcode::TEST_UNIT_READY));
        assert!(Fault::Late(Duration::from_millis(1)).applies_to(opcode::WRITE_10));
        assert!(
            matches!(Fault::Late(Duration::from_millis(5)).effect(), Effect::Defer(Action::Late(d)) if d == Duration::from_millis(5))
        );
    }
}
