//! [`GatedStorage`]: an in-memory store whose next write to a chosen range stops until the
//! test lets it go, to hold a writer at the instant between its decision and its I/O.

use super::storage::MemStorage;
use crate::storage::Storage;
use std::io;
use std::ops::Range;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A [`MemStorage`] with a gate on writes.
#[derive(Debug, Default)]
pub struct GatedStorage {
    inner: MemStorage,
    gate: Mutex<Gate>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Gate {
    /// The next write touching this range waits while it is set (later ones pass).
    held: Option<Range<u64>>,
    /// The held write has arrived.
    taken: bool,
    /// Writes waiting at the gate now.
    parked: usize,
}

impl GatedStorage {
    /// An empty store, gate open.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next write touching `range` waits until [`GatedStorage::open`]; others pass.
    pub fn hold(&self, range: Range<u64>) {
        let mut g = self.lock();
        g.held = Some(range);
        g.taken = false;
    }

    /// Lets every held write go, and holds none from now on.
    pub fn open(&self) {
        self.lock().held = None;
        self.changed.notify_all();
    }

    /// Waits until `n` writes are parked at the gate, for at most `timeout`; whether they are.
    pub fn wait_parked(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while g.parked < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .changed
                .wait_timeout(g, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Holds the write to `[offset, offset+len)` if it is the one the gate waits for.
    fn pass(&self, offset: u64, len: u64) {
        let mut g = self.lock();
        let touches = g
            .held
            .as_ref()
            .is_some_and(|r| offset < r.end && offset + len > r.start);
        if !touches || g.taken {
            return;
        }
        g.taken = true;
        g.parked += 1;
        self.changed.notify_all();
        while g.held.is_some() {
            g = self.changed.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
        g.parked -= 1;
    }
}

impl Storage for GatedStorage {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.pass(offset, buf.len() as u64);
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn set_size(&self, size: u64) -> io::Result<()> {
        self.inner.set_size(size)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.pass(offset, len);
        self.inner.write_zeroes(offset, len)
    }
}
