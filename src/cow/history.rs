//! The origin's history: for each origin chunk, the copies of its old data made when the origin
//! was written, each stamped with the snapshot time it was made at (docs/engine.md, "The
//! origin's history": dm-thin's "write time" idea with 64-bit times).
//!
//! Every snapshot has a *snapshot time* (`otime`): a snapshot of the origin takes the next tick
//! of a clock that advances only when the origin gets a snapshot; a snapshot of a snapshot
//! inherits its parent's time, since both froze the origin at the same moment. A copy made when
//! the origin's chunk `c` is written while the clock reads `t` is stamped `t`; a device with
//! snapshot time `s` that reads through to the origin at `c` reads the oldest copy of `c`
//! stamped `>= s` (the origin's data at `c` as it was from `s` until that copy), or the origin
//! image if there is none.
//!
//! So an origin write preserves a chunk with **one** record whatever the number of snapshots,
//! instead of one table entry per snapshot.
//!
//! Memory: one 8-byte slot per chunk of each 512-chunk page that holds a copy. A chunk with one
//! copy (the common case) keeps it in the slot itself; a chunk with more copies, or with a
//! stamp or block too large to pack, keeps them in a list on the side.
//!
//! Concurrency: readers take no lock here. Copies of chunk `c` are added only with `c`'s stripe
//! lock held exclusively, so no reader of `c` runs meanwhile; copies are removed (when the last
//! snapshot that could read them goes) while readers of other snapshots may read the same chunk,
//! so every removal leaves each slot in a state that gives every remaining snapshot time the same
//! answer as before.

use super::format::ENTRY_UNMAPPED;
use super::pagedir::Dir;
use arc_swap::{ArcSwap, ArcSwapOption};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

const PAGE_SHIFT: u32 = 9;
/// Chunks per page.
pub const PAGE: usize = 1 << PAGE_SHIFT;

/// A slot holding no copy.
const EMPTY: u64 = 0;
/// A slot whose copies are in the page's side lists.
const LISTED: u64 = 2;
/// Packed slots: bit 0 set, the entry in bits 1..40, the stamp in bits 40..64.
const ENTRY_BITS: u32 = 39;
const STAMP_SHIFT: u32 = ENTRY_BITS + 1;

/// One preserved copy: its stamp (snapshot time) and its entry (a cache block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preserved {
    pub time: u64,
    pub entry: u64,
}

impl Preserved {
    fn packed(self) -> Option<u64> {
        (self.entry < 1 << ENTRY_BITS && self.time > 0 && self.time < 1 << (64 - STAMP_SHIFT))
            .then_some((self.time << STAMP_SHIFT) | (self.entry << 1) | 1)
    }

    #[inline]
    fn unpack(v: u64) -> Self {
        Self {
            time: v >> STAMP_SHIFT,
            entry: (v >> 1) & ((1 << ENTRY_BITS) - 1),
        }
    }
}

/// The copies of one chunk, oldest (lowest stamp) first; stamps strictly increase.
type Copies = Box<[Preserved]>;

struct SideLists([ArcSwapOption<Copies>; PAGE]);

/// The slots of [`PAGE`] chunks.
struct Page {
    slots: [AtomicU64; PAGE],
    /// Allocated when a chunk of the page first needs a list.
    lists: ArcSwapOption<SideLists>,
    /// The stamps of the page's copies and how many copies carry each, sorted: lets a release
    /// visit only the pages holding the stamps it releases. Only the writer (which holds the
    /// engine's state lock) uses it; the mutex is never contended.
    stamps: Mutex<Vec<(u64, u32)>>,
}

impl Page {
    fn new() -> Self {
        Self {
            slots: std::array::from_fn(|_| AtomicU64::new(EMPTY)),
            lists: ArcSwapOption::const_empty(),
            stamps: Mutex::new(Vec::new()),
        }
    }

    /// Counts the stamps of `gone` out and those of `new` in.
    fn restamp(&self, gone: &[Preserved], new: &[Preserved]) {
        let mut stamps = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        let distinct = stamps.len();
        for p in gone {
            if let Ok(i) = stamps.binary_search_by_key(&p.time, |e| e.0) {
                stamps[i].1 -= 1;
                if stamps[i].1 == 0 {
                    stamps.remove(i);
                }
            }
        }
        for p in new {
            match stamps.binary_search_by_key(&p.time, |e| e.0) {
                Ok(i) => stamps[i].1 += 1,
                Err(i) => stamps.insert(i, (p.time, 1)),
            }
        }
        if stamps.len() != distinct {
            // A page usually holds one or two stamps: keep exactly what it needs.
            stamps.shrink_to_fit();
        }
    }

    /// Whether some copy of the page is stamped in `lo..hi`.
    fn has_stamps_in(&self, lo: u64, hi: u64) -> bool {
        let stamps = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        let i = stamps.partition_point(|e| e.0 < lo);
        stamps.get(i).is_some_and(|e| e.0 < hi)
    }

    /// Calls `f` with the copies of chunk `i` of the page, oldest first, without allocating:
    /// the one place that decodes a slot. Lock-free.
    #[inline]
    fn with_copies<R>(&self, i: usize, f: impl FnOnce(&[Preserved]) -> R) -> R {
        // Acquire: a list is published before the slot says to look there.
        match self.slots[i].load(Ordering::Acquire) {
            EMPTY => f(&[]),
            LISTED => {
                let lists = self.lists.load();
                match lists.as_ref().map(|l| l.0[i].load()) {
                    Some(copies) => f(copies.as_deref().map_or(&[], |c| &c[..])),
                    // Emptied by a release after the slot was read: no copies, as now.
                    None => f(&[]),
                }
            }
            v => f(&[Preserved::unpack(v)]),
        }
    }

    fn copies(&self, i: usize) -> Vec<Preserved> {
        self.with_copies(i, <[Preserved]>::to_vec)
    }
}

/// Per origin chunk, its preserved copies. Pages are allocated when a chunk of theirs is first
/// preserved and never freed; the page directory is republished (one group and its top level
/// copied, `pagedir.rs`) when one is added.
pub struct OriginHistory {
    pages: ArcSwap<Dir<Page>>,
}

impl std::fmt::Debug for OriginHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OriginHistory")
            .field("pages", &self.pages.load().pages().count())
            .finish()
    }
}

impl Default for OriginHistory {
    fn default() -> Self {
        Self {
            pages: ArcSwap::from_pointee(Dir::default()),
        }
    }
}

impl OriginHistory {
    fn page(&self, chunk: u64) -> Option<Arc<Page>> {
        self.pages.load().page(chunk >> PAGE_SHIFT).cloned()
    }

    /// Calls `f` with the copies of `chunk` (none if its page does not exist). Lock-free.
    #[inline]
    fn with_copies<R>(&self, chunk: u64, f: impl FnOnce(&[Preserved]) -> R) -> R {
        let pages = self.pages.load();
        match pages.page(chunk >> PAGE_SHIFT) {
            Some(page) => page.with_copies((chunk as usize) & (PAGE - 1), f),
            None => f(&[]),
        }
    }

    /// What a device with snapshot time `otime` reads at `chunk` when it reads through to the
    /// origin: the entry of the oldest copy stamped `>= otime`, or `ENTRY_UNMAPPED` (the origin
    /// image). Lock-free; sound while the caller holds the chunk's stripe lock.
    #[inline]
    pub fn lookup(&self, chunk: u64, otime: u64) -> u64 {
        self.with_copies(chunk, |copies| {
            copies
                .iter()
                .find(|p| p.time >= otime)
                .map_or(ENTRY_UNMAPPED, |p| p.entry)
        })
    }

    /// The copies of `chunk`, oldest first.
    pub fn copies(&self, chunk: u64) -> Vec<Preserved> {
        self.with_copies(chunk, <[Preserved]>::to_vec)
    }

    /// The stamp of the newest copy of `chunk`, 0 if none. No allocation: on every origin write.
    #[inline]
    pub fn newest(&self, chunk: u64) -> u64 {
        self.with_copies(chunk, |copies| copies.last().map_or(0, |p| p.time))
    }

    /// Replaces the copies of `chunk` (empty = none). Callers serialize changes (the state
    /// lock) and keep stamps strictly increasing. A chunk that ever needed a list keeps using
    /// it: switching it back to a packed slot would let a reader that saw "listed" find the
    /// list already gone.
    pub fn set(&self, chunk: u64, copies: &[Preserved]) {
        let i = (chunk as usize) & (PAGE - 1);
        let page = match self.page(chunk) {
            Some(p) => p,
            None if copies.is_empty() => return,
            None => self.add_page(chunk),
        };
        page.restamp(&page.copies(i), copies);
        let slot = &page.slots[i];
        let listed = slot.load(Ordering::Relaxed) == LISTED;
        let packed = match copies {
            [] => Some(EMPTY),
            [one] if !listed => one.packed(),
            _ => None,
        };
        match packed {
            Some(v) => {
                slot.store(v, Ordering::Release);
                if listed {
                    // Now empty: a reader that saw "listed" finds no list, which is right.
                    if let Some(l) = page.lists.load().as_ref() {
                        l.0[i].store(None);
                    }
                }
            }
            None => {
                let lists = match page.lists.load_full() {
                    Some(l) => l,
                    None => {
                        let l = Arc::new(SideLists(std::array::from_fn(|_| {
                            ArcSwapOption::const_empty()
                        })));
                        page.lists.store(Some(l.clone()));
                        l
                    }
                };
                lists.0[i].store(Some(Arc::new(copies.to_vec().into_boxed_slice())));
                slot.store(LISTED, Ordering::Release);
            }
        }
    }

    fn add_page(&self, chunk: u64) -> Arc<Page> {
        let page = Arc::new(Page::new());
        let pages = self
            .pages
            .load()
            .with_page(chunk >> PAGE_SHIFT, page.clone());
        self.pages.store(Arc::new(pages));
        page
    }

    /// Calls `f` with every chunk that has a copy stamped in `lo..hi` and its copies, in chunk
    /// order, without allocating. Visits only the pages holding such a stamp.
    pub fn for_each_in(&self, lo: u64, hi: u64, mut f: impl FnMut(u64, &[Preserved])) {
        let pages = self.pages.load();
        for (pi, page) in pages.pages() {
            if !page.has_stamps_in(lo, hi) {
                continue;
            }
            for i in 0..PAGE {
                if page.slots[i].load(Ordering::Acquire) == EMPTY {
                    continue;
                }
                page.with_copies(i, |copies| {
                    if copies.iter().any(|p| (lo..hi).contains(&p.time)) {
                        f((pi << PAGE_SHIFT) + i as u64, copies);
                    }
                });
            }
        }
    }

    /// Every chunk with a copy stamped in `lo..hi`, with its copies, for a sweep by the writer
    /// that changes them as it goes.
    pub fn with_stamps_in(&self, lo: u64, hi: u64) -> Vec<(u64, Vec<Preserved>)> {
        let mut v = Vec::new();
        self.for_each_in(lo, hi, |c, copies| v.push((c, copies.to_vec())));
        v
    }

    /// Every chunk with copies, and its copies, in chunk order.
    pub fn all(&self) -> Vec<(u64, Vec<Preserved>)> {
        self.with_stamps_in(0, u64::MAX)
    }

    /// Bytes of memory held: pages, side lists and the page directory.
    pub fn memory(&self) -> usize {
        let pages = self.pages.load();
        let mut bytes = pages.memory();
        for (_, page) in pages.pages() {
            // The page and its `Arc`'s two counts.
            bytes += std::mem::size_of::<Page>() + 16;
            bytes += page
                .stamps
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .capacity()
                * 16;
            if let Some(l) = page.lists.load().as_ref() {
                bytes += std::mem::size_of::<SideLists>();
                for s in l.0.iter() {
                    if let Some(c) = s.load().as_deref() {
                        bytes += 32 + c.len() * std::mem::size_of::<Preserved>();
                    }
                }
            }
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(time: u64, entry: u64) -> Preserved {
        Preserved { time, entry }
    }

    #[test]
    fn lookup_finds_the_oldest_copy_at_or_after_the_snapshot_time() {
        let h = OriginHistory::default();
        assert_eq!(h.lookup(5, 1), ENTRY_UNMAPPED);
        h.set(5, &[p(2, 10)]);
        assert_eq!(h.lookup(5, 2), 10, "one copy, packed");
        assert_eq!(h.lookup(5, 3), ENTRY_UNMAPPED);
        h.set(5, &[p(2, 10), p(5, 11)]);
        assert_eq!(h.lookup(5, 1), 10);
        assert_eq!(h.lookup(5, 2), 10);
        assert_eq!(h.lookup(5, 3), 11);
        assert_eq!(h.lookup(5, 5), 11);
        assert_eq!(
            h.lookup(5, 6),
            ENTRY_UNMAPPED,
            "newer snapshots read the origin"
        );
        assert_eq!(h.lookup(4, 1), ENTRY_UNMAPPED, "other chunks of the page");
        assert_eq!(h.newest(5), 5);
        // Too large to pack: listed.
        h.set(5000, &[p(1 << 30, 1 << 45)]);
        assert_eq!(h.lookup(5000, 1), 1 << 45, "a second page");
        assert_eq!(h.newest(5000), 1 << 30);
        assert_eq!(
            h.all(),
            vec![
                (5, vec![p(2, 10), p(5, 11)]),
                (5000, vec![p(1 << 30, 1 << 45)])
            ]
        );
        assert_eq!(h.with_stamps_in(3, 6), vec![(5, vec![p(2, 10), p(5, 11)])]);
        assert!(h.with_stamps_in(6, 1 << 30).is_empty());
        // Back to one copy: stays listed, same answers.
        h.set(5, &[p(5, 11)]);
        assert_eq!(h.lookup(5, 1), 11);
        assert_eq!(h.lookup(5, 6), ENTRY_UNMAPPED);
        h.set(5, &[]);
        assert_eq!(h.lookup(5, 1), ENTRY_UNMAPPED);
        assert_eq!(h.newest(5), 0);
        assert_eq!(h.copies(5000), vec![p(1 << 30, 1 << 45)]);
    }
}
