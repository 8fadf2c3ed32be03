//! An in-memory device for tests, with switchable I/O failure.

use super::{BlockDevice, IoCounters};
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// A device of `len` bytes in memory; sector `i` starts filled with byte `i`. Set `fail` to make
/// every request fail with EIO; `flushes` counts flushes.
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
