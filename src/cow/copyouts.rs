//! Copy-outs in flight, so that group commit gathers them: a commit leader waits (briefly)
//! until the origin copy-outs running beside it have logged their records, and commits them
//! all at once. Without it, a batch of first-touch origin writes (a guest's queue depth, each
//! on its own I/O thread) committed in dribs: the first copy to finish committed alone, the
//! rest trickled into the commits behind it (about 4 records per sync at QD 32, measured).
//!
//! Only the copy-outs in flight when the wait began are waited for ([`CopyOuts::wait_idle`]).
//! Waiting is safe: a copy-out holds its chunk's stripe but neither the journal nor the state
//! lock while its data moves, and it only takes the state lock (never the journal) to log its
//! record, so it always finishes without the commit leader. The wait is bounded all the same
//! (a disk that stalls a copy must not stall every commit): after [`GROUP_WAIT`] the leader
//! commits what is logged, and the late ones go into the next commit, as before.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The longest a commit waits for copy-outs in flight to join it.
pub(super) const GROUP_WAIT: Duration = Duration::from_millis(10);

/// The copy-outs in flight, counted by era: a commit waits for those of the era that was
/// current when it began waiting, not for those started since (which keep starting while a
/// guest keeps its queue full): they go into the next commit.
#[derive(Debug, Default)]
pub(super) struct CopyOuts {
    running: Mutex<Eras>,
    idle: Condvar,
}

#[derive(Debug, Default)]
struct Eras {
    era: u64,
    /// In flight, by the parity of the era they started in.
    running: [usize; 2],
}

/// One copy-out in flight: counted from before its data moves until its record is logged
/// (or it gave up), when this is dropped.
pub(super) struct CopyOut<'a> {
    outs: &'a CopyOuts,
    parity: usize,
}

impl Drop for CopyOut<'_> {
    fn drop(&mut self) {
        let mut st = self
            .outs
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = &mut st.running[self.parity];
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.outs.idle.notify_all();
        }
    }
}

impl CopyOuts {
    /// Counts a copy-out in flight until the returned value drops.
    pub(super) fn begin(&self) -> CopyOut<'_> {
        let mut st = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let parity = (st.era % 2) as usize;
        st.running[parity] += 1;
        CopyOut { outs: self, parity }
    }

    /// Waits until the copy-outs in flight now are done, at most `max`; those that start
    /// meanwhile are not waited for. Returns whether any was waited for.
    pub(super) fn wait_idle(&self, max: Duration) -> bool {
        let mut st = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let parity = (st.era % 2) as usize;
        if st.running[parity] == 0 {
            return false;
        }
        st.era += 1;
        let deadline = Instant::now() + max;
        while st.running[parity] > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .idle
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_wait_ends_when_the_last_copy_out_is_done_or_at_the_bound() {
        let c = Arc::new(CopyOuts::default());
        assert!(!c.wait_idle(GROUP_WAIT), "nothing to wait for");
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            let a = c2.begin();
            let b = c2.begin();
            std::thread::sleep(Duration::from_millis(30));
            drop(a);
            std::thread::sleep(Duration::from_millis(30));
            drop(b);
        });
        std::thread::sleep(Duration::from_millis(10));
        let start = Instant::now();
        assert!(c.wait_idle(Duration::from_secs(5)));
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(40),
            "left before the last: {took:?}"
        );
        t.join().unwrap();
        let held = c.begin();
        let start = Instant::now();
        assert!(c.wait_idle(Duration::from_millis(20)));
        assert!(start.elapsed() < Duration::from_secs(2), "bounded");
        drop(held);
    }

    #[test]
    fn a_wait_does_not_wait_for_copy_outs_started_after_it_began() {
        let c = Arc::new(CopyOuts::default());
        let first = c.begin();
        let c2 = c.clone();
        let waiter = std::thread::spawn(move || {
            let start = Instant::now();
            assert!(c2.wait_idle(Duration::from_secs(5)));
            start.elapsed()
        });
        std::thread::sleep(Duration::from_millis(30));
        let later = c.begin(); // started while the commit waits: the next commit's
        drop(first);
        let took = waiter.join().unwrap();
        assert!(
            took < Duration::from_secs(2),
            "waited for a later copy-out: {took:?}"
        );
        drop(later);
        assert!(!c.wait_idle(GROUP_WAIT), "none left");
    }
}
