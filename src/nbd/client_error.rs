//! Why an NBD client request or connection failed ([`ClientError`]): shared by the client's
//! transmission (`client.rs`) and its handshake (`client_handshake.rs`).

use super::proto::ProtoError;
use std::io;
use thiserror::Error;

/// Why a request or a connection failed.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("malformed message from the server: {0}")]
    Proto(#[from] ProtoError),
    #[error("the server broke the protocol: {0}")]
    BadReply(String),
    #[error("the server does not offer what snapblk needs: {0}")]
    Unsupported(String),
    #[error("the server refused: {0}")]
    Refused(String),
    /// The server reported an error for this request (the connection goes on).
    #[error("the server failed the request: errno {errno}: {message}")]
    Server { errno: u32, message: String },
}

impl ClientError {
    /// Whether the connection is no longer usable (anything but an error the server
    /// reported for one request).
    pub fn breaks_connection(&self) -> bool {
        !matches!(self, ClientError::Server { .. })
    }
}
