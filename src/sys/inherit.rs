//! A listening socket inherited from whoever started us: `--fd N` (the vhost-user backend
//! program conventions) or systemd socket activation (`LISTEN_FDS`).

use std::io;
use std::os::fd::{AsFd, FromRawFd, RawFd};
use std::os::unix::net::UnixListener;

/// Takes over descriptor `fd` as a listening unix stream socket. Refused (and left alone)
/// unless it is open, a unix socket, of type `SOCK_STREAM` and listening.
pub fn inherited_listener(fd: RawFd) -> io::Result<UnixListener> {
    if fd < 3 {
        return Err(io::Error::other(format!(
            "descriptor {fd} is standard input, output or error"
        )));
    }
    // SAFETY: fcntl(F_GETFD) on any number only reads that descriptor's flags (EBADF when it
    // is not open); it takes no pointer.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open (checked above) and nothing else in this process owns it: it was
    // handed to us at exec, and the caller takes it once. If a check below fails it is not
    // ours to close, so ownership is given back (`into_raw_fd`) before returning.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    let checked = (|| {
        listener.local_addr()?; // fails unless AF_UNIX
        let sock = listener.as_fd();
        if rustix::net::sockopt::socket_type(sock)? != rustix::net::SocketType::STREAM {
            return Err(io::Error::other("not a stream socket"));
        }
        if !rustix::net::sockopt::socket_acceptconn(sock)? {
            return Err(io::Error::other("not listening"));
        }
        rustix::io::fcntl_setfd(sock, rustix::io::FdFlags::CLOEXEC)?;
        Ok(())
    })();
    match checked {
        Ok(()) => Ok(listener),
        Err(e) => {
            let _ = std::os::fd::IntoRawFd::into_raw_fd(listener);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn only_a_listening_unix_stream_socket_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let fd = UnixListener::bind(&path).unwrap().into_raw_fd();
        let l = inherited_listener(fd).unwrap();
        assert_eq!(l.local_addr().unwrap().as_pathname(), Some(path.as_path()));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = a.into_raw_fd();
        assert!(inherited_listener(fd).is_err(), "a connected socket");
        // Left open for its owner: closing it now succeeds exactly once.
        // SAFETY: `fd` is open and owned by this test.
        assert_eq!(unsafe { libc::close(fd) }, 0);
        let file = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
        assert!(inherited_listener(file).is_err(), "not a socket");
        // SAFETY: as above.
        assert_eq!(unsafe { libc::close(file) }, 0);
        assert!(inherited_listener(1).is_err());
        assert!(inherited_listener(1 << 20).is_err(), "not open");
    }
}
