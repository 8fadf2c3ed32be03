//! Block devices the daemon serves, behind one trait the queue workers call.
//!
//! A [`BlockDevice`] speaks bytes: offsets and lengths already validated against its capacity
//! by the virtio-blk layer. The request path reads vhost -> device -> cow -> storage:
//! - [`raw`]: [`RawDevice`], a raw image served through [`Storage`](crate::storage::Storage)
//!   (`--no-cache`);
//! - [`cow`]: [`CowDevice`], one device (origin or snapshot) of the copy-on-write engine;
//! - `mock` (tests only): an in-memory device with switchable failures.

pub mod cow;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod raw;

pub use cow::CowDevice;
pub use raw::RawDevice;

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use thiserror::Error;

/// Errors opening a device.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("{path} is empty: an origin image needs at least one {block}-byte block")]
    TooSmall { path: String, block: u32 },
    /// Another daemon serves the image (see [`crate::storage::lock`]).
    #[error(transparent)]
    Lock(#[from] crate::storage::LockError),
}

/// A virtual disk that queue workers read and write concurrently.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn capacity(&self) -> u64;
    /// Fills `bufs` from `offset`.
    fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()>;
    /// Writes `bufs` at `offset`.
    fn write_vectored(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Deallocates a range; it may read as zeros or as old data afterwards (we give zeros).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes a range read as zeros; `unmap` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// Counters for stats.
    fn counters(&self) -> &IoCounters;
    /// Whether a write may wait for something concurrent writes can share (a metadata
    /// commit). Queue workers run slow writes concurrently only then: plain file writes that
    /// are slow (the kernel throttling dirty pages) go no faster side by side, and cost CPU.
    fn writes_may_wait(&self) -> bool {
        false
    }
}

/// Per-device I/O counters, updated with relaxed atomics (one cache line per device).
#[derive(Debug, Default)]
pub struct IoCounters {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub errors: AtomicU64,
}

impl IoCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
