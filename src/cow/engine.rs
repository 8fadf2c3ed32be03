//! [`CacheObject`]: the data path, group commit, checkpoints and recovery.
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
//!   page tree ([`ReadSide`]) with lock-free loads. That needs, and this file keeps, one rule:
//!   **every change of any device's resolved entry at chunk c is made with c's stripe held
//!   exclusively.** The only records that change resolved entries are the `SetEntry` and
//!   `ShareDown` logged by `write_chunk_locked_deferred` for its chunk (and `Meta::propagate`
//!   under them, same chunk), whose callers hold that stripe (`write_chunk`,
//!   `write_origin_batched`, `restore`). `DeleteDevice` changes no surviving device's resolved
//!   entry (children unmapped at c already resolve to the entry it passes down to them), and the
//!   deleted table is retired (its readers are waited out by a barrier over the stripes before
//!   its blocks can be freed); `SetInoperative` replaces the table instead of changing it and
//!   retires the old one; `CreateDevice` only shares pages. A reader's entry therefore cannot
//!   change while it holds the stripe; other entries of the page and the page tree can, which
//!   `meta::Table` handles (copy-on-write pages, in place only when no one else can see them);
//! - `journal` (a `Mutex`) serializes commits; waiters for a commit that covers their change
//!   return without doing I/O (group commit).

use super::error::{corrupt, CowError, DeviceId, Result};
use super::format::{
    encode_ckpt_block, encode_txn, entry_block, entry_to_block, txn_len, Enc, Header, Record,
    CKPT_BLOCK_HEADER, ENTRY_UNMAPPED, ENTRY_ZERO, FORMAT_VERSION, HEADER_SLOT_SIZE,
    JOURNAL_OFFSET, NO_BLOCK, TXN_ALIGN, TXN_WRAP,
};
use super::history::OriginHistory;
use super::meta::{Meta, ReadSide, ReadStatus, View, META_REF, NO_PARENT, ORIGIN_ID};
use super::recovery::{read_header, recover};
use crate::storage::Storage;
use arc_swap::ArcSwap;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

const STRIPES: usize = 1024;
const CHUNK_EPOCH_SLOTS: usize = 1 << 16;
/// Multi-chunk origin writes up to this many chunks lock their stripes without allocating.
const SMALL_BATCH: usize = 16;
const SECTOR: u64 = 512;

/// Options for [`CacheObject::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Copy-on-write unit: a power of two, 4 KiB to 1 MiB.
    pub chunk_size: u64,
    /// Growth limit of the cache object file, bytes.
    pub max_size: u64,
    /// Warn (log and stats) when free space falls below this many bytes; 0 = 10% of the limit.
    pub low_space_threshold: u64,
    /// Size of the circular journal; a checkpoint is written when it is half full.
    pub journal_size: u64,
    /// Identity of the origin (e.g. its canonical path or a UUID); checked on open.
    pub origin_tag: String,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            chunk_size: 64 << 10,
            max_size: 1 << 40,
            low_space_threshold: 0,
            journal_size: 4 << 20,
            origin_tag: String::new(),
        }
    }
}

/// Options for [`CacheObject::open`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Raise the growth limit (a smaller value than the stored one is ignored).
    pub max_size: Option<u64>,
    /// Override the low-space threshold, bytes.
    pub low_space_threshold: Option<u64>,
    /// If set, must equal the tag given at create time.
    pub origin_tag: Option<String>,
}

/// Whether a device can do I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceState {
    Active,
    /// Its preserving copy could not be made for lack of space; reads and writes fail.
    Inoperative,
}

/// A device as listed by [`CacheObject::devices`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    pub id: u64,
    pub name: String,
    /// `None` for the origin.
    pub parent: Option<u64>,
    pub writable: bool,
    pub state: DeviceState,
    /// Chunks whose data this device maps to a cache block (shared or not).
    pub mapped_chunks: u64,
    /// Chunks mapped to a block only this device uses.
    pub owned_chunks: u64,
    /// Chunks mapped to zeros.
    pub zero_chunks: u64,
    /// Origin chunks copied since this snapshot was taken: its share of the origin's history,
    /// shared with every other snapshot taken before the same copies (it reads them where
    /// neither it nor an ancestor maps the chunk).
    #[serde(default)]
    pub preserved_chunks: u64,
    pub attrs: BTreeMap<String, String>,
}

/// Counters and space use.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub chunk_size: u64,
    pub blocks_used: u64,
    pub blocks_free: u64,
    /// Freed blocks waiting for the unmapping to be durable.
    pub blocks_pending_free: u64,
    pub blocks_max: u64,
    pub checkpoint_blocks: u64,
    pub free_bytes: u64,
    pub low_space: bool,
    /// Chunks copied from the origin to preserve snapshot views.
    pub copies: u64,
    pub bytes_copied: u64,
    /// Partial writes to a snapshot that filled a new block from the old view.
    pub cow_fills: u64,
    pub commits: u64,
    /// Commits that needed no data sync of their own: the previous commit's closing sync
    /// already covered the data their records map.
    #[serde(default)]
    pub data_syncs_skipped: u64,
    pub checkpoints: u64,
    pub devices: u64,
    pub inoperative_devices: u64,
    /// Bytes of memory held by the remap tables and the origin's history.
    pub table_memory_bytes: u64,
    /// Copies of origin chunks kept for snapshots (each shared by every snapshot taken
    /// between the chunk's previous copy and this one).
    #[serde(default)]
    pub preserved_copies: u64,
}

/// Geometry of the cache object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheInfo {
    pub chunk_size: u64,
    pub origin_size: u64,
    pub origin_tag: String,
    pub max_size: u64,
    pub journal_size: u64,
    pub data_offset: u64,
    pub low_space_threshold: u64,
}

/// What a write puts into its range.
#[derive(Clone, Copy)]
enum Src<'a> {
    Data(&'a [u8]),
    Zeroes,
    Discard,
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

/// Each device's [`ReadSide`] by id: how a read finds a device's mapping without the state
/// lock. Replaced (under the state lock) when a device is created, deleted or made inoperative.
type Registry = ArcSwap<Vec<Option<Arc<ReadSide>>>>;

/// Tables plus what is not yet durable.
struct State {
    meta: Meta,
    /// Shared with [`CacheObject::registry`]; republished by [`State::log`].
    registry: Arc<Registry>,
    /// Encoded records applied but not yet committed.
    records: Vec<u8>,
    /// Epoch of the last applied record.
    epoch: u64,
    /// Blocks whose reference count dropped in an uncommitted record: no in-place write into
    /// them until that record is durable (a crash could bring the other user back).
    pending_unref: HashMap<u64, u64>,
    /// Blocks freed by uncommitted records: not reusable until durable.
    pending_free: Vec<(u64, u64)>,
    /// Per chunk (modulo [`CHUNK_EPOCH_SLOTS`]): epoch of the last record that made some
    /// device stop reading through at that chunk. Until it is durable, a crash could make that
    /// device read through again, so the data it would read (the origin chunk, or its parent's
    /// block) must not be overwritten in place.
    chunk_epochs: Vec<u64>,
    /// Blocks newly mapped by uncommitted records: no durable mapping can reach them, so
    /// in-place writes into them are always safe.
    fresh_blocks: HashMap<u64, u64>,
    low_space_warned: bool,
    /// Epoch of the last record that took a device out of the origin's readers (a delete, or
    /// a device made inoperative). Until it is durable a crash can bring that device back, so
    /// an origin write that made no copy because of it must wait for it.
    readers_dropped_epoch: u64,
}

struct Journal {
    /// Next write position, relative to the journal start.
    pos: u64,
    /// Bytes written since the checkpoint.
    used: u64,
    next_seq: u64,
    header: Header,
    ckpt_blocks: Vec<u64>,
}

#[derive(Default)]
struct Counters {
    copies: AtomicU64,
    bytes_copied: AtomicU64,
    cow_fills: AtomicU64,
    data_syncs_skipped: AtomicU64,
    commits: AtomicU64,
    checkpoints: AtomicU64,
}

/// An origin and its snapshots, backed by one cache object.
pub struct CacheObject {
    origin: Arc<dyn Storage>,
    cache: Arc<dyn Storage>,
    chunk_size: u64,
    chunk_shift: u32,
    origin_size: u64,
    nchunks: u64,
    data_offset: u64,
    journal_size: u64,
    low_space_threshold: u64,
    state: RwLock<State>,
    /// Read without any lock by snapshot reads.
    registry: Arc<Registry>,
    /// The origin's preserved copies (the same object as the state's), read without any lock.
    history: Arc<OriginHistory>,
    stripes: Box<[RwLock<()>]>,
    journal: Mutex<Journal>,
    durable_epoch: AtomicU64,
    /// Records up to this epoch have their data (the copies and fills they map) durable: it
    /// was written before they were logged, and a cache sync started after they were logged.
    data_durable_epoch: AtomicU64,
    failed: AtomicBool,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    /// Applies a record and queues it for the next commit; returns its epoch.
    fn log(&mut self, rec: Record) -> Result<u64> {
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
        for b in dropped {
            self.pending_unref.insert(b, epoch);
            if self.meta.refcount(b) == 0 {
                self.pending_free.push((epoch, b));
            }
        }
        Ok(epoch)
    }
}

impl CacheObject {
    /// Creates a new, empty cache object for `origin` (overwriting `cache`).
    pub fn create(
        origin: Arc<dyn Storage>,
        cache: Arc<dyn Storage>,
        opts: CreateOptions,
    ) -> Result<Self> {
        let cs = opts.chunk_size;
        if !cs.is_power_of_two() || !(4096..=1 << 20).contains(&cs) {
            return Err(CowError::InvalidOption(format!(
                "chunk size {cs} must be a power of two from 4 KiB to 1 MiB"
            )));
        }
        let origin_size = origin.size();
        if origin_size == 0 || !origin_size.is_multiple_of(SECTOR) || origin_size > 1 << 56 {
            return Err(CowError::InvalidOption(format!(
                "origin size {origin_size} must be a non-zero multiple of 512, at most 2^56"
            )));
        }
        let js = opts.journal_size.div_ceil(TXN_ALIGN) * TXN_ALIGN;
        if js < 16 * 1024 {
            return Err(CowError::InvalidOption("journal size below 16 KiB".into()));
        }
        let data_offset = (JOURNAL_OFFSET + js).div_ceil(cs) * cs;
        if opts.max_size < data_offset + 4 * cs {
            return Err(CowError::InvalidOption(format!(
                "max size {} leaves no room for data (needs at least {})",
                opts.max_size,
                data_offset + 4 * cs
            )));
        }
        let header = Header {
            version: FORMAT_VERSION,
            generation: 1,
            incompat: 0,
            compat: 0,
            chunk_size: cs,
            origin_size,
            origin_tag: opts.origin_tag.clone(),
            journal_size: js,
            data_offset,
            max_size: opts.max_size,
            ckpt_block: NO_BLOCK,
            ckpt_len: 0,
            ckpt_crc: 0,
            ckpt_seq: 0,
            journal_start: 0,
        };
        // Truncating first makes the journal read as zeros: no stale transaction survives.
        cache.set_size(0)?;
        cache.set_size(data_offset)?;
        cache.write_at(&header.encode(), HEADER_SLOT_SIZE)?;
        cache.sync()?;
        Self::open(
            origin,
            cache,
            OpenOptions {
                low_space_threshold: Some(opts.low_space_threshold),
                ..Default::default()
            },
        )
    }

    /// Opens an existing cache object and recovers its state from the latest checkpoint and
    /// the journal after it. Reads no data blocks.
    pub fn open(
        origin: Arc<dyn Storage>,
        cache: Arc<dyn Storage>,
        opts: OpenOptions,
    ) -> Result<Self> {
        let mut header = read_header(cache.as_ref())?;
        if origin.size() != header.origin_size {
            return Err(CowError::WrongOrigin(format!(
                "origin is {} bytes, cache object was made for {} bytes",
                origin.size(),
                header.origin_size
            )));
        }
        if let Some(tag) = &opts.origin_tag {
            if *tag != header.origin_tag {
                return Err(CowError::WrongOrigin(format!(
                    "origin tag {tag:?}, cache object was made for {:?}",
                    header.origin_tag
                )));
            }
        }
        if let Some(m) = opts.max_size.filter(|&m| m > header.max_size) {
            // Persist the raised limit before any block above the old one can be allocated and
            // journaled: otherwise a later open without the option would find mappings out of
            // range. The other header slot stays valid if this write is torn.
            header.max_size = m;
            header.generation += 1;
            cache.write_at(&header.encode(), (header.generation % 2) * HEADER_SLOT_SIZE)?;
            cache.sync()?;
        }
        let recovered = recover(cache.as_ref(), &header)?;
        // Refuse rather than silently drop durable transactions after a damaged one.
        if let Some(p) = recovered.damage {
            return Err(CowError::Corrupt(p));
        }
        let cs = header.chunk_size;
        let max_blocks = (header.max_size - header.data_offset) / cs;
        let threshold = match opts.low_space_threshold {
            Some(0) | None => max_blocks * cs / 10,
            Some(t) => t,
        };
        let stripes = (0..STRIPES).map(|_| RwLock::new(())).collect();
        let registry = Arc::new(ArcSwap::from_pointee(recovered.meta.read_sides()));
        let history = recovered.meta.history.clone();
        Ok(Self {
            origin,
            cache,
            chunk_size: cs,
            chunk_shift: cs.trailing_zeros(),
            origin_size: header.origin_size,
            nchunks: header.origin_size.div_ceil(cs),
            data_offset: header.data_offset,
            journal_size: header.journal_size,
            low_space_threshold: threshold,
            registry: registry.clone(),
            history,
            state: RwLock::new(State {
                meta: recovered.meta,
                registry,
                records: Vec::new(),
                epoch: 0,
                pending_unref: HashMap::new(),
                pending_free: Vec::new(),
                chunk_epochs: vec![0; CHUNK_EPOCH_SLOTS],
                fresh_blocks: HashMap::new(),
                low_space_warned: false,
                readers_dropped_epoch: 0,
            }),
            stripes,
            journal: Mutex::new(Journal {
                pos: recovered.pos,
                used: recovered.used,
                next_seq: recovered.next_seq,
                header,
                ckpt_blocks: recovered.ckpt_blocks,
            }),
            durable_epoch: AtomicU64::new(0),
            data_durable_epoch: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            counters: Counters::default(),
        })
    }
}

impl CacheObject {
    // ---- geometry -------------------------------------------------------------------------

    /// Whether any snapshot exists: then a write may wait for a commit (its copy-out, or a
    /// child's view, must be durable first), which concurrent writes can share.
    pub fn has_snapshots(&self) -> bool {
        self.registry.load().iter().skip(1).any(Option::is_some)
    }

    /// The copy-on-write unit, bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Size of the origin and of every device, bytes.
    pub fn origin_size(&self) -> u64 {
        self.origin_size
    }

    /// Geometry and limits.
    pub fn cache_info(&self) -> CacheInfo {
        let j = lock(&self.journal);
        CacheInfo {
            chunk_size: self.chunk_size,
            origin_size: self.origin_size,
            origin_tag: j.header.origin_tag.clone(),
            max_size: j.header.max_size,
            journal_size: self.journal_size,
            data_offset: self.data_offset,
            low_space_threshold: self.low_space_threshold,
        }
    }

    fn chunk_len(&self, c: u64) -> usize {
        (self.origin_size - (c << self.chunk_shift)).min(self.chunk_size) as usize
    }

    fn block_offset(&self, b: u64) -> u64 {
        self.data_offset + (b << self.chunk_shift)
    }

    fn stripe(&self, c: u64) -> &RwLock<()> {
        &self.stripes[(c as usize) % STRIPES]
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The read side of `dev` in a loaded registry.
    fn read_side(registry: &[Option<Arc<ReadSide>>], dev: u64) -> Result<&ReadSide> {
        registry
            .get(dev as usize)
            .and_then(Option::as_deref)
            .ok_or(CowError::NoDevice(DeviceId(dev)))
    }

    fn check_read_status(side: &ReadSide, dev: u64) -> Result<()> {
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
    fn view(&self, side: &ReadSide, c: u64) -> View {
        match side.resolved(c) {
            ENTRY_UNMAPPED => View::of_entry(self.history.lookup(c, side.otime())),
            e => View::of_entry(e),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let ok = offset.is_multiple_of(SECTOR)
            && len.is_multiple_of(SECTOR)
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.origin_size);
        if ok && !self.failed.load(Ordering::Relaxed) {
            Ok(())
        } else if ok {
            Err(CowError::Failed)
        } else {
            Err(CowError::OutOfRange { offset, len })
        }
    }

    fn check_dev(meta: &Meta, dev: u64) -> Result<()> {
        match meta.dev(dev) {
            None => Err(CowError::NoDevice(DeviceId(dev))),
            Some(d) if d.inoperative => Err(CowError::Inoperative(DeviceId(dev))),
            Some(_) => Ok(()),
        }
    }

    // ---- data path ------------------------------------------------------------------------

    /// Reads into several buffers from `offset` on: the vectored form of [`Self::read`].
    ///
    /// The origin's view is always the origin image itself (restore copies data into it), so
    /// an origin read is one vectored read of the image, with no lock and no table lookup: a
    /// read racing a write to the same range may see either, as on any disk.
    pub fn read_vectored(
        &self,
        dev: DeviceId,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(offset, len)?;
        if dev == DeviceId::ORIGIN {
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
        self.check_range(offset, buf.len() as u64)?;
        // A guard, not an `Arc` clone: no shared counter for concurrent readers to contend on.
        let registry = self.registry.load();
        let side = Self::read_side(&registry, dev.0)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let c = pos >> self.chunk_shift;
            let inoff = pos & (self.chunk_size - 1);
            let n = ((self.chunk_size - inoff) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            let _stripe = self
                .stripe(c)
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            Self::check_read_status(side, dev.0)?;
            match self.view(side, c) {
                View::Origin => self.origin.read_at(piece, pos)?,
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
        Ok(())
    }

    /// Writes `buf` to device `dev` at `offset`.
    pub fn write(&self, dev: DeviceId, offset: u64, buf: &[u8]) -> Result<()> {
        self.change(dev, offset, buf.len() as u64, Src::Data(buf))
    }

    /// Makes `[offset, offset+len)` of `dev` read as zeros.
    pub fn write_zeroes(&self, dev: DeviceId, offset: u64, len: u64) -> Result<()> {
        self.change(dev, offset, len, Src::Zeroes)
    }

    /// Discards `[offset, offset+len)` of `dev`; it reads as zeros afterwards and whole chunks
    /// release their blocks. Other devices keep their views.
    pub fn discard(&self, dev: DeviceId, offset: u64, len: u64) -> Result<()> {
        self.change(dev, offset, len, Src::Discard)
    }

    /// Changes `[offset, offset+len)` of `dev` to what `src` says, chunk by chunk (origin
    /// writes spanning chunks are batched: their copies share one commit).
    fn change(&self, dev: DeviceId, offset: u64, len: u64, src: Src<'_>) -> Result<()> {
        self.check_range(offset, len)?;
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
            let mut idx = [0usize; SMALL_BATCH];
            for (k, slot) in idx.iter_mut().enumerate().take(n) {
                *slot = ((first as usize) + k) % STRIPES;
            }
            idx[..n].sort_unstable();
            let mut guards: [Option<RwLockWriteGuard<'_, ()>>; SMALL_BATCH] = Default::default();
            for k in 0..n {
                if k == 0 || idx[k] != idx[k - 1] {
                    guards[k] = Some(
                        self.stripes[idx[k]]
                            .write()
                            .unwrap_or_else(PoisonError::into_inner),
                    );
                }
            }
            return self.write_origin_batched_locked(offset, len, src);
        }
        let mut stripes: Vec<usize> = (first..=last).map(|c| (c as usize) % STRIPES).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let _guards: Vec<_> = stripes
            .iter()
            .map(|&i| {
                self.stripes[i]
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
            })
            .collect();
        self.write_origin_batched_locked(offset, len, src)
    }

    fn write_origin_batched_locked(&self, offset: u64, len: u64, src: Src<'_>) -> Result<()> {
        let mut wait = 0u64;
        self.for_each_chunk(offset, len, |c, inoff, n, done| {
            let piece = src.part(done, n);
            self.write_chunk_locked_deferred(ORIGIN_ID, c, inoff, n, piece, Some(&mut wait))
        })?;
        if wait > self.durable_epoch.load(Ordering::Acquire) {
            // Copies and mappings durable before the origin changes.
            self.commit(wait, false)?;
        }
        match src {
            Src::Data(buf) => self.origin.write_at(buf, offset)?,
            Src::Zeroes => self.origin.write_zeroes(offset, len)?,
            Src::Discard => self.origin.punch_hole(offset, len)?,
        }
        Ok(())
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
        let _stripe = self
            .stripe(c)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.write_chunk_locked(dev, c, inoff, len, src)
    }

    /// Allocates a block for data, keeping back the room the next checkpoint needs.
    fn alloc_data(&self, st: &mut State) -> Option<u64> {
        let m = &st.meta;
        // An upper bound of the next checkpoint's size, O(1): per device slot 1 KiB for its
        // record (names are at most 255 bytes; attributes are small), 16 bytes per entry.
        let ckpt_bytes =
            64 + m.devices.len() as u64 * 1024 + (m.total_entries + 2 * m.history_copies + 64) * 16;
        let reserve = ckpt_bytes.div_ceil(self.chunk_size - CKPT_BLOCK_HEADER as u64) + 1;
        if m.free_blocks() <= reserve {
            return None;
        }
        let b = st.meta.alloc()?;
        let free_bytes = st.meta.free_blocks() * self.chunk_size;
        if free_bytes < self.low_space_threshold {
            if !st.low_space_warned {
                log::warn!(
                    "cache object low on space: {free_bytes} bytes free, threshold {}",
                    self.low_space_threshold
                );
                st.low_space_warned = true;
            }
        } else {
            st.low_space_warned = false;
        }
        Some(b)
    }

    /// Copies the origin's chunk `c` into block `b`.
    fn copy_origin_chunk(&self, c: u64, b: u64) -> Result<()> {
        let n = self.chunk_len(c);
        let mut buf = vec![0u8; n];
        self.origin.read_at(&mut buf, c << self.chunk_shift)?;
        self.cache.write_at(&buf, self.block_offset(b))?;
        self.counters.copies.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_copied
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Marks inoperative every operative snapshot that reads the origin image at `c` (it is
    /// newer than the chunk's newest copy and neither it nor an ancestor maps the chunk), with
    /// its subtree. O(devices), on this rare path only.
    fn fail_unpreservable(&self, st: &mut State, c: u64) -> Result<u64> {
        let m = &st.meta;
        let mut todo: Vec<u64> = m
            .devices
            .iter()
            .flatten()
            .filter(|d| d.id != ORIGIN_ID && !d.inoperative && m.resolve(d.id, c) == View::Origin)
            .map(|d| d.id)
            .collect();
        let mut epoch = st.epoch;
        while let Some(id) = todo.pop() {
            let Some(d) = st.meta.dev(id) else { continue };
            todo.extend_from_slice(&d.children);
            if d.inoperative {
                continue;
            }
            log::error!(
                "snapshot {} ({:?}) is now inoperative: no space in the cache object to preserve chunk {c}",
                id,
                d.name
            );
            epoch = st.log(Record::SetInoperative { dev: id })?;
        }
        Ok(epoch)
    }

    fn free_unused(st: &mut State, b: u64) {
        st.meta.free.push(b);
    }

    /// The write rule (DESIGN.md §4) for one chunk, stripe lock held.
    fn write_chunk_locked(
        &self,
        dev: u64,
        c: u64,
        inoff: usize,
        len: usize,
        src: Src<'_>,
    ) -> Result<()> {
        self.write_chunk_locked_deferred(dev, c, inoff, len, src, None)
    }

    /// With `defer_origin`, an origin write only prepares (step 1) and raises the epoch that
    /// must be durable before the origin may change; the caller commits once and writes.
    fn write_chunk_locked_deferred(
        &self,
        dev: u64,
        c: u64,
        inoff: usize,
        len: usize,
        src: Src<'_>,
        mut defer_origin: Option<&mut u64>,
    ) -> Result<()> {
        let clen = self.chunk_len(c);
        let full = inoff == 0 && len == clen;
        let mut retried_for_space = false;
        loop {
            let mut st = self.write_state();
            Self::check_dev(&st.meta, dev)?;
            if st.meta.dev(dev).is_some_and(|d| !d.writable) {
                return Err(CowError::ReadOnly(DeviceId(dev)));
            }
            // Step 1: devices reading our view here get our old view first. For the origin:
            // one copy, stamped with the snapshot clock, serves every snapshot taken since the
            // chunk's previous copy, whatever their number.
            let mut must_be_durable = None;
            if st.meta.view_shared(dev, c) {
                match st.meta.resolve(dev, c) {
                    View::Origin => match self.alloc_data(&mut st) {
                        Some(nb) => {
                            drop(st);
                            let copied = self.copy_origin_chunk(c, nb);
                            st = self.write_state();
                            if let Err(e) = copied.and_then(|()| Self::check_dev(&st.meta, dev)) {
                                Self::free_unused(&mut st, nb);
                                return Err(e);
                            }
                            if st.meta.view_shared(dev, c) {
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
                                must_be_durable = Some(st.log(rec)?);
                            } else {
                                Self::free_unused(&mut st, nb);
                            }
                        }
                        None if !retried_for_space && !st.pending_free.is_empty() => {
                            retried_for_space = true;
                            let e = st.epoch;
                            drop(st);
                            self.commit(e, false)?;
                            continue;
                        }
                        None if dev == ORIGIN_ID => {
                            must_be_durable = Some(self.fail_unpreservable(&mut st, c)?);
                        }
                        None => return Err(CowError::NoSpace),
                    },
                    view => {
                        // Sharing a block or zeros: no data moves.
                        st.log(Record::ShareDown {
                            dev,
                            chunk: c,
                            entry: view.entry(),
                        })?;
                    }
                }
            }
            // Step 2: our own change.
            if dev == ORIGIN_ID {
                // Also wait for any delete or inoperative marking not yet durable: it may be
                // why no copy was needed, and a crash could bring that reader back.
                let shield =
                    st.chunk_epochs[(c as usize) % CHUNK_EPOCH_SLOTS].max(st.readers_dropped_epoch);
                drop(st);
                if let Some(wait) = defer_origin.as_deref_mut() {
                    *wait = (*wait).max(shield).max(must_be_durable.unwrap_or(0));
                    return Ok(());
                }
                if shield > self.durable_epoch.load(Ordering::Acquire) {
                    self.commit(shield, false)?;
                }
                if let Some(e) = must_be_durable {
                    // The copy and the mapping to it must be durable before the origin changes.
                    self.commit(e, false)?;
                }
                let pos = (c << self.chunk_shift) + inoff as u64;
                match src {
                    Src::Data(buf) => self.origin.write_at(buf, pos)?,
                    Src::Zeroes => self.origin.write_zeroes(pos, len as u64)?,
                    Src::Discard => self.origin.punch_hole(pos, len as u64)?,
                }
                return Ok(());
            }
            let cur = st.meta.dev(dev).map_or(0, |d| d.table.get(c));
            if full && !matches!(src, Src::Data(_)) {
                if cur != ENTRY_ZERO {
                    st.log(Record::SetEntry {
                        dev,
                        chunk: c,
                        entry: ENTRY_ZERO,
                    })?;
                }
                return Ok(());
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
                        drop(st);
                        self.commit(wait, false)?;
                        continue;
                    }
                    drop(st);
                    let pos = self.block_offset(b) + inoff as u64;
                    match src {
                        Src::Data(buf) => self.cache.write_at(buf, pos)?,
                        Src::Zeroes | Src::Discard => self.cache.write_zeroes(pos, len as u64)?,
                    }
                    return Ok(());
                }
            }
            // Into a new block.
            let Some(nb) = self.alloc_data(&mut st) else {
                if !retried_for_space && !st.pending_free.is_empty() {
                    retried_for_space = true;
                    let e = st.epoch;
                    drop(st);
                    self.commit(e, false)?;
                    continue;
                }
                return Err(CowError::NoSpace);
            };
            let view = st.meta.resolve(dev, c);
            drop(st);
            let filled = self.fill_new_block(c, nb, inoff, len, src, view, full);
            let mut st = self.write_state();
            if let Err(e) = filled.and_then(|()| Self::check_dev(&st.meta, dev)) {
                Self::free_unused(&mut st, nb);
                return Err(e);
            }
            if st.meta.has_unmapped_child(dev, c) {
                // A snapshot of `dev` was created (or moved under it by a delete) while the lock
                // was dropped: it must get our old view (step 1) before our entry changes, or it
                // would keep resolving to a block we are about to release. Start over.
                Self::free_unused(&mut st, nb);
                continue;
            }
            st.log(Record::SetEntry {
                dev,
                chunk: c,
                entry: entry_block(nb),
            })?;
            return Ok(());
        }
    }

    /// Writes a new block: the piece, plus (for a partial write) the rest from the old view.
    #[allow(clippy::too_many_arguments)]
    fn fill_new_block(
        &self,
        c: u64,
        nb: u64,
        inoff: usize,
        len: usize,
        src: Src<'_>,
        old: View,
        full: bool,
    ) -> Result<()> {
        let at = self.block_offset(nb);
        if full {
            // A whole-chunk write never reads the old data.
            if let Src::Data(buf) = src {
                self.cache.write_at(buf, at)?;
            }
            return Ok(());
        }
        let clen = self.chunk_len(c);
        let mut buf = vec![0u8; clen];
        match old {
            View::Origin => self.origin.read_at(&mut buf, c << self.chunk_shift)?,
            View::Zero => {}
            View::Block(b) => self.cache.read_at(&mut buf, self.block_offset(b))?,
        }
        match src {
            Src::Data(d) => buf[inoff..inoff + len].copy_from_slice(d),
            Src::Zeroes | Src::Discard => buf[inoff..inoff + len].fill(0),
        }
        self.cache.write_at(&buf, at)?;
        self.counters.cow_fills.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Makes every completed write (origin and snapshots) and every metadata change durable.
    pub fn flush(&self) -> Result<()> {
        let e = self.read_state().epoch;
        self.commit(e, true)?;
        self.origin.sync()?;
        Ok(())
    }

    /// FLUSH as a device sees it: every completed write of `dev` durable. Writes of one device
    /// can depend on other devices' metadata (copy-outs, shared blocks), so this makes
    /// everything durable; it fails only for a device that does not exist or is inoperative.
    pub fn flush_device(&self, dev: DeviceId) -> Result<()> {
        Self::check_dev(&self.read_state().meta, dev.0)?;
        self.flush()
    }

    // ---- group commit ---------------------------------------------------------------------

    /// Makes every record up to `epoch` durable. Concurrent callers share one commit: whoever
    /// holds the journal lock commits everything queued so far, and the others find their
    /// epoch durable when they get the lock. `sync_data` also forces a sync when no record is
    /// pending (FLUSH of in-place writes).
    fn commit(&self, epoch: u64, sync_data: bool) -> Result<()> {
        let mut j = lock(&self.journal);
        if !sync_data && self.durable_epoch.load(Ordering::Acquire) >= epoch {
            return Ok(());
        }
        if self.failed.load(Ordering::Relaxed) {
            return Err(CowError::Failed);
        }
        let released = match self.commit_locked(&mut j) {
            Ok(released) => released,
            Err(e) => {
                // Memory and disk no longer agree; stop rather than risk a wrong mapping.
                self.failed.store(true, Ordering::Relaxed);
                log::error!("cache object commit failed; engine stopped");
                return Err(e);
            }
        };
        drop(j);
        self.release_blocks(released);
        Ok(())
    }

    /// Punches blocks whose unmapping is durable out of the file (outside the journal lock, so
    /// other commits go on), then makes them allocatable. Meanwhile they are in neither list,
    /// so nothing can allocate them.
    fn release_blocks(&self, mut released: Vec<u64>) {
        if released.is_empty() {
            return;
        }
        released.sort_unstable();
        let mut i = 0;
        while i < released.len() {
            let mut j = i + 1;
            while j < released.len() && released[j] == released[j - 1] + 1 {
                j += 1;
            }
            let len = (j - i) as u64 * self.chunk_size;
            if let Err(e) = self.cache.punch_hole(self.block_offset(released[i]), len) {
                // Not fatal: the blocks are reused either way.
                log::warn!("punching freed cache blocks failed: {e}");
            }
            i = j;
        }
        let mut st = self.write_state();
        st.meta.free.extend(released);
        // Lowest blocks first keeps the file compact.
        st.meta.free.sort_unstable_by(|a, b| b.cmp(a));
    }

    /// Commits; returns the blocks whose unmapping became durable.
    fn commit_locked(&self, j: &mut Journal) -> Result<Vec<u64>> {
        let js = self.journal_size;
        // Take the queued records; decide between a journal transaction and a checkpoint.
        let (payload, upto, ckpt) = {
            let mut st = self.write_state();
            let payload = std::mem::take(&mut st.records);
            let upto = st.epoch;
            let need = txn_len(payload.len());
            let wrap_waste = if j.pos + need + TXN_ALIGN > js {
                js - j.pos
            } else {
                0
            };
            let ckpt = if j.used + wrap_waste + need > js / 2 {
                self.prepare_checkpoint(&mut st)
            } else {
                None
            };
            if ckpt.is_none() && j.used + wrap_waste + need + TXN_ALIGN > js {
                return Err(CowError::NoSpace);
            }
            (payload, upto, ckpt)
        };
        if payload.is_empty() && ckpt.is_none() {
            self.sync_cache()?;
        } else if let Some((bytes, blocks)) = ckpt {
            self.write_checkpoint(j, &bytes, blocks)?;
        } else {
            // Data of new blocks is durable before the records that map them. Under load,
            // the previous commit's closing sync often covered it already: then one sync per
            // commit, not two.
            if upto > self.data_durable_epoch.load(Ordering::Acquire) {
                self.cache.sync()?;
            } else {
                self.counters
                    .data_syncs_skipped
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.append_txn(j, &payload)?;
            self.sync_cache()?;
        }
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        // Unmappings up to `upto` are durable: their blocks may be reused or changed in place.
        let mut st = self.write_state();
        let mut released = Vec::new();
        st.pending_free.retain(|&(e, b)| {
            if e <= upto {
                released.push(b);
                false
            } else {
                true
            }
        });
        st.pending_unref.retain(|_, e| *e > upto);
        st.fresh_blocks.retain(|_, e| *e > upto);
        released.retain(|&b| st.meta.refcount(b) == 0);
        drop(st);
        self.durable_epoch.store(upto, Ordering::Release);
        Ok(released)
    }

    /// Syncs the cache file and notes which records' data that made durable: every record
    /// logged before the sync started had its data written before it was logged.
    fn sync_cache(&self) -> Result<()> {
        let logged = self.read_state().epoch;
        self.cache.sync()?;
        self.data_durable_epoch.fetch_max(logged, Ordering::AcqRel);
        Ok(())
    }

    fn append_txn(&self, j: &mut Journal, payload: &[u8]) -> Result<()> {
        let js = self.journal_size;
        let len = txn_len(payload.len());
        if j.pos + len + TXN_ALIGN > js {
            let marker = encode_txn(j.next_seq, TXN_WRAP, &[]);
            self.cache.write_at(&marker, JOURNAL_OFFSET + j.pos)?;
            j.next_seq += 1;
            j.used += js - j.pos;
            j.pos = 0;
        }
        let txn = encode_txn(j.next_seq, 0, payload);
        self.cache.write_at(&txn, JOURNAL_OFFSET + j.pos)?;
        j.next_seq += 1;
        j.pos += len;
        j.used += len;
        Ok(())
    }

    /// Serializes the state (which includes every applied record) and allocates its blocks.
    fn prepare_checkpoint(&self, st: &mut State) -> Option<(Vec<u8>, Vec<u64>)> {
        let bytes = st.meta.encode_checkpoint();
        let per_block = (self.chunk_size as usize) - CKPT_BLOCK_HEADER;
        let n = bytes.len().div_ceil(per_block).max(1);
        let mut blocks = Vec::with_capacity(n);
        for _ in 0..n {
            match st.meta.alloc() {
                Some(b) => blocks.push(b),
                None => {
                    for b in blocks {
                        st.meta.free.push(b);
                    }
                    log::warn!("no space for a checkpoint; journal keeps growing");
                    return None;
                }
            }
        }
        for &b in &blocks {
            st.meta.refcounts[b as usize] = META_REF;
        }
        Some((bytes, blocks))
    }

    /// Writes a checkpoint and points the header at it. Ordering: data and checkpoint blocks,
    /// sync, header, sync; only then are the old checkpoint's blocks freed.
    fn write_checkpoint(&self, j: &mut Journal, bytes: &[u8], blocks: Vec<u64>) -> Result<()> {
        let per_block = (self.chunk_size as usize) - CKPT_BLOCK_HEADER;
        for (i, &b) in blocks.iter().enumerate() {
            let data = bytes
                .get(i * per_block..((i + 1) * per_block).min(bytes.len()))
                .unwrap_or(&[]);
            let next = blocks.get(i + 1).copied().unwrap_or(NO_BLOCK);
            let enc = encode_ckpt_block(i as u32, next, data, self.chunk_size as usize);
            self.cache.write_at(&enc, self.block_offset(b))?;
        }
        self.cache.sync()?;
        let mut h = j.header.clone();
        h.version = FORMAT_VERSION;
        h.generation += 1;
        h.ckpt_block = blocks[0];
        h.ckpt_len = bytes.len() as u64;
        h.ckpt_crc = crc32c::crc32c(bytes);
        h.ckpt_seq = j.next_seq - 1;
        h.journal_start = j.pos;
        self.cache
            .write_at(&h.encode(), (h.generation % 2) * HEADER_SLOT_SIZE)?;
        self.cache.sync()?;
        j.header = h;
        j.used = 0;
        let old = std::mem::replace(&mut j.ckpt_blocks, blocks);
        let mut st = self.write_state();
        for b in old {
            st.meta.refcounts[b as usize] = 0;
            st.meta.free.push(b);
        }
        self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl CacheObject {
    // ---- control plane --------------------------------------------------------------------

    /// Creates a snapshot of `parent` (the origin or any snapshot) in O(1): a table sharing the
    /// parent's pages and a link. Returns once the new device record is durable. It does not
    /// flush the origin: like the parent, the snapshot holds the parent's writes not yet flushed
    /// at creation only as durably as the parent does (a crash may drop any of them from both).
    /// Call [`CacheObject::flush`] first for a fully durable point-in-time copy.
    pub fn create_snapshot(
        &self,
        parent: DeviceId,
        name: &str,
        writable: bool,
    ) -> Result<DeviceId> {
        if name.is_empty() || name.len() > 255 {
            return Err(CowError::InvalidOption(
                "device name must be 1 to 255 bytes".into(),
            ));
        }
        let (id, epoch) = {
            let mut st = self.write_state();
            Self::check_dev(&st.meta, parent.0)?;
            if st.meta.devices.iter().flatten().any(|d| d.name == name) {
                return Err(CowError::NameInUse(name.to_string()));
            }
            let id = st.meta.next_id;
            let e = st.log(Record::CreateDevice {
                id,
                parent: parent.0,
                writable,
                name: name.to_string(),
            })?;
            (id, e)
        };
        self.commit(epoch, false)?;
        Ok(DeviceId(id))
    }

    /// Deletes a snapshot, copying no data: each of its blocks passes to its children that are
    /// unmapped there, or is freed once the deletion is durable. Its children move up to its
    /// parent. Time is proportional to the chunks it maps.
    pub fn delete_snapshot(&self, id: DeviceId) -> Result<()> {
        if id == DeviceId::ORIGIN {
            return Err(CowError::Origin("deleted"));
        }
        let epoch = {
            let mut st = self.write_state();
            if st.meta.dev(id.0).is_none() {
                return Err(CowError::NoDevice(id));
            }
            st.log(Record::DeleteDevice { id: id.0 })?
        };
        // Wait out requests that resolved a mapping of the deleted device before it went.
        for s in self.stripes.iter() {
            drop(s.write().unwrap_or_else(PoisonError::into_inner));
        }
        self.commit(epoch, false)
    }

    /// Rolls the origin back to snapshot `from`: every chunk where `from` does not read through
    /// to the origin is written into the origin (with the usual copy-out for the origin's other
    /// snapshots). Cost: one chunk read and write per chunk `from` (or an ancestor below the
    /// origin) maps, plus a metadata walk over all chunks. `from` and every other device keep
    /// their views. Flushes at the end.
    pub fn restore(&self, from: DeviceId) -> Result<()> {
        if from == DeviceId::ORIGIN {
            return Err(CowError::Origin("restored from itself"));
        }
        let registry = self.registry.load_full();
        let side = Self::read_side(&registry, from.0)?;
        let mut buf = vec![0u8; self.chunk_size as usize];
        for c in 0..self.nchunks {
            let _stripe = self
                .stripe(c)
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            Self::check_read_status(side, from.0)?;
            let view = self.view(side, c);
            let clen = self.chunk_len(c);
            match view {
                View::Origin => {}
                View::Zero => self.write_chunk_locked(ORIGIN_ID, c, 0, clen, Src::Zeroes)?,
                View::Block(b) => {
                    self.cache.read_at(&mut buf[..clen], self.block_offset(b))?;
                    // Made inoperative meanwhile (under another stripe), `from` may have lost
                    // that block to another user: never copy such data into the origin.
                    Self::check_read_status(side, from.0)?;
                    self.write_chunk_locked(ORIGIN_ID, c, 0, clen, Src::Data(&buf[..clen]))?;
                }
            }
        }
        self.flush()
    }

    /// Sets (or with `None` removes) a persistent attribute of a device (e.g. its serial or
    /// the socket it is served on). Durable on return.
    pub fn set_device_attr(&self, dev: DeviceId, key: &str, value: Option<&str>) -> Result<()> {
        let epoch = {
            let mut st = self.write_state();
            if st.meta.dev(dev.0).is_none() {
                return Err(CowError::NoDevice(dev));
            }
            st.log(Record::SetAttr {
                dev: dev.0,
                key: key.to_string(),
                value: value.map(str::to_string),
            })?
        };
        self.commit(epoch, false)
    }

    /// All devices, origin first.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        let st = self.read_state();
        let m = &st.meta;
        // A snapshot of time t has a copy of chunk c iff c's newest copy is stamped >= t.
        let mut newest: Vec<u64> = Vec::new();
        m.history.for_each_in(0, u64::MAX, |_, copies| {
            newest.extend(copies.last().map(|p| p.time));
        });
        newest.sort_unstable();
        m.devices
            .iter()
            .flatten()
            .map(|d| {
                let preserved = if d.id == ORIGIN_ID || d.inoperative {
                    0
                } else {
                    (newest.len() - newest.partition_point(|&t| t < d.otime)) as u64
                };
                let mut owned = 0;
                let mut zero = 0;
                for (_, e) in d.table.mapped() {
                    match entry_to_block(e) {
                        Some(b) if m.refcount(b) == 1 => owned += 1,
                        Some(_) => {}
                        None => zero += 1,
                    }
                }
                DeviceInfo {
                    id: d.id,
                    name: d.name.clone(),
                    parent: (d.parent != NO_PARENT).then_some(d.parent),
                    writable: d.writable,
                    state: if d.inoperative {
                        DeviceState::Inoperative
                    } else {
                        DeviceState::Active
                    },
                    mapped_chunks: d.mapped_blocks,
                    owned_chunks: owned,
                    zero_chunks: zero,
                    preserved_chunks: preserved,
                    attrs: d.attrs.clone(),
                }
            })
            .collect()
    }

    /// Information about one device.
    pub fn device(&self, id: DeviceId) -> Option<DeviceInfo> {
        self.devices().into_iter().find(|d| d.id == id.0)
    }

    /// Space use and counters.
    pub fn stats(&self) -> Stats {
        let ckpt_blocks = lock(&self.journal).ckpt_blocks.len() as u64;
        let st = self.read_state();
        let m = &st.meta;
        let blocks_used = m
            .refcounts
            .iter()
            .filter(|&&r| r != 0 && r != META_REF)
            .count() as u64;
        let free = m.free_blocks();
        let c = &self.counters;
        Stats {
            chunk_size: self.chunk_size,
            blocks_used,
            blocks_free: free,
            blocks_pending_free: st.pending_free.len() as u64,
            blocks_max: m.max_blocks,
            checkpoint_blocks: ckpt_blocks,
            free_bytes: free * self.chunk_size,
            low_space: free * self.chunk_size < self.low_space_threshold,
            copies: c.copies.load(Ordering::Relaxed),
            bytes_copied: c.bytes_copied.load(Ordering::Relaxed),
            cow_fills: c.cow_fills.load(Ordering::Relaxed),
            data_syncs_skipped: c.data_syncs_skipped.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
            checkpoints: c.checkpoints.load(Ordering::Relaxed),
            devices: m.devices.iter().flatten().count() as u64,
            inoperative_devices: m.devices.iter().flatten().filter(|d| d.inoperative).count()
                as u64,
            table_memory_bytes: {
                let mut pages = std::collections::HashSet::new();
                let mut bytes = 0u64;
                for d in m.devices.iter().flatten() {
                    let (p, b) = d.table.memory();
                    pages.extend(p);
                    bytes += b as u64;
                }
                bytes
                    + pages.len() as u64 * super::meta::PAGE_BYTES as u64
                    + m.history.memory() as u64
            },
            preserved_copies: m.history_copies,
        }
    }

    /// Verifies the live in-memory invariants: reference counts equal the mappings, no block
    /// is both free and used. For tests and debugging.
    pub fn verify_in_memory(&self) -> Result<()> {
        let st = self.read_state();
        let m = &st.meta;
        let mut counts: HashMap<u64, u32> = HashMap::new();
        for d in m.devices.iter().flatten() {
            for (_, e) in d.table.mapped() {
                if let Some(b) = entry_to_block(e) {
                    *counts.entry(b).or_default() += 1;
                }
            }
        }
        m.history.for_each_in(0, u64::MAX, |_, copies| {
            for p in copies {
                if let Some(b) = entry_to_block(p.entry) {
                    *counts.entry(b).or_default() += 1;
                }
            }
        });
        for (b, &r) in m.refcounts.iter().enumerate() {
            let want = counts.get(&(b as u64)).copied().unwrap_or(0);
            if r != META_REF && r != want {
                return Err(corrupt(format!("block {b}: refcount {r}, mappings {want}")));
            }
        }
        for &b in &m.free {
            if m.refcount(b) != 0 {
                return Err(corrupt(format!("block {b} is free and used")));
            }
        }
        // Lock-free readers must find exactly the tables the state holds.
        let registry = self.registry.load();
        for (id, d) in m.devices.iter().enumerate() {
            let published = registry.get(id).and_then(Option::as_ref);
            let ok = match (d, published) {
                (Some(d), Some(p)) => {
                    Arc::ptr_eq(d.table.read_side(), p)
                        && (p.status() == ReadStatus::Inoperative) == d.inoperative
                }
                (None, None) => true,
                _ => false,
            };
            if !ok {
                return Err(corrupt(format!(
                    "device {id}: registry differs from the state"
                )));
            }
        }
        for d in m.devices.iter().flatten().filter(|d| !d.inoperative) {
            for c in 0..m.nchunks {
                if m.resolve(d.id, c) != m.resolve_by_walk(d.id, c) {
                    return Err(corrupt(format!(
                        "device {} chunk {c}: flattened table {:?}, walk {:?}",
                        d.id,
                        m.resolve(d.id, c),
                        m.resolve_by_walk(d.id, c)
                    )));
                }
            }
        }
        Ok(())
    }
}

impl Drop for CacheObject {
    /// A clean close commits everything, like a FLUSH.
    fn drop(&mut self) {
        if !self.failed.load(Ordering::Relaxed) {
            if let Err(e) = self.flush() {
                log::error!("flush on close failed: {e}");
            }
        }
    }
}

/// The daemon shares one engine between its queue threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CacheObject>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::mem::MemStorage;
    use std::sync::mpsc;
    use std::time::Duration;

    const CHUNK: u64 = 4096;

    impl CacheObject {
        /// Holds every engine-wide lock (the state lock for writing and the journal mutex) for
        /// as long as the returned guards live: what a long commit or checkpoint does.
        fn hold_global_locks(&self) -> (RwLockWriteGuard<'_, State>, MutexGuard<'_, Journal>) {
            let j = lock(&self.journal);
            (self.write_state(), j)
        }
    }

    /// An engine over an in-memory origin of `chunks` chunks and an in-memory cache object.
    fn mem_engine(chunks: u64) -> CacheObject {
        let origin = Arc::new(MemStorage::new(chunks * CHUNK));
        let cache = Arc::new(MemStorage::new(0));
        CacheObject::create(
            origin,
            cache,
            CreateOptions {
                chunk_size: CHUNK,
                max_size: 1 << 30,
                journal_size: 64 << 10,
                ..Default::default()
            },
        )
        .unwrap()
    }

    /// A delete takes effect in memory before it is durable. An origin write in between, which
    /// needs no copy only because the snapshot is gone, must not change the origin until the
    /// delete is durable: after a crash the snapshot would be back, reading the new data.
    #[test]
    fn an_origin_write_after_an_uncommitted_delete_waits_for_it() {
        let eng = mem_engine(16);
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

    /// A snapshot read resolves its mapping under its chunk's stripe lock and lock-free loads
    /// only: it completes while another thread holds the state and journal locks.
    #[test]
    fn snapshot_read_takes_no_engine_wide_lock() {
        let eng = mem_engine(64);
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
