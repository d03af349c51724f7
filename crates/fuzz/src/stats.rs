//! Outcome counters, to see how deep the inputs reach: printed after each target when
//! `VIRTIO_FUZZ_STATS=1` is set, free otherwise.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static ON: AtomicBool = AtomicBool::new(false);
static COUNTS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

pub fn enable_from_env() {
    ON.store(std::env::var_os("VIRTIO_FUZZ_STATS").is_some_and(|v| v == "1"), Ordering::Relaxed);
}

/// Counts one occurrence of `what`.
pub fn hit(what: &'static str) {
    if ON.load(Ordering::Relaxed) {
        *COUNTS.lock().unwrap_or_else(|e| e.into_inner()).entry(what).or_default() += 1;
    }
}

/// Prints and clears the counters.
pub fn report(target: &str) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let mut counts = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
    for (what, n) in counts.iter() {
        eprintln!("  {target}: {what}: {n}");
    }
    counts.clear();
}
