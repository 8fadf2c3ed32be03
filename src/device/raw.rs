//! [`RawDevice`]: a raw image served as is, with no snapshot engine (`serve --no-cache`).

use super::{BlockDevice, DeviceError, IoCounters};
use crate::storage::{FileStorage, LockKind, Storage};
use std::io::{self, IoSlice, IoSliceMut};
use std::path::Path;
use std::sync::Arc;

/// A raw image file served as is: the origin when no snapshot engine is in use.
pub struct RawDevice {
    storage: Arc<dyn Storage>,
    capacity: u64,
    counters: IoCounters,
}

impl RawDevice {
    /// Opens `path`, locked against other daemons (shared when `read_only`, else exclusive);
    /// the capacity is the file size rounded down to `block` bytes.
    pub fn open(path: &Path, read_only: bool, block: u32) -> Result<Self, DeviceError> {
        let storage = FileStorage::open(path, read_only).map_err(|source| DeviceError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let kind = if read_only {
            LockKind::Shared
        } else {
            LockKind::Exclusive
        };
        storage.lock(kind, path)?;
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
