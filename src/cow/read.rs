//! The read path: [`CacheObject::read`] and [`CacheObject::read_vectored`]. Reads take no
//! engine-wide lock: each chunk's stripe lock shared, then lock-free loads of the device's
//! read side (registry), its entry (page tree) and, where it reads through, the origin's copy
//! for its snapshot time (history). See the locking comment in `engine.rs`.

use super::devids;
use super::engine::CacheObject;
use super::error::{CowError, DeviceId, Result};
use super::format::ENTRY_UNMAPPED;
use super::meta::{ReadSide, ReadStatus, View};
use std::sync::{Arc, PoisonError};

impl CacheObject {
    /// Reads into several buffers from `offset` on: the vectored form of [`Self::read`].
    ///
    /// The origin's view is always the origin image itself (restore copies data into it), so
    /// an origin read is one vectored read of the image, with no lock and no table lookup: a
    /// read racing a write to the same range may see either, as on any disk. (A read-only
    /// origin copied on read is read like a snapshot: its local copies, or fetched.)
    pub fn read_vectored(
        &self,
        dev: DeviceId,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<()> {
        // An origin copied on read is read chunk by chunk, from its local copies.
        if dev == DeviceId::ORIGIN && self.cor.is_none() {
            let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
            self.check_range(self.origin_size(), offset, len)?;
            self.origin.read_vectored_at(bufs, offset)?;
            return Ok(());
        }
        let mut pos = offset;
        for buf in bufs.iter_mut() {
            self.read(dev, pos, buf)?;
            pos += buf.len() as u64;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of device `dev` at `offset` (both multiples of 512). Takes each
    /// chunk's stripe lock shared and no engine-wide lock: the device and its mapping are found
    /// by lock-free loads (registry, then the device's page tree).
    pub fn read(&self, dev: DeviceId, offset: u64, buf: &mut [u8]) -> Result<()> {
        if let (DeviceId::ORIGIN, Some(cor)) = (dev, self.cor.as_deref()) {
            self.check_range(self.origin_size(), offset, buf.len() as u64)?;
            return self.read_origin_device(cor, offset, buf);
        }
        // A guard, not an `Arc` clone: no shared counter for concurrent readers to contend on.
        let registry = self.registry.load();
        let side = Self::read_side(&registry, dev.0)?;
        self.check_range(side.size(), offset, buf.len() as u64)?;
        let mut done = 0usize;
        // Bytes a read-only origin's local copies served (counted once, at the end).
        let mut local = 0u64;
        while done < buf.len() {
            let pos = offset + done as u64;
            let c = pos >> self.chunk_shift;
            let inoff = pos & (self.chunk_size - 1);
            let n = ((self.chunk_size - inoff) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            let stripe = self
                .stripe(c)
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            Self::check_read_status(side, dev.0)?;
            match self.view(side, c) {
                View::Origin => match self.cor.as_deref() {
                    None => self.origin.read_at(piece, pos)?,
                    Some(cor) => {
                        // A read-only origin's data cannot change: no lock across the fetch.
                        drop(stripe);
                        if self.read_origin_chunk(cor, c, inoff as usize, piece)? {
                            local += n as u64;
                        }
                    }
                },
                View::Zero => piece.fill(0),
                View::Block(b) => self.cache.read_at(piece, self.block_offset(b) + inoff)?,
            }
            // A device made inoperative meanwhile may have lost that block, which may have been
            // reused: fail rather than return another device's data, and wipe what was read so
            // it does not reach the caller's buffer either. (Deletion waits for reads under the
            // stripe locks; inoperative marking happens under one stripe only.)
            if let Err(e) = Self::check_read_status(side, dev.0) {
                piece.fill(0);
                return Err(e);
            }
            done += n;
        }
        if let Some(cor) = self.cor.as_deref() {
            Self::count_local(cor, local);
        }
        Ok(())
    }

    /// Size of device `dev`, bytes (each device has its own: `resize.rs`).
    pub fn device_size(&self, dev: DeviceId) -> Result<u64> {
        if dev == DeviceId::ORIGIN {
            return Ok(self.origin_size());
        }
        let registry = self.registry.load();
        Ok(side_of(&registry, dev.0)?.size())
    }

    /// The read side of `dev` in a loaded registry.
    #[inline]
    pub(super) fn read_side(
        registry: &[Option<(u64, Arc<ReadSide>)>],
        dev: u64,
    ) -> Result<&ReadSide> {
        side_of(registry, dev)
    }

    #[inline]
    pub(super) fn check_read_status(side: &ReadSide, dev: u64) -> Result<()> {
        match side.status() {
            ReadStatus::Active => Ok(()),
            ReadStatus::Inoperative => Err(CowError::Inoperative(DeviceId(dev))),
            ReadStatus::Deleted => Err(CowError::NoDevice(DeviceId(dev))),
        }
    }

    /// What the device of `side` shows at chunk `c`: its resolved entry or, where it reads
    /// through to the origin, the origin's copy for its snapshot time. Lock-free; the caller
    /// holds `c`'s stripe lock, under which no device's entry or copy at `c` changes.
    #[inline]
    pub(super) fn view(&self, side: &ReadSide, c: u64) -> View {
        match side.resolved(c) {
            ENTRY_UNMAPPED => View::of_entry(self.history.lookup(c, side.otime())),
            e => View::of_entry(e),
        }
    }
}

/// The read side of `dev` in a loaded registry.
#[inline]
pub(super) fn side_of(registry: &[Option<(u64, Arc<ReadSide>)>], dev: u64) -> Result<&ReadSide> {
    devids::slot(dev)
        .and_then(|s| registry.get(s))
        .and_then(Option::as_ref)
        .filter(|(id, _)| *id == dev)
        .map(|(_, side)| &**side)
        .ok_or(CowError::NoDevice(DeviceId(dev)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cow::engine::{lock, Journal, State};
    use crate::testkit::engine::{mem_engine, CHUNK};
    use std::sync::{mpsc, MutexGuard, RwLockWriteGuard};
    use std::time::Duration;

    impl CacheObject {
        /// Holds every engine-wide lock (the state lock for writing and the journal mutex) for
        /// as long as the returned guards live: what a long commit or checkpoint does.
        fn hold_global_locks(&self) -> (RwLockWriteGuard<'_, State>, MutexGuard<'_, Journal>) {
            let j = lock(&self.journal);
            (self.write_state(), j)
        }
    }

    /// A snapshot read resolves its mapping under its chunk's stripe lock and lock-free loads
    /// only: it completes while another thread holds the state and journal locks.
    #[test]
    fn snapshot_read_takes_no_engine_wide_lock() {
        let eng = mem_engine(64).build().engine;
        eng.write(DeviceId::ORIGIN, 0, &[1u8; 3 * CHUNK as usize])
            .unwrap();
        let s1 = eng.create_snapshot(DeviceId::ORIGIN, "s1", true).unwrap();
        eng.write_zeroes(s1, CHUNK, CHUNK).unwrap();
        let s2 = eng.create_snapshot(s1, "s2", false).unwrap();
        // s1 and s2 read: chunk 0 a block (copied out), chunk 1 zeros, chunk 2 the origin.
        eng.write(DeviceId::ORIGIN, 0, &[2u8; CHUNK as usize])
            .unwrap();
        let eng = Arc::new(eng);
        let guards = eng.hold_global_locks();
        let (tx, rx) = mpsc::channel();
        let reader = {
            let eng = eng.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                for dev in [s1, s2] {
                    let mut buf = vec![9u8; 3 * CHUNK as usize];
                    eng.read(dev, 0, &mut buf).unwrap();
                    got.push(buf);
                }
                let _ = tx.send(got);
            })
        };
        let got = rx.recv_timeout(Duration::from_secs(5));
        drop(guards);
        reader.join().unwrap();
        let got = got.expect("snapshot read blocked on an engine-wide lock");
        for buf in got {
            let c = CHUNK as usize;
            assert!(
                buf[..c].iter().all(|&b| b == 1),
                "chunk 0: the copied block"
            );
            assert!(buf[c..2 * c].iter().all(|&b| b == 0), "chunk 1: zeros");
            assert!(buf[2 * c..].iter().all(|&b| b == 1), "chunk 2: the origin");
        }
    }
}
