//! [`StrictStorage`]: an in-memory store that behaves as direct I/O on a 4 KiB-sector device
//! would if nothing bounced: every transfer must have its memory, offset and length aligned
//! to 4 KiB, or it fails with EINVAL (and is recorded). Run the engine on it to show that its
//! own I/O (copies, fills, journal, checkpoints, headers, recovery) needs no bounce buffer.

use super::storage::MemStorage;
use crate::storage::{IoAlign, Storage};
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::{Mutex, PoisonError};

/// The alignment [`StrictStorage`] asks for.
pub const STRICT: IoAlign = IoAlign {
    memory: 4096,
    offset: 4096,
};

/// A memory store refusing any transfer not aligned to [`STRICT`].
#[derive(Debug, Default)]
pub struct StrictStorage {
    inner: MemStorage,
    /// What was refused, in order.
    refused: Mutex<Vec<String>>,
}

impl StrictStorage {
    /// A store of `size` zero bytes.
    pub fn new(size: u64) -> Self {
        StrictStorage {
            inner: MemStorage::new(size),
            refused: Mutex::default(),
        }
    }

    /// The transfers refused so far.
    pub fn refused(&self) -> Vec<String> {
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn check(&self, what: &str, offset: u64, bufs: &[(usize, usize)]) -> io::Result<()> {
        if STRICT.fits(offset, bufs.iter().copied()) {
            return Ok(());
        }
        let lens: Vec<usize> = bufs.iter().map(|b| b.1).collect();
        let addrs: Vec<usize> = bufs.iter().map(|b| b.0 % 4096).collect();
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(format!(
                "{what} at {offset} (block + {}), lengths {lens:?}, memory at page + {addrs:?}",
                offset % 4096
            ));
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> io::Result<()> {
        self.check(what, offset, &[(0, len as usize)])
    }
}

impl Storage for StrictStorage {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check("read", offset, &[(buf.as_ptr() as usize, buf.len())])?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check("write", offset, &[(buf.as_ptr() as usize, buf.len())])?;
        self.inner.write_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let v: Vec<(usize, usize)> = bufs
            .iter()
            .map(|b| (b.as_ptr() as usize, b.len()))
            .collect();
        self.check("readv", offset, &v)?;
        self.inner.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let v: Vec<(usize, usize)> = bufs
            .iter()
            .map(|b| (b.as_ptr() as usize, b.len()))
            .collect();
        self.check("writev", offset, &v)?;
        self.inner.write_vectored_at(bufs, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn set_size(&self, size: u64) -> io::Result<()> {
        self.check_range("set_size", size, 0)?;
        self.inner.set_size(size)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range("punch_hole", offset, len)?;
        self.inner.punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range("write_zeroes", offset, len)?;
        self.inner.write_zeroes(offset, len)
    }
    fn io_align(&self) -> IoAlign {
        STRICT
    }
    fn logical_block_size(&self) -> u32 {
        4096
    }
}
