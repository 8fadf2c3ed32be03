//! Rate-limited logging: a `log::Log` around env_logger that lets each call site write a
//! burst of lines, then one a second, and says how many it dropped.
//!
//! Every message counts, ours and the rust-vmm crates' alike: a hostile frontend that makes a
//! library log on each of its requests (virtio-queue's "Iterator error", "Failed to read from
//! memory") must not fill the disk. A call site is its target, file and line.

use log::{Log, Metadata, Record};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a call site may write at once.
const BURST: u32 = 10;
/// After a burst, one line per this long.
const REFILL: Duration = Duration::from_secs(1);
/// Call sites remembered; past this, those with a full budget are forgotten.
const MAX_SITES: usize = 1024;

/// One call site's budget.
#[derive(Debug, Clone, Copy)]
struct Budget {
    lines: u32,
    /// When `lines` was last refilled.
    since: Instant,
    /// Lines dropped since the last one written.
    dropped: u64,
}

/// Whether a line may be written.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// Write it, saying that `dropped` lines of its site were dropped before it.
    Write {
        dropped: u64,
    },
    Drop,
}

/// The budgets of every call site seen.
#[derive(Debug, Default)]
struct Limiter {
    sites: HashMap<u64, Budget>,
}

impl Limiter {
    fn admit(&mut self, site: u64, now: Instant) -> Admit {
        if self.sites.len() >= MAX_SITES && !self.sites.contains_key(&site) {
            // Forget the sites whose budget is full again; if all are busy, all of them (the
            // call sites of a program are far fewer: this only bounds the memory).
            let full = REFILL * BURST;
            self.sites
                .retain(|_, b| b.dropped > 0 || now.saturating_duration_since(b.since) < full);
            if self.sites.len() >= MAX_SITES {
                self.sites.clear();
            }
        }
        let b = self.sites.entry(site).or_insert(Budget {
            lines: BURST,
            since: now,
            dropped: 0,
        });
        let refills = now.saturating_duration_since(b.since).as_secs_f64() / REFILL.as_secs_f64();
        if refills >= 1.0 {
            b.lines = BURST.min(b.lines.saturating_add(refills as u32));
            b.since = now;
        }
        if b.lines == 0 {
            b.dropped += 1;
            return Admit::Drop;
        }
        b.lines -= 1;
        Admit::Write {
            dropped: std::mem::take(&mut b.dropped),
        }
    }
}

/// `inner`, with every call site's lines rate-limited.
pub struct RateLimited<L> {
    inner: L,
    limiter: Mutex<Limiter>,
}

impl<L: Log> RateLimited<L> {
    pub fn new(inner: L) -> Self {
        RateLimited {
            inner,
            limiter: Mutex::new(Limiter::default()),
        }
    }
}

fn site(record: &Record<'_>) -> u64 {
    let mut h = DefaultHasher::new();
    record.target().hash(&mut h);
    record.file().hash(&mut h);
    record.line().hash(&mut h);
    h.finish()
}

impl<L: Log> Log for RateLimited<L> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        let admit = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(site(record), Instant::now());
        match admit {
            Admit::Drop => {}
            Admit::Write { dropped: 0 } => self.inner.log(record),
            Admit::Write { dropped } => self.inner.log(
                &Record::builder()
                    .metadata(record.metadata().clone())
                    .args(format_args!(
                        "{} [{dropped} more like this dropped]",
                        record.args()
                    ))
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
        }
    }

    fn flush(&self) {
        self.inner.flush()
    }
}

/// Installs `inner`, rate-limited, as the process's logger (once; later calls do nothing).
pub fn install(inner: env_logger::Logger) {
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(RateLimited::new(inner))).is_ok() {
        log::set_max_level(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_gets_a_burst_then_one_line_a_second_and_hears_of_the_rest() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.admit(1, t0), Admit::Write { dropped: 0 });
        }
        for _ in 0..1000 {
            assert_eq!(l.admit(1, t0), Admit::Drop);
        }
        // Another site is not affected.
        assert_eq!(l.admit(2, t0), Admit::Write { dropped: 0 });
        let t1 = t0 + REFILL;
        assert_eq!(l.admit(1, t1), Admit::Write { dropped: 1000 });
        assert_eq!(l.admit(1, t1), Admit::Drop);
        // A quiet site gets its burst back.
        let t2 = t1 + REFILL * BURST;
        for _ in 0..BURST {
            assert!(matches!(l.admit(1, t2), Admit::Write { .. }));
        }
    }

    #[test]
    fn the_sites_remembered_are_bounded() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        for site in 0..10 * MAX_SITES as u64 {
            assert!(matches!(l.admit(site, t0), Admit::Write { .. }));
        }
        assert!(l.sites.len() <= MAX_SITES + 1);
    }

    struct Count(std::sync::atomic::AtomicUsize);
    impl Log for Count {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn log(&self, _: &Record<'_>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        fn flush(&self) {}
    }

    #[test]
    fn a_flood_from_one_line_of_code_writes_a_burst() {
        let logger = RateLimited::new(Count(Default::default()));
        for i in 0..100_000 {
            logger.log(
                &Record::builder()
                    .args(format_args!("Iterator error {i}"))
                    .target("virtio_queue::queue")
                    .file(Some("queue.rs"))
                    .line(Some(573))
                    .build(),
            );
        }
        let written = logger.inner.0.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            (BURST as usize..BURST as usize + 5).contains(&written),
            "{written}"
        );
    }
}
