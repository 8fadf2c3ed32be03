//! The gate of origin writes that bypass the engine (direct I/O submitted by a queue through
//! io_uring, `direct.rs`): they hold no stripe lock while in flight, so a snapshot created
//! meanwhile could read a chunk through to the origin and then see it change. Snapshot
//! creation therefore closes the gate and waits until those in flight are done; writes that
//! find it closed take the engine's path.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Writes through the gate, and creations keeping it closed.
#[derive(Debug, Default)]
pub(crate) struct DirectGate {
    writers: AtomicUsize,
    closers: AtomicUsize,
}

/// An origin write's leave to bypass the engine, held until the write completes.
#[derive(Debug)]
pub struct OriginWriteTicket(Arc<DirectGate>);

impl Drop for OriginWriteTicket {
    fn drop(&mut self) {
        self.0.writers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The gate held closed (see [`DirectGate::close`]); it opens when dropped.
pub(crate) struct Closed<'a>(&'a DirectGate);

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        self.0.closers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl DirectGate {
    /// A ticket, unless the gate is closed. The caller checks what must hold for the bypass
    /// *after* taking it (the ticket is what a closer waits for).
    pub(crate) fn enter(self: &Arc<Self>) -> Option<OriginWriteTicket> {
        // SeqCst on both sides (Dekker): either the closer sees this writer and waits for it,
        // or this writer sees the closer and gives up.
        self.writers.fetch_add(1, Ordering::SeqCst);
        let ticket = OriginWriteTicket(self.clone());
        (self.closers.load(Ordering::SeqCst) == 0).then_some(ticket)
    }

    /// Closes the gate and waits until no bypassing write is in flight.
    pub(crate) fn close(&self) -> Closed<'_> {
        self.closers.fetch_add(1, Ordering::SeqCst);
        let closed = Closed(self);
        while self.writers.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(Duration::from_micros(20));
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_gate_refuses_tickets_and_closing_waits_for_those_in_flight() {
        let gate = Arc::new(DirectGate::default());
        let ticket = gate.enter().expect("an open gate");
        let g = gate.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let closer = std::thread::spawn(move || {
            let closed = g.close();
            tx.send(()).unwrap();
            assert!(g.enter().is_none(), "closed");
            drop(closed);
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "the closer waits for the write in flight"
        );
        drop(ticket);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the closer goes on once it is done");
        closer.join().unwrap();
        assert!(gate.enter().is_some(), "open again");
    }
}
