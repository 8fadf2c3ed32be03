//! Hydration: a read-only origin's chunks fetched in the background until all are local
//! (`snapblk origin hydrate`), so the cache object stops needing the origin's server.
//!
//! One thread walks the chunks in order, skipping those already local (a lock-free look),
//! and fetches the others through the read path's fetch table (so a chunk a VM reads at the
//! same moment is fetched once). It is rate-limited (bytes fetched per second), stoppable,
//! and persistent: the request is kept as the origin's attribute [`HYDRATE_ATTR`], so a
//! restarted daemon resumes it (`hydrate_resume`), skipping what is local already. It ends
//! when every chunk is local, or stops when the cache object is low on space (the last free
//! space is left to snapshot writes); while the origin's server is unreachable it waits and
//! retries the same chunk. Where it is and why it stopped are in [`HydrationInfo`].

use super::engine::{lock, CacheObject};
use super::error::{CowError, DeviceId, Result};
use super::format::{entry_to_block, ENTRY_UNMAPPED};
use super::origin_copies::{CopyOnRead, HydrationInfo, Outcome};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// The origin's attribute that keeps a hydration request across restarts: the rate in
/// bytes per second, `0` for no limit.
pub const HYDRATE_ATTR: &str = "hydrate";

/// How long hydration waits before trying a chunk the origin failed to deliver again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What one pass of the walk ended with.
enum Walked {
    Done,
    Stopped,
    NoRoom,
}

impl CacheObject {
    fn cor_or_refuse(&self) -> Result<&CopyOnRead> {
        self.cor.as_deref().ok_or(CowError::Origin(
            "hydrated: it is a local image, not copied on read",
        ))
    }

    /// Starts hydrating the origin at `rate` bytes per second (0: no limit), in the
    /// background; persisted, so a restart resumes it. Replaces a hydration in progress.
    pub fn hydrate(self: &Arc<Self>, rate: u64) -> Result<()> {
        self.cor_or_refuse()?;
        self.set_device_attr(DeviceId::ORIGIN, HYDRATE_ATTR, Some(&rate.to_string()))?;
        self.start_hydration(rate);
        Ok(())
    }

    /// Resumes the hydration a previous run was asked for (the origin's [`HYDRATE_ATTR`]),
    /// if any.
    pub fn hydrate_resume(self: &Arc<Self>) {
        if self.cor.is_none() {
            return;
        }
        let rate = self.device(DeviceId::ORIGIN).and_then(|d| {
            d.attrs
                .get(HYDRATE_ATTR)
                .map(|r| r.parse::<u64>().unwrap_or(0))
        });
        if let Some(rate) = rate {
            log::info!("resuming the origin's hydration");
            self.start_hydration(rate);
        }
    }

    /// Stops hydrating (and forgets the request: a restart does not resume it). Returns at
    /// once; the thread ends after the chunk it is fetching.
    pub fn hydrate_stop(&self) -> Result<()> {
        let cor = self.cor_or_refuse()?;
        self.set_device_attr(DeviceId::ORIGIN, HYDRATE_ATTR, None)?;
        let mut s = lock(&cor.hydrator);
        if let Some((stop, _)) = s.thread.take() {
            stop.store(true, Ordering::Relaxed);
            s.info.state = "stopped".into();
            log::info!(
                "hydration stopped at byte {} of the origin",
                s.info.position
            );
        }
        Ok(())
    }

    /// Stops the hydration thread for a shutdown, keeping the request (the next start
    /// resumes it), and waits for it (at most one fetch, bounded by the origin's timeout).
    pub fn hydrate_pause(&self) {
        let Some(cor) = self.cor.as_deref() else {
            return;
        };
        let thread = {
            let mut s = lock(&cor.hydrator);
            let t = s.thread.take();
            if t.is_some() {
                s.info.state = "paused".into();
            }
            t
        };
        if let Some((stop, handle)) = thread {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
    }

    /// Where hydration is (`None` unless the origin is copied on read).
    pub fn hydration(&self) -> Option<HydrationInfo> {
        let cor = self.cor.as_deref()?;
        let mut info = lock(&cor.hydrator).info.clone();
        if info.state.is_empty() {
            info.state = "off".into();
        }
        Some(info)
    }

    fn start_hydration(self: &Arc<Self>, rate: u64) {
        let Some(cor) = self.cor.as_deref() else {
            return;
        };
        let stop = Arc::new(AtomicBool::new(false));
        let weak = Arc::downgrade(self);
        let flag = stop.clone();
        // Held while the thread starts: its first report comes after this one.
        let mut s = lock(&cor.hydrator);
        if let Some((old, _)) = s.thread.take() {
            old.store(true, Ordering::Relaxed);
        }
        s.info = HydrationInfo {
            state: "running".into(),
            rate,
            ..HydrationInfo::default()
        };
        let spawned = std::thread::Builder::new()
            .name("snapblk-hydrate".into())
            .spawn(move || hydrate_thread(weak, flag, rate));
        match spawned {
            Ok(handle) => {
                s.thread = Some((stop, handle));
                log::info!(
                    "hydrating the origin in the background ({})",
                    if rate == 0 {
                        "no rate limit".to_string()
                    } else {
                        format!("{rate} bytes/s")
                    }
                );
            }
            Err(e) => s.info.state = format!("stopped: cannot start a thread: {e}"),
        }
    }

    /// Updates what hydration reports, under the hydrator's lock (never held across I/O).
    fn hydration_note(&self, f: impl FnOnce(&mut HydrationInfo)) {
        if let Some(cor) = self.cor.as_deref() {
            f(&mut lock(&cor.hydrator).info);
        }
    }

    /// One chunk of the walk: `Ok(bytes fetched)` once it is local, `Err(None)` when it
    /// cannot be kept (no room), `Err(Some(error))` when the origin did not deliver it.
    fn hydrate_chunk(&self, cor: &CopyOnRead, c: u64) -> std::result::Result<u64, Option<String>> {
        match self.fetch(cor, c) {
            Ok(Outcome::Local(e)) => Ok(if entry_to_block(e).is_some() {
                self.chunk_len(c) as u64
            } else {
                0
            }),
            Ok(Outcome::Data(_)) => Err(None),
            Ok(Outcome::Failed(_, msg)) => Err(Some(msg)),
            Err(e) => Err(Some(e.to_string())),
        }
    }
}

/// The hydration thread: walks the chunks from the first one not local, at `rate`.
fn hydrate_thread(engine: Weak<CacheObject>, stop: Arc<AtomicBool>, rate: u64) {
    let started = Instant::now();
    let mut fetched = 0u64;
    let mut c = 0u64;
    let walked = loop {
        if stop.load(Ordering::Relaxed) {
            break Walked::Stopped;
        }
        let Some(eng) = engine.upgrade() else {
            break Walked::Stopped;
        };
        let Some(cor) = eng.cor.as_deref() else {
            break Walked::Stopped;
        };
        while c < eng.origin_chunks() && cor.local(c) != ENTRY_UNMAPPED {
            c += 1;
        }
        eng.hydration_note(|i| i.position = (c << eng.chunk_shift).min(eng.origin_size()));
        if c >= eng.origin_chunks() {
            break Walked::Done;
        }
        match eng.hydrate_chunk(cor, c) {
            Ok(n) => {
                fetched += n;
                eng.hydration_note(|i| {
                    i.bytes_fetched = fetched;
                    i.last_error = None;
                });
                c += 1;
            }
            Err(None) => break Walked::NoRoom,
            Err(Some(msg)) => {
                eng.hydration_note(|i| i.last_error = Some(msg));
                drop(eng);
                pause(&stop, RETRY_AFTER);
                continue;
            }
        }
        drop(eng);
        if rate > 0 {
            let due = Duration::from_secs_f64(fetched as f64 / rate as f64);
            pause(&stop, due.saturating_sub(started.elapsed()));
        }
    };
    finish(&engine, walked, &stop);
}

/// Records how the walk ended.
fn finish(engine: &Weak<CacheObject>, walked: Walked, stop: &AtomicBool) {
    let Some(eng) = engine.upgrade() else {
        return;
    };
    match walked {
        Walked::Stopped => {}
        Walked::Done => {
            if let Err(e) = eng.set_device_attr(DeviceId::ORIGIN, HYDRATE_ATTR, None) {
                log::warn!("hydration done, but its request could not be cleared: {e}");
            }
            eng.hydration_note(|i| i.state = "done".into());
            log::info!("hydration done: every chunk of the origin is local");
            let _ = eng.flush();
        }
        Walked::NoRoom if !stop.load(Ordering::Relaxed) => {
            let msg = "stopped: the cache object is low on space";
            eng.hydration_note(|i| i.state = msg.into());
            log::warn!(
                "hydration {msg} (raise its limit with `snapblk cache resize`, then hydrate again)"
            );
        }
        Walked::NoRoom => {}
    }
}

/// Sleeps for `d`, in slices, returning early once `stop` is set.
fn pause(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}
