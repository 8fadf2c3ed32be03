//! [`CacheObject`]: the engine's state, its locks and its geometry. Each job of the engine is
//! an `impl CacheObject` block of its own file: `open.rs` (create, open), `read.rs` (the read
//! path), `write.rs` (the write rule), `space.rs` (block allocation, the cache-full rule),
//! `commit.rs` (group commit, checkpoints, flush), `snapshots.rs` (create, delete, restore,
//! attributes), `info.rs` (listings and counters) and `verify.rs` (the in-memory verifier);
//! `recovery.rs` rebuilds the state on open; `blockio.rs` does the data-block I/O of the write
//! path (a failed cache write there is a space failure, not an engine failure), `limit.rs`
//! keeps the growth limit (fixed or following the host file system) and `waits.rs` the waits
//! for space.
//!
//! Locking (see docs/engine.md, "Concurrency"):
//! - a stripe lock per chunk (`chunk % STRIPES`): reads take it shared, every change of a view
//!   takes it exclusive for the whole change, including the copy-out, the commit wait and the
//!   origin overwrite. So a snapshot read can never resolve "read through to the origin" and then
//!   read origin data written after the snapshot: the writer holds the stripe until the snapshot
//!   has its own mapping;
//! - `state` (an `RwLock`) guards the tables, reference counts and allocator; held only to
//!   resolve or change mappings, never across I/O. Writers and the control plane take it;
//!   reads do not: they find the device in `registry` and its entry in the device's published
//!   page tree ([`ReadSide`]) with lock-free loads. That needs, and the engine keeps, one rule:
//!   **every change of any device's resolved entry at chunk c is made with c's stripe held
//!   exclusively.** The only records that change resolved entries are the `SetEntry` and
//!   `ShareDown` logged by the write rule for its chunk (`write.rs`: `preserve_for_readers`
//!   and `write_snapshot_chunk`; and `Meta::propagate` under them, same chunk), whose callers
//!   hold that stripe (`write_chunk`, `write_origin_batched`, `restore`). `DeleteDevice`
//!   changes no surviving device's resolved entry (children unmapped at c already resolve to the
//!   entry it passes down to them), and the deleted table is retired (its readers are waited
//!   out by a barrier over the stripes before its blocks can be freed); `SetInoperative`
//!   replaces the table instead of changing it and retires the old one; `CreateDevice` only
//!   shares pages. A reader's entry therefore cannot change while it holds the stripe; other
//!   entries of the page and the page tree can, which `meta::Table` (`table.rs`) handles
//!   (copy-on-write pages, in place only when no one else can see them);
//! - `journal` (a `Mutex`) serializes commits; waiters for a commit that covers their change
//!   return without doing I/O (group commit, `commit.rs`).

use super::copyouts::CopyOuts;
use super::error::{CowError, DeviceId, Result};
use super::format::{entry_to_block, Enc, Header, Record, ENTRY_UNMAPPED};
use super::gate::DirectGate;
use super::held::HeldWrites;
use super::history::OriginHistory;
use super::hostroom::HostRoom;
use super::meta::{Meta, ReadSide};
use super::metaio::JournalTail;
use super::origin_copies::CopyOnRead;
use super::prealloc::Prealloc;
use super::staged::{StageBudget, StagedCopies};
use super::waitlist::SpaceWaits;
use crate::storage::{Storage, SECTOR_SIZE};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Number of stripe locks. Many, because a held origin write (`held.rs`) keeps its chunk's
/// stripe until the commit after it lands, and every other chunk of that stripe waits with it:
/// with 65 536 stripes a few hundred held writes stall under 1% of the other chunks' requests
/// (with 1 024, a quarter). Each costs an `Arc` and a lock word (2 MiB in all).
pub(super) const STRIPES: usize = 65536;

/// A stripe lock. `parking_lot`'s, each in an `Arc`: a read held across a queue's own direct
/// transfer (`direct.rs`) is an owned guard that the transfer keeps until it completes.
pub(super) type Stripe = Arc<parking_lot::RwLock<()>>;
pub(super) type StripeReadGuard<'a> = parking_lot::RwLockReadGuard<'a, ()>;

/// The stripe lock of chunk `c`, as an index into `CacheObject::stripes`.
#[inline]
pub(super) fn stripe_of(c: u64) -> usize {
    (c as usize) % STRIPES
}

/// The stripes of chunks `first..first + n` (`n <= N`) in ascending order: the order in which
/// whoever holds several stripes at once takes them (batched origin writes, reads over several
/// chunks), so that none can deadlock. `N` consecutive chunks never share a stripe (`N` is at
/// most [`STRIPES`]), so each comes once. Returns them and how many.
pub(super) fn stripe_order<const N: usize>(first: u64, n: usize) -> ([usize; N], usize) {
    const { assert!(N <= STRIPES) };
    debug_assert!(n <= N);
    let mut idx = [0usize; N];
    for (k, slot) in idx.iter_mut().enumerate().take(n) {
        *slot = stripe_of(first + k as u64);
    }
    idx[..n].sort_unstable();
    (idx, n)
}
/// Slots of [`State::chunk_epochs`].
pub(super) const CHUNK_EPOCH_SLOTS: usize = 1 << 16;

/// Each device's id and [`ReadSide`] by slot (`devids.rs`): how a read finds a device's mapping without the state
/// lock. Replaced (under the state lock) when a device is created, deleted or made inoperative.
pub(super) type Registry = ArcSwap<Vec<Option<(u64, Arc<ReadSide>)>>>;

/// The state lock held for writing.
pub(super) type StateGuard<'a> = RwLockWriteGuard<'a, State>;

/// Tables plus what is not yet durable.
pub(super) struct State {
    pub(super) meta: Meta,
    /// Shared with [`CacheObject::registry`]; republished by [`State::log`].
    pub(super) registry: Arc<Registry>,
    /// Encoded records applied but not yet committed.
    pub(super) records: Vec<u8>,
    /// Epoch of the last applied record.
    pub(super) epoch: u64,
    /// Blocks whose reference count dropped in an uncommitted record: no in-place write into
    /// them until that record is durable (a crash could bring the other user back).
    pub(super) pending_unref: HashMap<u64, u64>,
    /// Blocks freed by uncommitted records: not reusable until durable.
    pub(super) pending_free: Vec<(u64, u64)>,
    /// Blocks freed by making a snapshot inoperative, with the epoch of that record: besides
    /// waiting for it to be durable, they wait for a stripe barrier (`commit.rs`,
    /// `release_fenced`), because an in-place write of that snapshot decided before the
    /// marking, under another chunk's stripe, may still be on its way to them.
    pub(super) fenced_free: Vec<(u64, u64)>,
    /// Per chunk (modulo [`CHUNK_EPOCH_SLOTS`]): epoch of the last record that made some
    /// device stop reading through at that chunk. Until it is durable, a crash could make that
    /// device read through again, so the data it would read (the origin chunk, or its parent's
    /// block) must not be overwritten in place.
    pub(super) chunk_epochs: Vec<u64>,
    /// Blocks newly mapped by uncommitted records: no durable mapping can reach them, so
    /// in-place writes into them are always safe.
    pub(super) fresh_blocks: HashMap<u64, u64>,
    pub(super) low_space_warned: bool,
    /// The cache has been found full (no block for a write) since it last had room: logged
    /// once per episode.
    pub(super) full_logged: bool,
    /// Under the host policy (the limit follows the host file system's free space), what the
    /// file system was last seen to have room for.
    pub(super) host: Option<HostRoom>,
    /// Blocks withheld from reuse after the host failed a write into them (EIO), until the
    /// next open.
    pub(super) quarantined: u64,
    /// Epoch of the last record that took a device out of the origin's readers (a delete, or
    /// a device made inoperative). Until it is durable a crash can bring that device back, so
    /// an origin write that made no copy because of it must wait for it.
    pub(super) readers_dropped_epoch: u64,
    /// Copies of the origin's chunks waiting for the next commit to write them (`staged.rs`).
    pub(super) staged: StagedCopies,
}

pub(super) struct Journal {
    /// Next write position, relative to the journal start.
    pub(super) pos: u64,
    /// Bytes written since the checkpoint.
    pub(super) used: u64,
    pub(super) next_seq: u64,
    pub(super) header: Header,
    pub(super) ckpt_blocks: Vec<u64>,
    /// The journal passed half full but no checkpoint could be written (no blocks, or the
    /// host refused them): logged once, until a checkpoint succeeds.
    pub(super) ckpt_deferred: bool,
    /// The written part of the I/O block the next transaction begins in (`metaio.rs`).
    pub(super) tail: JournalTail,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) copies: AtomicU64,
    pub(super) bytes_copied: AtomicU64,
    /// Write calls that wrote staged copies (`staged.rs`): fewer than the copies, when
    /// their blocks lie end to end.
    pub(super) copy_writes: AtomicU64,
    pub(super) cow_fills: AtomicU64,
    pub(super) data_syncs_skipped: AtomicU64,
    pub(super) commits: AtomicU64,
    pub(super) checkpoints: AtomicU64,
    /// Checkpoints put off for lack of space (the journal holds the records meanwhile).
    pub(super) checkpoints_deferred: AtomicU64,
    /// Writes to snapshots that failed for lack of space.
    pub(super) no_space: AtomicU64,
    /// Data-block writes to the cache object the host refused (ENOSPC, EIO, ...).
    pub(super) cache_write_errors: AtomicU64,
    /// Writes that waited for space, and those that gave up waiting.
    pub(super) space_waits: AtomicU64,
    pub(super) space_wait_timeouts: AtomicU64,
}

/// An origin and its snapshots, backed by one cache object.
pub struct CacheObject {
    pub(super) origin: Arc<dyn Storage>,
    pub(super) cache: Arc<dyn Storage>,
    pub(super) chunk_size: u64,
    pub(super) chunk_shift: u32,
    /// The origin's size (its device's, kept here too for the origin's hot path).
    pub(super) origin_size: AtomicU64,
    pub(super) data_offset: u64,
    pub(super) journal_size: u64,
    /// Warn below this many free bytes; `None`: 10% of the limit.
    pub(super) low_space_setting: Option<u64>,
    pub(super) state: RwLock<State>,
    /// Read without any lock by snapshot reads.
    pub(super) registry: Arc<Registry>,
    /// The origin's preserved copies (the same object as the state's), read without any lock.
    pub(super) history: Arc<OriginHistory>,
    pub(super) stripes: Box<[Stripe]>,
    pub(super) journal: Mutex<Journal>,
    pub(super) durable_epoch: AtomicU64,
    /// Records up to this epoch have their data (the copies and fills they map) durable: it
    /// was written before they were logged, and a cache sync started after they were logged.
    pub(super) data_durable_epoch: AtomicU64,
    pub(super) failed: AtomicBool,
    /// `State::fenced_free` is not empty: the next write or flush that holds no stripe
    /// releases what is durable, after a barrier over the stripes.
    pub(super) fenced_pending: AtomicBool,
    pub(super) counters: Counters,
    /// The host refused the last data-block write for lack of space (ENOSPC), and the one
    /// before that was logged: cleared by the next data-block write that succeeds.
    pub(super) host_full: AtomicBool,
    /// Likewise for other write errors (EIO): logged once per episode.
    pub(super) host_failing: AtomicBool,
    /// Writes waiting for space, the on-full policy, waiters for low space.
    pub(super) waits: SpaceWaits,
    /// Checkpoints are put off and the journal is three quarters full (`commit.rs`,
    /// `check_journal_room`): read without the journal lock.
    pub(super) journal_pressed: AtomicBool,
    /// Serializes changes of the limit (`limit.rs`).
    pub(super) resizing: Mutex<()>,
    /// Origin writes bypassing the engine, and snapshot creations holding them off
    /// (`gate.rs`, `direct.rs`).
    pub(super) direct_gate: Arc<DirectGate>,
    /// Origin copy-outs in flight, which a commit waits (briefly) to gather (`copyouts.rs`).
    pub(super) copy_outs: CopyOuts,
    /// Space for new data blocks taken ahead of their writes, under direct I/O (`prealloc.rs`).
    pub(super) prealloc: Prealloc,
    /// Memory for staged copy-outs, and whether the file system has room for them
    /// (`staged.rs`).
    pub(super) stage_budget: StageBudget,
    /// Copy-on-read of a read-only origin (`cor.rs`): `None` for a local origin image, whose
    /// reads go straight to it.
    pub(super) cor: Option<Box<CopyOnRead>>,
    /// Origin writes completed before the commit they wait for, and their committer
    /// (`held.rs`).
    pub(super) held: Arc<HeldWrites>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    /// Applies a record and queues it for the next commit; returns its epoch.
    pub(super) fn log(&mut self, rec: Record) -> Result<u64> {
        let shields = match &rec {
            Record::SetEntry { dev, chunk, .. } => self
                .meta
                .dev(*dev)
                .is_some_and(|d| d.table.get(*chunk) == ENTRY_UNMAPPED)
                .then_some(*chunk),
            Record::ShareDown { chunk, .. } | Record::Preserve { chunk, .. } => Some(*chunk),
            _ => None,
        };
        self.meta.apply(&rec)?;
        let drops_reader = matches!(
            rec,
            Record::DeleteDevice { .. } | Record::SetInoperative { .. }
        );
        if drops_reader || matches!(rec, Record::CreateDevice { .. }) {
            self.registry.store(Arc::new(self.meta.read_sides()));
        }
        let mut enc = Enc(std::mem::take(&mut self.records));
        rec.encode(&mut enc);
        self.records = enc.0;
        self.epoch += 1;
        let epoch = self.epoch;
        if drops_reader {
            self.readers_dropped_epoch = epoch;
        }
        if let Some(c) = shields {
            self.chunk_epochs[(c as usize) % CHUNK_EPOCH_SLOTS] = epoch;
        }
        if let Record::SetEntry { entry, .. } = rec {
            if let Some(b) = entry_to_block(entry) {
                self.fresh_blocks.insert(b, epoch);
            }
        }
        // One record can drop two references to a block (a snapshot's entry and the origin
        // copy it shared): free it once.
        let mut dropped = std::mem::take(&mut self.meta.dropped);
        dropped.sort_unstable();
        dropped.dedup();
        // Blocks a snapshot made inoperative or deleted left behind wait for a barrier over
        // the stripes after they are durable: a read holding a stripe across its transfer
        // (the engine's, or a queue's own, `direct.rs`) may still be reading one.
        let fenced = matches!(
            rec,
            Record::SetInoperative { .. } | Record::DeleteDevice { .. }
        );
        for b in dropped {
            self.pending_unref.insert(b, epoch);
            if self.meta.refcount(b) == 0 {
                if fenced {
                    self.fenced_free.push((epoch, b));
                } else {
                    self.pending_free.push((epoch, b));
                }
            }
        }
        Ok(epoch)
    }
}

impl CacheObject {
    /// Whether any snapshot exists: then a write may wait for a commit (its copy-out, or a
    /// child's view, must be durable first), which concurrent writes can share.
    pub fn has_snapshots(&self) -> bool {
        self.registry.load().iter().skip(1).any(Option::is_some)
    }

    /// The copy-on-write unit, bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Size of the origin, bytes.
    #[inline]
    pub fn origin_size(&self) -> u64 {
        self.origin_size.load(Ordering::Acquire)
    }

    /// Chunks of the origin image.
    pub(super) fn origin_chunks(&self) -> u64 {
        self.origin_size().div_ceil(self.chunk_size)
    }

    /// Bytes of the origin image in chunk `c` (0 past its end).
    #[inline]
    pub(super) fn chunk_len(&self, c: u64) -> usize {
        let start = c << self.chunk_shift;
        self.origin_size()
            .saturating_sub(start)
            .min(self.chunk_size) as usize
    }

    #[inline]
    pub(super) fn block_offset(&self, b: u64) -> u64 {
        self.data_offset + (b << self.chunk_shift)
    }

    #[inline]
    pub(super) fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    #[inline]
    pub(super) fn write_state(&self) -> StateGuard<'_> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks a request's range against `size`, the device's size.
    #[inline]
    pub(super) fn check_range(&self, size: u64, offset: u64, len: u64) -> Result<()> {
        let ok = offset.is_multiple_of(SECTOR_SIZE)
            && len.is_multiple_of(SECTOR_SIZE)
            && offset.checked_add(len).is_some_and(|end| end <= size);
        if ok && !self.failed.load(Ordering::Relaxed) {
            Ok(())
        } else if ok {
            Err(CowError::Failed)
        } else {
            Err(CowError::OutOfRange { offset, len })
        }
    }

    #[inline]
    pub(super) fn check_dev(meta: &Meta, dev: u64) -> Result<()> {
        match meta.dev(dev) {
            None => Err(CowError::NoDevice(DeviceId(dev))),
            Some(d) if d.inoperative => Err(CowError::Inoperative(DeviceId(dev))),
            Some(_) => Ok(()),
        }
    }
}

/// The daemon shares one engine between its queue threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CacheObject>();
};
