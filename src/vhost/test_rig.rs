//! Test fixtures shared by the tests of the queue, scheduler, request and backend files: a
//! guest memory with one backend over a mock device ([`Rig`]), and a ring pre-filled with
//! requests served by a device that holds them until enough are in flight ([`Gated`]).

use super::backend::{BlkBackend, ServeOptions};
use super::guest::{GuestMem, GuestMemTable, MemView, WorkerMem};
use super::request::InFlight;
use super::sched::{Scheduler, SchedulerConfig};
use super::vring::Vring;
use crate::device::mock::MemDevice;
use crate::device::{BlockDevice, IoCounters};
use crate::virtio_blk::*;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use vhost_user_backend::VringT;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

pub(super) const MEM_SIZE: u64 = 0x40_0000;
pub(super) const HDR: u64 = 0x10_0000;
pub(super) const DATA: u64 = 0x20_0000;
pub(super) const STATUS: u64 = 0x30_0000;

/// One connection's backend over a [`MemDevice`], with its guest memory.
pub(super) struct Rig {
    pub mem: GuestMemTable,
    pub gm: WorkerMem,
    pub device: Arc<MemDevice>,
    pub backend: BlkBackend,
}

pub(super) fn rig(read_only: bool) -> Rig {
    rig_sized(read_only, 64 * 1024)
}

pub(super) fn rig_sized(read_only: bool, device_len: usize) -> Rig {
    let mem = GuestMemTable::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let device = Arc::new(MemDevice::new(device_len));
    let opts = ServeOptions {
        num_queues: 1,
        queue_size: 16,
        serial: "mock-serial".into(),
        logical_block_size: 512,
        read_only,
        poll: std::time::Duration::ZERO,
    };
    let gm = GuestMemoryAtomic::new(MemView::new(mem.clone()).unwrap());
    let sched = Arc::new(Scheduler::default());
    let backend =
        BlkBackend::new(device.clone(), opts, gm.clone(), sched, &Arc::default()).unwrap();
    Rig {
        mem,
        gm,
        device,
        backend,
    }
}

pub(super) fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
    let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

impl Rig {
    pub fn header(&self, t: u32, sector: u64) -> RawDescriptor {
        self.mem
            .write_obj(RequestHeader::new(t, sector), GuestAddress(HDR))
            .unwrap();
        desc(HDR, 16, false)
    }

    /// Runs one chain as a queue worker does; returns (used length, status byte).
    pub fn run(&mut self, descs: &[RawDescriptor]) -> (u32, u8) {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let guard = self.gm.memory();
        let q = MockSplitQueue::new(&*guard, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        let ctx = self.backend.queue_context();
        let mut slot = InFlight::default();
        slot.prepare(&ctx.request, chain, &guard);
        slot.run(&ctx.request, &guard, false);
        let used = slot.used_len();
        (used, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }
}

/// A ring at 0x1000 (descriptors), 0x2000 (avail), 0x3000 (used) of 16 entries.
pub(super) fn ring(r: &Rig) -> (GuestMem, Vring) {
    let gm = GuestMemoryAtomic::new(r.mem.clone());
    let vring = Vring::new(gm.clone(), 16).unwrap();
    vring.set_queue_size(16);
    vring.set_queue_info(0x1000, 0x2000, 0x3000).unwrap();
    vring.set_queue_ready(true);
    (gm, vring)
}

/// Reads and writes that only complete once `want` of them are in flight at the same time
/// (or give up after `give_up`); a flush checks every one popped before it is done.
pub(super) struct GatedDevice {
    pub inner: MemDevice,
    want: usize,
    give_up: Duration,
    writes_wait: bool,
    pub in_flight: Mutex<(usize, usize)>, // (now, done)
    changed: Condvar,
    pub met: AtomicUsize,
    /// Most writes in flight at once.
    pub most: AtomicUsize,
    pub flush_saw_done: AtomicUsize,
}

impl GatedDevice {
    /// Returns once `want` reads or writes are or were in flight at once, or after `give_up`.
    fn gate(&self) {
        let mut g = self.in_flight.lock().unwrap();
        g.0 += 1;
        self.most.fetch_max(g.0, Ordering::Relaxed);
        self.changed.notify_all();
        let (mut g, _) = self
            .changed
            .wait_timeout_while(g, self.give_up, |g| g.0 + g.1 < self.want)
            .unwrap();
        if g.0 + g.1 >= self.want {
            self.met.fetch_add(1, Ordering::Relaxed);
        }
        g.0 -= 1;
        g.1 += 1;
    }
}

impl BlockDevice for GatedDevice {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        self.gate();
        self.inner.read_vectored(bufs, offset)
    }
    fn write_vectored(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        self.gate();
        self.inner.write_vectored(bufs, offset)
    }
    fn flush(&self) -> io::Result<()> {
        let done = self.in_flight.lock().unwrap().1;
        self.flush_saw_done.store(done, Ordering::Relaxed);
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn counters(&self) -> &IoCounters {
        self.inner.counters()
    }
    fn writes_may_wait(&self) -> bool {
        self.writes_wait
    }
}

/// `writes` one-sector writes (each with its own header, data and status), then a flush,
/// on a 16-entry ring, served by a [`GatedDevice`] that waits for `want` writes at once.
pub(super) struct Gated {
    pub mem: GuestMemTable,
    pub device: Arc<GatedDevice>,
    pub backend: Arc<BlkBackend>,
    /// The backend's scheduler.
    pub sched: Arc<Scheduler>,
    pub vring: Vring,
    pub used: u64,
    pub avail: u64,
}

/// The used ring of [`gated_on_ring`]'s queue: apart from the avail ring, which
/// `MockSplitQueue` lays it over (it adds the avail ring's entry count, not its byte size),
/// so that the driver's `used_event` (after the avail ring) survives used entries.
const USED_RING: u64 = 0x8000;

pub(super) fn gated(writes: usize, want: usize, give_up: Duration, writes_wait: bool) -> Gated {
    gated_on_ring(writes, want, give_up, writes_wait, 16, false)
}

/// As [`gated`], on a ring of `ring` entries, with reads instead of writes if `reads`.
pub(super) fn gated_on_ring(
    writes: usize,
    want: usize,
    give_up: Duration,
    writes_wait: bool,
    ring: u16,
    reads: bool,
) -> Gated {
    let sched = SchedulerConfig::default();
    gated_with(sched, writes, want, give_up, writes_wait, ring, reads)
}

/// As [`gated_on_ring`], scheduled by a scheduler with `sched`.
pub(super) fn gated_with(
    sched: SchedulerConfig,
    writes: usize,
    want: usize,
    give_up: Duration,
    writes_wait: bool,
    ring: u16,
    reads: bool,
) -> Gated {
    let mem = GuestMemTable::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let device = Arc::new(GatedDevice {
        inner: MemDevice::new(64 * 1024),
        want,
        give_up,
        writes_wait,
        in_flight: Mutex::new((0, 0)),
        changed: Condvar::new(),
        met: AtomicUsize::new(0),
        most: AtomicUsize::new(0),
        flush_saw_done: AtomicUsize::new(0),
    });
    let opts = ServeOptions {
        num_queues: 1,
        queue_size: ring,
        serial: "mock-serial".into(),
        logical_block_size: 512,
        read_only: false,
        poll: Duration::ZERO,
    };
    let gm = GuestMemoryAtomic::new(MemView::new(mem.clone()).unwrap());
    let sched = Arc::new(Scheduler::new(sched));
    let backend = BlkBackend::new(
        device.clone(),
        opts,
        gm.clone(),
        sched.clone(),
        &Arc::default(),
    )
    .unwrap();
    let q = MockSplitQueue::create(&mem, GuestAddress(0x1000), ring);
    q.add_desc_chains(&chains(&mem, writes, reads), 0).unwrap();
    let vring = Vring::new(GuestMemoryAtomic::new(mem.clone()), ring).unwrap();
    vring.set_queue_size(ring);
    vring
        .set_queue_info(q.desc_table_addr().0, q.avail_addr().0, USED_RING)
        .unwrap();
    vring.set_queue_ready(true);
    let used = USED_RING;
    let avail = q.avail_addr().0;
    Gated {
        avail,
        mem,
        device,
        backend: Arc::new(backend),
        sched,
        vring,
        used,
    }
}

/// The descriptors of `writes` one-sector writes (reads if `reads`) then a flush, each with
/// its header, data and status written in `mem`.
fn chains(mem: &GuestMemTable, writes: usize, reads: bool) -> Vec<RawDescriptor> {
    let mut descs = Vec::new();
    let chain = |descs: &mut Vec<RawDescriptor>, parts: &[RawDescriptor]| {
        let first = descs.len() as u16;
        for (k, d) in parts.iter().enumerate() {
            let d = SplitDescriptor::from(*d);
            let last = k + 1 == parts.len();
            let flags = d.flags() | if last { 0 } else { 1 };
            let next = if last { 0 } else { first + k as u16 + 1 };
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                d.addr().0,
                d.len(),
                flags,
                next,
            )));
        }
    };
    for i in 0..=writes {
        let t = if i < writes && reads {
            VIRTIO_BLK_T_IN
        } else if i < writes {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_FLUSH
        };
        let hdr = HDR + 16 * i as u64;
        mem.write_obj(RequestHeader::new(t, i as u64), GuestAddress(hdr))
            .unwrap();
        mem.write_slice(&[0xc0 + i as u8; 512], GuestAddress(DATA + 512 * i as u64))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS + i as u64))
            .unwrap();
        let status = desc(STATUS + i as u64, 1, true);
        if i < writes {
            let data = desc(DATA + 512 * i as u64, 512, reads);
            chain(&mut descs, &[desc(hdr, 16, false), data, status]);
        } else {
            chain(&mut descs, &[desc(hdr, 16, false), status]);
        }
    }
    descs
}

impl Gated {
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }
    pub fn used_head(&self, i: u64) -> u32 {
        self.mem
            .read_obj(GuestAddress(self.used + 4 + 8 * i))
            .unwrap()
    }
    pub fn status(&self, i: u64) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS + i)).unwrap()
    }
}

/// A non-blocking eventfd installed as the ring's call fd: reading it returns how many
/// signals were sent (an error for none).
pub(super) fn count_signals(g: &Gated) -> vmm_sys_util::eventfd::EventFd {
    let call = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let dup = call.try_clone().unwrap();
    // SAFETY: `into_raw_fd` hands over sole ownership of the duplicate descriptor.
    let file = unsafe {
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(
            dup,
        ))
    };
    g.vring.set_call(Some(file));
    call
}
