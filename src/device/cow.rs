//! [`CowDevice`]: one device of the copy-on-write engine (the origin or a snapshot) as a
//! [`BlockDevice`].
//!
//! The engine works in whole sectors; virtio only promises whole sectors per request, not per
//! buffer, so buffers that split sectors go through a bounded bounce window.

use super::{BlockDevice, IoCounters};
use crate::cow::{CacheObject, CowError, DeviceId};
use crate::storage::SECTOR_SIZE;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;

/// An engine error as an I/O error of the matching kind, keeping the engine error as its source.
fn cow_to_io(e: CowError) -> io::Error {
    let errno = match &e {
        CowError::ReadOnly(_) => libc::EROFS,
        CowError::NoSpace => libc::ENOSPC,
        CowError::OutOfRange { .. } => libc::EINVAL,
        _ => libc::EIO,
    };
    io::Error::new(io::Error::from_raw_os_error(errno).kind(), e)
}

/// Bounce window for requests whose buffers split sectors (a multiple of 512).
const BOUNCE_WINDOW: usize = 64 * 1024;

fn total_len(lens: impl Iterator<Item = usize>) -> usize {
    lens.sum()
}

/// A position in a list of buffers, for copying a window at a time.
#[derive(Default)]
struct Cursor {
    buf: usize,
    at: usize,
}

impl Cursor {
    /// Copies `src` into the buffers from the cursor on, advancing it.
    fn scatter(&mut self, bufs: &mut [IoSliceMut<'_>], mut src: &[u8]) {
        while !src.is_empty() && self.buf < bufs.len() {
            let dst = &mut bufs[self.buf][self.at..];
            let n = dst.len().min(src.len());
            dst[..n].copy_from_slice(&src[..n]);
            src = &src[n..];
            self.advance(n, bufs[self.buf].len());
        }
    }

    /// Fills `dst` from the buffers from the cursor on, advancing it.
    fn gather(&mut self, bufs: &[IoSlice<'_>], mut dst: &mut [u8]) {
        while !dst.is_empty() && self.buf < bufs.len() {
            let src = &bufs[self.buf][self.at..];
            let n = src.len().min(dst.len());
            dst[..n].copy_from_slice(&src[..n]);
            dst = &mut dst[n..];
            self.advance(n, bufs[self.buf].len());
        }
    }

    fn advance(&mut self, n: usize, len: usize) {
        self.at += n;
        if self.at == len {
            self.buf += 1;
            self.at = 0;
        }
    }
}

/// Whether every buffer is whole sectors (the engine's unit).
fn sector_sized(mut lens: impl Iterator<Item = usize>) -> bool {
    lens.all(|l| (l as u64).is_multiple_of(SECTOR_SIZE))
}

/// An engine device as a block device.
pub struct CowDevice {
    engine: Arc<CacheObject>,
    id: DeviceId,
    counters: IoCounters,
}

impl CowDevice {
    pub fn new(engine: Arc<CacheObject>, id: DeviceId) -> Self {
        CowDevice {
            engine,
            id,
            counters: IoCounters::default(),
        }
    }
}

impl BlockDevice for CowDevice {
    fn capacity(&self) -> u64 {
        self.engine.origin_size()
    }

    fn writes_may_wait(&self) -> bool {
        self.engine.has_snapshots()
    }

    fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        if self.id == DeviceId::ORIGIN || sector_sized(bufs.iter().map(|b| b.len())) {
            return self
                .engine
                .read_vectored(self.id, offset, bufs)
                .map_err(cow_to_io);
        }
        // virtio only requires whole sectors per request, not per buffer: go through a bounce
        // window of bounded size (the guest chooses the request size, not our memory use).
        let mut window = vec![0u8; BOUNCE_WINDOW.min(total_len(bufs.iter().map(|b| b.len())))];
        let mut cursor = Cursor::default();
        let total = total_len(bufs.iter().map(|b| b.len()));
        let mut pos = 0usize;
        while pos < total {
            let n = window.len().min(total - pos);
            self.engine
                .read(self.id, offset + pos as u64, &mut window[..n])
                .map_err(cow_to_io)?;
            cursor.scatter(bufs, &window[..n]);
            pos += n;
        }
        Ok(())
    }

    fn write_vectored(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        if sector_sized(bufs.iter().map(|b| b.len())) {
            let mut pos = offset;
            for buf in bufs {
                self.engine.write(self.id, pos, buf).map_err(cow_to_io)?;
                pos += buf.len() as u64;
            }
            return Ok(());
        }
        // As for reads: gather through a bounded window.
        let total = total_len(bufs.iter().map(|b| b.len()));
        let mut window = vec![0u8; BOUNCE_WINDOW.min(total)];
        let mut cursor = Cursor::default();
        let mut pos = 0usize;
        while pos < total {
            let n = window.len().min(total - pos);
            cursor.gather(bufs, &mut window[..n]);
            self.engine
                .write(self.id, offset + pos as u64, &window[..n])
                .map_err(cow_to_io)?;
            pos += n;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.engine.flush().map_err(cow_to_io)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.engine.discard(self.id, offset, len).map_err(cow_to_io)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        // An engine discard reads back as zeros and deallocates (holes in the origin, zero
        // mappings in snapshots), so it serves write-zeroes when the driver allows unmapping.
        if unmap {
            self.engine.discard(self.id, offset, len)
        } else {
            self.engine.write_zeroes(self.id, offset, len)
        }
        .map_err(cow_to_io)
    }

    fn counters(&self) -> &IoCounters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_moves_windows_across_odd_buffers() {
        let src: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let (a, b, c) = (
            src[..1000].to_vec(),
            src[1000..4096].to_vec(),
            src[4096..].to_vec(),
        );
        let bufs = [IoSlice::new(&a), IoSlice::new(&b), IoSlice::new(&c)];
        // Gather in windows of 3000 bytes (straddling every boundary), then scatter back.
        let mut cursor = Cursor::default();
        let mut flat = Vec::new();
        let mut window = [0u8; 3000];
        let mut left = src.len();
        while left > 0 {
            let n = left.min(window.len());
            cursor.gather(&bufs, &mut window[..n]);
            flat.extend_from_slice(&window[..n]);
            left -= n;
        }
        assert_eq!(flat, src);
        let (mut x, mut y, mut z) = (vec![0u8; 1000], vec![0u8; 3096], vec![0u8; 5904]);
        let mut out = [
            IoSliceMut::new(&mut x),
            IoSliceMut::new(&mut y),
            IoSliceMut::new(&mut z),
        ];
        let mut cursor = Cursor::default();
        for part in src.chunks(3000) {
            cursor.scatter(&mut out, part);
        }
        assert_eq!([x, y, z].concat(), src);
    }
}
