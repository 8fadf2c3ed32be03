//! The in-memory metadata: device tree, remap tables, reference counts and the block allocator.
//!
//! Every change goes through [`Meta::apply`] (in `apply.rs`), both live and during journal
//! replay, so the recovered state is by construction the state the journal describes. This
//! file holds the types and the queries; the remap tables' page tree is in `table.rs`, the
//! checkpoint codec in `checkpoint.rs`.

use super::devids;
use super::format::{entry_block, entry_to_block, FormatError, ENTRY_UNMAPPED, ENTRY_ZERO};
use super::history::OriginHistory;
pub use super::table::{ReadSide, ReadStatus, Table, NO_OTIME, PAGE_BYTES};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Device id of the origin.
pub const ORIGIN_ID: u64 = 0;
/// Parent of the origin.
pub const NO_PARENT: u64 = u64::MAX;
/// Reference-count marker of a block holding a checkpoint.
pub const META_REF: u32 = u32::MAX;

/// One device.
#[derive(Debug)]
pub struct Dev {
    pub id: u64,
    pub parent: u64,
    pub name: String,
    pub writable: bool,
    pub inoperative: bool,
    pub children: Vec<u64>,
    pub attrs: BTreeMap<String, String>,
    /// Snapshot time ([`super::history`]); [`NO_OTIME`] for the origin.
    pub otime: u64,
    pub table: Table,
    /// Number of entries pointing at blocks.
    pub mapped_blocks: u64,
    /// Number of entries that are not unmapped.
    pub entries: u64,
}

impl Dev {
    pub(super) fn new(id: u64, parent: u64, name: String, writable: bool, otime: u64) -> Self {
        Self {
            id,
            parent,
            name,
            writable,
            inoperative: false,
            children: Vec::new(),
            attrs: BTreeMap::new(),
            otime,
            table: Table::default(),
            mapped_blocks: 0,
            entries: 0,
        }
    }

    /// The device maps nothing any more and cannot be read. Readers still holding the old
    /// table's read side see it retired; it is never changed again (it is dropped here).
    pub(super) fn set_inoperative(&mut self) {
        self.inoperative = true;
        self.table.retire(ReadStatus::Inoperative);
        let size = self.table.size();
        self.table = Table::default();
        self.table.set_size(size, u64::MAX);
        self.table.retire(ReadStatus::Inoperative);
        self.mapped_blocks = 0;
        self.entries = 0;
    }
}

/// What a device shows at a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Origin,
    Zero,
    Block(u64),
}

impl View {
    /// The view an entry names (`ENTRY_UNMAPPED` = the origin image).
    #[inline]
    pub fn of_entry(e: u64) -> Self {
        match e {
            ENTRY_UNMAPPED => View::Origin,
            e => entry_to_block(e).map_or(View::Zero, View::Block),
        }
    }

    pub fn entry(self) -> u64 {
        match self {
            View::Origin => ENTRY_UNMAPPED,
            View::Zero => ENTRY_ZERO,
            View::Block(b) => entry_block(b),
        }
    }
}

/// Errors applying records (only reachable with a damaged or foreign journal).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetaError {
    #[error("record names unknown device {0}")]
    NoDevice(u64),
    #[error("device id {0} already exists")]
    DuplicateDevice(u64),
    #[error("device id {0} is out of range (at most {max} devices at once)", max = super::devids::MAX_SLOTS)]
    DeviceRange(u64),
    #[error("chunk {0} out of range")]
    ChunkRange(u64),
    #[error("block {0} out of range")]
    BlockRange(u64),
    #[error("block {0} lies past the end of the cache object (never written)")]
    BlockPastEnd(u64),
    #[error("operation not allowed on the origin")]
    Origin,
    #[error("copy of chunk {0} stamped {1} is out of order or from the future")]
    History(u64, u64),
    #[error("local copy of origin chunk {0}: {1}")]
    OriginLocal(u64, &'static str),
    #[error("malformed checkpoint: {0}")]
    Format(#[from] FormatError),
}

/// The whole metadata state.
#[derive(Debug)]
pub struct Meta {
    /// Chunks a record may name: the most any device's size has needed (`resize.rs`).
    pub nchunks: u64,
    /// The copy-on-write unit (0 in tests that build a `Meta` alone: sizes never change
    /// there, and every device reads through everywhere).
    pub chunk_size: u64,
    /// Devices have sizes of their own
    /// ([`INCOMPAT_DEVICE_SIZES`](super::format::INCOMPAT_DEVICE_SIZES)): checkpoints
    /// carry them.
    pub sized: bool,
    /// Blocks below the header's limit: records naming a block at or above it are refused.
    pub max_blocks: u64,
    /// Blocks below this may be allocated: `max_blocks`, except while a lower limit is being
    /// put in place (`CacheObject::resize`).
    pub alloc_limit: u64,
    /// While a cache object is recovered, the blocks that lie in its store (`recovery.rs`):
    /// a block is written, and synced, before a record maps it, so a record naming one at
    /// or past this names a block never written. It is refused as damage before anything is
    /// sized from it (reference counts, the free map). `u64::MAX` otherwise: live, a block
    /// is allocated past the end of the file and written before its record commits.
    pub stored_blocks: u64,
    /// Slot `id` holds device `id` (ids are never reused).
    /// By slot ([`super::devids`]); boxed so that a slot costs a pointer.
    pub devices: Vec<Option<Box<Dev>>>,
    pub next_id: u64,
    pub refcounts: Vec<u32>,
    /// Blocks below `high_water` that are free for reuse now (lowest last, popped first).
    pub free: Vec<u64>,
    pub high_water: u64,
    /// Blocks whose reference count was decremented by the last `apply`s, for the caller to
    /// hold back until the change is durable (drained by the engine).
    pub dropped: Vec<u64>,
    /// Sum over devices of non-unmapped entries (sizes the checkpoint).
    pub total_entries: u64,
    /// The origin's preserved copies, shared with lock-free readers.
    pub history: Arc<OriginHistory>,
    /// Number of preserved copies in `history`.
    pub history_copies: u64,
    /// The snapshot clock: the time of the newest snapshot of the origin.
    pub clock: u64,
    /// Operative snapshots of the origin (its direct children) per snapshot time. Every other
    /// operative device descends from one of them with the same time (a device made
    /// inoperative takes its subtree with it, and a delete moves children up), so a time has
    /// an operative device iff it has an entry here. A copy is kept while a time it serves
    /// has one.
    pub lineages: BTreeMap<u64, Vec<u64>>,
    /// The origin is read-only and its chunks are copied on read
    /// ([`INCOMPAT_ORIGIN_COPIES`](super::format::INCOMPAT_ORIGIN_COPIES)): the origin
    /// device's own table holds its local copies (`OriginLocal` records).
    pub origin_copies: bool,
}

impl Meta {
    pub fn new(nchunks: u64, max_blocks: u64) -> Self {
        let origin = Dev::new(ORIGIN_ID, NO_PARENT, "origin".into(), true, NO_OTIME);
        Self {
            nchunks,
            chunk_size: 0,
            sized: false,
            max_blocks,
            alloc_limit: max_blocks,
            stored_blocks: u64::MAX,
            devices: vec![Some(Box::new(origin))],
            next_id: 1,
            refcounts: Vec::new(),
            free: Vec::new(),
            high_water: 0,
            dropped: Vec::new(),
            total_entries: 0,
            history: Arc::default(),
            history_copies: 0,
            clock: 0,
            lineages: BTreeMap::new(),
            origin_copies: false,
        }
    }

    /// Whether writing the origin at `chunk` must first preserve its old data: some operative
    /// device newer than the chunk's newest copy reads through to the origin image there. Only
    /// the origin's children need asking: a device reads through only if every ancestor below
    /// the origin does (tables are flattened). They are asked newest first and the first that
    /// reads through answers, so a first touch costs one lookup whatever the number of
    /// snapshots, and a rewrite of a preserved chunk none (no time is newer than its copy).
    /// Only when the newer children all map the chunk (e.g. a restore from the newest
    /// snapshot) is each of them asked.
    pub fn origin_needs_copy(&self, chunk: u64) -> bool {
        use std::ops::Bound::{Excluded, Unbounded};
        if self.lineages.is_empty() {
            return false;
        }
        let newest = self.history.newest(chunk);
        self.lineages
            .range((Excluded(newest), Unbounded))
            .rev()
            .flat_map(|(_, devs)| devs.iter())
            .any(|&id| {
                self.dev(id)
                    .is_some_and(|d| d.table.resolved(chunk) == ENTRY_UNMAPPED)
            })
    }

    /// Every device's id and read side, by slot, for the engine's lock-free registry.
    pub fn read_sides(&self) -> Vec<Option<(u64, Arc<ReadSide>)>> {
        self.devices
            .iter()
            .map(|d| d.as_ref().map(|d| (d.id, d.table.read_side().clone())))
            .collect()
    }

    /// Every device, in slot order.
    pub fn devs(&self) -> impl Iterator<Item = &Dev> {
        self.devices.iter().flatten().map(|d| &**d)
    }

    #[inline]
    pub fn dev(&self, id: u64) -> Option<&Dev> {
        let d = self.devices.get(devids::slot(id)?)?.as_deref()?;
        (d.id == id).then_some(d)
    }

    pub(super) fn dev_mut(&mut self, id: u64) -> Result<&mut Dev, MetaError> {
        devids::slot(id)
            .and_then(|s| self.devices.get_mut(s))
            .and_then(Option::as_deref_mut)
            .filter(|d| d.id == id)
            .ok_or(MetaError::NoDevice(id))
    }

    /// The slot a new device `id` takes: within [`devids::MAX_SLOTS`] and free.
    pub(super) fn free_slot(&self, id: u64) -> Result<usize, MetaError> {
        let slot = devids::slot(id).ok_or(MetaError::DeviceRange(id))?;
        if self.devices.get(slot).is_some_and(Option::is_some) {
            return Err(MetaError::DuplicateDevice(id));
        }
        Ok(slot)
    }

    /// Puts a new device in the slot its id names ([`Meta::free_slot`]).
    pub(super) fn put_device(&mut self, dev: Dev) -> Result<(), MetaError> {
        let slot = self.free_slot(dev.id)?;
        if self.devices.len() <= slot {
            self.devices.resize_with(slot + 1, || None);
        }
        self.devices[slot] = Some(Box::new(dev));
        Ok(())
    }

    /// Takes device `id` out of its slot.
    pub(super) fn take_device(&mut self, id: u64) -> Option<Box<Dev>> {
        let slot = self.devices.get_mut(devids::slot(id)?)?;
        if slot.as_ref().is_some_and(|d| d.id == id) {
            slot.take()
        } else {
            None
        }
    }

    /// The id for the next device: the lowest free slot, with the id counter (`devids.rs`).
    pub(super) fn new_device_id(&self) -> Result<u64, MetaError> {
        let slot = (1..self.devices.len())
            .find(|&s| self.devices[s].is_none())
            .unwrap_or(self.devices.len().max(1));
        devids::compose(self.next_id, slot).ok_or(MetaError::DeviceRange(self.next_id))
    }

    /// The read rule: walk up until a mapping is found.
    #[inline]
    pub fn resolve(&self, id: u64, chunk: u64) -> View {
        if id == ORIGIN_ID {
            return View::Origin;
        }
        let Some(d) = self.dev(id) else {
            return View::Origin;
        };
        let e = match d.table.resolved(chunk) {
            ENTRY_UNMAPPED => self.history.lookup(chunk, d.table.otime()),
            e => e,
        };
        View::of_entry(e)
    }

    /// Chunks of a device of `size` bytes.
    pub fn chunks_of(&self, size: u64) -> u64 {
        match self.chunk_size {
            0 => self.nchunks,
            cs => size.div_ceil(cs),
        }
    }

    /// The origin's size, bytes.
    pub fn origin_size(&self) -> u64 {
        self.dev(ORIGIN_ID).map_or(0, |d| d.table.size())
    }

    /// Gives every device the origin's size, `origin_size`: a cache object whose devices have
    /// no sizes of their own (made before resize, or never resized).
    pub fn init_sizes(&mut self, origin_size: u64) {
        let through = self.chunks_of(origin_size);
        for d in self.devices.iter_mut().flatten() {
            let t = if d.id == ORIGIN_ID { u64::MAX } else { through };
            d.table.init_size(origin_size, t);
        }
    }

    /// The least `through` of `id` and its ancestors: below it, every device on the way up
    /// reads through where it is unmapped, and [`Meta::resolve_by_walk`] is the whole rule.
    /// (From it on a device's view depends on when it grew or shrank, which the flattened
    /// table records and a walk cannot know: `resize.rs`.)
    pub fn walk_through(&self, mut id: u64) -> u64 {
        let mut least = u64::MAX;
        while let Some(d) = self.dev(id).filter(|_| id != ORIGIN_ID) {
            least = least.min(d.table.through());
            id = d.parent;
        }
        least
    }

    /// The read rule walked the slow way, to verify the flattened tables and the history
    /// (below [`Meta::walk_through`]).
    pub fn resolve_by_walk(&self, mut id: u64, chunk: u64) -> View {
        let otime = self.dev(id).map_or(NO_OTIME, |d| d.otime);
        while id != ORIGIN_ID {
            let Some(d) = self.dev(id) else {
                return View::Origin;
            };
            let e = d.table.get(chunk);
            if e != ENTRY_UNMAPPED {
                return match entry_to_block(e) {
                    Some(b) => View::Block(b),
                    None => View::Zero,
                };
            }
            id = d.parent;
        }
        // Copies made since the snapshot time are the origin as it was then, oldest first.
        View::of_entry(self.history.lookup(chunk, otime))
    }

    /// Whether some other device shares `id`'s current view at `chunk`, so a change of it
    /// must first give them that view (the write rule's step 1). For the origin: some snapshot
    /// may read its image there ([`Meta::origin_needs_copy`]). For a snapshot: some child of it
    /// is unmapped there.
    pub fn view_shared(&self, id: u64, chunk: u64) -> bool {
        if id == ORIGIN_ID {
            return self.origin_needs_copy(chunk);
        }
        self.has_unmapped_child(id, chunk)
    }

    /// Whether some operative child of `id` is unmapped at `chunk` and reads what `id` reads
    /// there ([`Meta::shares_view`]).
    pub fn has_unmapped_child(&self, id: u64, chunk: u64) -> bool {
        self.dev(id).is_some_and(|d| {
            d.children.iter().any(|&c| {
                self.dev(c)
                    .is_some_and(|cd| Self::shares_view(d, cd, chunk))
            })
        })
    }

    /// Whether `child`, operative and unmapped at `chunk`, reads there what its parent reads.
    /// It may not where one of them stops reading through to the origin below `chunk` and the
    /// other does not (a device grown or shrunk since the child was taken): its view then is
    /// its own, and a change of the parent's leaves it alone.
    pub fn shares_view(parent: &Dev, child: &Dev, chunk: u64) -> bool {
        !child.inoperative
            && child.table.get(chunk) == ENTRY_UNMAPPED
            && child.table.resolved(chunk) == parent.table.resolved(chunk)
    }

    pub fn refcount(&self, b: u64) -> u32 {
        self.refcounts.get(b as usize).copied().unwrap_or(0)
    }

    /// Rebuilds the allocator from the reference counts (after open or replay). Blocks in
    /// `meta_blocks` hold the checkpoint and are neither free nor data.
    pub fn rebuild_allocator(&mut self, meta_blocks: &[u64]) {
        for &b in meta_blocks {
            let b = b as usize;
            if self.refcounts.len() <= b {
                self.refcounts.resize(b + 1, 0);
            }
            self.refcounts[b] = META_REF;
        }
        let hw = self
            .refcounts
            .iter()
            .rposition(|&r| r != 0)
            .map_or(0, |i| i + 1);
        self.refcounts.truncate(hw);
        self.high_water = hw as u64;
        self.free = (0..hw as u64)
            .rev()
            .filter(|&b| self.refcounts[b as usize] == 0)
            .collect();
        self.dropped.clear();
    }

    /// Takes a free block (lowest first), if any is left under the limit.
    pub fn alloc(&mut self) -> Option<u64> {
        if let Some(&b) = self.free.last() {
            // Above a limit being lowered, a free block stays free but is not handed out.
            if b < self.alloc_limit {
                self.free.pop();
                return Some(b);
            }
        }
        if self.high_water < self.alloc_limit {
            self.high_water += 1;
            if self.refcounts.len() < self.high_water as usize {
                self.refcounts.resize(self.high_water as usize, 0);
            }
            return Some(self.high_water - 1);
        }
        None
    }

    /// Blocks that `alloc` can still hand out.
    pub fn free_blocks(&self) -> u64 {
        self.free.len() as u64 + self.alloc_limit.saturating_sub(self.high_water)
    }
}
