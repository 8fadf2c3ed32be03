//! snapblk: a vhost-user-blk daemon serving an origin image and space-optimized,
//! writable snapshots that share one cache object.
//!
//! Module layout, one job each (see README.md, "Architecture"):
//! - [`storage`]: positional I/O on files (and test doubles) behind one trait.
//! - [`virtio_blk`]: virtio-blk request parsing and validation; pure, transport-independent.
//! - [`device`]: the block-device trait queue workers call: the raw-file device, the
//!   copy-on-write device adapter.
//! - [`vhost`]: the vhost-user face: backend, queue workers, config space, listener loop.
//! - [`cow`]: the copy-on-write engine: snapshots sharing one cache object (docs/engine.md).
//! - [`control`]: the control socket: versioned JSON-lines protocol, server, the daemon's
//!   answers, client.
//! - [`nbd`]: the NBD face: every device exported for backup and inspection tools, with
//!   allocation, allocation-depth and changed-block (dirty bitmap) queries.
//! - [`daemon`]: the registry of devices and their lifecycle (serve, create, delete, restore);
//!   [`daemon_nbd`]: its NBD part (export, unexport, diff).
//! - [`sock`]: unix socket binding shared by the vhost and control servers.
//! - [`sys`]: thin wrappers over system calls and fd tricks the crates do not wrap.
//! - [`cli`]: command-line parsing, `serve`, and the administration commands.
//! - `testkit` (tests and the `test-utils` feature only): shared test fixtures.

pub mod cli;
pub mod control;
pub mod cow;
pub mod daemon;
pub mod daemon_nbd;
pub mod daemon_resize;
pub mod device;
pub mod nbd;
pub mod sock;
pub mod storage;
pub mod sys;
#[cfg(any(test, feature = "test-utils"))]
pub mod testkit;
pub mod vhost;
pub mod virtio_blk;
