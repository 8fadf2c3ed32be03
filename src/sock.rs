//! Unix sockets the daemon listens on (vhost-user and control): binding without stealing a
//! live socket, and waiting for a connection that a stop request can interrupt.

use log::{info, warn};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
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
    Ok(listener)
}

/// Blocks until `fd` is readable (true) or `wake` is signalled (false).
pub fn wait_readable(fd: RawFd, wake: &EventFd) -> bool {
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
        if let Err(err) = crate::sys::poll(&mut fds, None) {
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            warn!("poll failed: {err}");
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return true;
        }
    }
}
