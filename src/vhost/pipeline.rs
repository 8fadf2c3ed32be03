//! The io_uring engine of one queue (direct I/O): requests stay in flight while the worker
//! goes on popping, so a guest's queue depth reaches the device.
//!
//! A popped read or write whose buffers meet the device's alignment and which the device
//! lets the queue do itself ([`BlockDevice::direct_target`](crate::device::BlockDevice::direct_target):
//! origin reads; origin writes when no snapshot needs them preserved; a snapshot's reads
//! whose chunks lie end to end in one file, those chunks held until the transfer is over; a
//! raw image) is queued in the queue's [`Ring`] at once, and reaches the kernel with the next
//! few (`uring.rs`, `SUBMIT_EVERY`) or when the worker waits. Everything else runs through the
//! device as before: inline, or several on the daemon's I/O pool. A flush waits until every
//! request popped before it is done, and nothing is popped after it until it is. Completions
//! arrive in any order; answers go to the used ring in the order the requests were popped
//! (the reconnect rule, `queue.rs`): [`Pipeline::answered`] gives only the answered ones at
//! the front.

use super::guest::GuestMemGuard;
use super::pooled::{PoolRuns, Settle};
use super::request::{InFlight, RequestContext, Start};
use super::sched::Scheduler;
use super::uring::{Op, Ring};
use super::view::{pop_request, Popped};
use crate::cow::TransferHold;
use crate::device::{BlockDevice, IoCounters};
use crate::virtio_blk::RequestKind;
use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use virtio_queue::Queue;

/// Where a slot's request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Free,
    /// Popped, to run through the device.
    Run,
    /// Running through the device on the I/O pool (`pooled.rs`): not to be touched.
    Pooled,
    /// Its transfer is in the ring.
    InRing,
    /// A flush, waiting for the requests popped before it.
    Flush,
    /// Answered; its used entry not yet added.
    Answered,
}

/// A transfer in flight: what is left of it, and what it holds until it completes.
#[derive(Default)]
struct Transfer {
    op: Option<Op>,
    left: u64,
    /// Dropped when the transfer is over (it only needs to live until then).
    hold: Option<TransferHold>,
}

/// Times [`Pipeline::drain_ring`] tries to wait for the ring (10 ms apart) before it gives up.
const DRAIN_TRIES: u32 = 100;

/// One queue's io_uring engine.
pub(super) struct Pipeline {
    ring: Ring<InFlight>,
    stage: Vec<Stage>,
    transfers: Vec<Transfer>,
    /// Slots in the order their requests were popped, until their used entries are added.
    order: VecDeque<usize>,
    free: Vec<usize>,
    /// A flush was popped: pop nothing more until it is answered.
    flush_pending: bool,
    /// Completions taken from the ring, reused (no allocation per batch).
    reaped: Vec<(usize, i32)>,
    /// The most transfers in the ring at once, as last raised in the device's counters
    /// (`stats`: the queue depth reaching the device).
    peak: usize,
    /// Requests running through the device on the I/O pool.
    pooled: Arc<PoolRuns>,
    /// Their slots once done, reused.
    pool_done: Vec<usize>,
    /// Slots on the pool, done or not, not yet answered.
    on_pool: usize,
}

impl Pipeline {
    /// An engine for a queue of up to `slots` requests on `device`, or why there is none.
    pub(super) fn new(device: &dyn BlockDevice, slots: usize) -> io::Result<Pipeline> {
        let files = device.direct_files();
        if files.is_empty() {
            return Err(io::Error::other("the device has no file to submit to"));
        }
        let ring = Ring::new(slots, &files)?;
        Ok(Pipeline {
            stage: vec![Stage::Free; ring.len()],
            transfers: (0..ring.len()).map(|_| Transfer::default()).collect(),
            order: VecDeque::with_capacity(ring.len()),
            free: (0..ring.len()).rev().collect(),
            flush_pending: false,
            reaped: Vec::with_capacity(ring.len()),
            peak: 0,
            pooled: PoolRuns::new()?,
            pool_done: Vec::with_capacity(ring.len()),
            on_pool: 0,
            ring,
        })
    }

    /// Nothing popped and not yet added to the used ring.
    pub(super) fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// What waits, when dropped, for the requests this pipeline has on the I/O pool: the loop
    /// serving the queue holds it while it lends them their slots and context (`pooled.rs`).
    pub(super) fn settle_guard(&self) -> Settle {
        Settle(self.pooled.clone())
    }

    /// Pops every available request (up to a flush), submits those it can and runs the rest
    /// through the device (on the I/O pool when there are several). Returns how many it
    /// popped, and whether it stopped because the ring gave no more (empty, or a ring the
    /// driver broke: either way, nothing to pop before a completion). It also stops at a
    /// request left for a newer memory table (`view.rs`), which the caller loads.
    pub(super) fn fill(
        &mut self,
        sched: &Scheduler,
        ctx: &RequestContext<'_>,
        queue: &mut Queue,
        mem: &GuestMemGuard,
    ) -> (usize, bool) {
        let mut popped = 0;
        let mut to_run = 0;
        let mut emptied = false;
        while !self.flush_pending {
            let Some(&i) = self.free.last() else { break };
            let chain = match pop_request(queue, mem) {
                Popped::Chain(chain) => chain,
                Popped::Empty => {
                    emptied = true;
                    break;
                }
                // The caller loads the new table and comes back (`queue.rs`).
                Popped::TableChanged => break,
            };
            self.free.pop();
            self.order.push_back(i);
            popped += 1;
            let Some(slot) = self.ring.slot_mut(i) else {
                continue; // a free slot is never in flight
            };
            slot.prepare(ctx, chain, mem);
            self.stage[i] = match slot.pending() {
                None => Stage::Answered,
                Some(RequestKind::Flush) => {
                    self.flush_pending = true;
                    Stage::Flush
                }
                Some(_) => match slot.start_direct(ctx, mem) {
                    Start::Answered => Stage::Answered,
                    Start::Run => {
                        to_run += 1;
                        Stage::Run
                    }
                    Start::Direct { target, write, len } => {
                        let op = Op {
                            file: target.file as u32,
                            offset: target.offset,
                            write,
                        };
                        self.transfers[i] = Transfer {
                            op: Some(op),
                            left: len,
                            hold: target.hold,
                        };
                        self.launch(ctx, mem, i)
                    }
                },
            };
        }
        if to_run > 0 {
            self.run_the_rest(sched, ctx, mem);
        }
        (popped, emptied)
    }

    /// Submits what is left of slot `i`'s transfer; its stage.
    fn launch(&mut self, ctx: &RequestContext<'_>, mem: &GuestMemGuard, i: usize) -> Stage {
        let t = &mut self.transfers[i];
        let result = match t.op {
            Some(_) if t.left == 0 => Ok(false),
            Some(op) => self.ring.submit(i, op).map(|()| true),
            None => Err(io::Error::other("no transfer")),
        };
        match result {
            Ok(true) => Stage::InRing,
            Ok(false) => self.finish(ctx, mem, i, Ok(())),
            Err(e) => self.finish(ctx, mem, i, Err(e)),
        }
    }

    /// Answers slot `i`'s transfer, over or failed.
    fn finish(
        &mut self,
        ctx: &RequestContext<'_>,
        mem: &GuestMemGuard,
        i: usize,
        result: io::Result<()>,
    ) -> Stage {
        self.transfers[i] = Transfer::default();
        if let Some(slot) = self.ring.slot_mut(i) {
            slot.complete_direct(ctx, mem, result);
        }
        Stage::Answered
    }

    /// Runs the popped requests that go through the device: on the I/O pool, without waiting
    /// for them (`pooled.rs`: they say when they are done, and [`Pipeline::progress`] answers
    /// them), or one by one here when there is no pool.
    fn run_the_rest(&mut self, sched: &Scheduler, ctx: &RequestContext<'_>, mem: &GuestMemGuard) {
        let pool = sched.io_pool();
        if pool.is_none() {
            // Inline, a request may wait for a chunk a read in the ring holds (a write
            // waiting for the stripe): let those finish first.
            if let Err(e) = self.drain_ring(ctx, mem) {
                log::warn!("io_uring: waiting for the transfers in flight: {e}");
            }
        }
        for i in 0..self.stage.len() {
            if self.stage[i] != Stage::Run {
                continue;
            }
            let Some(slot) = self.ring.slot_mut(i) else {
                continue; // a request to run is never in the ring
            };
            match pool {
                Some(pool) => {
                    let slot: *mut InFlight = slot;
                    self.stage[i] = Stage::Pooled;
                    self.on_pool += 1;
                    // SAFETY: the slot lives in the ring's slots, which neither move nor go
                    // while the pipeline lives (it settles before it drops); its stage keeps
                    // the pipeline off it until its index comes back done; the context and
                    // memory outlive it because the loop serving the queue holds a
                    // `settle_guard` (queue.rs).
                    unsafe { self.pooled.spawn(pool, i, slot, ctx, mem) };
                }
                None => {
                    slot.run(ctx, mem, false);
                    self.stage[i] = Stage::Answered;
                }
            }
        }
    }

    /// Waits for every transfer in the ring and answers it: afterwards the pipeline holds no
    /// snapshot chunk and no origin-write leave. Before anything waits for something a
    /// transfer's hold may keep waiting (a request run inline, the pool settling after an
    /// error): the ring's transfers complete by themselves, whatever else waits.
    pub(super) fn drain_ring(
        &mut self,
        ctx: &RequestContext<'_>,
        mem: &GuestMemGuard,
    ) -> io::Result<()> {
        let mut failed = 0;
        while self.ring.in_flight() > 0 {
            if let Err(e) = self.ring.wait(1) {
                failed += 1;
                if failed < DRAIN_TRIES {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
                // A ring that cannot be waited on must not keep chunks held for ever (every
                // writer and barrier on those stripes would wait with it): let them go.
                log::error!(
                    "io_uring: cannot wait for {} transfers, letting go of what they hold: {e}",
                    self.ring.in_flight()
                );
                for t in &mut self.transfers {
                    t.hold = None;
                }
                return Err(e);
            }
            self.reap_ring(ctx, mem);
        }
        Ok(())
    }

    /// Takes the ring's completions there are and moves their slots on (`completed`).
    fn reap_ring(&mut self, ctx: &RequestContext<'_>, mem: &GuestMemGuard) {
        let mut reaped = std::mem::take(&mut self.reaped);
        self.ring.reap(|i, _, res| reaped.push((i, res)));
        for &(i, res) in &reaped {
            self.stage[i] = self.completed(ctx, mem, i, res);
        }
        reaped.clear();
        self.reaped = reaped;
    }

    /// Answers the requests done on the I/O pool.
    fn reap_pooled(&mut self) {
        let mut done = std::mem::take(&mut self.pool_done);
        self.pooled.take_done(&mut done);
        for &i in &done {
            if self.stage.get(i) == Some(&Stage::Pooled) {
                self.stage[i] = Stage::Answered;
                self.on_pool -= 1;
            }
        }
        done.clear();
        self.pool_done = done;
    }

    /// Takes the completions there are, first waiting for one if `wait` and the request at the
    /// front is not answered; then runs a flush whose predecessors are all done.
    pub(super) fn progress(
        &mut self,
        ctx: &RequestContext<'_>,
        mem: &GuestMemGuard,
        wait: bool,
    ) -> io::Result<()> {
        if self.on_pool > 0 {
            self.reap_pooled();
        }
        if self.ring.in_flight() > 0 || self.on_pool > 0 {
            let front_answered = self
                .order
                .front()
                .is_some_and(|&i| self.stage[i] == Stage::Answered);
            let wait = wait && !front_answered;
            if wait && self.on_pool > 0 {
                self.ring.arm_wake(self.pooled.wake_fd())?;
            }
            self.ring.wait(usize::from(wait))?;
            if self.on_pool > 0 {
                self.reap_pooled();
            }
            if self.ring.in_flight() > self.peak {
                self.peak = self.ring.in_flight();
                IoCounters::raise(&ctx.device.counters().peak_in_flight, self.peak as u64);
            }
            self.reap_ring(ctx, mem);
        }
        if self.flush_pending && self.ring.in_flight() == 0 && self.on_pool == 0 {
            if let Some(&i) = self.order.back() {
                if let Some(slot) = self.ring.slot_mut(i) {
                    slot.run(ctx, mem, false);
                }
                self.stage[i] = Stage::Answered;
            }
            self.flush_pending = false;
        }
        Ok(())
    }

    /// Slot `i`'s transfer completed with `res` (bytes, or a negative errno): answered, or the
    /// rest submitted again after a short transfer or an interruption.
    fn completed(
        &mut self,
        ctx: &RequestContext<'_>,
        mem: &GuestMemGuard,
        i: usize,
        res: i32,
    ) -> Stage {
        if res == -libc::EINTR || res == -libc::EAGAIN {
            return self.launch(ctx, mem, i);
        }
        if res < 0 {
            return self.finish(ctx, mem, i, Err(io::Error::from_raw_os_error(-res)));
        }
        let n = res as u64;
        let t = &mut self.transfers[i];
        if n == 0 || n > t.left {
            let e = io::Error::new(io::ErrorKind::UnexpectedEof, "the transfer came up short");
            return self.finish(ctx, mem, i, Err(e));
        }
        t.left -= n;
        if let Some(op) = t.op.as_mut() {
            op.offset += n;
        }
        if t.left > 0 {
            if let Some(slot) = self.ring.slot_mut(i) {
                slot.consume(n as usize);
            }
        }
        self.launch(ctx, mem, i)
    }

    /// Hands out the answered requests at the front, in pop order (head, used length), and
    /// frees their slots.
    pub(super) fn answered(&mut self, out: &mut Vec<(u16, u32)>) {
        while let Some(&i) = self.order.front() {
            if self.stage[i] != Stage::Answered {
                break;
            }
            self.order.pop_front();
            self.stage[i] = Stage::Free;
            self.free.push(i);
            if let Some(slot) = self.ring.slot_mut(i) {
                out.push((slot.head(), slot.used_len()));
            }
        }
    }

    /// Lets go of every guest memory table but `current` in the idle slots.
    pub(super) fn release_stale_memory(&mut self, current: &GuestMemGuard) {
        for i in 0..self.stage.len() {
            if self.stage[i] == Stage::Pooled {
                continue; // not ours to touch until it is done
            }
            if let Some(slot) = self.ring.slot_mut(i) {
                slot.release_stale_memory(current);
            }
        }
    }
}

impl Drop for Pipeline {
    /// Waits for the requests on the I/O pool before their slots (in the ring) go; first for
    /// the ring's transfers, and lets go of what they hold (a request on the pool may wait for
    /// a chunk one of them holds).
    fn drop(&mut self) {
        while self.ring.in_flight() > 0 {
            if let Err(e) = self.ring.wait(1) {
                log::error!("io_uring: cannot wait for the transfers in flight: {e}");
                break;
            }
            self.ring.reap(|_, _, _| {});
        }
        for t in &mut self.transfers {
            *t = Transfer::default();
        }
        self.pooled.settle();
    }
}
