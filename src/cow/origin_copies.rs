//! The state of copy-on-read of a read-only origin ([`CopyOnRead`]): where its local copies
//! are found, the fetch table (one fetch per chunk, however many readers), the counters, and
//! the hydration thread's report. What the engine does with them is `cor.rs` (reads and
//! fetches) and `hydrate.rs` (the background walk).

use super::format::ENTRY_UNMAPPED;
use super::meta::ReadSide;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counters of copy-on-read.
#[derive(Default)]
pub(super) struct CorCounters {
    /// Chunks read from the origin's server, and their bytes.
    pub(super) fetches: AtomicU64,
    pub(super) bytes_fetched: AtomicU64,
    /// Bytes read where the view was the origin, served by its local copies (or known zeros).
    pub(super) bytes_local: AtomicU64,
    /// Chunks found to read as zeros (a hole, or fetched all zeros): kept as zero mappings.
    pub(super) zero_chunks: AtomicU64,
    /// Fetched chunks served but not kept (no space, or the journal pressed).
    pub(super) not_kept: AtomicU64,
    /// Fetches that failed (the origin did not deliver the chunk in time).
    pub(super) errors: AtomicU64,
    /// Reads that waited for another reader's fetch of their chunk.
    pub(super) waits: AtomicU64,
}

/// How a fetch ended, as every reader of the chunk sees it.
#[derive(Clone)]
pub(super) enum Outcome {
    /// The chunk is local now: this entry of the origin's table.
    Local(u64),
    /// The chunk's data, served but not kept.
    Data(Arc<[u8]>),
    Failed(io::ErrorKind, String),
}

/// One fetch in flight: its outcome once the fetching reader has it.
#[derive(Default)]
struct Fetch {
    outcome: Mutex<Option<Outcome>>,
    done: Condvar,
}

/// The fetch of one chunk, led by the reader that holds this: its outcome reaches the readers
/// waiting for it when it is dropped, also if the leader unwinds.
pub(super) struct Leader<'a> {
    fetches: &'a Mutex<HashMap<u64, Arc<Fetch>>>,
    c: u64,
    fetch: Arc<Fetch>,
    pub(super) outcome: Option<Outcome>,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let outcome = self.outcome.take().unwrap_or_else(|| {
            Outcome::Failed(io::ErrorKind::Other, "the fetch was abandoned".into())
        });
        lock(self.fetches).remove(&self.c);
        *lock(&self.fetch.outcome) = Some(outcome);
        self.fetch.done.notify_all();
    }
}

/// Where hydration is.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HydrationInfo {
    /// `off` (never asked), `running`, `done`, `stopped` (by request), `paused` (the daemon
    /// stops; it resumes at the next start), or `stopped: REASON`.
    pub state: String,
    /// Bytes per second, 0 for no limit.
    pub rate: u64,
    /// The byte offset of the origin it has reached (or stopped at).
    pub position: u64,
    /// Bytes it fetched itself.
    pub bytes_fetched: u64,
    /// The last error from the origin (it retries), if any.
    pub last_error: Option<String>,
}

/// The hydration thread (its stop flag and handle) and what it reports.
#[derive(Default)]
pub(super) struct HydratorState {
    pub(super) info: HydrationInfo,
    pub(super) thread: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

/// Copy-on-read state of an engine whose origin is read-only.
pub(super) struct CopyOnRead {
    /// The origin device's read side: its own entries are the local copies. Never replaced
    /// (the origin is never deleted nor made inoperative).
    origin_side: Arc<ReadSide>,
    /// Fetches in flight by chunk. Held only to insert or remove one, never across I/O.
    fetches: Mutex<HashMap<u64, Arc<Fetch>>>,
    pub(super) counters: CorCounters,
    pub(super) hydrator: Mutex<HydratorState>,
}

impl CopyOnRead {
    pub(super) fn new(origin_side: Arc<ReadSide>) -> Self {
        Self {
            origin_side,
            fetches: Mutex::new(HashMap::new()),
            counters: CorCounters::default(),
            hydrator: Mutex::default(),
        }
    }

    /// The local copy of chunk `c` (`ENTRY_UNMAPPED`: not local). Lock-free; the acquire
    /// fence pairs with the release fence before the record that set it, so the block's data
    /// written before is visible to the reader that finds the entry.
    #[inline]
    pub(super) fn local(&self, c: u64) -> u64 {
        let e = self.origin_side.resolved(c);
        if e != ENTRY_UNMAPPED {
            fence(Ordering::Acquire);
        }
        e
    }

    /// Joins the fetch of chunk `c`: `Ok(leader)` if this caller is the first and must fetch
    /// (its outcome reaches the others when the leader is dropped), else `Err(outcome)`, the
    /// outcome of the fetch in flight, once it ends.
    pub(super) fn join_fetch(&self, c: u64) -> Result<Leader<'_>, Outcome> {
        let fetch = {
            let mut table = lock(&self.fetches);
            match table.get(&c) {
                Some(f) => f.clone(),
                None => {
                    let fetch = Arc::new(Fetch::default());
                    table.insert(c, fetch.clone());
                    return Ok(Leader {
                        fetches: &self.fetches,
                        c,
                        fetch,
                        outcome: None,
                    });
                }
            }
        };
        self.counters.waits.fetch_add(1, Ordering::Relaxed);
        let mut outcome = lock(&fetch.outcome);
        loop {
            if let Some(o) = outcome.as_ref() {
                return Err(o.clone());
            }
            outcome = fetch
                .done
                .wait(outcome)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}
