//! The byte streams NBD clients connect with (unix or TCP), and reading whole messages from
//! them with bounded patience: a client may stay idle between requests as long as it likes,
//! but one that stops in the middle of a message, or takes too long to negotiate, is dropped.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// How long a client may pause inside a message (and how long a reply may wait for the
/// client to read it) before it is considered gone.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected client.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    /// Another handle on the same connection (to end it from another thread).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }

    /// Prepares a new connection: replies that cannot be delivered within [`STALL_TIMEOUT`]
    /// fail; a TCP peer is probed when idle (so a vanished host frees its slot within minutes)
    /// and small replies are not delayed (Nagle off).
    pub fn configure(&self) -> io::Result<()> {
        self.set_write_timeout(Some(STALL_TIMEOUT))?;
        if let Stream::Tcp(s) = self {
            use rustix::net::sockopt;
            s.set_nodelay(true)?;
            sockopt::set_socket_keepalive(s, true)?;
            sockopt::set_tcp_keepidle(s, Duration::from_secs(60))?;
            sockopt::set_tcp_keepintvl(s, Duration::from_secs(10))?;
            sockopt::set_tcp_keepcnt(s, 6)?;
        }
        Ok(())
    }

    /// Who is connected, for logs.
    pub fn peer(&self) -> String {
        match self {
            Stream::Unix(_) => "unix client".to_string(),
            Stream::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "tcp client".to_string(), |a| a.to_string()),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Fills `buf`. Returns `Ok(false)` if the peer closed the connection before the first byte
/// (a clean end between messages). With `idle` the wait for the first byte is unbounded
/// (read timeouts before it are ignored); any pause after it longer than the stream's read
/// timeout is an error, as is an end in the middle.
pub fn read_message(stream: &mut impl Read, buf: &mut [u8], idle: bool) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) && got == 0 && idle => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Fills `buf` before `deadline` (an end or a pause is an error, as for [`read_message`]).
pub fn read_by(stream: &mut Stream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `bufs` (gathered: one system call for a header and its data).
pub fn write_all_vectored(stream: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match stream.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that yields its script one step per call.
    struct Script(Vec<io::Result<Vec<u8>>>);
    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Ok(0);
            }
            match self.0.remove(0) {
                Ok(b) => {
                    buf[..b.len()].copy_from_slice(&b);
                    Ok(b.len())
                }
                Err(e) => Err(e),
            }
        }
    }

    fn timeout() -> io::Result<Vec<u8>> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    #[test]
    fn idle_waits_are_fine_but_stalls_and_ends_inside_a_message_are_not() {
        let mut buf = [0u8; 4];
        let mut s = Script(vec![timeout(), timeout(), Ok(vec![1, 2]), Ok(vec![3, 4])]);
        assert!(read_message(&mut s, &mut buf, true).unwrap());
        assert_eq!(buf, [1, 2, 3, 4]);
        let mut s = Script(vec![Ok(vec![1]), timeout()]);
        assert!(
            read_message(&mut s, &mut buf, true).is_err(),
            "stall mid-message"
        );
        let mut s = Script(vec![timeout()]);
        assert!(
            read_message(&mut s, &mut buf, false).is_err(),
            "no idling allowed"
        );
        let mut s = Script(vec![]);
        assert!(!read_message(&mut s, &mut buf, true).unwrap(), "clean end");
        let mut s = Script(vec![Ok(vec![1, 2])]);
        assert!(
            read_message(&mut s, &mut buf, true).is_err(),
            "end mid-message"
        );
    }
}
