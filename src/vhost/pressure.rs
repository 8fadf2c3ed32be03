//! Whether the host's CPUs are contended, so that queue workers serving a driver at queue
//! depth 1 stop spinning for its requests.
//!
//! A worker that polls its ring after a batch holds a CPU for up to `--poll-us`. On an idle
//! host that saves the wake-up of a kick (4 KiB reads at QD1: 2.7 times qsd's rate). With
//! one core kept busy by another process, though, the spin takes the CPU the driver needs to
//! submit its next request: polling then cost 30% at QD1, 0.75 of qsd's rate (`vs_qsd`,
//! docs/benchmarks.md). Sizing the window by how long the worker slept cannot see that: the
//! spin still finds requests, only later. The kernel's pressure stall information can:
//! `/proc/pressure/cpu` counts the time some runnable task waited for a CPU. It is sampled
//! at most every [`SAMPLE_EVERY`] by whichever worker asks first. Without the file (old
//! kernels, PSI off) nothing changes. What a contended worker does instead (yield between
//! looks, or sleep) is `poll.rs`'s choice.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the pressure is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// The share of an interval in which tasks waited for a CPU above which the host counts as
/// contended (per mille). Measured on a 2-CPU host while a worker polled, 4 KiB reads: 40
/// at QD1 on an idle host (polling pays), 340 at QD1 with another process spinning and up
/// to 1000 at QD1 on two queues (polling costs), 550 at QD32 (our split threads and the
/// driver's; polling still pays: workers popping several requests a drain keep polling).
const CONTENDED_ABOVE: u64 = 250;
/// How long the host stays contended after a sample said so: without pollers the pressure
/// drops, and polling again at once would bring it back (a duty cycle of one sample in 20).
const HOLD: Duration = Duration::from_secs(1);

/// The host's CPU pressure, sampled lazily.
#[derive(Debug)]
pub(super) struct CpuPressure {
    /// `/proc/pressure/cpu`, and the last sample: (when, microseconds stalled so far).
    source: Option<Mutex<Source>>,
    /// Nanoseconds since `origin` at which the next sample is due.
    next_ns: AtomicU64,
    origin: Instant,
    contended: AtomicBool,
}

impl CpuPressure {
    /// Opens the host's pressure file (none: never contended).
    pub(super) fn open() -> CpuPressure {
        let origin = Instant::now();
        let source = File::open("/proc/pressure/cpu").ok().and_then(|file| {
            let stalled = read_stalled_us(&file)?;
            Some(Mutex::new(Source {
                file,
                at: origin,
                stalled,
                hold_until: origin,
            }))
        });
        CpuPressure {
            source,
            next_ns: AtomicU64::new(0),
            origin,
            contended: AtomicBool::new(false),
        }
    }

    /// Whether tasks waited for a CPU for much of the last interval. Cheap: a clock read and
    /// two atomic loads, and once per interval one read of the pressure file.
    pub(super) fn contended(&self) -> bool {
        let now = self.origin.elapsed().as_nanos() as u64;
        if now >= self.next_ns.load(Ordering::Relaxed) {
            self.sample(now);
        }
        self.contended.load(Ordering::Relaxed)
    }

    fn sample(&self, now: u64) {
        let Some(Ok(mut last)) = self.source.as_ref().map(Mutex::try_lock) else {
            return; // no file, or another worker is sampling
        };
        if now < self.next_ns.load(Ordering::Relaxed) {
            return;
        }
        self.next_ns
            .store(now + SAMPLE_EVERY.as_nanos() as u64, Ordering::Relaxed);
        let s = &mut *last;
        let Some(stalled) = read_stalled_us(&s.file) else {
            return;
        };
        let at = Instant::now();
        let elapsed = at.duration_since(s.at).as_micros() as u64;
        let waited = stalled.saturating_sub(s.stalled);
        (s.at, s.stalled) = (at, stalled);
        if elapsed > 0 && waited.saturating_mul(1000) / elapsed > CONTENDED_ABOVE {
            s.hold_until = at + HOLD;
        }
        self.contended.store(at < s.hold_until, Ordering::Relaxed);
    }
}

/// The pressure file and its last sample.
#[derive(Debug)]
struct Source {
    file: File,
    /// When it was read, and the microseconds stalled so far then.
    at: Instant,
    stalled: u64,
    /// The host counts as contended until then ([`HOLD`]).
    hold_until: Instant,
}

/// The "some" line's `total=` (microseconds in which some task waited for a CPU).
fn read_stalled_us(file: &File) -> Option<u64> {
    let mut buf = [0u8; 256];
    let n = file.read_at(&mut buf, 0).ok()?;
    parse_some_total(buf.get(..n)?)
}

fn parse_some_total(text: &[u8]) -> Option<u64> {
    let line = text
        .split(|&b| b == b'\n')
        .find(|l| l.starts_with(b"some "))?;
    let field = line
        .split(|&b| b == b' ')
        .find_map(|f| f.strip_prefix(b"total="))?;
    std::str::from_utf8(field).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_some_total_is_read_and_bad_text_is_none() {
        let text = b"some avg10=28.73 avg60=48.75 avg300=39.15 total=13315068871\n\
                     full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_some_total(text), Some(13_315_068_871));
        assert_eq!(parse_some_total(b"full avg10=0 total=5\n"), None);
        assert_eq!(parse_some_total(b"some avg10=0 total=x\n"), None);
        assert_eq!(parse_some_total(b""), None);
    }

    /// Two threads spinning per CPU keep tasks waiting for a CPU most of the time: the host
    /// reads as contended within a few samples. (Not the converse: tests share the machine.)
    /// Skipped where the kernel has no pressure file.
    #[test]
    fn spinning_threads_make_the_host_contended() {
        let p = CpuPressure::open();
        if p.source.is_none() {
            eprintln!("skipped: no /proc/pressure/cpu");
            return;
        }
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let spinners: Vec<_> = (0..2 * cpus)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = false;
        while Instant::now() < deadline && !seen {
            std::thread::sleep(SAMPLE_EVERY);
            seen = p.contended();
        }
        stop.store(true, Ordering::Relaxed);
        for s in spinners {
            s.join().unwrap();
        }
        assert!(
            seen,
            "twice as many spinning threads as CPUs did not read as contended"
        );
    }
}
