//! Device sizes at run time: [`CacheObject::resize_device`] (`snapblk resize`).
//!
//! Every device has a size of its own, recorded by a `Resize` record like any other metadata
//! change (format flag [`INCOMPAT_DEVICE_SIZES`], set with a checkpoint that carries every
//! device's size, so an older build refuses the file). A new snapshot takes its parent's.
//!
//! The view rule past a device's end: its read side has a `through` chunk from which an
//! unmapped chunk reads zeros instead of the origin (`table.rs`), so a snapshot grown past
//! what it inherited reads zeros there with no entry per chunk. What a device holds past its
//! end is never shown; growing it makes it so first:
//! - **grow** a snapshot: the rest of its last, short chunk is written with zeros and every
//!   chunk past its end that resolves to a cache block (given down by its parent, or kept
//!   from before a shrink) is zeroed, both through the write rule (its children keep their
//!   views); then the size is committed. No data is copied, except the fill of the short last
//!   chunk when it is shared (at most one chunk).
//! - **grow** the origin: a file is extended first (the new range reads zeros) and synced, a
//!   block device must already be that large (its administrator grew it) and the rest of its
//!   last short chunk is zeroed; then the size is committed.
//! - **shrink** (`force` only) changes the device's view of the cut range, so the write rule
//!   applies: the cut range is discarded through it (children reading the old data get it
//!   first: shared blocks, or one copy of an origin chunk), the device stops reading through
//!   past its new last chunk, the size is committed, and only then is an origin file cut.
//!
//! Locking: a shrink lowers `through` under the state lock but without the stripes (the one
//! change of resolved entries made so): it changes only chunks past the new end, which no
//! request checked against the new size reaches; one admitted before it (against the old
//! size) reads the old view or zeros there, and a write there is past the end once the size is
//! committed, its block zeroed before the device grows again.
//!
//! Crash safety: the size is one record, committed like the others; an origin file longer
//! than its recorded size at open is cut back to it (`open.rs`). After a crash the device has
//! its old size or its new one; an interrupted shrink may leave the old size with the cut
//! range already zeroed.

use super::engine::CacheObject;
use super::error::{CowError, DeviceId, Result};
use super::format::{Record, INCOMPAT_DEVICE_SIZES};
use super::write::Src;
use crate::storage::SECTOR_SIZE;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

/// Largest device size.
pub const MAX_DEVICE_SIZE: u64 = 1 << 56;
/// Passes over chunks a concurrent parent write mapped past the end again, before giving up.
const SETTLE_PASSES: usize = 8;

/// What a resize did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resized {
    pub old: u64,
    pub new: u64,
}

/// A device's new size: so many bytes, or its size at the time plus so many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewSize {
    To(u64),
    /// Grow by this much, from the size the device has when the resize runs (two at once
    /// both count: resizes run one at a time).
    GrowBy(u64),
}

impl CacheObject {
    /// Sets the size of device `dev` to `size` bytes (a non-zero multiple of 512). Growing is
    /// always allowed (the origin within what its image can hold); shrinking discards the cut
    /// range and is refused unless `force`. Durable on return. See the module comment.
    pub fn resize_device(&self, dev: DeviceId, size: u64, force: bool) -> Result<Resized> {
        self.resize_device_to(dev, NewSize::To(size), force)
    }

    /// [`CacheObject::resize_device`] to a size given absolutely or as growth.
    pub fn resize_device_to(&self, dev: DeviceId, new: NewSize, force: bool) -> Result<Resized> {
        let _one_at_a_time = self.resizing.lock().unwrap_or_else(PoisonError::into_inner);
        let old = {
            let st = self.read_state();
            Self::check_dev(&st.meta, dev.0)?;
            self.device_size(dev)?
        };
        let size = match new {
            NewSize::To(size) => size,
            // Saturated: past the largest size, refused below.
            NewSize::GrowBy(add) => old.saturating_add(add),
        };
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) || size > MAX_DEVICE_SIZE {
            return Err(CowError::InvalidOption(format!(
                "size {size} must be a non-zero multiple of 512 bytes, at most 2^56"
            )));
        }
        if dev == DeviceId::ORIGIN {
            self.check_origin_resizable(old, size)?;
        }
        let done = Resized { old, new: size };
        if size == old {
            return Ok(done);
        }
        if size < old && !force {
            return Err(CowError::InvalidOption(format!(
                "shrinking from {old} to {size} bytes discards the last {} bytes of the device \
                 (what it holds there is lost to it; its snapshots keep their views): give \
                 --force to do it",
                old - size
            )));
        }
        self.enable_device_sizes()?;
        if size > old {
            self.grow(dev, old, size)?;
        } else {
            self.shrink(dev, old, size)?;
        }
        log::info!("device {dev} resized from {old} to {size} bytes");
        Ok(done)
    }

    /// The origin can take `size`: not a remote image; a block device already that large.
    fn check_origin_resizable(&self, old: u64, size: u64) -> Result<()> {
        if self.cor.is_some() {
            return Err(CowError::Origin(
                "resized: it is a read-only remote image (resize its snapshots instead)",
            ));
        }
        if size > old && self.origin.fixed_size() {
            let room = self.origin.refresh_size()?;
            if size > room {
                return Err(CowError::InvalidOption(format!(
                    "the origin is a block device of {room} bytes: grow it first (lvextend, \
                     losetup -c, ...), then resize to at most that"
                )));
            }
        }
        Ok(())
    }

    /// Sets [`INCOMPAT_DEVICE_SIZES`] in the header, with a checkpoint that holds every
    /// device's size, before the first `Resize` record: an older build then refuses the file.
    fn enable_device_sizes(&self) -> Result<()> {
        self.enable_incompat(INCOMPAT_DEVICE_SIZES, |m, on| m.sized = on)
    }

    fn grow(&self, dev: DeviceId, old: u64, size: u64) -> Result<()> {
        let cs = self.chunk_size;
        let tail_end = old.next_multiple_of(cs).min(size);
        if dev == DeviceId::ORIGIN {
            // The image first: a crash before the commit leaves it longer than recorded,
            // which open cuts back.
            if self.origin.fixed_size() {
                if tail_end > old {
                    self.origin.write_zeroes(old, tail_end - old)?;
                }
            } else {
                self.origin.set_size(size).map_err(|e| {
                    CowError::InvalidOption(format!("cannot grow the origin image: {e}"))
                })?;
            }
            self.origin.sync()?;
        } else if tail_end > old {
            self.change_unchecked(dev, old, tail_end - old, Src::Trim)?;
        }
        self.commit_size(dev, old, size)
    }

    fn shrink(&self, dev: DeviceId, old: u64, size: u64) -> Result<()> {
        if dev == DeviceId::ORIGIN {
            // Snapshots reading the cut range get their copies first (the write rule).
            self.change_unchecked(dev, size, old - size, Src::Discard)?;
        }
        self.commit_size(dev, old, size)?;
        if dev == DeviceId::ORIGIN {
            // A held write past the new end must not land after the cut (it would extend
            // the file again).
            self.land_held()?;
        }
        if dev == DeviceId::ORIGIN && !self.origin.fixed_size() {
            // After the commit: a crash before this leaves the file longer than recorded.
            if let Err(e) = self.origin.set_size(size).and_then(|()| self.origin.sync()) {
                log::warn!("origin shrunk to {size} bytes, but its file could not be cut: {e}");
            }
        }
        Ok(())
    }

    /// Zeroes the cache blocks a snapshot `dev` resolves to in the chunks wholly between its
    /// old and new end, then logs and commits the new size once none is left there (a
    /// parent's write can give it one meanwhile: then again).
    fn commit_size(&self, dev: DeviceId, old: u64, size: u64) -> Result<()> {
        let cs = self.chunk_size;
        let (lo, hi) = (old.min(size), old.max(size));
        let first = lo.div_ceil(cs);
        let last = hi.div_ceil(cs);
        for _ in 0..SETTLE_PASSES {
            let epoch = {
                let mut st = self.write_state();
                let stray: Vec<u64> = match st.meta.dev(dev.0) {
                    Some(d) if dev != DeviceId::ORIGIN => d
                        .table
                        .blocks_from(first)
                        .into_iter()
                        .filter(|&c| c < last)
                        .collect(),
                    _ => Vec::new(),
                };
                if stray.is_empty() {
                    let e = st.log(Record::Resize { dev: dev.0, size })?;
                    if dev == DeviceId::ORIGIN {
                        self.origin_size.store(size, Ordering::Release);
                    }
                    Some(e)
                } else {
                    drop(st);
                    for c in stray {
                        self.change_unchecked(dev, c * cs, cs, Src::Trim)?;
                    }
                    None
                }
            };
            if let Some(e) = epoch {
                return self.commit(e, false);
            }
        }
        Err(CowError::InvalidOption(
            "the device kept being written past its end: try again".into(),
        ))
    }
}

#[cfg(test)]
#[path = "resize_tests.rs"]
mod tests;
