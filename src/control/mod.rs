//! The control plane: a local socket speaking JSON lines ([`protocol`]), its server and the
//! client the CLI uses.

pub mod client;
pub mod protocol;
pub mod server;

pub use protocol::{Command, ErrorCode, Reply, Request};
pub use server::{ControlHandler, ControlServer};
