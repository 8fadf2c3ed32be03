//! Why an NBD connection or the NBD server stopped.

use super::proto::ProtoError;
use crate::sock::SocketError;
use std::io;
use thiserror::Error;

/// Errors of the NBD server and of one connection (which end that connection only).
#[derive(Debug, Error)]
pub enum NbdError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("malformed message: {0}")]
    Proto(#[from] ProtoError),
    #[error("the client sent flags {0:#x}, which the server did not offer")]
    ClientFlags(u32),
    #[error("option {option} carries {len} bytes, more than the {max} allowed")]
    OptionTooBig { option: u32, len: u32, max: u32 },
    #[error("the client asked for export {0:?}, which does not exist, with NBD_OPT_EXPORT_NAME")]
    NoExport(String),
    #[error("the client sent more than {0} options")]
    TooManyOptions(usize),
    #[error("a write of {0} bytes is larger than the largest request allowed")]
    WriteTooBig(u32),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Socket(#[from] SocketError),
}
