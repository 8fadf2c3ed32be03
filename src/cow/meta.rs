//! The in-memory metadata: device tree, remap tables, reference counts and the block allocator.
//!
//! Every change goes through [`Meta::apply`], both live and during journal replay, so the
//! recovered state is by construction the state the journal describes.

use super::format::{
    entry_block, entry_to_block, Dec, Enc, FormatError, Record, ENTRY_UNMAPPED, ENTRY_ZERO,
};
use super::history::{OriginHistory, Preserved};
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// Device id of the origin.
pub const ORIGIN_ID: u64 = 0;
/// Parent of the origin.
pub const NO_PARENT: u64 = u64::MAX;
/// Reference-count marker of a block holding a checkpoint.
pub const META_REF: u32 = u32::MAX;
/// Snapshot time of the origin (it reads its image, never the history).
pub const NO_OTIME: u64 = u64::MAX;
/// Bytes of one page of resolved entries.
pub const PAGE_BYTES: usize = PAGE * 8;

const PAGE_SHIFT: u32 = 9;
const PAGE: usize = 1 << PAGE_SHIFT;

/// Pages per group (the middle level of a table's page tree).
const GROUP_SHIFT: u32 = 8;
const GROUP: usize = 1 << GROUP_SHIFT;

/// Resolved entries of one page of chunks. Atomic because a reader holding only its chunk's
/// stripe lock loads its entry while the owning table stores other entries of the page.
struct Page([AtomicU64; PAGE]);

impl Page {
    fn filled(v: u64) -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(v)))
    }

    #[inline]
    fn get(&self, i: usize) -> u64 {
        // Relaxed: the stripe lock of the chunk orders this load after the store that set it.
        self.0[i].load(Ordering::Relaxed)
    }

    /// A copy. Called with the state lock held, which every store into a page also holds.
    fn copy(&self) -> Self {
        Self(std::array::from_fn(|i| AtomicU64::new(self.get(i))))
    }
}

/// Up to [`GROUP`] pages. Never changed once published: a new page means a new group.
struct Group(Box<[Option<Arc<Page>>]>);

/// The page tree of a table: groups of pages. Never changed once published, except the
/// entries of pages the owning table may write in place. Two levels keep installing a page
/// O(pages per group + groups) instead of O(pages) (a 1 TiB origin has 32 Ki pages of 64 KiB
/// chunks), and cost 8 bytes per page per table.
#[derive(Default)]
struct Tree(Box<[Option<Arc<Group>>]>);

impl Tree {
    #[inline]
    fn page(&self, pi: usize) -> Option<&Arc<Page>> {
        self.0
            .get(pi >> GROUP_SHIFT)?
            .as_ref()?
            .0
            .get(pi & (GROUP - 1))?
            .as_ref()
    }

    #[inline]
    fn entry(&self, chunk: u64) -> u64 {
        match self.page((chunk >> PAGE_SHIFT) as usize) {
            Some(p) => p.get((chunk as usize) & (PAGE - 1)),
            None => ENTRY_UNMAPPED,
        }
    }

    /// A tree equal to this one but with `page` at page index `pi`.
    fn with_page(&self, pi: usize, page: Arc<Page>) -> Self {
        let (gi, si) = (pi >> GROUP_SHIFT, pi & (GROUP - 1));
        let mut group: Vec<Option<Arc<Page>>> = match self.0.get(gi) {
            Some(Some(g)) => g.0.to_vec(),
            _ => Vec::new(),
        };
        if group.len() <= si {
            group.resize(si + 1, None);
        }
        group[si] = Some(page);
        let mut top = self.0.to_vec();
        if top.len() <= gi {
            top.resize(gi + 1, None);
        }
        top[gi] = Some(Arc::new(Group(group.into())));
        Self(top.into())
    }
}

/// Whether a device can be read, as readers without the state lock see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStatus {
    Active,
    Inoperative,
    Deleted,
}

/// What a read needs of a device, published for readers that take no engine-wide lock: its
/// current page tree and whether it may be read. Shared between the device's [`Table`] (which
/// publishes every change here) and the engine's device registry.
pub struct ReadSide {
    tree: ArcSwap<Tree>,
    status: AtomicU8,
    /// The device's snapshot time: which of the origin's preserved copies it reads where it
    /// reads through to the origin (see [`super::history`]).
    otime: u64,
}

impl ReadSide {
    fn new(tree: Arc<Tree>, otime: u64) -> Self {
        Self {
            tree: ArcSwap::new(tree),
            status: AtomicU8::new(ReadStatus::Active as u8),
            otime,
        }
    }

    /// The device's snapshot time.
    #[inline]
    pub fn otime(&self) -> u64 {
        self.otime
    }

    /// The device's resolved entry at `chunk` (ENTRY_UNMAPPED = the origin image). Lock-free;
    /// sound only while the caller holds `chunk`'s stripe lock (see [`Table`]).
    #[inline]
    pub fn resolved(&self, chunk: u64) -> u64 {
        self.tree.load().entry(chunk)
    }

    /// Whether the device may be read. Once not active, a read side never changes again.
    #[inline]
    pub fn status(&self) -> ReadStatus {
        match self.status.load(Ordering::Acquire) {
            0 => ReadStatus::Active,
            1 => ReadStatus::Inoperative,
            _ => ReadStatus::Deleted,
        }
    }

    fn retire(&self, status: ReadStatus) {
        self.status.store(status as u8, Ordering::Release);
    }
}

/// A remap table, flattened: for every chunk the *resolved* view (what a read returns, after
/// the walk up the tree) plus one bit saying whether the device maps the chunk itself.
///
/// Pages of resolved entries are shared with the parent and copied on first change, so a
/// snapshot create is O(1) (one `Arc` clone of the page tree) and a read costs one lookup at
/// any depth. This is sound because of the write rule: before a device's view of a chunk
/// changes, every child unmapped there is given its own mapping, so an unmapped chunk's
/// resolved entry never goes stale. Memory: 8 bytes per chunk per page a device has changed,
/// plus 1 bit per chunk.
///
/// Concurrency: all changes are made under the engine's state lock (`&mut self`), and readers
/// load entries through the [`ReadSide`] with no engine-wide lock. That is sound because every
/// change of any device's resolved entry at chunk c is made with c's stripe lock held
/// exclusively (see the engine's locking comment), and a reader holds it shared: the entry it
/// loads cannot change under it. Only other entries of the same page, and the page tree, can
/// change meanwhile, so a page is stored into in place only by the table that allocated it and
/// only until the table is shared (`writable`); any other change copies the page and publishes a
/// new tree (readers may hold the old one: `Arc` counts cannot tell).
pub struct Table {
    side: Arc<ReadSide>,
    /// The tree published in `side`, for the owner to read without arc-swap's protocol.
    tree: Arc<Tree>,
    own: Vec<u64>,
    /// Per page: allocated by this table since it was last shared, so stores go in place.
    writable: Vec<u64>,
}

impl Default for Table {
    fn default() -> Self {
        Self::with_tree(Arc::default(), NO_OTIME)
    }
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("groups", &self.tree.0.len())
            .field(
                "own_chunks",
                &self.own.iter().map(|w| w.count_ones()).sum::<u32>(),
            )
            .finish()
    }
}

#[inline]
fn bit(bits: &[u64], i: u64) -> bool {
    bits.get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

fn set_bit(bits: &mut Vec<u64>, i: u64) {
    let w = (i / 64) as usize;
    if bits.len() <= w {
        bits.resize(w + 1, 0);
    }
    bits[w] |= 1 << (i % 64);
}

impl Table {
    fn with_tree(tree: Arc<Tree>, otime: u64) -> Self {
        Self {
            side: Arc::new(ReadSide::new(tree.clone(), otime)),
            tree,
            own: Vec::new(),
            writable: Vec::new(),
        }
    }

    /// A table whose unmapped chunks read what `self` reads now. From now on both copy a
    /// page before changing it: the other one reads it too.
    pub fn share(&mut self) -> Self {
        self.writable.clear();
        Self::with_tree(self.tree.clone(), self.side.otime)
    }

    /// An empty table of a snapshot of the origin taken at snapshot time `otime`.
    pub fn for_origin_snapshot(otime: u64) -> Self {
        Self::with_tree(Arc::default(), otime)
    }

    /// The snapshot time of the device.
    #[inline]
    pub fn otime(&self) -> u64 {
        self.side.otime
    }

    /// What readers of this device use.
    pub fn read_side(&self) -> &Arc<ReadSide> {
        &self.side
    }

    /// Marks the device unreadable for lock-free readers (it is being deleted, or replaced by
    /// an empty inoperative table). The table must not change afterwards.
    pub fn retire(&self, status: ReadStatus) {
        self.side.retire(status);
    }

    /// What a read of this device at `chunk` returns (ENTRY_UNMAPPED = the origin image).
    #[inline]
    pub fn resolved(&self, chunk: u64) -> u64 {
        self.tree.entry(chunk)
    }

    /// The device's own entry at `chunk` (ENTRY_UNMAPPED if it reads through).
    #[inline]
    pub fn get(&self, chunk: u64) -> u64 {
        if bit(&self.own, chunk) {
            self.resolved(chunk)
        } else {
            ENTRY_UNMAPPED
        }
    }

    /// Sets the device's own entry; `ENTRY_UNMAPPED` makes it read `inherited`.
    pub fn set(&mut self, chunk: u64, entry: u64, inherited: u64) {
        if entry == ENTRY_UNMAPPED {
            if let Some(word) = self.own.get_mut((chunk / 64) as usize) {
                *word &= !(1 << (chunk % 64));
            }
        } else {
            set_bit(&mut self.own, chunk);
        }
        let value = if entry == ENTRY_UNMAPPED {
            inherited
        } else {
            entry
        };
        if self.resolved(chunk) == value {
            return;
        }
        let pi = chunk >> PAGE_SHIFT;
        let i = (chunk as usize) & (PAGE - 1);
        if bit(&self.writable, pi) {
            if let Some(p) = self.tree.page(pi as usize) {
                // Relaxed: readers of this entry are ordered by the chunk's stripe lock.
                p.0[i].store(value, Ordering::Relaxed);
                return;
            }
        }
        // Readers may be using the current page and tree: publish new ones.
        let page = match self.tree.page(pi as usize) {
            Some(p) => p.copy(),
            None => Page::filled(ENTRY_UNMAPPED),
        };
        page.0[i].store(value, Ordering::Relaxed);
        self.tree = Arc::new(self.tree.with_page(pi as usize, Arc::new(page)));
        self.side.tree.store(self.tree.clone());
        set_bit(&mut self.writable, pi);
    }

    /// Every (chunk, own entry).
    pub fn mapped(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.own.iter().enumerate().flat_map(move |(wi, &w)| {
            let mut bits = w;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let c = wi as u64 * 64 + b;
                Some((c, self.resolved(c)))
            })
        })
    }

    /// Addresses of the pages of resolved entries this table references (shared ones
    /// included, for the caller to count once) and the bytes of the rest: its page tree (a
    /// shared group counted in full by each table) and bitmaps.
    pub fn memory(&self) -> (Vec<usize>, usize) {
        let mut pages = Vec::new();
        let mut bytes = self.tree.0.len() * 8 + (self.own.len() + self.writable.len()) * 8;
        for g in self.tree.0.iter().flatten() {
            bytes += g.0.len() * 8;
            pages.extend(g.0.iter().flatten().map(|p| Arc::as_ptr(p) as usize));
        }
        (pages, bytes)
    }
}

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
    fn new(id: u64, parent: u64, name: String, writable: bool, otime: u64) -> Self {
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
    fn set_inoperative(&mut self) {
        self.inoperative = true;
        self.table.retire(ReadStatus::Inoperative);
        self.table = Table::default();
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
    #[error("chunk {0} out of range")]
    ChunkRange(u64),
    #[error("block {0} out of range")]
    BlockRange(u64),
    #[error("operation not allowed on the origin")]
    Origin,
    #[error("copy of chunk {0} stamped {1} is out of order or from the future")]
    History(u64, u64),
    #[error("malformed checkpoint: {0}")]
    Format(#[from] FormatError),
}

/// The whole metadata state.
#[derive(Debug)]
pub struct Meta {
    pub nchunks: u64,
    pub max_blocks: u64,
    /// Slot `id` holds device `id` (ids are never reused).
    pub devices: Vec<Option<Dev>>,
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
}

impl Meta {
    pub fn new(nchunks: u64, max_blocks: u64) -> Self {
        let origin = Dev::new(ORIGIN_ID, NO_PARENT, "origin".into(), true, NO_OTIME);
        Self {
            nchunks,
            max_blocks,
            devices: vec![Some(origin)],
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

    /// The snapshot time of a new child of `parent`: a new tick of the clock for a snapshot
    /// of the origin, else its parent's time.
    fn child_otime(&mut self, parent: u64) -> Result<u64, MetaError> {
        if parent == ORIGIN_ID {
            self.clock += 1;
            Ok(self.clock)
        } else {
            Ok(self.dev_mut(parent)?.otime)
        }
    }

    /// The table of a new operative child of `parent` with snapshot time `otime`: empty over
    /// the origin's history, or sharing its parent's.
    fn child_table(&mut self, parent: u64, otime: u64) -> Result<Table, MetaError> {
        Ok(if parent == ORIGIN_ID {
            Table::for_origin_snapshot(otime)
        } else {
            self.dev_mut(parent)?.table.share()
        })
    }

    fn lineage_gained(&mut self, otime: u64, id: u64) {
        self.lineages.entry(otime).or_default().push(id);
    }

    /// One device of snapshot time `t` stopped being operative. When it was the last, the
    /// copies only it could read are released: a copy stamped `s` serves the times after the
    /// chunk's previous copy up to `s`, so those stamped from `t` up to the next live time are
    /// released unless the previous live time is newer than their previous copy. Cost: a sweep
    /// of the history pages holding such stamps, i.e. where the origin was written while `t`
    /// was the newest time.
    fn lineage_lost(&mut self, t: u64, id: u64) {
        let Some(devs) = self.lineages.get_mut(&t) else {
            return;
        };
        devs.retain(|&d| d != id);
        if !devs.is_empty() {
            return;
        }
        self.lineages.remove(&t);
        let prev_live = self.lineages.range(..t).next_back().map(|(&k, _)| k);
        let next_live = self
            .lineages
            .range(t..)
            .next()
            .map_or(u64::MAX, |(&k, _)| k);
        for (c, copies) in self.history.with_stamps_in(t, next_live) {
            let mut kept = Vec::with_capacity(copies.len());
            let mut older = 0;
            for &p in &copies {
                let in_range = (t..next_live).contains(&p.time);
                // No live time in (older, p.time]: nobody can read it.
                if in_range && prev_live.is_none_or(|l| l <= older) {
                    self.history_copies -= 1;
                    self.drop_ref(p.entry);
                } else {
                    kept.push(p);
                }
                older = p.time;
            }
            if kept.len() != copies.len() {
                self.history.set(c, &kept);
            }
        }
    }

    /// Every device's read side, indexed by id, for the engine's lock-free registry.
    pub fn read_sides(&self) -> Vec<Option<Arc<ReadSide>>> {
        self.devices
            .iter()
            .map(|d| d.as_ref().map(|d| d.table.read_side().clone()))
            .collect()
    }

    #[inline]
    pub fn dev(&self, id: u64) -> Option<&Dev> {
        self.devices.get(id as usize).and_then(Option::as_ref)
    }

    fn dev_mut(&mut self, id: u64) -> Result<&mut Dev, MetaError> {
        self.devices
            .get_mut(id as usize)
            .and_then(Option::as_mut)
            .ok_or(MetaError::NoDevice(id))
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

    /// The read rule walked the slow way, to verify the flattened tables and the history.
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

    /// Whether some operative child of `id` is unmapped at `chunk`.
    pub fn has_unmapped_child(&self, id: u64, chunk: u64) -> bool {
        self.dev(id).is_some_and(|d| {
            d.children.iter().any(|&c| {
                self.dev(c)
                    .is_some_and(|cd| !cd.inoperative && cd.table.get(chunk) == ENTRY_UNMAPPED)
            })
        })
    }

    pub fn refcount(&self, b: u64) -> u32 {
        self.refcounts.get(b as usize).copied().unwrap_or(0)
    }

    fn check_entry(&self, chunk: u64, entry: u64) -> Result<(), MetaError> {
        if chunk >= self.nchunks {
            return Err(MetaError::ChunkRange(chunk));
        }
        if let Some(b) = entry_to_block(entry) {
            if b >= self.max_blocks {
                return Err(MetaError::BlockRange(b));
            }
        }
        Ok(())
    }

    fn take_ref(&mut self, entry: u64) {
        if let Some(b) = entry_to_block(entry) {
            let b = b as usize;
            if self.refcounts.len() <= b {
                self.refcounts.resize(b + 1, 0);
            }
            self.refcounts[b] = self.refcounts[b].saturating_add(1);
        }
    }

    fn drop_ref(&mut self, entry: u64) {
        if let Some(b) = entry_to_block(entry) {
            if let Some(r) = self.refcounts.get_mut(b as usize) {
                *r = r.saturating_sub(1);
            }
            self.dropped.push(b);
        }
    }

    /// Sets one entry, keeping reference counts and counters right.
    fn set_entry(&mut self, id: u64, chunk: u64, entry: u64) -> Result<(), MetaError> {
        let parent = self.dev(id).ok_or(MetaError::NoDevice(id))?.parent;
        let inherited = match self.dev(parent) {
            Some(p) if parent != ORIGIN_ID => p.table.resolved(chunk),
            _ => ENTRY_UNMAPPED,
        };
        let d = self.dev_mut(id)?;
        let old = d.table.get(chunk);
        d.table.set(chunk, entry, inherited);
        d.mapped_blocks = d.mapped_blocks + entry_to_block(entry).is_some() as u64
            - entry_to_block(old).is_some() as u64;
        d.entries = d.entries + (entry != ENTRY_UNMAPPED) as u64 - (old != ENTRY_UNMAPPED) as u64;
        self.total_entries =
            self.total_entries + (entry != ENTRY_UNMAPPED) as u64 - (old != ENTRY_UNMAPPED) as u64;
        self.take_ref(entry);
        self.drop_ref(old);
        // Children unmapped here keep what they resolve to: the write rule gave them the old
        // view first, or they read the same origin copies as `id` did (same snapshot time).
        Ok(())
    }

    /// `id` now maps `chunk` itself (same data: it only stopped reading through). Descendants
    /// that read through `id` there must resolve to the new entry. That changes something only
    /// where they resolved "origin" before: a copy of the origin chunk shared down by a
    /// snapshot about to change its view, or the origin's `ShareDown` in version 1 journals.
    fn propagate(&mut self, id: u64, chunk: u64, value: u64) {
        let mut stack: Vec<u64> = self.dev(id).map(|d| d.children.clone()).unwrap_or_default();
        while let Some(e) = stack.pop() {
            let Some(d) = self.devices.get_mut(e as usize).and_then(Option::as_mut) else {
                continue;
            };
            if d.inoperative || d.table.get(chunk) != ENTRY_UNMAPPED {
                continue;
            }
            d.table.set(chunk, ENTRY_UNMAPPED, value);
            stack.extend_from_slice(&d.children);
        }
    }

    /// Gives `entry` to every operative child of `id` unmapped at `chunk` (a snapshot's old view
    /// before it changes, a deleted snapshot's blocks, or, in version 1 journals, the origin's
    /// copy): one pass, reference count added once.
    fn share_down(&mut self, id: u64, chunk: u64, entry: u64) -> Result<(), MetaError> {
        let n = self.dev(id).ok_or(MetaError::NoDevice(id))?.children.len();
        let mut added = 0u64;
        let is_block = entry_to_block(entry).is_some() as u64;
        for i in 0..n {
            let c = match self.dev(id) {
                Some(d) => d.children[i],
                None => break,
            };
            let Some(d) = self.devices.get_mut(c as usize).and_then(Option::as_mut) else {
                continue;
            };
            if d.inoperative || d.table.get(chunk) != ENTRY_UNMAPPED {
                continue;
            }
            // Unmapped -> mapped: the inherited value is irrelevant.
            d.table.set(chunk, entry, ENTRY_UNMAPPED);
            d.entries += 1;
            d.mapped_blocks += is_block;
            added += 1;
            if !d.children.is_empty() {
                self.propagate(c, chunk, entry);
            }
        }
        self.total_entries += added;
        if let Some(b) = entry_to_block(entry) {
            let b = b as usize;
            if self.refcounts.len() <= b {
                self.refcounts.resize(b + 1, 0);
            }
            self.refcounts[b] = self.refcounts[b].saturating_add(added as u32);
        }
        Ok(())
    }

    /// Adds the origin's copy of `chunk` stamped `time` (the snapshot clock when it was made).
    fn preserve(&mut self, chunk: u64, time: u64, entry: u64) -> Result<(), MetaError> {
        let mut copies = self.history.copies(chunk);
        if time > self.clock || copies.last().is_some_and(|p| p.time >= time) {
            return Err(MetaError::History(chunk, time));
        }
        copies.push(Preserved { time, entry });
        self.history.set(chunk, &copies);
        self.history_copies += 1;
        self.take_ref(entry);
        Ok(())
    }

    /// Applies one record.
    pub fn apply(&mut self, rec: &Record) -> Result<(), MetaError> {
        match rec {
            Record::CreateDevice {
                id,
                parent,
                writable,
                name,
            } => {
                if self.dev(*id).is_some() || *id == NO_PARENT {
                    return Err(MetaError::DuplicateDevice(*id));
                }
                let p = self.dev_mut(*parent)?;
                if p.inoperative {
                    return Err(MetaError::NoDevice(*parent));
                }
                p.children.push(*id);
                let slot = *id as usize;
                if self.devices.len() <= slot {
                    self.devices.resize_with(slot + 1, || None);
                }
                let otime = self.child_otime(*parent)?;
                let mut dev = Dev::new(*id, *parent, name.clone(), *writable, otime);
                dev.table = self.child_table(*parent, otime)?;
                self.devices[slot] = Some(dev);
                if *parent == ORIGIN_ID {
                    self.lineage_gained(otime, *id);
                }
                self.next_id = self.next_id.max(id + 1);
            }
            Record::DeleteDevice { id } => {
                if *id == ORIGIN_ID {
                    return Err(MetaError::Origin);
                }
                let d = self.dev(*id).ok_or(MetaError::NoDevice(*id))?;
                let parent = d.parent;
                let children = d.children.clone();
                // An operative child of the origin leaves the origin's readers, and its
                // operative children join them, moved up with the same time.
                let lost = (!d.inoperative && parent == ORIGIN_ID).then_some(d.otime);
                let mapped: Vec<(u64, u64)> = d.table.mapped().collect();
                for (chunk, entry) in mapped {
                    self.share_down(*id, chunk, entry)?;
                    self.drop_ref(entry);
                    self.total_entries -= 1;
                }
                for &c in &children {
                    self.dev_mut(c)?.parent = parent;
                }
                let p = self.dev_mut(parent)?;
                p.children.retain(|c| c != id);
                p.children.extend_from_slice(&children);
                if let Some(d) = self.devices[*id as usize].take() {
                    d.table.retire(ReadStatus::Deleted);
                }
                if let Some(t) = lost {
                    for &c in &children {
                        if self.dev(c).is_some_and(|cd| !cd.inoperative) {
                            self.lineage_gained(t, c);
                        }
                    }
                    self.lineage_lost(t, *id);
                }
            }
            Record::SetEntry { dev, chunk, entry } => {
                if *dev == ORIGIN_ID {
                    return Err(MetaError::Origin);
                }
                self.check_entry(*chunk, *entry)?;
                self.set_entry(*dev, *chunk, *entry)?;
            }
            Record::ShareDown { dev, chunk, entry } => {
                self.check_entry(*chunk, *entry)?;
                self.share_down(*dev, *chunk, *entry)?;
            }
            Record::Preserve { chunk, time, entry } => {
                self.check_entry(*chunk, *entry)?;
                if entry_to_block(*entry).is_none() {
                    return Err(FormatError::Malformed("preserved copy without a block").into());
                }
                self.preserve(*chunk, *time, *entry)?;
            }
            Record::SetInoperative { dev } => {
                if *dev == ORIGIN_ID {
                    return Err(MetaError::Origin);
                }
                let d = self.dev(*dev).ok_or(MetaError::NoDevice(*dev))?;
                if d.inoperative {
                    return Ok(());
                }
                let otime = d.otime;
                let of_origin = d.parent == ORIGIN_ID;
                let mapped: Vec<(u64, u64)> = d.table.mapped().collect();
                for (_, entry) in mapped {
                    self.drop_ref(entry);
                    self.total_entries -= 1;
                }
                self.dev_mut(*dev)?.set_inoperative();
                if of_origin {
                    self.lineage_lost(otime, *dev);
                }
            }
            Record::SetAttr { dev, key, value } => {
                let d = self.dev_mut(*dev)?;
                match value {
                    Some(v) => d.attrs.insert(key.clone(), v.clone()),
                    None => d.attrs.remove(key),
                };
            }
        }
        Ok(())
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
        if let Some(b) = self.free.pop() {
            return Some(b);
        }
        if self.high_water < self.max_blocks {
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
        self.free.len() as u64 + (self.max_blocks - self.high_water.min(self.max_blocks))
    }

    /// Serializes the state for a checkpoint (format version 2).
    pub fn encode_checkpoint(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u64(self.next_id);
        e.u64(self.clock);
        let devs: Vec<&Dev> = self.devices.iter().flatten().collect();
        e.u64(devs.len() as u64);
        for d in devs {
            e.u64(d.id);
            e.u64(d.parent);
            e.u8(d.writable as u8 | (d.inoperative as u8) << 1);
            e.u64(d.otime);
            e.str(&d.name);
            e.u64(d.attrs.len() as u64);
            for (k, v) in &d.attrs {
                e.str(k);
                e.str(v);
            }
            e.u64(d.entries);
            for (c, ent) in d.table.mapped() {
                e.u64(c);
                e.u64(ent);
            }
        }
        let history = self.history.all();
        e.u64(history.len() as u64);
        for (c, copies) in history {
            e.u64(c);
            e.u64(copies.len() as u64);
            for p in copies {
                e.u64(p.time);
                e.u64(p.entry);
            }
        }
        e.0
    }

    /// Rebuilds the state from a checkpoint of format `version`. Parents precede children in
    /// the encoding only by accident, so links are made after all devices are read. Version 1
    /// has no snapshot times and no history: snapshots of the origin get times in id (that is,
    /// creation) order.
    pub fn decode_checkpoint(
        buf: &[u8],
        version: u32,
        nchunks: u64,
        max_blocks: u64,
    ) -> Result<Self, MetaError> {
        let v1 = version < 2;
        let mut m = Meta::new(nchunks, max_blocks);
        m.devices.clear();
        let mut d = Dec::new(buf, "checkpoint");
        let mut own_entries: Vec<(u64, Vec<(u64, u64)>)> = Vec::new();
        m.next_id = d.u64()?;
        if !v1 {
            m.clock = d.u64()?;
        }
        let ndev = d.u64()?;
        for _ in 0..ndev {
            let id = d.u64()?;
            let parent = d.u64()?;
            let flags = d.u8()?;
            let otime = if v1 { NO_OTIME } else { d.u64()? };
            let name = d.str()?;
            let mut dev = Dev::new(id, parent, name, flags & 1 != 0, otime);
            if flags & 2 != 0 {
                dev.set_inoperative();
            }
            let nattrs = d.u64()?;
            for _ in 0..nattrs {
                let k = d.str()?;
                let v = d.str()?;
                dev.attrs.insert(k, v);
            }
            let slot = usize::try_from(id).map_err(|_| MetaError::NoDevice(id))?;
            if id >= m.next_id || m.devices.get(slot).is_some_and(Option::is_some) {
                return Err(MetaError::DuplicateDevice(id));
            }
            if m.devices.len() <= slot {
                m.devices.resize_with(slot + 1, || None);
            }
            m.devices[slot] = Some(dev);
            let nent = d.u64()?;
            let mut list = Vec::new();
            for _ in 0..nent {
                let c = d.u64()?;
                let ent = d.u64()?;
                if ent == ENTRY_UNMAPPED {
                    return Err(FormatError::Malformed("checkpoint entry").into());
                }
                m.check_entry(c, ent)?;
                list.push((c, ent));
            }
            own_entries.push((id, list));
        }
        let mut history = Vec::new();
        if !v1 {
            let nhist = d.u64()?;
            for _ in 0..nhist {
                let c = d.u64()?;
                let n = d.u64()?;
                if n == 0 {
                    return Err(FormatError::Malformed("checkpoint history").into());
                }
                for _ in 0..n {
                    history.push((c, d.u64()?, d.u64()?));
                }
            }
        }
        if !d.done() {
            return Err(FormatError::Malformed("checkpoint trailer").into());
        }
        if m.dev(ORIGIN_ID).is_none() {
            return Err(MetaError::NoDevice(ORIGIN_ID));
        }
        let ids: Vec<(u64, u64)> = m
            .devices
            .iter()
            .flatten()
            .map(|d| (d.id, d.parent))
            .collect();
        for (id, parent) in ids {
            if id != ORIGIN_ID {
                m.dev_mut(parent)?.children.push(id);
            }
        }
        // Flattened tables are built parents first: a child starts from its parent's table.
        let mut entries: BTreeMap<u64, Vec<(u64, u64)>> = own_entries
            .into_iter()
            .filter(|(id, list)| *id != ORIGIN_ID || !list.is_empty())
            .collect();
        let mut order = vec![ORIGIN_ID];
        let mut i = 0;
        while i < order.len() {
            let id = order[i];
            i += 1;
            let (parent, children) = match m.dev(id) {
                Some(d) => (d.parent, d.children.clone()),
                None => continue,
            };
            if id != ORIGIN_ID {
                // An inoperative device keeps its empty, retired table, as when it became so.
                let operative = m.dev(id).is_some_and(|d| !d.inoperative);
                if v1 {
                    // The parent was visited first: the walk goes down from the origin.
                    let otime = m.child_otime(parent)?;
                    m.dev_mut(id)?.otime = otime;
                }
                let otime = m.dev(id).map_or(NO_OTIME, |d| d.otime);
                if operative {
                    if otime == NO_OTIME || otime > m.clock {
                        return Err(FormatError::Malformed("checkpoint snapshot time").into());
                    }
                    let t = m.child_table(parent, otime)?;
                    if t.otime() != otime {
                        return Err(FormatError::Malformed("checkpoint snapshot time").into());
                    }
                    m.dev_mut(id)?.table = t;
                    if parent == ORIGIN_ID {
                        m.lineage_gained(otime, id);
                    }
                }
                for (c, ent) in entries.remove(&id).unwrap_or_default() {
                    m.set_entry(id, c, ent)?;
                }
            }
            if order.len() > m.devices.len() {
                return Err(FormatError::Malformed("checkpoint device tree").into());
            }
            order.extend(children);
        }
        if !entries.is_empty() {
            return Err(FormatError::Malformed("checkpoint device tree").into());
        }
        for (c, time, entry) in history {
            m.check_entry(c, entry)?;
            if entry_to_block(entry).is_none() {
                return Err(FormatError::Malformed("checkpoint history").into());
            }
            m.preserve(c, time, entry)?;
        }
        m.dropped.clear();
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint in format version 1 (before the origin's history): no clock, no snapshot
    /// times, no copies; the origin's copies were entries of its children.
    fn encode_v1(m: &Meta) -> Vec<u8> {
        let mut e = Enc::default();
        e.u64(m.next_id);
        let devs: Vec<&Dev> = m.devices.iter().flatten().collect();
        e.u64(devs.len() as u64);
        for d in devs {
            e.u64(d.id);
            e.u64(d.parent);
            e.u8(d.writable as u8 | (d.inoperative as u8) << 1);
            e.str(&d.name);
            e.u64(0);
            e.u64(d.entries);
            for (c, ent) in d.table.mapped() {
                e.u64(c);
                e.u64(ent);
            }
        }
        e.0
    }

    fn create(m: &mut Meta, id: u64, parent: u64) {
        m.apply(&Record::CreateDevice {
            id,
            parent,
            writable: true,
            name: format!("s{id}"),
        })
        .unwrap();
    }

    /// A version 1 cache object still opens with every view intact, and the snapshot times
    /// it gets let the origin's history take over from there.
    #[test]
    fn version_1_checkpoints_are_read() {
        let mut m = Meta::new(8, 100);
        create(&mut m, 1, ORIGIN_ID);
        create(&mut m, 2, 1);
        create(&mut m, 3, ORIGIN_ID);
        // What a version 1 engine journaled for an origin write: the copy to every child.
        m.apply(&Record::ShareDown {
            dev: ORIGIN_ID,
            chunk: 4,
            entry: entry_block(0),
        })
        .unwrap();
        m.apply(&Record::SetEntry {
            dev: 2,
            chunk: 5,
            entry: ENTRY_ZERO,
        })
        .unwrap();
        let v1 = encode_v1(&m);
        let mut back = Meta::decode_checkpoint(&v1, 1, 8, 100).unwrap();
        for id in 1..=3 {
            for c in 0..8 {
                assert_eq!(
                    back.resolve(id, c),
                    m.resolve(id, c),
                    "device {id} chunk {c}"
                );
            }
        }
        assert_eq!(
            back.refcount(0),
            2,
            "one copy, an entry of each child of the origin"
        );
        assert_eq!(back.clock, 2, "two snapshots of the origin");
        assert_eq!(back.dev(2).unwrap().otime, back.dev(1).unwrap().otime);
        // From now on an origin write is one stamped copy for all of them.
        assert!(back.origin_needs_copy(6));
        back.apply(&Record::Preserve {
            chunk: 6,
            time: back.clock,
            entry: entry_block(1),
        })
        .unwrap();
        assert!(!back.origin_needs_copy(6));
        for id in 1..=3 {
            assert_eq!(back.resolve(id, 6), View::Block(1));
            assert_eq!(back.resolve_by_walk(id, 6), View::Block(1));
        }
        // And the version 2 checkpoint of that state round-trips.
        let v2 = back.encode_checkpoint();
        let again = Meta::decode_checkpoint(&v2, 2, 8, 100).unwrap();
        for id in 1..=3 {
            for c in 0..8 {
                assert_eq!(again.resolve(id, c), back.resolve(id, c));
            }
        }
        assert_eq!(again.refcount(1), 1);
        assert!(
            Meta::decode_checkpoint(&v1, 2, 8, 100).is_err(),
            "layouts are told apart"
        );
    }
}
