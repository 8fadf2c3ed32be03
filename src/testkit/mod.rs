//! The shared test kit: what unit tests, integration tests (`tests/`) and benchmarks
//! (`benches/`) build on, in one place.
//!
//! Compiled only for tests and with the `test-utils` feature (which `tests/` and `benches/` get
//! through the crate's dev-dependency on itself): a release build contains none of it.
//!
//! - [`storage`]: in-memory, crash-injecting, counting and faulty (ENOSPC, EIO)
//!   [`Storage`](crate::storage::Storage) doubles.
//! - [`aligned`]: a store refusing transfers not aligned to 4 KiB (direct I/O, no bounce).
//! - [`gated`]: a store whose writes to a range wait until the test lets them go.
//! - [`engine`]: a copy-on-write engine over in-memory stores, or files in a temp dir.
//! - [`tokens`]: sectors that carry a 64-bit token, to tell which write a sector holds.
//! - [`blkio_client`]: a vhost-user-blk client (libblkio), the independent peer of the daemon.
//! - [`tmpfs`]: a small tmpfs mounted for a test, a file system that really fills up.
//! - [`loopdev`]: a loop device for a test: a real block device, 512 or 4096-byte sectors.
//! - [`nbd`]: the NBD tools (nbdinfo, nbdcopy, qemu-img) driven and parsed, and a raw NBD
//!   client for what the tools never send.
//! - [`fuse_disk`]: a FUSE file system that can lose power, under the real daemon.
//! - [`fuzz`]: case counts, an allocator that refuses unbounded allocations and a watchdog,
//!   for the fuzz harnesses (`tests/fuzz_*.rs`).
//! - [`frontend`]: a raw vhost-user frontend, message by message, to play a hostile one.
//! - [`remote`]: remote origins: an in-memory stand-in (counting, slow, failing on demand)
//!   and real NBD servers (qemu-nbd, nbdkit with its filters) as processes.

pub mod aligned;
pub mod blkio_client;
pub mod engine;
pub mod frontend;
pub mod fuse_disk;
pub mod fuzz;
pub mod gated;
pub mod loopdev;
pub mod nbd;
pub mod remote;
pub mod storage;
pub mod tmpfs;
pub mod tokens;
