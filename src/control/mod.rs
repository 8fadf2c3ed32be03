//! The control plane: a local socket speaking JSON lines ([`protocol`]), its server, the
//! daemon's answers to each command ([`handler`]) and the client the CLI uses.

pub mod client;
pub mod handler;
pub mod protocol;
pub mod server;

pub use protocol::{Command, ErrorCode, Reply, Request};
pub use server::{ControlHandler, ControlServer};
