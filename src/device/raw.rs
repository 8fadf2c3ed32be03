//! [`RawDevice`]: a raw image served as is, with no snapshot engine (`serve --no-cache`).

use super::{BlockDevice, DeviceError, DirectTarget, IoCounters};
use crate::storage::{FileStorage, IoAlign, LockKind, OpenFlags, Storage};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

/// A raw image file (or block device) served as is: the origin when no snapshot engine is in
/// use.
pub struct RawDevice {
    storage: Arc<dyn Storage>,
    capacity: u64,
    counters: IoCounters,
}

impl RawDevice {
    /// Opens `path` as `flags` say, locked against other daemons (shared when read-only, else
    /// exclusive); the capacity is its size rounded down to `block` bytes.
    pub fn open(path: &Path, flags: OpenFlags, block: u32) -> Result<Self, DeviceError> {
        let storage = FileStorage::open_with(path, flags).map_err(|source| DeviceError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let kind = if flags.read_only {
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

    /// The store it serves.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
}

impl BlockDevice for RawDevice {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let align = self.storage.io_align();
        let bufs_at = bufs.iter().map(|b| (b.as_ptr() as usize, b.len()));
        // Unaligned buffers are bounced by the store.
        self.counters.classify(align, offset, bufs_at);
        self.storage.read_vectored_at(bufs, offset)
    }

    fn write_vectored(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let align = self.storage.io_align();
        let bufs_at = bufs.iter().map(|b| (b.as_ptr() as usize, b.len()));
        self.counters.classify(align, offset, bufs_at);
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

    fn writes_may_wait(&self) -> bool {
        // With direct I/O every write waits for the device.
        !self.storage.io_align().is_none()
    }

    fn io_align(&self) -> IoAlign {
        self.storage.io_align()
    }

    fn physical_block_size(&self) -> u32 {
        self.storage.physical_block_size()
    }

    fn direct_files(&self) -> Vec<RawFd> {
        self.storage.raw_fd().into_iter().collect()
    }

    fn direct_target(&self, _write: bool, offset: u64, len: u64) -> Option<DirectTarget> {
        (offset.checked_add(len)? <= self.capacity).then_some(DirectTarget {
            file: 0,
            offset,
            hold: None,
        })
    }
}
