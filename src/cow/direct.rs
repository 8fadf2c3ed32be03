//! What a queue submitting its own direct I/O (io_uring) needs from the engine: the files'
//! descriptors and alignment, leave for an origin write to bypass the engine, and where a
//! snapshot's read lies, with its chunk held.
//!
//! An origin read always may: the origin's view is the origin image (`read.rs`). An origin
//! write may only when nothing in the engine would care about it: no snapshot exists (so no
//! copy-out), every record is durable (a delete or an inoperative marking not yet durable
//! could bring a reader of the old data back after a crash), and no snapshot is being created
//! (the gate, `gate.rs`, which creation closes and waits on).
//!
//! A snapshot read whose chunks (up to [`MAX_HELD_CHUNKS`]) lie end to end in one file may
//! too, holding their stripe locks shared until the transfer completes ([`ChunkReadHold`]),
//! exactly as the engine's own read holds them across its read: no view of those chunks
//! changes meanwhile (the origin is not overwritten under a snapshot reading through to it),
//! and no block is freed or reused (the blocks a deleted or inoperative snapshot leaves are
//! released only after a barrier over the stripes, `engine.rs` `State::log`). The lock is only
//! ever *tried* here: a queue thread never waits on a stripe (a writer waiting for a read this
//! same queue has in flight would wait forever), it hands the request to the engine instead.

use super::engine::{stripe_of, CacheObject};
use super::error::DeviceId;
use super::gate::OriginWriteTicket;
use super::meta::View;
use crate::storage::IoAlign;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

/// Most chunks one snapshot read a queue submits itself may span (2 MiB at 64 KiB chunks).
pub const MAX_HELD_CHUNKS: u64 = 32;

type StripeHold = parking_lot::ArcRwLockReadGuard<parking_lot::RawRwLock, ()>;

/// A snapshot read's chunks, held (their stripe locks shared) until its transfer completes.
/// The device's status is checked when the read is resolved, not again after: while the
/// stripes are held, blocks a device made inoperative meanwhile left behind are not freed
/// (that waits for a barrier over the stripes, `commit.rs`), so the read returns the view it
/// resolved, never another device's data. (The same holds for a deleted device's blocks.)
#[derive(Debug)]
pub enum ChunkReadHold {
    /// One chunk (most reads): no allocation.
    One(StripeHold),
    Many(Vec<StripeHold>),
}

/// What a transfer a queue submits itself holds until it completes.
#[derive(Debug)]
pub enum TransferHold {
    /// An origin write bypassing the engine.
    OriginWrite(OriginWriteTicket),
    /// A snapshot read's chunk.
    ChunkRead(ChunkReadHold),
}

/// The file a snapshot read goes to (see [`CacheObject::snapshot_read_target`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFile {
    Origin,
    Cache,
}

impl CacheObject {
    /// What direct I/O asks of transfers to the origin and the cache object.
    pub fn io_align(&self) -> IoAlign {
        self.origin.io_align().max(self.cache.io_align())
    }

    /// The largest logical and physical block sizes of the origin and the cache object: the
    /// unit the devices are served in.
    pub fn block_sizes(&self) -> (u32, u32) {
        let lbs = self
            .origin
            .logical_block_size()
            .max(self.cache.logical_block_size());
        let pbs = self
            .origin
            .physical_block_size()
            .max(self.cache.physical_block_size());
        (lbs, pbs.max(lbs))
    }

    /// The origin's descriptor, for reads (and bypassing writes) a queue submits itself.
    pub fn origin_fd(&self) -> Option<RawFd> {
        self.origin.raw_fd()
    }

    /// The cache object's descriptor, for snapshot reads a queue submits itself; `None` when
    /// they must go through the engine (an origin copied on read: its reads may fetch).
    pub fn cache_fd(&self) -> Option<RawFd> {
        self.cor.is_none().then(|| self.cache.raw_fd()).flatten()
    }

    /// Where a read of snapshot `dev`, `len` bytes at `offset`, lies (a file and an offset in
    /// it) when its chunks' data lie end to end in one file (read through to the origin, or
    /// consecutive cache blocks), at most [`MAX_HELD_CHUNKS`] chunks; with those chunks held
    /// until the caller's transfer completes. `None` when the engine must do it (past the end,
    /// zeros, data in pieces, a device not operative, an origin copied on read, or a stripe
    /// not free right now).
    pub fn snapshot_read_target(
        &self,
        dev: DeviceId,
        offset: u64,
        len: u64,
    ) -> Option<(ReadFile, u64, ChunkReadHold)> {
        if dev == DeviceId::ORIGIN || self.cor.is_some() || len == 0 {
            return None;
        }
        let first = offset >> self.chunk_shift;
        let last = offset.checked_add(len - 1)? >> self.chunk_shift;
        if last - first >= MAX_HELD_CHUNKS {
            return None;
        }
        let registry = self.registry.load();
        let side = Self::read_side(&registry, dev.0).ok()?;
        self.check_range(side.size(), offset, len).ok()?;
        let hold = self.try_hold_chunks(first, last)?;
        Self::check_read_status(side, dev.0).ok()?;
        let inoff = offset & (self.chunk_size - 1);
        let start = match self.view(side, first) {
            View::Origin => (ReadFile::Origin, offset),
            View::Block(b) => (ReadFile::Cache, self.block_offset(b) + inoff),
            View::Zero => return None,
        };
        // Every later chunk must continue the first one's run in the same file.
        for (k, c) in (first + 1..=last).enumerate() {
            let at = start.1 + ((k as u64 + 1) << self.chunk_shift) - inoff;
            let continues = match self.view(side, c) {
                View::Origin => start.0 == ReadFile::Origin && at == c << self.chunk_shift,
                View::Block(b) => start.0 == ReadFile::Cache && at == self.block_offset(b),
                View::Zero => false,
            };
            if !continues {
                return None;
            }
        }
        Some((start.0, start.1, hold))
    }

    /// Chunks `first..=last`' stripes, shared, if each is free right now.
    fn try_hold_chunks(&self, first: u64, last: u64) -> Option<ChunkReadHold> {
        let stripe = |c: u64| self.stripes[stripe_of(c)].try_read_arc();
        Some(if first == last {
            ChunkReadHold::One(stripe(first)?)
        } else {
            // Tried, never waited for: no order to keep among them.
            ChunkReadHold::Many((first..=last).map(stripe).collect::<Option<_>>()?)
        })
    }

    /// What an origin read of `len` bytes at `offset` a queue submits itself must hold:
    /// nothing (`Some(None)`) unless origin writes are held (`held.rs`); then the chunks'
    /// stripes, if free right now and at most [`MAX_HELD_CHUNKS`]; `None`: the engine must
    /// read it (it waits for the held write to land).
    pub fn origin_read_hold(&self, offset: u64, len: u64) -> Option<Option<ChunkReadHold>> {
        if !self.held.any() {
            return Some(None);
        }
        let first = offset >> self.chunk_shift;
        let last = offset.checked_add(len.max(1) - 1)? >> self.chunk_shift;
        if last - first >= MAX_HELD_CHUNKS {
            return None;
        }
        self.try_hold_chunks(first, last).map(Some)
    }

    /// Leave for one origin write to go to the origin image directly, held until it completes;
    /// `None`: it must go through [`CacheObject::write`].
    pub fn origin_write_ticket(&self) -> Option<OriginWriteTicket> {
        if self.has_snapshots() || self.failed.load(Ordering::Relaxed) {
            return None;
        }
        let ticket = self.direct_gate.enter()?;
        // Checked again with the ticket held: a creation that began meanwhile waits for it,
        // one that finished is seen here.
        if self.has_snapshots() {
            return None;
        }
        let pending = self.read_state().epoch;
        // A held write must land before any later write of its range.
        (pending <= self.durable_epoch.load(Ordering::Acquire) && !self.held.any())
            .then_some(ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::engine::{mem_engine, CHUNK};
    use std::sync::mpsc;
    use std::time::Duration;

    /// Where a snapshot's reads lie: through to the origin at the same offset, its own block
    /// in the cache object; the engine's when zeros, across chunks, past the end or the origin.
    #[test]
    fn a_snapshot_read_target_is_its_view_of_the_chunk() {
        let eng = mem_engine(8).build().engine;
        let s = eng.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
        eng.write(s, 2 * CHUNK, &[3u8; CHUNK as usize]).unwrap();
        eng.write_zeroes(s, 4 * CHUNK, CHUNK).unwrap();
        let (file, off, _hold) = eng.snapshot_read_target(s, CHUNK + 512, 1024).unwrap();
        assert_eq!((file, off), (ReadFile::Origin, CHUNK + 512));
        let (file, off, hold) = eng.snapshot_read_target(s, 2 * CHUNK + 512, 512).unwrap();
        assert_eq!(file, ReadFile::Cache);
        let mut got = [0u8; 512];
        eng.cache.read_at(&mut got, off).unwrap();
        assert_eq!(got, [3u8; 512], "the block's bytes at that offset");
        drop(hold);
        assert!(
            eng.snapshot_read_target(s, 4 * CHUNK, 512).is_none(),
            "zeros"
        );
        // Across chunks: one run in one file, or the engine's.
        let (file, off, _hold) = eng.snapshot_read_target(s, CHUNK - 512, 1024).unwrap();
        assert_eq!(
            (file, off),
            (ReadFile::Origin, CHUNK - 512),
            "both read through"
        );
        assert!(
            eng.snapshot_read_target(s, 2 * CHUNK - 512, 1024).is_none(),
            "the origin, then a block"
        );
        eng.write(s, 3 * CHUNK, &[5u8; CHUNK as usize]).unwrap();
        let (file, off, _hold) = eng.snapshot_read_target(s, 2 * CHUNK, 2 * CHUNK).unwrap();
        assert_eq!(file, ReadFile::Cache, "two blocks end to end");
        let mut two = vec![0u8; 2 * CHUNK as usize];
        eng.cache.read_at(&mut two, off).unwrap();
        assert!(two[..CHUNK as usize].iter().all(|&b| b == 3));
        assert!(two[CHUNK as usize..].iter().all(|&b| b == 5));
        assert!(
            eng.snapshot_read_target(s, 3 * CHUNK, 2 * CHUNK).is_none(),
            "a block, then zeros"
        );
        let long = MAX_HELD_CHUNKS * CHUNK;
        let m = mem_engine(2 * MAX_HELD_CHUNKS).build().engine;
        let t = m.create_snapshot(DeviceId::ORIGIN, "t", false).unwrap();
        assert!(m.snapshot_read_target(t, 0, long).is_some());
        assert!(
            m.snapshot_read_target(t, 512, long).is_none(),
            "more chunks than are held at once"
        );
        assert!(
            eng.snapshot_read_target(s, 8 * CHUNK, 512).is_none(),
            "past the end"
        );
        assert!(eng.snapshot_read_target(s, 0, 0).is_none());
        assert!(eng.snapshot_read_target(DeviceId::ORIGIN, 0, 512).is_none());
        assert!(eng.snapshot_read_target(DeviceId(77), 0, 512).is_none());
    }

    /// A snapshot deleted while a read of its block is held: the block is not handed to
    /// another device's write (even once the deletion is durable) until the hold goes.
    #[test]
    fn a_deleted_snapshots_block_is_not_reused_while_a_read_holds_it() {
        let eng = std::sync::Arc::new(mem_engine(8).build().engine);
        let s = eng.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
        let t = eng.create_snapshot(DeviceId::ORIGIN, "t", true).unwrap();
        eng.write(s, CHUNK, &[3u8; CHUNK as usize]).unwrap();
        eng.flush().unwrap();
        let (file, held_at, hold) = eng.snapshot_read_target(s, CHUNK, 512).unwrap();
        assert_eq!(file, ReadFile::Cache);
        let spawn = |f: Box<dyn FnOnce(&CacheObject) + Send>| {
            let eng = eng.clone();
            std::thread::spawn(move || f(&eng))
        };
        let deleter = spawn(Box::new(move |e| e.delete_snapshot(s).unwrap()));
        std::thread::sleep(Duration::from_millis(50));
        let flusher = spawn(Box::new(|e| e.flush().unwrap()));
        let (tx, rx) = mpsc::channel();
        let writer = spawn(Box::new(move |e| {
            e.write(t, 5 * CHUNK, &[7u8; CHUNK as usize]).unwrap();
            tx.send(()).unwrap();
        }));
        if rx.recv_timeout(Duration::from_millis(300)).is_ok() {
            let (_, at, _h) = eng.snapshot_read_target(t, 5 * CHUNK, 512).unwrap();
            assert_ne!(at, held_at, "t's new block is the one a read still holds");
        }
        let mut got = [0u8; 512];
        eng.cache.read_at(&mut got, held_at).unwrap();
        assert_eq!(got, [3u8; 512], "the held block still holds s's data");
        drop(hold);
        for th in [deleter, flusher, writer] {
            th.join().unwrap();
        }
        eng.verify_in_memory().unwrap();
    }

    /// The hold keeps the chunk's view: an origin write there (which must copy the old data
    /// out for the snapshot first) waits until it goes; and while a writer has or waits for the
    /// stripe, no target is given (the caller never waits on a stripe).
    #[test]
    fn a_held_chunk_keeps_its_view_until_the_transfer_is_over() {
        let eng = std::sync::Arc::new(mem_engine(8).build().engine);
        let s = eng.create_snapshot(DeviceId::ORIGIN, "s", false).unwrap();
        let (file, off, hold) = eng.snapshot_read_target(s, CHUNK, 512).unwrap();
        assert_eq!((file, off), (ReadFile::Origin, CHUNK));
        let (tx, rx) = mpsc::channel();
        let writer = {
            let eng = eng.clone();
            std::thread::spawn(move || {
                eng.write(DeviceId::ORIGIN, CHUNK, &[9u8; 512]).unwrap();
                tx.send(()).unwrap();
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "the origin write waits for the held read"
        );
        // Still the origin image's old bytes at the offset the hold was given for.
        let mut got = [1u8; 512];
        eng.origin.read_at(&mut got, off).unwrap();
        assert_eq!(got, [0u8; 512]);
        // The writer waits for the stripe: no new target for that chunk, none blocks.
        assert!(eng.snapshot_read_target(s, CHUNK + 512, 512).is_none());
        drop(hold);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the write goes on once the hold is dropped");
        writer.join().unwrap();
        let (file, off, _hold) = eng.snapshot_read_target(s, CHUNK, 512).unwrap();
        assert_eq!(file, ReadFile::Cache, "s now reads its preserved copy");
        eng.cache.read_at(&mut got, off).unwrap();
        assert_eq!(got, [0u8; 512]);
    }
}
