//! The engine's side of write-behind (`held.rs` holds the writes): holding an origin write
//! whose commit it would wait for, the committer thread that commits and lands held writes,
//! and landing them all for a FLUSH, a resize or a close.

use super::engine::{lock, CacheObject};
use super::error::{CowError, Result};
use super::held::{AfterCommit, HeldData, HeldStripes, HeldWrite, HeldWrites};
use super::write::Src;
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
                let data = match src {
                    Src::Data(buf) => HeldData::Data(AlignedBuf::from_slice(buf)),
                    Src::Zeroes | Src::Trim => HeldData::Zeroes,
                    Src::Discard => HeldData::Discard,
                };
                match self
                    .held
                    .hold(HeldWrite::new(offset, len, data, epoch, stripes))
                {
                    Ok(()) => return Ok(AfterCommit::Held),
                    Err(refused) => Some(refused.into_stripes()),
                }
            }
            other => other,
        };
        self.commit(epoch, false)?;
        Ok(AfterCommit::WriteNow(stripes))
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
                    n as u64
                }
            }
        };
        self.held.finish_batch(n, bytes, failed, upto);
        result
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
    /// origin read of one chunk and a later write to the other each get through within
    /// seconds, the read with the held data, the write after the held one landed.
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

        // Both landed with that commit; hold another on chunk 1, then write over it.
        eng.write(DeviceId::ORIGIN, C as u64 + 512, &[4u8; 512])
            .unwrap();
        let s2 = eng.create_snapshot(DeviceId::ORIGIN, "s2", false).unwrap();
        eng.write(DeviceId::ORIGIN, C as u64, &[5u8; 512]).unwrap();
        assert_eq!(
            eng.stats().origin_writes_held,
            3,
            "held again: a new copy-out"
        );
        let start = std::time::Instant::now();
        eng.write(DeviceId::ORIGIN, C as u64, &[6u8; 1024]).unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a write to a held chunk waited for the gather: {:?}",
            start.elapsed()
        );
        wait_landed(&eng);
        let mut on_disk = [0u8; 1536];
        origin.read_at(&mut on_disk, C as u64).unwrap();
        assert_eq!(
            &on_disk[..1024],
            &[6u8; 1024],
            "the later write landed last"
        );
        assert_eq!(&on_disk[1024..], &[1u8; 512]);
        let mut snap = [0u8; 1024];
        eng.read(s, C as u64, &mut snap).unwrap();
        assert_eq!(snap[..512], [1u8; 512], "s keeps its view");
        eng.read(s2, C as u64, &mut snap).unwrap();
        assert_eq!(&snap[..512], &[3u8; 512], "s2 keeps its view");
        assert_eq!(&snap[512..], &[4u8; 512]);
    }

    /// A held write lands only after the copy it waited for is durable: cut the power once
    /// writes over many chunks (single and spanning chunks) have landed, unsynced, and the
    /// snapshot still reads its point-in-time data everywhere, whatever subset of the unsynced
    /// writes the cut kept (or tore); the origin reads old or new data per sector.
    #[test]
    fn a_power_cut_after_held_writes_landed_keeps_every_snapshot_exact() {
        const CHUNKS: u64 = 16;
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
            // Spanning chunks 8..16: one batched write.
            let wide = vec![0xeeu8; (CHUNKS / 2) as usize * C - 8192];
            eng.write(DeviceId::ORIGIN, (CHUNKS / 2) * CHUNK + 4096, &wide)
                .unwrap();
            assert!(eng.stats().origin_writes_held >= 1, "seed {seed}");
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
                for sector in o.chunks(512) {
                    assert!(
                        sector.iter().all(|&b| b == 7) || sector.iter().all(|&b| b == new),
                        "seed {seed} chunk {c}: old or new"
                    );
                }
            }
        }
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
}
