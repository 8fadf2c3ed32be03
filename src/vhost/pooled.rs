//! Requests of a queue's io_uring engine that run through the device on the I/O pool while
//! the queue's worker goes on popping and submitting (`pipeline.rs`): an origin write that
//! copies its chunk out for a snapshot takes milliseconds, and the guest's other requests need
//! not wait for it, nor for the batch it came with. Each says when it is done by its slot's
//! index in a list and a write to an eventfd, which the worker's ring polls
//! ([`Ring::arm_wake`](super::uring::Ring::arm_wake)), so the worker sleeps in one place for
//! both kinds of completion.
//!
//! A pooled request borrows its slot (in the ring's slots) and the queue's request context
//! from the worker, beyond the call that started it. That is sound because the worker never
//! touches a slot while it is on the pool (its stage says so), and it does not leave the loop
//! that serves the queue (not even by unwinding) before every pooled request is done: the
//! loop holds a [`Settle`], which waits for them when it goes.

use super::guest::GuestMemGuard;
use super::iopool::IoPool;
use super::request::{InFlight, RequestContext};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use vmm_sys_util::eventfd::EventFd;

/// The requests of one queue on the pool: how many, and which are done.
pub(super) struct PoolRuns {
    state: Mutex<Runs>,
    /// The last pooled request is done (for [`Settle`]).
    idle: Condvar,
    /// Written when one is done; polled by the worker's ring.
    wake: EventFd,
}

#[derive(Default)]
struct Runs {
    outstanding: usize,
    done: Vec<usize>,
}

/// A raw pointer handed to a pool thread (see the module's comment for why that is sound).
struct Lent<T: ?Sized>(*const T);

// SAFETY: what it points to is `Sync` (the request context) or reached by the pool thread
// alone while lent (the slot, `Lent<InFlight>`, `InFlight: Send`); the lender outlives the use.
unsafe impl<T: ?Sized + Sync> Send for Lent<T> {}

struct LentMut<T>(*mut T);

// SAFETY: see `Lent`: a slot on the pool is reached by its pool thread alone.
unsafe impl<T: Send> Send for LentMut<T> {}

/// Marks slot `i` done when dropped (also when its request panicked).
struct Done {
    runs: Arc<PoolRuns>,
    i: usize,
}

impl Drop for Done {
    fn drop(&mut self) {
        let mut st = self.runs.lock();
        st.done.push(self.i);
        st.outstanding = st.outstanding.saturating_sub(1);
        if st.outstanding == 0 {
            self.runs.idle.notify_all();
        }
        drop(st);
        if let Err(e) = self.runs.wake.write(1) {
            log::error!("cannot wake the queue worker: {e}");
        }
    }
}

impl PoolRuns {
    pub(super) fn new() -> io::Result<Arc<PoolRuns>> {
        Ok(Arc::new(PoolRuns {
            state: Mutex::new(Runs::default()),
            idle: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Runs> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The descriptor that turns readable when a pooled request is done.
    pub(super) fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Runs slot `i`'s request through the device on `pool`.
    ///
    /// # Safety
    /// `slot`, `ctx` and what they borrow must stay valid, and `slot` untouched by anyone
    /// else, until `i` comes back from [`PoolRuns::take_done`] or a [`Settle`] made from this
    /// value has returned from its drop.
    pub(super) unsafe fn spawn(
        self: &Arc<Self>,
        pool: &IoPool,
        i: usize,
        slot: *mut InFlight,
        ctx: &RequestContext<'_>,
        mem: &GuestMemGuard,
    ) {
        self.lock().outstanding += 1;
        let done = Done {
            runs: self.clone(),
            i,
        };
        let slot = LentMut(slot);
        // Only the lifetime is erased; the caller keeps the context alive (the contract).
        let ctx: Lent<RequestContext<'static>> =
            Lent((ctx as *const RequestContext<'_>).cast::<RequestContext<'static>>());
        let mem = mem.clone();
        pool.spawn(Box::new(move || {
            let (slot, ctx, _done) = (slot, ctx, done);
            // SAFETY: the caller lends both until `done` says this one is over (the contract);
            // `_done` drops last, after the request's last use of them.
            let (slot, ctx) = unsafe { (&mut *slot.0, &*ctx.0) };
            slot.run(ctx, &mem, false);
        }));
    }

    /// Moves the slots whose requests are done into `out`.
    pub(super) fn take_done(&self, out: &mut Vec<usize>) {
        // Reset first: one done after the list is taken makes the descriptor readable again.
        let _ = self.wake.read();
        out.append(&mut self.lock().done);
    }

    /// Waits until no pooled request is left.
    pub(super) fn settle(&self) {
        let mut st = self.lock();
        while st.outstanding > 0 {
            st = self.idle.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Waits for every pooled request of a queue when dropped: held by the loop that lends them
/// their slots and context, so that it cannot end (by returning or unwinding) before they do.
pub(super) struct Settle(pub(super) Arc<PoolRuns>);

impl Drop for Settle {
    fn drop(&mut self) {
        self.0.settle();
    }
}
