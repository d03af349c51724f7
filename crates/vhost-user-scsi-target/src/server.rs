//! Accepts frontends on the vhost-user socket, one at a time, each served by a fresh
//! `VhostUserDaemon` around the shared device, so a frontend can reconnect after it drops.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use log::{info, warn};
use vhost::vhost_user::Listener;

use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};

use crate::blk::BlkBackend;
use crate::device::ScsiBackend;

/// What the socket loop needs of a device: a daemon for each connection, and word when one ends.
pub trait Device: VhostUserBackend<Bitmap = (), Vring: Clone + Send + Sync> + Clone + 'static {
    fn new_daemon(&self) -> Result<VhostUserDaemon<Self>, vhost_user_backend::Error>;
    fn end_connection(&self);
}

impl Device for ScsiBackend {
    fn new_daemon(&self) -> Result<VhostUserDaemon<Self>, vhost_user_backend::Error> {
        ScsiBackend::new_daemon(self)
    }

    fn end_connection(&self) {
        ScsiBackend::end_connection(self)
    }
}

impl Device for BlkBackend {
    fn new_daemon(&self) -> Result<VhostUserDaemon<Self>, vhost_user_backend::Error> {
        BlkBackend::new_daemon(self)
    }

    fn end_connection(&self) {
        BlkBackend::end_connection(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("socket {path}: a file already exists there (remove it, or pick another path)")]
    SocketExists { path: PathBuf },
    #[error("socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
}

pub struct Server {
    listener: UnixListener,
    path: PathBuf,
}

impl Server {
    /// Binds the socket. An existing file at `path` is an error rather than silently replaced:
    /// it may belong to another running target.
    pub fn bind(path: &Path) -> Result<Server, ServerError> {
        if path.symlink_metadata().is_ok() {
            return Err(ServerError::SocketExists { path: path.to_owned() });
        }
        let listener =
            UnixListener::bind(path).map_err(|source| ServerError::Bind { path: path.to_owned(), source })?;
        Ok(Server { listener, path: path.to_owned() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves frontends until the process ends.
    pub fn run<D: Device>(&self, backend: &D) -> Result<(), ServerError> {
        loop {
            let clone = self.listener.try_clone().map_err(|e| ServerError::Daemon(e.to_string()))?;
            let mut listener = Listener::from(clone);
            let mut daemon = backend.new_daemon().map_err(|e| ServerError::Daemon(e.to_string()))?;
            daemon.start(&mut listener).map_err(|e| ServerError::Daemon(e.to_string()))?;
            info!("frontend connected");
            match daemon.wait() {
                Ok(()) => info!("frontend disconnected"),
                Err(e) => warn!("frontend connection ended: {e}"),
            }
            backend.end_connection();
        }
    }

    /// Cuts the current frontend connection, as a crashed target would. The backend crate owns
    /// the connection and exposes no handle to it, so it is found among our descriptors: the
    /// one connected socket whose local address is our socket path.
    pub fn disconnect(path: &Path, listener_fd: RawFd) -> io::Result<usize> {
        let mut cut = 0;
        for entry in std::fs::read_dir("/proc/self/fd")? {
            let Ok(fd) = entry?.file_name().to_string_lossy().parse::<RawFd>() else { continue };
            if fd == listener_fd || !is_accepted_on(fd, path) {
                continue;
            }
            // SAFETY: shutdown only changes the state of a socket we own; the fd stays open and
            // valid for its owner, which sees end-of-file and tears the connection down.
            if unsafe { libc::shutdown(fd, libc::SHUT_RDWR) } == 0 {
                cut += 1;
            }
        }
        Ok(cut)
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

/// Whether `fd` is a connected (not listening) unix socket bound to `path`.
fn is_accepted_on(fd: RawFd, path: &Path) -> bool {
    // SAFETY: plain queries on a descriptor number: getsockname writes at most `len` bytes into
    // the local address buffer and getsockopt into the int; a stale fd only yields an error.
    unsafe {
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::getsockname(fd, &mut addr as *mut _ as *mut libc::sockaddr, &mut len) != 0
            || addr.sun_family != libc::AF_UNIX as libc::sa_family_t
        {
            return false;
        }
        let mut listening: libc::c_int = 0;
        let mut olen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        if libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            &mut listening as *mut _ as *mut libc::c_void,
            &mut olen,
        ) != 0
            || listening != 0
        {
            return false;
        }
        let bytes: Vec<u8> = addr.sun_path.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        use std::os::unix::ffi::OsStrExt;
        bytes == path.as_os_str().as_bytes()
    }
}
