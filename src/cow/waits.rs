//! Waiting for space (docs/engine.md, "Waiting for space"): writes to writable snapshots that
//! find no space follow the on-full policy ([`OnFull::Error`]: fail at once; [`OnFull::Wait`]:
//! wait until space is freed or the limit raised, then try again, failing after a timeout,
//! like dm-thin's queue mode), and callers may wait for the cache to run low on space
//! (`snapblk wait low-space`). The waiting room itself is `waitlist.rs`.
//!
//! A waiter holds no engine lock (no stripe, not the state, not the journal): it sleeps on a
//! condition variable signalled whenever blocks are freed, the limit changes or the cache
//! crosses into low space, and looks again at least once a second (the host file system may
//! gain space without telling). So origin writes, reads, other snapshots and the control
//! socket go on while it waits, and a delete or a resize there wakes it.

use super::engine::CacheObject;
use super::error::{CowError, DeviceId, Result};
use super::waitlist::{GaveUp, OnFull, RECHECK};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl CacheObject {
    /// Sets what writes to writable snapshots do when they find no space.
    pub fn set_on_full(&self, policy: OnFull) {
        self.waits.set_policy(policy);
    }

    /// What writes to writable snapshots do when they find no space.
    pub fn on_full(&self) -> OnFull {
        self.waits.policy()
    }

    /// Requests waiting for space now.
    pub fn waiting_requests(&self) -> u64 {
        self.waits.waiting()
    }

    /// Space may have come back (blocks freed, the limit changed) or the cache went low on
    /// space: waiters look again.
    pub(super) fn space_changed(&self) {
        self.waits.bump();
    }

    /// Makes the requests of `dev` waiting for space now fail at once (before its server
    /// stops: a stop waits for the requests in flight). Later ones wait as usual.
    pub fn cancel_waits(&self, dev: DeviceId) {
        self.waits.cancel(dev.0);
    }

    /// From now on no request waits for space, and those waiting fail at once; waits for low
    /// space end. For shutdown.
    pub fn close_waits(&self) {
        self.waits.close();
    }

    /// Runs `op` (a change of `dev`); if it finds no space and `dev` is a snapshot, applies
    /// the on-full policy: fail, or wait for space and run it again until it succeeds, fails
    /// otherwise, or the wait times out. Changes are idempotent, so running one again after a
    /// part of it was done is harmless.
    pub(super) fn with_space_wait(
        &self,
        dev: DeviceId,
        mut op: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        let mut seen = self.waits.generation();
        match op() {
            Err(CowError::NoSpace) if dev != DeviceId::ORIGIN => {}
            done => return done,
        }
        let Some(waiter) = self.waits.enter(dev.0) else {
            self.counters.no_space.fetch_add(1, Ordering::Relaxed);
            return Err(CowError::NoSpace);
        };
        self.counters.space_waits.fetch_add(1, Ordering::Relaxed);
        loop {
            match waiter.wait(seen) {
                Ok(generation) => seen = generation,
                Err(why) => {
                    self.counters.no_space.fetch_add(1, Ordering::Relaxed);
                    if let GaveUp::Timeout = why {
                        self.counters
                            .space_wait_timeouts
                            .fetch_add(1, Ordering::Relaxed);
                        self.waits.note_timeout(dev.0);
                    }
                    return Err(CowError::NoSpace);
                }
            }
            match op() {
                Err(CowError::NoSpace) => {}
                done => return done,
            }
        }
    }

    /// Whether free space is below the low-space threshold now.
    pub fn low_space(&self) -> bool {
        self.space_now(&self.read_state()).low()
    }

    /// Waits until the cache is low on space (true), or `timeout` passes or the engine stops
    /// waiting (false). Returns at once if it is low already.
    pub fn wait_low_space(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.waits.generation();
            if self.low_space() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || self.waits.closed() {
                return false;
            }
            self.waits.sleep(seen, (deadline - now).min(RECHECK));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cow::MAX_SPACE_WAITERS;
    use crate::testkit::engine::{mem_engine, CHUNK};
    use std::sync::Arc;
    use std::thread;

    const C: usize = CHUNK as usize;

    /// An engine whose cache is full: `w` (writable) could not write chunk `next`; `hog`
    /// (writable too) holds blocks a delete would free. Policy: wait `secs`.
    fn full_engine(secs: f64) -> (Arc<CacheObject>, DeviceId, DeviceId, u64) {
        let spec = mem_engine(64);
        let data = spec.data_offset();
        let eng = Arc::new(spec.max_size(data + 24 * CHUNK).build().engine);
        let w = eng.create_snapshot(DeviceId::ORIGIN, "w", true).unwrap();
        let hog = eng.create_snapshot(DeviceId::ORIGIN, "hog", true).unwrap();
        // Preserved now, so rewriting it later needs no space.
        eng.write(DeviceId::ORIGIN, 50 * CHUNK, &[9u8; C]).unwrap();
        for c in 32..40 {
            eng.write(hog, c * CHUNK, &[1u8; C]).unwrap();
        }
        let mut next = 0;
        while eng.write(w, next * CHUNK, &[2u8; C]).is_ok() {
            next += 1;
        }
        eng.set_on_full(OnFull::Wait(Duration::from_secs_f64(secs)));
        (eng, w, hog, next)
    }

    fn spawn_write(
        eng: &Arc<CacheObject>,
        dev: DeviceId,
        chunk: u64,
    ) -> thread::JoinHandle<Result<()>> {
        let eng = eng.clone();
        thread::spawn(move || eng.write(dev, chunk * CHUNK, &[3u8; C]))
    }

    fn wait_for_waiters(eng: &CacheObject, n: u64) {
        let start = Instant::now();
        while eng.waiting_requests() != n {
            assert!(start.elapsed() < Duration::from_secs(10), "no {n} waiters");
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// A write that finds no space waits holding no lock: meanwhile the origin is written, the
    /// snapshots are read, stats are taken and another snapshot is deleted, which frees
    /// blocks and lets the write go in.
    #[test]
    fn a_write_waits_for_space_and_goes_in_when_a_delete_frees_some() {
        let (eng, w, hog, next) = full_engine(30.0);
        let started = Instant::now();
        let waiting = spawn_write(&eng, w, next);
        wait_for_waiters(&eng, 1);
        // The origin, reads and the control plane are not blocked.
        eng.write(DeviceId::ORIGIN, 50 * CHUNK, &[4u8; C]).unwrap();
        let mut buf = vec![0u8; C];
        eng.read(w, 0, &mut buf).unwrap();
        assert_eq!(buf, [2u8; C]);
        let st = eng.stats();
        assert_eq!((st.waiting_requests, st.on_full.as_str()), (1, "wait=30"));
        assert!(!waiting.is_finished());
        eng.delete_snapshot(hog).unwrap();
        waiting
            .join()
            .unwrap()
            .expect("the write went in once space was freed");
        assert!(started.elapsed() < Duration::from_secs(10));
        eng.read(w, next * CHUNK, &mut buf).unwrap();
        assert_eq!(buf, [3u8; C]);
        let st = eng.stats();
        assert_eq!(
            (st.waiting_requests, st.space_waits, st.no_space_errors),
            (0, 1, 1)
        );
    }

    /// Raising the limit wakes a waiting write too; a write that waits until its timeout
    /// fails; the error policy fails at once.
    #[test]
    fn a_wait_ends_with_a_resize_or_its_timeout() {
        let (eng, w, _hog, next) = full_engine(0.3);
        let started = Instant::now();
        assert!(matches!(
            eng.write(w, next * CHUNK, &[3u8; C]),
            Err(CowError::NoSpace)
        ));
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(eng.stats().space_wait_timeouts, 1);

        eng.set_on_full(OnFull::Wait(Duration::from_secs(30)));
        let waiting = spawn_write(&eng, w, next);
        wait_for_waiters(&eng, 1);
        let limit = eng.cache_info().max_size;
        eng.resize(crate::cow::SizeLimit::Fixed(limit + 8 * CHUNK))
            .unwrap();
        waiting.join().unwrap().unwrap();

        eng.set_on_full(OnFull::Error);
        let started = Instant::now();
        let mut c = next + 1;
        while eng.write(w, c * CHUNK, &[3u8; C]).is_ok() {
            c += 1;
        }
        assert!(started.elapsed() < Duration::from_millis(200), "no wait");
    }

    /// Cancelling a device's waits, or closing them all, ends the waits at once; no more than
    /// [`MAX_SPACE_WAITERS`] wait at a time; waiting for low space returns when it is low
    /// (at once here) and times out when it is not.
    #[test]
    fn waits_end_when_cancelled_and_are_bounded() {
        let (eng, w, hog, next) = full_engine(30.0);
        let waiters: Vec<_> = (0..MAX_SPACE_WAITERS)
            .map(|k| spawn_write(&eng, w, next + k))
            .collect();
        wait_for_waiters(&eng, MAX_SPACE_WAITERS);
        let started = Instant::now();
        assert!(matches!(
            eng.write(hog, 0, &[5u8; C]),
            Err(CowError::NoSpace)
        ));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "one too many fails at once"
        );
        assert!(
            eng.wait_low_space(Duration::from_secs(5)),
            "a full cache is low"
        );
        eng.cancel_waits(hog);
        thread::sleep(Duration::from_millis(50));
        assert_eq!(
            eng.waiting_requests(),
            MAX_SPACE_WAITERS,
            "other devices' waits go on"
        );
        eng.cancel_waits(w);
        for t in waiters {
            assert!(matches!(t.join().unwrap(), Err(CowError::NoSpace)));
        }
        assert!(started.elapsed() < Duration::from_secs(10));

        let roomy = mem_engine(16).build().engine;
        let started = Instant::now();
        assert!(!roomy.wait_low_space(Duration::from_millis(200)));
        assert!(started.elapsed() >= Duration::from_millis(200));
        eng.close_waits();
        let started = Instant::now();
        assert!(eng.write(w, 60 * CHUNK, &[6u8; C]).is_err());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "closed: no more waits"
        );
    }

    /// A waiter for low space is woken when a write takes the cache below the threshold.
    #[test]
    fn waiting_for_low_space_returns_when_the_cache_crosses_into_it() {
        let spec = mem_engine(64);
        let data = spec.data_offset();
        let eng = Arc::new(
            spec.max_size(data + 40 * CHUNK)
                .low_space(10 * CHUNK)
                .build()
                .engine,
        );
        let w = eng.create_snapshot(DeviceId::ORIGIN, "w", true).unwrap();
        assert!(!eng.low_space());
        let waiter = {
            let eng = eng.clone();
            thread::spawn(move || eng.wait_low_space(Duration::from_secs(30)))
        };
        thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished());
        let started = Instant::now();
        let mut c = 0;
        while !eng.low_space() {
            eng.write(w, c * CHUNK, &[1u8; C]).unwrap();
            c += 1;
        }
        assert!(waiter.join().unwrap());
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "woken, not polled"
        );
        assert!(eng.stats().low_space);
    }
}
