//! The data-block I/O of the write path: the origin's chunk copied out for its readers (at
//! once, or staged for the commit that maps it, `staged.rs`), a new block filled for a
//! snapshot's write, a snapshot's in-place write into its own block, and the origin's own
//! write.
//!
//! A write to the cache object here comes before any record that would map its block is
//! committed (a staged copy's record is logged, but its commit writes the copy first), so
//! when the host refuses it (ENOSPC, EIO, ...) memory and disk still agree: the engine goes
//! on, and the failure is a space failure ([`CowError::NoSpace`] for lack of space,
//! [`CowError::CacheWrite`] otherwise), handled by the cache-full rule (docs/engine.md,
//! "Cache full"); a staged copy's failure fails the snapshots mapping its block by records
//! that commit with its own. It is logged once per episode, not per request. Reads that fail
//! (the origin or an old block) fail the request alone.

use super::engine::{CacheObject, State, StateGuard};
use super::error::{CowError, Result};
use super::format::{entry_block, Record};
use super::meta::View;
use super::meta::ORIGIN_ID;
use super::metaio::io_block;
use super::prealloc::WINDOW_BYTES;
use super::staged::StagedCopy;
use super::write::{Piece, Readers, Src};
use crate::storage::AlignedBuf;
use std::io::{self, IoSlice};
use std::sync::atomic::Ordering;

/// Most blocks one write of staged copies takes (under the kernel's 1024 buffers per call).
const RUN_BLOCKS: usize = 256;

/// Whether an I/O error says the file system had no room (rather than failing otherwise).
fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG)
    ) || e.kind() == io::ErrorKind::StorageFull
}

impl CacheObject {
    /// A data-block write the host refused: counted, logged once per episode, and turned into
    /// the space failure it is.
    pub(super) fn cache_write_failed(&self, e: io::Error) -> CowError {
        self.counters
            .cache_write_errors
            .fetch_add(1, Ordering::Relaxed);
        if is_no_space(&e) {
            if !self.host_full.swap(true, Ordering::Relaxed) {
                log::error!(
                    "the cache object's file system is full ({e}): snapshots that need space \
                     go inoperative, writes to writable snapshots wait or fail; the origin \
                     carries on"
                );
            }
            return CowError::NoSpace;
        }
        if !self.host_failing.swap(true, Ordering::Relaxed) {
            log::error!(
                "writing a data block to the cache object failed ({e}): handled as no space \
                 (snapshots that need the block go inoperative, a snapshot write fails); the \
                 block is not reused"
            );
        }
        CowError::CacheWrite(e)
    }

    /// Writes `buf` at the start of block `b`.
    pub(super) fn write_block(&self, buf: &[u8], b: u64) -> Result<()> {
        self.take_space(b);
        match self.cache.write_at(buf, self.block_offset(b)) {
            Ok(()) => {
                self.cache_write_ok();
                Ok(())
            }
            Err(e) => Err(self.cache_write_failed(e)),
        }
    }

    /// Under direct I/O, takes the file system's space for block `b` (and those after it) a
    /// window ahead of its write (`prealloc.rs`).
    fn take_space(&self, b: u64) {
        if !self.cache.io_align().is_none() {
            let window = WINDOW_BYTES / self.chunk_size;
            self.prealloc.prepare(b, window, |from, upto| {
                let len = (upto - from) * self.chunk_size;
                self.cache.allocate(self.block_offset(from), len)
            });
        }
    }

    /// A data-block write succeeded: an episode of refused writes is over.
    pub(super) fn cache_write_ok(&self) {
        if self.host_full.load(Ordering::Relaxed) && self.host_full.swap(false, Ordering::Relaxed) {
            log::info!("the cache object's file system takes writes again");
        }
        if self.host_failing.load(Ordering::Relaxed) {
            self.host_failing.store(false, Ordering::Relaxed);
        }
    }

    /// Writes the origin image in place; an error fails the request alone.
    pub(super) fn write_origin(&self, pos: u64, len: u64, src: Src<'_>) -> Result<()> {
        match src {
            Src::Data(buf) => self.origin.write_at(buf, pos)?,
            Src::Zeroes | Src::Trim => self.origin.write_zeroes(pos, len)?,
            Src::Discard => self.origin.punch_hole(pos, len)?,
        }
        Ok(())
    }

    /// Writes the piece into the device's own block `b`. The block has its space already,
    /// except on file systems that allocate on overwrite; a refusal fails the request alone.
    pub(super) fn write_in_place(&self, b: u64, piece: Piece<'_>) -> Result<()> {
        let pos = self.block_offset(b) + piece.inoff as u64;
        let written = match piece.src {
            Src::Data(buf) => self.cache.write_at(buf, pos),
            Src::Zeroes | Src::Discard | Src::Trim => {
                self.cache.write_zeroes(pos, piece.len as u64)
            }
        };
        written.map_err(|e| self.cache_write_failed(e))
    }

    /// Writes a new block: the piece, plus (for a partial write) the rest from the old view.
    pub(super) fn fill_new_block(
        &self,
        piece: Piece<'_>,
        nb: u64,
        old: View,
        full: bool,
    ) -> Result<()> {
        let c = piece.c;
        if full {
            // A whole-chunk write never reads the old data.
            if let Src::Data(buf) = piece.src {
                self.write_block(buf, nb)?;
            }
            return Ok(());
        }
        let clen = self.chunk_len(c);
        // Aligned memory, and the block written whole: past the origin image's end (its
        // short last chunk, or a device grown past it) the block holds zeros, never what a
        // freed block held before (a device grown later shows it: `resize.rs`).
        let mut buf = AlignedBuf::zeroed(self.chunk_size as usize);
        match old {
            View::Origin => self.read_origin_view(c, &mut buf[..clen])?,
            View::Zero => {}
            View::Block(b) => self.cache.read_at(&mut buf, self.block_offset(b))?,
        }
        let range = piece.inoff..piece.inoff + piece.len;
        match piece.src {
            Src::Data(d) => buf[range].copy_from_slice(d),
            Src::Zeroes | Src::Discard | Src::Trim => buf[range].fill(0),
        }
        self.write_block(&buf, nb)?;
        self.counters.cow_fills.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// `n` bytes of a data block rounded up to the cache's I/O block (within the chunk): the
    /// length to read or write a short last chunk of the origin with (`metaio.rs`).
    pub(super) fn cache_io_len(&self, n: usize) -> usize {
        let block = io_block(self.cache.as_ref()) as usize;
        (n.div_ceil(block) * block).min(self.chunk_size as usize)
    }

    /// The origin image's chunk `c`, whole: read from the image, or for an origin copied on
    /// read, from its local copy (fetched if need be).
    fn read_origin_view(&self, c: u64, buf: &mut [u8]) -> Result<()> {
        match self.cor.as_deref() {
            None => self.origin.read_at(buf, c << self.chunk_shift)?,
            Some(cor) => {
                if self.read_origin_chunk(cor, c, 0, buf)? {
                    Self::count_local(cor, buf.len() as u64);
                }
            }
        }
        Ok(())
    }

    /// Writes every staged copy, until none is left; a copy the host refuses fails the
    /// snapshots that map its block. For a commit, journal lock held, before it takes the
    /// records (see the module doc).
    pub(super) fn write_staged(&self) -> Result<()> {
        loop {
            let copies = self.write_state().staged.take();
            if copies.is_empty() {
                return Ok(());
            }
            let bytes = copies.iter().map(|s| s.data.len()).sum();
            let lost = self.write_copies(copies);
            self.stage_budget.release(bytes);
            if !lost.is_empty() {
                let mut st = self.write_state();
                for (chunk, block, e) in lost {
                    self.fail_lost_copy(&mut st, chunk, block, &e)?;
                }
            }
        }
    }

    /// Writes `copies`, runs of consecutive blocks in one call each; returns the chunk, block
    /// and error of those the host refused.
    fn write_copies(&self, mut copies: Vec<StagedCopy>) -> Vec<(u64, u64, CowError)> {
        copies.sort_by_key(|s| s.block);
        let mut lost = Vec::new();
        let mut rest = &copies[..];
        while let Some(first) = rest.first() {
            let n = rest
                .iter()
                .zip(first.block..)
                .take(RUN_BLOCKS)
                .take_while(|(s, b)| s.block == *b)
                .count();
            let (run, after) = rest.split_at(n);
            rest = after;
            let bufs: Vec<IoSlice<'_>> = run.iter().map(|s| IoSlice::new(&s.data)).collect();
            let at = self.block_offset(first.block);
            self.counters.copy_writes.fetch_add(1, Ordering::Relaxed);
            if self.cache.write_vectored_at(&bufs, at).is_ok() {
                self.cache_write_ok();
                continue;
            }
            // Which of them the host refuses: one at a time.
            for s in run {
                match self.cache.write_at(&s.data, self.block_offset(s.block)) {
                    Ok(()) => self.cache_write_ok(),
                    // Logged once per episode; the snapshots it fails, each once.
                    Err(e) => lost.push((s.chunk, s.block, self.cache_write_failed(e))),
                }
            }
        }
        lost
    }

    /// The copy for `block` at `chunk` is lost (`e`): every snapshot mapping it (and those
    /// reading through them) goes inoperative, as when no block was left for the copy. A block
    /// the host failed otherwise than for lack of space (EIO) is not reused until the next
    /// open, as [`CacheObject::give_back`] does.
    fn fail_lost_copy(&self, st: &mut State, chunk: u64, block: u64, e: &CowError) -> Result<()> {
        self.fail_readers(st, chunk, View::Block(block))?;
        if matches!(e, CowError::CacheWrite(_)) {
            if let Some(i) = st.fenced_free.iter().position(|&(_, b)| b == block) {
                st.fenced_free.swap_remove(i);
                st.quarantined += 1;
            }
        }
        Ok(())
    }

    /// A copy of the origin's chunk `c` is made: written, or staged for its commit.
    fn count_copy(&self, c: u64) {
        self.counters.copies.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_copied
            .fetch_add(self.chunk_len(c) as u64, Ordering::Relaxed);
    }

    /// Step 1's copy: the origin's chunk `c` into the new block `nb`, with the state lock
    /// dropped, then given to the readers still there. If the host refuses the copy, the
    /// readers are failed as when there is no block (after one commit, if that frees some).
    pub(super) fn copy_for_readers<'a>(
        &'a self,
        st: StateGuard<'a>,
        dev: u64,
        c: u64,
        nb: u64,
        space_retried: &mut bool,
    ) -> Result<Readers<'a>> {
        // Counted until its record is logged: a commit meanwhile waits to take it along.
        let _in_flight = self.copy_outs.begin();
        // The origin's write waits for the commit of this copy's record (or is held until it),
        // keeping the chunk's stripe: that commit writes the copy (`staged.rs`).
        drop(st);
        let reserved = if dev == ORIGIN_ID {
            self.stage_budget.reservation(self.chunk_size as usize, || {
                self.cache.host_space().map(|s| s.available)
            })
        } else {
            None
        };
        let copied = if reserved.is_some() {
            // Its space taken now, as `write_block` would: the commit writes it.
            self.take_space(nb);
            self.read_origin_copy(c).map(Some)
        } else {
            self.copy_origin_chunk(c, nb).map(|()| None)
        };
        let mut st = self.write_state();
        let copied = copied.and_then(|data| Self::check_dev(&st.meta, dev).map(|()| data));
        let staged = match copied {
            Ok(data) => data,
            Err(e) => {
                Self::give_back(&mut st, nb, &e);
                if matches!(e, CowError::NoSpace) && !*space_retried && !st.pending_free.is_empty()
                {
                    // The file system gets the blocks freed by records not yet durable back when
                    // a commit makes them durable and punches them out.
                    *space_retried = true;
                    return Ok(Readers::CommitFirst(st.epoch));
                }
                if dev == ORIGIN_ID && e.is_space_failure() {
                    // The host refused the copy: as with no block, the readers it was for fail.
                    let e = self.fail_unpreservable(&mut st, c)?;
                    return Ok(Readers::Served(st, Some(e)));
                }
                return Err(e);
            }
        };
        if !st.meta.view_shared(dev, c) {
            Self::free_unused(&mut st, nb);
            return Ok(Readers::Served(st, None));
        }
        let entry = entry_block(nb);
        let rec = if dev == ORIGIN_ID {
            // Stamped now: a snapshot taken during the copy shares it,
            // as the origin chunk could not change meanwhile.
            Record::Preserve {
                chunk: c,
                time: st.meta.clock,
                entry,
            }
        } else {
            Record::ShareDown {
                dev,
                chunk: c,
                entry,
            }
        };
        let e = st.log(rec)?;
        if let (Some(data), Some(reserved)) = (staged, reserved) {
            st.staged.push(e, c, nb, data);
            reserved.staged();
            self.count_copy(c);
        }
        Ok(Readers::Served(st, Some(e)))
    }

    /// Copies the origin's chunk `c` into block `b`.
    pub(super) fn copy_origin_chunk(&self, c: u64, b: u64) -> Result<()> {
        let buf = self.read_origin_copy(c)?;
        self.write_block(&buf, b)?;
        self.count_copy(c);
        Ok(())
    }

    /// The copy of the origin's chunk `c`, read, to be written (now, or staged for the next
    /// commit, `staged.rs`).
    fn read_origin_copy(&self, c: u64) -> Result<AlignedBuf> {
        let n = self.chunk_len(c);
        // The whole block: zeros past the image's end (see `fill_new_block`).
        let mut buf = AlignedBuf::zeroed(self.chunk_size as usize);
        self.read_origin_view(c, &mut buf[..n])?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use crate::cow::{check_cache, CacheObject, CowError, DeviceId, DeviceState, OpenOptions};
    use crate::testkit::engine::{mem_engine, CHUNK};
    use crate::testkit::storage::FaultyStorage;

    const C: usize = CHUNK as usize;

    fn read(eng: &CacheObject, dev: DeviceId, chunk: u64) -> crate::cow::Result<Vec<u8>> {
        let mut buf = vec![0u8; C];
        eng.read(dev, chunk * CHUNK, &mut buf).map(|()| buf)
    }

    /// The host's file system fills up (the limit is far away): the origin's copy-out that
    /// finds no space makes the snapshots reading the chunk inoperative and the origin's write
    /// proceeds; the engine goes on (no failed commit), the space comes back, and a new
    /// snapshot is preserved normally.
    #[test]
    fn a_full_file_system_fails_the_snapshots_never_the_origin() {
        let f = mem_engine(16).origin(vec![9u8; 16 * C]).build_faulty(4);
        let eng = &f.engine;
        let ro = eng.create_snapshot(DeviceId::ORIGIN, "ro", false).unwrap();
        let rw = eng.create_snapshot(DeviceId::ORIGIN, "rw", true).unwrap();
        for c in 0..16u64 {
            eng.write(DeviceId::ORIGIN, c * CHUNK, &vec![c as u8; C])
                .unwrap_or_else(|e| panic!("origin write {c} failed: {e}"));
        }
        let st = eng.stats();
        assert_eq!(st.copies, 4, "the four copies that fitted");
        assert_eq!(st.inoperative_devices, 2);
        assert_eq!(
            st.cache_write_errors, 1,
            "one refused write, then no copy needed"
        );
        assert!(st.host_full);
        for s in [ro, rw] {
            assert_eq!(eng.device(s).unwrap().state, DeviceState::Inoperative);
            assert!(matches!(read(eng, s, 0), Err(CowError::Inoperative(_))));
        }
        eng.flush().expect("the engine did not stop");
        for c in 0..16u64 {
            assert_eq!(read(eng, DeviceId::ORIGIN, c).unwrap(), vec![c as u8; C]);
        }
        assert!(
            f.cache.budget() >= 4 * CHUNK,
            "the inoperative snapshots' blocks went back to the file system"
        );
        // Space is back: a new snapshot is preserved, and the episode is over.
        let s = eng.create_snapshot(DeviceId::ORIGIN, "s", false).unwrap();
        eng.write(DeviceId::ORIGIN, 0, &[1u8; C]).unwrap();
        assert_eq!(read(eng, s, 0).unwrap(), vec![0u8; C]);
        assert!(!eng.stats().host_full);
        eng.verify_in_memory().unwrap();
        let report = check_cache(&*f.cache);
        assert!(report.is_clean(), "{report}");
    }

    /// The file system is full only until blocks freed by a record not yet durable are
    /// punched out: the copy-out the host refused runs again after a commit, and no snapshot
    /// goes inoperative.
    #[test]
    fn a_refused_copy_waits_for_freed_blocks_first() {
        let f = mem_engine(16).origin(vec![9u8; 16 * C]).build_faulty(4);
        let eng = &f.engine;
        let keep = eng
            .create_snapshot(DeviceId::ORIGIN, "keep", false)
            .unwrap();
        let w = eng.create_snapshot(keep, "w", true).unwrap();
        for c in 0..4u64 {
            eng.write(w, c * CHUNK, &[1u8; C]).unwrap();
        }
        assert_eq!(f.cache.budget(), 0);
        eng.discard(w, 0, CHUNK).unwrap(); // its block is freed once the discard commits
        eng.write(DeviceId::ORIGIN, 8 * CHUNK, &[2u8; C]).unwrap();
        assert_eq!(eng.stats().inoperative_devices, 0);
        assert_eq!(read(eng, keep, 8).unwrap(), vec![9u8; C]);
        assert_eq!(eng.stats().cache_write_errors, 1);
    }

    /// A write to a writable snapshot the host refuses for lack of space fails alone (with the
    /// engine's default policy, at once), and succeeds once the file system has room again.
    #[test]
    fn a_snapshot_write_the_host_refuses_fails_alone() {
        let f = mem_engine(16).build_faulty(1);
        let eng = &f.engine;
        let w = eng.create_snapshot(DeviceId::ORIGIN, "w", true).unwrap();
        eng.write(w, 0, &[1u8; 512]).unwrap();
        assert!(matches!(
            eng.write(w, CHUNK, &[2u8; 512]),
            Err(CowError::NoSpace)
        ));
        let st = eng.stats();
        assert_eq!((st.no_space_errors, st.cache_write_errors), (1, 1));
        assert_eq!(
            st.inoperative_devices, 0,
            "a failed snapshot write harms nobody"
        );
        f.cache.set_budget(f.cache.budget() + 4 * CHUNK);
        eng.write(w, CHUNK, &[2u8; 512]).unwrap();
        assert_eq!(read(eng, w, 0).unwrap()[..512], [1u8; 512]);
        assert_eq!(read(eng, w, 1).unwrap()[..512], [2u8; 512]);
        eng.flush().unwrap();
    }

    /// EIO writing data blocks is handled like a full cache: a snapshot write fails, the
    /// origin's write proceeds and the snapshot it could not preserve goes inoperative; the
    /// blocks the host failed are not reused. An EIO reading the origin fails that request
    /// only. After all that the cache object reopens clean.
    #[test]
    fn eio_on_data_blocks_is_a_space_failure_and_on_the_origin_fails_the_request() {
        let spec = mem_engine(16).origin(vec![9u8; 16 * C]);
        let data = spec.data_offset();
        let origin = FaultyStorage::new(1 << 30);
        crate::storage::Storage::write_at(&*origin, &vec![9u8; 16 * C], 0).unwrap();
        let cache = FaultyStorage::new(1 << 30);
        let eng = spec.on(origin.clone(), cache.clone());
        let ro = eng.create_snapshot(DeviceId::ORIGIN, "ro", false).unwrap();
        let w = eng.create_snapshot(DeviceId::ORIGIN, "w", true).unwrap();

        // The origin fails a read: the write that needed it fails, nothing else changes.
        origin.fail_reads_in(0..CHUNK);
        assert!(matches!(
            eng.write(DeviceId::ORIGIN, 0, &[1u8; 512]),
            Err(CowError::Io(_))
        ));
        origin.fail_reads_in(0..0);
        assert_eq!(read(&eng, ro, 0).unwrap(), vec![9u8; C]);
        assert_eq!(eng.stats().inoperative_devices, 0);

        cache.fail_writes_in(data..u64::MAX);
        assert!(matches!(
            eng.write(w, 0, &[2u8; 512]),
            Err(CowError::CacheWrite(_))
        ));
        eng.write(DeviceId::ORIGIN, 0, &[3u8; C]).unwrap();
        let st = eng.stats();
        assert_eq!(st.inoperative_devices, 2);
        assert_eq!(st.blocks_quarantined, 2, "neither failed block is reused");
        cache.fail_writes_in(0..0);
        let s = eng.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
        eng.write(s, 5 * CHUNK, &[4u8; 512]).unwrap();
        eng.write(DeviceId::ORIGIN, 0, &[5u8; C]).unwrap();
        assert_eq!(read(&eng, s, 0).unwrap(), vec![3u8; C]);
        eng.verify_in_memory().unwrap();
        drop(eng);
        let eng = CacheObject::open(origin, cache, OpenOptions::default()).unwrap();
        assert_eq!(
            eng.stats().blocks_quarantined,
            0,
            "free again after a reopen"
        );
        assert_eq!(read(&eng, s, 5).unwrap()[..512], [4u8; 512]);
        eng.verify_in_memory().unwrap();
    }
}
