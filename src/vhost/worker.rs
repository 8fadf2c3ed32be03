//! A queue worker: pops descriptor chains, parses them, does the I/O, answers with a status.
//!
//! Data moves between the device and guest memory directly: guest buffers become iovecs for
//! preadv/pwritev, with no bounce buffer. The worker keeps one slot (request and iovec
//! vectors) per request of a batch across batches, so the steady state allocates nothing.
//!
//! Requests that take long (a sync behind a snapshot's first write, a read from disk, a large
//! copy) are run concurrently: the worker pops every available chain and runs the batch on a
//! shared I/O pool, so their waits overlap and concurrent syncs share one group commit. Cheap
//! requests (page-cache hits) run inline, one by one, because handing them to another thread
//! costs more than they do. The worker measures requests to choose. Either way used entries
//! are added in the order the chains were popped, so after a crash of the daemon the frontend
//! can resubmit exactly the requests past the used index (no inflight tracking needed).
//!
//! The pool is shared by every queue of every device: they all live on the same origin image
//! and cache object, so a stalled file would stall them all with or without a shared pool.

use super::backend::{BlkBackend, GuestMem};
use crate::device::{BlockDevice, IoCounters};
use crate::virtio_blk::{
    ParseError, Request, RequestKind, StatusAddr, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use log::{debug, warn};
use rayon::prelude::*;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use thiserror::Error;
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemory, Permissions};

type VringStateGuard<'a> = std::sync::RwLockWriteGuard<'a, VringState<GuestMem>>;

/// Per-queue reusable state.
#[derive(Default)]
pub struct QueueWorker {
    /// One per request of the current batch; `slots[0]` serves inline requests.
    slots: Vec<Slot>,
    /// The driver corrupted the ring: stop serving this queue until it is reset.
    broken: bool,
    /// Current adaptive polling window (grows toward the configured maximum while the
    /// driver's requests arrive soon after we go idle, drops to zero when they do not).
    poll: Duration,
    /// When this worker last went to sleep waiting for a kick.
    idle_since: Option<Instant>,
    /// Recent time per request, nanoseconds (moving average): above [`CONCURRENT_ABOVE`],
    /// batches run on the I/O pool.
    service_ns: u64,
    /// Requests run inline since the last one timed (inline requests are timed 1 in 8).
    untimed: u32,
    /// Set once the queue serves its first request: it counts as in use until dropped.
    active: Option<ActiveQueue>,
    /// Tests: split batches of cheap requests whatever other workers do.
    #[cfg(test)]
    always_split: bool,
    /// Tests: stay in the cheap (inline) mode whatever requests take, so that a test
    /// preempted on a loaded machine sees the same batching.
    #[cfg(test)]
    always_cheap: bool,
}

/// One request in flight: its parsed form, its guest buffers and its answer.
#[derive(Default)]
struct Slot {
    head: u16,
    /// Parsed and not yet run.
    ready: bool,
    request: Request,
    iovecs: Vec<libc::iovec>,
    /// The second half of a request split for parallel I/O.
    right: Vec<libc::iovec>,
    /// Bytes written into guest memory (data and status), once done.
    used_len: u32,
    /// How long running it took.
    took: Duration,
}

// SAFETY: a slot's iovecs point into guest memory. They are filled and used only while the
// worker holds the memory guard of the batch (in `drain`), by the worker's thread or by pool
// threads inside a call that waits for them; each slot is used by one thread at a time.
// Between batches they hold stale pointers that are never dereferenced.
unsafe impl Send for Slot {}

/// Why a queue could not be served.
#[derive(Debug, Error)]
enum QueueFault {
    /// The ring in guest memory is corrupt (bad index or address): the driver's fault.
    #[error("bad ring: {0}")]
    Ring(#[source] virtio_queue::Error),
    /// The driver's avail index claims more requests than the ring holds.
    #[error(
        "avail index {avail} is {pending} entries past next_avail {next_avail} on a ring of {size}"
    )]
    AvailIndex {
        avail: u16,
        pending: u16,
        next_avail: u16,
        size: u16,
    },
    /// Signalling the driver failed (the call eventfd): a host-side problem.
    #[error("cannot signal the driver: {0}")]
    Notify(#[source] io::Error),
}

/// Queue workers polling right now, across the daemon.
static POLLERS: AtomicUsize = AtomicUsize::new(0);

/// Permission for one worker to spin. At most half the CPUs may spin at once, so pollers
/// never crowd out the threads (ours or the VMs') that do the real work.
struct PollSlot;

impl PollSlot {
    fn take() -> Option<PollSlot> {
        let limit = (cpus() / 2).max(1);
        POLLERS
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| PollSlot)
    }
}

impl Drop for PollSlot {
    fn drop(&mut self) {
        POLLERS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Queues in use across the daemon: those that have served a request since their frontend
/// connected.
static ACTIVE_QUEUES: AtomicUsize = AtomicUsize::new(0);

/// Counts a queue as in use while its worker lives (until its frontend disconnects).
struct ActiveQueue;

impl ActiveQueue {
    fn new() -> Self {
        ACTIVE_QUEUES.fetch_add(1, Ordering::AcqRel);
        ActiveQueue
    }
}

impl Drop for ActiveQueue {
    fn drop(&mut self) {
        ACTIVE_QUEUES.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Batches of cheap reads split in two when at least this many are available.
const SPLIT_MIN: usize = 8;
/// At most this many cheap reads are popped for one split batch.
const SPLIT_MAX: usize = 64;

/// Cheap requests answered in one drain are signalled to the driver every this many, and at
/// the end of the drain. Measured on 4 KiB random writes at QD32 (one queue, docs/
/// benchmarks.md): once per drain, the driver got all 32 completions at once and the worker
/// then waited for it to refill the ring; every 16 gave 6% more IOPS, every 32 no gain, every
/// 8 (one run) fell between once per drain and every 16; 4 KiB reads at QD32 were unchanged.
const SIGNAL_EVERY: usize = 16;

/// Smallest polling window worth starting with.
const POLL_START: Duration = Duration::from_micros(4);

/// Requests averaging longer than this run concurrently: waking a pool thread costs a few
/// microseconds, which pays off only for requests that wait (syncs, disk reads, large copies).
const CONCURRENT_ABOVE: u64 = 30_000;

/// Slots kept across batches (each holds request and iovec vectors sized by the guest).
const KEEP_SLOTS: usize = 64;

/// Threads of the shared I/O pool. They mostly wait on the disk, so there are more of them
/// than CPUs: enough for a full queue's worth of syncs to meet in one group commit.
const IO_THREADS: usize = 32;

/// The threads that take the second half of a split batch of cheap reads: one per CPU, apart
/// from the I/O pool, so a split never waits behind other queues' slow requests there (a
/// worker thread is outside the pool and cannot run its own spawned half; it waits until a
/// pool thread picks it up, which on the I/O pool can be after every queued slow request).
fn split_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| build_pool(cpus(), "split")).as_ref()
}

/// The pool that runs concurrent batches, shared by every queue of every device.
fn io_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| build_pool(IO_THREADS, "io")).as_ref()
}

/// A pool of `threads` named `snapblk-NAME-i`; without one, its requests run one by one.
fn build_pool(threads: usize, name: &'static str) -> Option<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("snapblk-{name}-{i}"))
        .build()
        .map_err(|e| warn!("no {name} thread pool, its requests run one by one: {e}"))
        .ok()
}

/// CPUs this process may use (read once).
fn cpus() -> usize {
    static CPUS: OnceLock<usize> = OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

impl QueueWorker {
    /// Forgets a broken ring (the driver reset the device).
    pub fn reset(&mut self) {
        self.broken = false;
    }

    /// Drains the queue, notifying the driver if it wants it after each slow batch, every
    /// [`SIGNAL_EVERY`] cheap requests and at the end of the drain; then, with
    /// `poll` non-zero, keeps notifications suppressed and watches the ring for that long
    /// before going back to sleep, so a driver at low queue depth needs no kick and we no
    /// wakeup per request.
    pub fn process_queue(
        &mut self,
        backend: &BlkBackend,
        vring: &VringRwLock<GuestMem>,
        max_poll: Duration,
        guest_mem: &GuestMem,
    ) -> io::Result<()> {
        if self.broken {
            // The driver corrupted this ring; it stays dead until the device is reset or the
            // frontend reconnects (a fresh backend). Kicks are drained by the event loop.
            return Ok(());
        }
        self.adapt_poll(max_poll);
        let poll = self.poll;
        if self.active.is_none() {
            self.active = Some(ActiveQueue::new());
        }
        let mut state = vring.get_mut();
        match self.drain(backend, &mut state, poll, guest_mem) {
            Ok(()) => Ok(()),
            Err(QueueFault::Notify(e)) => Err(e),
            Err(fault) => {
                // Never let a guest's ring corruption end the worker thread (the queue would
                // die silently) or loop forever: stop serving this queue, say why, once.
                warn!("virtqueue broken by the driver, no longer served until reset: {fault}");
                self.broken = true;
                Ok(())
            }
        }
    }

    fn drain(
        &mut self,
        backend: &BlkBackend,
        state: &mut VringStateGuard<'_>,
        poll: Duration,
        guest_mem: &GuestMem,
    ) -> Result<(), QueueFault> {
        let ring = QueueFault::Ring;
        if self.slots.is_empty() {
            self.slots.push(Slot::default());
        }
        loop {
            let mut used_any = false;
            // Used entries added since the driver was last told (or chose not to be).
            let mut since_signal = 0usize;
            {
                let guard = guest_mem.memory();
                state
                    .get_queue_mut()
                    .disable_notification(&*guard)
                    .map_err(ring)?;
            }
            loop {
                if backend.quiescing() {
                    // The connection is closing: leave the rest for the next backend.
                    break;
                }
                // Load the memory table for every batch: the frontend may add a region
                // (ADD_MEM_REG) at any time and point its next request there.
                let guard = guest_mem.memory();
                let mem = &*guard;
                let concurrent = self.service_ns > CONCURRENT_ABOVE;
                let popped = self.run_next(backend, state, mem, concurrent)?;
                if popped == 0 {
                    break;
                }
                for slot in &self.slots[..popped] {
                    state
                        .get_queue_mut()
                        .add_used(mem, slot.head, slot.used_len)
                        .map_err(ring)?;
                }
                used_any = true;
                since_signal += popped;
                if concurrent || since_signal >= SIGNAL_EVERY {
                    // Report a slow batch at once, and cheap requests every SIGNAL_EVERY, so
                    // the driver refills the ring while the next ones run instead of after the
                    // whole drain (which at a steady queue depth is all of it).
                    since_signal = 0;
                    if state
                        .get_queue_mut()
                        .needs_notification(mem)
                        .map_err(ring)?
                    {
                        state.signal_used_queue().map_err(QueueFault::Notify)?;
                    }
                }
            }
            let guard = guest_mem.memory();
            let mem = &*guard;
            if since_signal > 0
                && state
                    .get_queue_mut()
                    .needs_notification(mem)
                    .map_err(ring)?
            {
                state.signal_used_queue().map_err(QueueFault::Notify)?;
            }
            if backend.quiescing() {
                self.trim_slots();
                return Ok(());
            }
            if !poll.is_zero() && used_any {
                if let Some(_slot) = PollSlot::take() {
                    if Self::poll_ring(state, mem, poll).map_err(ring)? {
                        continue;
                    }
                }
            }
            // Re-enable notifications and look once more: a request that arrived in between
            // would otherwise wait for the next kick.
            if !state
                .get_queue_mut()
                .enable_notification(mem)
                .map_err(ring)?
            {
                self.idle_since = Some(Instant::now());
                self.trim_slots();
                return Ok(());
            }
            if !used_any {
                // Nothing was popped, yet requests are available: either one arrived just now
                // (go round again) or the driver's avail index is corrupt (virtio-queue logs
                // and hides that error, so going round would spin forever holding the lock).
                let queue = state.get_queue_mut();
                let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(ring)?;
                let pending = avail.0.wrapping_sub(queue.next_avail());
                if pending > queue.size() {
                    return Err(QueueFault::AvailIndex {
                        avail: avail.0,
                        pending,
                        next_avail: queue.next_avail(),
                        size: queue.size(),
                    });
                }
            }
        }
    }

    /// Pops the next request into `slots[0]` and runs it inline; or, in `concurrent` mode and
    /// if it can overlap its wait with others (a read, a flush, a write the device says may
    /// wait on something shareable), pops every other available request too and runs the
    /// batch on the I/O pool, a flush waiting for the requests popped before it. A request
    /// that gains nothing from the pool is thus answered at once, and a stop never waits for a
    /// long serial batch. Returns how many were popped.
    fn run_next<M>(
        &mut self,
        backend: &BlkBackend,
        state: &mut VringStateGuard<'_>,
        mem: &M,
        concurrent: bool,
    ) -> Result<usize, QueueFault>
    where
        M: GuestMemory + Sync,
    {
        let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem) else {
            return Ok(0);
        };
        self.slots[0].prepare(backend, chain, mem);
        // Writes overlap only where the device says so, or where each is followed by a flush
        // (write-through) that concurrent ones share.
        let pooled = concurrent
            && self.slots[0].may_wait(backend.device().writes_may_wait() || !backend.writeback());
        if !concurrent && self.slots[0].splittable() && self.cpu_to_spare() {
            let queue = state.get_queue_mut();
            // An unreadable index just means no split: the request popped is run below, and
            // the ring's fault is found on the next pop.
            let available = queue
                .avail_idx(mem, Ordering::Acquire)
                .map_or(0, |a| usize::from(a.0.wrapping_sub(queue.next_avail())));
            if available + 1 >= SPLIT_MIN {
                return Ok(self.run_split(state, backend, mem));
            }
        }
        if !pooled {
            // Cheap requests are timed 1 in 8: timing each would cost a visible share of it.
            self.untimed += 1;
            let timed = concurrent || self.untimed >= 8;
            if timed {
                self.untimed = 0;
            }
            self.slots[0].run(backend, mem, timed);
            if timed {
                let took = self.slots[0].took;
                self.record(took);
            }
            return Ok(1);
        }
        let mut n = 1;
        while n < usize::from(state.get_queue().size()) && self.pop_into(n, state, backend, mem) {
            n += 1;
        }
        let mut start = 0;
        while start < n {
            // A group ends before the next flush; a flush is a group of its own.
            let end = if self.slots[start].is_flush() {
                start + 1
            } else {
                (start + 1..n)
                    .find(|&i| self.slots[i].is_flush())
                    .unwrap_or(n)
            };
            let group = &mut self.slots[start..end];
            match io_pool() {
                Some(pool) if group.len() > 1 => pool.install(|| {
                    group
                        .par_iter_mut()
                        .with_max_len(1)
                        .for_each(|slot| slot.run(backend, mem, true))
                }),
                _ => group
                    .iter_mut()
                    .for_each(|slot| slot.run(backend, mem, true)),
            }
            start = end;
        }
        self.record_batch(n);
        Ok(n)
    }

    /// Cheap reads with a CPU to spare and at least [`SPLIT_MIN`] requests available: pops the
    /// other available requests (up to the first that is not a read) and, if there are enough,
    /// runs the first half of them here while a thread of the split pool runs the other half;
    /// then the one that ended the run (a flush waits for them). `slots[0]` is prepared. Returns how many were popped.
    fn run_split<M>(
        &mut self,
        state: &mut VringStateGuard<'_>,
        backend: &BlkBackend,
        mem: &M,
    ) -> usize
    where
        M: GuestMemory + Sync,
    {
        let mut n = 1;
        let mut tail = false;
        while n < SPLIT_MAX && self.pop_into(n, state, backend, mem) {
            n += 1;
            if !self.slots[n - 1].splittable() {
                tail = true;
                break;
            }
        }
        let run = n - tail as usize;
        match split_pool() {
            Some(pool) if run >= SPLIT_MIN => {
                let (here, there) = self.slots[..run].split_at_mut(run / 2);
                pool.in_place_scope(|scope| {
                    scope.spawn(|_| there.iter_mut().for_each(|s| s.run(backend, mem, true)));
                    here.iter_mut().for_each(|s| s.run(backend, mem, true));
                });
            }
            _ => self.slots[..run]
                .iter_mut()
                .for_each(|s| s.run(backend, mem, true)),
        }
        if tail {
            self.slots[n - 1].run(backend, mem, true);
        }
        self.record_batch(n);
        n
    }

    /// Pops the next chain into `slots[n]` (growing `slots` to it) and parses it; false when
    /// the ring has none.
    fn pop_into<M: GuestMemory>(
        &mut self,
        n: usize,
        state: &mut VringStateGuard<'_>,
        backend: &BlkBackend,
        mem: &M,
    ) -> bool {
        let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem) else {
            return false;
        };
        if n == self.slots.len() {
            self.slots.push(Slot::default());
        }
        self.slots[n].prepare(backend, chain, mem);
        true
    }

    /// Whether a split batch may take a second CPU: when fewer queues are in use than there
    /// are CPUs, it takes none that another queue's worker (or its driver) needs. Measured:
    /// with one queue on 2 CPUs, splitting doubled 4 KiB reads at QD32; with two queues,
    /// letting an idle moment of one queue trigger splits in the other halved them.
    fn cpu_to_spare(&self) -> bool {
        #[cfg(test)]
        if self.always_split {
            return true;
        }
        ACTIVE_QUEUES.load(Ordering::Relaxed) < cpus()
    }

    /// Drops the slots past [`KEEP_SLOTS`] when the queue goes idle: a guest that once filled a
    /// large ring must not keep that much memory pinned in every queue (and a busy queue does
    /// not reallocate them batch after batch).
    fn trim_slots(&mut self) {
        self.slots.truncate(KEEP_SLOTS);
    }

    /// Records the times of `slots[..n]`, a batch just run.
    fn record_batch(&mut self, n: usize) {
        for i in 0..n {
            let took = self.slots[i].took;
            self.record(took);
        }
    }

    /// Feeds one request's time into the moving average. A sample counts at most 4 times the
    /// threshold, so one request that was merely preempted cannot switch modes: it takes a run
    /// of slow requests.
    fn record(&mut self, took: Duration) {
        #[cfg(test)]
        if self.always_cheap {
            return;
        }
        let ns = u64::try_from(took.as_nanos())
            .unwrap_or(u64::MAX)
            .min(4 * CONCURRENT_ABOVE);
        self.service_ns = self.service_ns - self.service_ns / 8 + ns / 8;
    }

    /// Sizes the polling window from how long the last sleep lasted (as QEMU's adaptive
    /// polling does): a sleep shorter than the maximum window means polling would have caught
    /// the next request without a kick, so poll longer; a longer sleep means polling burns CPU
    /// for nothing (and, on a busy host, steals it from the driver), so stop.
    fn adapt_poll(&mut self, max_poll: Duration) {
        let Some(since) = self.idle_since.take() else {
            return;
        };
        let slept = since.elapsed();
        if max_poll.is_zero() || slept > max_poll {
            self.poll = Duration::ZERO;
        } else if self.poll < slept {
            self.poll = (self.poll * 2).max(POLL_START).min(max_poll);
        }
    }

    /// Spins for at most `budget` until the driver makes a request available.
    fn poll_ring<M: GuestMemory>(
        state: &mut VringStateGuard<'_>,
        mem: &M,
        budget: Duration,
    ) -> Result<bool, virtio_queue::Error> {
        let start = Instant::now();
        let queue = state.get_queue_mut();
        loop {
            let avail = queue.avail_idx(mem, Ordering::Acquire)?;
            if avail.0 != queue.next_avail() {
                return Ok(true);
            }
            if start.elapsed() >= budget {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }
}

impl Slot {
    /// Parses a chain. A request that cannot be parsed is answered here (its status written,
    /// its used length set) and not run.
    fn prepare<M: GuestMemory>(
        &mut self,
        backend: &BlkBackend,
        chain: virtio_queue::DescriptorChain<&M>,
        mem: &M,
    ) {
        self.head = chain.head_index();
        self.took = Duration::ZERO;
        match self.request.parse(chain, mem, backend.limits()) {
            Ok(()) => {
                self.ready = true;
                self.used_len = 0;
            }
            Err(e) => {
                self.ready = false;
                IoCounters::add(&backend.device().counters().errors, 1);
                self.used_len =
                    if matches!(e, ParseError::NoStatus | ParseError::BadStatusDescriptor) {
                        warn!("dropping request with no usable status descriptor: {e}");
                        0
                    } else {
                        debug!("refusing request: {e}");
                        write_status(mem, self.request.status, e.status())
                    };
            }
        }
    }

    /// Whether running this request beside others can overlap its waits with theirs.
    fn may_wait(&self, writes_wait: bool) -> bool {
        self.ready
            && match self.request.kind {
                RequestKind::Read { .. } | RequestKind::Flush => true,
                RequestKind::GetId => false,
                RequestKind::Write { .. } | RequestKind::Discard | RequestKind::WriteZeroes => {
                    writes_wait
                }
            }
    }

    /// A cheap read that may run beside others of its batch (split mode). Not writes: buffered
    /// writes to one file serialize on its inode lock in the kernel, so a second thread only
    /// costs CPU (measured: 4 KiB writes at QD32 gained nothing).
    fn splittable(&self) -> bool {
        self.ready && matches!(self.request.kind, RequestKind::Read { .. })
    }

    fn is_flush(&self) -> bool {
        self.ready && matches!(self.request.kind, RequestKind::Flush)
    }

    /// Runs a prepared request and writes its status; with `timed`, records how long it took.
    fn run<M: GuestMemory>(&mut self, backend: &BlkBackend, mem: &M, timed: bool) {
        if !self.ready {
            return;
        }
        self.ready = false;
        let start = timed.then(Instant::now);
        let device = backend.device();
        let (status, data_written) = match self.execute(backend, device, mem) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(e) => {
                IoCounters::add(&device.counters().errors, 1);
                warn!("I/O error on {:?}: {e}", self.request.kind);
                (VIRTIO_BLK_S_IOERR, 0)
            }
        };
        self.used_len = data_written.saturating_add(write_status(mem, self.request.status, status));
        if let Some(start) = start {
            self.took = start.elapsed();
        }
    }

    /// Does the I/O of a parsed request; returns the bytes written into guest memory.
    fn execute<M: GuestMemory>(
        &mut self,
        backend: &BlkBackend,
        device: &dyn BlockDevice,
        mem: &M,
    ) -> io::Result<u32> {
        let req = &self.request;
        let c = device.counters();
        match req.kind {
            RequestKind::Read { offset } => {
                guest_iovecs(&mut self.iovecs, req, mem, Permissions::Write)?;
                if split_in_two(req.data_len) {
                    let right_off = split_iovecs(&mut self.iovecs, &mut self.right, req.data_len);
                    // SAFETY: see `io_slices_mut`.
                    let (left, right) = unsafe {
                        (
                            io_slices_mut(&mut self.iovecs),
                            io_slices_mut(&mut self.right),
                        )
                    };
                    let (a, b) = rayon::join(
                        || device.read_vectored(left, offset),
                        || device.read_vectored(right, offset + right_off),
                    );
                    a.and(b)?;
                } else {
                    // SAFETY: see `io_slices_mut`.
                    device.read_vectored(unsafe { io_slices_mut(&mut self.iovecs) }, offset)?;
                }
                IoCounters::add(&c.reads, 1);
                IoCounters::add(&c.read_bytes, req.data_len);
                // data_len <= seg_max * size_max fits in u32 for our limits.
                Ok(u32::try_from(req.data_len).unwrap_or(u32::MAX))
            }
            RequestKind::Write { offset } => {
                guest_iovecs(&mut self.iovecs, req, mem, Permissions::Read)?;
                if split_in_two(req.data_len) {
                    let right_off = split_iovecs(&mut self.iovecs, &mut self.right, req.data_len);
                    // SAFETY: see `io_slices`.
                    let (left, right) =
                        unsafe { (io_slices(&self.iovecs), io_slices(&self.right)) };
                    let (a, b) = rayon::join(
                        || device.write_vectored(left, offset),
                        || device.write_vectored(right, offset + right_off),
                    );
                    a.and(b)?;
                } else {
                    // SAFETY: see `io_slices`.
                    device.write_vectored(unsafe { io_slices(&self.iovecs) }, offset)?;
                }
                if !backend.writeback() {
                    device.flush()?;
                }
                IoCounters::add(&c.writes, 1);
                IoCounters::add(&c.write_bytes, req.data_len);
                Ok(0)
            }
            RequestKind::Flush => {
                device.flush()?;
                IoCounters::add(&c.flushes, 1);
                Ok(0)
            }
            RequestKind::GetId => {
                let id = backend.id();
                let mut done = 0usize;
                for seg in &req.segments {
                    if done == id.len() {
                        break;
                    }
                    let n = (seg.len as usize).min(id.len() - done);
                    mem.write_slice(&id[done..done + n], seg.addr)
                        .map_err(io::Error::other)?;
                    done += n;
                }
                Ok(done as u32)
            }
            RequestKind::Discard => {
                for r in &req.ranges {
                    device.discard(r.offset, r.len)?;
                }
                if !backend.writeback() {
                    device.flush()?;
                }
                IoCounters::add(&c.discards, 1);
                Ok(0)
            }
            RequestKind::WriteZeroes => {
                for r in &req.ranges {
                    device.write_zeroes(r.offset, r.len, r.unmap)?;
                }
                if !backend.writeback() {
                    device.flush()?;
                }
                IoCounters::add(&c.write_zeroes, 1);
                Ok(0)
            }
        }
    }
}

/// Requests at least this large are split in two halves done in parallel: one large copy per
/// queue at a time would leave the other cores idle (measured in docs/benchmarks.md).
const PARALLEL_MIN: u64 = 256 * 1024;

/// Whether to split a request of `len` bytes: only when it runs inline. On the I/O pool the
/// batch is already parallel, and a pool thread waiting for its other half would run other
/// queues' stolen requests meanwhile, tying this batch's latency to theirs.
fn split_in_two(len: u64) -> bool {
    len >= PARALLEL_MIN && rayon::current_thread_index().is_none()
}

/// Translates the request's guest buffers into host iovecs, following region boundaries.
fn guest_iovecs<M: GuestMemory>(
    iovecs: &mut Vec<libc::iovec>,
    req: &Request,
    mem: &M,
    access: Permissions,
) -> io::Result<()> {
    iovecs.clear();
    for seg in &req.segments {
        let slices = mem
            .get_slices(seg.addr, seg.len as usize, access)
            .map_err(io::Error::other)?;
        for slice in slices {
            let slice = slice.map_err(io::Error::other)?;
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr() as *mut libc::c_void,
                iov_len: slice.len(),
            });
        }
    }
    Ok(())
}

/// Splits `left` (holding `total` bytes) at the sector boundary nearest its middle, moving the
/// second half into `right` (a buffer straddling the cut is cut in two). Returns the byte
/// offset at which `right` starts.
fn split_iovecs(left: &mut Vec<libc::iovec>, right: &mut Vec<libc::iovec>, total: u64) -> u64 {
    let half = (total / 2) & !(crate::virtio_blk::SECTOR_SIZE - 1);
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
/// ensure every iovec points into guest memory that stays mapped while the slices live (the
/// request's memory guard is held; `get_slices` checked the bounds).
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

/// Writes the status byte; returns 1 if it was written, 0 if the address was bad.
fn write_status<M: GuestMemory>(mem: &M, at: StatusAddr, status: u8) -> u32 {
    match mem.write_obj(status, at.addr) {
        Ok(()) => 1,
        Err(e) => {
            warn!("cannot write status at {:#x}: {e}", at.addr.0);
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::mock::MemDevice;
    use crate::vhost::ServeOptions;
    use crate::virtio_blk::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use vhost_user_backend::VhostUserBackend;
    use vhost_user_backend::VringT;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::epoll::EventSet;

    const MEM_SIZE: u64 = 0x40_0000;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    struct Rig {
        mem: GuestMemoryMmap,
        device: Arc<MemDevice>,
        backend: BlkBackend,
    }

    fn rig(read_only: bool) -> Rig {
        rig_sized(read_only, 64 * 1024)
    }

    fn rig_sized(read_only: bool, device_len: usize) -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let device = Arc::new(MemDevice::new(device_len));
        let opts = ServeOptions {
            num_queues: 1,
            queue_size: 16,
            serial: "mock-serial".into(),
            logical_block_size: 512,
            read_only,
            poll: std::time::Duration::ZERO,
        };
        let gm = GuestMemoryAtomic::new(mem.clone());
        let backend = BlkBackend::new(device.clone(), opts, gm).unwrap();
        Rig {
            mem,
            device,
            backend,
        }
    }

    fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    impl Rig {
        fn header(&self, t: u32, sector: u64) -> RawDescriptor {
            self.mem
                .write_obj(RequestHeader::new(t, sector), GuestAddress(HDR))
                .unwrap();
            desc(HDR, 16, false)
        }

        /// Runs one chain through the worker; returns (used length, status byte).
        fn run(&mut self, descs: &[RawDescriptor]) -> (u32, u8) {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let q = MockSplitQueue::new(&self.mem, 16);
            let chain = q.build_desc_chain(descs).unwrap();
            let mut slot = Slot::default();
            slot.prepare(&self.backend, chain, &self.mem);
            slot.run(&self.backend, &self.mem, false);
            let used = slot.used_len;
            (used, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
        }
    }

    #[test]
    fn read_write_flush_get_id() {
        let mut r = rig(false);
        let st = desc(STATUS, 1, true);
        // Read two sectors split over two buffers.
        let h = r.header(VIRTIO_BLK_T_IN, 2);
        assert_eq!(
            r.run(&[h, desc(DATA, 512, true), desc(DATA + 4096, 512, true), st]),
            (1025, VIRTIO_BLK_S_OK)
        );
        assert_eq!(r.mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 2);
        assert_eq!(r.mem.read_obj::<u8>(GuestAddress(DATA + 4096)).unwrap(), 3);
        // Write one sector and see it in the device.
        r.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        let h = r.header(VIRTIO_BLK_T_OUT, 10);
        assert_eq!(
            r.run(&[h, desc(DATA, 512, false), st]),
            (1, VIRTIO_BLK_S_OK)
        );
        assert!(r.device.data.lock().unwrap()[5120..5632]
            .iter()
            .all(|&b| b == 0xab));
        let h = r.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(r.run(&[h, st]), (1, VIRTIO_BLK_S_OK));
        assert_eq!(r.device.flushes.load(Ordering::Relaxed), 1);
        let h = r.header(VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(r.run(&[h, desc(DATA, 20, true), st]), (21, VIRTIO_BLK_S_OK));
        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..12], b"mock-serial\0");
    }

    #[test]
    fn writethrough_flushes_every_write() {
        let mut r = rig(false);
        r.backend
            .set_config(ConfigSpace::WRITEBACK as u32, &[0])
            .unwrap();
        let h = r.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            r.run(&[h, desc(DATA, 512, false), desc(STATUS, 1, true)]),
            (1, VIRTIO_BLK_S_OK)
        );
        assert_eq!(r.device.flushes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn malformed_requests_get_an_error_status() {
        let mut r = rig(false);
        let st = desc(STATUS, 1, true);
        // (request type, sector, descriptors after the header, expected (used length, status))
        let cases = [
            // Unknown type.
            (77, 0, vec![st], (1, VIRTIO_BLK_S_UNSUPP)),
            // Past the end, and overflowing.
            (
                VIRTIO_BLK_T_IN,
                127,
                vec![desc(DATA, 1024, true), st],
                (1, VIRTIO_BLK_S_IOERR),
            ),
            (
                VIRTIO_BLK_T_OUT,
                u64::MAX - 1,
                vec![desc(DATA, 1024, false), st],
                (1, VIRTIO_BLK_S_IOERR),
            ),
            // Wrong direction: a read into a device-readable buffer.
            (
                VIRTIO_BLK_T_IN,
                0,
                vec![desc(DATA, 512, false), st],
                (1, VIRTIO_BLK_S_IOERR),
            ),
            // Data buffer outside guest memory.
            (
                VIRTIO_BLK_T_IN,
                0,
                vec![desc(MEM_SIZE - 256, 512, true), st],
                (1, VIRTIO_BLK_S_IOERR),
            ),
            // Misaligned length.
            (
                VIRTIO_BLK_T_OUT,
                0,
                vec![desc(DATA, 100, false), st],
                (1, VIRTIO_BLK_S_IOERR),
            ),
            // Discard with a truncated range.
            (
                VIRTIO_BLK_T_DISCARD,
                0,
                vec![desc(DATA, 12, false), st],
                (1, VIRTIO_BLK_S_IOERR),
            ),
        ];
        for (t, sector, rest, want) in cases {
            let mut descs = vec![r.header(t, sector)];
            descs.extend(rest);
            assert_eq!(r.run(&descs), want, "type {t} sector {sector}: {descs:?}");
        }
        // A short header.
        assert_eq!(r.run(&[desc(HDR, 8, false), st]), (1, VIRTIO_BLK_S_IOERR));
        // Nowhere to put a status: the chain is consumed with nothing written, no panic.
        let h = r.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            r.run(&[h, desc(DATA, 512, true), desc(STATUS, 1, false)]).0,
            0
        );
        let h = r.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(r.run(&[h, desc(MEM_SIZE + 4096, 1, true)]).0, 0);
        // The device is untouched by all of it.
        assert_eq!(r.device.data.lock().unwrap()[0], 0);
    }

    #[test]
    fn read_only_and_io_errors() {
        let mut r = rig(true);
        let st = desc(STATUS, 1, true);
        let h = r.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            r.run(&[h, desc(DATA, 512, false), st]),
            (1, VIRTIO_BLK_S_IOERR)
        );
        let h = r.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            r.run(&[h, desc(DATA, 512, true), st]),
            (513, VIRTIO_BLK_S_OK)
        );
        r.device.fail.store(true, Ordering::Relaxed);
        let h = r.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            r.run(&[h, desc(DATA, 512, true), st]),
            (1, VIRTIO_BLK_S_IOERR)
        );
        let h = r.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(r.run(&[h, st]), (1, VIRTIO_BLK_S_IOERR));
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

    #[test]
    fn large_requests_split_in_parallel_land_in_place() {
        let mut r = rig_sized(false, 2 << 20);
        let len = 1usize << 20;
        assert!(len as u64 >= PARALLEL_MIN);
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        r.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        let st = desc(STATUS, 1, true);
        // Three buffers of uneven sizes, so the cut falls inside one.
        let parts = [
            (0u64, 300 * 1024u32),
            (300 * 1024, 400 * 1024),
            (700 * 1024, 324 * 1024),
        ];
        let h = r.header(VIRTIO_BLK_T_OUT, 8);
        let mut descs = vec![h];
        descs.extend(parts.iter().map(|&(o, n)| desc(DATA + o, n, false)));
        descs.push(st);
        assert_eq!(r.run(&descs), (1, VIRTIO_BLK_S_OK));
        assert_eq!(&r.device.data.lock().unwrap()[4096..4096 + len], &data[..]);

        r.mem
            .write_slice(&vec![0u8; len], GuestAddress(DATA))
            .unwrap();
        let h = r.header(VIRTIO_BLK_T_IN, 8);
        let mut descs = vec![h];
        descs.extend(parts.iter().map(|&(o, n)| desc(DATA + o, n, true)));
        descs.push(st);
        assert_eq!(r.run(&descs), (len as u32 + 1, VIRTIO_BLK_S_OK));
        let mut back = vec![0u8; len];
        r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn indirect_descriptor_tables_are_followed() {
        let mut r = rig(false);
        let table = 0x38_0000u64;
        let h = r.header(VIRTIO_BLK_T_IN, 4);
        let inner = [h, desc(DATA, 512, true), desc(STATUS, 1, true)];
        for (i, d) in inner.iter().enumerate() {
            let d = SplitDescriptor::from(*d);
            let next_flag = if i + 1 < inner.len() { 1u16 } else { 0 };
            let d =
                SplitDescriptor::new(d.addr().0, d.len(), d.flags() | next_flag, (i + 1) as u16);
            r.mem
                .write_obj(d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let outer = RawDescriptor::from(SplitDescriptor::new(
            table,
            48,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        assert_eq!(r.run(&[outer]), (513, VIRTIO_BLK_S_OK));
        assert_eq!(r.mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 4);
    }

    /// Reads and writes that only complete once `want` of them are in flight at the same time
    /// (or give up after `give_up`); a flush checks every one popped before it is done.
    struct GatedDevice {
        inner: MemDevice,
        want: usize,
        give_up: Duration,
        writes_wait: bool,
        in_flight: std::sync::Mutex<(usize, usize)>, // (now, done)
        changed: std::sync::Condvar,
        met: std::sync::atomic::AtomicUsize,
        /// Most writes in flight at once.
        most: std::sync::atomic::AtomicUsize,
        flush_saw_done: std::sync::atomic::AtomicUsize,
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
    struct Gated {
        mem: GuestMemoryMmap,
        device: Arc<GatedDevice>,
        backend: Arc<BlkBackend>,
        gm: GuestMem,
        vring: VringRwLock<GuestMem>,
        used: u64,
        avail: u64,
    }

    /// The used ring of [`gated_on_ring`]'s queue: apart from the avail ring, which
    /// `MockSplitQueue` lays it over (it adds the avail ring's entry count, not its byte size),
    /// so that the driver's `used_event` (after the avail ring) survives used entries.
    const USED_RING: u64 = 0x8000;

    fn gated(writes: usize, want: usize, give_up: Duration, writes_wait: bool) -> Gated {
        gated_on_ring(writes, want, give_up, writes_wait, 16, false)
    }

    /// As [`gated`], on a ring of `ring` entries, with reads instead of writes if `reads`.
    fn gated_on_ring(
        writes: usize,
        want: usize,
        give_up: Duration,
        writes_wait: bool,
        ring: u16,
        reads: bool,
    ) -> Gated {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let device = Arc::new(GatedDevice {
            inner: MemDevice::new(64 * 1024),
            want,
            give_up,
            writes_wait,
            in_flight: std::sync::Mutex::new((0, 0)),
            changed: std::sync::Condvar::new(),
            met: std::sync::atomic::AtomicUsize::new(0),
            most: std::sync::atomic::AtomicUsize::new(0),
            flush_saw_done: std::sync::atomic::AtomicUsize::new(0),
        });
        let opts = ServeOptions {
            num_queues: 1,
            queue_size: ring,
            serial: "mock-serial".into(),
            logical_block_size: 512,
            read_only: false,
            poll: Duration::ZERO,
        };
        let gm = GuestMemoryAtomic::new(mem.clone());
        let backend = Arc::new(BlkBackend::new(device.clone(), opts, gm.clone()).unwrap());
        let q = MockSplitQueue::create(&mem, GuestAddress(0x1000), ring);
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
        q.add_desc_chains(&descs, 0).unwrap();
        let vring = VringRwLock::new(gm.clone(), ring).unwrap();
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
            backend,
            gm,
            vring,
            used,
        }
    }

    impl Gated {
        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
        }
        fn used_head(&self, i: u64) -> u32 {
            self.mem
                .read_obj(GuestAddress(self.used + 4 + 8 * i))
                .unwrap()
        }
        fn status(&self, i: u64) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS + i)).unwrap()
        }
    }

    #[test]
    fn slow_requests_of_a_batch_run_concurrently_and_complete_in_order() {
        const WRITES: usize = 4;
        let g = gated(WRITES, WRITES, Duration::from_secs(5), true);
        let mut w = QueueWorker {
            service_ns: 10 * CONCURRENT_ABOVE,
            ..QueueWorker::default()
        };
        w.process_queue(&g.backend, &g.vring, Duration::ZERO, &g.gm)
            .unwrap();

        assert_eq!(
            g.device.met.load(Ordering::Relaxed),
            WRITES,
            "all {WRITES} writes of the batch were in flight at once"
        );
        assert_eq!(g.device.flush_saw_done.load(Ordering::Relaxed), WRITES);
        assert_eq!(g.used_idx(), WRITES as u16 + 1);
        let heads: Vec<u32> = (0..=WRITES as u64).map(|i| g.used_head(i)).collect();
        assert_eq!(heads, vec![0, 3, 6, 9, 12], "used in the order popped");
        for i in 0..=WRITES as u64 {
            assert_eq!(g.status(i), VIRTIO_BLK_S_OK);
        }
        let data = g.device.inner.data.lock().unwrap();
        for i in 0..WRITES {
            assert!(data[512 * i..512 * (i + 1)]
                .iter()
                .all(|&b| b == 0xc0 + i as u8));
        }
    }

    #[test]
    fn a_batch_of_cheap_reads_runs_on_two_threads_and_completes_in_order() {
        const READS: usize = 12;
        // Each read waits (up to 5 s) until two are in flight at once.
        let g = gated_on_ring(READS, 2, Duration::from_secs(5), false, 64, true);
        {
            let mut data = g.device.inner.data.lock().unwrap();
            for i in 0..READS {
                data[512 * i..512 * (i + 1)].fill(0x40 + i as u8);
            }
        }
        let mut w = QueueWorker {
            always_split: true,
            ..QueueWorker::default()
        };
        w.process_queue(&g.backend, &g.vring, Duration::ZERO, &g.gm)
            .unwrap();
        assert_eq!(
            g.device.most.load(Ordering::Relaxed),
            2,
            "the batch ran on two threads, no more"
        );
        assert_eq!(g.device.met.load(Ordering::Relaxed), READS);
        assert_eq!(
            g.device.flush_saw_done.load(Ordering::Relaxed),
            READS,
            "the flush ran after every read popped before it"
        );
        assert_eq!(g.used_idx(), READS as u16 + 1);
        let heads: Vec<u32> = (0..=READS as u64).map(|i| g.used_head(i)).collect();
        let popped: Vec<u32> = (0..=READS as u32).map(|i| 3 * i).collect();
        assert_eq!(heads, popped, "used in the order popped");
        for i in 0..=READS as u64 {
            assert_eq!(g.status(i), VIRTIO_BLK_S_OK);
        }
        for i in 0..READS {
            let mut got = [0u8; 512];
            g.mem
                .read_slice(&mut got, GuestAddress(DATA + 512 * i as u64))
                .unwrap();
            assert!(got.iter().all(|&b| b == 0x40 + i as u8), "read {i}");
        }
    }

    /// A non-blocking eventfd installed as the ring's call fd: reading it returns how many
    /// signals were sent (an error for none).
    fn count_signals(g: &Gated) -> vmm_sys_util::eventfd::EventFd {
        let call = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dup = call.try_clone().unwrap();
        // SAFETY: `into_raw_fd` hands over sole ownership of the duplicate descriptor.
        let file = unsafe {
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(
                std::os::fd::IntoRawFd::into_raw_fd(dup),
            )
        };
        g.vring.set_call(Some(file));
        call
    }

    #[test]
    fn a_long_drain_of_cheap_requests_signals_the_driver_every_few_completions() {
        const WRITES: usize = 40;
        // Cheap writes (nothing to wait for), then a flush: 41 requests in one drain.
        let g = gated_on_ring(WRITES, 1, Duration::ZERO, false, 128, false);
        let call = count_signals(&g);
        let mut w = QueueWorker {
            always_cheap: true,
            ..QueueWorker::default()
        };
        w.process_queue(&g.backend, &g.vring, Duration::ZERO, &g.gm)
            .unwrap();
        assert_eq!(g.used_idx(), WRITES as u16 + 1);
        for i in 0..=WRITES as u64 {
            assert_eq!(g.status(i), VIRTIO_BLK_S_OK);
        }
        // After the 16th and the 32nd, then the last 9 at the end of the drain.
        assert_eq!(call.read().expect("no signal at all"), 3, "signals sent");
    }

    #[test]
    fn with_event_idx_the_driver_gets_exactly_the_signal_it_asks_for() {
        const WRITES: usize = 40;
        const RING: u16 = 128;
        // The driver asks to be signalled once the used index passes `used_event`: anywhere
        // in the drain (around the mid-drain checks too) that is one signal, past its end none.
        for (used_event, signals) in [
            (0u16, 1u64),
            (5, 1),
            (14, 1),
            (15, 1),
            (16, 1),
            (20, 1),
            (31, 1),
            (32, 1),
            (35, 1),
            (40, 1),
            (41, 0),
            (200, 0),
        ] {
            let g = gated_on_ring(WRITES, 1, Duration::ZERO, false, RING, false);
            g.vring.set_queue_event_idx(true);
            // used_event sits right after the avail ring's entries.
            g.mem
                .write_obj(used_event, GuestAddress(g.avail + 4 + 2 * u64::from(RING)))
                .unwrap();
            let call = count_signals(&g);
            let mut w = QueueWorker {
                always_cheap: true,
                ..QueueWorker::default()
            };
            w.process_queue(&g.backend, &g.vring, Duration::ZERO, &g.gm)
                .unwrap();
            assert_eq!(g.used_idx(), WRITES as u16 + 1);
            assert_eq!(
                call.read().unwrap_or(0),
                signals,
                "signals with used_event {used_event}"
            );
        }
    }

    #[test]
    fn a_split_batch_does_not_wait_behind_slow_requests_on_the_io_pool() {
        // Every I/O pool thread is stuck (as under other queues' slow syncs) until released.
        let gate = Arc::new((
            std::sync::Mutex::new((0usize, false)),
            std::sync::Condvar::new(),
        ));
        let pool = io_pool().expect("the I/O pool");
        for _ in 0..IO_THREADS {
            let gate = gate.clone();
            pool.spawn(move || {
                let (m, cv) = &*gate;
                let mut g = m.lock().unwrap();
                g.0 += 1;
                cv.notify_all();
                let _ = cv
                    .wait_timeout_while(g, Duration::from_secs(5), |g| !g.1)
                    .unwrap();
            });
        }
        {
            let (m, cv) = &*gate;
            let g = m.lock().unwrap();
            let (g, _) = cv
                .wait_timeout_while(g, Duration::from_secs(5), |g| g.0 < IO_THREADS)
                .unwrap();
            assert_eq!(g.0, IO_THREADS, "all I/O pool threads are blocked");
        }
        const READS: usize = 12;
        let g = gated_on_ring(READS, 2, Duration::from_secs(5), false, 64, true);
        let mut w = QueueWorker {
            always_split: true,
            ..QueueWorker::default()
        };
        let start = Instant::now();
        w.process_queue(&g.backend, &g.vring, Duration::ZERO, &g.gm)
            .unwrap();
        let took = start.elapsed();
        {
            let (m, cv) = &*gate;
            m.lock().unwrap().1 = true;
            cv.notify_all();
        }
        assert_eq!(
            g.device.most.load(Ordering::Relaxed),
            2,
            "still on two threads"
        );
        assert_eq!(g.used_idx(), READS as u16 + 1);
        assert!(took < Duration::from_secs(2), "the split waited {took:?}");
    }

    #[test]
    fn cheap_writes_are_not_split() {
        // Buffered writes to one file serialize in the kernel: a second thread would only
        // cost CPU. Each write gives up waiting for company after 20 ms.
        const WRITES: usize = 12;
        let g = gated_on_ring(WRITES, 2, Duration::from_millis(20), false, 64, false);
        let mut w = QueueWorker {
            always_split: true,
            ..QueueWorker::default()
        };
        w.process_queue(&g.backend, &g.vring, Duration::ZERO, &g.gm)
            .unwrap();
        assert_eq!(g.device.most.load(Ordering::Relaxed), 1);
        assert_eq!(g.used_idx(), WRITES as u16 + 1);
    }

    #[test]
    fn slow_writes_that_cannot_share_a_wait_run_one_by_one() {
        // Writes to a device whose writes wait on nothing shareable (a plain file): running
        // them side by side would only cost CPU. Each write gives up waiting for company.
        const WRITES: usize = 3;
        let g = gated(WRITES, 2, Duration::from_millis(50), false);
        // Take the flush out of the ring: only the writes are available.
        g.mem
            .write_obj(WRITES as u16, GuestAddress(0x1000 + 16 * 16 + 2))
            .unwrap();
        let mut w = QueueWorker {
            service_ns: 10 * CONCURRENT_ABOVE,
            ..QueueWorker::default()
        };
        w.process_queue(&g.backend, &g.vring, Duration::ZERO, &g.gm)
            .unwrap();
        assert_eq!(g.used_idx(), WRITES as u16);
        assert_eq!(
            g.device.most.load(Ordering::Relaxed),
            1,
            "no two writes were in flight at once"
        );
        for i in 0..WRITES as u64 {
            assert_eq!(g.status(i), VIRTIO_BLK_S_OK);
        }
    }

    #[test]
    fn quiesce_waits_for_popped_requests_and_then_nothing_more_is_popped() {
        // Two writes that never meet a third: each is held for 1 s.
        let g = gated(2, 3, Duration::from_secs(1), true);
        let (backend, vring) = (g.backend.clone(), g.vring.clone());
        let worker = std::thread::spawn(move || {
            // Through the library's entry point, which counts the worker busy.
            backend.handle_event(0, EventSet::IN, &[vring], 0)
        });
        while g.device.in_flight.lock().unwrap().0 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            !g.backend.quiesce(Duration::from_millis(100)),
            "a write is still running"
        );
        assert!(g.backend.quiesce(Duration::from_secs(5)));
        worker.join().unwrap().unwrap();
        // What was popped is answered; the flush behind the first write was never popped, so
        // the next backend finds it in the ring past the used index.
        assert_eq!(
            g.used_idx(),
            1,
            "only the first request was popped (inline mode)"
        );
        assert_eq!(g.status(0), VIRTIO_BLK_S_OK);
        assert_eq!(
            g.status(1),
            0xff,
            "the second write was left for the next backend"
        );
        // A kick after quiescing pops nothing.
        g.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&g.vring), 0)
            .unwrap();
        assert_eq!(g.used_idx(), 1);
    }

    /// A ring at 0x1000 (descriptors), 0x2000 (avail), 0x3000 (used) of 16 entries.
    fn ring(r: &Rig) -> (GuestMem, VringRwLock<GuestMem>) {
        let gm = GuestMemoryAtomic::new(r.mem.clone());
        let vring = VringRwLock::new(gm.clone(), 16).unwrap();
        vring.set_queue_size(16);
        vring.set_queue_info(0x1000, 0x2000, 0x3000).unwrap();
        vring.set_queue_ready(true);
        (gm, vring)
    }

    #[test]
    fn a_corrupt_avail_index_stops_the_queue_instead_of_spinning() {
        let r = rig(false);
        let (gm, vring) = ring(&r);
        r.mem.write_obj(17u16, GuestAddress(0x2002)).unwrap(); // avail.idx beyond the ring
        let backend = Arc::new(r.backend);
        let (tx, rx) = std::sync::mpsc::channel();
        let (b, v, g) = (backend.clone(), vring.clone(), gm.clone());
        std::thread::spawn(move || {
            let mut w = QueueWorker::default();
            let first = w.process_queue(&b, &v, Duration::ZERO, &g).is_ok();
            let broken = w.broken;
            let again = w.process_queue(&b, &v, Duration::ZERO, &g).is_ok();
            let _ = tx.send((first, broken, again));
        });
        let (first, broken, again) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("process_queue must return, not spin");
        assert!(
            first && broken && again,
            "queue marked broken, worker thread kept alive"
        );
    }

    #[test]
    fn a_bad_head_index_does_not_end_the_worker_thread() {
        let r = rig(false);
        let (gm, vring) = ring(&r);
        r.mem.write_obj(999u16, GuestAddress(0x2004)).unwrap(); // ring[0]: head out of range
        r.mem.write_obj(1u16, GuestAddress(0x2002)).unwrap();
        let mut w = QueueWorker::default();
        // An error here would end the library's worker thread: the queue would die silently.
        assert!(w
            .process_queue(&r.backend, &vring, Duration::ZERO, &gm)
            .is_ok());
    }

    #[test]
    fn features_are_the_spec_bits_for_the_device() {
        let mask = |bits: &[u32]| bits.iter().fold(0u64, |m, b| m | 1 << b);
        // VERSION_1, EVENT_IDX, INDIRECT_DESC, SIZE_MAX, SEG_MAX, BLK_SIZE, TOPOLOGY, FLUSH,
        // CONFIG_WCE, MQ and vhost-user's PROTOCOL_FEATURES (bit 30); then DISCARD and
        // WRITE_ZEROES, or RO.
        let common = [32, 29, 28, 1, 2, 6, 10, 9, 11, 12, 30];
        assert_eq!(
            rig(false).backend.features(),
            mask(&common) | mask(&[13, 14])
        );
        assert_eq!(rig(true).backend.features(), mask(&common) | mask(&[5]));
    }

    #[test]
    fn config_reads_are_the_size_asked_and_only_writeback_is_writable() {
        let r = rig(false);
        let full = r.backend.get_config(0, 96);
        assert_eq!(full.len(), 96);
        assert_eq!(u64::from_le_bytes(full[..8].try_into().unwrap()), 128);
        assert_eq!(full[ConfigSpace::WRITEBACK], 1);
        // Bytes past the struct read as zero, and the answer is exactly the size asked.
        let tail = r.backend.get_config(90, 16);
        assert_eq!(tail.len(), 16);
        assert_eq!(tail[..6], full[90..]);
        assert!(tail[6..].iter().all(|&b| b == 0));
        assert_eq!(r.backend.get_config(200, 4), vec![0; 4]);
        let wce = ConfigSpace::WRITEBACK as u32;
        r.backend.set_config(wce, &[0]).unwrap();
        assert_eq!(r.backend.get_config(wce, 1), vec![0]);
        assert!(r.backend.set_config(0, &[1]).is_err());
        assert!(r.backend.set_config(wce, &[1, 1]).is_err());
        assert_eq!(r.backend.get_config(wce, 1), vec![0]);
    }
}
