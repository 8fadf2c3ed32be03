//! What the fuzz harnesses (`tests/fuzz_*.rs`) share: how many cases to run, an allocator
//! that refuses unbounded allocations, and a watchdog that turns a hang into a failure.
//!
//! - [`cases`]: a modest default so `cargo test` stays fast; `SNAPBLK_FUZZ_CASES=N` for long
//!   runs (docs/testing.md).
//! - [`BoundedAlloc`]: a global allocator for a harness binary that refuses any single
//!   allocation above a limit, naming the case being run. Decoding hostile bytes must never
//!   size a buffer from an unchecked length field: a length of 2^60 then aborts the harness
//!   (with the case's description) instead of swapping or being killed.
//!   It also meters a thread's allocations on demand: [`peak_allocation`].
//! - [`Watchdog`]: aborts the harness, naming the case, if one case runs longer than a limit.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The number of cases a harness runs: `SNAPBLK_FUZZ_CASES` if set, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("SNAPBLK_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The seed of a harness's random inputs: fixed for the default `cargo test` run (so CI is
/// deterministic), `None` (a fresh random seed) when `SNAPBLK_FUZZ_CASES` asks for a long
/// run or `SNAPBLK_FUZZ_RANDOM` is set; `SNAPBLK_FUZZ_SEED=N` fixes any run's seed.
pub fn seed() -> Option<u64> {
    if let Some(s) = std::env::var("SNAPBLK_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return Some(s);
    }
    let random = std::env::var_os("SNAPBLK_FUZZ_CASES").is_some()
        || std::env::var_os("SNAPBLK_FUZZ_RANDOM").is_some();
    (!random).then_some(0x5eed_b10c)
}

/// What the harness is running now, printed when the allocator or the watchdog aborts.
static CURRENT_CASE: Mutex<String> = Mutex::new(String::new());

/// Records a description of the case about to run (e.g. its seed), for abort messages.
pub fn set_case(description: String) {
    *CURRENT_CASE.lock().unwrap_or_else(PoisonError::into_inner) = description;
}

fn current_case() -> String {
    CURRENT_CASE
        .try_lock()
        .map(|c| c.clone())
        .unwrap_or_else(|_| "(case description locked)".into())
}

/// Writes `msg` to the process's stderr directly: the test harness's output capture (which
/// `eprintln!` goes through) is lost when the process aborts.
fn report(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}

/// A thread's allocation meter: on while [`peak_allocation`] runs; bytes the thread holds
/// that it allocated (less those it freed) since, and the most it held at once.
#[derive(Clone, Copy)]
struct Meter {
    on: bool,
    live: i64,
    peak: i64,
}

thread_local! {
    // A const initializer and no destructor: the allocator may use it without allocating.
    static METER: Cell<Meter> = const { Cell::new(Meter { on: false, live: 0, peak: 0 }) };
}

/// Counts `delta` bytes on this thread's meter, if it is on.
#[inline]
fn meter(delta: i64) {
    let _ = METER.try_with(|m| {
        let mut v = m.get();
        if v.on {
            v.live += delta;
            v.peak = v.peak.max(v.live);
            m.set(v);
        }
    });
}

/// Runs `f` and returns its result and the most memory this thread held at once while it
/// ran, beyond what it held before: bytes it allocated (and had not freed) meanwhile. Counts
/// only in a binary whose global allocator is a [`BoundedAlloc`] (elsewhere it reports 0).
/// A regression test asserts with it that hostile input does not make a decoder allocate far
/// beyond what the input holds, also below the allocator's single-allocation limit.
pub fn peak_allocation<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = METER.with(|m| {
        m.replace(Meter {
            on: true,
            live: 0,
            peak: 0,
        })
    });
    let r = f();
    let v = METER.with(|m| m.replace(before));
    (r, v.peak.max(0) as u64)
}

/// A global allocator that refuses (returns null for) any single allocation larger than its
/// limit. Use as `#[global_allocator] static A: BoundedAlloc = BoundedAlloc::new(LIMIT);` in a
/// harness binary. A refusal aborts the process (`handle_alloc_error`) after printing the
/// size asked for and the current case.
#[derive(Debug)]
pub struct BoundedAlloc {
    limit: usize,
    /// Allocations refused so far (a refusal aborts; kept for the message).
    refused: AtomicUsize,
}

impl BoundedAlloc {
    /// An allocator that refuses single allocations above `limit` bytes.
    pub const fn new(limit: usize) -> Self {
        Self {
            limit,
            refused: AtomicUsize::new(0),
        }
    }

    fn refuse(&self, size: usize) {
        // Only the first refusal reports: printing allocates (the case's description), and
        // a nested refusal would recurse.
        if self.refused.fetch_add(1, Ordering::SeqCst) == 0 {
            report(&format!(
                "fuzz: refused an allocation of {size} bytes (limit {}) while running: {}",
                self.limit,
                current_case()
            ));
        }
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator, except that requests
// above the limit get null, which the GlobalAlloc contract allows (allocation failure).
unsafe impl GlobalAlloc for BoundedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > self.limit {
            self.refuse(layout.size());
            return std::ptr::null_mut();
        }
        meter(layout.size() as i64);
        // SAFETY: the caller upholds `alloc`'s contract (non-zero size), passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > self.limit {
            self.refuse(layout.size());
            return std::ptr::null_mut();
        }
        meter(layout.size() as i64);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        meter(-(layout.size() as i64));
        // SAFETY: `ptr` was allocated by `System` (through this allocator) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > self.limit {
            self.refuse(new_size);
            return std::ptr::null_mut();
        }
        meter(new_size as i64 - layout.size() as i64);
        // SAFETY: `ptr` was allocated by `System` with `layout`; the caller upholds the rest.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Aborts the process if a case runs longer than its limit. Call [`Watchdog::pet`] at the
/// start of every case; dropping the watchdog stops it.
#[derive(Debug)]
pub struct Watchdog {
    /// Milliseconds since `epoch` when the current case started.
    started_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    epoch: Instant,
}

impl Watchdog {
    /// Starts a watchdog that allows each case `limit`.
    pub fn start(limit: Duration) -> Self {
        let started_ms = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let epoch = Instant::now();
        let (s, st) = (started_ms.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                let now = epoch.elapsed().as_millis() as u64;
                let began = s.load(Ordering::SeqCst);
                if now.saturating_sub(began) > limit.as_millis() as u64
                    && !st.load(Ordering::SeqCst)
                {
                    report(&format!(
                        "fuzz: a case ran longer than {limit:?} (a hang): {}",
                        current_case()
                    ));
                    std::process::abort();
                }
            }
        });
        Self {
            started_ms,
            stop,
            epoch,
        }
    }

    /// Marks the start of a case.
    pub fn pet(&self) {
        self.started_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bounded_allocator_refuses_only_above_its_limit() {
        let a = BoundedAlloc::new(1 << 20);
        let small = Layout::from_size_align(4096, 8).unwrap();
        let big = Layout::from_size_align(2 << 20, 8).unwrap();
        // SAFETY: non-zero sizes; what `alloc` returns is freed with the same layout.
        unsafe {
            let p = a.alloc(small);
            assert!(!p.is_null());
            a.dealloc(p, small);
            assert!(a.alloc(big).is_null());
            assert!(a.alloc_zeroed(big).is_null());
        }
        assert_eq!(a.refused.load(Ordering::SeqCst), 2);
    }
}
