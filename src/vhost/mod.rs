//! The vhost-user face: the backend a frontend negotiates with, the queue workers that run
//! requests, the scheduler that batches them, and the server that keeps a socket open across
//! connections.
//!
//! Files depend downwards only: `server` → `backend` → `queue` → `sched` → `request` → `guest`.
//! - `guest`: guest buffers as host iovecs that own their memory (the only raw-pointer code).
//! - `request`: one request, from parse to its single completion step.
//! - `sched`: the batching policy and the thread pools, owned by the daemon ([`Scheduler`]).
//! - `queue`: draining a ring and notifying the driver.
//! - `backend`: the `VhostUserBackend` of one connection.
//! - `server`: the listener loop, connection after connection.

mod backend;
mod guest;
mod queue;
mod request;
mod sched;
mod server;
#[cfg(test)]
mod test_rig;

pub use backend::{BlkBackend, ServeOptions};
pub use guest::GuestMem;
pub use sched::{ModeRule, Scheduler, SchedulerConfig, SplitRule};
pub use server::{ConnectionStats, DaemonError, DeviceServer, ServeError};
