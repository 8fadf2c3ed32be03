//! Block devices the daemon serves, behind one trait the queue workers call.
//!
//! A [`BlockDevice`] speaks bytes: offsets and lengths already validated against its capacity
//! by the virtio-blk layer. [`RawDevice`] serves a raw image file through [`Storage`].

use crate::storage::{FileStorage, Storage};
use std::io::{self, IoSlice, IoSliceMut};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;

/// Errors opening a device.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("{path} is empty: an origin image needs at least one {block}-byte block")]
    TooSmall { path: String, block: u32 },
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

/// A raw image file served as is: the origin when no snapshot engine is in use.
pub struct RawDevice {
    storage: Arc<dyn Storage>,
    capacity: u64,
    counters: IoCounters,
}

impl RawDevice {
    /// Opens `path`; the capacity is the file size rounded down to `block` bytes.
    pub fn open(path: &Path, read_only: bool, block: u32) -> Result<Self, DeviceError> {
        let storage = FileStorage::open(path, read_only).map_err(|source| DeviceError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let capacity = storage.size() / u64::from(block) * u64::from(block);
        if capacity == 0 {
            return Err(DeviceError::TooSmall {
                path: path.display().to_string(),
                block,
            });
        }
        Ok(Self::new(Arc::new(storage), capacity))
    }

    /// Serves `storage` with the given capacity.
    pub fn new(storage: Arc<dyn Storage>, capacity: u64) -> Self {
        RawDevice {
            storage,
            capacity,
            counters: IoCounters::default(),
        }
    }
}

impl BlockDevice for RawDevice {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        self.storage.read_vectored_at(bufs, offset)
    }

    fn write_vectored(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        self.storage.write_vectored_at(bufs, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.storage.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.storage.punch_hole(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            self.storage.punch_hole(offset, len)
        } else {
            self.storage.write_zeroes(offset, len)
        }
    }

    fn counters(&self) -> &IoCounters {
        &self.counters
    }
}

/// An in-memory device for unit tests, with switchable I/O failure.
#[cfg(test)]
pub mod mock {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    pub struct MemDevice {
        pub data: Mutex<Vec<u8>>,
        pub fail: AtomicBool,
        pub flushes: AtomicU64,
        counters: IoCounters,
    }

    impl MemDevice {
        pub fn new(len: usize) -> Self {
            MemDevice {
                data: Mutex::new((0..len).map(|i| (i / 512) as u8).collect()),
                fail: AtomicBool::new(false),
                flushes: AtomicU64::new(0),
                counters: IoCounters::default(),
            }
        }

        fn check(&self) -> io::Result<()> {
            if self.fail.load(Ordering::Relaxed) {
                Err(io::Error::from_raw_os_error(libc::EIO))
            } else {
                Ok(())
            }
        }
    }

    impl BlockDevice for MemDevice {
        fn capacity(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
            self.check()?;
            let data = self.data.lock().unwrap();
            let mut pos = offset as usize;
            for b in bufs.iter_mut() {
                let n = b.len();
                b.copy_from_slice(&data[pos..pos + n]);
                pos += n;
            }
            Ok(())
        }
        fn write_vectored(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
            self.check()?;
            let mut data = self.data.lock().unwrap();
            let mut pos = offset as usize;
            for b in bufs {
                data[pos..pos + b.len()].copy_from_slice(b);
                pos += b.len();
            }
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            self.check()?;
            self.flushes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            self.write_zeroes(offset, len, true)
        }
        fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
            self.check()?;
            self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn counters(&self) -> &IoCounters {
            &self.counters
        }
    }
}
