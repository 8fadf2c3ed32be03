//! The errors the CLI reports, as one line each before exiting non-zero.

use std::path::PathBuf;
use thiserror::Error;

/// Errors the CLI reports as one line before exiting non-zero.
#[derive(Debug, Error)]
pub enum CliError {
    #[error("origin image {0} does not exist (pass --size to create it sparse)")]
    MissingOrigin(PathBuf),
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error(transparent)]
    Serve(#[from] crate::vhost::ServeError),
    #[error(transparent)]
    Socket(#[from] crate::sock::SocketError),
    /// Another daemon holds the origin or the cache object.
    #[error(transparent)]
    Lock(#[from] crate::storage::LockError),
    #[error("NBD server: {0}")]
    Nbd(#[from] crate::nbd::NbdError),
    /// A remote origin's URI or server.
    #[error(transparent)]
    Uri(#[from] crate::nbd::uri::UriError),
    #[error(transparent)]
    Remote(#[from] crate::storage::RemoteError),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Control(#[from] crate::control::client::ClientError),
    /// The daemon refused a request; the message is its own.
    #[error("{0}")]
    Refused(String),
    #[error("the daemon's reply does not have the expected shape: {0}")]
    Reply(#[source] serde_json::Error),
    #[error("cache object {path}: {source}")]
    Cache {
        path: PathBuf,
        #[source]
        source: crate::cow::CowError,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("flushing {path} at shutdown failed: {source}")]
    Flush {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("flushing {path} at shutdown failed: {source}")]
    FlushCache {
        path: PathBuf,
        #[source]
        source: crate::cow::CowError,
    },
}
