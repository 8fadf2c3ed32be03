//! A remote origin for `snapblk serve`: `--origin nbd+unix:///EXPORT?socket=PATH` (or
//! `nbd://HOST[:PORT]/EXPORT`), its options, and connecting to its server.

use super::error::CliError;
use crate::nbd::uri::{is_nbd_uri, NbdUri};
use crate::storage::{RemoteOptions, RemoteStorage};
use clap::Args;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// `snapblk serve`'s options for a remote origin.
#[derive(Args, Debug, Clone)]
pub struct RemoteArgs {
    /// For a remote origin: how long a read that needs its server may take, retries
    /// included, before it fails with an I/O error (chunks already local are served anyway).
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub origin_timeout: u64,

    /// For a remote origin: most connections to its server (used when the server allows
    /// several: NBD_FLAG_CAN_MULTI_CONN).
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub origin_connections: u16,
}

/// The URI of a remote origin, if `--origin` names one; with the options that cannot go
/// with it refused.
pub fn remote_uri(
    origin: &Path,
    size: Option<u64>,
    no_cache: bool,
) -> Result<Option<NbdUri>, CliError> {
    let s = origin.to_string_lossy();
    if !is_nbd_uri(&s) {
        return Ok(None);
    }
    let uri = NbdUri::parse(&s)?;
    if size.is_some() {
        return Err(CliError::Usage(
            "--size does not apply to a remote origin (its server says its size)".into(),
        ));
    }
    if no_cache {
        return Err(CliError::Usage(
            "a remote origin needs a cache object (its chunks are copied into it): drop --no-cache"
                .into(),
        ));
    }
    Ok(Some(uri))
}

/// Connects to the remote origin's server.
pub fn connect(uri: NbdUri, args: &RemoteArgs) -> Result<Arc<RemoteStorage>, CliError> {
    let opts = RemoteOptions {
        timeout: Duration::from_secs(args.origin_timeout),
        connections: args.origin_connections.into(),
    };
    Ok(Arc::new(RemoteStorage::connect(uri, opts)?))
}
