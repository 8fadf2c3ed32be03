//! Which frontend's rings may run: the handover of a device from one frontend to another.
//!
//! A device serves one VM, but while that VM migrates to another QEMU process on this host
//! two frontends are connected: the source, whose rings run, and the destination, which
//! connected early (QEMU's `-incoming` sets its devices up at start) and starts its rings once
//! the VM runs there. QEMU orders it: the source stops its rings (`GET_VRING_BASE`, each
//! answered only once every request popped from the ring has been answered: the ring's lock is
//! held for a whole drain, and a ring found stopped under it pops nothing), then sends the
//! ring positions with the VM's state, and the destination starts its rings there. So no
//! request is lost (the destination starts at the first one the source did not pop) or done
//! twice (the source pops nothing after it reported where it stopped).
//!
//! [`Handover`] makes that order a rule of the device rather than a courtesy of the frontend:
//! the rings of only one connection run at a time. A ring *runs* from its first kick until
//! `GET_VRING_BASE` stops it or its connection ends (after every request it popped was
//! answered). A ring of another connection that wants to start waits until none runs; one
//! that waited [`PATIENCE`] in vain belongs to a second VM on the device, not a migration, and
//! its connection is dropped. The cost on the data path is one flag load per event, the
//! ring's own flag, written only when it starts and stops.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long a ring waits for another connection's rings to stop before its own connection
/// is taken for a second VM and dropped. A migration's destination never waits this long:
/// QEMU starts it once the source's rings are stopped.
pub(super) const PATIENCE: Duration = Duration::from_secs(5);

/// How often a waiting ring looks whether it should give up.
const LOOK_EVERY: Duration = Duration::from_millis(20);

/// The connection whose rings run, shared by every connection of one device.
#[derive(Debug)]
pub struct Handover {
    owner: Mutex<Owner>,
    released: Condvar,
    next_conn: AtomicU64,
    patience: Duration,
}

impl Default for Handover {
    fn default() -> Self {
        Handover {
            owner: Mutex::default(),
            released: Condvar::new(),
            next_conn: AtomicU64::new(0),
            patience: PATIENCE,
        }
    }
}

#[derive(Debug, Default)]
struct Owner {
    /// The connection whose rings run (0: none).
    conn: u64,
    /// How many of its rings run.
    rings: usize,
}

/// What a ring that wants to run was told.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Entry {
    /// It runs.
    Run,
    /// It stopped waiting because its caller said so (its connection is closing).
    GaveUp,
    /// Another connection's rings kept running for [`PATIENCE`].
    Refused,
}

impl Handover {
    /// The rings of a new connection with `queues` queues.
    pub(super) fn rings(self: &Arc<Self>, queues: usize) -> Rings {
        Rings {
            handover: self.clone(),
            conn: self.next_conn.fetch_add(1, Ordering::Relaxed) + 1,
            running: (0..queues).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Owner> {
        self.owner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A handover whose rings wait `patience` (tests).
    #[cfg(test)]
    pub(super) fn with_patience(patience: Duration) -> Self {
        Handover {
            patience,
            ..Handover::default()
        }
    }

    /// Whether some connection's rings run (tests).
    #[cfg(test)]
    pub(super) fn busy(&self) -> bool {
        self.lock().conn != 0
    }
}

/// One connection's rings as the handover sees them. Dropping it stops them all.
#[derive(Debug)]
pub(super) struct Rings {
    handover: Arc<Handover>,
    conn: u64,
    running: Box<[AtomicBool]>,
}

impl Rings {
    /// Ring `q` is about to be served: it may if it runs already; otherwise it starts, waiting
    /// while another connection's rings run (up to [`PATIENCE`], or until `give_up`). Call it
    /// with the ring's lock held (shared will do) and the ring found ready, so that it cannot
    /// be stopped meanwhile.
    pub(super) fn enter(&self, q: usize, give_up: &dyn Fn() -> bool) -> Entry {
        let Some(running) = self.running.get(q) else {
            return Entry::GaveUp;
        };
        if running.load(Ordering::Acquire) {
            return Entry::Run;
        }
        let deadline = Instant::now() + self.handover.patience;
        let mut owner = self.handover.lock();
        loop {
            if owner.conn == 0 || owner.conn == self.conn {
                owner.conn = self.conn;
                owner.rings += 1;
                running.store(true, Ordering::Release);
                return Entry::Run;
            }
            if give_up() {
                return Entry::GaveUp;
            }
            if Instant::now() >= deadline {
                return Entry::Refused;
            }
            owner = match self.handover.released.wait_timeout(owner, LOOK_EVERY) {
                Ok((owner, _)) => owner,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Whether ring `q` runs.
    #[inline]
    pub(super) fn running(&self, q: usize) -> bool {
        self.running
            .get(q)
            .is_some_and(|r| r.load(Ordering::Acquire))
    }

    /// Ring `q` stopped (`GET_VRING_BASE`: every request it popped was answered).
    pub(super) fn stop(&self, q: usize) {
        if self
            .running
            .get(q)
            .is_some_and(|r| r.swap(false, Ordering::AcqRel))
        {
            let mut owner = self.handover.lock();
            owner.rings = owner.rings.saturating_sub(1);
            if owner.rings == 0 && owner.conn == self.conn {
                owner.conn = 0;
                self.handover.released.notify_all();
            }
        }
    }

    /// Every ring stopped: the connection ended, and no request it popped is in flight.
    pub(super) fn stop_all(&self) {
        for q in 0..self.running.len() {
            self.stop(q);
        }
    }
}

impl Drop for Rings {
    fn drop(&mut self) {
        self.stop_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_connection_runs_at_a_time_and_the_next_starts_when_its_rings_stop() {
        let h = Arc::new(Handover::default());
        let (a, b) = (h.rings(2), h.rings(2));
        let never = || false;
        assert_eq!(a.enter(0, &never), Entry::Run);
        assert_eq!(a.enter(1, &never), Entry::Run);
        assert!(a.running(0) && a.running(1));
        // b waits while a runs: it is started once a's last ring stops.
        let start = Instant::now();
        let waiter = {
            let b_started = std::thread::spawn(move || (b.enter(0, &never), start.elapsed(), b));
            std::thread::sleep(Duration::from_millis(100));
            a.stop(0);
            std::thread::sleep(Duration::from_millis(100));
            assert!(!b_started.is_finished(), "ring 1 of a still runs");
            a.stop(1);
            b_started.join().unwrap()
        };
        let (entry, waited, b) = waiter;
        assert_eq!(entry, Entry::Run);
        assert!(waited >= Duration::from_millis(200));
        // Now a waits for b; its caller may give up.
        assert_eq!(a.enter(0, &|| true), Entry::GaveUp);
        drop(b);
        assert!(!h.busy(), "a dropped connection stops its rings");
        assert_eq!(a.enter(0, &never), Entry::Run);
    }

    #[test]
    fn a_ring_that_waits_in_vain_is_refused() {
        let patience = Duration::from_millis(300);
        let h = Arc::new(Handover::with_patience(patience));
        let (a, b) = (h.rings(1), h.rings(1));
        assert_eq!(a.enter(0, &|| false), Entry::Run);
        let start = Instant::now();
        assert_eq!(b.enter(0, &|| false), Entry::Refused);
        assert!(start.elapsed() >= patience);
        assert!(!b.running(0));
        assert!(a.running(0));
    }
}
