//! Injected faults: what the next commands to a logical unit answer instead of their result.

use std::time::Duration;

use virtio_scsi_proto::scsi::status;

use super::{Action, Completion, Sense};

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
    /// Execute normally, complete after the delay.
    Delay(Duration),
    /// Do not execute and never complete.
    Never,
}

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
}

impl Fault {
    pub(crate) fn effect(&self) -> Effect {
        match *self {
            Fault::CheckCondition { key, asc, ascq } => {
                Effect::Replace(Completion::check_condition(Sense::new(key, (asc, ascq))))
            }
            Fault::Busy => Effect::Replace(Completion::status(status::BUSY)),
            Fault::TaskSetFull => Effect::Replace(Completion::status(status::TASK_SET_FULL)),
            Fault::Delay(d) => Effect::Defer(Action::After(d)),
            Fault::Never => Effect::Replace(Completion { action: Action::Never, ..Completion::good(0) }),
        }
    }
}
