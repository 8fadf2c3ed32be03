//! Origin writes held until the commit they wait for is durable (write-behind).
//!
//! An origin write whose chunk had to be copied out for snapshots must not reach the origin
//! before the copy and its mapping are durable (docs/engine.md, "Durability"). Waiting for
//! that commit in the request made the guest pay a data sync and a journal sync for every
//! group of first touches, and a guest's queue depth capped how many a commit gathered. So,
//! once its copy-out is logged, such a write is *held*: its data is copied into daemon memory,
//! its chunks' stripe locks stay taken, and the request completes. The committer thread
//! (`writebehind.rs`, started by `CacheObject::start_write_behind`) gathers held writes for
//! [`GATHER`] (or until someone waiting for a held chunk urges it, `stripes.rs`), commits them
//! in one group, then lands them on the origin (on several threads when the origin takes
//! direct I/O) and lets their stripes go. virtio-blk's volatile write cache
//! (VIRTIO_BLK_F_FLUSH) promises durability only at FLUSH, and a FLUSH lands everything held
//! before it completes (`CacheObject::land_held`).
//!
//! A later write of a held chunk that needs no copy-out of its own (no snapshot since) is held
//! behind that write rather than urging its commit: a *follower* ([`HeldWrites::follow`]),
//! landed right after it.
//!
//! Why every view stays right meanwhile: the held stripes. A copy-out, a snapshot read and a
//! later write of those chunks take them, so they find the write landed, never half done (a
//! later write that follows takes none: it lands right after the held write, with its stripe).
//! Origin reads take no stripe as a rule (`read.rs`); while writes are held ([`HeldWrites::any`])
//! they do, in the engine and in a queue's ring alike (`direct.rs`), so a read issued after a
//! write completed returns its data. Origin writes bypassing the engine are refused meanwhile
//! (`direct.rs`), so none can overtake a held write. A crash loses held writes, as a volatile
//! cache may, but never lands one before the copy it waited for is durable.
//!
//! Bounds: at most [`HELD_BYTES_MAX`] bytes are held; past that a write waits for its commit
//! in the request, as without write-behind (backpressure). A write the origin refuses when it
//! lands (EIO, ENOSPC on a thin device) can no longer fail its request: it is logged, counted
//! (`stats`), and the next FLUSH of the origin fails, as a page cache reports a writeback
//! error at fsync.

use crate::storage::{AlignedBuf, Storage};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Most bytes of origin writes held at once (their copies live in daemon memory).
pub(super) const HELD_BYTES_MAX: usize = 64 << 20;

/// How long the committer gathers held writes before it commits them, unless urged
/// ([`HeldWrites::urge`]) or [`GATHER_BYTES`] are held. Each commit costs the device two
/// flushes, which stall the copy-outs and writes in flight beside them (a host fsync on a
/// virtual disk): committing as soon as anything was held made two to five times as many
/// commits (docs/benchmarks.md, 2026-12-04). A read of a held chunk urges (again every
/// millisecond while it waits, `stripes.rs`), a FLUSH lands what is held itself, and a rewrite
/// of a held chunk follows ([`HeldWrites::follow`]), so nobody waits for the gathering: first
/// touches at QD32 measured 1.2 times faster with 200 ms than with 50 ms, and no faster with
/// 1 s (docs/benchmarks.md, 2026-12-04 night).
pub(super) const GATHER: Duration = Duration::from_millis(200);

/// Most writes held behind one held write ([`HeldWrites::follow`]): they land one after the
/// other, with the chunk's stripe kept.
pub(super) const MAX_FOLLOWERS: usize = 64;

/// Held bytes past which the committer stops gathering.
pub(super) const GATHER_BYTES: usize = HELD_BYTES_MAX / 4;

/// A held write's stripe locks, taken exclusively when the write began.
pub(super) type HeldStripe = parking_lot::ArcRwLockWriteGuard<parking_lot::RawRwLock, ()>;

/// The stripes a held write keeps until it lands: one (a write within a chunk, no
/// allocation) or those of a write spanning chunks.
#[expect(
    dead_code,
    reason = "held for their drop: the locks go when the write has landed"
)]
pub(super) enum HeldStripes {
    One(HeldStripe),
    Many(Vec<HeldStripe>),
}

/// How an origin write goes on after `CacheObject::commit_or_hold` (`writebehind.rs`).
pub(super) enum AfterCommit {
    /// Held: it lands after its commit, nothing more to do.
    Held,
    /// Its commit is durable: write it now, keeping these stripes until it is written.
    WriteNow(Option<HeldStripes>),
}

/// What became of a write that found its chunk's stripe taken ([`HeldWrites::follow`]).
pub(super) enum Follow {
    /// Held behind the held write keeping the stripe.
    Held,
    /// Kept by a held write it cannot follow, and not yet committing: urge the commit.
    Urge,
    /// Kept by a request or a batch already committing: wait (it may be held meanwhile).
    Wait,
}

/// What a held write puts into its range.
pub(super) enum HeldData {
    Data(AlignedBuf),
    Zeroes,
    Discard,
}

/// An origin write completed to its requester but not yet on the origin.
pub(super) struct HeldWrite {
    offset: u64,
    len: u64,
    data: HeldData,
    /// The epoch that must be durable before it lands (and its followers).
    epoch: u64,
    stripes: HeldStripes,
    /// The chunks it spans (first, last): later writes of a chunk it alone spans may follow it.
    chunks: (u64, u64),
    /// Later writes of its chunk held behind it ([`HeldWrites::follow`]), landed after it in
    /// the order they came.
    followers: Vec<Follower>,
}

/// A write held behind an earlier held write of its chunk.
struct Follower {
    offset: u64,
    len: u64,
    data: HeldData,
}

impl HeldWrite {
    /// A write of `data` to `[offset, offset+len)` of the origin, to land once `epoch` is
    /// durable, keeping `stripes` (those of `chunks`, first and last) until then.
    pub(super) fn new(
        offset: u64,
        len: u64,
        data: HeldData,
        epoch: u64,
        stripes: HeldStripes,
        chunks: (u64, u64),
    ) -> Self {
        Self {
            offset,
            len,
            data,
            epoch,
            stripes,
            chunks,
            followers: Vec::new(),
        }
    }

    /// Bytes it holds, with its followers.
    fn bytes(&self) -> usize {
        self.len as usize + self.followers.iter().map(|f| f.len as usize).sum::<usize>()
    }

    /// Its stripes, for a write that could not be held.
    pub(super) fn into_stripes(self) -> HeldStripes {
        self.stripes
    }

    /// Lands it, then its followers in order: the first failure (its error, offset and
    /// length), if any, and how many of them failed.
    fn land(&self, origin: &dyn Storage) -> (Option<(std::io::Error, u64, u64)>, u64) {
        let mut first = None;
        let mut failed = 0;
        let pieces = std::iter::once((self.offset, self.len, &self.data))
            .chain(self.followers.iter().map(|f| (f.offset, f.len, &f.data)));
        for (offset, len, data) in pieces {
            let result = match data {
                HeldData::Data(buf) => origin.write_at(buf, offset),
                HeldData::Zeroes => origin.write_zeroes(offset, len),
                HeldData::Discard => origin.punch_hole(offset, len),
            };
            if let Err(e) = result {
                failed += 1;
                first.get_or_insert((e, offset, len));
            }
        }
        (first, failed)
    }
}

/// The held writes of one engine.
#[derive(Default)]
pub(super) struct HeldWrites {
    pub(super) queue: Mutex<Queue>,
    /// The committer waits here for writes to commit.
    pub(super) work: Condvar,
    /// One batch commits and lands at a time (the committer's, or a FLUSH's): batches land in
    /// the order they were held.
    pub(super) landing: Mutex<()>,
    /// Every write with a sequence number up to this one has landed (or failed to).
    pub(super) landed_seq: AtomicU64,
    /// Writes held and not yet landed: origin reads take their stripes while there are any.
    pub(super) pending: AtomicUsize,
    /// A committer runs: writes may be held.
    pub(super) running: AtomicBool,
    /// Someone waits for a stripe a held write may keep: commit and land without gathering.
    urgent: AtomicBool,
    /// How long the committer gathers ([`GATHER`]; tests set others), in microseconds.
    gather_us: AtomicU64,
    pub(super) landers: Landers,
    pub(super) counts: HeldCounts,
}

#[derive(Default)]
pub(super) struct Queue {
    pub(super) writes: Vec<HeldWrite>,
    /// Bytes of writes held and not yet landed.
    pub(super) bytes: usize,
    /// Sequence number of the last write held.
    pub(super) seq: u64,
    /// When the oldest write of `writes` was held.
    since: Option<Instant>,
    /// The write of `writes` keeping each stripe: who is in the way of a write that finds
    /// one taken ([`HeldWrites::follow`]).
    by_stripe: HashMap<usize, usize>,
    /// The engine is gone: the committer stops.
    pub(super) stop: bool,
}

/// Counters for `stats`.
#[derive(Default)]
pub(super) struct HeldCounts {
    /// Writes that completed before their commit.
    pub(super) held: AtomicU64,
    /// Of those, writes held behind an earlier held write of their chunk.
    pub(super) followed: AtomicU64,
    /// Held writes the origin refused when they landed.
    pub(super) lost: AtomicU64,
    /// Lost writes no FLUSH of the origin has reported yet.
    pub(super) unreported: AtomicU64,
    /// A landing failed since the last report: later ones are not logged.
    failing: AtomicBool,
}

/// Threads that land a committed batch's writes beside the committer.
#[derive(Default)]
pub(super) struct Landers {
    batch: Mutex<LandingBatch>,
    ready: Condvar,
    done: Condvar,
}

#[derive(Default)]
struct LandingBatch {
    writes: Vec<HeldWrite>,
    /// Writes of the batch not yet landed (taken or not).
    left: usize,
    failed: u64,
    stop: bool,
}

impl HeldWrites {
    /// Whether writes are held: origin reads must then take their chunks' stripes.
    #[inline]
    pub(super) fn any(&self) -> bool {
        // SeqCst: a read issued after a held write completed (which counted it first) sees it.
        self.pending.load(Ordering::SeqCst) != 0
    }

    /// Whether a committer runs, so writes may be held.
    #[inline]
    pub(super) fn accepting(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Writes held, of them followers, and of them lost.
    pub(super) fn counts(&self) -> (u64, u64, u64) {
        let c = &self.counts;
        (
            c.held.load(Ordering::Relaxed),
            c.followed.load(Ordering::Relaxed),
            c.lost.load(Ordering::Relaxed),
        )
    }

    /// Holds `w`, which keeps `stripes`; gives it back when the engine is closing or the bound
    /// is reached (the caller then waits for the commit itself).
    pub(super) fn hold(
        &self,
        w: HeldWrite,
        stripes: impl Iterator<Item = usize>,
    ) -> std::result::Result<(), HeldWrite> {
        let mut q = lock(&self.queue);
        let len = w.len as usize;
        if q.stop || q.bytes + len > HELD_BYTES_MAX {
            return Err(w);
        }
        // Counted before the request completes (see `any`).
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.counts.held.fetch_add(1, Ordering::Relaxed);
        // The committer waits for the first write, then gathers until a deadline or a bound.
        let wake = q.writes.is_empty() || (q.bytes < GATHER_BYTES && q.bytes + len >= GATHER_BYTES);
        if q.writes.is_empty() {
            q.since = Some(Instant::now());
        }
        q.bytes += len;
        q.seq += 1;
        let at = q.writes.len();
        for i in stripes {
            q.by_stripe.insert(i, at);
        }
        q.writes.push(w);
        drop(q);
        if wake {
            self.work.notify_one();
        }
        Ok(())
    }

    /// For a write of `[offset, offset+len)`, within `chunk`, that found `chunk`'s stripe
    /// taken: holds it behind the held write keeping that stripe, if that write alone spans
    /// the chunk, is not yet taken for a commit, and `followable` (the caller found that the
    /// chunk needs no copy-out: that write's served every snapshot since). It then lands right
    /// after it, once `epoch` is durable too. A snapshot taken after the check leaves that true
    /// for this write: concurrent with it, and landing before any read of the chunk (the held
    /// stripe), it counts as written before it. `data` is taken only if the write is held.
    ///
    /// A write of exactly the range of the last write held there replaces its data (the older
    /// would be overwritten at once); past [`MAX_FOLLOWERS`] others, a write urges instead, so
    /// that one chunk's landing stays short.
    pub(super) fn follow(
        &self,
        at: (usize, u64),
        range: (u64, u64),
        followable: bool,
        epoch: u64,
        data: &mut Option<HeldData>,
    ) -> Follow {
        let ((stripe, chunk), (offset, len)) = (at, range);
        let mut q = lock(&self.queue);
        let Some(&at) = q.by_stripe.get(&stripe) else {
            // A request keeps it, or a batch being committed: it lets go without an urge.
            return Follow::Wait;
        };
        let leader = &q.writes[at];
        let rewrite = leader
            .followers
            .last()
            .map_or((leader.offset, leader.len), |f| (f.offset, f.len))
            == (offset, len);
        let n = if rewrite { 0 } else { len as usize };
        if !followable
            || leader.chunks != (chunk, chunk)
            || (!rewrite && leader.followers.len() >= MAX_FOLLOWERS)
            || q.stop
            || q.bytes + n > HELD_BYTES_MAX
        {
            return Follow::Urge;
        }
        let Some(new) = data.take() else {
            return Follow::Urge;
        };
        let wake = q.bytes < GATHER_BYTES && q.bytes + n >= GATHER_BYTES;
        let leader = &mut q.writes[at];
        leader.epoch = leader.epoch.max(epoch);
        match leader.followers.last_mut() {
            Some(last) if rewrite => last.data = new,
            None if rewrite => leader.data = new,
            _ => leader.followers.push(Follower {
                offset,
                len,
                data: new,
            }),
        }
        q.bytes += n;
        // No sequence number of its own: it lands with its leader, in whichever batch.
        drop(q);
        self.counts.held.fetch_add(1, Ordering::Relaxed);
        self.counts.followed.fetch_add(1, Ordering::Relaxed);
        if wake {
            self.work.notify_one();
        }
        Follow::Held
    }

    /// How long the committer gathers held writes before it commits them.
    pub(super) fn gather(&self) -> Duration {
        match self.gather_us.load(Ordering::Relaxed) {
            0 => GATHER,
            us => Duration::from_micros(us),
        }
    }

    /// Sets how long the committer gathers (tests: long, to see what urges it).
    #[cfg(test)]
    pub(super) fn set_gather(&self, d: Duration) {
        self.gather_us
            .store(d.as_micros().max(1) as u64, Ordering::Relaxed);
    }

    /// Asks the committer to commit and land what is held now: someone waits for a stripe,
    /// which a held write may keep. Nothing to do (one load) while nothing is held.
    pub(super) fn urge(&self) {
        if !self.any() || self.urgent.swap(true, Ordering::AcqRel) {
            return;
        }
        // Under the queue's lock, so that a committer about to wait sees the flag.
        drop(lock(&self.queue));
        self.work.notify_one();
    }

    /// The committer's wait: until writes are held and it is time to commit them (gathered
    /// for [`gather`](Self::gather), [`GATHER_BYTES`] held, or urged). `None` when the engine
    /// is closing (or, checked now and then while idle, `gone` says it is gone).
    pub(super) fn wait_to_commit(&self, gone: impl Fn() -> bool) -> Option<()> {
        const IDLE_CHECK: Duration = Duration::from_millis(500);
        let mut q = lock(&self.queue);
        loop {
            if q.stop {
                return None;
            }
            let timeout = match q.since {
                None => IDLE_CHECK,
                Some(_) if q.bytes >= GATHER_BYTES || self.urgent.load(Ordering::Acquire) => {
                    return Some(())
                }
                Some(since) => match self.gather().checked_sub(since.elapsed()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return Some(()),
                },
            };
            q = match self.work.wait_timeout(q, timeout) {
                Ok((q, _)) => q,
                Err(e) => e.into_inner().0,
            };
            if q.writes.is_empty() && gone() {
                return None;
            }
        }
    }

    /// The reported-once error for lost writes, if any since the last report.
    pub(super) fn take_lost(&self) -> Option<u64> {
        let n = self.counts.unreported.swap(0, Ordering::AcqRel);
        self.counts.failing.store(false, Ordering::Relaxed);
        (n > 0).then_some(n)
    }

    pub(super) fn stop(&self) {
        lock(&self.queue).stop = true;
        self.work.notify_all();
        lock(&self.landers.batch).stop = true;
        self.landers.ready.notify_all();
    }

    /// Takes every write held so far: the batch, the sequence number of its last write, and
    /// its bytes.
    pub(super) fn take_batch(&self) -> (Vec<HeldWrite>, u64, usize) {
        let mut q = lock(&self.queue);
        let batch = std::mem::take(&mut q.writes);
        q.by_stripe.clear();
        q.since = None;
        // Urges from now on are for writes held after this batch.
        self.urgent.store(false, Ordering::Release);
        let bytes = batch.iter().map(HeldWrite::bytes).sum();
        (batch, q.seq, bytes)
    }

    /// Writes in a batch, followers counted.
    pub(super) fn writes_in(batch: &[HeldWrite]) -> u64 {
        batch.iter().map(|w| 1 + w.followers.len() as u64).sum()
    }

    /// The highest epoch a batch's writes wait for.
    pub(super) fn epoch_of(batch: &[HeldWrite]) -> u64 {
        batch.iter().map(|w| w.epoch).max().unwrap_or(0)
    }

    /// A batch of `n` writes (`bytes`) is done, `failed` of them lost; every write up to
    /// `upto` has landed.
    pub(super) fn finish_batch(&self, n: usize, bytes: usize, failed: u64, upto: u64) {
        if failed > 0 {
            self.counts.lost.fetch_add(failed, Ordering::Relaxed);
            self.counts.unreported.fetch_add(failed, Ordering::AcqRel);
        }
        lock(&self.queue).bytes -= bytes;
        self.pending.fetch_sub(n, Ordering::SeqCst);
        self.landed_seq.fetch_max(upto, Ordering::AcqRel);
    }

    /// Lands a committed batch on `origin` (with the landers when `parallel`), each write's
    /// stripes released once it is there; returns how many failed.
    pub(super) fn land_all(
        &self,
        batch: Vec<HeldWrite>,
        origin: &dyn Storage,
        parallel: bool,
    ) -> u64 {
        if batch.len() < 2 || !parallel {
            return batch.into_iter().map(|w| self.land_one(w, origin)).sum();
        }
        let landers = &self.landers;
        let mut b = lock(&landers.batch);
        b.left = batch.len();
        b.failed = 0;
        b.writes = batch;
        drop(b);
        landers.ready.notify_all();
        // Lands beside the landers, then waits for the last of theirs.
        let mut b = lock(&landers.batch);
        while let Some(w) = b.writes.pop() {
            drop(b);
            let failed = self.land_one(w, origin);
            b = lock(&landers.batch);
            b.left -= 1;
            b.failed += failed;
        }
        while b.left > 0 {
            b = landers.done.wait(b).unwrap_or_else(PoisonError::into_inner);
        }
        b.failed
    }

    /// Lands one write and lets its stripes go; whether it failed (logged once until a FLUSH
    /// reports it).
    fn land_one(&self, w: HeldWrite, origin: &dyn Storage) -> u64 {
        let (Some((e, offset, len)), failed) = w.land(origin) else {
            return 0;
        };
        if !self.counts.failing.swap(true, Ordering::Relaxed) {
            log::error!(
                "origin write of {len} bytes at {offset} failed after completing: {e} (the \
                 next FLUSH of the origin fails)"
            );
        }
        failed
    }

    /// A lander thread: lands writes of the batch the committer handed over, one at a time.
    pub(super) fn lander(&self, origin: &dyn Storage) {
        let landers = &self.landers;
        let mut b = lock(&landers.batch);
        loop {
            if b.stop {
                return;
            }
            let Some(w) = b.writes.pop() else {
                b = landers
                    .ready
                    .wait(b)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            };
            drop(b);
            let failed = self.land_one(w, origin);
            b = lock(&landers.batch);
            b.failed += failed;
            b.left -= 1;
            if b.left == 0 {
                landers.done.notify_all();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
