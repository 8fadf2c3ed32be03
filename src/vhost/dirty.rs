//! The dirty-page log of live migration: our `VhostUserBackend::Bitmap`.
//!
//! While a VM migrates, its frontend copies guest RAM to the destination again and again and
//! must learn every page the backend wrote meanwhile. It gives us a log (`SET_LOG_BASE`, a
//! bitmap of 4 KiB guest pages in a memory file it shares with us) and turns logging on and off
//! with the `VHOST_F_LOG_ALL` feature. vhost-user-backend maps the log and hands each memory
//! region's part of it to that region's bitmap (`BitmapReplace::replace`). The queue workers
//! do not write through those regions but through a view of the same mappings without the
//! bitmap (`view.rs`: vm-memory's accessors cost more with one), so while the frontend logs
//! they mark by hand, after the write, every byte they wrote: the data a read or GET_ID put in
//! guest memory and the status byte ([`mark_buffers`], [`mark`]: `request.rs`), and the used
//! ring, whose entries, index, flags and `avail_event` a drain writes ([`mark_used_ring`]:
//! `queue.rs`, before the ring's lock goes).
//!
//! We do not use the library's `BitmapMmapRegion` because of what it costs when nobody
//! migrates: every access to guest memory clones an `Arc` shared by every queue (`slice_at`)
//! and every write takes a read lock shared by every queue (`mark_dirty`). [`DirtyLog`] slices
//! are a reference and an offset, and a write with logging off is one load of a flag that is
//! never written while it is off (a predictable branch on a shared, clean cache line).
//!
//! The log is the frontend's memory: it may shrink the file under us like any guest region.
//! Each log mapping is registered for SIGBUS containment (`sys::guest_faults`), so such a
//! fault costs the thread's request and the connection, never the process.

use crate::sys::guest_faults::GuestMappings;
use crate::virtio_blk::Segment;
use arc_swap::ArcSwapOption;
use log::warn;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapReplace, MemRegionBitmap, MmapLogReg};
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{
    Address, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion, Permissions,
};

/// Bytes of guest memory one bit of the log stands for (`VHOST_LOG_PAGE`).
const LOG_PAGE: usize = 4096;

/// One memory region's dirty-page bitmap (the bitmap type of guest memory).
#[derive(Clone, Debug, Default)]
pub struct DirtyLog(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    /// Writes are logged: a log is attached and the frontend wants it (LOG_ALL).
    on: AtomicBool,
    log: ArcSwapOption<RegionLog>,
}

impl DirtyLog {
    /// Turns logging on (if a log is attached) or off.
    pub(super) fn set_logging(&self, on: bool) {
        let on = on && self.0.log.load().is_some();
        self.0.on.store(on, Ordering::Release);
    }

    /// The bitmap of `region`.
    pub(super) fn of(region: &GuestRegionMmap<DirtyLog>) -> &DirtyLog {
        let mapping: &MmapRegion<DirtyLog> = region;
        mapping.bitmap()
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyLog {
    type S = RefSlice<'a, DirtyLog>;
}

impl Bitmap for DirtyLog {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        if self.0.on.load(Ordering::Acquire) {
            if let Some(log) = &*self.0.log.load() {
                log.mark(offset, len);
            }
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.0
            .log
            .load()
            .as_ref()
            .is_some_and(|l| l.dirty_at(offset))
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> RefSlice<'_, DirtyLog> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for DirtyLog {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

impl BitmapReplace for DirtyLog {
    type InnerBitmap = RegionLog;

    /// A log given by `SET_LOG_BASE` (the frontend is about to migrate, or resized its log):
    /// logging starts at once, before the frontend sets LOG_ALL (an early mark costs the
    /// frontend one page copy, a missed one the guest's data).
    fn replace(&self, log: RegionLog) {
        self.0.log.store(Some(Arc::new(log)));
        self.0.on.store(true, Ordering::Release);
    }
}

/// Marks the guest memory `[addr, addr + len)` dirty in its regions' logs (as far as it is
/// guest memory), if they log. The request path writes through a view without logs
/// (`view.rs`) and marks by hand what it wrote: call it after the write, so a page the
/// frontend copies after it reads the mark has the data.
pub(super) fn mark(owner: &GuestMemoryMmap<DirtyLog>, addr: GuestAddress, len: usize) {
    let Ok(slices) = owner.get_slices(addr, len, Permissions::Write) else {
        return;
    };
    for slice in slices.flatten() {
        slice.bitmap().mark_dirty(0, slice.len());
    }
}

/// Marks the guest buffers `segments` dirty (see [`mark`]).
pub(super) fn mark_buffers(owner: &GuestMemoryMmap<DirtyLog>, segments: &[Segment]) {
    for seg in segments {
        mark(owner, seg.addr, seg.len as usize);
    }
}

/// Marks the whole used ring of `queue` dirty (see [`mark`]): its flags, index, entries and
/// `avail_event`, every field a queue worker writes (`add_used`, notification suppression).
pub(super) fn mark_used_ring(owner: &GuestMemoryMmap<DirtyLog>, queue: &Queue) {
    // flags and idx (2 bytes each), `size` entries of 8 bytes, avail_event (2 bytes).
    let len = 6 + 8 * usize::from(queue.size());
    mark(owner, GuestAddress(queue.used_ring()), len);
}

/// One region's part of the frontend's log.
#[derive(Debug)]
pub struct RegionLog {
    logmem: Arc<MmapLogReg>,
    /// Pages of guest memory before the region (its first bit).
    first_page: usize,
    /// Pages of the region.
    pages: usize,
}

impl RegionLog {
    /// Sets the bits of the pages `[offset, offset + len)` of the region touches.
    fn mark(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset / LOG_PAGE;
        let last = offset.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last.min(self.pages.saturating_sub(1)) {
            let bit = self.first_page + page;
            // Within the log: `new` checked that the region's last page has its bit.
            self.logmem[bit / 8].fetch_or(1 << (bit % 8), Ordering::Relaxed);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let page = offset / LOG_PAGE;
        if page >= self.pages {
            return false;
        }
        let bit = self.first_page + page;
        self.logmem[bit / 8].load(Ordering::Relaxed) & (1 << (bit % 8)) != 0
    }
}

impl MemRegionBitmap for RegionLog {
    fn new<R: GuestMemoryRegion>(region: &R, logmem: Arc<MmapLogReg>) -> io::Result<Self> {
        // The library's own bitmap checks that the log covers the region (the log's length is
        // private to it); every bit `mark` sets is then inside the mapping.
        AtomicBitmapMmap::new(region, logmem.clone())?;
        let start = usize::try_from(region.start_addr().raw_value())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        let len = usize::try_from(region.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        let last_byte = start.saturating_add(len.saturating_sub(1)) / LOG_PAGE / 8;
        contain(&logmem, last_byte)?;
        Ok(RegionLog {
            logmem,
            first_page: start / LOG_PAGE,
            pages: len / LOG_PAGE,
        })
    }
}

impl Drop for RegionLog {
    fn drop(&mut self) {
        // The last region of a log lets go of it: its mapping goes, and so must its
        // registration (a later mapping may get the address range).
        if Arc::strong_count(&self.logmem) == 1 {
            let base = log_base(&self.logmem);
            contained().retain(|c| c.base != base);
        }
    }
}

/// A log mapping registered for SIGBUS containment, up to `end`.
struct Contained {
    base: usize,
    log: Weak<MmapLogReg>,
    end: usize,
    mappings: GuestMappings,
}

/// Every log mapping of the process that is registered for SIGBUS containment.
static CONTAINED: Mutex<Vec<Contained>> = Mutex::new(Vec::new());

fn contained() -> std::sync::MutexGuard<'static, Vec<Contained>> {
    CONTAINED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a log mapping starts (its first byte, which every log has).
fn log_base(logmem: &MmapLogReg) -> usize {
    &logmem[0] as *const AtomicU8 as usize
}

/// Registers the log mapping `logmem` up to its byte `last_byte` (checked to be inside it) for
/// SIGBUS containment. One registration per mapping, grown to the largest region's end: the
/// regions of one log share its bytes, and registrations must not overlap.
fn contain(logmem: &Arc<MmapLogReg>, last_byte: usize) -> io::Result<()> {
    let base = log_base(logmem);
    let end = &logmem[last_byte] as *const AtomicU8 as usize + 1;
    let mut all = contained();
    all.retain(|c| c.log.strong_count() > 0);
    let weak = Arc::downgrade(logmem);
    if let Some(c) = all.iter_mut().find(|c| Weak::ptr_eq(&c.log, &weak)) {
        if end > c.end {
            c.mappings.register(base, end - base)?;
            c.end = end;
        }
        return Ok(());
    }
    let mut mappings = GuestMappings::new();
    if let Err(e) = mappings.register(base, end - base) {
        warn!("cannot register the dirty log for fault containment: {e}");
        return Err(e);
    }
    all.push(Contained {
        base,
        log: weak,
        end,
        mappings,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{DeviceServer, Scheduler, ServeOptions};
    use crate::device::mock::MemDevice;
    use crate::testkit::frontend::{
        memory_file, RawFrontend, AVAIL, DATA, DESC, MEM_SIZE, RING, USED,
    };
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    use std::time::Duration;
    use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
    use vhost::{VhostBackend, VhostUserDirtyLogRegion};
    use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN};
    use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    use vm_memory::{Bytes, GuestAddress};

    /// The pages whose bits are set in `log`.
    fn dirty_pages(log: &std::fs::File) -> Vec<u64> {
        let mut bits = vec![0u8; (MEM_SIZE / 4096 / 8) as usize];
        log.read_exact_at(&mut bits, 0).unwrap();
        (0..MEM_SIZE / 4096)
            .filter(|p| bits[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .collect()
    }

    /// A daemon on a memory device and a frontend connected to it with LOG_ALL (and the
    /// features `features`), its memory declared and its dirty log given (SET_LOG_BASE).
    fn logging_frontend(
        dir: &std::path::Path,
        features: u64,
    ) -> (DeviceServer, RawFrontend, std::fs::File) {
        let socket = dir.join("dev.sock");
        let opts = ServeOptions {
            num_queues: 1,
            queue_size: 256,
            serial: "log".into(),
            logical_block_size: 512,
            read_only: false,
            poll: Duration::ZERO,
        };
        let device = Arc::new(MemDevice::new(1 << 20));
        let sched = Arc::new(Scheduler::default());
        let server = DeviceServer::start("t", &socket, 0o600, device, opts, sched).unwrap();
        let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
        let mut f = RawFrontend::connect_with(
            &socket,
            1,
            VhostUserProtocolFeatures::LOG_SHMFD,
            log_all | features,
        )
        .unwrap();
        f.set_memory().unwrap();
        let log = memory_file(MEM_SIZE / 4096 / 8).unwrap();
        let region = VhostUserDirtyLogRegion {
            mmap_size: MEM_SIZE / 4096 / 8,
            mmap_offset: 0,
            mmap_handle: log.as_raw_fd(),
        };
        f.vu.set_log_base(0, Some(region)).unwrap();
        (server, f, log)
    }

    fn clear(log: &std::fs::File) {
        log.write_all_at(&vec![0u8; (MEM_SIZE / 4096 / 8) as usize], 0)
            .unwrap();
    }

    #[test]
    fn while_logging_every_page_the_backend_writes_is_marked_and_nothing_after() {
        let dir = tempfile::tempdir().unwrap();
        let (_server, mut f, log) = logging_frontend(dir.path(), 0);
        let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
        f.setup_queue(DESC, AVAIL, USED).unwrap();
        // A read of 3 pages of data: the data, the status byte and the used ring are written.
        assert_eq!(f.read(0, 24, Duration::from_secs(5)), Some(0));
        let data = DATA / 4096;
        let status = crate::testkit::frontend::STATUS / 4096;
        assert_eq!(
            dirty_pages(&log),
            vec![USED / 4096, status, data, data + 1, data + 2],
            "the used ring, the status page and the data pages; not the descriptors, the \
             avail ring or the request header, which the backend only reads"
        );
        // GET_ID writes the serial into its buffer.
        clear(&log);
        f.offer(VIRTIO_BLK_T_GET_ID, 0, 1).unwrap();
        f.kick.write(1).unwrap();
        assert!(f.wait_used(Duration::from_secs(5)));
        assert_eq!(f.last_status(), 0);
        assert_eq!(dirty_pages(&log), vec![USED / 4096, status, data]);
        // The migration is cancelled: LOG_ALL cleared, nothing is logged any more.
        let features = f.vu.get_features().unwrap();
        f.vu.set_features(features & !log_all & ((1 << 32) | (1 << 30)))
            .unwrap();
        clear(&log);
        assert_eq!(f.read(0, 24, Duration::from_secs(5)), Some(0));
        assert_eq!(dirty_pages(&log), Vec::<u64>::new());
    }

    #[test]
    fn with_event_idx_the_avail_event_after_the_used_entries_is_marked() {
        let dir = tempfile::tempdir().unwrap();
        let (_server, mut f, log) = logging_frontend(dir.path(), 1 << VIRTIO_RING_F_EVENT_IDX);
        // The used ring ends at a page boundary: its avail_event is the next page's first.
        let used = 0x4000 - 4 - 8 * u64::from(RING);
        f.setup_queue(DESC, AVAIL, used).unwrap();
        f.offer(VIRTIO_BLK_T_IN, 0, 1).unwrap();
        f.kick.write(1).unwrap();
        let start = std::time::Instant::now();
        while f.mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap() != 1 {
            assert!(start.elapsed() < Duration::from_secs(5), "never answered");
            std::thread::sleep(Duration::from_millis(1));
        }
        let avail_event = used + 4 + 8 * u64::from(RING);
        // The worker re-enables notifications (writes avail_event) as it goes idle.
        let start = std::time::Instant::now();
        while f.mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap() != 1 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "avail_event never written"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
        let pages = dirty_pages(&log);
        assert!(
            pages.contains(&(used / 4096)),
            "the used entries' page: {pages:?}"
        );
        assert!(
            pages.contains(&(avail_event / 4096)),
            "the avail_event's page: {pages:?}"
        );
    }
}
