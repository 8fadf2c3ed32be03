//! The vhost-user face: the backend a frontend negotiates with, the queue workers that run
//! requests, and the server that keeps a socket open across connections.

mod backend;
mod server;
mod worker;

pub use backend::{BlkBackend, GuestMem, ServeOptions};
pub use server::{ConnectionStats, DaemonError, DeviceServer, ServeError};
