//! Focused properties: whole-chunk writes read nothing, one copy per chunk under concurrency,
//! group commit, attributes and low-space reporting.

use snapblk::cow::{CacheObject, CreateOptions, DeviceId, OpenOptions};
use snapblk::testkit::engine::{file_stores, EngineSpec};
use snapblk::testkit::storage::{CountingStorage, MemStorage};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};

const CHUNK: u64 = 64 << 10;

type Counting = CountingStorage;

/// The fixture engine with 64 KiB chunks, a 1 MiB journal and a low-space warning below 512 MiB.
fn engine(origin: Arc<Counting>, cache: Arc<Counting>) -> CacheObject {
    EngineSpec::default()
        .chunk_size(CHUNK)
        .low_space(1 << 29)
        .journal(1 << 20)
        .on(origin, cache)
}

#[test]
fn whole_chunk_write_to_a_snapshot_reads_no_old_data() {
    let origin = Counting::new(16 * CHUNK);
    let cache = Counting::new(0);
    let eng = engine(origin.clone(), cache.clone());
    let s = eng.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
    let child = eng.create_snapshot(s, "child", false).unwrap();
    let (o0, c0) = (
        origin.reads.load(Ordering::Relaxed),
        cache.reads.load(Ordering::Relaxed),
    );
    // s reads through to the origin, and has a child that must keep the old data: that
    // preserving copy is one origin read; s's own whole-chunk write reads nothing more.
    eng.write(s, 3 * CHUNK, &vec![5u8; CHUNK as usize]).unwrap();
    assert_eq!(origin.reads.load(Ordering::Relaxed) - o0, 1);
    assert_eq!(cache.reads.load(Ordering::Relaxed) - c0, 0);
    // Once the child has its copy, whole-chunk writes read nothing at all.
    let o1 = origin.reads.load(Ordering::Relaxed);
    eng.write(s, 3 * CHUNK, &vec![7u8; CHUNK as usize]).unwrap();
    // A fresh writable snapshot without children: a whole-chunk write reads nothing either.
    let lone = eng.create_snapshot(DeviceId::ORIGIN, "lone", true).unwrap();
    eng.write(lone, 6 * CHUNK, &vec![8u8; CHUNK as usize])
        .unwrap();
    assert_eq!(origin.reads.load(Ordering::Relaxed), o1);
    assert_eq!(cache.reads.load(Ordering::Relaxed) - c0, 0);
    let mut buf = vec![1u8; CHUNK as usize];
    eng.read(child, 3 * CHUNK, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // A partial write does fill the rest from the old view.
    let f = eng.stats().cow_fills;
    eng.write(s, 5 * CHUNK + 512, &[1u8; 512]).unwrap();
    assert_eq!(eng.stats().cow_fills, f + 1);
}

#[test]
fn concurrent_writes_to_one_chunk_copy_it_once_and_share_commits() {
    let origin = Counting::new(64 * CHUNK);
    let cache = Counting::new(0);
    let eng = engine(origin, cache.clone());
    for i in 0..20 {
        eng.create_snapshot(DeviceId::ORIGIN, &format!("s{i}"), i % 2 == 0)
            .unwrap();
    }
    let before = eng.stats();
    let threads = 4;
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (eng, barrier) = (&eng, &barrier);
            s.spawn(move || {
                barrier.wait();
                // All threads hit chunk 0 at once, then each its own chunks.
                eng.write(DeviceId::ORIGIN, 512 * t as u64, &[t as u8; 512])
                    .unwrap();
                for k in 0..10u64 {
                    let c = 1 + t as u64 * 10 + k;
                    eng.write(DeviceId::ORIGIN, c * CHUNK, &[1u8; 4096])
                        .unwrap();
                }
            });
        }
    });
    let after = eng.stats();
    assert_eq!(after.copies - before.copies, 1 + threads as u64 * 10);
    let commits = after.commits - before.commits;
    // Every first touch needs a commit, but concurrent writers share them.
    assert!(
        commits <= 1 + threads as u64 * 10,
        "{commits} commits for {} first touches",
        1 + threads * 10
    );
    eprintln!(
        "group commit: {commits} commits for {} first-touch writes",
        1 + threads * 10
    );
    eng.verify_in_memory().unwrap();
}

#[test]
fn attributes_persist_and_low_space_is_reported() {
    let origin = Counting::new(16 * CHUNK);
    let cache = Counting::new(0);
    let eng = engine(origin.clone(), cache.clone());
    let s = eng.create_snapshot(DeviceId::ORIGIN, "vm1", true).unwrap();
    eng.set_device_attr(s, "serial", Some("SN-1")).unwrap();
    eng.set_device_attr(s, "socket", Some("/run/vm1.sock"))
        .unwrap();
    eng.set_device_attr(s, "socket", None).unwrap();
    // The low-space flag follows free space against the configured threshold.
    let st = eng.stats();
    assert_eq!(st.low_space, st.free_bytes < (1 << 29));
    drop(eng);
    let eng = CacheObject::open(origin, cache, OpenOptions::default()).unwrap();
    let info = eng.device(s).unwrap();
    assert_eq!(info.name, "vm1");
    assert_eq!(info.attrs.get("serial").map(String::as_str), Some("SN-1"));
    assert!(!info.attrs.contains_key("socket"));
    assert!(info.writable);
    assert_eq!(info.parent, Some(0));
}

#[test]
fn deleting_a_snapshot_gives_its_space_back_to_the_file_system() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let stores = file_stores(dir.path(), 128 * CHUNK);
    let (origin, cache, cpath) = (stores.origin, stores.cache, stores.cache_path);
    let eng = CacheObject::create(
        origin,
        cache,
        CreateOptions {
            chunk_size: CHUNK,
            ..Default::default()
        },
    )
    .unwrap();
    let s = eng.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
    eng.write(s, 0, &vec![3u8; 64 * CHUNK as usize]).unwrap();
    eng.flush().unwrap();
    let full = std::fs::metadata(&cpath).unwrap().blocks();
    eng.delete_snapshot(s).unwrap();
    let after = std::fs::metadata(&cpath).unwrap().blocks();
    assert!(
        after + (60 * CHUNK / 512) <= full,
        "allocated 512-byte blocks: {full} before delete, {after} after"
    );
    assert_eq!(eng.stats().blocks_used, 0);
}

/// A limit raised at open is persisted at once: blocks allocated above the old limit must not
/// make the cache object unopenable when it is next opened without the option.
#[test]
fn a_raised_size_limit_survives_the_next_open() {
    const CHUNK: u64 = 4096;
    let origin = Arc::new(MemStorage::new(256 * CHUNK));
    let cache = Arc::new(MemStorage::new(0));
    let journal = 64 * 1024;
    let probe = CacheObject::create(
        origin.clone(),
        cache.clone(),
        CreateOptions {
            chunk_size: CHUNK,
            max_size: 64 << 20,
            journal_size: journal,
            ..Default::default()
        },
    )
    .unwrap();
    let small = probe.cache_info().data_offset + 16 * CHUNK;
    drop(probe);
    let cache = Arc::new(MemStorage::new(0));
    let opts = CreateOptions {
        chunk_size: CHUNK,
        max_size: small,
        journal_size: journal,
        ..Default::default()
    };
    drop(CacheObject::create(origin.clone(), cache.clone(), opts).unwrap());

    let raised = OpenOptions {
        max_size: Some(small + 200 * CHUNK),
        ..Default::default()
    };
    let eng = CacheObject::open(origin.clone(), cache.clone(), raised).unwrap();
    let s = eng.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
    for c in 0..100u64 {
        eng.write(s, c * CHUNK, &[7u8; CHUNK as usize]).unwrap();
    }
    eng.flush().unwrap();
    drop(eng);

    let eng = CacheObject::open(origin, cache, OpenOptions::default())
        .expect("reopen with the stored limit");
    assert_eq!(eng.cache_info().max_size, small + 200 * CHUNK);
    let mut buf = vec![0u8; CHUNK as usize];
    eng.read(s, 99 * CHUNK, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 7));
}
