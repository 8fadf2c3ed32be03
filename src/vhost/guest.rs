//! Guest buffers as host iovecs, for preadv/pwritev straight into guest memory.
//!
//! Most raw-pointer code of the vhost module lives here (the rest: `view.rs`, `uring.rs`). A
//! [`GuestIovecs`] holds the iovecs of one request *and* a reference to the guest memory table
//! they point into, so the memory they name stays mapped for as long as they exist: they may
//! move to another thread (`Send`) by ownership, whatever the frontend does to its memory
//! table meanwhile.

pub use super::view::{GuestMem, GuestMemTable, MemView};
use crate::virtio_blk::{Segment, SECTOR_SIZE};
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;
use vm_memory::{GuestMemory, GuestMemoryAtomic, GuestMemoryLoadGuard, Permissions};

/// Guest memory as the queue workers see it: the accepted tables, without their dirty logs
/// (`view.rs`).
pub(super) type WorkerMem = GuestMemoryAtomic<MemView>;

/// The workers' guest memory table at one moment (`WorkerMem::memory()`), loaded once per
/// batch: the frontend may add a region (ADD_MEM_REG) at any time and point its next request
/// there. A worker may load it just before such a change, so each pop checks that it is still
/// the current one (`view.rs`, `pop_request`).
pub(super) type GuestMemGuard = GuestMemoryLoadGuard<MemView>;

/// The guest buffers of one request as host iovecs, and the memory table they point into.
///
/// Reused from request to request: filling it allocates nothing once the vectors have grown,
/// and takes no reference count unless the memory table changed since the last fill (rare:
/// SET_MEM_TABLE, ADD_MEM_REG), so the hot path has no atomic traffic on the shared table.
#[derive(Default)]
pub(super) struct GuestIovecs {
    /// The buffers in order; only the first half once split.
    left: Vec<libc::iovec>,
    /// The second half of a request split for parallel I/O.
    right: Vec<libc::iovec>,
    /// The table every iovec in `left` and `right` points into (`None` only while both are
    /// empty). Holding it keeps those regions mapped, even if the frontend removes them.
    table: Option<Arc<MemView>>,
}

// SAFETY: the iovecs are the only non-`Send` part (raw pointers). They point into regions of
// `table`, which this value owns a reference to (an `Arc` of a `Send + Sync` table), so they
// stay valid on whatever thread the value moves to; nothing here is tied to a thread.
unsafe impl Send for GuestIovecs {}

impl GuestIovecs {
    /// Translates `segments` into host iovecs in `mem`, following region boundaries, each
    /// region checked for `access`.
    pub(super) fn fill(
        &mut self,
        segments: &[Segment],
        mem: &GuestMemGuard,
        access: Permissions,
    ) -> io::Result<()> {
        // Forget the old pointers before the table they point into may be let go.
        self.left.clear();
        self.right.clear();
        let current: &MemView = mem;
        let held = self
            .table
            .as_ref()
            .is_some_and(|t| std::ptr::eq(Arc::as_ptr(t), current));
        if !held {
            // A new table (or the first fill since the queue went idle): hold this one. The
            // pointer comparison is exact: the table we held is alive, so a new one cannot
            // have been allocated at its address.
            self.table = Some(mem.clone().into_inner());
        }
        for seg in segments {
            let slices = current
                .get_slices(seg.addr, seg.len as usize, access)
                .map_err(io::Error::other)?;
            for slice in slices {
                let slice = slice.map_err(io::Error::other)?;
                self.left.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr() as *mut libc::c_void,
                    iov_len: slice.len(),
                });
            }
        }
        Ok(())
    }

    /// Lets go of the memory table (and the iovecs into it) if it is no longer `current`, so
    /// that a region the frontend removed is not kept mapped. The current table is kept: it
    /// maps nothing the frontend has not, and the next fill would only take it again.
    pub(super) fn release_stale(&mut self, current: &GuestMemGuard) {
        let current: &MemView = current;
        if self
            .table
            .as_ref()
            .is_some_and(|t| !std::ptr::eq(Arc::as_ptr(t), current))
        {
            self.left.clear();
            self.right.clear();
            self.table = None;
        }
    }

    /// The buffers as iovecs (the first half once split), for a transfer the queue submits
    /// itself (`uring.rs`): they point into the memory table this value holds.
    pub(super) fn iovecs(&self) -> &[libc::iovec] {
        &self.left
    }

    /// Drops the first `n` bytes of the buffers (a short transfer, to be submitted again for
    /// the rest).
    pub(super) fn consume(&mut self, mut n: usize) {
        let mut skip = 0;
        for v in self.left.iter_mut() {
            if n >= v.iov_len {
                n -= v.iov_len;
                skip += 1;
            } else {
                // Stays inside the same guest buffer: n < iov_len.
                v.iov_base = (v.iov_base as *mut u8).wrapping_add(n) as *mut libc::c_void;
                v.iov_len -= n;
                break;
            }
        }
        self.left.drain(..skip);
    }

    /// Cuts the buffers (holding `total` bytes) in two halves at the sector boundary nearest
    /// their middle; returns the byte offset at which the second half starts.
    pub(super) fn split_in_two(&mut self, total: u64) -> u64 {
        split_iovecs(&mut self.left, &mut self.right, total)
    }

    /// The buffers, for a write from guest memory (the first half once split).
    pub(super) fn io_slices(&self) -> &[IoSlice<'_>] {
        // SAFETY: `left` holds only iovecs into `table`, which lives as long as `self`.
        unsafe { io_slices(&self.left) }
    }

    /// The buffers, for a read into guest memory (the first half once split).
    pub(super) fn io_slices_mut(&mut self) -> &mut [IoSliceMut<'_>] {
        // SAFETY: `left` holds only iovecs into `table`, which lives as long as `self`.
        unsafe { io_slices_mut(&mut self.left) }
    }

    /// Both halves of a split request, for a write from guest memory.
    pub(super) fn halves(&self) -> (&[IoSlice<'_>], &[IoSlice<'_>]) {
        // SAFETY: `left` and `right` hold only iovecs into `table`, which lives as long as
        // `self`.
        unsafe { (io_slices(&self.left), io_slices(&self.right)) }
    }

    /// Both halves of a split request, for a read into guest memory.
    pub(super) fn halves_mut(&mut self) -> (&mut [IoSliceMut<'_>], &mut [IoSliceMut<'_>]) {
        // SAFETY: `left` and `right` hold only iovecs into `table`, which lives as long as
        // `self`.
        unsafe {
            (
                io_slices_mut(&mut self.left),
                io_slices_mut(&mut self.right),
            )
        }
    }
}

/// Splits `left` (holding `total` bytes) at the sector boundary nearest its middle, moving the
/// second half into `right` (a buffer straddling the cut is cut in two). Returns the byte
/// offset at which `right` starts.
fn split_iovecs(left: &mut Vec<libc::iovec>, right: &mut Vec<libc::iovec>, total: u64) -> u64 {
    let half = (total / 2) & !(SECTOR_SIZE - 1);
    right.clear();
    let mut pos = 0u64;
    for i in 0..left.len() {
        let len = left[i].iov_len as u64;
        if pos + len > half {
            let inner = (half - pos) as usize;
            if inner > 0 {
                right.push(libc::iovec {
                    // Stays inside the same guest buffer: inner < iov_len.
                    iov_base: (left[i].iov_base as *mut u8).wrapping_add(inner)
                        as *mut libc::c_void,
                    iov_len: left[i].iov_len - inner,
                });
                left[i].iov_len = inner;
                right.extend_from_slice(&left[i + 1..]);
                left.truncate(i + 1);
            } else {
                right.extend_from_slice(&left[i..]);
                left.truncate(i);
            }
            break;
        }
        pos += len;
    }
    half
}

/// Views guest iovecs as `IoSliceMut`s, for a read into guest memory.
///
/// # Safety
/// `IoSliceMut` is guaranteed ABI-compatible with `struct iovec` on Unix. The caller must
/// ensure every iovec points into guest memory that stays mapped while the slices live (a
/// [`GuestIovecs`] holds the table its iovecs point into; `get_slices` checked the bounds, and
/// a split cuts inside a buffer).
///
/// Aliasing: these are views of guest RAM, which the guest's vCPUs may access at any time and
/// which a hostile guest may name twice (two buffers of one chain, or of two requests running
/// at once on the I/O pool). Host memory safety does not depend on it: every byte is inside a
/// checked, mapped guest region, and the only effect of such a race is the guest corrupting
/// its own buffers, as with DMA on real hardware. Strictly, Rust's `&mut [u8]` rules are not
/// upheld for such a guest; passing raw `VolatileSlice`s down to `preadv` would be the clean
/// fix (the engine's snapshot path also copies and fills through these slices).
unsafe fn io_slices_mut(iov: &mut [libc::iovec]) -> &mut [IoSliceMut<'_>] {
    // SAFETY: upheld by the caller as documented above.
    unsafe { std::slice::from_raw_parts_mut(iov.as_mut_ptr() as *mut IoSliceMut<'_>, iov.len()) }
}

/// Views guest iovecs as `IoSlice`s, for a write from guest memory.
///
/// # Safety
/// As for [`io_slices_mut`]; the buffers are only read.
unsafe fn io_slices(iov: &[libc::iovec]) -> &[IoSlice<'_>] {
    // SAFETY: upheld by the caller as documented above.
    unsafe { std::slice::from_raw_parts(iov.as_ptr() as *const IoSlice<'_>, iov.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

    fn view(ranges: &[(GuestAddress, usize)]) -> MemView {
        MemView::new(GuestMemTable::from_ranges(ranges).unwrap()).unwrap()
    }

    fn guest_mem() -> WorkerMem {
        GuestMemoryAtomic::new(view(&[(GuestAddress(0), 0x10_0000)]))
    }

    fn segment(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn iovecs_keep_the_memory_they_point_into_mapped() {
        let gm = guest_mem();
        let mut iov = GuestIovecs::default();
        iov.fill(&[segment(0x1000, 512)], &gm.memory(), Permissions::Write)
            .unwrap();
        // The frontend removes the region: the buffer stays mapped while the iovecs exist.
        gm.lock().unwrap().replace(MemView::empty());
        let buffers = iov.io_slices_mut();
        assert_eq!(buffers.len(), 1);
        buffers[0].fill(0xab);
        let held = iov.table.clone().expect("the table the iovecs point into");
        assert_eq!(held.read_obj::<u8>(GuestAddress(0x11ff)).unwrap(), 0xab);
        // Going idle lets it go, since it is no longer the current table.
        iov.release_stale(&gm.memory());
        assert!(iov.table.is_none() && iov.io_slices().is_empty());
        assert_eq!(Arc::strong_count(&held), 1, "only this test holds it now");
    }

    #[test]
    fn filling_takes_a_reference_only_when_the_table_changes() {
        let gm = guest_mem();
        let first = gm.memory().into_inner();
        let before = Arc::strong_count(&first);
        let mut iov = GuestIovecs::default();
        for _ in 0..10 {
            iov.fill(&[segment(0, 4096)], &gm.memory(), Permissions::Read)
                .unwrap();
        }
        assert_eq!(
            Arc::strong_count(&first),
            before + 1,
            "one reference, taken once"
        );
        // The current table is kept when the queue goes idle.
        iov.release_stale(&gm.memory());
        assert_eq!(Arc::strong_count(&first), before + 1);
        // A new table replaces it on the next fill.
        let second = view(&[(GuestAddress(0), 0x2000)]);
        gm.lock().unwrap().replace(second);
        iov.fill(&[segment(0, 4096)], &gm.memory(), Permissions::Read)
            .unwrap();
        assert_eq!(
            Arc::strong_count(&first),
            1,
            "only this test holds the old table"
        );
        // A buffer outside the table is refused.
        assert!(iov
            .fill(&[segment(0x1000, 8192)], &gm.memory(), Permissions::Read)
            .is_err());
    }

    fn iov(base: usize, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: len,
        }
    }

    #[test]
    fn split_cuts_inside_a_buffer_or_on_a_boundary() {
        let mut left = vec![iov(0x1000, 1 << 20)];
        let mut right = Vec::new();
        assert_eq!(split_iovecs(&mut left, &mut right, 1 << 20), 512 * 1024);
        assert_eq!((left.len(), left[0].iov_len), (1, 512 * 1024));
        assert_eq!(right.len(), 1);
        assert_eq!(right[0].iov_base as usize, 0x1000 + 512 * 1024);
        assert_eq!(right[0].iov_len, 512 * 1024);

        let mut left = vec![
            iov(0, 4096),
            iov(0x10_0000, 4096),
            iov(0x20_0000, 4096),
            iov(0x30_0000, 4096),
        ];
        assert_eq!(split_iovecs(&mut left, &mut right, 16384), 8192);
        assert_eq!(left.len(), 2);
        assert_eq!(right.len(), 2);
        assert_eq!(right[0].iov_base as usize, 0x20_0000);

        // An odd total splits on a sector boundary.
        let mut left = vec![iov(0, 3 * 512)];
        assert_eq!(split_iovecs(&mut left, &mut right, 3 * 512), 512);
        assert_eq!((left[0].iov_len, right[0].iov_len), (512, 1024));
    }
}
