//! File-system space for new data blocks, taken ahead of their first write (direct I/O only).
//!
//! A direct write into a hole of the cache object allocates its space inside the write: on
//! ext4 the writes to new blocks then serialize on the file (measured on this project's host:
//! 32 threads writing 64 KiB blocks reached about 10k writes/s into holes or past the end of
//! the file, 34k/s into space taken with one fallocate beforehand). First-touch writes under a
//! snapshot write a new block each, so the engine takes the space for the next
//! [`WINDOW_BYTES`] in one fallocate (`blockio.rs`, `write_block`) when an allocation reaches past what it took
//! before. Blocks are allocated lowest first, so the window runs just ahead of the file's
//! used part; it never passes the growth limit, and a file system that refuses (no space,
//! no fallocate) only leaves the writes to take their space as they come, as before.
//!
//! Only for a cache object under direct I/O: through the page cache, space is taken at
//! writeback, off the request path, and a preallocated window would only cost space.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// Bytes preallocated at once (64 blocks of 64 KiB).
pub(super) const WINDOW_BYTES: u64 = 4 << 20;

/// How far the cache object's space was taken ahead of allocation.
#[derive(Debug, Default)]
pub(super) struct Prealloc {
    /// Blocks below this have their space (or were freed and punched since, or the file
    /// system refused: then writes take it as before).
    end: AtomicU64,
    /// The growth limit as last seen by the allocator, in blocks: the window stops there.
    cap: AtomicU64,
    /// Serializes the fallocate calls.
    taking: Mutex<()>,
}

impl Prealloc {
    /// The allocator saw the limit `max_blocks` (called with the state lock held: one store).
    pub(super) fn note_cap(&self, max_blocks: u64) {
        self.cap.store(max_blocks, Ordering::Relaxed);
    }

    /// Before the first write of block `b`: unless `b` has its space already, `allocate(b,
    /// upto)` takes it for blocks `b..upto` (a window of `window` blocks, within the limit).
    pub(super) fn prepare(
        &self,
        b: u64,
        window: u64,
        allocate: impl FnOnce(u64, u64) -> io::Result<()>,
    ) {
        if b < self.end.load(Ordering::Acquire) {
            return;
        }
        let _taking = self.taking.lock().unwrap_or_else(PoisonError::into_inner);
        if b < self.end.load(Ordering::Acquire) {
            return; // another thread took it meanwhile
        }
        let upto = (b + window.max(1))
            .min(self.cap.load(Ordering::Relaxed))
            .max(b + 1);
        match allocate(b, upto) {
            Ok(()) => self.end.store(upto, Ordering::Release),
            Err(e) => {
                // Not fatal: the writes take their space as they come (and report a lack of it).
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| log::info!("cache object: no space taken ahead ({e})"));
                self.end.store(b + 1, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_is_taken_a_window_at_a_time_within_the_limit() {
        let p = Prealloc::default();
        p.note_cap(100);
        let mut calls = Vec::new();
        for b in [0, 1, 63, 64, 65, 90, 99] {
            p.prepare(b, 64, |from, upto| {
                calls.push((from, upto));
                Ok(())
            });
        }
        assert_eq!(calls, vec![(0, 64), (64, 100)]);
        p.note_cap(200);
        p.prepare(150, 64, |_, _| {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        });
        let mut again = Vec::new();
        p.prepare(151, 64, |from, upto| {
            again.push((from, upto));
            Ok(())
        });
        assert_eq!(
            again,
            vec![(151, 200)],
            "a refusal takes nothing: tried again later"
        );
    }
}
