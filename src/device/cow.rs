//! [`CowDevice`]: one device of the copy-on-write engine (the origin or a snapshot) as a
//! [`BlockDevice`].
//!
//! The engine works in whole sectors; virtio only promises whole sectors per request, not per
//! buffer, so buffers that split sectors go through a bounded bounce window. So do buffers
//! that do not meet direct I/O's alignment (memory, or a length that splits the device's
//! logical block): the window is aligned, so the engine gets nothing to bounce again.

use super::{BlockDevice, DirectTarget, IoCounters};
use crate::cow::{CacheObject, CowError, DeviceId, ReadFile, TransferHold};
use crate::storage::{AlignedBuf, Cursor, IoAlign, SECTOR_SIZE};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::RawFd;
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

/// Bounce window for requests whose buffers split sectors or blocks (a multiple of 4 KiB).
const BOUNCE_WINDOW: usize = 64 * 1024;

fn total_len(lens: impl Iterator<Item = usize>) -> usize {
    lens.sum()
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
    /// What direct I/O asks of the buffers ([`IoAlign::NONE`] without it).
    align: IoAlign,
}

impl CowDevice {
    pub fn new(engine: Arc<CacheObject>, id: DeviceId) -> Self {
        CowDevice {
            align: engine.io_align(),
            engine,
            id,
            counters: IoCounters::default(),
        }
    }

    /// Whether `bufs` at `offset` go to the engine as they are (whole sectors, and aligned for
    /// direct I/O; counted when it applies) rather than through the bounce window.
    fn in_place(&self, offset: u64, bufs: impl Iterator<Item = (usize, usize)> + Clone) -> bool {
        let whole = sector_sized(bufs.clone().map(|b| b.1));
        let ok = whole && self.align.fits(offset, bufs);
        if !self.align.is_none() {
            let c = &self.counters;
            IoCounters::add(if ok { &c.aligned } else { &c.bounced }, 1);
        }
        ok
    }
}

impl BlockDevice for CowDevice {
    /// The device's size now: a resize changes it (an atomic load).
    fn capacity(&self) -> u64 {
        self.engine.device_size(self.id).unwrap_or(0)
    }

    fn writes_may_wait(&self) -> bool {
        // A write may wait for a commit; with direct I/O every write waits for the device.
        self.engine.has_snapshots() || !self.align.is_none()
    }

    fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let fits = self.in_place(offset, bufs.iter().map(|b| (b.as_ptr() as usize, b.len())));
        if fits || (self.id == DeviceId::ORIGIN && self.align.is_none()) {
            return self
                .engine
                .read_vectored(self.id, offset, bufs)
                .map_err(cow_to_io);
        }
        // virtio only requires whole sectors per request, not per buffer: go through a bounce
        // window of bounded size (the guest chooses the request size, not our memory use).
        let total = total_len(bufs.iter().map(|b| b.len()));
        let mut window = AlignedBuf::zeroed(BOUNCE_WINDOW.min(total));
        let mut cursor = Cursor::default();
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
        if self.in_place(offset, bufs.iter().map(|b| (b.as_ptr() as usize, b.len()))) {
            let mut pos = offset;
            for buf in bufs {
                self.engine.write(self.id, pos, buf).map_err(cow_to_io)?;
                pos += buf.len() as u64;
            }
            return Ok(());
        }
        // As for reads: gather through a bounded window.
        let total = total_len(bufs.iter().map(|b| b.len()));
        let mut window = AlignedBuf::zeroed(BOUNCE_WINDOW.min(total));
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
        self.engine.flush_device(self.id).map_err(cow_to_io)
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

    fn io_align(&self) -> IoAlign {
        self.align
    }

    fn physical_block_size(&self) -> u32 {
        self.engine.block_sizes().1
    }

    /// The origin image: the origin's reads (and, with no snapshot, its writes) need nothing
    /// of the engine. A snapshot: the origin image and the cache object, for its reads (the
    /// engine says where each lies, [`CacheObject::snapshot_read_target`]).
    fn direct_files(&self) -> Vec<RawFd> {
        match (self.engine.origin_fd(), self.engine.cache_fd()) {
            (Some(origin), _) if self.id == DeviceId::ORIGIN => vec![origin],
            (Some(origin), Some(cache)) => vec![origin, cache],
            _ => Vec::new(),
        }
    }

    fn direct_target(&self, write: bool, offset: u64, len: u64) -> Option<DirectTarget> {
        if self.id != DeviceId::ORIGIN {
            if write {
                return None;
            }
            let (file, offset, hold) = self.engine.snapshot_read_target(self.id, offset, len)?;
            return Some(DirectTarget {
                file: match file {
                    ReadFile::Origin => 0,
                    ReadFile::Cache => 1,
                },
                offset,
                hold: Some(TransferHold::ChunkRead(hold)),
            });
        }
        let end = offset.checked_add(len)?;
        if end > self.engine.origin_size() {
            return None;
        }
        let hold = if write {
            Some(TransferHold::OriginWrite(
                self.engine.origin_write_ticket()?,
            ))
        } else {
            // Held origin writes (cow/held.rs) are waited for under their chunks' stripes.
            self.engine
                .origin_read_hold(offset, len)?
                .map(TransferHold::ChunkRead)
        };
        Some(DirectTarget {
            file: 0,
            offset,
            hold,
        })
    }
}
