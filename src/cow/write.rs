//! The write path: [`CacheObject::write`], [`CacheObject::write_zeroes`] and
//! [`CacheObject::discard`], and the write rule (docs/engine.md, "The write rule") as named
//! steps. For one chunk `c` of device `dev`, with `c`'s stripe lock held exclusively:
//!
//! 1. `preserve_for_readers`: the devices reading `dev`'s view at `c` get that old view first
//!    (the same block or zeros, or one copy of the origin's chunk), and it says which record
//!    must be durable before the origin may change;
//! 2. `dev`'s own change, decided as a plan, then carried out:
//!    - the origin ([`OriginPlan`], from `plan_origin_chunk`): what must be durable before
//!      the origin is overwritten in place. A single chunk commits and writes at once
//!      (`write_origin_piece`); a write over several chunks (`write_origin_batched`) plans
//!      every chunk, commits once for the highest epoch, then writes the origin once;
//!    - a snapshot ([`ChunkPlan`], from `plan_snapshot_chunk`): map the chunk to zeros, write
//!      its own block in place, or fill a new block and map it (`write_snapshot_chunk`).
//!
//! Either step may find that it must start over (the stripe still held): after a commit that
//! frees blocks (once per chunk) or makes durable a record an in-place write must wait for
//! (`CommitFirst`), or when a child of `dev` appeared while the state lock was dropped
//! ([`Mapped::ChildAppeared`]).

use super::engine::{stripe_of, stripe_order, CacheObject, State, StateGuard, CHUNK_EPOCH_SLOTS};
use super::error::{CowError, DeviceId, Result};
use super::format::{entry_block, entry_to_block, Record, ENTRY_ZERO};
use super::held::{AfterCommit, HeldStripe, HeldStripes};
use super::meta::{View, ORIGIN_ID};
use std::sync::atomic::Ordering;

/// Multi-chunk origin writes up to this many chunks lock their stripes without allocating.
const SMALL_BATCH: usize = 16;

/// What a write puts into its range.
#[derive(Clone, Copy)]
pub(super) enum Src<'a> {
    Data(&'a [u8]),
    Zeroes,
    Discard,
    /// Zeroes a resize writes where the device's old end left data it must not show
    /// (`resize.rs`): allowed on a read-only device, whose view past its end is not data.
    Trim,
}

impl<'a> Src<'a> {
    /// The part of the source that lands at `done..done+len` of the range.
    fn part(self, done: usize, len: usize) -> Src<'a> {
        match self {
            Src::Data(buf) => Src::Data(&buf[done..done + len]),
            other => other,
        }
    }
}

/// The part of chunk `c` a write covers (`inoff..inoff+len`) and what goes there.
#[derive(Clone, Copy)]
pub(super) struct Piece<'a> {
    pub(super) c: u64,
    pub(super) inoff: usize,
    pub(super) len: usize,
    pub(super) src: Src<'a>,
}

/// Step 1's outcome.
pub(super) enum Readers<'a> {
    /// The readers of the old view have it. The state lock is still held, with the epoch, if
    /// any, that must be durable before the origin changes: the record of the copy made for
    /// them, or of the snapshots made inoperative because no block was left for it.
    Served(StateGuard<'a>, Option<u64>),
    /// No block for the copy, but blocks come free with a commit: start over once this epoch
    /// is durable.
    CommitFirst(u64),
}

/// Step 2 for the origin: what must be durable before the origin's chunk is overwritten in
/// place.
#[derive(Clone, Copy)]
struct OriginPlan {
    /// The last record, not yet durable, that made some device stop reading through at the
    /// chunk (`State::chunk_epochs`) or took a reader away from the origin (a delete or an
    /// inoperative marking, `State::readers_dropped_epoch`): a crash could undo it and bring
    /// back a reader of the old data.
    shield: u64,
    /// Step 1's record: the copy made for the chunk's readers (its `Preserve`), or the
    /// inoperative markings made for lack of space for it.
    preserved: Option<u64>,
}

impl OriginPlan {
    /// The one epoch that covers the whole plan, for a commit shared by several chunks.
    fn durable_before_write(self) -> u64 {
        self.shield.max(self.preserved.unwrap_or(0))
    }
}

/// Step 2 for a snapshot: its own change of the chunk, decided under the state lock.
enum ChunkPlan {
    /// A whole-chunk write-zeroes or discard of a chunk already mapped to zeros: nothing to do.
    AlreadyZero,
    /// A whole-chunk write-zeroes or discard: map the chunk to zeros (its block, if any, is
    /// released); nothing to write.
    MapZero,
    /// Write into the device's own block in place: it is the block's only user, and no
    /// record that could give it another user after a crash is pending.
    InPlace(u64),
    /// Write into `block`, newly allocated (a partial write fills the rest from `old`, the
    /// device's view before), then map it.
    NewBlock { block: u64, old: View },
    /// The block is the device's alone only once this epoch is durable (or a commit frees
    /// blocks for the new one): start over after it.
    CommitFirst(u64),
}

/// How mapping a filled new block ended.
enum Mapped {
    Done,
    /// A child of the device appeared while the state lock was dropped: it must get the old
    /// view first (step 1), so the write starts over (the block is given back).
    ChildAppeared,
}

impl CacheObject {
    /// Writes `buf` to device `dev` at `offset`. A snapshot write that finds no space
    /// follows the on-full policy (`waits.rs`); the origin never fails for lack of space.
    pub fn write(&self, dev: DeviceId, offset: u64, buf: &[u8]) -> Result<()> {
        self.after_change(self.with_space_wait(dev, || {
            self.change(dev, offset, buf.len() as u64, Src::Data(buf))
        }))
    }

    /// Makes `[offset, offset+len)` of `dev` read as zeros.
    pub fn write_zeroes(&self, dev: DeviceId, offset: u64, len: u64) -> Result<()> {
        self.after_change(self.with_space_wait(dev, || self.change(dev, offset, len, Src::Zeroes)))
    }

    /// Discards `[offset, offset+len)` of `dev`; it reads as zeros afterwards and whole chunks
    /// release their blocks. Other devices keep their views.
    pub fn discard(&self, dev: DeviceId, offset: u64, len: u64) -> Result<()> {
        self.after_change(self.with_space_wait(dev, || self.change(dev, offset, len, Src::Discard)))
    }

    /// After a change, no stripe held: blocks of snapshots the change made inoperative are
    /// released (`release_fenced`; nothing to do, one flag load, almost always).
    #[inline]
    fn after_change(&self, result: Result<()>) -> Result<()> {
        self.release_fenced();
        result
    }

    /// Changes `[offset, offset+len)` of `dev` to what `src` says, chunk by chunk (origin
    /// writes spanning chunks are batched: their copies share one commit).
    fn change(&self, dev: DeviceId, offset: u64, len: u64, src: Src<'_>) -> Result<()> {
        self.check_range(self.device_size(dev)?, offset, len)?;
        self.change_unchecked(dev, offset, len, src)
    }

    /// [`Self::change`] without the bounds check: a resize zeroes what lies past a device's
    /// end before the new size is recorded (`resize.rs`).
    pub(super) fn change_unchecked(
        &self,
        dev: DeviceId,
        offset: u64,
        len: u64,
        src: Src<'_>,
    ) -> Result<()> {
        if dev == DeviceId::ORIGIN && self.cor.is_some() {
            // A remote origin is read-only: its local copies stand for an image that never
            // changes.
            return Err(CowError::ReadOnly(dev));
        }
        if dev == DeviceId::ORIGIN && self.spans_chunks(offset, len) {
            return self.write_origin_batched(offset, len, src);
        }
        self.for_each_chunk(offset, len, |c, inoff, n, done| {
            self.write_chunk(dev.0, c, inoff, n, src.part(done, n))
        })
    }

    fn spans_chunks(&self, offset: u64, len: u64) -> bool {
        len > 0 && (offset >> self.chunk_shift) != ((offset + len - 1) >> self.chunk_shift)
    }

    /// An origin write over several chunks: all their copy-outs first, one commit for all,
    /// then one origin write (instead of a commit per chunk). Stripe locks are taken in
    /// ascending order, so two batched writers cannot deadlock.
    fn write_origin_batched(&self, offset: u64, len: u64, src: Src<'_>) -> Result<()> {
        let first = offset >> self.chunk_shift;
        let last = (offset + len - 1) >> self.chunk_shift;
        let n = (last - first + 1) as usize;
        if n <= SMALL_BATCH {
            // Common case (a guest segment spanning a few chunks): no allocation.
            let (idx, n) = stripe_order::<SMALL_BATCH>(first, n);
            let mut guards: [Option<HeldStripe>; SMALL_BATCH] = Default::default();
            for (guard, &i) in guards.iter_mut().zip(&idx[..n]) {
                *guard = Some(self.write_stripe_arc(i));
            }
            // Collected only if the write is held.
            let keep = || Some(HeldStripes::Many(guards.into_iter().flatten().collect()));
            return self.write_origin_batched_locked(offset, len, src, keep);
        }
        let mut stripes: Vec<usize> = (first..=last).map(stripe_of).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let guards: Vec<_> = stripes.iter().map(|&i| self.write_stripe_arc(i)).collect();
        let keep = || Some(HeldStripes::Many(guards));
        self.write_origin_batched_locked(offset, len, src, keep)
    }

    /// The batched write with its chunks' stripes taken (`stripes` hands them over to be
    /// kept if the write is held; otherwise they are dropped after it).
    fn write_origin_batched_locked(
        &self,
        offset: u64,
        len: u64,
        src: Src<'_>,
        stripes: impl FnOnce() -> Option<HeldStripes>,
    ) -> Result<()> {
        // Every chunk's plan, folded into the one epoch they all need durable.
        let mut wait = 0u64;
        let planned = self.for_each_chunk(offset, len, |c, _, _, _| {
            wait = wait.max(self.plan_origin_chunk(c)?.durable_before_write());
            Ok(())
        });
        if let Err(e) = planned {
            // Chunks planned before the failure may have staged their copies: committed
            // (so written) before their stripes are given up.
            if wait > self.durable_epoch.load(Ordering::Acquire) {
                self.commit(wait, false)?;
            }
            return Err(e);
        }
        let _kept;
        if wait > self.durable_epoch.load(Ordering::Acquire) {
            match self.commit_or_hold(offset, len, src, wait, stripes())? {
                AfterCommit::Held => return Ok(()),
                AfterCommit::WriteNow(stripes) => _kept = stripes,
            }
        }
        self.write_origin(offset, len, src)
    }

    fn for_each_chunk(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, usize, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let c = pos >> self.chunk_shift;
            let inoff = pos & (self.chunk_size - 1);
            let n = (self.chunk_size - inoff).min(len - done);
            f(c, inoff as usize, n as usize, done as usize)?;
            done += n;
        }
        Ok(())
    }

    fn write_chunk(&self, dev: u64, c: u64, inoff: usize, len: usize, src: Src<'_>) -> Result<()> {
        if let Some(cor) = self.cor.as_deref() {
            if len < self.chunk_len(c) {
                // The fill reads the origin's chunk: fetch it before taking the stripe.
                self.prefetch_for_write(cor, dev, c);
            }
        }
        if dev == ORIGIN_ID {
            let piece = Piece { c, inoff, len, src };
            // Owned: a held write keeps it until it lands (`held.rs`); taken by one, a later
            // write of its chunk may follow it rather than wait.
            let i = stripe_of(c);
            let stripe = match self.stripes[i].try_write_arc() {
                Some(stripe) => stripe,
                None => match self.follow_or_take(piece, i)? {
                    Some(stripe) => stripe,
                    None => return Ok(()),
                },
            };
            return self.write_origin_chunk(piece, Some(HeldStripes::One(stripe)));
        }
        let _stripe = self.write_stripe(stripe_of(c));
        self.write_chunk_locked(dev, c, inoff, len, src)
    }

    /// The write rule (docs/engine.md, "The write rule") for one chunk, stripe lock held.
    pub(super) fn write_chunk_locked(
        &self,
        dev: u64,
        c: u64,
        inoff: usize,
        len: usize,
        src: Src<'_>,
    ) -> Result<()> {
        let piece = Piece { c, inoff, len, src };
        if dev == ORIGIN_ID {
            return self.write_origin_chunk(piece, None);
        }
        self.write_snapshot_chunk(dev, piece)
    }

    /// Steps 1 and 2 for the origin's chunk, its stripe taken (and given, if owned, to be
    /// kept by a held write).
    fn write_origin_chunk(&self, piece: Piece<'_>, stripe: Option<HeldStripes>) -> Result<()> {
        let plan = self.plan_origin_chunk(piece.c)?;
        self.write_origin_piece(plan, piece, stripe)
    }

    /// The state lock, for a change of `dev`'s view: `dev` exists, is operative and writable.
    /// The state lock for a write to `dev`: refused for a read-only device unless `trim`
    /// (a resize's zeroes past its end).
    fn lock_for_write(&self, dev: u64, trim: bool) -> Result<StateGuard<'_>> {
        let st = self.write_state();
        Self::check_dev(&st.meta, dev)?;
        if !trim && st.meta.dev(dev).is_some_and(|d| !d.writable) {
            return Err(CowError::ReadOnly(DeviceId(dev)));
        }
        Ok(st)
    }

    /// Step 1: devices reading `dev`'s view at `c` get that old view first. For the origin:
    /// one copy, stamped with the snapshot clock, serves every snapshot taken since the
    /// chunk's previous copy, whatever their number. For a snapshot: its children unmapped at
    /// `c` share its block or zeros (no data moves), or one copy of the origin's chunk where it
    /// reads the origin image.
    ///
    /// Gives the state lock back (it is dropped during a copy) with the epoch of what it
    /// logged that must be durable before the origin may change, if anything.
    fn preserve_for_readers<'a>(
        &'a self,
        mut st: StateGuard<'a>,
        dev: u64,
        c: u64,
        space_retried: &mut bool,
    ) -> Result<Readers<'a>> {
        if !st.meta.view_shared(dev, c) {
            return Ok(Readers::Served(st, None));
        }
        let view = st.meta.resolve(dev, c);
        if let (View::Origin, Some(cor)) = (view, self.cor.as_deref()) {
            // A read-only origin's local copy is the old view itself: shared, not copied.
            drop(st);
            let entry = self.origin_entry_for_readers(cor, c)?;
            // Writability was checked when the write began, and never changes.
            let mut st = self.lock_for_write(dev, true)?;
            if st.meta.view_shared(dev, c) {
                st.log(Record::ShareDown {
                    dev,
                    chunk: c,
                    entry,
                })?;
            }
            return Ok(Readers::Served(st, None));
        }
        if view != View::Origin {
            // Sharing a block or zeros: no data moves.
            st.log(Record::ShareDown {
                dev,
                chunk: c,
                entry: view.entry(),
            })?;
            return Ok(Readers::Served(st, None));
        }
        match self.alloc_data(&mut st) {
            Some(nb) => self.copy_for_readers(st, dev, c, nb, space_retried),
            None if !*space_retried && !st.pending_free.is_empty() => {
                // Blocks freed by records not yet durable come back with a commit.
                *space_retried = true;
                Ok(Readers::CommitFirst(st.epoch))
            }
            None if dev == ORIGIN_ID => {
                // The origin never fails for lack of space: the readers it cannot serve do.
                let e = self.fail_unpreservable(&mut st, c)?;
                Ok(Readers::Served(st, Some(e)))
            }
            None => Err(CowError::NoSpace),
        }
    }

    /// Steps 1 and 2 for the origin's chunk `c`, up to the overwrite: its readers served, and
    /// what must be durable before the origin changes.
    fn plan_origin_chunk(&self, c: u64) -> Result<OriginPlan> {
        let mut space_retried = false;
        loop {
            let st = self.lock_for_write(ORIGIN_ID, false)?;
            match self.preserve_for_readers(st, ORIGIN_ID, c, &mut space_retried)? {
                Readers::Served(st, preserved) => {
                    // Also wait for any delete or inoperative marking not yet durable: it may
                    // be why no copy was needed, and a crash could bring that reader back.
                    let shield = st.chunk_epochs[(c as usize) % CHUNK_EPOCH_SLOTS]
                        .max(st.readers_dropped_epoch);
                    drop(st);
                    if self.stage_budget.past_urge_mark() {
                        // Staged copies past the mark: the committer writes them now.
                        self.held.urge();
                    }
                    return Ok(OriginPlan { shield, preserved });
                }
                Readers::CommitFirst(e) => self.commit(e, false)?,
            }
        }
    }

    /// Carries out a single chunk's [`OriginPlan`]: its commit, then the origin write; or,
    /// given the chunk's stripe to keep, holds the write until the commit (`held.rs`).
    fn write_origin_piece(
        &self,
        plan: OriginPlan,
        piece: Piece<'_>,
        stripe: Option<HeldStripes>,
    ) -> Result<()> {
        let pos = (piece.c << self.chunk_shift) + piece.inoff as u64;
        let len = piece.len as u64;
        let wait = plan.durable_before_write();
        // Kept until the write is done when it is not held.
        let _kept;
        if wait > self.durable_epoch.load(Ordering::Acquire) {
            match self.commit_or_hold(pos, len, piece.src, wait, stripe)? {
                AfterCommit::Held => return Ok(()),
                AfterCommit::WriteNow(stripe) => _kept = stripe,
            }
        }
        self.write_origin(pos, len, piece.src)
    }

    /// Steps 1 and 2 for a snapshot's chunk, starting over while the state changes under
    /// them: after a commit that frees blocks (once) or makes durable a record an in-place
    /// write must wait for, or when a child appears while the state lock is dropped.
    fn write_snapshot_chunk(&self, dev: u64, piece: Piece<'_>) -> Result<()> {
        // A whole chunk: a device's short last chunk takes the fill, so that what lies past its
        // end in the block is its old view (zeros past the image), never a freed block's data.
        let full = piece.inoff == 0 && piece.len as u64 == self.chunk_size;
        let mut space_retried = false;
        loop {
            let st = self.lock_for_write(dev, matches!(piece.src, Src::Trim))?;
            // A snapshot's own change needs none of step 1's records durable first: it never
            // writes in place into a block its readers were just given (that block has another
            // user now), and records become durable in the order they were logged.
            let mut st = match self.preserve_for_readers(st, dev, piece.c, &mut space_retried)? {
                Readers::Served(st, _) => st,
                Readers::CommitFirst(e) => {
                    self.commit(e, false)?;
                    continue;
                }
            };
            match self.plan_snapshot_chunk(&mut st, dev, piece, full, &mut space_retried)? {
                ChunkPlan::AlreadyZero => return Ok(()),
                ChunkPlan::MapZero => {
                    st.log(Record::SetEntry {
                        dev,
                        chunk: piece.c,
                        entry: ENTRY_ZERO,
                    })?;
                    return Ok(());
                }
                ChunkPlan::InPlace(b) => {
                    drop(st);
                    return self.write_in_place(b, piece);
                }
                ChunkPlan::NewBlock { block, old } => {
                    drop(st);
                    match self.fill_and_map(dev, piece, block, old, full)? {
                        Mapped::Done => return Ok(()),
                        Mapped::ChildAppeared => {}
                    }
                }
                ChunkPlan::CommitFirst(e) => {
                    drop(st);
                    self.commit(e, false)?;
                }
            }
        }
    }

    /// Step 2 for a snapshot: decides its own change, under the state lock (allocating the
    /// new block if it needs one).
    fn plan_snapshot_chunk(
        &self,
        st: &mut State,
        dev: u64,
        piece: Piece<'_>,
        full: bool,
        space_retried: &mut bool,
    ) -> Result<ChunkPlan> {
        let c = piece.c;
        let cur = st.meta.dev(dev).map_or(0, |d| d.table.get(c));
        if full && !matches!(piece.src, Src::Data(_)) {
            return Ok(if cur == ENTRY_ZERO {
                ChunkPlan::AlreadyZero
            } else {
                ChunkPlan::MapZero
            });
        }
        if let Some(b) = entry_to_block(cur) {
            if st.meta.refcount(b) == 1 {
                // Another user dropped this block, or a child stopped reading through to it,
                // in a record not yet durable: after a crash it could see this block again,
                // so it must not change in place yet. A block mapped only by records not
                // yet durable is out of reach of any durable mapping.
                let wait = match st.pending_unref.get(&b) {
                    Some(&e) => e,
                    None if st.fresh_blocks.contains_key(&b) => 0,
                    None => st.chunk_epochs[(c as usize) % CHUNK_EPOCH_SLOTS],
                };
                if wait > self.durable_epoch.load(Ordering::Acquire) {
                    return Ok(ChunkPlan::CommitFirst(wait));
                }
                return Ok(ChunkPlan::InPlace(b));
            }
        }
        // Into a new block.
        let Some(nb) = self.alloc_data(st) else {
            if !*space_retried && !st.pending_free.is_empty() {
                *space_retried = true;
                return Ok(ChunkPlan::CommitFirst(st.epoch));
            }
            return Err(CowError::NoSpace);
        };
        Ok(ChunkPlan::NewBlock {
            block: nb,
            old: st.meta.resolve(dev, c),
        })
    }

    /// Fills the new block `nb` (state lock dropped), then maps it, unless a child of `dev`
    /// appeared meanwhile.
    fn fill_and_map(
        &self,
        dev: u64,
        piece: Piece<'_>,
        nb: u64,
        old: View,
        full: bool,
    ) -> Result<Mapped> {
        let filled = self.fill_new_block(piece, nb, old, full);
        let mut st = self.write_state();
        if let Err(e) = filled.and_then(|()| Self::check_dev(&st.meta, dev)) {
            Self::give_back(&mut st, nb, &e);
            return Err(e);
        }
        if st.meta.has_unmapped_child(dev, piece.c) {
            // A snapshot of `dev` was created (or moved under it by a delete) while the lock
            // was dropped: it must get our old view (step 1) before our entry changes, or it
            // would keep resolving to a block we are about to release. Start over.
            Self::free_unused(&mut st, nb);
            return Ok(Mapped::ChildAppeared);
        }
        st.log(Record::SetEntry {
            dev,
            chunk: piece.c,
            entry: entry_block(nb),
        })?;
        Ok(Mapped::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::engine::{mem_engine, CHUNK};

    /// A delete takes effect in memory before it is durable. An origin write in between, which
    /// needs no copy only because the snapshot is gone, must not change the origin until the
    /// delete is durable: after a crash the snapshot would be back, reading the new data.
    #[test]
    fn an_origin_write_after_an_uncommitted_delete_waits_for_it() {
        let eng = mem_engine(16).build().engine;
        let s = eng.create_snapshot(DeviceId::ORIGIN, "s", false).unwrap();
        eng.flush().unwrap();
        // What delete_snapshot does before its commit.
        let deleted = eng
            .write_state()
            .log(Record::DeleteDevice { id: s.0 })
            .unwrap();
        assert!(eng.durable_epoch.load(Ordering::Acquire) < deleted);
        eng.write(DeviceId::ORIGIN, 0, &[5u8; CHUNK as usize])
            .unwrap();
        assert_eq!(eng.stats().copies, 0, "no snapshot reads the chunk now");
        assert!(
            eng.durable_epoch.load(Ordering::Acquire) >= deleted,
            "the origin changed while the delete could still be undone by a crash"
        );
    }

    /// A multi-chunk origin write whose second chunk's copy-out fails (the origin refuses the
    /// read) has staged the first chunk's copy, mapped in memory: it must be written before
    /// the write gives up its stripes, or the snapshot reads a block never written.
    #[test]
    fn a_multi_chunk_write_failing_after_a_staged_copy_writes_that_copy_first() {
        use crate::testkit::storage::{FaultyStorage, MemStorage};
        let c = CHUNK as usize;
        let spec = mem_engine(4);
        let origin = FaultyStorage::new(1 << 30);
        crate::storage::Storage::write_at(&*origin, &vec![7u8; 4 * c], 0).unwrap();
        let eng = spec.on(origin.clone(), std::sync::Arc::new(MemStorage::new(0)));
        let s = eng.create_snapshot(DeviceId::ORIGIN, "s", false).unwrap();
        origin.fail_reads_in(CHUNK..2 * CHUNK);
        assert!(matches!(
            eng.write(DeviceId::ORIGIN, 0, &vec![1u8; 2 * c]),
            Err(CowError::Io(_))
        ));
        origin.fail_reads_in(0..0);
        let st = eng.stats();
        assert_eq!(
            (st.copies, st.copy_writes),
            (1, 1),
            "chunk 0 copied (staged, then written) before chunk 1 failed"
        );
        let mut got = vec![0u8; 2 * c];
        eng.read(s, 0, &mut got).unwrap();
        assert!(
            got == vec![7u8; 2 * c],
            "the snapshot reads an unwritten block"
        );
        eng.verify_in_memory().unwrap();
    }
}
