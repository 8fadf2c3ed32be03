//! The vhost-user face: the backend a frontend negotiates with, the queue workers that run
//! requests, the scheduler that batches them, and the server that keeps a socket open across
//! connections.
//!
//! Files depend downwards only: `server` → `connection` → `backend` → `queue` → `sched` →
//! `request` → `guest` → `view` → `dirty`; `backend` also uses `memory`, and `backend` and
//! `queue` use `vring`.
//! - `guest`: guest buffers as host iovecs that own their memory.
//! - `view`: the workers' view of guest memory, the frontend's mappings without the dirty log.
//! - `dirty`: the dirty-page log of a live migration, and the marks the workers make in it.
//! - `handover`: which connection's rings run (a migration's source, then its destination).
//! - `request`: one request, from parse to its single completion step.
//! - `sched`: the batching policy and the thread pools, owned by the daemon ([`Scheduler`]);
//!   `iopool`: the I/O pool its batches run on (threads that park when idle).
//! - `vring`: the vrings, whose kick and call fds a frontend cannot make us block on.
//! - `memory`: the guest memory the workers see, once a frontend's table passed its checks.
//! - `queue`: draining a ring and notifying the driver.
//! - `backend`: the `VhostUserBackend` of one connection; `backend_channel`: its backend
//!   request channel, for config-change messages (a resize).
//! - `connection`: one connection built, watched and torn down, releasing all it made.
//! - `server`: the listener loop, connection after connection.

mod backend;
mod backend_channel;
mod connection;
mod dirty;
mod error;
mod guest;
mod handover;
mod iopool;
mod memory;
mod pipeline;
mod poll;
mod pooled;
mod pressure;
mod queue;
mod request;
mod sched;
mod server;
#[cfg(test)]
mod test_rig;
mod uring;
mod view;
mod vring;

pub use backend::{BlkBackend, ServeOptions};
pub use error::{DaemonError, ServeError};
pub use guest::GuestMem;
pub use sched::{IoEngine, ModeRule, Scheduler, SchedulerConfig, SplitRule};
pub use server::{ConnectionStats, DeviceServer};
pub use uring::probe as probe_io_uring;
