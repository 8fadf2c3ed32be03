//! The NBD face: every device exported over the Network Block Device protocol (fixed
//! newstyle, structured replies, metadata contexts), on a unix socket and optionally TCP,
//! for backup and inspection tools (qemu-img, nbdcopy, nbdinfo, libvirt).
//!
//! - [`proto`]: constants and fixed-layout messages; [`options`]: option payloads and their
//!   replies; [`chunks`]: structured reply payloads. Pure codecs over byte slices, both
//!   directions (a client can use them too).
//! - [`contexts`]: the metadata contexts (`base:allocation`, `qemu:allocation-depth`,
//!   `qemu:dirty-bitmap:NAME`) and the queries that list or select them.
//! - [`registry`]: the exports (device, mode) and the connections open on each; the daemon
//!   changes it, the server opens exports from it.
//! - [`export`]: what a connection does with an export: I/O through the device adapter and
//!   block-status answers from the engine's queries.
//! - [`handshake`], [`transmission`]: one connection's two phases; [`socket`]: its stream.
//! - [`server`]: listeners, connection threads, the connection limit.
//! - [`client`] (with [`client_handshake`], [`client_stream`], [`client_error`]): a client
//!   connection to another server's export, on the same codec, for a remote origin
//!   (`storage::RemoteStorage`); [`uri`]: NBD URIs.
//! - `error.rs`: [`NbdError`].

pub mod chunks;
pub mod client;
pub mod client_error;
pub mod client_handshake;
pub mod client_stream;
pub mod contexts;
mod error;
pub mod export;
pub mod handshake;
pub mod options;
pub mod proto;
pub mod registry;
pub mod server;
pub mod socket;
pub mod transmission;
pub mod uri;

pub use error::NbdError;
pub use registry::{Mode, Registry};
pub use server::{NbdOptions, NbdServer, MAX_CONNECTIONS};
