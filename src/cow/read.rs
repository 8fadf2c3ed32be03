//! The read path: [`CacheObject::read`] and [`CacheObject::read_vectored`]. Reads take no
//! engine-wide lock: the stripe locks of the chunks read, shared, then lock-free loads of the
//! device's read side (registry), its entries (page tree) and, where it reads through, the
//! origin's copy for its snapshot time (history). See the locking comment in `engine.rs`.
//!
//! A snapshot read is resolved a pass of up to [`PASS_CHUNKS`] chunks at a time, and chunks
//! whose data lies end to end in one file (reading through to the origin image, or cache
//! blocks that follow each other) are read with one vectored transfer: a fresh snapshot's
//! 1 MiB read is one read of the origin, not one per chunk, which under direct I/O is the
//! difference between one device request and sixteen in a row.

use super::devids;
use super::engine::{stripe_of, stripe_order, CacheObject, StripeReadGuard};
use super::error::{CowError, DeviceId, Result};
use super::format::ENTRY_UNMAPPED;
use super::meta::{ReadSide, ReadStatus, View};
use std::io::IoSliceMut;
use std::sync::Arc;

/// Most chunks one pass of a read resolves, holding their stripe locks, before it reads.
const PASS_CHUNKS: usize = 32;

/// Where a run of a read's bytes comes from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Source {
    /// The origin image, from this offset.
    Origin(u64),
    /// The cache object, from this offset.
    Cache(u64),
    Zero,
}

/// Bytes `at..at + len` of a request, from one source.
#[derive(Clone, Copy, Debug)]
struct Run {
    source: Source,
    at: usize,
    len: usize,
}

impl Run {
    /// Whether `source`, for the bytes that follow this run, continues it.
    fn continued_by(&self, source: Source) -> bool {
        let len = self.len as u64;
        match (self.source, source) {
            (Source::Origin(a), Source::Origin(b)) | (Source::Cache(a), Source::Cache(b)) => {
                a + len == b
            }
            (Source::Zero, Source::Zero) => true,
            _ => false,
        }
    }
}

impl CacheObject {
    /// Reads into several buffers from `offset` on (their total a multiple of 512).
    ///
    /// The origin's view is always the origin image itself (restore copies data into it), so
    /// an origin read is one vectored read of the image, with no lock and no table lookup: a
    /// read racing a write to the same range may see either, as on any disk. (A read-only
    /// origin copied on read is read like a snapshot: its local copies, or fetched.)
    pub fn read_vectored(
        &self,
        dev: DeviceId,
        offset: u64,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if dev == DeviceId::ORIGIN && self.cor.is_none() {
            self.check_range(self.origin_size(), offset, len)?;
            if self.held.any() {
                return self.read_origin_held(offset, len as usize, bufs);
            }
            self.origin.read_vectored_at(bufs, offset)?;
            return Ok(());
        }
        if let (DeviceId::ORIGIN, Some(cor)) = (dev, self.cor.as_deref()) {
            self.check_range(self.origin_size(), offset, len)?;
            let mut pos = offset;
            for buf in bufs.iter_mut() {
                self.read_origin_device(cor, pos, buf)?;
                pos += buf.len() as u64;
            }
            return Ok(());
        }
        // A guard, not an `Arc` clone: no shared counter for concurrent readers to contend on.
        let registry = self.registry.load();
        let side = Self::read_side(&registry, dev.0)?;
        self.check_range(side.size(), offset, len)?;
        if let Some(cor) = self.cor.as_deref() {
            let mut pos = offset;
            for buf in bufs.iter_mut() {
                self.read_fetching(cor, side, dev.0, pos, buf)?;
                pos += buf.len() as u64;
            }
            return Ok(());
        }
        let mut done = 0usize;
        let total = len as usize;
        while done < total {
            let pos = offset + done as u64;
            let first = pos >> self.chunk_shift;
            let end = ((first + PASS_CHUNKS as u64) << self.chunk_shift).min(offset + len);
            let n = (end - pos) as usize;
            let last = (end - 1) >> self.chunk_shift;
            // One chunk (most requests): its one stripe, without the array.
            let _stripe = (last == first).then(|| self.read_stripe(stripe_of(first)));
            let _stripes = (last != first).then(|| self.read_stripes(first, last));
            // A device made inoperative meanwhile may have lost blocks, which may have been
            // reused: fail rather than return another device's data, and wipe what was read so
            // it does not reach the caller's buffers either. (Deletion waits for reads under
            // the stripe locks; inoperative marking happens under one stripe only.)
            let read = Self::check_read_status(side, dev.0)
                .and_then(|()| self.read_pass(side, pos, done, n, bufs))
                .and_then(|()| Self::check_read_status(side, dev.0));
            if let Err(e) = read {
                with_range(bufs, done, n, fill_zero);
                return Err(e);
            }
            done += n;
        }
        Ok(())
    }

    /// An origin read while writes are held (`held.rs`): pass by pass under the chunks'
    /// stripes, shared, so that it waits for a held write there to land.
    fn read_origin_held(
        &self,
        offset: u64,
        total: usize,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Result<()> {
        let mut done = 0usize;
        while done < total {
            let pos = offset + done as u64;
            let first = pos >> self.chunk_shift;
            let end = ((first + PASS_CHUNKS as u64) << self.chunk_shift).min(offset + total as u64);
            let n = (end - pos) as usize;
            let last = (end - 1) >> self.chunk_shift;
            let _stripe = (last == first).then(|| self.read_stripe(stripe_of(first)));
            let _stripes = (last != first).then(|| self.read_stripes(first, last));
            with_range(bufs, done, n, |parts| {
                self.origin.read_vectored_at(parts, pos)
            })?;
            done += n;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of device `dev` at `offset` (both multiples of 512).
    pub fn read(&self, dev: DeviceId, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_vectored(dev, offset, &mut [IoSliceMut::new(buf)])
    }

    /// The stripe locks of chunks `first..=last` (at most [`PASS_CHUNKS`]), shared, each
    /// taken once and in ascending order, as batched writers take theirs (`write.rs`).
    fn read_stripes(&self, first: u64, last: u64) -> [Option<StripeReadGuard<'_>>; PASS_CHUNKS] {
        let (idx, n) = stripe_order::<PASS_CHUNKS>(first, (last - first + 1) as usize);
        let mut guards: [Option<StripeReadGuard<'_>>; PASS_CHUNKS] = Default::default();
        for (guard, &i) in guards.iter_mut().zip(&idx[..n]) {
            *guard = Some(self.read_stripe(i));
        }
        guards
    }

    /// Reads request bytes `at..at + len` (device offset `pos` on) with their chunks' stripe
    /// locks held: resolves each chunk, and reads each run of data lying end to end in one
    /// file with one transfer.
    fn read_pass(
        &self,
        side: &ReadSide,
        pos: u64,
        at: usize,
        len: usize,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Result<()> {
        let mut run: Option<Run> = None;
        let mut done = 0usize;
        while done < len {
            let p = pos + done as u64;
            let c = p >> self.chunk_shift;
            let inoff = p & (self.chunk_size - 1);
            let n = ((self.chunk_size - inoff) as usize).min(len - done);
            let source = match self.view(side, c) {
                View::Origin => Source::Origin(p),
                View::Zero => Source::Zero,
                View::Block(b) => Source::Cache(self.block_offset(b) + inoff),
            };
            match run.as_mut() {
                Some(r) if r.continued_by(source) => r.len += n,
                _ => {
                    if let Some(r) = run.take() {
                        self.read_run(r, bufs)?;
                    }
                    run = Some(Run {
                        source,
                        at: at + done,
                        len: n,
                    });
                }
            }
            done += n;
        }
        match run {
            Some(r) => self.read_run(r, bufs),
            None => Ok(()),
        }
    }

    fn read_run(&self, run: Run, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        with_range(bufs, run.at, run.len, |parts| match (run.source, parts) {
            (Source::Zero, parts) => {
                fill_zero(parts);
                Ok(())
            }
            // One buffer (most requests): a plain positional read.
            (Source::Origin(off), [one]) => self.origin.read_at(one, off),
            (Source::Cache(off), [one]) => self.cache.read_at(one, off),
            (Source::Origin(off), parts) => self.origin.read_vectored_at(parts, off),
            (Source::Cache(off), parts) => self.cache.read_vectored_at(parts, off),
        })?;
        Ok(())
    }

    /// A snapshot read of an engine whose origin is copied on read: chunk by chunk, without
    /// the stripe across a fetch (a read-only origin's data cannot change).
    fn read_fetching(
        &self,
        cor: &super::origin_copies::CopyOnRead,
        side: &ReadSide,
        dev: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let mut done = 0usize;
        // Bytes the local copies served (counted once, at the end).
        let mut local = 0u64;
        while done < buf.len() {
            let pos = offset + done as u64;
            let c = pos >> self.chunk_shift;
            let inoff = pos & (self.chunk_size - 1);
            let n = ((self.chunk_size - inoff) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            let stripe = self.read_stripe(stripe_of(c));
            Self::check_read_status(side, dev)?;
            match self.view(side, c) {
                View::Origin => {
                    drop(stripe);
                    if self.read_origin_chunk(cor, c, inoff as usize, piece)? {
                        local += n as u64;
                    }
                }
                View::Zero => piece.fill(0),
                View::Block(b) => self.cache.read_at(piece, self.block_offset(b) + inoff)?,
            }
            // As in `read_vectored`: a device made inoperative meanwhile fails the read.
            if let Err(e) = Self::check_read_status(side, dev) {
                piece.fill(0);
                return Err(e);
            }
            done += n;
        }
        Self::count_local(cor, local);
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

/// Calls `f` with the parts of `bufs` that hold request bytes `at..at + len`.
fn with_range<R>(
    bufs: &mut [IoSliceMut<'_>],
    at: usize,
    len: usize,
    f: impl FnOnce(&mut [IoSliceMut<'_>]) -> R,
) -> R {
    // The common case, one buffer: no allocation.
    if let [only] = bufs {
        return f(&mut [IoSliceMut::new(&mut only[at..at + len])]);
    }
    let mut parts = Vec::with_capacity(bufs.len());
    let (mut skip, mut left) = (at, len);
    for buf in bufs.iter_mut() {
        if left == 0 {
            break;
        }
        if skip >= buf.len() {
            skip -= buf.len();
            continue;
        }
        let take = (buf.len() - skip).min(left);
        parts.push(IoSliceMut::new(&mut buf[skip..skip + take]));
        skip = 0;
        left -= take;
    }
    f(&mut parts)
}

fn fill_zero(parts: &mut [IoSliceMut<'_>]) {
    for part in parts {
        part.fill(0);
    }
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

    /// Stripes in the order multi-stripe holders take them: ascending, each once, also where
    /// the chunks wrap around the stripe count.
    #[test]
    fn stripe_order_is_ascending_and_each_once() {
        use crate::cow::engine::{stripe_order, STRIPES};
        let first = (STRIPES - 2) as u64;
        let (idx, n) = stripe_order::<8>(first, 4);
        assert_eq!(&idx[..n], &[0, 1, STRIPES - 2, STRIPES - 1]);
        let (idx, n) = stripe_order::<8>(5, 1);
        assert_eq!(&idx[..n], &[5]);
    }

    /// A fresh snapshot's read over many chunks is one read of the origin per pass, not one
    /// per chunk.
    #[test]
    fn a_read_through_to_the_origin_is_one_transfer_per_pass() {
        use crate::testkit::storage::{CountingStorage, MemStorage};
        use std::sync::atomic::Ordering;
        let chunks = 2 * PASS_CHUNKS as u64;
        let origin = CountingStorage::new(chunks * CHUNK);
        let eng = mem_engine(0).on(origin.clone(), Arc::new(MemStorage::new(0)));
        let s = eng.create_snapshot(DeviceId::ORIGIN, "s", false).unwrap();
        let mut buf = vec![7u8; (chunks * CHUNK) as usize];
        origin.reads.store(0, Ordering::Relaxed);
        eng.read(s, 0, &mut buf).unwrap();
        assert_eq!(origin.reads.load(Ordering::Relaxed), 2, "one read per pass");
        assert!(buf.iter().all(|&b| b == 0));
        // Not chunk-aligned: still one read per pass it touches.
        origin.reads.store(0, Ordering::Relaxed);
        eng.read(s, 512, &mut buf[..(CHUNK * 3) as usize]).unwrap();
        assert_eq!(origin.reads.load(Ordering::Relaxed), 1);
    }

    /// A read over runs from every source (the origin, zeros, cache blocks end to end and not),
    /// through buffers that split sectors and chunks anywhere, over more than one pass, returns
    /// what chunk-by-chunk reads return.
    #[test]
    fn a_read_over_mixed_runs_matches_chunk_by_chunk_reads() {
        let chunks = PASS_CHUNKS as u64 + 8;
        let c = CHUNK as usize;
        let origin: Vec<u8> = (0..chunks as usize * c)
            .map(|i| (i / 512) as u8 | 1)
            .collect();
        let eng = mem_engine(0).origin(origin.clone()).build().engine;
        let s = eng.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
        let mut want = origin.clone();
        // Consecutive blocks (chunks 2-4), zeros (6), a lone block (9), a partial write (12).
        eng.write(s, 2 * CHUNK, &vec![0xa1; 3 * c]).unwrap();
        want[2 * c..5 * c].fill(0xa1);
        eng.write_zeroes(s, 6 * CHUNK, CHUNK).unwrap();
        want[6 * c..7 * c].fill(0);
        eng.write(s, 9 * CHUNK, &vec![0xb2; c]).unwrap();
        want[9 * c..10 * c].fill(0xb2);
        eng.write(s, 12 * CHUNK + 1024, &[0xc3; 1024]).unwrap();
        want[12 * c + 1024..12 * c + 2048].fill(0xc3);
        // The origin changes after the snapshot: s keeps the copies.
        eng.write(DeviceId::ORIGIN, 14 * CHUNK, &vec![0xd4; 2 * c])
            .unwrap();
        eng.write(DeviceId::ORIGIN, (chunks - 1) * CHUNK, &vec![0xd4; c])
            .unwrap();
        let mut one_by_one = vec![0u8; want.len()];
        for (k, piece) in one_by_one.chunks_mut(c).enumerate() {
            eng.read(s, k as u64 * CHUNK, piece).unwrap();
        }
        assert!(one_by_one == want, "chunk-by-chunk reads");
        let mut got = vec![0x55u8; want.len()];
        let cuts = [512, 512 + 3 * 512, 2 * c + 1024, 7 * c, 7 * c + 512, 20 * c];
        let mut parts = Vec::new();
        let mut rest = &mut got[..];
        let mut prev = 0;
        for cut in cuts {
            let (head, tail) = rest.split_at_mut(cut - prev);
            parts.push(IoSliceMut::new(head));
            rest = tail;
            prev = cut;
        }
        parts.push(IoSliceMut::new(rest));
        eng.read_vectored(s, 0, &mut parts).unwrap();
        drop(parts);
        assert!(got == want, "one vectored read");
        // Starting mid-chunk, ending mid-chunk.
        let mut mid = vec![0u8; 10 * c];
        eng.read(s, CHUNK + 512, &mut mid).unwrap();
        assert!(mid[..] == want[c + 512..11 * c + 512]);
    }
}
