//! The waiting room for space, apart from the engine: the on-full policy ([`OnFull`]), the
//! requests waiting under it (at most [`MAX_SPACE_WAITERS`]), a generation counter bumped
//! whenever space may have come back, per-device cancellation and closing for shutdown. The
//! engine's use of it (which requests wait, what wakes them) is `waits.rs`.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// At most this many requests wait for space at once; more fail at once. The daemon's queues
/// run slow requests on a shared pool of 32 threads: waiters never take more than half of it,
/// so the origin and the other snapshots keep being served.
pub const MAX_SPACE_WAITERS: u64 = 16;

/// A waiter looks again at least this often.
pub(super) const RECHECK: Duration = Duration::from_secs(1);

/// What a write to a writable snapshot does when it finds no space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFull {
    /// Fail at once with an I/O error.
    Error,
    /// Wait for space up to this long, then fail with an I/O error.
    Wait(Duration),
}

impl Default for OnFull {
    /// The engine's: `error` (the daemon's is `wait=60`, [`OnFull::DAEMON_DEFAULT`]).
    fn default() -> Self {
        OnFull::Error
    }
}

impl OnFull {
    /// What `snapblk serve` does unless told otherwise: wait up to a minute.
    pub const DAEMON_DEFAULT: OnFull = OnFull::Wait(Duration::from_secs(60));

    /// What writes do, for the log.
    pub(super) fn describe_for_log(self) -> String {
        match self {
            OnFull::Error => "fail".into(),
            OnFull::Wait(d) => format!("wait for space (up to {} s)", d.as_secs_f64()),
        }
    }
}

impl fmt::Display for OnFull {
    /// As the command line writes it: `error` or `wait=SECS`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OnFull::Error => write!(f, "error"),
            OnFull::Wait(d) => write!(f, "wait={}", d.as_secs_f64()),
        }
    }
}

/// The waits of one engine.
#[derive(Default)]
pub(crate) struct SpaceWaits {
    state: Mutex<WaitState>,
    cv: Condvar,
    /// Bumped whenever space may have come back or the cache went low on space. Read by every
    /// write before it tries (no lock: writes of all queues pass here); changed only with
    /// `state` locked, so a sleeper that checked it under the lock cannot miss a bump.
    generation: AtomicU64,
}

#[derive(Default)]
struct WaitState {
    policy: OnFull,
    waiting: u64,
    /// Per device, bumped to make its current waiters give up.
    cancels: HashMap<u64, u64>,
    /// The engine is stopping: no request waits any more.
    closed: bool,
    /// Logged for the current episode (until no request waits): that requests wait, and
    /// that one gave up.
    wait_logged: bool,
    timeout_logged: bool,
}

/// One request waiting for space; leaves the count when dropped.
pub(super) struct Waiter<'a> {
    waits: &'a SpaceWaits,
    dev: u64,
    cancel: u64,
    deadline: Instant,
}

/// Why a waiter stopped waiting.
pub(super) enum GaveUp {
    Timeout,
    Cancelled,
}

impl SpaceWaits {
    fn lock(&self) -> MutexGuard<'_, WaitState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn policy(&self) -> OnFull {
        self.lock().policy
    }

    pub(super) fn set_policy(&self, policy: OnFull) {
        self.lock().policy = policy;
        self.bump();
    }

    pub(super) fn waiting(&self) -> u64 {
        self.lock().waiting
    }

    pub(super) fn closed(&self) -> bool {
        self.lock().closed
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Space may have come back, or the cache went low on space: everyone looks again.
    pub(super) fn bump(&self) {
        let st = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        drop(st);
        self.cv.notify_all();
    }

    /// The current waiters of device `dev` give up.
    pub(super) fn cancel(&self, dev: u64) {
        *self.lock().cancels.entry(dev).or_default() += 1;
        self.cv.notify_all();
    }

    /// Nobody waits any more, now or later.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
    }

    /// Sleeps until the generation is no longer `seen`, for at most `limit`.
    pub(super) fn sleep(&self, seen: u64, limit: Duration) {
        let st = self.lock();
        if self.generation() == seen && !st.closed {
            drop(
                self.cv
                    .wait_timeout(st, limit)
                    .unwrap_or_else(PoisonError::into_inner),
            );
        }
    }

    /// Enters a request of device `dev` among the waiters, if the policy and their number
    /// allow; the first of an episode is logged.
    pub(super) fn enter(&self, dev: u64) -> Option<Waiter<'_>> {
        let mut st = self.lock();
        let OnFull::Wait(limit) = st.policy else {
            return None;
        };
        if st.closed || st.waiting >= MAX_SPACE_WAITERS {
            return None;
        }
        st.waiting += 1;
        if !std::mem::replace(&mut st.wait_logged, true) {
            log::warn!(
                "cache object full: writes to writable snapshots (first: device {dev}) wait \
                 for space, up to {} s; delete snapshots or raise the limit \
                 (`snapblk cache resize`)",
                limit.as_secs_f64()
            );
        }
        Some(Waiter {
            waits: self,
            dev,
            cancel: st.cancels.get(&dev).copied().unwrap_or(0),
            deadline: Instant::now() + limit,
        })
    }

    /// Logs the first timeout of an episode.
    pub(super) fn note_timeout(&self, dev: u64) {
        if !std::mem::replace(&mut self.lock().timeout_logged, true) {
            log::error!(
                "a write to device {dev} waited for space until its timeout and failed with \
                 an I/O error"
            );
        }
    }
}

impl Waiter<'_> {
    /// Sleeps until space may have come back (the generation moved from `seen`) or a second
    /// passed; returns the generation to try again at, or why to give up.
    pub(super) fn wait(&self, seen: u64) -> Result<u64, GaveUp> {
        let now = Instant::now();
        if now >= self.deadline {
            return Err(GaveUp::Timeout);
        }
        self.waits.sleep(seen, (self.deadline - now).min(RECHECK));
        let st = self.waits.lock();
        if st.closed || st.cancels.get(&self.dev).copied().unwrap_or(0) != self.cancel {
            return Err(GaveUp::Cancelled);
        }
        Ok(self.waits.generation())
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut st = self.waits.lock();
        st.waiting -= 1;
        if st.waiting == 0 {
            st.wait_logged = false;
            st.timeout_logged = false;
        }
    }
}
