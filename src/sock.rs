//! Unix sockets the daemon listens on (vhost-user and control): binding without stealing a
//! live socket, waiting for a connection that a stop request can interrupt, and turning
//! connections away when none can be set up (out of fds or memory) without spinning.

use log::{info, warn};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// Errors binding a socket.
#[derive(Debug, Error)]
pub enum SocketError {
    #[error("socket {0} is in use by a running daemon (stop it first, or pick another path)")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot bind socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
}

/// Binds a listening socket at `path` with permissions `mode`.
///
/// An existing socket nobody listens on (a daemon that crashed) is replaced; a live one is
/// never stolen, and a path that is not a socket is never removed.
pub fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener, SocketError> {
    if let Some(listener) = take_adopted(path) {
        return Ok(listener);
    }
    let bind_err = |source| SocketError::Bind {
        path: path.into(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket(path.into()))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse(path.into())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!("replacing stale socket {}", path.display());
                fs::remove_file(path).map_err(bind_err)?;
            }
            Err(source) => return Err(bind_err(source)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(bind_err(source)),
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    keep_spare_fd();
    Ok(listener)
}

/// Listening sockets inherited from whoever started us (`--fd`, socket activation), by path:
/// [`bind_socket`] hands the one at its path out (once) instead of binding, and the path is
/// never removed at a stop ([`is_adopted`]): the socket is its owner's, who may start us again
/// on it.
static ADOPTED: Mutex<Vec<(PathBuf, Option<UnixListener>)>> = Mutex::new(Vec::new());

fn adopted() -> std::sync::MutexGuard<'static, Vec<(PathBuf, Option<UnixListener>)>> {
    ADOPTED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers `listener`, an inherited socket listening at `path`, for [`bind_socket`].
pub fn adopt(path: &Path, listener: UnixListener) {
    adopted().push((path.to_path_buf(), Some(listener)));
}

fn take_adopted(path: &Path) -> Option<UnixListener> {
    adopted()
        .iter_mut()
        .find(|(p, l)| p == path && l.is_some())
        .and_then(|(_, l)| l.take())
}

/// Whether the socket at `path` was inherited (and so is not ours to remove).
pub fn is_adopted(path: &Path) -> bool {
    adopted().iter().any(|(p, _)| p == path)
}

/// A descriptor kept open to be closed when the process runs out of them, so that a pending
/// connection can still be accepted, and closed (see [`drop_pending`]).
static SPARE_FD: Mutex<Option<File>> = Mutex::new(None);

fn spare() -> std::sync::MutexGuard<'static, Option<File>> {
    SPARE_FD.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opens the spare descriptor if there is none.
fn keep_spare_fd() {
    let mut spare = spare();
    if spare.is_none() {
        *spare = File::open("/dev/null").ok();
    }
}

/// Turns away the connection pending on `listener`, if any: accepts it and closes it, so its
/// client sees a disconnect instead of waiting in the listen queue. Out of descriptors, it
/// closes the spare one to do so. Never blocks.
pub fn drop_pending(listener: BorrowedFd<'_>) {
    let mut fds = [libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    if !matches!(crate::sys::poll(&mut fds, Some(Duration::ZERO)), Ok(1)) {
        return;
    }
    match crate::sys::accept_and_close(listener) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
            let mut spare = spare();
            *spare = None;
            let _ = crate::sys::accept_and_close(listener);
            *spare = File::open("/dev/null").ok();
        }
        _ => {}
    }
}

/// Backs a server off while connections cannot be set up (out of fds, memory, threads):
/// each failure waits longer (from [`Backoff::FIRST`] to [`Backoff::MOST`]) before the next
/// try, and is logged once per burst (and once a minute while it lasts), so that a
/// server out of resources neither spins nor floods the log.
#[derive(Debug)]
pub struct Backoff {
    what: String,
    /// Failures in the current burst.
    failures: u64,
    /// When the burst was last logged.
    logged: Option<Instant>,
    delay: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(10);
    pub const MOST: Duration = Duration::from_secs(1);
    const LOG_EVERY: Duration = Duration::from_secs(60);

    /// A backoff for the server `what` (named in its log lines).
    pub fn new(what: &str) -> Self {
        Backoff {
            what: what.to_string(),
            failures: 0,
            logged: None,
            delay: Self::FIRST,
        }
    }

    /// A connection could not be set up (`err`): logs it if it starts a burst, then waits
    /// before the next try, unless `wake` is signalled (a stop).
    pub fn failed(&mut self, err: &dyn std::fmt::Display, wake: &EventFd) {
        self.failures += 1;
        if self.logged.is_none_or(|t| t.elapsed() >= Self::LOG_EVERY) {
            self.logged = Some(Instant::now());
            warn!(
                "{}: cannot set up a connection ({err}); turning connections away and \
                 backing off ({} failed so far)",
                self.what, self.failures
            );
        }
        let _ = wait_readable_until(wake.as_raw_fd(), wake, Some(self.delay));
        self.delay = (self.delay * 2).min(Self::MOST);
    }

    /// A connection was set up: the burst, if any, is over.
    pub fn succeeded(&mut self) {
        if self.failures > 0 {
            info!(
                "{}: connections are set up again, after {} failed",
                self.what, self.failures
            );
        }
        self.failures = 0;
        self.logged = None;
        self.delay = Self::FIRST;
    }

    /// Failures in the current burst.
    pub fn failures(&self) -> u64 {
        self.failures
    }
}

/// How a wait for a readable fd ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Wait {
    Readable,
    /// The wake event was signalled.
    Woken,
    TimedOut,
}

/// Blocks until `fd` is readable (true) or `wake` is signalled (false).
pub fn wait_readable(fd: RawFd, wake: &EventFd) -> bool {
    wait_readable_until(fd, wake, None) == Wait::Readable
}

/// Blocks until `fd` is readable, `wake` is signalled (which wins if both are), or
/// `timeout` passes (`None`: no limit).
pub fn wait_readable_until(fd: RawFd, wake: &EventFd, timeout: Option<Duration>) -> Wait {
    let start = Instant::now();
    loop {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let left = timeout.map(|t| t.saturating_sub(start.elapsed()));
        match crate::sys::poll(&mut fds, left) {
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                warn!("poll failed: {err}");
                return Wait::Woken;
            }
            Ok(0) => return Wait::TimedOut,
            Ok(_) => {}
        }
        if fds[1].revents != 0 {
            return Wait::Woken;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Wait::Readable;
        }
        if fds[0].revents != 0 {
            // POLLERR/POLLNVAL on the socket: waiting again would spin.
            warn!("poll reported {:#x} on a listening socket", fds[0].revents);
            return Wait::Woken;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_connections_are_turned_away_even_out_of_fds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = bind_socket(&path, 0o600).unwrap();
        use std::os::fd::AsFd;
        // Nothing pending: returns at once.
        drop_pending(listener.as_fd());
        let mut client = UnixStream::connect(&path).unwrap();
        drop_pending(listener.as_fd());
        let mut buf = [0u8; 1];
        assert_eq!(
            io::Read::read(&mut client, &mut buf).unwrap(),
            0,
            "disconnected"
        );
        assert!(spare().is_some(), "the spare fd is kept");
    }

    #[test]
    fn backoff_grows_and_a_stop_cuts_it_short() {
        let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut b = Backoff::new("test");
        let start = Instant::now();
        for _ in 0..3 {
            b.failed(&"EMFILE", &wake);
        }
        assert!(
            start.elapsed() >= Duration::from_millis(70),
            "10 + 20 + 40 ms"
        );
        assert_eq!(b.failures(), 3);
        wake.write(1).unwrap();
        let start = Instant::now();
        for _ in 0..20 {
            b.failed(&"EMFILE", &wake);
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "a stop does not wait"
        );
        b.succeeded();
        assert_eq!(b.failures(), 0);
    }
}
