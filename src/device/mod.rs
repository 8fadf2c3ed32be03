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

use crate::cow::TransferHold;
use crate::storage::IoAlign;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::RawFd;
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

    /// What direct I/O asks of the buffers of a read or write ([`IoAlign::NONE`] without
    /// direct I/O). Aligned guest buffers are used in place; others go through a bounce buffer.
    fn io_align(&self) -> IoAlign {
        IoAlign::NONE
    }

    /// The device's physical block size, a hint for the guest (topology).
    fn physical_block_size(&self) -> u32 {
        512
    }

    /// The files a queue may submit reads and writes to itself (io_uring, with direct I/O),
    /// open as long as the device lives; [`DirectTarget::file`] indexes them.
    fn direct_files(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// Where a read (or write) of `len` bytes at `offset` goes when it is one positional
    /// transfer of the request's buffers to one of [`BlockDevice::direct_files`], which a
    /// queue may then submit itself; `None` when it needs the device's own code
    /// ([`BlockDevice::read_vectored`], [`BlockDevice::write_vectored`]).
    fn direct_target(&self, write: bool, offset: u64, len: u64) -> Option<DirectTarget> {
        let _ = (write, offset, len);
        None
    }
}

/// A read or write a queue submits itself (see [`BlockDevice::direct_target`]).
#[derive(Debug)]
pub struct DirectTarget {
    /// Index into [`BlockDevice::direct_files`].
    pub file: usize,
    /// Offset in that file.
    pub offset: u64,
    /// Held until the transfer completes: an origin write's leave to bypass the engine, or a
    /// snapshot read's chunk.
    pub hold: Option<TransferHold>,
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
    /// With direct I/O: reads and writes whose guest buffers met the alignment and were used
    /// in place, and those that went through a bounce buffer.
    pub aligned: AtomicU64,
    pub bounced: AtomicU64,
    /// The most reads and writes one queue had in flight at once (its io_uring's depth).
    pub peak_in_flight: AtomicU64,
}

impl IoCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Raises `counter` to `n` if it is lower.
    pub fn raise(counter: &AtomicU64, n: u64) {
        counter.fetch_max(n, Ordering::Relaxed);
    }

    /// Whether a transfer at `offset` through `bufs` (address, length) meets `align`; counted
    /// as aligned or bounced when there is a requirement.
    pub fn classify(
        &self,
        align: IoAlign,
        offset: u64,
        bufs: impl IntoIterator<Item = (usize, usize)>,
    ) -> bool {
        if align.is_none() {
            return true;
        }
        let fits = align.fits(offset, bufs);
        Self::add(if fits { &self.aligned } else { &self.bounced }, 1);
        fits
    }
}
