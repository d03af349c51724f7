//! Per-request-queue counters, read by the control interface.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

#[derive(Default)]
pub struct QueueStats {
    pub requests: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub errors: AtomicU64,
    pub malformed: AtomicU64,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct QueueStatsSnapshot {
    pub requests: u64,
    /// Bytes sent to the frontend (data-in).
    pub bytes_in: u64,
    /// Bytes taken from the frontend (data-out).
    pub bytes_out: u64,
    /// Commands that ended in a status other than GOOD.
    pub errors: u64,
    /// Chains that were not well-formed requests.
    pub malformed: u64,
}

impl QueueStats {
    pub fn snapshot(&self) -> QueueStatsSnapshot {
        QueueStatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
        }
    }
}
