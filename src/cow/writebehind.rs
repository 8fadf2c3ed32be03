//! The engine's side of write-behind (`held.rs` holds the writes): holding an origin write
//! whose commit it would wait for, the committer thread that commits and lands held writes,
//! and landing them all for a FLUSH, a resize or a close.

use super::engine::{lock, stripe_of, CacheObject, STRIPES};
use super::error::{CowError, Result};
use super::held::{AfterCommit, Follow, HeldData, HeldStripe, HeldStripes, HeldWrite, HeldWrites};
use super::meta::ORIGIN_ID;
use super::stripes::STRIPE_POLL;
use super::write::{Piece, Src};
use crate::storage::AlignedBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

/// Threads landing held writes on an origin that takes direct I/O (each one write at a time).
const LANDERS: usize = 16;

impl CacheObject {
    /// Starts the committer thread (and, for an origin taking direct I/O, its landers): from
    /// now on origin writes waiting for a commit are held (module doc). It stops when the
    /// engine is dropped, which lands what is still held.
    pub fn start_write_behind(self: &Arc<Self>) -> std::io::Result<()> {
        if self.held.running.load(Ordering::Acquire) || self.cor.is_some() {
            // Started already, or a read-only origin: nothing to hold.
            return Ok(());
        }
        let landers = if self.origin.io_align().is_none() {
            0
        } else {
            LANDERS
        };
        for i in 0..landers {
            let held = self.held.clone();
            let origin = self.origin.clone();
            std::thread::Builder::new()
                .name(format!("snapblk-land{i}"))
                .spawn(move || held.lander(origin.as_ref()))?;
        }
        let engine = Arc::downgrade(self);
        let held = self.held.clone();
        std::thread::Builder::new()
            .name("snapblk-commit".into())
            .spawn(move || committer(&held, &engine))?;
        self.held.running.store(true, Ordering::Release);
        Ok(())
    }

    /// For an origin write of `src` to `[offset, offset+len)` that must wait until `epoch`
    /// is durable: holds it, keeping `stripes` until it lands (`held.rs`), when a committer
    /// runs and `stripes` are given; otherwise commits. The copy and the mapping to it must be
    /// durable before the origin changes.
    pub(super) fn commit_or_hold(
        &self,
        offset: u64,
        len: u64,
        src: Src<'_>,
        epoch: u64,
        stripes: Option<HeldStripes>,
    ) -> Result<AfterCommit> {
        let stripes = match stripes {
            Some(stripes) if self.held.accepting() => {
                let data = held_data(src);
                let chunks = (
                    offset >> self.chunk_shift,
                    (offset + len.max(1) - 1) >> self.chunk_shift,
                );
                // Past STRIPES chunks, every stripe is named.
                let named = (chunks.0..=chunks.1).take(STRIPES).map(stripe_of);
                let w = HeldWrite::new(offset, len, data, epoch, stripes, chunks);
                match self.held.hold(w, named) {
                    Ok(()) => return Ok(AfterCommit::Held),
                    Err(refused) => Some(refused.into_stripes()),
                }
            }
            other => other,
        };
        self.commit(epoch, false)?;
        Ok(AfterCommit::WriteNow(stripes))
    }

    /// For an origin write of `piece` that found stripe `i` (its chunk's) taken: holds it
    /// behind the held write keeping it, if that one spans the chunk alone and the chunk needs
    /// no copy-out since, and returns `None`; otherwise takes the stripe, urging the committer
    /// only if a held write it cannot follow keeps it. A guest's rewrites of what it just
    /// wrote then cost no commit of their own, nor cut the committer's gathering short.
    pub(super) fn follow_or_take(&self, piece: Piece<'_>, i: usize) -> Result<Option<HeldStripe>> {
        let offset = (piece.c << self.chunk_shift) + piece.inoff as u64;
        // Copied once, outside the queue's lock; given up if it is not held.
        let mut data = Some(held_data(piece.src));
        loop {
            if self.held.any() {
                let (followable, epoch) = {
                    let st = self.read_state();
                    Self::check_dev(&st.meta, ORIGIN_ID)?;
                    // Everything logged so far is durable before it lands: whatever made
                    // the chunk need no copy-out is.
                    (!st.meta.view_shared(ORIGIN_ID, piece.c), st.epoch)
                };
                let range = (offset, piece.len as u64);
                match self
                    .held
                    .follow((i, piece.c), range, followable, epoch, &mut data)
                {
                    Follow::Held => return Ok(None),
                    Follow::Urge => self.held.urge(),
                    Follow::Wait => {}
                }
            }
            // Polled: whoever keeps it may be held meanwhile, and then be followed.
            if let Some(stripe) = self.stripes[i].try_write_arc_for(STRIPE_POLL) {
                return Ok(Some(stripe));
            }
        }
    }

    /// Commits and lands every write held so far (a FLUSH, a resize, a close).
    pub(super) fn land_held(&self) -> Result<()> {
        let target = lock(&self.held.queue).seq;
        while self.held.landed_seq.load(Ordering::Acquire) < target {
            self.land_batch()?;
        }
        Ok(())
    }

    /// An error if held writes failed to land since the last time this reported one.
    pub(super) fn held_write_error(&self) -> Result<()> {
        match self.held.take_lost() {
            Some(n) => Err(CowError::Io(std::io::Error::other(format!(
                "{n} origin write(s) completed before their commit could not be written to \
                 the origin afterwards; their data is lost"
            )))),
            None => Ok(()),
        }
    }

    /// Stops the committer (the engine is closing).
    pub(super) fn stop_write_behind(&self) {
        self.held.stop();
    }

    /// Takes every write held so far, commits what they wait for, lands them. One batch at a
    /// time, so the landed sequence number only grows.
    fn land_batch(&self) -> Result<()> {
        let _one = lock(&self.held.landing);
        let (batch, upto, bytes) = self.held.take_batch();
        let n = batch.len();
        let writes = HeldWrites::writes_in(&batch);
        let mut result = Ok(());
        let failed = if n == 0 {
            0
        } else {
            match self.commit(HeldWrites::epoch_of(&batch), false) {
                Ok(()) => {
                    let parallel = !self.origin.io_align().is_none();
                    self.held.land_all(batch, self.origin.as_ref(), parallel)
                }
                Err(e) => {
                    // The engine stopped: none of them may land (their copies may not be
                    // durable), and every later request fails.
                    drop(batch);
                    result = Err(e);
                    writes
                }
            }
        };
        self.held.finish_batch(n, bytes, failed, upto);
        result
    }
}

/// What a write of `src` holds: a copy of its data, or what it puts there.
fn held_data(src: Src<'_>) -> HeldData {
    match src {
        Src::Data(buf) => HeldData::Data(AlignedBuf::from_slice(buf)),
        Src::Zeroes | Src::Trim => HeldData::Zeroes,
        Src::Discard => HeldData::Discard,
    }
}

/// The committer: waits for held writes to gather (`HeldWrites::wait_to_commit`), then
/// commits and lands them batch by batch, while its engine lives.
fn committer(held: &HeldWrites, engine: &Weak<CacheObject>) {
    while held.wait_to_commit(|| engine.strong_count() == 0).is_some() {
        // Upgraded only while a batch lands: the engine's last owner drops it, and the drop
        // lands what is left itself.
        let Some(eng) = engine.upgrade() else { return };
        if let Err(e) = eng.land_batch() {
            log::error!("held origin writes dropped: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cow::held::HELD_BYTES_MAX;
    use crate::cow::{DeviceId, OpenOptions};
    use crate::storage::Storage;
    use crate::testkit::engine::{mem_engine, CHUNK};
    use crate::testkit::storage::{CrashController, FaultyStorage, MemStorage};
    use std::sync::mpsc;
    use std::time::Duration;

    const C: usize = CHUNK as usize;

    fn started(engine: CacheObject) -> Arc<CacheObject> {
        let eng = Arc::new(engine);
        eng.start_write_behind().expect("committer thread");
        eng
    }

    fn wait_landed(eng: &CacheObject) {
        let start = std::time::Instant::now();
        while eng.held.any() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "held writes land"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// An origin write whose chunk is copied out for a snapshot completes while its commit
    /// cannot run (the committer's batch lock taken here): the origin image still holds the old data,
    /// and an origin read issued after the write waits for it. Once the commit runs, the
    /// write lands: the read returns it, the snapshot keeps the old data.
    #[test]
    fn a_held_write_completes_before_its_commit_and_is_read_once_it_lands() {
        let m = mem_engine(8).build();
        let origin = m.origin.clone();
        let eng = started(m.engine);
        eng.write(DeviceId::ORIGIN, 0, &[1u8; C]).unwrap();
        let s = eng.create_snapshot(DeviceId::ORIGIN, "s", false).unwrap();
        let committer = lock(&eng.held.landing);
        eng.write(DeviceId::ORIGIN, 512, &[2u8; 1024]).unwrap();
        assert_eq!(eng.stats().origin_writes_held, 1);
        let mut on_disk = [0u8; 1024];
        origin.read_at(&mut on_disk, 512).unwrap();
        assert_eq!(on_disk, [1u8; 1024], "not on the origin before its commit");
        let (tx, rx) = mpsc::channel();
        let e = eng.clone();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 2048];
            e.read(DeviceId::ORIGIN, 0, &mut got).unwrap();
            tx.send(got).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "the read waits for the held write"
        );
        let mut other = vec![0u8; 512];
        eng.read(s, CHUNK, &mut other).unwrap();
        drop(committer);
        let got = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the read goes on");
        reader.join().unwrap();
        assert_eq!(&got[..512], &[1u8; 512]);
        assert_eq!(&got[512..1536], &[2u8; 1024], "the held write, landed");
        assert_eq!(&got[1536..], &[1u8; 512]);
        let mut snap = vec![0u8; C];
        eng.read(s, 0, &mut snap).unwrap();
        assert_eq!(snap, vec![1u8; C], "the snapshot keeps the old data");
        eng.flush().unwrap();
        assert!(!eng.held.any());
    }

    /// The committer gathers held writes before it commits them (each commit costs two
    /// flushes), until a request meets the stripe of one and urges it. With a 30 s gather: held
    /// writes stay off the origin and nothing commits while nothing needs their chunks; an
    /// origin read of one chunk gets through within seconds with the held data. A later write
    /// of a held chunk follows the held write (held behind it, no commit), unless a snapshot
    /// taken since needs a copy-out: then it urges the commit too, and lands after it.
    #[test]
    fn the_committer_gathers_held_writes_until_a_request_waits_for_one() {
        let m = mem_engine(8).build();
        let origin = m.origin.clone();
        let eng = Arc::new(m.engine);
        eng.held.set_gather(Duration::from_secs(30));
        eng.start_write_behind().expect("committer thread");
        eng.write(DeviceId::ORIGIN, 0, &[1u8; 2 * C]).unwrap();
        let s = eng.create_snapshot(DeviceId::ORIGIN, "s", false).unwrap();
        eng.write(DeviceId::ORIGIN, 512, &[2u8; 1024]).unwrap();
        eng.write(DeviceId::ORIGIN, C as u64, &[3u8; 512]).unwrap();
        assert_eq!(eng.stats().origin_writes_held, 2);
        let commits = eng.stats().commits;
        std::thread::sleep(Duration::from_millis(300));
        let mut on_disk = [0u8; 1024];
        origin.read_at(&mut on_disk, 512).unwrap();
        assert_eq!(on_disk, [1u8; 1024], "landed before the gather ended");
        assert_eq!(eng.stats().commits, commits, "committed while gathering");

        let start = std::time::Instant::now();
        let mut got = vec![0u8; 2048];
        eng.read(DeviceId::ORIGIN, 0, &mut got).unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a read of a held chunk waited for the gather: {:?}",
            start.elapsed()
        );
        assert_eq!(&got[..512], &[1u8; 512]);
        assert_eq!(&got[512..1536], &[2u8; 1024]);

        // Both landed with that commit. Hold another on chunk 1 (a copy-out for s2), then
        // write over it: no snapshot since, so that write follows it, neither committing nor
        // landing anything.
        eng.write(DeviceId::ORIGIN, C as u64 + 512, &[4u8; 512])
            .unwrap();
        let s2 = eng.create_snapshot(DeviceId::ORIGIN, "s2", false).unwrap();
        eng.write(DeviceId::ORIGIN, C as u64, &[5u8; 512]).unwrap();
        assert_eq!(
            eng.stats().origin_writes_held,
            3,
            "held again: a new copy-out"
        );
        let commits = eng.stats().commits;
        eng.write(DeviceId::ORIGIN, C as u64, &[6u8; 1024]).unwrap();
        let stats = eng.stats();
        assert_eq!(stats.origin_writes_held, 4);
        assert_eq!(
            stats.origin_writes_followed, 1,
            "held behind the write of [5]"
        );
        assert_eq!(stats.commits, commits, "a follower commits nothing");
        let mut on_disk = [0u8; 1536];
        origin.read_at(&mut on_disk, C as u64).unwrap();
        assert_eq!(&on_disk[..512], &[3u8; 512], "nothing landed");

        // A snapshot taken since needs a copy-out with the followed data: the next write
        // cannot follow, and urges the commit instead of waiting for the gather.
        let s3 = eng.create_snapshot(DeviceId::ORIGIN, "s3", false).unwrap();
        let start = std::time::Instant::now();
        eng.write(DeviceId::ORIGIN, C as u64 + 1024, &[7u8; 512])
            .unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a write to a held chunk it cannot follow waited for the gather: {:?}",
            start.elapsed()
        );
        assert_eq!(eng.stats().origin_writes_followed, 1);
        eng.flush().unwrap();
        origin.read_at(&mut on_disk, C as u64).unwrap();
        assert_eq!(&on_disk[..1024], &[6u8; 1024], "the follower landed last");
        assert_eq!(&on_disk[1024..], &[7u8; 512]);
        let mut snap = [0u8; 1536];
        eng.read(s, C as u64, &mut snap).unwrap();
        assert_eq!(snap[..512], [1u8; 512], "s keeps its view");
        eng.read(s2, C as u64, &mut snap).unwrap();
        assert_eq!(&snap[..512], &[3u8; 512], "s2 keeps its view");
        assert_eq!(&snap[512..1024], &[4u8; 512]);
        eng.read(s3, C as u64, &mut snap).unwrap();
        assert_eq!(&snap[..1024], &[6u8; 1024], "s3 has the follower");
        assert_eq!(&snap[1024..], &[1u8; 512]);
    }

    /// A held write lands only after the copy it waited for is durable: cut the power once
    /// writes over many chunks (single, rewritten by followers, and spanning chunks) have
    /// landed, unsynced, and the
    /// snapshot still reads its point-in-time data everywhere, whatever subset of the unsynced
    /// writes the cut kept (or tore); the origin reads old or new data per sector.
    #[test]
    fn a_power_cut_after_held_writes_landed_keeps_every_snapshot_exact() {
        const CHUNKS: u64 = 16;
        let mut followed = 0;
        for seed in 0..24 {
            let ctl = CrashController::new(seed, 0);
            let origin = ctl.store(vec![7u8; CHUNKS as usize * C]);
            let cache = ctl.store(Vec::new());
            let eng = started(mem_engine(CHUNKS).on(origin.clone(), cache.clone()));
            let s = eng.create_snapshot(DeviceId::ORIGIN, "s", false).unwrap();
            eng.flush().unwrap();
            for c in 0..CHUNKS / 2 {
                eng.write(DeviceId::ORIGIN, c * CHUNK + 4096, &[c as u8 + 10; 4096])
                    .unwrap();
            }
            // Followers: the second half of each of those writes, rewritten.
            for c in 0..CHUNKS / 4 {
                eng.write(DeviceId::ORIGIN, c * CHUNK + 6144, &[c as u8 + 100; 2048])
                    .unwrap();
            }
            // Spanning chunks 8..16: one batched write.
            let wide = vec![0xeeu8; (CHUNKS / 2) as usize * C - 8192];
            eng.write(DeviceId::ORIGIN, (CHUNKS / 2) * CHUNK + 4096, &wide)
                .unwrap();
            assert!(eng.stats().origin_writes_held >= 1, "seed {seed}");
            followed += eng.stats().origin_writes_followed;
            wait_landed(&eng);
            ctl.crash_now();
            std::mem::forget(eng); // its closing flush would come after the cut
            let image = |s: &crate::testkit::storage::CrashStorage| {
                Arc::new(MemStorage::from_bytes(s.crash_image().unwrap()))
            };
            let reopened =
                CacheObject::open(image(&origin), image(&cache), OpenOptions::default()).unwrap();
            let mut snap = vec![0u8; CHUNKS as usize * C];
            reopened.read(s, 0, &mut snap).unwrap();
            assert!(snap.iter().all(|&b| b == 7), "seed {seed}: snapshot exact");
            let mut o = vec![0u8; 4096];
            for c in 0..CHUNKS / 2 {
                reopened
                    .read(DeviceId::ORIGIN, c * CHUNK + 4096, &mut o)
                    .unwrap();
                let new = c as u8 + 10;
                let rewritten = (c < CHUNKS / 4).then_some(c as u8 + 100);
                for (i, sector) in o.chunks(512).enumerate() {
                    let is = |v: u8| sector.iter().all(|&b| b == v);
                    assert!(
                        is(7) || is(new) || (i >= 4 && rewritten.is_some_and(is)),
                        "seed {seed} chunk {c}: old or new"
                    );
                }
            }
        }
        assert!(followed > 0, "no rewrite followed its held write");
    }

    /// A held write the origin refuses when it lands cannot fail its request any more: the
    /// next FLUSH of the origin fails (once), a snapshot's FLUSH does not, and it is counted.
    #[test]
    fn a_held_write_the_origin_refuses_fails_the_next_origin_flush_once() {
        let origin = FaultyStorage::new(1 << 30);
        origin.write_at(&vec![5u8; 8 * C], 0).unwrap();
        let cache = Arc::new(MemStorage::new(0));
        let eng = started(mem_engine(8).on(origin.clone(), cache));
        let s = eng.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
        origin.fail_writes_in(CHUNK..2 * CHUNK);
        eng.write(DeviceId::ORIGIN, CHUNK, &[6u8; 4096])
            .expect("completes before it lands");
        wait_landed(&eng);
        assert_eq!(eng.stats().origin_writes_lost, 1);
        eng.flush_device(s)
            .expect("a snapshot's flush is not the origin's");
        let err = eng.flush_device(DeviceId::ORIGIN).unwrap_err();
        assert!(err.to_string().contains("lost"), "{err}");
        eng.flush_device(DeviceId::ORIGIN).expect("reported once");
        origin.fail_writes_in(0..0);
        let mut snap = vec![0u8; 4096];
        eng.read(s, CHUNK, &mut snap).unwrap();
        assert_eq!(snap, vec![5u8; 4096]);
    }

    /// Past the bound, writes wait for their commit in the request, as without write-behind.
    #[test]
    fn past_the_bound_writes_wait_for_their_commit() {
        let m = mem_engine(8).build();
        let eng = started(m.engine);
        eng.create_snapshot(DeviceId::ORIGIN, "s", false).unwrap();
        lock(&eng.held.queue).bytes = HELD_BYTES_MAX;
        eng.write(DeviceId::ORIGIN, 0, &[1u8; 4096]).unwrap();
        assert_eq!(eng.stats().origin_writes_held, 0);
        assert!(eng.durable_epoch.load(Ordering::Acquire) >= eng.read_state().epoch);
        lock(&eng.held.queue).bytes = 0;
        eng.write(DeviceId::ORIGIN, CHUNK, &[1u8; 4096]).unwrap();
        assert_eq!(eng.stats().origin_writes_held, 1);
    }

    /// Writers rewriting a few chunks while snapshots are taken: writes follow held ones,
    /// are refused that after a snapshot, urge, land. Each writer owns one sector of every
    /// chunk and writes it ever larger values; every write and every creation is stamped
    /// with a global sequence number when it begins and when it returns. Afterwards the origin
    /// holds each sector's last value (followers land in order, after their leader), and each
    /// snapshot, read mid-run and again at the end (unchanged), holds at each sector a value
    /// whose write began before the creation returned, no older than the last one that
    /// returned before the creation began.
    #[test]
    fn followers_keep_every_view_under_concurrent_rewrites_and_snapshots() {
        const CHUNKS: u64 = 16;
        const WRITERS: usize = 4;
        use std::sync::atomic::AtomicU64;
        /// (value, began, returned) of each write of one sector, in order.
        type Log = Vec<(u32, u64, u64)>;
        let eng = started(mem_engine(CHUNKS).build().engine);
        eng.held.set_gather(Duration::from_millis(20));
        let clock = Arc::new(AtomicU64::new(0));
        let tick = |clock: &AtomicU64| clock.fetch_add(1, Ordering::SeqCst);
        let sector_value = |buf: &[u8]| u32::from_le_bytes(buf[..4].try_into().unwrap());
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (eng, clock) = (eng.clone(), clock.clone());
                std::thread::spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(w as u64);
                    let mut logs: Vec<Log> = vec![Vec::new(); CHUNKS as usize];
                    for value in 1..=400u32 {
                        let c = rng.u64(..CHUNKS);
                        let data: Vec<u8> = value.to_le_bytes().repeat(128);
                        let began = tick(&clock);
                        eng.write(DeviceId::ORIGIN, c * CHUNK + w as u64 * 512, &data)
                            .unwrap();
                        logs[c as usize].push((value, began, tick(&clock)));
                    }
                    logs
                })
            })
            .collect();
        // (id, began, returned, content read right after)
        let mut snaps = Vec::new();
        for i in 0..40 {
            let began = tick(&clock);
            let s = eng
                .create_snapshot(DeviceId::ORIGIN, &format!("s{i}"), false)
                .unwrap();
            let returned = tick(&clock);
            let mut content = vec![0u8; CHUNKS as usize * C];
            eng.read(s, 0, &mut content).unwrap();
            snaps.push((s, began, returned, content));
            std::thread::sleep(Duration::from_millis(3));
        }
        let logs: Vec<Vec<Log>> = writers.into_iter().map(|t| t.join().unwrap()).collect();
        eng.flush().unwrap();
        let stats = eng.stats();
        assert!(
            stats.origin_writes_followed > 0,
            "no write followed: {stats:?}"
        );
        let mut origin = vec![0u8; CHUNKS as usize * C];
        eng.read(DeviceId::ORIGIN, 0, &mut origin).unwrap();
        for (w, logs) in logs.iter().enumerate() {
            for (c, log) in logs.iter().enumerate() {
                let at = c * C + w * 512;
                let last = log.last().map_or(0, |e| e.0);
                assert_eq!(
                    sector_value(&origin[at..]),
                    last,
                    "origin, writer {w} chunk {c}"
                );
                for (s, began, returned, first) in &snaps {
                    let mut now = vec![0u8; 512];
                    eng.read(*s, at as u64, &mut now).unwrap();
                    assert_eq!(&now[..], &first[at..at + 512], "snapshot {s:?} changed");
                    let v = sector_value(&now);
                    let floor = log.iter().filter(|e| e.2 < *began).map(|e| e.0).next_back();
                    let possible = v == floor.unwrap_or(0)
                        || log
                            .iter()
                            .any(|e| e.0 == v && e.1 < *returned && Some(v) > floor);
                    assert!(
                        possible,
                        "snapshot {s:?} writer {w} chunk {c}: {v}, floor {floor:?}, created \
                         {began}..{returned}, writes {log:?}"
                    );
                }
            }
        }
        // The sectors no writer owns kept their zeros everywhere.
        for c in 0..CHUNKS as usize {
            assert!(origin[c * C + WRITERS * 512..(c + 1) * C]
                .iter()
                .all(|&b| b == 0));
        }
    }

    /// Followers wait for their leader's commit like it: with the commit held off (the
    /// committer's batch lock taken here), neither a first touch nor the writes that follow
    /// it reach the origin, a rewrite of the same range replaces the last one held (no more
    /// bytes held), and an engine opened on what was written so far reads the snapshot exact
    /// and the origin old. Once the commit runs, they land in order.
    #[test]
    fn followers_wait_for_their_leaders_commit_and_land_after_it_in_order() {
        let ctl = CrashController::new(7, 0);
        let origin = ctl.store(vec![7u8; 4 * C]);
        let cache = ctl.store(Vec::new());
        let eng = started(mem_engine(4).on(origin.clone(), cache.clone()));
        let s = eng.create_snapshot(DeviceId::ORIGIN, "s", false).unwrap();
        eng.flush().unwrap();
        let committer = lock(&eng.held.landing);
        eng.write(DeviceId::ORIGIN, 0, &[1u8; 1024]).unwrap();
        eng.write(DeviceId::ORIGIN, 512, &[2u8; 1024]).unwrap();
        let bytes = lock(&eng.held.queue).bytes;
        for v in 3..=9u8 {
            eng.write(DeviceId::ORIGIN, 512, &[v; 1024]).unwrap();
        }
        let stats = eng.stats();
        assert_eq!(stats.origin_writes_held, 9);
        assert_eq!(stats.origin_writes_followed, 8);
        assert_eq!(
            lock(&eng.held.queue).bytes,
            bytes,
            "rewrites replace, not add"
        );
        let mut raw = vec![0u8; C];
        origin.read_at(&mut raw, 0).unwrap();
        assert_eq!(raw, vec![7u8; C], "nothing on the origin before the commit");

        // Stopped now, with all that was written on disk: the snapshot exact, the origin old.
        let image = |st: &crate::testkit::storage::CrashStorage| {
            Arc::new(MemStorage::from_bytes(st.current_image()))
        };
        let reopened =
            CacheObject::open(image(&origin), image(&cache), OpenOptions::default()).unwrap();
        let mut got = vec![0u8; C];
        reopened.read(s, 0, &mut got).unwrap();
        assert_eq!(got, vec![7u8; C]);
        reopened.read(DeviceId::ORIGIN, 0, &mut got).unwrap();
        assert_eq!(got, vec![7u8; C]);

        drop(committer);
        eng.flush().unwrap();
        origin.read_at(&mut raw, 0).unwrap();
        assert_eq!(&raw[..512], &[1u8; 512]);
        assert_eq!(
            &raw[512..1536],
            &[9u8; 1024],
            "the last rewrite landed last"
        );
        assert!(raw[1536..].iter().all(|&b| b == 7));
        eng.read(s, 0, &mut got).unwrap();
        assert_eq!(got, vec![7u8; C]);
    }

    /// One chunk's followers are bounded: with a 30 s gather, MAX_FOLLOWERS writes of other
    /// ranges follow a held write, and the next one urges the commit instead (it gets through
    /// within seconds, one commit later), then is held anew.
    #[test]
    fn past_max_followers_a_write_urges_the_commit() {
        use crate::cow::held::MAX_FOLLOWERS;
        let eng = started(mem_engine(4).build().engine);
        eng.held.set_gather(Duration::from_secs(30));
        eng.create_snapshot(DeviceId::ORIGIN, "s", false).unwrap();
        eng.write(DeviceId::ORIGIN, 0, &[1u8; 512]).unwrap();
        let commits = eng.stats().commits;
        for i in 0..MAX_FOLLOWERS as u64 {
            // Each range unlike the one before, so none replaces the last.
            let data = vec![i as u8; 512 + 512 * (i % 2) as usize];
            eng.write(DeviceId::ORIGIN, 512 + i % 4 * 512, &data)
                .unwrap();
        }
        assert_eq!(eng.stats().origin_writes_followed, MAX_FOLLOWERS as u64);
        assert_eq!(eng.stats().commits, commits, "followers commit nothing");
        let start = std::time::Instant::now();
        eng.write(DeviceId::ORIGIN, 3072, &[0xaa; 512]).unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the write past the bound waited for the gather: {:?}",
            start.elapsed()
        );
        assert_eq!(eng.stats().origin_writes_followed, MAX_FOLLOWERS as u64);
        assert!(eng.stats().commits > commits, "it urged a commit");
        eng.flush().unwrap();
        let mut got = [0u8; 512];
        eng.read(DeviceId::ORIGIN, 3072, &mut got).unwrap();
        assert_eq!(got, [0xaa; 512]);
    }

    /// A request waiting for a stripe urges again while it waits: here whoever keeps the stripe
    /// (a request, played by the test) is held only after the committer took the batch the
    /// reader's first urge was for. With a 30 s gather, the reader still gets through within
    /// seconds, with the held data.
    #[test]
    fn a_waiter_urges_again_when_the_stripe_is_held_after_its_first_urge() {
        let eng = started(mem_engine(4).build().engine);
        eng.held.set_gather(Duration::from_secs(30));
        eng.create_snapshot(DeviceId::ORIGIN, "s", false).unwrap();
        // Something held, so that origin reads take stripes and urges count.
        eng.write(DeviceId::ORIGIN, 2 * CHUNK, &[1u8; 512]).unwrap();
        assert!(eng.held.any());
        // A "request" takes chunk 1's stripe.
        let stripe = eng.write_stripe_arc(stripe_of(1));
        let (tx, rx) = mpsc::channel();
        let e = eng.clone();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 512];
            e.read(DeviceId::ORIGIN, CHUNK, &mut got).unwrap();
            tx.send(got).unwrap();
        });
        // The reader's first urge lands chunk 2's write.
        wait_landed(&eng);
        // Now the "request" is held, keeping the stripe, in a fresh gather.
        let w = HeldWrite::new(
            CHUNK,
            512,
            HeldData::Data(AlignedBuf::from_slice(&[9u8; 512])),
            0,
            HeldStripes::One(stripe),
            (1, 1),
        );
        assert!(eng.held.hold(w, std::iter::once(stripe_of(1))).is_ok());
        let got = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the reader urged again instead of waiting out the gather");
        reader.join().unwrap();
        assert_eq!(got, vec![9u8; 512]);
    }
}
