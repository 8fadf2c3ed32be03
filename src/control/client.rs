//! The control client the CLI uses: one request line out, one reply line back.

use super::protocol::{Reply, Request};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use thiserror::Error;

/// Errors talking to the daemon.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error(
        "cannot reach the daemon at {path}: {source} (is `snapblk serve` running? see --control)"
    )]
    Connect { path: String, source: io::Error },
    #[error("control connection: {0}")]
    Io(#[from] io::Error),
    #[error("cannot encode the request: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("the daemon closed the connection before replying")]
    Closed,
    #[error("the daemon sent a reply we cannot read: {source}: {line}")]
    BadReply {
        line: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A connection to a daemon's control socket.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(600)))?;
        let writer = stream.try_clone()?;
        Ok(ControlClient {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends one request and waits for its reply.
    pub fn call(&mut self, request: &Request) -> Result<Reply, ClientError> {
        let line = serde_json::to_string(request).map_err(ClientError::Encode)?;
        writeln!(self.writer, "{line}")?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(ClientError::Closed);
        }
        serde_json::from_str(&reply).map_err(|source| ClientError::BadReply {
            line: reply.trim().to_string(),
            source,
        })
    }
}
