//! The shared test kit: what unit tests, integration tests (`tests/`) and benchmarks
//! (`benches/`) build on, in one place.
//!
//! Compiled only for tests and with the `test-utils` feature (which `tests/` and `benches/` get
//! through the crate's dev-dependency on itself): a release build contains none of it.
//!
//! - [`storage`]: in-memory and crash-injecting [`Storage`](crate::storage::Storage) doubles.
//! - [`engine`]: a copy-on-write engine over in-memory stores, or files in a temp dir.
//! - [`tokens`]: sectors that carry a 64-bit token, to tell which write a sector holds.
//! - [`blkio_client`]: a vhost-user-blk client (libblkio), the independent peer of the daemon.
//! - [`frontend`]: a raw vhost-user frontend, message by message, to play a hostile one.

pub mod blkio_client;
pub mod engine;
pub mod frontend;
pub mod storage;
pub mod tokens;
