//! A queue worker: drains its ring and notifies the driver.
//!
//! The worker pops and runs requests through its [`Batcher`] (see `sched.rs` for how a batch
//! is run), adds their used entries in the order they were popped, and tells the driver about
//! them (EVENT_IDX aware) after each slow batch, every [`SIGNAL_EVERY`] cheap requests and at
//! the end of each drain. After a drain it may watch the ring for a while (adaptive polling)
//! before sleeping until the next kick. A driver that corrupts its ring (an index past the
//! ring, ring addresses outside its memory or at guest address 0) gets its queue stopped,
//! said once, never a spinning or dead worker thread; a guest memory fault (its file shrank,
//! see `sys::guest_faults`) stops the queue and drops the connection.

use super::dirty::mark_used_ring;
use super::guest::{GuestMem, GuestMemGuard, MemView, WorkerMem};
use super::pipeline::Pipeline;
use super::poll::{poll_kind, poll_ring, PollKind};
use super::request::RequestContext;
use super::sched::{ActiveQueue, Batcher, IoEngine, Scheduler};
use super::vring::Vring;
use crate::sys::guest_faults;
use log::warn;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use thiserror::Error;
use vhost_user_backend::{VringState, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemory};

type VringStateGuard<'a> = std::sync::RwLockWriteGuard<'a, VringState<GuestMem>>;

/// What a queue worker needs from its connection and the daemon, borrowed for one
/// `handle_event`.
pub(super) struct QueueContext<'a> {
    pub request: RequestContext<'a>,
    pub sched: &'a Arc<Scheduler>,
    /// Guest memory; its table is loaded again for every batch.
    pub mem: &'a WorkerMem,
    /// The connection is about to be closed: pop no more requests.
    pub quiescing: &'a AtomicBool,
    /// The longest the worker keeps watching its ring after a drain (0: never poll).
    pub max_poll: Duration,
}

impl QueueContext<'_> {
    fn quiescing(&self) -> bool {
        self.quiescing.load(Ordering::SeqCst)
    }
}

/// Per-queue state, kept across kicks.
#[derive(Default)]
pub(super) struct QueueWorker {
    batcher: Batcher,
    /// The driver corrupted the ring: stop serving this queue until it is reset.
    broken: bool,
    /// Current adaptive polling window (grows toward the configured maximum while the
    /// driver's requests arrive soon after we go idle, drops to zero when they do not).
    poll: Duration,
    /// When this worker last went to sleep waiting for a kick.
    idle_since: Option<Instant>,
    /// Set once the queue serves its first request: it counts as in use until dropped.
    active: Option<ActiveQueue>,
    /// The ring layout last found inside guest memory, and the table it was checked in (a
    /// weak reference: the address stays unique while it exists, and pins no memory).
    checked: Option<(RingLayout, Weak<MemView>)>,
    /// The io_uring engine, under [`IoEngine::Uring`] for a device with files to submit to.
    engine: EngineState,
    /// Answers handed out by the pipeline, reused.
    answered: Vec<(u16, u32)>,
}

/// Whether this queue has its io_uring engine.
#[derive(Default)]
enum EngineState {
    #[default]
    Untried,
    Ready(Box<Pipeline>),
    /// Not for this device, or io_uring refused (said once): the synchronous engine.
    Unavailable,
}

/// Where a ring lies: (descriptor table, avail ring, used ring, size).
type RingLayout = (u64, u64, u64, u16);

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
    /// The ring lies (partly) outside guest memory, or at guest address 0.
    #[error(
        "ring outside guest memory: descriptors at {desc:#x}, avail ring at {avail:#x}, \
         used ring at {used:#x}, {size} entries"
    )]
    RingAddress {
        desc: u64,
        avail: u64,
        used: u64,
        size: u16,
    },
    /// Guest memory vanished under a request (its file shrank): the connection is dropped.
    #[error("guest memory fault (the frontend shrank a memory region's file)")]
    MemoryFault,
    /// The queue's io_uring failed (not a completion's error: the ring itself).
    #[error("io_uring: {0}")]
    Engine(#[source] io::Error),
}

/// What [`QueueWorker::serve_available`] did.
struct Drained {
    /// Some request was answered.
    used_any: bool,
    /// Some were answered since the driver was last told (or chose not to be).
    unsignaled: bool,
}

/// Cheap requests answered in one drain are signalled to the driver every this many, and at
/// the end of the drain. Measured on 4 KiB random writes at QD32 (one queue, docs/
/// benchmarks.md): once per drain, the driver got all 32 completions at once and the worker
/// then waited for it to refill the ring; every 16 gave 6% more IOPS, every 32 no gain, every
/// 8 (one run) fell between once per drain and every 16; 4 KiB reads at QD32 were unchanged.
const SIGNAL_EVERY: usize = 16;

/// Smallest polling window worth starting with.
const POLL_START: Duration = Duration::from_micros(4);

impl QueueWorker {
    /// Forgets a broken ring (the driver reset the device).
    pub(super) fn reset(&mut self) {
        self.broken = false;
        self.checked = None;
        // A drain a fault ended may have left requests of the old ring in the pipeline
        // (answered, not yet added to the used ring): they must not reach the new one. Its
        // drop waits for what is in flight; the next drain builds a fresh one. (An engine
        // found unavailable stays so: no warning again at every reset a guest asks for.)
        if matches!(self.engine, EngineState::Ready(_)) {
            self.engine = EngineState::Untried;
        }
    }

    /// Lets go of guest memory tables other than `current` (the frontend changed its memory
    /// table while this queue was idle).
    pub(super) fn release_stale_memory(&mut self, current: &GuestMemGuard) {
        self.batcher.release_stale_memory(current);
        if let EngineState::Ready(p) = &mut self.engine {
            p.release_stale_memory(current);
        }
    }

    /// The queue's io_uring engine, built on first use; `None` for the synchronous engine.
    fn pipeline(&mut self, ctx: &QueueContext<'_>, slots: u16) -> Option<&mut Pipeline> {
        if matches!(self.engine, EngineState::Untried) {
            self.engine = if ctx.sched.config().engine != IoEngine::Uring {
                EngineState::Unavailable
            } else if ctx.request.device.direct_files().is_empty() {
                // Every request needs the device's own code (a snapshot of an origin copied
                // on read): no ring.
                EngineState::Unavailable
            } else {
                match Pipeline::new(ctx.request.device, usize::from(slots)) {
                    Ok(p) => EngineState::Ready(Box::new(p)),
                    Err(e) => {
                        warn!("no io_uring for this queue, requests run synchronously: {e}");
                        EngineState::Unavailable
                    }
                }
            };
        }
        match &mut self.engine {
            EngineState::Ready(p) => Some(p),
            _ => None,
        }
    }

    /// Drains the queue, notifying the driver if it wants it after each slow batch, every
    /// [`SIGNAL_EVERY`] cheap requests and at the end of the drain; then, with a polling
    /// window, keeps notifications suppressed and watches the ring for that long before going
    /// back to sleep, so a driver at low queue depth needs no kick and we no wakeup per
    /// request.
    pub(super) fn process_queue(
        &mut self,
        ctx: &QueueContext<'_>,
        vring: &Vring,
    ) -> io::Result<()> {
        if self.broken {
            // The driver corrupted this ring; it stays dead until the device is reset or the
            // frontend reconnects (a fresh backend). Kicks are drained by the event loop.
            return Ok(());
        }
        self.adapt_poll(ctx.max_poll);
        if self.active.is_none() {
            self.active = Some(ctx.sched.activate());
        }
        let mut state = vring.get_mut();
        if !state.get_queue().ready() {
            // Stopped (GET_VRING_BASE) since the kick: what is left in the ring belongs to
            // whoever starts it next, from the position reported then.
            return Ok(());
        }
        let drained = self.drain(ctx, vring, &mut state);
        if ctx.request.logging.load(Ordering::Relaxed) {
            // The frontend logs our writes (a migration) and the workers' view of guest
            // memory has none (`view.rs`): mark the used ring the drain wrote, before the
            // ring's lock goes, which GET_VRING_BASE waits for before the frontend's last
            // pass over the log.
            mark_used_ring(ctx.mem.memory().owner(), state.get_queue());
        }
        if let Err(fault) = drained {
            // Never let a guest's ring corruption end the worker thread (the queue would
            // die silently) or loop forever: stop serving this queue, say why, once.
            warn!("virtqueue broken by the driver, no longer served until reset: {fault}");
            self.broken = true;
            if matches!(fault, QueueFault::MemoryFault) {
                ctx.request.faults.memory_fault();
            }
        }
        Ok(())
    }

    /// Checks, once per ring layout and memory table, that the ring lies inside guest memory
    /// (virtio-queue would otherwise fail every access, log it and make each drain look like
    /// one with requests it cannot pop).
    fn check_ring(&mut self, queue: &Queue, mem: &GuestMemGuard) -> Result<(), QueueFault> {
        let layout = (
            queue.desc_table(),
            queue.avail_ring(),
            queue.used_ring(),
            queue.size(),
        );
        let table: &MemView = mem;
        if let Some((l, t)) = &self.checked {
            if *l == layout && std::ptr::eq(t.as_ptr(), table) {
                return Ok(());
            }
        }
        // virtio-queue takes an avail ring at 0 for a queue not set up.
        if layout.1 == 0 || !queue.is_valid(table) {
            return Err(QueueFault::RingAddress {
                desc: layout.0,
                avail: layout.1,
                used: layout.2,
                size: layout.3,
            });
        }
        self.checked = Some((layout, Arc::downgrade(&mem.clone().into_inner())));
        Ok(())
    }

    /// Serves the ring until it stays empty (or the connection is closing): drains it, signals
    /// the driver, polls it for the adaptive window, then re-enables notifications and looks
    /// once more before going idle.
    fn drain(
        &mut self,
        ctx: &QueueContext<'_>,
        vring: &Vring,
        state: &mut VringStateGuard<'_>,
    ) -> Result<(), QueueFault> {
        loop {
            {
                let guard = ctx.mem.memory();
                self.check_ring(state.get_queue(), &guard)?;
                state
                    .get_queue_mut()
                    .disable_notification(&*guard)
                    .map_err(QueueFault::Ring)?;
            }
            let popped_from = state.get_queue().next_avail();
            let Drained {
                used_any,
                unsignaled,
            } = self.serve_available(ctx, vring, state)?;
            // One request per drain is a driver at queue depth 1: the only case where a spin
            // on a contended host costs more than it saves (`pressure.rs`); there a worker
            // on io_uring polls by yielding instead.
            let one_at_a_time = state.get_queue().next_avail().wrapping_sub(popped_from) <= 1;
            let guard = ctx.mem.memory();
            let mem = &*guard;
            if unsignaled {
                signal_if_wanted(vring, state, mem)?;
            }
            if guest_faults::take_thread_fault() {
                return Err(QueueFault::MemoryFault);
            }
            if ctx.quiescing() {
                self.batcher.trim(&guard);
                return Ok(());
            }
            if !self.poll.is_zero() && used_any {
                let contended_qd1 = one_at_a_time && ctx.sched.cpu_contended();
                let on_uring = matches!(self.engine, EngineState::Ready(_));
                let queue = state.get_queue_mut();
                let found = match poll_kind(contended_qd1, on_uring) {
                    PollKind::Yield => poll_ring(queue, mem, self.poll, std::thread::yield_now)
                        .map_err(QueueFault::Ring)?,
                    PollKind::Spin => match ctx.sched.poll_permit() {
                        Some(_permit) => poll_ring(queue, mem, self.poll, std::hint::spin_loop)
                            .map_err(QueueFault::Ring)?,
                        None => false,
                    },
                    PollKind::Sleep => false,
                };
                if found {
                    continue;
                }
            }
            // Re-enable notifications and look once more: a request that arrived in between
            // would otherwise wait for the next kick.
            if !state
                .get_queue_mut()
                .enable_notification(mem)
                .map_err(QueueFault::Ring)?
            {
                self.idle_since = Some(Instant::now());
                self.batcher.trim(&guard);
                return Ok(());
            }
            if !used_any {
                // Nothing was popped, yet requests are available: either one arrived just now
                // (go round again) or the driver's avail index is corrupt (virtio-queue logs
                // and hides that error, so going round would spin forever holding the lock).
                check_avail_index(state.get_queue_mut(), mem)?;
            }
        }
    }

    /// Pops and runs requests until the ring is empty or the connection is closing, adding
    /// their used entries in the order popped and signalling the driver (if it wants it) after
    /// each slow batch and every [`SIGNAL_EVERY`] cheap requests.
    fn serve_available(
        &mut self,
        ctx: &QueueContext<'_>,
        vring: &Vring,
        state: &mut VringStateGuard<'_>,
    ) -> Result<Drained, QueueFault> {
        let slots = state.get_queue().max_size();
        if self.pipeline(ctx, slots).is_some() {
            if let EngineState::Ready(p) = &mut self.engine {
                return serve_pipelined(p, &mut self.answered, ctx, vring, state);
            }
        }
        let mut used_any = false;
        // Used entries added since the driver was last told (or chose not to be).
        let mut since_signal = 0usize;
        // Once the connection is closing, leave the rest for the next backend.
        while !ctx.quiescing() {
            // Load the memory table for every batch: the frontend may add a region
            // (ADD_MEM_REG) at any time and point its next request there (and a request made
            // after this load is left for the next one: `view.rs`, `pop_request`).
            let guard = ctx.mem.memory();
            let concurrent = self.batcher.concurrent(ctx.sched);
            let queue = state.get_queue_mut();
            let popped = self
                .batcher
                .run_next(ctx.sched, &ctx.request, queue, &guard, concurrent);
            if popped == 0 {
                if guard.superseded() {
                    continue; // a request was left for the new table (`view.rs`)
                }
                break;
            }
            for slot in self.batcher.answered(popped) {
                queue
                    .add_used(&*guard, slot.head(), slot.used_len())
                    .map_err(QueueFault::Ring)?;
            }
            used_any = true;
            since_signal += popped;
            if concurrent || since_signal >= SIGNAL_EVERY {
                // Report a slow batch at once, and cheap requests every SIGNAL_EVERY, so
                // the driver refills the ring while the next ones run instead of after the
                // whole drain (which at a steady queue depth is all of it).
                since_signal = 0;
                signal_if_wanted(vring, state, &*guard)?;
            }
            if guest_faults::take_thread_fault() {
                return Err(QueueFault::MemoryFault);
            }
        }
        Ok(Drained {
            used_any,
            unsignaled: since_signal > 0,
        })
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
}

/// [`QueueWorker::serve_available`] with the io_uring engine: pops and submits while requests
/// are in flight, adds the answered ones at the front in pop order and signals the driver
/// after each batch of them.
fn serve_pipelined(
    p: &mut Pipeline,
    answered: &mut Vec<(u16, u32)>,
    ctx: &QueueContext<'_>,
    vring: &Vring,
    state: &mut VringStateGuard<'_>,
) -> Result<Drained, QueueFault> {
    // Requests on the I/O pool borrow the context: this returns (or unwinds) only once they
    // are done (`pooled.rs`).
    let _settle = p.settle_guard();
    // A request on the pool may wait for a chunk a read in the ring holds: after a fault (or
    // a panic), the settle must not wait for it before those transfers are done. (Dropped
    // before `_settle`.)
    let mut serving = DrainBeforeSettle { p, ctx, ok: false };
    let served = serve_pipelined_until_empty(serving.p, answered, ctx, vring, state);
    serving.ok = served.is_ok();
    served
}

/// Drains a pipeline's ring when dropped after a fault or during a panic (see
/// [`Pipeline::drain_ring`]).
struct DrainBeforeSettle<'p, 'c> {
    p: &'p mut Pipeline,
    ctx: &'c QueueContext<'c>,
    ok: bool,
}

impl Drop for DrainBeforeSettle<'_, '_> {
    fn drop(&mut self) {
        if self.ok {
            return;
        }
        let guard = self.ctx.mem.memory();
        if let Err(e) = self.p.drain_ring(&self.ctx.request, &guard) {
            warn!("io_uring: waiting for the transfers in flight: {e}");
        }
    }
}

fn serve_pipelined_until_empty(
    p: &mut Pipeline,
    answered: &mut Vec<(u16, u32)>,
    ctx: &QueueContext<'_>,
    vring: &Vring,
    state: &mut VringStateGuard<'_>,
) -> Result<Drained, QueueFault> {
    let mut used_any = false;
    loop {
        let guard = ctx.mem.memory();
        let queue = state.get_queue_mut();
        // Once the connection is closing, pop nothing more: finish what is in flight.
        let (popped, emptied) = if ctx.quiescing() {
            (0, false)
        } else {
            p.fill(ctx.sched, &ctx.request, queue, &guard)
        };
        // A request was left for a newer memory table (`view.rs`): load it, without waiting.
        let table_changed = guard.superseded();
        if popped == 0 && p.is_empty() && !table_changed {
            break;
        }
        // Wait for a completion if there is nothing more to pop: the ring was found empty
        // (one system call submits what was popped and waits, instead of one each; at QD1
        // that is every request), or this found nothing at all (no free slot, a flush).
        let wait = (popped == 0 || emptied) && !table_changed;
        p.progress(&ctx.request, &guard, wait)
            .map_err(QueueFault::Engine)?;
        answered.clear();
        p.answered(answered);
        for &(head, len) in answered.iter() {
            queue
                .add_used(&*guard, head, len)
                .map_err(QueueFault::Ring)?;
        }
        if !answered.is_empty() {
            used_any = true;
            signal_if_wanted(vring, state, &*guard)?;
        }
        if guest_faults::take_thread_fault() {
            return Err(QueueFault::MemoryFault);
        }
    }
    Ok(Drained {
        used_any,
        unsignaled: false,
    })
}

/// Signals the driver for the used entries added so far, if it wants a signal now (EVENT_IDX).
fn signal_if_wanted<M: GuestMemory>(
    vring: &Vring,
    state: &mut VringStateGuard<'_>,
    mem: &M,
) -> Result<(), QueueFault> {
    if state
        .get_queue_mut()
        .needs_notification(mem)
        .map_err(QueueFault::Ring)?
    {
        vring.notify_driver(state);
    }
    Ok(())
}

/// Fails if the driver's avail index claims more requests than the ring holds.
fn check_avail_index<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Result<(), QueueFault> {
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(QueueFault::Ring)?;
    let pending = avail.0.wrapping_sub(queue.next_avail());
    if pending > queue.size() {
        return Err(QueueFault::AvailIndex {
            avail: avail.0,
            pending,
            next_avail: queue.next_avail(),
            size: queue.size(),
        });
    }
    Ok(())
}

#[cfg(test)]
impl QueueWorker {
    /// A worker that batches with `batcher`.
    pub(super) fn with_batcher(batcher: Batcher) -> Self {
        QueueWorker {
            batcher,
            ..QueueWorker::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::sched::{ModeRule, SchedulerConfig};
    use super::super::test_rig::*;
    use super::*;
    use crate::virtio_blk::*;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use vm_memory::{Bytes, GuestAddress};

    fn always_inline() -> SchedulerConfig {
        SchedulerConfig {
            mode: ModeRule::AlwaysInline,
            ..SchedulerConfig::default()
        }
    }

    #[test]
    fn a_long_drain_of_cheap_requests_signals_the_driver_every_few_completions() {
        const WRITES: usize = 40;
        // Cheap writes (nothing to wait for), then a flush: 41 requests in one drain.
        let g = gated_with(
            always_inline(),
            WRITES,
            1,
            Duration::ZERO,
            false,
            128,
            false,
        );
        let call = count_signals(&g);
        let mut w = QueueWorker::default();
        w.process_queue(&g.backend.queue_context(), &g.vring)
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
            let g = gated_with(
                always_inline(),
                WRITES,
                1,
                Duration::ZERO,
                false,
                RING,
                false,
            );
            g.vring.set_queue_event_idx(true);
            // used_event sits right after the avail ring's entries.
            g.mem
                .write_obj(used_event, GuestAddress(g.avail + 4 + 2 * u64::from(RING)))
                .unwrap();
            let call = count_signals(&g);
            let mut w = QueueWorker::default();
            w.process_queue(&g.backend.queue_context(), &g.vring)
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
    fn a_corrupt_avail_index_stops_the_queue_instead_of_spinning() {
        let r = rig(false);
        let (_gm, vring) = ring(&r);
        r.mem.write_obj(17u16, GuestAddress(0x2002)).unwrap(); // avail.idx beyond the ring
        let backend = Arc::new(r.backend);
        let (tx, rx) = std::sync::mpsc::channel();
        let (b, v) = (backend.clone(), vring.clone());
        std::thread::spawn(move || {
            let mut w = QueueWorker::default();
            let first = w.process_queue(&b.queue_context(), &v).is_ok();
            let broken = w.broken;
            let again = w.process_queue(&b.queue_context(), &v).is_ok();
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
        let (_gm, vring) = ring(&r);
        r.mem.write_obj(999u16, GuestAddress(0x2004)).unwrap(); // ring[0]: head out of range
        r.mem.write_obj(1u16, GuestAddress(0x2002)).unwrap();
        let mut w = QueueWorker::default();
        // An error here would end the library's worker thread: the queue would die silently.
        assert!(w.process_queue(&r.backend.queue_context(), &vring).is_ok());
    }

    /// Runs `process_queue` on another thread; fails the test if it does not return within
    /// 5 s (a spin). Returns the worker.
    fn process_within_5s(r: Rig, vring: Vring) -> QueueWorker {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut w = QueueWorker::default();
            let ok = w.process_queue(&r.backend.queue_context(), &vring).is_ok();
            let _ = tx.send((ok, w));
        });
        let (ok, w) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("process_queue must return, not spin");
        assert!(ok, "the worker thread must not end");
        w
    }

    #[test]
    fn a_ring_at_guest_address_0_or_past_memory_stops_the_queue_instead_of_spinning() {
        // (descriptor table, avail ring, used ring) and where the avail index then lies.
        let past_end = MEM_SIZE - 4;
        for (desc, avail, used) in [
            (0x1000, 0, 0x3000),
            (0x1000, past_end, 0x3000),
            (MEM_SIZE - 16, 0x2000, 0x3000),
            (0x1000, 0x2000, MEM_SIZE - 8),
        ] {
            let r = rig(false);
            let (_gm, vring) = ring(&r);
            vring.set_queue_info(desc, avail, used).unwrap();
            // Requests "available" wherever the avail index is readable.
            let _ = r.mem.write_obj(3u16, GuestAddress(avail + 2));
            let w = process_within_5s(r, vring);
            assert!(w.broken, "ring at {desc:#x}/{avail:#x}/{used:#x}");
        }
    }

    /// The rig's ring (`ring`) as a driver fills it: descriptors in the table at 0x1000,
    /// heads in the avail ring at 0x2000.
    struct Driver<'a> {
        mem: &'a super::super::guest::GuestMemTable,
        avail: u16,
    }

    impl Driver<'_> {
        fn desc(&self, table: u64, i: u16, d: (u64, u32, u32, u16)) {
            let (addr, len, flags, next) = d;
            let d = SplitDescriptor::new(addr, len, flags as u16, next);
            self.mem
                .write_obj(d, GuestAddress(table + 16 * u64::from(i)))
                .unwrap();
        }

        fn offer(&mut self, head: u16) {
            let slot = GuestAddress(0x2004 + 2 * u64::from(self.avail % 16));
            self.mem.write_obj(head, slot).unwrap();
            self.avail += 1;
            self.mem
                .write_obj(self.avail, GuestAddress(0x2002))
                .unwrap();
        }
    }

    #[test]
    fn broken_descriptor_chains_get_an_error_status_and_the_queue_keeps_serving() {
        use virtio_bindings::bindings::virtio_ring::{
            VRING_DESC_F_INDIRECT as IND, VRING_DESC_F_NEXT as NEXT, VRING_DESC_F_WRITE as W,
        };
        let r = rig(false);
        let (_gm, vring) = ring(&r);
        let mut d = Driver {
            mem: &r.mem,
            avail: 0,
        };
        // Flushes, whose stray data buffers would be ignored: only the chain can fail them.
        let hdr = |k: u64| {
            r.mem
                .write_obj(
                    RequestHeader::new(VIRTIO_BLK_T_FLUSH, 0),
                    GuestAddress(HDR + 16 * k),
                )
                .unwrap();
            r.mem.write_obj(0xffu8, GuestAddress(STATUS + k)).unwrap();
            (HDR + 16 * k, 16, NEXT, 0)
        };
        let status = |k: u64, next: u16| (STATUS + k, 1, W | NEXT, next);
        let (t1, t2) = (0x38_0000u64, 0x39_0000u64);
        // 0: a loop, header -> status -> header ...
        d.desc(0x1000, 0, (hdr(0).0, 16, NEXT, 1));
        d.desc(0x1000, 1, status(0, 0));
        d.offer(0);
        // 1: an indirect table holding another indirect descriptor.
        d.desc(0x1000, 2, (t1, 48, IND, 0));
        d.desc(t1, 0, (hdr(1).0, 16, NEXT, 1));
        d.desc(t1, 1, status(1, 2));
        d.desc(t1, 2, (t2, 32, IND, 0));
        d.offer(2);
        // 2: an indirect table whose length is not a whole number of descriptors.
        d.desc(0x1000, 3, (hdr(2).0, 16, NEXT, 4));
        d.desc(0x1000, 4, status(2, 5));
        d.desc(0x1000, 5, (t2, 24, IND, 0));
        d.offer(3);
        // 3: an indirect table outside guest memory.
        d.desc(0x1000, 6, (hdr(3).0, 16, NEXT, 7));
        d.desc(0x1000, 7, status(3, 8));
        d.desc(0x1000, 8, (MEM_SIZE + 0x1000, 48, IND, 0));
        d.offer(6);
        // 4: a next index past the ring.
        d.desc(0x1000, 9, (hdr(4).0, 16, NEXT, 10));
        d.desc(0x1000, 10, status(4, 99));
        d.offer(9);
        // 5: a good flush after all of them.
        d.desc(0x1000, 11, (hdr(5).0, 16, NEXT, 12));
        d.desc(0x1000, 12, (STATUS + 5, 1, W, 0));
        d.offer(11);
        let mut w = QueueWorker::default();
        w.process_queue(&r.backend.queue_context(), &vring).unwrap();
        assert!(!w.broken, "a broken chain costs its request, not the queue");
        assert_eq!(r.mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(), 6);
        for k in 0..5 {
            let got = r.mem.read_obj::<u8>(GuestAddress(STATUS + k)).unwrap();
            assert_eq!(got, VIRTIO_BLK_S_IOERR, "broken chain {k}");
        }
        let good = r.mem.read_obj::<u8>(GuestAddress(STATUS + 5)).unwrap();
        assert_eq!(good, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn a_request_into_a_region_added_after_the_worker_loaded_its_table_reads_there() {
        use vhost_user_backend::VhostUserBackend;
        use virtio_bindings::bindings::virtio_ring::{
            VRING_DESC_F_NEXT as NEXT, VRING_DESC_F_WRITE as W,
        };
        use vm_memory::{GuestMemoryAtomic, GuestRegionMmap, MmapRegion};
        const ADDED: u64 = 0x100_0000;
        let r = rig(false);
        let (_gm, vring) = ring(&r);
        let ctx = r.backend.queue_context();
        r.device.data.lock().unwrap()[..512].fill(0x5a);
        // The worker loads its table (then, say, is preempted)...
        let stale = r.gm.memory();
        // ...the frontend adds a region and hears it is done (ADD_MEM_REG, REPLY_ACK)...
        let region = GuestRegionMmap::new(MmapRegion::new(0x1_0000).unwrap(), GuestAddress(ADDED));
        let table = r
            .mem
            .insert_region(std::sync::Arc::new(region.unwrap()))
            .unwrap();
        r.backend
            .update_memory(GuestMemoryAtomic::new(table.clone()))
            .unwrap();
        // ...and makes a read into it available.
        r.mem
            .write_obj(RequestHeader::new(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
            .unwrap();
        r.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut d = Driver {
            mem: &r.mem,
            avail: 0,
        };
        d.desc(0x1000, 0, (HDR, 16, NEXT, 1));
        d.desc(0x1000, 1, (ADDED, 512, W | NEXT, 2));
        d.desc(0x1000, 2, (STATUS, 1, W, 0));
        d.offer(0);
        let mut w = QueueWorker::default();
        {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            let popped = w
                .batcher
                .run_next(ctx.sched, &ctx.request, queue, &stale, false);
            assert_eq!(popped, 0, "not served through the table without the region");
            assert_eq!(queue.next_avail(), 0, "left in the ring");
        }
        w.process_queue(&ctx, &vring).unwrap();
        assert_eq!(r.mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(), 1);
        let status = r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_OK);
        let mut data = [0u8; 512];
        table.read_slice(&mut data, GuestAddress(ADDED)).unwrap();
        assert!(
            data.iter().all(|&b| b == 0x5a),
            "the device's data, in the added region"
        );
    }
}
