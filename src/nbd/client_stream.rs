//! The client's byte stream to an NBD server: opened from a URI (unix or TCP), with a socket
//! timeout on every read and write, and an optional deadline for a whole exchange, so a server
//! that trickles its bytes cannot hold a request past it ([`Timed`]).

use super::socket::Stream;
use super::uri::{NbdUri, Transport};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Opens the stream `uri` names, with `timeout` for the connect and every later read or write.
pub fn open_stream(uri: &NbdUri, timeout: Duration) -> io::Result<Stream> {
    let stream = match &uri.transport {
        Transport::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
        Transport::Tcp { host, port } => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
            let mut found = None;
            for addr in (host.as_str(), *port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&addr, timeout) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = found.ok_or(last)?;
            s.set_nodelay(true)?;
            Stream::Tcp(s)
        }
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// A stream whose reads and writes fail with `TimedOut` once its deadline has passed (each
/// one is also bounded by the socket's timeout: a request ends at most one timeout after
/// its deadline).
#[derive(Debug)]
pub struct Timed {
    pub stream: Stream,
    pub deadline: Option<Instant>,
}

impl Timed {
    pub fn new(stream: Stream) -> Self {
        Timed {
            stream,
            deadline: None,
        }
    }

    fn check(&self) -> io::Result<()> {
        match self.deadline {
            Some(d) if Instant::now() >= d => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the server did not answer in time",
            )),
            _ => Ok(()),
        }
    }
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.check()?;
        self.stream.read(buf)
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.check()?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}
