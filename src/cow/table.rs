//! The lock-free page tree of a remap table: [`Table`] (what the engine's state changes) and
//! [`ReadSide`] (what readers load without any engine-wide lock).

use super::format::{ENTRY_UNMAPPED, ENTRY_ZERO};
use super::pagedir::Dir;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// Snapshot time of the origin (it reads its image, never the history).
pub const NO_OTIME: u64 = u64::MAX;
/// Bytes of one page of resolved entries.
pub const PAGE_BYTES: usize = PAGE * 8;

const PAGE_SHIFT: u32 = 9;
const PAGE: usize = 1 << PAGE_SHIFT;

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

/// The page tree of a table: its pages in a [`Dir`], never changed once published, except the
/// entries of pages the owning table may write in place. Installing a page costs one group of
/// pages and the directory's top level, not O(pages); and what the tree holds is bounded by
/// its pages, not by the highest chunk one holds (`pagedir.rs`).
#[derive(Default)]
struct Tree(Dir<Page>);

impl Tree {
    #[inline]
    fn page(&self, pi: u64) -> Option<&Arc<Page>> {
        self.0.page(pi)
    }

    #[inline]
    fn entry(&self, chunk: u64) -> u64 {
        match self.page(chunk >> PAGE_SHIFT) {
            Some(p) => p.get((chunk as usize) & (PAGE - 1)),
            None => ENTRY_UNMAPPED,
        }
    }
}

/// What a table keeps of one page of chunks for itself: the chunks it maps, and whether the
/// tree's page there is its own to store into.
#[derive(Default)]
struct Marks {
    /// One bit per chunk of the page that the table maps itself.
    own: [u64; PAGE / 64],
    /// The table's [`Table::epoch`] when it allocated the tree's page here (0: it never did):
    /// it may store into it in place while its epoch is still that one (not shared since).
    made: u64,
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
    /// Chunks from this one on never read through to the origin: where the device maps
    /// nothing there it reads zeros (its size grew past what it inherited; `resize.rs`). Only
    /// lowered, by a shrink.
    through: AtomicU64,
    /// The device's size in bytes, loaded by every request's bounds check.
    size: AtomicU64,
}

impl ReadSide {
    fn new(tree: Arc<Tree>, otime: u64, through: u64, size: u64) -> Self {
        Self {
            tree: ArcSwap::new(tree),
            status: AtomicU8::new(ReadStatus::Active as u8),
            otime,
            through: AtomicU64::new(through),
            size: AtomicU64::new(size),
        }
    }

    /// The device's size, bytes.
    #[inline]
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The first chunk that no longer reads through to the origin.
    #[inline]
    pub fn through(&self) -> u64 {
        self.through.load(Ordering::Relaxed)
    }

    /// `entry` as read at `chunk`: unmapped past `through` reads zeros.
    #[inline]
    fn clamp(&self, chunk: u64, entry: u64) -> u64 {
        if entry == ENTRY_UNMAPPED && chunk >= self.through() {
            ENTRY_ZERO
        } else {
            entry
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
        self.clamp(chunk, self.tree.load().entry(chunk))
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
/// resolved entry never goes stale. Memory: 8 bytes per chunk of each page a device has
/// changed, plus 1 bit per chunk of each page where it maps a chunk itself; nothing for the
/// chunks of other pages, wherever they lie.
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
    /// By page index, for the pages where the table maps a chunk or allocated the page: a
    /// map, so that it holds what the table changed and nothing for the chunks below.
    marks: HashMap<u64, Marks>,
    /// Counts the times the table was shared, from 1: pages it allocated before the last
    /// share are read by another table too ([`Marks::made`]).
    epoch: u64,
}

impl Default for Table {
    fn default() -> Self {
        Self::with_tree(Arc::default(), NO_OTIME, u64::MAX, 0)
    }
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("pages", &self.tree.0.pages().count())
            .field(
                "own_chunks",
                &self
                    .marks
                    .values()
                    .flat_map(|m| m.own.iter())
                    .map(|w| w.count_ones())
                    .sum::<u32>(),
            )
            .finish()
    }
}

/// The page of `chunk`, and the word and bit of its [`Marks::own`].
#[inline]
fn locate(chunk: u64) -> (u64, usize, u64) {
    let i = (chunk as usize) & (PAGE - 1);
    (chunk >> PAGE_SHIFT, i / 64, 1 << (i % 64))
}

impl Table {
    fn with_tree(tree: Arc<Tree>, otime: u64, through: u64, size: u64) -> Self {
        Self {
            side: Arc::new(ReadSide::new(tree.clone(), otime, through, size)),
            tree,
            marks: HashMap::new(),
            epoch: 1,
        }
    }

    /// A table whose unmapped chunks read what `self` reads now. From now on both copy a
    /// page before changing it: the other one reads it too.
    pub fn share(&mut self) -> Self {
        self.epoch += 1;
        let side = &self.side;
        Self::with_tree(self.tree.clone(), side.otime, side.through(), side.size())
    }

    /// An empty table of a snapshot of the origin taken at snapshot time `otime`, of `size`
    /// bytes, reading through to the origin below chunk `through`.
    pub fn for_origin_snapshot(otime: u64, through: u64, size: u64) -> Self {
        Self::with_tree(Arc::default(), otime, through, size)
    }

    /// The device's size, bytes.
    #[inline]
    pub fn size(&self) -> u64 {
        self.side.size()
    }

    /// Sets the device's size; a smaller one also stops it reading through to the origin from
    /// chunk `through_limit` on.
    pub fn set_size(&mut self, size: u64, through_limit: u64) {
        self.side.size.store(size, Ordering::Release);
        self.side
            .through
            .fetch_min(through_limit, Ordering::Relaxed);
    }

    /// The first chunk that no longer reads through to the origin.
    #[inline]
    pub fn through(&self) -> u64 {
        self.side.through()
    }

    /// Sets size and `through` as recorded (opening a cache object).
    pub fn init_size(&mut self, size: u64, through: u64) {
        self.side.size.store(size, Ordering::Release);
        self.side.through.store(through, Ordering::Relaxed);
    }

    /// The chunks from `from` on whose resolved entries (own or inherited) are cache blocks.
    pub fn blocks_from(&self, from: u64) -> Vec<u64> {
        let mut out = Vec::new();
        for (pi, p) in self.tree.0.pages() {
            let base = pi << PAGE_SHIFT;
            if base + PAGE as u64 <= from {
                continue;
            }
            for i in 0..PAGE {
                let c = base + i as u64;
                let e = p.get(i);
                if c >= from && e != ENTRY_UNMAPPED && e != ENTRY_ZERO {
                    out.push(c);
                }
            }
        }
        out
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
        self.side.clamp(chunk, self.tree.entry(chunk))
    }

    /// The device's own entry at `chunk` (ENTRY_UNMAPPED if it reads through).
    #[inline]
    pub fn get(&self, chunk: u64) -> u64 {
        let (pi, w, bit) = locate(chunk);
        if self.marks.get(&pi).is_some_and(|m| m.own[w] & bit != 0) {
            self.resolved(chunk)
        } else {
            ENTRY_UNMAPPED
        }
    }

    /// Sets the device's own entry; `ENTRY_UNMAPPED` makes it read `inherited`.
    pub fn set(&mut self, chunk: u64, entry: u64, inherited: u64) {
        let (pi, w, bit) = locate(chunk);
        let value = if entry == ENTRY_UNMAPPED {
            if let Some(m) = self.marks.get_mut(&pi) {
                m.own[w] &= !bit;
            }
            inherited
        } else {
            self.marks.entry(pi).or_default().own[w] |= bit;
            entry
        };
        if self.tree.entry(chunk) == value {
            return;
        }
        let i = (chunk as usize) & (PAGE - 1);
        if self.marks.get(&pi).is_some_and(|m| m.made == self.epoch) {
            if let Some(p) = self.tree.page(pi) {
                // Relaxed: readers of this entry are ordered by the chunk's stripe lock.
                p.0[i].store(value, Ordering::Relaxed);
                return;
            }
        }
        // Readers may be using the current page and tree: publish new ones.
        let page = match self.tree.page(pi) {
            Some(p) => p.copy(),
            None => Page::filled(ENTRY_UNMAPPED),
        };
        page.0[i].store(value, Ordering::Relaxed);
        self.tree = Arc::new(Tree(self.tree.0.with_page(pi, Arc::new(page))));
        self.side.tree.store(self.tree.clone());
        self.marks.entry(pi).or_default().made = self.epoch;
    }

    /// Every (chunk, own entry), in chunk order.
    pub fn mapped(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut pages: Vec<(u64, &[u64; PAGE / 64])> =
            self.marks.iter().map(|(&pi, m)| (pi, &m.own)).collect();
        pages.sort_unstable_by_key(|p| p.0);
        pages.into_iter().flat_map(move |(pi, own)| {
            own.iter().enumerate().flat_map(move |(wi, &w)| {
                let mut bits = w;
                std::iter::from_fn(move || {
                    if bits == 0 {
                        return None;
                    }
                    let b = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let c = (pi << PAGE_SHIFT) + wi as u64 * 64 + b;
                    Some((c, self.resolved(c)))
                })
            })
        })
    }

    /// Addresses of the pages of resolved entries this table references (shared ones
    /// included, for the caller to count once) and the bytes of the rest: its page tree (a
    /// shared group counted in full by each table) and bitmaps.
    pub fn memory(&self) -> (Vec<usize>, usize) {
        let pages = self.tree.0.pages().map(|(_, p)| Arc::as_ptr(p) as usize);
        // A map's slot: the key, the marks and a control byte (hashbrown's layout).
        let marks = self.marks.capacity() * (8 + std::mem::size_of::<Marks>() + 1);
        (pages.collect(), self.tree.0.memory() + marks)
    }
}
