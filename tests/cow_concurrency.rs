//! Copy counting, cache-full behaviour and a multi-threaded stress test with a checker.

use snapblk::cow::{check_cache, CacheObject, CowError, DeviceId, DeviceState, OpenOptions};
use snapblk::storage::Storage;
use snapblk::testkit::engine::{
    fast_tempdir, file_stores, mem_engine, EngineSpec, MemEngine, CHUNK,
};
use snapblk::testkit::storage::MemStorage;
use snapblk::testkit::tokens::{sector_token, token_sector, writer_token};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The fixture engine of `chunks` chunks with a growth limit of `max_size` bytes.
fn engine(chunks: u64, max_size: u64) -> MemEngine {
    mem_engine(chunks).max_size(max_size).build()
}

#[test]
fn origin_write_copies_once_whatever_the_number_of_snapshots() {
    for n in [1usize, 10, 100, 1000] {
        let MemEngine { engine: eng, .. } = engine(32, 1 << 30);
        let snaps: Vec<DeviceId> = (0..n)
            .map(|i| {
                eng.create_snapshot(DeviceId::ORIGIN, &format!("s{i}"), i % 2 == 0)
                    .unwrap()
            })
            .collect();
        let before = eng.stats();
        let data = vec![0xabu8; 16 * CHUNK as usize];
        eng.write(DeviceId::ORIGIN, 0, &data).unwrap();
        let after = eng.stats();
        assert_eq!(after.copies - before.copies, 16, "{n} snapshots");
        assert_eq!(after.bytes_copied - before.bytes_copied, 16 * CHUNK);
        assert_eq!(
            after.blocks_used - before.blocks_used,
            16,
            "one shared block each"
        );
        // Rewriting copies nothing more.
        eng.write(DeviceId::ORIGIN, 512, &data[..4096]).unwrap();
        assert_eq!(eng.stats().copies, after.copies);
        // Writable siblings never copy for each other: a whole-chunk write to one of them
        // takes a new block for it alone and neither copies nor fills.
        let s0 = snaps[0];
        eng.write(s0, 20 * CHUNK, &data[..CHUNK as usize]).unwrap();
        let st = eng.stats();
        assert_eq!(st.copies, after.copies);
        assert_eq!(st.cow_fills, after.cow_fills);
        let mut buf = vec![0u8; CHUNK as usize];
        for &s in snaps.iter().skip(1).take(5) {
            eng.read(s, 0, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "snapshot keeps the old origin");
            eng.read(s, 20 * CHUNK, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "sibling write not visible");
        }
        eng.verify_in_memory().unwrap();
    }
}

#[test]
fn snapshot_of_snapshot_and_delete_pass_blocks_without_copying() {
    let MemEngine {
        cache, engine: eng, ..
    } = engine(16, 1 << 30);
    let a = eng.create_snapshot(DeviceId::ORIGIN, "a", true).unwrap();
    eng.write(a, 0, &vec![1u8; 3 * CHUNK as usize]).unwrap();
    let b = eng.create_snapshot(a, "b", false).unwrap();
    eng.write(a, 0, &vec![2u8; CHUNK as usize]).unwrap();
    let copies = eng.stats().copies;
    eng.delete_snapshot(a).unwrap();
    assert_eq!(eng.stats().copies, copies, "delete copies no data");
    let mut buf = vec![0u8; 3 * CHUNK as usize];
    eng.read(b, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 1));
    let info = eng.device(b).unwrap();
    assert_eq!(info.parent, Some(0));
    assert_eq!(info.owned_chunks, 3);
    eng.flush().unwrap();
    assert!(check_cache(cache.as_ref()).is_clean());
}

#[test]
fn cache_full_makes_the_snapshot_inoperative_never_the_origin() {
    // Room for about 20 data blocks (the journal and a checkpoint reserve take the rest).
    let journal = 64 << 10;
    let data_offset = (8192 + journal as u64).div_ceil(CHUNK) * CHUNK;
    let MemEngine {
        origin,
        cache,
        engine: eng,
    } = engine(64, data_offset + 24 * CHUNK);
    let ro = eng.create_snapshot(DeviceId::ORIGIN, "ro", false).unwrap();
    let rw = eng.create_snapshot(DeviceId::ORIGIN, "rw", true).unwrap();
    let rw_child = eng.create_snapshot(rw, "rw-child", false).unwrap();
    // Fill the cache through the writable snapshot until it reports no space.
    let mut filled = 0;
    loop {
        match eng.write(rw, 40 * CHUNK + filled * CHUNK, &vec![7u8; CHUNK as usize]) {
            Ok(()) => filled += 1,
            Err(CowError::NoSpace) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(filled < 24);
    }
    assert!(filled > 0);
    // The writable snapshot's failure broke nothing: it still reads.
    let mut buf = vec![0u8; CHUNK as usize];
    eng.read(rw, 40 * CHUNK, &mut buf).unwrap();
    assert_eq!(buf[0], 7);
    // Origin writes never fail; the snapshots that cannot be preserved become inoperative.
    for c in 0..8 {
        eng.write(DeviceId::ORIGIN, c * CHUNK, &vec![9u8; CHUNK as usize])
            .unwrap();
    }
    let devs = eng.devices();
    let state = |id: DeviceId| devs.iter().find(|d| d.id == id.0).unwrap().state;
    assert_eq!(state(ro), DeviceState::Inoperative);
    assert_eq!(state(rw), DeviceState::Inoperative);
    assert_eq!(state(rw_child), DeviceState::Inoperative);
    assert!(matches!(
        eng.read(ro, 0, &mut buf),
        Err(CowError::Inoperative(_))
    ));
    assert!(matches!(
        eng.write(rw, 0, &buf),
        Err(CowError::Inoperative(_))
    ));
    let st = eng.stats();
    assert_eq!(st.inoperative_devices, 3);
    assert_eq!(
        st.blocks_used, 0,
        "blocks of inoperative snapshots are released"
    );
    eng.read(DeviceId::ORIGIN, 0, &mut buf).unwrap();
    assert_eq!(buf[0], 9);
    // The state survives a reopen and the checker finds the object clean.
    drop(eng);
    assert!(check_cache(cache.as_ref()).is_clean());
    let eng = CacheObject::open(origin, cache, OpenOptions::default()).unwrap();
    assert_eq!(eng.stats().inoperative_devices, 3);
    // New snapshots work again.
    let s = eng
        .create_snapshot(DeviceId::ORIGIN, "again", false)
        .unwrap();
    eng.write(DeviceId::ORIGIN, 0, &vec![1u8; CHUNK as usize])
        .unwrap();
    eng.read(s, 0, &mut buf).unwrap();
    assert_eq!(buf[0], 9);
}

#[test]
fn refuses_foreign_origin_and_unknown_features() {
    let MemEngine {
        origin,
        cache,
        engine: eng,
    } = engine(8, 1 << 30);
    drop(eng);
    let other: Arc<dyn Storage> = Arc::new(MemStorage::new(16 * CHUNK));
    assert!(matches!(
        CacheObject::open(other, cache.clone(), OpenOptions::default()),
        Err(CowError::WrongOrigin(_))
    ));
    let opts = OpenOptions {
        origin_tag: Some("elsewhere".into()),
        ..Default::default()
    };
    assert!(matches!(
        CacheObject::open(origin.clone(), cache.clone(), opts),
        Err(CowError::WrongOrigin(_))
    ));
    // Set an unknown incompatible feature bit in the header and re-checksum it.
    let mut slot = vec![0u8; 4096];
    cache.read_at(&mut slot, 4096).unwrap();
    let mut h = snapblk::cow::format::Header::decode(&slot).unwrap();
    h.incompat = 1 << 7;
    cache.write_at(&h.encode(), 4096).unwrap();
    let err = CacheObject::open(origin, cache, OpenOptions::default())
        .err()
        .expect("must refuse");
    assert!(err.to_string().contains("incompatible"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Stress: origin writers, snapshot readers, a snapshot writer, create/delete, at once.
// ---------------------------------------------------------------------------------------

/// Stops every thread when any one exits, panicking or not, so a failure cannot hang the test.
struct StopOnExit<'a>(&'a AtomicBool);

impl Drop for StopOnExit<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

struct Registered {
    image: Vec<u8>,
}

#[test]
fn stress_concurrent_writers_readers_and_snapshots() {
    let dir = fast_tempdir();
    let size = 256 * CHUNK;
    let stores = file_stores(dir.path(), size);
    let cache = stores.cache.clone();
    let eng = EngineSpec::default()
        .journal(256 << 10)
        .on(stores.origin, stores.cache);
    let nwriters = 2u64;
    let started: Vec<AtomicU64> = (0..nwriters).map(|_| AtomicU64::new(0)).collect();
    let registry: Mutex<HashMap<u64, Arc<Registered>>> = Mutex::new(HashMap::new());
    let stop = AtomicBool::new(false);
    let checks = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_millis(2500);
    let nsect = (size / 512) as usize;
    // Each origin writer owns alternate 16-chunk bands, so its sectors' seqs only grow.
    let owner = |sector: usize| ((sector * 512 / CHUNK as usize) / 16) as u64 % nwriters;
    std::thread::scope(|s| {
        for w in 0..nwriters {
            let (eng, started, stop) = (&eng, &started, &stop);
            s.spawn(move || {
                let _guard = StopOnExit(stop);
                let mut rng = fastrand::Rng::with_seed(w);
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let first = rng.usize(0..nsect - 32);
                    let n = rng.usize(1..32);
                    seq += 1;
                    started[w as usize].store(seq, Ordering::SeqCst);
                    let mut buf = Vec::with_capacity(n * 512);
                    let mut sectors = Vec::new();
                    for sct in first..first + n {
                        if owner(sct) == w {
                            sectors.push(sct);
                        }
                    }
                    for _ in &sectors {
                        buf.extend_from_slice(&token_sector(writer_token(w + 1, seq)));
                    }
                    // Write each owned sector (runs may be split by band boundaries).
                    for (i, &sct) in sectors.iter().enumerate() {
                        eng.write(
                            DeviceId::ORIGIN,
                            sct as u64 * 512,
                            &buf[i * 512..(i + 1) * 512],
                        )
                        .unwrap();
                    }
                    if rng.u8(0..50) == 0 {
                        eng.flush().unwrap();
                    }
                }
            });
        }
        // Creator / deleter: snapshots of the origin and of snapshots.
        {
            let (eng, started, registry, stop) = (&eng, &started, &registry, &stop);
            s.spawn(move || {
                let _guard = StopOnExit(stop);
                let mut rng = fastrand::Rng::with_seed(99);
                let mut n = 0;
                let mut buf = vec![0u8; size as usize];
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    n += 1;
                    let parent = {
                        let reg = registry.lock().unwrap();
                        let ids: Vec<u64> = reg.keys().copied().collect();
                        if ids.is_empty() || rng.bool() {
                            None
                        } else {
                            Some(ids[rng.usize(0..ids.len())])
                        }
                    };
                    let t0 = Instant::now();
                    let created = eng.create_snapshot(
                        DeviceId(parent.unwrap_or(0)),
                        &format!("snap{n}"),
                        false,
                    );
                    latencies.push(t0.elapsed());
                    let id = match created {
                        Ok(id) => id,
                        Err(CowError::NoDevice(_)) => continue, // parent deleted meanwhile
                        Err(e) => panic!("{e}"),
                    };
                    let bound: Vec<u64> =
                        started.iter().map(|a| a.load(Ordering::SeqCst)).collect();
                    eng.read(id, 0, &mut buf).unwrap();
                    match parent {
                        None => {
                            for (i, sct) in buf.chunks(512).enumerate() {
                                let t = sector_token(sct).unwrap_or_else(|| {
                                    panic!("snapshot {id} sector {i} holds no whole write")
                                });
                                if t != 0 {
                                    let w = (t >> 56) - 1;
                                    assert_eq!(w, owner(i));
                                    assert!(
                                        t & ((1 << 56) - 1) <= bound[w as usize],
                                        "snapshot {id} sector {i} shows a write started after it"
                                    );
                                }
                            }
                        }
                        Some(p) => {
                            if let Some(r) = registry.lock().unwrap().get(&p).cloned() {
                                assert!(buf == r.image, "snapshot of snapshot differs");
                            }
                        }
                    }
                    registry
                        .lock()
                        .unwrap()
                        .insert(id.0, Arc::new(Registered { image: buf.clone() }));
                    if registry.lock().unwrap().len() > 8 {
                        let victim = {
                            let reg = registry.lock().unwrap();
                            let ids: Vec<u64> = reg.keys().copied().collect();
                            ids[rng.usize(0..ids.len())]
                        };
                        registry.lock().unwrap().remove(&victim);
                        eng.delete_snapshot(DeviceId(victim)).unwrap();
                    }
                }
                stop.store(true, Ordering::Relaxed);
                latencies.sort();
                eprintln!(
                    "stress: {} snapshots created, create p50 {:?} p99 {:?}",
                    n,
                    latencies[latencies.len() / 2],
                    latencies[latencies.len() * 99 / 100]
                );
            });
        }
        // Readers: a snapshot's content never changes.
        for r in 0..2u64 {
            let (eng, registry, stop, checks) = (&eng, &registry, &stop, &checks);
            s.spawn(move || {
                let _guard = StopOnExit(stop);
                let mut rng = fastrand::Rng::with_seed(1000 + r);
                let mut buf = vec![0u8; size as usize];
                while !stop.load(Ordering::Relaxed) {
                    let pick = {
                        let reg = registry.lock().unwrap();
                        let ids: Vec<(u64, Arc<Registered>)> =
                            reg.iter().map(|(k, v)| (*k, v.clone())).collect();
                        if ids.is_empty() {
                            None
                        } else {
                            Some(ids[rng.usize(0..ids.len())].clone())
                        }
                    };
                    let Some((id, reg)) = pick else {
                        std::thread::yield_now();
                        continue;
                    };
                    let off = rng.u64(0..size / CHUNK - 8) * CHUNK;
                    let len = 8 * CHUNK as usize;
                    match eng.read(DeviceId(id), off, &mut buf[..len]) {
                        Ok(()) => {
                            assert!(
                                buf[..len] == reg.image[off as usize..off as usize + len],
                                "snapshot {id} changed at {off}"
                            );
                            checks.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(CowError::NoDevice(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            });
        }
        // A writable snapshot with its own writer, checked against its model.
        {
            let (eng, stop) = (&eng, &stop);
            s.spawn(move || {
                let _guard = StopOnExit(stop);
                let w = eng.create_snapshot(DeviceId::ORIGIN, "rw", true).unwrap();
                let mut model = vec![0u8; size as usize];
                eng.read(w, 0, &mut model).unwrap();
                let mut rng = fastrand::Rng::with_seed(7);
                let mut buf = vec![0u8; size as usize];
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let first = rng.usize(0..nsect - 40);
                    let n = rng.usize(1..40);
                    let mut data = Vec::new();
                    for _ in 0..n {
                        data.extend_from_slice(&token_sector(writer_token(9, seq)));
                    }
                    eng.write(w, first as u64 * 512, &data).unwrap();
                    model[first * 512..(first + n) * 512].copy_from_slice(&data);
                    if seq % 20 == 0 {
                        eng.read(w, 0, &mut buf).unwrap();
                        assert!(buf == model, "writable snapshot diverged");
                    }
                }
            });
        }
    });
    assert!(checks.load(Ordering::Relaxed) > 10);
    eng.verify_in_memory().unwrap();
    eng.flush().unwrap();
    let report = check_cache(cache.as_ref());
    assert!(report.is_clean(), "{report}");
}

/// A chunk filled with `tag` (little-endian u64, repeated).
fn tagged(tag: u64) -> Vec<u8> {
    tag.to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(CHUNK as usize)
        .collect()
}

/// Snapshot reads race with writers that make tables copy the very pages being read: first
/// writes to other chunks of the same pages on the snapshot, on its parent (whose write first
/// gives the snapshot its own mapping) and on the origin (copy-outs into the parent), while
/// new snapshots keep taking away the parent's right to change pages in place. Every read of a
/// chunk nobody writes must return exactly its bytes.
#[test]
fn snapshot_reads_while_their_pages_are_copied() {
    // Four pages of 512 chunks. Every 8th chunk is "stable": written only during setup.
    const CHUNKS: u64 = 4 * 512;
    let MemEngine {
        cache, engine: eng, ..
    } = engine(CHUNKS, 1 << 30);
    let origin_tag = |c: u64| 0xA000_0000_0000_0000 | c;
    let s1_tag = |c: u64| 0xB000_0000_0000_0000 | c;
    for c in 0..CHUNKS {
        eng.write(DeviceId::ORIGIN, c * CHUNK, &tagged(origin_tag(c)))
            .unwrap();
    }
    let s1 = eng.create_snapshot(DeviceId::ORIGIN, "s1", true).unwrap();
    // Stable chunks of s1: an own block, zeros, or read through to the origin.
    let stable: Vec<u64> = (0..CHUNKS).step_by(8).collect();
    let expect = |c: u64| -> Vec<u8> {
        match c % 24 {
            0 => tagged(s1_tag(c)),
            8 => vec![0; CHUNK as usize],
            _ => tagged(origin_tag(c)),
        }
    };
    for &c in &stable {
        match c % 24 {
            0 => eng.write(s1, c * CHUNK, &tagged(s1_tag(c))).unwrap(),
            8 => eng.write_zeroes(s1, c * CHUNK, CHUNK).unwrap(),
            _ => {}
        }
    }
    // s2 shares s1's pages: from here on both must copy a page before changing it.
    let s2 = eng.create_snapshot(s1, "s2", true).unwrap();
    let devs = Mutex::new(vec![s1, s2]);
    let stop = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_millis(1500);
    // Last value each writer gave its chunks (s1 writer, s2 writer); checked at the end.
    let mut model_s1: HashMap<u64, u64> = HashMap::new();
    let mut model_s2: HashMap<u64, u64> = HashMap::new();
    let unstable = |rng: &mut fastrand::Rng| loop {
        let c = rng.u64(0..CHUNKS);
        if !c.is_multiple_of(8) {
            return c;
        }
    };
    std::thread::scope(|sc| {
        for r in 0..2u64 {
            let (eng, devs, stop, reads, stable, expect) =
                (&eng, &devs, &stop, &reads, &stable, &expect);
            sc.spawn(move || {
                let mut rng = fastrand::Rng::with_seed(100 + r);
                let mut buf = vec![0u8; CHUNK as usize];
                while !stop.load(Ordering::Relaxed) {
                    let dev = {
                        let d = devs.lock().unwrap();
                        d[rng.usize(0..d.len())]
                    };
                    let c = stable[rng.usize(0..stable.len())];
                    match eng.read(dev, c * CHUNK, &mut buf) {
                        Ok(()) => assert!(
                            buf == expect(c),
                            "device {dev} chunk {c}: read {:#x}",
                            u64::from_le_bytes(buf[..8].try_into().unwrap())
                        ),
                        // A snapshot made during the run may be deleted under the reader.
                        Err(CowError::NoDevice(_)) if dev != s1 && dev != s2 => {}
                        Err(e) => panic!("device {dev} chunk {c}: {e}"),
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Origin writer: copy-outs into s1 (and the pages of s1 that hold them).
        {
            let (eng, stop) = (&eng, &stop);
            sc.spawn(move || {
                let mut rng = fastrand::Rng::with_seed(7);
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let c = unstable(&mut rng);
                    seq += 1;
                    eng.write(DeviceId::ORIGIN, c * CHUNK, &tagged(0xC << 56 | seq))
                        .unwrap();
                }
            });
        }
        // Creator: a snapshot of s1 or s2 takes away their in-place rights; old ones go.
        {
            let (eng, devs, stop) = (&eng, &devs, &stop);
            sc.spawn(move || {
                let mut rng = fastrand::Rng::with_seed(9);
                let mut made = std::collections::VecDeque::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let parent = if rng.bool() { s1 } else { s2 };
                    i += 1;
                    let d = eng
                        .create_snapshot(parent, &format!("t{i}"), false)
                        .unwrap();
                    devs.lock().unwrap().push(d);
                    made.push_back(d);
                    if made.len() > 6 {
                        let old = made.pop_front().unwrap();
                        devs.lock().unwrap().retain(|&x| x != old);
                        eng.delete_snapshot(old).unwrap();
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
        }
        // Writers of s1 and s2 (this thread alternates): whole-chunk first writes to
        // unstable chunks, next to the stable ones on the same pages.
        let mut rng = fastrand::Rng::with_seed(11);
        let mut seq = 0u64;
        while Instant::now() < deadline {
            for (dev, model, tag) in [(s1, &mut model_s1, 0xD), (s2, &mut model_s2, 0xE)] {
                let c = unstable(&mut rng);
                seq += 1;
                let v = tag << 56 | seq;
                eng.write(dev, c * CHUNK, &tagged(v)).unwrap();
                model.insert(c, v);
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(
        reads.load(Ordering::Relaxed) > 1000,
        "readers made progress"
    );
    let mut buf = vec![0u8; CHUNK as usize];
    for c in 0..CHUNKS {
        for (dev, model) in [(s1, &model_s1), (s2, &model_s2)] {
            let want = match model.get(&c) {
                Some(&v) => tagged(v),
                None if c.is_multiple_of(8) => expect(c),
                None => tagged(origin_tag(c)),
            };
            eng.read(dev, c * CHUNK, &mut buf).unwrap();
            assert!(buf == want, "device {dev} chunk {c} after the run");
        }
    }
    eng.verify_in_memory().unwrap();
    drop(eng);
    assert!(check_cache(cache.as_ref()).is_clean());
}

/// The origin's copies are shared by snapshot generation and released by deletes: snapshots
/// taken between two origin writes of a chunk share one copy of it, kept exactly as long as one
/// of them exists, whatever order they are deleted in, and across a reopen.
#[test]
fn origin_copies_live_as_long_as_a_snapshot_reads_them() {
    let MemEngine {
        origin,
        cache,
        engine: eng,
    } = engine(8, 1 << 30);
    let fill = |v: u8| vec![v; CHUNK as usize];
    let read = |eng: &CacheObject, d: DeviceId| {
        let mut b = fill(0xee);
        eng.read(d, 0, &mut b).unwrap();
        b[0]
    };
    eng.write(DeviceId::ORIGIN, 0, &fill(1)).unwrap();
    // Generation 1: three snapshots (one with a snapshot of its own) see 1.
    let g1: Vec<DeviceId> = (0..3)
        .map(|i| {
            eng.create_snapshot(DeviceId::ORIGIN, &format!("a{i}"), true)
                .unwrap()
        })
        .collect();
    let g1_child = eng.create_snapshot(g1[1], "a1-child", false).unwrap();
    eng.write(DeviceId::ORIGIN, 0, &fill(2)).unwrap();
    // Generation 2: two snapshots see 2.
    let g2: Vec<DeviceId> = (0..2)
        .map(|i| {
            eng.create_snapshot(DeviceId::ORIGIN, &format!("b{i}"), false)
                .unwrap()
        })
        .collect();
    eng.write(DeviceId::ORIGIN, 0, &fill(3)).unwrap();
    // Generation 3 sees the origin itself.
    let g3 = eng.create_snapshot(DeviceId::ORIGIN, "c", false).unwrap();
    let st = eng.stats();
    assert_eq!(st.copies, 2, "one copy per origin write, not per snapshot");
    assert_eq!(st.preserved_copies, 2);
    assert_eq!(st.blocks_used, 2);
    for &d in g1.iter().chain([&g1_child]) {
        assert_eq!(read(&eng, d), 1, "generation 1");
        assert_eq!(eng.device(d).unwrap().preserved_chunks, 1);
    }
    for &d in &g2 {
        assert_eq!(read(&eng, d), 2, "generation 2");
    }
    assert_eq!(read(&eng, g3), 3);
    assert_eq!(eng.device(g3).unwrap().preserved_chunks, 0);
    // A writable snapshot of generation 1 writes its own copy; its child keeps the old data.
    eng.write(g1[1], 0, &fill(9)).unwrap();
    assert_eq!(read(&eng, g1[1]), 9);
    assert_eq!(read(&eng, g1_child), 1);

    // Deleting all but one snapshot of a generation keeps its copy.
    eng.delete_snapshot(g1[0]).unwrap();
    eng.delete_snapshot(g1[2]).unwrap();
    eng.delete_snapshot(g2[0]).unwrap();
    eng.flush().unwrap();
    assert_eq!(eng.stats().preserved_copies, 2);
    assert_eq!(read(&eng, g1_child), 1);
    assert_eq!(read(&eng, g2[1]), 2);
    // A reopen rebuilds the same history.
    drop(eng);
    let eng = CacheObject::open(origin.clone(), cache.clone(), OpenOptions::default()).unwrap();
    assert_eq!(read(&eng, g1_child), 1);
    assert_eq!(read(&eng, g2[1]), 2);
    assert_eq!(read(&eng, g3), 3);
    // The last reader of generation 2 goes: its copy is released.
    eng.delete_snapshot(g2[1]).unwrap();
    eng.flush().unwrap();
    assert_eq!(eng.stats().preserved_copies, 1);
    assert_eq!(read(&eng, g1_child), 1);
    // Generation 1 lives on in a1 (writable, own block) and its child, moved up on delete.
    eng.delete_snapshot(g1[1]).unwrap();
    assert_eq!(read(&eng, g1_child), 1);
    eng.flush().unwrap();
    assert_eq!(eng.stats().preserved_copies, 1);
    eng.delete_snapshot(g1_child).unwrap();
    eng.flush().unwrap();
    let st = eng.stats();
    assert_eq!(st.preserved_copies, 0, "no snapshot reads a copy any more");
    assert_eq!(st.blocks_used, 0);
    assert_eq!(read(&eng, g3), 3);
    // A new snapshot after all that copies again on the next origin write.
    let d = eng.create_snapshot(DeviceId::ORIGIN, "d", false).unwrap();
    eng.write(DeviceId::ORIGIN, 0, &fill(4)).unwrap();
    assert_eq!(read(&eng, d), 3);
    assert_eq!(read(&eng, g3), 3);
    eng.verify_in_memory().unwrap();
    eng.flush().unwrap();
    let report = check_cache(cache.as_ref());
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.preserved_copies, 1);
}

/// Many generations of snapshots over an origin spread across several history pages, deleted in
/// random order: every snapshot keeps reading its point-in-time data, no copy outlives the last
/// snapshot that can read it, and the last delete leaves no block used.
#[test]
fn origin_history_over_many_generations_and_random_deletes() {
    const CHUNKS: u64 = 2048; // four history pages
    for seed in 0..4u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let MemEngine {
            cache, engine: eng, ..
        } = engine(CHUNKS, 1 << 30);
        let mut origin = vec![0u8; CHUNKS as usize];
        let mut snaps: Vec<(DeviceId, Vec<u8>)> = Vec::new();
        let mut buf = vec![0u8; CHUNK as usize];
        for round in 0..60u32 {
            if rng.u8(0..3) != 0 {
                let id = eng
                    .create_snapshot(DeviceId::ORIGIN, &format!("s{round}"), false)
                    .unwrap();
                snaps.push((id, origin.clone()));
            }
            for _ in 0..rng.usize(0..40) {
                let c = rng.u64(0..CHUNKS);
                let v = rng.u8(1..=255);
                eng.write(DeviceId::ORIGIN, c * CHUNK, &vec![v; CHUNK as usize])
                    .unwrap();
                origin[c as usize] = v;
            }
            if !snaps.is_empty() && rng.u8(0..3) == 0 {
                let (id, _) = snaps.swap_remove(rng.usize(0..snaps.len()));
                eng.delete_snapshot(id).unwrap();
            }
            for (id, want) in &snaps {
                for _ in 0..20 {
                    let c = rng.u64(0..CHUNKS);
                    eng.read(*id, c * CHUNK, &mut buf).unwrap();
                    assert_eq!(
                        buf[0], want[c as usize],
                        "seed {seed} round {round} chunk {c}"
                    );
                }
            }
        }
        eng.verify_in_memory().unwrap();
        eng.flush().unwrap();
        let report = check_cache(cache.as_ref());
        assert!(report.is_clean(), "seed {seed}: {report}");
        for (id, want) in &snaps {
            for c in 0..CHUNKS {
                eng.read(*id, c * CHUNK, &mut buf).unwrap();
                assert_eq!(buf[0], want[c as usize], "seed {seed} chunk {c}");
            }
        }
        while let Some((id, _)) = snaps.pop() {
            eng.delete_snapshot(id).unwrap();
        }
        eng.flush().unwrap();
        let st = eng.stats();
        assert_eq!(st.preserved_copies, 0, "seed {seed}");
        assert_eq!(st.blocks_used, 0, "seed {seed}");
        assert!(check_cache(cache.as_ref()).is_clean());
    }
}

/// The origin copies a chunk only for a snapshot that reads the origin image there: restoring
/// from the newest snapshot (which maps everything it restores) copies nothing and commits a
/// few times, not once per chunk; an older snapshot that reads through still gets its copy.
#[test]
fn restore_copies_only_what_some_snapshot_reads() {
    let MemEngine { engine: eng, .. } = engine(64, 1 << 30);
    let s = eng.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
    eng.write(s, 0, &vec![7u8; 64 * CHUNK as usize]).unwrap();
    let before = eng.stats();
    eng.restore(s).unwrap();
    let after = eng.stats();
    assert_eq!(
        after.copies, before.copies,
        "no snapshot reads the old origin"
    );
    assert_eq!(after.blocks_used, before.blocks_used);
    assert!(
        after.commits - before.commits <= 4,
        "{} commits for a restore that copies nothing",
        after.commits - before.commits
    );
    // An older snapshot reading through the origin is preserved as usual.
    let MemEngine { engine: eng, .. } = engine(64, 1 << 30);
    let old = eng.create_snapshot(DeviceId::ORIGIN, "old", false).unwrap();
    let s = eng.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
    eng.write(s, 0, &vec![7u8; 8 * CHUNK as usize]).unwrap();
    eng.restore(s).unwrap();
    assert_eq!(
        eng.stats().copies,
        8,
        "one copy per restored chunk, for `old`"
    );
    let mut buf = vec![1u8; 8 * CHUNK as usize];
    eng.read(old, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "old keeps the origin it saw");
    eng.read(DeviceId::ORIGIN, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 7), "the origin holds s's data");
    eng.verify_in_memory().unwrap();
}

/// Snapshots of a snapshot that maps a chunk read its block, not the origin: an origin write
/// there copies nothing, however many there are, and they all keep their data.
#[test]
fn clones_of_a_snapshot_that_maps_a_chunk_need_no_origin_copy() {
    let MemEngine {
        cache, engine: eng, ..
    } = engine(8, 1 << 30);
    let golden = eng
        .create_snapshot(DeviceId::ORIGIN, "golden", true)
        .unwrap();
    eng.write(golden, 0, &vec![3u8; CHUNK as usize]).unwrap();
    let clones: Vec<DeviceId> = (0..300)
        .map(|i| eng.create_snapshot(golden, &format!("c{i}"), true).unwrap())
        .collect();
    eng.write(DeviceId::ORIGIN, 0, &vec![9u8; CHUNK as usize])
        .unwrap();
    assert_eq!(eng.stats().copies, 0);
    // Chunk 1 is read through by all of them: one copy.
    eng.write(DeviceId::ORIGIN, CHUNK, &vec![9u8; CHUNK as usize])
        .unwrap();
    assert_eq!(eng.stats().copies, 1);
    let mut buf = vec![0u8; 2 * CHUNK as usize];
    for &c in clones.iter().step_by(37) {
        eng.read(c, 0, &mut buf).unwrap();
        assert!(buf[..CHUNK as usize].iter().all(|&b| b == 3));
        assert!(buf[CHUNK as usize..].iter().all(|&b| b == 0));
    }
    // With golden gone, the clones are the origin's readers: the copy stays theirs.
    eng.delete_snapshot(golden).unwrap();
    eng.write(DeviceId::ORIGIN, CHUNK, &vec![8u8; CHUNK as usize])
        .unwrap();
    assert_eq!(eng.stats().copies, 1, "chunk 1 was preserved already");
    eng.read(clones[299], 0, &mut buf).unwrap();
    assert!(buf[CHUNK as usize..].iter().all(|&b| b == 0));
    eng.verify_in_memory().unwrap();
    eng.flush().unwrap();
    assert!(check_cache(cache.as_ref()).is_clean());
}
