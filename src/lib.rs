//! snapblk: a vhost-user-blk daemon serving an origin image and space-optimized,
//! writable snapshots that share one cache object.
//!
//! Module layout, one job each (see README.md, "Architecture"):
//! - [`storage`]: positional I/O on files (and test doubles) behind one trait.
//! - [`virtio_blk`]: virtio-blk request parsing and validation; pure, transport-independent.
//! - [`device`]: the block devices the daemon serves (the raw origin today).
//! - [`vhost`]: the vhost-user face: backend, queue workers, config space, listener loop.
//! - [`cli`]: command-line parsing and the `serve` command.

pub mod cli;
pub mod control;
pub mod device;
pub mod sock;
pub mod storage;
pub mod vhost;
pub mod virtio_blk;
