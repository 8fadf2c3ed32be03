//! Staged copy-outs: the origin's old chunk, read for its snapshots before the origin's write,
//! waits in memory for the commit that maps it, and that commit writes it, beside the others
//! of its batch, before its data sync.
//!
//! An origin write must wait for that commit anyway (the copy and its mapping durable before
//! the origin changes, DESIGN §5), and under write-behind (`held.rs`) a commit gathers up to
//! 200 ms of them. Written there rather than one by one, copies allocated lowest block first
//! go to the cache object as a few long sequential writes: on this project's host, a 64 KiB
//! random write per first touch was what held the origin's first touches under `--direct` to
//! a third of what the device's reads allowed (docs/benchmarks.md).
//!
//! Why nothing reads a staged block before it is written: a block is staged only for the
//! origin's chunk `c` whose stripe the writer holds, and the writer keeps that stripe until
//! the commit covering the copy's record is done (it waits for it, or its held write keeps the
//! stripe until it lands, after that commit). Every read of a block (engine reads, a queue's
//! own snapshot reads, restore, fills) holds its chunk's stripe; a block is only ever mapped
//! at its own chunk; and a block freed meanwhile is released only after a commit, which wrote
//! it first.
//!
//! Why the ordering holds: a copy is staged with its record, under the state lock, and every
//! commit writes all staged copies (`blockio.rs`, `write_staged`), with the journal lock held,
//! until none is left at the moment it takes the records (`commit.rs`): each record it commits has its data written
//! before its data sync. `data_durable_epoch` only covers records logged before the first
//! copy still staged (`commit.rs`, `sync_cache`).
//!
//! A copy the host refuses to write (ENOSPC, EIO) fails its readers, as a copy-out that fails
//! at once does: the snapshots mapping its block are made inoperative by records logged before
//! the commit takes them, so no mapping to a block without its data is ever durable.
//!
//! The daemon stages copies only when its cache object takes direct I/O (`--direct`, see
//! `cli/disks.rs`; the engine's option is `copies_at_once`). Through the page cache a copy's
//! write is a memory copy wherever it is made, and staged, it was made by the commit, on the
//! one thread a guest's FLUSH waits for, rather than by the copy-outs, several at once:
//! page-cache first touches ran 1.6-1.8 times as fast, and with a FLUSH every 256 writes 1.2
//! times, without staging (docs/benchmarks.md, 2026-12-05). [`STAGE_ENV`] overrides the
//! daemon's choice (the power-cut test runs both ways).

use crate::storage::AlignedBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Most bytes of copies staged, being written or being read for staging at once; past it a
/// copy-out writes its copy at once.
pub(super) const STAGED_BYTES_MAX: usize = 64 << 20;

/// Staged bytes past which a copy-out urges the committer (`held.rs`) to commit now: its
/// gathering counts only the origin writes it holds, not the copies they staged.
const URGE_BYTES: usize = STAGED_BYTES_MAX / 2;

/// Free bytes the cache object's file system must have had at the last look for copies to be
/// staged: room for every copy that may be staged, twice over. Closer to full, a copy-out
/// writes at once, so that a copy the host refuses for lack of space is handled as before
/// (after a commit that frees blocks, if one would, `blockio.rs`) rather than at the commit,
/// which can only make its snapshots inoperative.
const ROOM_TO_STAGE: u64 = 2 * STAGED_BYTES_MAX as u64;

/// How long a look at the file system's free space stays good.
const ROOM_RECHECK: Duration = Duration::from_millis(500);

/// Set to `1` the daemon stages copies whatever its cache object's I/O, to `0` never (module
/// doc).
pub const STAGE_ENV: &str = "SNAPBLK_STAGE_COPIES";

/// What [`STAGE_ENV`] asks for: `Some(stage)`, or `None` when it is unset or says neither.
pub fn staging_from_env() -> Option<bool> {
    match std::env::var(STAGE_ENV).as_deref() {
        Ok("1") => Some(true),
        Ok("0") => Some(false),
        _ => None,
    }
}

/// The copy of the origin's chunk `chunk` for block `block`, mapped by the record of `epoch`.
pub(super) struct StagedCopy {
    epoch: u64,
    pub(super) chunk: u64,
    pub(super) block: u64,
    pub(super) data: AlignedBuf,
}

/// The copies staged since the last commit took them, in the order they were logged (in the
/// engine's state, under its lock: staged with their records).
#[derive(Default)]
pub(super) struct StagedCopies {
    copies: Vec<StagedCopy>,
}

impl StagedCopies {
    /// Stages `data`, the copy for `block` at `chunk` that the record of `epoch` maps (its
    /// bytes reserved in the [`StageBudget`] beforehand).
    pub(super) fn push(&mut self, epoch: u64, chunk: u64, block: u64, data: AlignedBuf) {
        self.copies.push(StagedCopy {
            epoch,
            chunk,
            block,
            data,
        });
    }

    pub(super) fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }

    /// Epoch of the oldest copy still staged: records from it on do not have their data
    /// written.
    pub(super) fn first_epoch(&self) -> Option<u64> {
        self.copies.first().map(|s| s.epoch)
    }

    pub(super) fn take(&mut self) -> Vec<StagedCopy> {
        std::mem::take(&mut self.copies)
    }
}

/// The memory staging may take, and whether the file system has room for it; outside the
/// state lock, so that neither its count nor a look at the file system (`fstatvfs`, which can
/// stall on a network file system) holds up the engine.
#[derive(Debug)]
pub(super) struct StageBudget {
    /// Whether copies are staged at all (module doc).
    enabled: bool,
    /// Bytes of copies being read for staging, staged, or being written by a commit.
    bytes: AtomicUsize,
    /// When the file system was last looked at, and whether it had [`ROOM_TO_STAGE`].
    looked: Mutex<Option<(Instant, bool)>>,
}

impl StageBudget {
    /// The budget of an engine that stages copies if `enabled` (otherwise every reservation
    /// is refused and each copy-out writes its copy).
    pub(super) fn new(enabled: bool) -> Self {
        StageBudget {
            enabled,
            bytes: AtomicUsize::new(0),
            looked: Mutex::new(None),
        }
    }

    /// [`reserve`](Self::reserve)s `n` bytes for a copy-out to stage its copy: given back when
    /// the reservation is dropped, unless [`Reservation::staged`] says the copy was staged
    /// (the commit that writes it gives them back).
    pub(super) fn reservation(
        &self,
        n: usize,
        free: impl FnOnce() -> Option<u64>,
    ) -> Option<Reservation<'_>> {
        // Built only once reserved (not with `then_some`, which builds it first): a
        // `Reservation` gives its bytes back when dropped.
        if self.reserve(n, free) {
            Some(Reservation { budget: self, n })
        } else {
            None
        }
    }

    /// Reserves `n` bytes for a copy to stage, if they fit under [`STAGED_BYTES_MAX`] and the
    /// file system had room at the last look (`free` asks it for its free bytes; `None`: the
    /// store lives on no file system, a block device or memory, whose space is all there).
    /// Whoever reserved gives the bytes back with [`release`](Self::release).
    fn reserve(&self, n: usize, free: impl FnOnce() -> Option<u64>) -> bool {
        if !self.enabled || !self.room(free) {
            return false;
        }
        self.bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b + n <= STAGED_BYTES_MAX).then_some(b + n)
            })
            .is_ok()
    }

    /// `n` reserved bytes are no longer needed: the copy was written, or never staged.
    pub(super) fn release(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::AcqRel);
    }

    /// Whether [`URGE_BYTES`] or more are taken: the committer should commit now rather than
    /// gather on, or later copy-outs would find no room and write at once.
    pub(super) fn past_urge_mark(&self) -> bool {
        self.bytes.load(Ordering::Acquire) >= URGE_BYTES
    }

    fn room(&self, free: impl FnOnce() -> Option<u64>) -> bool {
        let mut looked = self.looked.lock().unwrap_or_else(PoisonError::into_inner);
        match *looked {
            Some((at, room)) if at.elapsed() < ROOM_RECHECK => room,
            _ => {
                let room = free().is_none_or(|f| f >= ROOM_TO_STAGE);
                *looked = Some((Instant::now(), room));
                room
            }
        }
    }
}

/// Bytes a copy-out reserved to stage its copy; given back on drop unless staged.
pub(super) struct Reservation<'a> {
    budget: &'a StageBudget,
    n: usize,
}

impl Reservation<'_> {
    /// The copy is staged: its bytes stay taken until its commit has written it.
    pub(super) fn staged(mut self) {
        self.n = 0;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.n > 0 {
            self.budget.release(self.n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cow::DeviceId;
    use crate::testkit::engine::{mem_engine, CHUNK};
    use std::sync::Arc;

    const C: usize = CHUNK as usize;

    /// First touches gathered for one commit stage their copies: nothing is written until a
    /// snapshot read of one of their chunks urges the commit, which writes all 16 copies, end
    /// to end, in one call before the journal; the snapshot reads its old data, the origin the
    /// new, before and after a FLUSH.
    #[test]
    fn a_gathered_batch_writes_its_copies_in_one_call_at_its_commit() {
        let old: Vec<u8> = (0..16 * C).map(|i| (i / 512) as u8).collect();
        let m = mem_engine(16).origin(old.clone()).build();
        let eng = Arc::new(m.engine);
        eng.held.set_gather(Duration::from_secs(30));
        eng.start_write_behind().expect("committer thread");
        let s = eng.create_snapshot(DeviceId::ORIGIN, "s", false).unwrap();
        for c in 0..16u64 {
            eng.write(DeviceId::ORIGIN, c * CHUNK + 512, &[0xEE; 512])
                .unwrap();
        }
        let st = eng.stats();
        assert_eq!(st.origin_writes_held, 16);
        assert_eq!((st.copies, st.copy_writes), (16, 0), "staged, not written");

        let mut got = vec![0u8; C];
        eng.read(s, 5 * CHUNK, &mut got).unwrap();
        assert!(
            got == old[5 * C..6 * C],
            "the snapshot's chunk 5 is its old data"
        );
        let st = eng.stats();
        assert_eq!(
            (st.copies, st.copy_writes),
            (16, 1),
            "one call for 16 copies"
        );

        let mut new = old.clone();
        for c in 0..16 {
            new[c * C + 512..c * C + 1024].fill(0xEE);
        }
        let check = |what: &str| {
            let mut got = vec![0u8; 16 * C];
            eng.read(s, 0, &mut got).unwrap();
            assert!(got == old, "{what}: the snapshot changed");
            eng.read(DeviceId::ORIGIN, 0, &mut got).unwrap();
            assert!(got == new, "{what}: the origin lost a write");
        };
        check("landed");
        eng.flush().unwrap();
        check("flushed");
        eng.verify_in_memory().unwrap();
    }

    /// An engine told to write copies at once (the daemon's choice without direct I/O, module
    /// doc) stages nothing, and the origin's write is held as before.
    #[test]
    fn through_the_page_cache_copies_are_written_at_once() {
        let m = mem_engine(4)
            .origin(vec![7u8; 4 * C])
            .copies_at_once()
            .build();
        let eng = Arc::new(m.engine);
        eng.held.set_gather(Duration::from_secs(30));
        eng.start_write_behind().expect("committer thread");
        let s = eng.create_snapshot(DeviceId::ORIGIN, "s", false).unwrap();
        eng.write(DeviceId::ORIGIN, 512, &[1u8; 512]).unwrap();
        assert!(eng.read_state().staged.is_empty(), "nothing staged");
        let st = eng.stats();
        assert_eq!(
            (st.copies, st.copy_writes, st.origin_writes_held),
            (1, 0, 1)
        );
        let mut got = vec![0u8; C];
        eng.read(s, 0, &mut got).unwrap();
        assert!(got == vec![7u8; C], "the snapshot keeps its data");
        eng.flush().unwrap();
        eng.read(DeviceId::ORIGIN, 0, &mut got).unwrap();
        assert!(got[512..1024] == [1u8; 512] && got[..512] == [7u8; 512]);
        eng.verify_in_memory().unwrap();
    }

    /// A refused reservation gives back nothing it did not take: the count stays exact, so
    /// the bound holds and the committer is urged only past the mark.
    #[test]
    fn a_refused_reservation_leaves_the_count_as_it_was() {
        let b = StageBudget::new(true);
        b.reservation(STAGED_BYTES_MAX, || None)
            .expect("room")
            .staged();
        for _ in 0..3 {
            assert!(b.reservation(4096, || None).is_none(), "past the bound");
        }
        b.release(STAGED_BYTES_MAX);
        assert!(!b.past_urge_mark(), "nothing is staged");
        b.reservation(URGE_BYTES, || None).expect("room").staged();
        assert!(b.past_urge_mark());
        b.release(URGE_BYTES);
        assert!(
            b.reservation(STAGED_BYTES_MAX, || None).is_some(),
            "the whole budget is there again"
        );
    }

    #[test]
    fn staged_copies_keep_their_order_and_the_budget_its_bound() {
        let mut s = StagedCopies::default();
        assert!(s.is_empty() && s.first_epoch().is_none());
        for e in [3u64, 4] {
            s.push(e, e, e + 10, AlignedBuf::zeroed(512));
        }
        assert_eq!(
            s.first_epoch(),
            Some(3),
            "the oldest bounds data_durable_epoch"
        );
        assert_eq!(s.take().len(), 2);
        assert!(s.is_empty());

        let b = StageBudget::new(true);
        let mut looks = 0;
        let mut plenty = || {
            looks += 1;
            Some(ROOM_TO_STAGE)
        };
        assert!(b.reserve(URGE_BYTES - 1, &mut plenty));
        assert!(!b.past_urge_mark());
        assert!(b.reserve(1, &mut plenty));
        assert!(b.past_urge_mark(), "half the bound taken: commit now");
        assert!(b.reserve(STAGED_BYTES_MAX - URGE_BYTES, &mut plenty));
        assert!(!b.reserve(1, &mut plenty), "the bound");
        assert_eq!(looks, 1, "one look at the file system serves a while");
        b.release(STAGED_BYTES_MAX);
        assert!(!b.past_urge_mark());
        let r = b.reservation(URGE_BYTES, || None).expect("room");
        assert!(b.past_urge_mark());
        drop(r);
        assert!(
            !b.past_urge_mark(),
            "a copy never staged gives its bytes back"
        );
        b.reservation(URGE_BYTES, || None).expect("room").staged();
        assert!(b.past_urge_mark(), "a staged copy keeps them until written");
        b.release(URGE_BYTES);
        *b.looked.lock().unwrap() = None;
        assert!(
            !b.reserve(1, || Some(ROOM_TO_STAGE - 1)),
            "a file system near full"
        );
        assert!(
            !b.reserve(1, || Some(ROOM_TO_STAGE)),
            "until looked at again"
        );
        *b.looked.lock().unwrap() = None;
        assert!(b.reserve(1, || None), "no file system: a block device");
    }
}
