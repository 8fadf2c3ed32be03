//! The batching policy: which requests run inline, which run side by side, and on which
//! threads.
//!
//! Requests that take long (a sync behind a snapshot's first write, a read from disk, a large
//! copy) are run concurrently: the worker pops every available chain and runs the batch on a
//! shared I/O pool, so their waits overlap and concurrent syncs share one group commit. Cheap
//! requests (page-cache hits) run inline, one by one, because handing them to another thread
//! costs more than they do; a run of cheap reads is split across two threads when a CPU is
//! spare. The worker measures requests to choose. Either way used entries are added in the
//! order the chains were popped, so after a crash of the daemon the frontend can resubmit
//! exactly the requests past the used index (no inflight tracking needed).
//!
//! A [`Scheduler`] is owned by the daemon and shared by every queue of every device: they all
//! live on the same origin image and cache object, so a stalled file would stall them all with
//! or without a shared pool. Each queue keeps its own [`Batcher`].

use super::guest::GuestMemGuard;
use super::iopool::IoPool;
use super::pressure::CpuPressure;
use super::request::{InFlight, RequestContext};
use super::view::{pop_request, Popped};
use crate::virtio_blk::RequestKind;
use log::warn;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use virtio_queue::{Queue, QueueT};

/// When a run of cheap reads may be split across two threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SplitRule {
    /// When fewer queues are in use than there are CPUs, so the second thread takes no CPU
    /// another queue's worker (or its driver) needs.
    #[default]
    WhenCpuSpare,
    /// Whatever other queues do (tests, which share the machine with each other).
    Always,
}

/// How a queue chooses between running requests inline and running a batch on the I/O pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ModeRule {
    /// By the recent time per request (above [`CONCURRENT_ABOVE`]: on the pool).
    #[default]
    Adaptive,
    /// Inline whatever requests take (tests preempted on a loaded machine, which must see
    /// the same batching whatever their timing).
    AlwaysInline,
}

/// Which engine does the I/O of aligned guest reads and writes, chosen when the daemon starts
/// (`cli/serve.rs`: io_uring for direct I/O when the kernel allows it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// Synchronous positional I/O on the queue's worker thread, slow requests as batches on
    /// the I/O pool: the page cache's default (docs/benchmarks.md).
    #[default]
    Sync,
    /// Each queue submits its reads and writes to its own io_uring and keeps popping while
    /// they are in flight, so the guest's queue depth reaches the device (`uring.rs`,
    /// `pipeline.rs`); what the device must do itself still runs synchronously.
    Uring,
}

impl IoEngine {
    /// Its name in logs and stats.
    pub fn name(self) -> &'static str {
        match self {
            IoEngine::Sync => "sync",
            IoEngine::Uring => "io_uring",
        }
    }
}

/// How requests are scheduled, fixed when the daemon starts.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Threads of the shared I/O pool.
    pub io_threads: usize,
    /// CPUs the daemon may use. Sizes the split pool; at most half of them poll at once; a
    /// split needs fewer queues in use than this.
    pub cpus: usize,
    /// When a run of cheap reads may take a second thread.
    pub split: SplitRule,
    /// How a queue picks between inline and concurrent mode.
    pub mode: ModeRule,
    /// The engine of aligned reads and writes.
    pub engine: IoEngine,
}

/// Threads of the shared I/O pool. They mostly wait on the disk, so there are more of them
/// than CPUs: enough for a full queue's worth of syncs to meet in one group commit.
const IO_THREADS: usize = 32;

impl Default for SchedulerConfig {
    /// The production policy, on the CPUs this process may use.
    fn default() -> Self {
        SchedulerConfig {
            io_threads: IO_THREADS,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            split: SplitRule::default(),
            mode: ModeRule::default(),
            engine: IoEngine::default(),
        }
    }
}

/// A counter on a cache line of its own: `pollers` changes at every drain, and must not
/// evict what every request reads (the configuration, `active_queues`).
#[repr(align(128))]
#[derive(Default)]
struct OwnLine(AtomicUsize);

/// The daemon's scheduling policy and the resources it shares between queues.
pub struct Scheduler {
    config: SchedulerConfig,
    /// Runs concurrent batches, for every queue of every device; built on first use.
    io_pool: OnceLock<Option<IoPool>>,
    /// Takes the second half of split batches; built on first use.
    split_pool: OnceLock<Option<rayon::ThreadPool>>,
    /// Queue workers polling right now.
    pollers: OwnLine,
    /// Whether other tasks wait for a CPU: then no worker serving one request at a time spins
    /// (`pressure.rs`, `poll.rs`).
    pressure: CpuPressure,
    /// Queues in use: those that have served a request since their frontend connected.
    active_queues: AtomicUsize,
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler")
            .field("config", &self.config)
            .field("pollers", &self.pollers.0.load(Ordering::Relaxed))
            .field("active_queues", &self.active_queues.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler::new(SchedulerConfig::default())
    }
}

impl Scheduler {
    /// A scheduler with `config`; its thread pools start when first needed.
    pub fn new(config: SchedulerConfig) -> Self {
        Scheduler {
            config,
            io_pool: OnceLock::new(),
            split_pool: OnceLock::new(),
            pollers: OwnLine::default(),
            pressure: CpuPressure::open(),
            active_queues: AtomicUsize::new(0),
        }
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The pool that runs concurrent batches, shared by every queue of every device.
    pub(super) fn io_pool(&self) -> Option<&IoPool> {
        self.io_pool
            .get_or_init(|| {
                IoPool::new(self.config.io_threads, "io")
                    .map_err(|e| warn!("no io thread pool, its requests run one by one: {e}"))
                    .ok()
            })
            .as_ref()
    }

    /// The threads that take the second half of a split batch of cheap reads: one per CPU,
    /// apart from the I/O pool, so a split never waits behind other queues' slow requests
    /// there (a worker thread is outside the pool and cannot run its own spawned half; it
    /// waits until a pool thread picks it up, which on the I/O pool can be after every queued
    /// slow request).
    fn split_pool(&self) -> Option<&rayon::ThreadPool> {
        self.split_pool
            .get_or_init(|| build_pool(self.config.cpus, "split"))
            .as_ref()
    }

    /// Whether tasks (ours, the VMs' or other processes') wait for the host's CPUs.
    pub(super) fn cpu_contended(&self) -> bool {
        self.pressure.contended()
    }

    /// Permission for one worker to spin, if fewer than half the CPUs do: pollers must never
    /// crowd out the threads (ours or the VMs') that do the real work.
    pub(super) fn poll_permit(&self) -> Option<PollPermit<'_>> {
        let limit = (self.config.cpus / 2).max(1);
        let pollers = &self.pollers.0;
        pollers
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| PollPermit(pollers))
    }

    /// Counts a queue as in use until the returned value is dropped (when its frontend
    /// disconnects).
    pub(super) fn activate(self: &Arc<Self>) -> ActiveQueue {
        self.active_queues.fetch_add(1, Ordering::AcqRel);
        ActiveQueue(self.clone())
    }

    /// Whether a split batch may take a second CPU: when fewer queues are in use than there
    /// are CPUs, it takes none that another queue's worker (or its driver) needs. Measured:
    /// with one queue on 2 CPUs, splitting doubled 4 KiB reads at QD32; with two queues,
    /// letting an idle moment of one queue trigger splits in the other halved them.
    fn cpu_to_spare(&self) -> bool {
        match self.config.split {
            SplitRule::Always => true,
            SplitRule::WhenCpuSpare => {
                self.active_queues.load(Ordering::Relaxed) < self.config.cpus
            }
        }
    }
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

/// Permission for one worker to spin (see [`Scheduler::poll_permit`]); given back on drop.
pub(super) struct PollPermit<'a>(&'a AtomicUsize);

impl Drop for PollPermit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A queue counted as in use (see [`Scheduler::activate`]).
pub(super) struct ActiveQueue(Arc<Scheduler>);

impl Drop for ActiveQueue {
    fn drop(&mut self) {
        self.0.active_queues.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Batches of cheap reads split in two when at least this many are available.
const SPLIT_MIN: usize = 8;
/// At most this many cheap reads are popped for one split batch.
const SPLIT_MAX: usize = 64;

/// Requests averaging longer than this run concurrently: waking a pool thread costs a few
/// microseconds, which pays off only for requests that wait (syncs, disk reads, large copies).
const CONCURRENT_ABOVE: u64 = 30_000;

/// Slots kept across batches (each holds request and iovec vectors sized by the guest).
const KEEP_SLOTS: usize = 64;

/// One queue's batches: the requests in flight and the recent time per request. It keeps one
/// [`InFlight`] (request and iovec vectors) per request of a batch across batches, so the
/// steady state allocates nothing.
pub(super) struct Batcher {
    /// One per request of the current batch; `slots[0]` serves inline requests (never empty).
    slots: Vec<InFlight>,
    /// Recent time per request, nanoseconds (moving average): above [`CONCURRENT_ABOVE`],
    /// batches run on the I/O pool.
    service_ns: u64,
    /// Requests run inline since the last one timed (inline requests are timed 1 in 8).
    untimed: u32,
}

impl Default for Batcher {
    fn default() -> Self {
        Batcher {
            slots: vec![InFlight::default()],
            service_ns: 0,
            untimed: 0,
        }
    }
}

impl Batcher {
    /// Whether the next batch runs in the slow (concurrent) mode.
    pub(super) fn concurrent(&self, sched: &Scheduler) -> bool {
        sched.config.mode == ModeRule::Adaptive && self.service_ns > CONCURRENT_ABOVE
    }

    /// The requests of the batch just run, in the order they were popped.
    pub(super) fn answered(&self, n: usize) -> &[InFlight] {
        &self.slots[..n]
    }

    /// Drops the slots past [`KEEP_SLOTS`] when the queue goes idle: a guest that once filled a
    /// large ring must not keep that much memory pinned in every queue (and a busy queue does
    /// not reallocate them batch after batch). The slots kept let go of any guest memory
    /// table but `current`.
    pub(super) fn trim(&mut self, current: &GuestMemGuard) {
        self.slots.truncate(KEEP_SLOTS);
        self.release_stale_memory(current);
    }

    /// Lets go of every guest memory table but `current` (see [`InFlight::release_stale_memory`]).
    pub(super) fn release_stale_memory(&mut self, current: &GuestMemGuard) {
        for slot in &mut self.slots {
            slot.release_stale_memory(current);
        }
    }

    /// Pops the next request into `slots[0]` and runs it inline; or, in `concurrent` mode and
    /// if it can overlap its wait with others (a read, a flush, a write the device says may
    /// wait on something shareable), pops every other available request too and runs the
    /// batch on the I/O pool, a flush waiting for the requests popped before it. A request
    /// that gains nothing from the pool is thus answered at once, and a stop never waits for a
    /// long serial batch. Returns how many were popped (all answered).
    pub(super) fn run_next(
        &mut self,
        sched: &Scheduler,
        ctx: &RequestContext<'_>,
        queue: &mut Queue,
        mem: &GuestMemGuard,
        concurrent: bool,
    ) -> usize {
        // A request left for a newer memory table counts as none popped: the caller sees the
        // table changed and loads it (`queue.rs`).
        let Popped::Chain(chain) = pop_request(queue, mem) else {
            return 0;
        };
        self.slots[0].prepare(ctx, chain, mem);
        // Writes overlap only where the device says so, or where each is followed by a flush
        // (write-through) that concurrent ones share.
        let pooled = concurrent
            && may_wait(
                &self.slots[0],
                ctx.device.writes_may_wait() || !ctx.writeback(),
            );
        if !concurrent && splittable(&self.slots[0]) && sched.cpu_to_spare() {
            // An unreadable index just means no split: the request popped is run below, and
            // the ring's fault is found on the next pop.
            let available = queue
                .avail_idx(&**mem, Ordering::Acquire)
                .map_or(0, |a| usize::from(a.0.wrapping_sub(queue.next_avail())));
            if available + 1 >= SPLIT_MIN {
                return self.run_split(sched, ctx, queue, mem);
            }
        }
        if !pooled {
            // Cheap requests are timed 1 in 8: timing each would cost a visible share of it.
            self.untimed += 1;
            let timed = concurrent || self.untimed >= 8;
            if timed {
                self.untimed = 0;
            }
            self.slots[0].run(ctx, mem, timed);
            if timed {
                let took = self.slots[0].took();
                self.record(took);
            }
            return 1;
        }
        self.run_pooled(sched, ctx, queue, mem)
    }

    /// Concurrent mode: pops every other available request behind `slots[0]` and runs the
    /// batch on the I/O pool. Returns how many were popped.
    fn run_pooled(
        &mut self,
        sched: &Scheduler,
        ctx: &RequestContext<'_>,
        queue: &mut Queue,
        mem: &GuestMemGuard,
    ) -> usize {
        let mut n = 1;
        while n < usize::from(queue.size()) && self.pop_into(n, ctx, queue, mem) {
            n += 1;
        }
        let mut start = 0;
        while start < n {
            // A group ends before the next flush; a flush is a group of its own.
            let end = if is_flush(&self.slots[start]) {
                start + 1
            } else {
                (start + 1..n)
                    .find(|&i| is_flush(&self.slots[i]))
                    .unwrap_or(n)
            };
            let group = &mut self.slots[start..end];
            match sched.io_pool() {
                Some(pool) if group.len() > 1 => {
                    pool.for_each_mut(group, |slot| slot.run(ctx, mem, true))
                }
                _ => group.iter_mut().for_each(|slot| slot.run(ctx, mem, true)),
            }
            start = end;
        }
        self.record_batch(n);
        n
    }

    /// Cheap reads with a CPU to spare and at least [`SPLIT_MIN`] requests available: pops the
    /// other available requests (up to the first that is not a read) and, if there are enough,
    /// runs the first half of them here while a thread of the split pool runs the other half;
    /// then the one that ended the run (a flush waits for them). `slots[0]` is prepared.
    /// Returns how many were popped.
    fn run_split(
        &mut self,
        sched: &Scheduler,
        ctx: &RequestContext<'_>,
        queue: &mut Queue,
        mem: &GuestMemGuard,
    ) -> usize {
        let mut n = 1;
        let mut tail = false;
        while n < SPLIT_MAX && self.pop_into(n, ctx, queue, mem) {
            n += 1;
            if !splittable(&self.slots[n - 1]) {
                tail = true;
                break;
            }
        }
        let run = n - tail as usize;
        match sched.split_pool() {
            Some(pool) if run >= SPLIT_MIN => {
                let (here, there) = self.slots[..run].split_at_mut(run / 2);
                pool.in_place_scope(|scope| {
                    scope.spawn(|_| there.iter_mut().for_each(|s| s.run(ctx, mem, true)));
                    here.iter_mut().for_each(|s| s.run(ctx, mem, true));
                });
            }
            _ => self.slots[..run]
                .iter_mut()
                .for_each(|s| s.run(ctx, mem, true)),
        }
        if tail {
            self.slots[n - 1].run(ctx, mem, true);
        }
        self.record_batch(n);
        n
    }

    /// Pops the next chain into `slots[n]` (growing `slots` to it) and parses it; false when
    /// the ring has none, or its next request is left for a newer memory table.
    fn pop_into(
        &mut self,
        n: usize,
        ctx: &RequestContext<'_>,
        queue: &mut Queue,
        mem: &GuestMemGuard,
    ) -> bool {
        // A request left for a newer memory table ends the batch: the next batch loads it.
        let Popped::Chain(chain) = pop_request(queue, mem) else {
            return false;
        };
        if n == self.slots.len() {
            self.slots.push(InFlight::default());
        }
        self.slots[n].prepare(ctx, chain, mem);
        true
    }

    /// Records the times of `slots[..n]`, a batch just run.
    fn record_batch(&mut self, n: usize) {
        for i in 0..n {
            let took = self.slots[i].took();
            self.record(took);
        }
    }

    /// Feeds one request's time into the moving average. A sample counts at most 4 times the
    /// threshold, so one request that was merely preempted cannot switch modes: it takes a run
    /// of slow requests.
    fn record(&mut self, took: Duration) {
        let ns = u64::try_from(took.as_nanos())
            .unwrap_or(u64::MAX)
            .min(4 * CONCURRENT_ABOVE);
        self.service_ns = self.service_ns - self.service_ns / 8 + ns / 8;
    }
}

/// Whether running this request beside others can overlap its waits with theirs.
fn may_wait(slot: &InFlight, writes_wait: bool) -> bool {
    match slot.pending() {
        Some(RequestKind::Read { .. } | RequestKind::Flush) => true,
        Some(RequestKind::GetId) | None => false,
        Some(RequestKind::Write { .. } | RequestKind::Discard | RequestKind::WriteZeroes) => {
            writes_wait
        }
    }
}

/// A cheap read that may run beside others of its batch (split mode). Not writes: buffered
/// writes to one file serialize on its inode lock in the kernel, so a second thread only
/// costs CPU (measured: 4 KiB writes at QD32 gained nothing).
fn splittable(slot: &InFlight) -> bool {
    matches!(slot.pending(), Some(RequestKind::Read { .. }))
}

fn is_flush(slot: &InFlight) -> bool {
    matches!(slot.pending(), Some(RequestKind::Flush))
}

#[cfg(test)]
impl Batcher {
    /// A batcher whose requests have recently averaged `service_ns` each.
    pub(super) fn with_service_ns(service_ns: u64) -> Self {
        Batcher {
            service_ns,
            ..Batcher::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::queue::QueueWorker;
    use super::super::test_rig::*;
    use super::*;
    use crate::virtio_blk::*;
    use std::time::Instant;
    use vm_memory::{Bytes, GuestAddress};

    fn always_split() -> SchedulerConfig {
        SchedulerConfig {
            split: SplitRule::Always,
            ..SchedulerConfig::default()
        }
    }

    /// `reads` one-sector reads and a flush on a 64-entry ring, split whenever they can be;
    /// each read waits (up to 5 s) until two are in flight at once.
    fn split_reads(reads: usize) -> Gated {
        gated_with(
            always_split(),
            reads,
            2,
            Duration::from_secs(5),
            false,
            64,
            true,
        )
    }

    #[test]
    fn at_most_half_the_cpus_poll_and_splits_wait_for_a_spare_cpu() {
        let sched = Arc::new(Scheduler::new(SchedulerConfig {
            cpus: 4,
            ..SchedulerConfig::default()
        }));
        let first = sched.poll_permit().expect("a first poller");
        let second = sched.poll_permit().expect("a second poller");
        assert!(
            sched.poll_permit().is_none(),
            "two of four CPUs spin at most"
        );
        drop(first);
        assert!(sched.poll_permit().is_some());
        drop(second);
        let three: Vec<ActiveQueue> = (0..3).map(|_| sched.activate()).collect();
        assert!(sched.cpu_to_spare(), "three queues on four CPUs");
        let fourth = sched.activate();
        assert!(!sched.cpu_to_spare(), "four queues on four CPUs");
        drop(fourth);
        assert!(
            sched.cpu_to_spare(),
            "a queue whose frontend left no longer counts"
        );
        drop(three);
    }

    #[test]
    fn slow_requests_of_a_batch_run_concurrently_and_complete_in_order() {
        const WRITES: usize = 4;
        let g = gated(WRITES, WRITES, Duration::from_secs(5), true);
        let mut w = QueueWorker::with_batcher(Batcher::with_service_ns(10 * CONCURRENT_ABOVE));
        w.process_queue(&g.backend.queue_context(), &g.vring)
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
        let g = split_reads(READS);
        {
            let mut data = g.device.inner.data.lock().unwrap();
            for i in 0..READS {
                data[512 * i..512 * (i + 1)].fill(0x40 + i as u8);
            }
        }
        let mut w = QueueWorker::default();
        w.process_queue(&g.backend.queue_context(), &g.vring)
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

    #[test]
    fn a_split_batch_does_not_wait_behind_slow_requests_on_the_io_pool() {
        const READS: usize = 12;
        let g = split_reads(READS);
        // Every I/O pool thread is stuck (as under other queues' slow syncs) until released.
        let gate = Arc::new((
            std::sync::Mutex::new((0usize, false)),
            std::sync::Condvar::new(),
        ));
        let sched = g.sched.clone();
        // The pool's threads and the thread that hands the batch over (it runs items too).
        let io_threads = g.sched.config().io_threads + 1;
        let blocker = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let pool = sched.io_pool().expect("the I/O pool");
                pool.for_each_mut(&mut vec![(); io_threads], |_| {
                    let (m, cv) = &*gate;
                    let mut g = m.lock().unwrap();
                    g.0 += 1;
                    cv.notify_all();
                    let _ = cv
                        .wait_timeout_while(g, Duration::from_secs(5), |g| !g.1)
                        .unwrap();
                });
            })
        };
        {
            let (m, cv) = &*gate;
            let g = m.lock().unwrap();
            let (g, _) = cv
                .wait_timeout_while(g, Duration::from_secs(5), |g| g.0 < io_threads)
                .unwrap();
            assert_eq!(g.0, io_threads, "all I/O pool threads are blocked");
        }
        let mut w = QueueWorker::default();
        let start = Instant::now();
        w.process_queue(&g.backend.queue_context(), &g.vring)
            .unwrap();
        let took = start.elapsed();
        {
            let (m, cv) = &*gate;
            m.lock().unwrap().1 = true;
            cv.notify_all();
        }
        blocker.join().unwrap();
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
        let g = gated_with(
            always_split(),
            WRITES,
            2,
            Duration::from_millis(20),
            false,
            64,
            false,
        );
        let mut w = QueueWorker::default();
        w.process_queue(&g.backend.queue_context(), &g.vring)
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
        let mut w = QueueWorker::with_batcher(Batcher::with_service_ns(10 * CONCURRENT_ABOVE));
        w.process_queue(&g.backend.queue_context(), &g.vring)
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
}
