//! Copy-on-read of a read-only origin (a remote image: docs/engine.md, "Copy-on-read"). The
//! image never changes, so a local copy of its chunk c is valid for every device that reads
//! the image at c, for as long as the cache object lives. The local copies are the origin
//! device's own table (its entries, otherwise always empty, set by `OriginLocal` records):
//! a cache block, or zero where the image reads as zeros (a hole: neither fetched nor stored).
//!
//! - A read whose view is the origin image reads the local copy, or fetches the chunk:
//!   **one fetch per chunk** whatever the number of readers (the fetch table: the first
//!   reader of a chunk fetches it, the others wait for its outcome), with no engine lock held
//!   meanwhile (not even the chunk's stripe: the data cannot change).
//! - The fetched data is written into a new block, then (after a release fence) its record
//!   logged: a commit syncs the data before the journal names it, as for every copy.
//! - A chunk that cannot be kept (no block, the cache low on space, the journal pressed) is
//!   served from the network all the same, and fetched again next time.

use super::engine::{CacheObject, StateGuard};
use super::error::{CowError, Result};
use super::format::{entry_block, Record, ENTRY_UNMAPPED, ENTRY_ZERO};
use super::meta::View;
use super::origin_copies::{CopyOnRead, Outcome};
use std::io;
use std::sync::atomic::{fence, Ordering};

/// Queued records past this many bytes are committed by the reader that logged the last one
/// (reads alone would otherwise never commit what they fetched).
const COMMIT_QUEUED_BYTES: usize = 64 << 10;

/// The error a failed fetch is for each reader that needed it.
fn failed(kind: io::ErrorKind, msg: &str) -> CowError {
    CowError::Io(io::Error::new(kind, msg.to_string()))
}

impl CacheObject {
    /// Reads `buf` at `inoff` of the origin's chunk `c`, for a device whose view there is the
    /// origin image: from its local copy, or fetched (and kept if there is room). Holds no
    /// lock across the network I/O. Returns whether it was local (for the caller to count
    /// once per request, not per chunk: the counter is shared).
    pub(super) fn read_origin_chunk(
        &self,
        cor: &CopyOnRead,
        c: u64,
        inoff: usize,
        buf: &mut [u8],
    ) -> Result<bool> {
        let mut entry = cor.local(c);
        let local = entry != ENTRY_UNMAPPED;
        if !local {
            match self.fetch(cor, c)? {
                Outcome::Local(e) => entry = e,
                Outcome::Data(d) => {
                    let src = d
                        .get(inoff..inoff + buf.len())
                        .ok_or(CowError::OutOfRange {
                            offset: inoff as u64,
                            len: buf.len() as u64,
                        })?;
                    buf.copy_from_slice(src);
                    return Ok(false);
                }
                Outcome::Failed(kind, msg) => return Err(failed(kind, &msg)),
            }
        }
        match View::of_entry(entry) {
            View::Zero => buf.fill(0),
            View::Block(b) => self
                .cache
                .read_at(buf, self.block_offset(b) + inoff as u64)?,
            View::Origin => self
                .origin
                .read_at(buf, (c << self.chunk_shift) + inoff as u64)?,
        }
        Ok(local)
    }

    /// Counts `n` bytes read from the origin's local copies.
    #[inline]
    pub(super) fn count_local(cor: &CopyOnRead, n: u64) {
        if n > 0 {
            cor.counters.bytes_local.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Reads the origin device copied on read: chunk by chunk, its local copies or fetched.
    /// No stripe lock: nothing ever changes the origin's data.
    pub(super) fn read_origin_device(
        &self,
        cor: &CopyOnRead,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let mut done = 0usize;
        let mut local = 0u64;
        while done < buf.len() {
            let pos = offset + done as u64;
            let c = pos >> self.chunk_shift;
            let inoff = (pos & (self.chunk_size - 1)) as usize;
            let n = (self.chunk_size as usize - inoff).min(buf.len() - done);
            if self.read_origin_chunk(cor, c, inoff, &mut buf[done..done + n])? {
                local += n as u64;
            }
            done += n;
        }
        Self::count_local(cor, local);
        Ok(())
    }

    /// Chunk `c` of the origin local, or its data in hand: one fetch however many readers
    /// ask at once (the others wait for its outcome). The caller holds no engine lock. A
    /// fetch that failed is an error for every reader that waited for it.
    pub(super) fn fetch(&self, cor: &CopyOnRead, c: u64) -> Result<Outcome> {
        let outcome = match cor.join_fetch(c) {
            Err(theirs) => theirs,
            Ok(mut leader) => {
                // A fetch that ended between the caller's look and this one's start made the
                // chunk local.
                let outcome = match cor.local(c) {
                    ENTRY_UNMAPPED => self.fetch_and_keep(cor, c),
                    e => Outcome::Local(e),
                };
                leader.outcome = Some(outcome.clone());
                outcome
            }
        };
        match outcome {
            Outcome::Failed(kind, msg) => Err(failed(kind, &msg)),
            o => Ok(o),
        }
    }

    /// The fetch itself: a hole is kept as zeros without reading it; data is read, then kept
    /// in a new block if there is room.
    fn fetch_and_keep(&self, cor: &CopyOnRead, c: u64) -> Outcome {
        let off = c << self.chunk_shift;
        let len = self.chunk_len(c);
        let fail = |e: io::Error| {
            cor.counters.errors.fetch_add(1, Ordering::Relaxed);
            Outcome::Failed(e.kind(), format!("origin chunk {c}: {e}"))
        };
        let hole = match self.origin.allocation(off, len as u64) {
            Ok((hole, n)) => hole && n >= len as u64,
            Err(e) => return fail(e),
        };
        let data: Option<Vec<u8>> = if hole {
            None
        } else {
            let mut buf = vec![0u8; len];
            if let Err(e) = self.origin.read_at(&mut buf, off) {
                return fail(e);
            }
            cor.counters.fetches.fetch_add(1, Ordering::Relaxed);
            cor.counters
                .bytes_fetched
                .fetch_add(len as u64, Ordering::Relaxed);
            // Data that happens to be all zeros is kept as zeros too: no block.
            (!buf.iter().all(|&b| b == 0)).then_some(buf)
        };
        if data.is_none() {
            cor.counters.zero_chunks.fetch_add(1, Ordering::Relaxed);
        }
        match self.keep(cor, c, data.as_deref(), false) {
            Ok(Some(e)) => Outcome::Local(e),
            Ok(None) | Err(_) => {
                cor.counters.not_kept.fetch_add(1, Ordering::Relaxed);
                Outcome::Data(data.unwrap_or_else(|| vec![0u8; len]).into())
            }
        }
    }

    /// Keeps `data` (`None`: zeros) as the local copy of chunk `c` and returns its entry, or
    /// `None` if it cannot be kept now. Opportunistic keeping (reads, hydration) leaves the
    /// cache's last free space (below the low-space threshold) to snapshot writes; a
    /// `required` one (a snapshot write giving its children the origin's data) takes any
    /// block, and fails with the reason. Only one copy of a chunk is ever recorded: whoever
    /// finds one there under the state lock uses it.
    pub(super) fn keep(
        &self,
        cor: &CopyOnRead,
        c: u64,
        data: Option<&[u8]>,
        required: bool,
    ) -> Result<Option<u64>> {
        if !required && self.journal_pressed.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let mut st = self.write_state();
        match cor.local(c) {
            ENTRY_UNMAPPED => {}
            e => return Ok(Some(e)),
        }
        let Some(data) = data else {
            let epoch = st.log(Record::OriginLocal {
                chunk: c,
                entry: ENTRY_ZERO,
            })?;
            self.commit_when_queued(st, epoch);
            return Ok(Some(ENTRY_ZERO));
        };
        let Some(b) = self.alloc_data(&mut st) else {
            return if required {
                Err(CowError::NoSpace)
            } else {
                Ok(None)
            };
        };
        if !required && st.low_space_warned {
            Self::free_unused(&mut st, b);
            return Ok(None);
        }
        drop(st);
        let written = self.write_block(data, b);
        let mut st = self.write_state();
        if let Err(e) = written {
            Self::give_back(&mut st, b, &e);
            return if required { Err(e) } else { Ok(None) };
        }
        let found = cor.local(c);
        if found != ENTRY_UNMAPPED {
            Self::free_unused(&mut st, b);
            return Ok(Some(found));
        }
        // The data before the entry that names it, for lock-free readers (`CopyOnRead::local`).
        fence(Ordering::Release);
        let entry = entry_block(b);
        let epoch = st.log(Record::OriginLocal { chunk: c, entry })?;
        self.commit_when_queued(st, epoch);
        Ok(Some(entry))
    }

    /// Commits the queued records once they are many (copy-on-read logs records that no
    /// write's commit may come to take). The state lock is given back first.
    fn commit_when_queued(&self, st: StateGuard<'_>, epoch: u64) {
        let many = st.records.len() >= COMMIT_QUEUED_BYTES;
        drop(st);
        if many {
            if let Err(e) = self.commit(epoch, false) {
                log::warn!("committing the origin's local copies failed: {e}");
            }
        }
    }

    /// The entry of the origin's chunk `c` for the children of a snapshot that reads the
    /// image there and is about to change it (the write rule's step 1): its local copy,
    /// fetched and kept if it is not local yet. Fails if it cannot be kept (no space).
    pub(super) fn origin_entry_for_readers(&self, cor: &CopyOnRead, c: u64) -> Result<u64> {
        match cor.local(c) {
            ENTRY_UNMAPPED => {}
            e => return Ok(e),
        }
        match self.fetch(cor, c)? {
            Outcome::Local(e) => Ok(e),
            Outcome::Data(d) => {
                let zero = d.iter().all(|&b| b == 0);
                let kept = self.keep(cor, c, (!zero).then_some(&d[..]), true)?;
                kept.ok_or(CowError::NoSpace)
            }
            Outcome::Failed(kind, msg) => Err(failed(kind, &msg)),
        }
    }

    /// Before a partial write of snapshot `dev` at chunk `c` takes the stripe: if the device
    /// reads the origin image there and the chunk is not local, fetch it now, so the write
    /// does not hold the stripe across the network. A hint, taken without locks; errors are
    /// left for the write itself to meet.
    pub(super) fn prefetch_for_write(&self, cor: &CopyOnRead, dev: u64, c: u64) {
        let registry = self.registry.load();
        let Ok(side) = Self::read_side(&registry, dev) else {
            return;
        };
        if side.resolved(c) == ENTRY_UNMAPPED && cor.local(c) == ENTRY_UNMAPPED {
            let _ = self.fetch(cor, c);
        }
    }

    /// Where the origin image reads as zeros from `pos` on (`Storage::allocation`), answered
    /// from the local copies where the chunk is local (so the origin's server is not asked,
    /// and need not be up); up to the end of the chunk of `pos` at most.
    pub(super) fn origin_allocation(&self, pos: u64, len: u64) -> io::Result<(bool, u64)> {
        let Some(cor) = &self.cor else {
            return self.origin.allocation(pos, len);
        };
        let c = pos >> self.chunk_shift;
        let n = (((c + 1) << self.chunk_shift) - pos).min(len);
        match cor.local(c) {
            ENTRY_UNMAPPED => self.origin.allocation(pos, n),
            ENTRY_ZERO => Ok((true, n)),
            _ => Ok((false, n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::cow::{check_cache, CacheObject, CowError, DeviceId, OpenOptions};
    use crate::storage::Storage;
    use crate::testkit::engine::{mem_engine, CHUNK};
    use crate::testkit::remote::FakeRemote;
    use crate::testkit::storage::MemStorage;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;

    const C: usize = CHUNK as usize;
    const O: DeviceId = DeviceId::ORIGIN;

    /// Every chunk distinct and non-zero, except chunks `4k + 3`, which are holes.
    fn image(chunks: usize) -> Vec<u8> {
        let mut v = vec![0u8; chunks * C];
        for (i, b) in v.iter_mut().enumerate() {
            let c = i / C;
            if c % 4 != 3 {
                *b = (c as u8).wrapping_mul(37) ^ (i as u8) | 1;
            }
        }
        v
    }

    fn read(eng: &CacheObject, dev: DeviceId, off: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        eng.read(dev, off, &mut buf).unwrap();
        buf
    }

    fn reopen(origin: &Arc<FakeRemote>, cache: &Arc<MemStorage>) -> CacheObject {
        let opts = OpenOptions {
            copy_on_read: true,
            ..Default::default()
        };
        CacheObject::open(origin.clone(), cache.clone(), opts).unwrap()
    }

    /// Eight readers of eight snapshots read the same chunks at once from a slow origin:
    /// each chunk is fetched once (the origin's own count and the engine's agree), holes are
    /// not read, the data is right, and a second pass reads nothing from the origin.
    #[test]
    fn each_chunk_is_fetched_once_whatever_the_readers() {
        let img = image(32);
        let r = mem_engine(0).origin(img.clone()).build_remote();
        let eng = Arc::new(r.engine);
        let snaps: Vec<DeviceId> = (0..8)
            .map(|i| {
                eng.create_snapshot(O, &format!("s{i}"), i % 2 == 0)
                    .unwrap()
            })
            .collect();
        let identity = r.origin.bytes_read.load(Ordering::SeqCst);
        r.origin.set_delay(Duration::from_millis(2));
        std::thread::scope(|sc| {
            for &s in &snaps {
                let (eng, img) = (&eng, &img);
                sc.spawn(move || {
                    for c in 0..32u64 {
                        let got = read(eng, s, c * CHUNK, C);
                        assert!(got == img[c as usize * C..][..C], "chunk {c} of {s}");
                    }
                });
            }
        });
        let st = eng.stats();
        let data_chunks = 24u64;
        assert_eq!(st.origin_fetches, data_chunks, "one fetch per data chunk");
        assert_eq!(st.origin_bytes_fetched, data_chunks * CHUNK);
        assert_eq!(
            r.origin.bytes_read.load(Ordering::SeqCst) - identity,
            data_chunks * CHUNK,
            "the origin saw each data chunk read once, and no hole"
        );
        assert_eq!((st.origin_local_chunks, st.origin_zero_chunks), (24, 8));
        assert!(
            st.origin_fetch_waits > 0,
            "readers waited for each other's fetches"
        );
        let before = r.origin.reads.load(Ordering::SeqCst);
        for &s in &snaps {
            assert!(read(&eng, s, 0, 32 * C) == img);
        }
        assert!(read(&eng, O, 0, 32 * C) == img, "the origin device too");
        assert_eq!(r.origin.reads.load(Ordering::SeqCst), before, "all local");
        assert!(eng.stats().origin_bytes_served_local >= 9 * 32 * CHUNK);
        eng.verify_in_memory().unwrap();
    }

    /// Local copies and known zeros survive a reopen, across checkpoints (a small journal
    /// wraps many times): nothing is fetched again, and the checker is clean.
    #[test]
    fn local_copies_survive_reopen_and_checkpoints() {
        let img = image(600);
        let r = mem_engine(0)
            .origin(img.clone())
            .journal(16 << 10)
            .build_remote();
        let s = r.engine.create_snapshot(O, "s", false).unwrap();
        for c in (0..600u64).step_by(2) {
            assert!(read(&r.engine, s, c * CHUNK, 512) == img[c as usize * C..][..512]);
            if c % 20 == 0 {
                r.engine.flush().unwrap(); // a guest's flush commits them
            }
        }
        assert!(r.engine.stats().checkpoints > 0, "the journal wrapped");
        let fetched = r.engine.stats().origin_fetches;
        drop(r.engine);
        let report = check_cache(&*r.cache);
        assert!(report.is_clean(), "{report}");
        let eng = reopen(&r.origin, &r.cache);
        let before = r.origin.reads.load(Ordering::SeqCst);
        for c in (0..600u64).step_by(2) {
            assert!(read(&eng, s, c * CHUNK, C) == img[c as usize * C..][..C]);
        }
        assert_eq!(
            r.origin.reads.load(Ordering::SeqCst),
            before,
            "{fetched} chunks local after the reopen"
        );
        let st = eng.stats();
        assert_eq!(st.origin_local_chunks + st.origin_zero_chunks, 300);
        eng.verify_in_memory().unwrap();
    }

    /// A snapshot write where the snapshot reads the origin gives its children the local copy
    /// (shared, not copied); they still read the origin's data, the dirty bitmap against the
    /// origin sees no change for them there, and the origin itself is never written.
    #[test]
    fn snapshot_writes_share_the_local_copy_with_their_children() {
        let img = image(8);
        let r = mem_engine(0).origin(img.clone()).build_remote();
        let eng = &r.engine;
        let p = eng.create_snapshot(O, "p", true).unwrap();
        let child = eng.create_snapshot(p, "child", false).unwrap();
        eng.write(p, CHUNK + 512, &[9u8; 512]).unwrap();
        eng.write(p, 2 * CHUNK, &[8u8; C]).unwrap();
        let st = eng.stats();
        assert_eq!(st.origin_fetches, 2, "the two chunks the children needed");
        assert_eq!(st.copies, 0, "no copy: the local copies are shared");
        assert!(read(eng, child, 0, 8 * C) == img);
        let mut want = img.clone();
        want[C + 512..C + 1024].fill(9);
        want[2 * C..3 * C].fill(8);
        assert!(read(eng, p, 0, 8 * C) == want);
        let diff = eng.changed(O, child, 0, 8 * CHUNK).unwrap();
        assert!(diff.iter().all(|d| !d.changed), "{diff:?}");
        let diff = eng.changed(O, p, 0, 8 * CHUNK).unwrap();
        let changed: u64 = diff.iter().filter(|d| d.changed).map(|d| d.len).sum();
        assert_eq!(changed, 2 * CHUNK);
        assert!(matches!(
            eng.write(O, 0, &[1u8; 512]),
            Err(CowError::ReadOnly(_))
        ));
        assert!(matches!(eng.restore(p), Err(CowError::Origin(_))));
        eng.delete_snapshot(child).unwrap();
        eng.delete_snapshot(p).unwrap();
        eng.flush().unwrap();
        assert_eq!(
            eng.stats().blocks_used,
            eng.stats().origin_local_chunks,
            "deleting the snapshots leaves the origin's local copies"
        );
        eng.verify_in_memory().unwrap();
        let report = check_cache(&*r.cache);
        assert!(report.is_clean(), "{report}");
    }

    /// The origin fails: chunks already local are served, others fail with an I/O error;
    /// once it is back, they are fetched.
    #[test]
    fn a_failing_origin_fails_only_the_chunks_not_local() {
        let img = image(8);
        let r = mem_engine(0).origin(img.clone()).build_remote();
        let eng = &r.engine;
        let s = eng.create_snapshot(O, "s", true).unwrap();
        assert!(read(eng, s, 0, 2 * C) == img[..2 * C]);
        r.origin.set_failing(true);
        assert!(read(eng, s, 0, 2 * C) == img[..2 * C], "local chunks");
        let mut buf = vec![0u8; C];
        assert!(matches!(
            eng.read(s, 4 * CHUNK, &mut buf),
            Err(CowError::Io(_))
        ));
        assert!(matches!(
            eng.write(s, 5 * CHUNK, &[1u8; 512]),
            Err(CowError::Io(_))
        ));
        let st = eng.stats();
        assert!(st.origin_degraded && st.origin_fetch_errors >= 2, "{st:?}");
        r.origin.set_failing(false);
        assert!(read(eng, s, 4 * CHUNK, C) == img[4 * C..5 * C]);
        eng.write(s, 5 * CHUNK, &[1u8; 512]).unwrap();
        assert!(read(eng, s, 5 * CHUNK + 512, C - 512) == img[5 * C + 512..6 * C]);
        assert!(!eng.stats().origin_degraded);
    }

    /// With no room to keep a chunk, the read is served from the origin all the same (and
    /// fetched again next time); nothing breaks.
    #[test]
    fn a_full_cache_serves_reads_without_keeping_them() {
        let img = image(64);
        let spec = mem_engine(0).origin(img.clone()).journal(16 << 10);
        let limit = spec.data_offset() + 12 * CHUNK;
        let r = spec.max_size(limit).build_remote();
        let eng = &r.engine;
        let s = eng.create_snapshot(O, "s", false).unwrap();
        assert!(read(eng, s, 0, 64 * C) == img);
        let st = eng.stats();
        assert!(st.origin_fetches_not_kept > 0, "{st:?}");
        assert!(st.origin_local_chunks < 48);
        let before = st.origin_fetches;
        assert!(read(eng, s, 0, 64 * C) == img);
        assert!(
            eng.stats().origin_fetches > before,
            "not kept: fetched again"
        );
        eng.verify_in_memory().unwrap();
    }

    /// The cache object pins the origin: another size, changed content, or a local image in
    /// its place is refused, naming what differs; so is a local cache object opened for a
    /// remote origin.
    #[test]
    fn a_changed_origin_is_refused() {
        let img = image(64);
        let r = mem_engine(0).origin(img.clone()).build_remote();
        let s = r.engine.create_snapshot(O, "s", false).unwrap();
        read(&r.engine, s, 0, 8 * C);
        drop(r.engine);
        r.origin.tamper(&[0xee; 512], 0);
        let opts = OpenOptions {
            copy_on_read: true,
            ..Default::default()
        };
        let err = CacheObject::open(r.origin.clone(), r.cache.clone(), opts.clone())
            .err()
            .expect("a changed image is refused");
        let msg = err.to_string();
        assert!(
            msg.contains("content changed") && msg.contains("byte 0"),
            "{msg}"
        );
        r.origin.tamper(&img[..512], 0);
        let local = MemStorage::from_bytes(img.clone());
        let err = CacheObject::open(Arc::new(local), r.cache.clone(), OpenOptions::default())
            .err()
            .expect("not a local image's cache object");
        assert!(err.to_string().contains("remote"), "{err}");
        let eng = CacheObject::open(r.origin.clone(), r.cache.clone(), opts.clone()).unwrap();
        assert!(
            read(&eng, s, 0, 8 * C) == img[..8 * C],
            "the same image opens"
        );
        drop(eng);
        let plain = mem_engine(0).origin(img.clone()).build();
        drop(plain.engine);
        let err = CacheObject::open(r.origin.clone(), plain.cache.clone(), opts)
            .err()
            .expect("a local origin's cache object");
        assert!(err.to_string().contains("local origin image"), "{err}");
    }

    /// Hydration fetches every chunk in the background, resumes after a reopen, and stops.
    #[test]
    fn hydration_makes_every_chunk_local() {
        let img = image(300);
        let r = mem_engine(0).origin(img.clone()).build_remote();
        let eng = Arc::new(r.engine);
        eng.hydrate(0).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while eng.hydration().unwrap().state != "done" {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                eng.hydration()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let st = eng.stats();
        assert_eq!(st.hydrated_percent, 100);
        assert_eq!(st.origin_local_chunks + st.origin_zero_chunks, 300);
        assert_eq!(st.origin_fetches, 225, "data chunks only");
        let before = r.origin.reads.load(Ordering::SeqCst);
        assert!(read(&eng, O, 0, 300 * C) == img);
        assert_eq!(r.origin.reads.load(Ordering::SeqCst), before);
        assert!(
            !eng.device(O).unwrap().attrs.contains_key("hydrate"),
            "done"
        );

        // A hydration in progress is paused by a shutdown and resumed by the next start.
        let r2 = mem_engine(0).origin(img.clone()).build_remote();
        let eng = Arc::new(r2.engine);
        r2.origin.set_delay(Duration::from_millis(1));
        eng.hydrate(100 * CHUNK).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        eng.hydrate_pause();
        let part = eng.stats().origin_local_chunks;
        assert!(part > 0 && part < 225, "{part} chunks at 100 chunks/s");
        assert_eq!(eng.hydration().unwrap().state, "paused");
        let eng = Arc::into_inner(eng).expect("no thread holds the engine");
        drop(eng);
        let eng = Arc::new(reopen(&r2.origin, &r2.cache));
        assert_eq!(eng.stats().origin_local_chunks, part);
        eng.hydrate_resume();
        assert_eq!(eng.hydration().unwrap().state, "running");
        eng.hydrate_stop().unwrap();
        assert_eq!(eng.hydration().unwrap().state, "stopped");
        assert!(!eng.device(O).unwrap().attrs.contains_key("hydrate"));
        r2.origin.set_delay(Duration::ZERO);
    }

    /// Reads of a cache object whose journal is pressed still work (not kept): covered by
    /// `keep`'s first check; here, a server without holes reported: zero chunks are fetched
    /// once and kept as zeros, with no block.
    #[test]
    fn zero_data_is_kept_as_zeros_without_a_block() {
        let img = image(8);
        let r = mem_engine(0).origin(img.clone()).build_remote();
        r.origin.set_no_holes(true);
        let eng = &r.engine;
        assert!(read(eng, O, 0, 8 * C) == img);
        let st = eng.stats();
        assert_eq!((st.origin_fetches, st.origin_zero_chunks), (8, 2));
        assert_eq!(st.origin_local_chunks, 6);
        assert_eq!(st.blocks_used, 6);
        let runs = eng.zero_runs(O, 0, 8 * CHUNK).unwrap();
        assert_eq!(
            runs.iter().filter(|r| r.2).map(|r| r.1).sum::<u64>(),
            2 * CHUNK
        );
        assert_eq!(r.origin.size(), 8 * CHUNK);
    }

    /// A fetched chunk's data is durable before the record that makes it local: crashed at
    /// every I/O event of reads, flushes and a checkpoint, the reopened cache object is clean
    /// and a snapshot reads the origin's data at every chunk (a record that outlived its
    /// data would show zeros or another chunk's bytes).
    #[test]
    fn a_crash_never_leaves_a_local_copy_without_its_data() {
        use crate::testkit::storage::CrashController;
        let img = image(40);
        let run = |crash_at: u64| -> u64 {
            let ctl = CrashController::new(crash_at, 0);
            let origin = ctl.store(img.clone());
            let cache = ctl.store(Vec::new());
            let mut spec = mem_engine(0).origin(img.clone()).journal(16 << 10);
            spec.opts.copy_on_read = true;
            let eng = spec.on(origin.clone(), cache.clone());
            let s = eng.create_snapshot(O, "s", false).unwrap();
            let start = ctl.events();
            if crash_at > 0 {
                ctl.arm(crash_at);
            }
            for round in 0..3u64 {
                for c in (round..40).step_by(3) {
                    let _ = eng.read(s, c * CHUNK, &mut [0u8; 512]);
                }
                let _ = eng.flush();
            }
            let used = ctl.events() - start;
            ctl.crash_now();
            std::mem::forget(eng); // its closing flush would come after the crash
            let cache = Arc::new(MemStorage::from_bytes(cache.crash_image().unwrap()));
            let report = check_cache(&*cache);
            assert!(report.is_clean(), "crash at {crash_at}: {report}");
            let origin = Arc::new(FakeRemote::new(img.clone()));
            let eng = reopen(&origin, &cache);
            assert!(
                read(&eng, s, 0, 40 * C) == img,
                "crash at {crash_at}: a local copy lost its data"
            );
            eng.verify_in_memory().unwrap();
            used
        };
        let used = run(0);
        assert!(used > 20, "reads, commits and checkpoints: {used} events");
        for crash_at in 1..=used {
            run(crash_at);
        }
    }
}
