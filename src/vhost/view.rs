//! The workers' view of guest memory: the frontend's regions without their dirty-page log.
//!
//! vhost-user-backend hands the frontend's log (SET_LOG_BASE) to the bitmap of each region, so
//! the memory it maps must carry our bitmap type ([`DirtyLog`]). But vm-memory's accessors are
//! generic over that type: with a bitmap other than `()` every descriptor, header and status
//! access carries a bitmap slice, and the accessors (`read_slice`, `write_slice`,
//! `stop_on_error`) were measured out of line on the request path, which lost 10-28% of
//! 4 KiB reads at depth 32 on one queue while nobody migrated (docs/benchmarks.md). So the
//! workers see each accepted table as a [`MemView`]: the very same mappings as regions of unit
//! bitmap type, which cost what they cost without a dirty log, and the owning table, which
//! keeps them mapped and whose logs the request path marks by hand while the frontend logs
//! (`dirty.rs`: read data, status bytes, GET_ID answers and the used ring).
//!
//! Workers pop requests here too ([`pop_request`]): through a table, and only while no newer
//! one has been published, so a request is never read through a table older than the one the
//! frontend had when it made the request available.

use super::dirty::DirtyLog;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MmapRegion, Permissions,
};

/// One guest memory table as vhost-user-backend maps it: its regions, each with its dirty-page
/// log (`dirty.rs`).
pub type GuestMemTable = GuestMemoryMmap<DirtyLog>;

/// Guest memory as the library hands it to us.
pub type GuestMem = GuestMemoryAtomic<GuestMemTable>;

/// One accepted memory table as the workers see it.
#[derive(Debug)]
pub struct MemView {
    /// The owner's regions again, as unit-bitmap regions that do not own their mappings:
    /// valid only while `owner` lives, so never cloned out of the view (a borrow through
    /// `physical_memory()` is fine; a clone of it would outlive the mappings).
    plain: GuestMemoryMmap<()>,
    /// The table vhost-user-backend mapped: it owns the mappings, and its regions hold the
    /// dirty logs.
    owner: GuestMemTable,
    /// A newer table was published to the workers (`memory.rs`) before the frontend was told
    /// its change was done.
    superseded: AtomicBool,
}

impl MemView {
    /// The view of `owner`'s regions.
    pub(super) fn new(owner: GuestMemTable) -> io::Result<Self> {
        let mut regions = Vec::with_capacity(owner.num_regions());
        for region in owner.iter() {
            regions.push(plain_region(region)?);
        }
        let plain = GuestMemoryMmap::from_regions(regions).map_err(io::Error::other)?;
        Ok(MemView {
            plain,
            owner,
            superseded: AtomicBool::new(false),
        })
    }

    /// An empty table.
    pub(super) fn empty() -> Self {
        MemView {
            plain: GuestMemoryMmap::new(),
            owner: GuestMemTable::new(),
            superseded: AtomicBool::new(false),
        }
    }

    /// The table that owns the mappings and holds their dirty logs.
    pub(super) fn owner(&self) -> &GuestMemTable {
        &self.owner
    }

    /// Whether a newer table has been published. It reads true for any worker that has seen a
    /// request the driver made available after the frontend was told of a newer table (whose
    /// buffers may lie in memory only that table has): see [`pop_request`].
    pub(super) fn superseded(&self) -> bool {
        self.superseded.load(Ordering::Acquire)
    }

    /// Marks this table superseded, once the newer one is published and before the frontend
    /// is told.
    pub(super) fn supersede(&self) {
        self.superseded.store(true, Ordering::Release);
    }
}

/// `region` as a region of unit bitmap type over the same mapping.
fn plain_region(region: &GuestRegionMmap<DirtyLog>) -> io::Result<GuestRegionMmap<()>> {
    let mapping: &MmapRegion<DirtyLog> = region;
    let mut builder = MmapRegionBuilder::new_with_bitmap(mapping.size(), ())
        .with_mmap_prot(mapping.prot())
        .with_mmap_flags(mapping.flags());
    if let Some(file) = mapping.file_offset() {
        builder = builder.with_file_offset(file.clone());
    }
    // SAFETY: `as_ptr()` and `size()` are the mapping `region` owns, present in the process
    // for as long as `region` exists; the view's region is built with the same protection
    // and flags and never unmaps it (a raw-pointer region does not own its mapping). Every
    // view region lives in a `MemView` whose `owner` holds `region` (its table holds an
    // `Arc` of it), so the mapping outlives the view region.
    let builder = unsafe { builder.with_raw_mmap_pointer(mapping.as_ptr()) };
    let plain = builder.build().map_err(io::Error::other)?;
    GuestRegionMmap::new(plain, region.start_addr())
        .ok_or_else(|| io::Error::other("guest region wraps around the address space"))
}

/// What [`pop_request`] found.
pub(super) enum Popped<'m> {
    /// The next request's descriptor chain.
    Chain(DescriptorChain<&'m MemView>),
    /// None available (or a ring the driver broke: virtio-queue says no more).
    Empty,
    /// One is available, but the frontend changed its memory table since `mem` was loaded:
    /// the request is left in the ring, to pop again through the new table.
    TableChanged,
}

/// Pops the next request through `mem`, unless `mem` is no longer the workers' current table.
///
/// The frontend may add a region (ADD_MEM_REG) and, once told it is done, make a request
/// available whose buffers lie in it. A worker that loaded its table before that change (a
/// moment before, then preempted) would pop that request and find its buffers outside guest
/// memory: an I/O error for a correct driver. The new table is published and the old one
/// marked superseded before the frontend is told, so the mark is visible to a worker that
/// sees the request (it read the avail index with acquire ordering), and looked for after the
/// pop the check has no window.
pub(super) fn pop_request<'m>(queue: &mut Queue, mem: &'m MemView) -> Popped<'m> {
    match queue.pop_descriptor_chain(mem) {
        None => Popped::Empty,
        Some(_) if mem.superseded() => {
            queue.go_to_previous_position();
            Popped::TableChanged
        }
        Some(chain) => Popped::Chain(chain),
    }
}

// `GuestMemory` itself, not `GuestMemoryBackend`: every access then goes straight to the
// unit-bitmap table's own code (its slice iterator, its `Bytes`), the very functions a table
// without a dirty log uses, rather than to copies of them made for a wrapper type, which the
// compiler may inline differently.
impl GuestMemory for MemView {
    type PhysicalMemory = GuestMemoryMmap<()>;
    type Bitmap = ();

    #[inline]
    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        GuestMemory::check_range(&self.plain, addr, count, access)
    }

    #[inline]
    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> vm_memory::guest_memory::Result<impl GuestMemorySliceIterator<'a, BS<'a, ()>>> {
        GuestMemory::get_slices(&self.plain, addr, count, access)
    }

    #[inline]
    fn physical_memory(&self) -> Option<&Self::PhysicalMemory> {
        Some(&self.plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    #[test]
    fn a_request_popped_through_a_superseded_table_is_left_in_the_ring() {
        let owner = GuestMemTable::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let old = MemView::new(owner.clone()).unwrap();
        let new = MemView::new(owner).unwrap();
        let mock = MockSplitQueue::new(&old, 16);
        let desc = |addr| RawDescriptor::from(SplitDescriptor::new(addr, 16, 0, 0));
        mock.add_desc_chains(&[desc(0x8_0000), desc(0x9_0000)], 0)
            .unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        assert!(matches!(pop_request(&mut queue, &old), Popped::Chain(_)));
        old.supersede();
        assert!(matches!(
            pop_request(&mut queue, &old),
            Popped::TableChanged
        ));
        assert_eq!(queue.next_avail(), 1, "the request stays available");
        match pop_request(&mut queue, &new) {
            Popped::Chain(mut chain) => {
                assert_eq!(chain.next().map(|d| d.addr()), Some(GuestAddress(0x9_0000)));
            }
            _ => panic!("the new table pops the request left"),
        }
        assert!(matches!(pop_request(&mut queue, &new), Popped::Empty));
    }

    #[test]
    fn the_view_reads_and_writes_the_owners_memory() {
        let owner = GuestMemTable::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x10_0000), 0x2000),
        ])
        .unwrap();
        let view = MemView::new(owner.clone()).unwrap();
        assert_eq!(view.physical_memory().map(|m| m.num_regions()), Some(2));
        view.write_obj(0xabcd_u16, GuestAddress(0x10_0ffe)).unwrap();
        assert_eq!(
            owner.read_obj::<u16>(GuestAddress(0x10_0ffe)).unwrap(),
            0xabcd
        );
        owner.write_obj(0x5a_u8, GuestAddress(0x3fff)).unwrap();
        assert_eq!(view.read_obj::<u8>(GuestAddress(0x3fff)).unwrap(), 0x5a);
        assert!(
            view.write_obj(0u8, GuestAddress(0x4000)).is_err(),
            "a hole stays a hole"
        );
        // The mappings stay with the view once the frontend's table is gone.
        drop(owner);
        assert_eq!(
            view.read_obj::<u16>(GuestAddress(0x10_0ffe)).unwrap(),
            0xabcd
        );
        let range = (
            GuestAddress(0x10_0000),
            0x2000,
            vm_memory::Permissions::Write,
        );
        assert!(GuestMemory::check_range(&view, range.0, range.1, range.2));
    }
}
