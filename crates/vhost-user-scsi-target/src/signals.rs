//! Orderly exit on SIGINT and SIGTERM: the sockets we created are removed, so the next start on
//! the same path does not find a stale file.

use std::io;
use std::path::PathBuf;

/// Blocks SIGINT and SIGTERM in every thread and waits for them on a thread of their own.
/// Call before spawning any other thread, so all of them inherit the mask.
pub fn remove_on_exit(paths: Vec<PathBuf>) -> io::Result<()> {
    // SAFETY: sigset manipulation on a local set, then a mask change for this thread only;
    // threads spawned later inherit it. Nothing here touches memory we do not own.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        set
    };
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: sigwait reads the set and writes the signal number into a local.
        unsafe { libc::sigwait(&set, &mut sig) };
        for p in &paths {
            let _ = std::fs::remove_file(p);
        }
        std::process::exit(128 + sig);
    })?;
    Ok(())
}
