//! Tests of `resize.rs`: grow and shrink of the origin and of snapshots, the views past a
//! device's old end, sizes across reopens and crashes, and the format flag.

use super::*;
use crate::cow::format::INCOMPAT_ORIGIN_COPIES;
use crate::cow::recovery::read_header;
use crate::cow::{check_cache, CacheObject, OpenOptions};
use crate::storage::Storage;
use crate::testkit::engine::{mem_engine, CHUNK};
use crate::testkit::storage::{CrashController, MemStorage};
use std::sync::Arc;

const C: u64 = CHUNK;

fn read(eng: &CacheObject, dev: DeviceId, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0xEEu8; len as usize];
    eng.read(dev, off, &mut buf).unwrap();
    buf
}

fn all(v: &[u8], b: u8) -> bool {
    v.iter().all(|&x| x == b)
}

/// Checks the cache object offline, reopens it and verifies the reopened state.
fn reopen(origin: &Arc<MemStorage>, cache: &Arc<MemStorage>) -> CacheObject {
    let report = check_cache(&**cache);
    assert!(report.is_clean(), "{report}");
    let eng = CacheObject::open(origin.clone(), cache.clone(), OpenOptions::default()).unwrap();
    eng.verify_in_memory().unwrap();
    eng
}

/// A snapshot grown past its parent reads zeros in the new range, keeps its data, takes
/// writes there; the origin grows its image; sizes and data survive a reopen; children take
/// their parent's size at creation.
#[test]
fn grow_origin_and_snapshots_and_reopen() {
    let m = mem_engine(8).origin(vec![7u8; (8 * C) as usize]).build();
    let eng = &m.engine;
    let s = eng.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
    eng.write(s, 0, &[1u8; 512]).unwrap();
    assert_eq!(
        eng.resize_device(s, 12 * C, false).unwrap(),
        Resized {
            old: 8 * C,
            new: 12 * C
        }
    );
    assert_eq!(eng.device_size(s).unwrap(), 12 * C);
    assert_eq!(eng.origin_size(), 8 * C, "the parent keeps its size");
    assert!(
        all(&read(eng, s, 8 * C, 4 * C), 0),
        "the new range reads zeros"
    );
    assert!(all(&read(eng, s, 512, 8 * C - 512), 7), "old data kept");
    assert!(all(&read(eng, s, 0, 512), 1));
    eng.write(s, 10 * C + 512, &[9u8; 1024]).unwrap();
    assert!(
        eng.read(s, 12 * C, &mut [0u8; 512]).is_err(),
        "past the new end"
    );
    // The origin grows its image; a snapshot of it taken after has the new size.
    eng.resize_device(DeviceId::ORIGIN, 10 * C, false).unwrap();
    assert_eq!(m.origin.size(), 10 * C);
    assert!(all(&read(eng, DeviceId::ORIGIN, 8 * C, 2 * C), 0));
    eng.write(DeviceId::ORIGIN, 9 * C, &[5u8; 512]).unwrap();
    let t = eng.create_snapshot(DeviceId::ORIGIN, "t", false).unwrap();
    assert_eq!(eng.device_size(t).unwrap(), 10 * C);
    // Writing the origin's new range leaves s (grown past the origin) reading zeros there.
    eng.write(DeviceId::ORIGIN, 8 * C, &[6u8; C as usize])
        .unwrap();
    assert!(all(&read(eng, s, 8 * C, 2 * C + 512), 0));
    eng.verify_in_memory().unwrap();
    eng.flush().unwrap();
    // The checker reports the origin's size now, and the size it was created with.
    let report = check_cache(&*m.cache);
    assert_eq!(report.origin_size, Some(10 * C));
    let line = format!("origin {} B (created at {} B)", 10 * C, 8 * C);
    assert!(report.to_string().contains(&line), "{report}");
    let eng = reopen(&m.origin, &m.cache);
    assert_eq!(eng.device_size(s).unwrap(), 12 * C);
    assert_eq!(eng.device_size(t).unwrap(), 10 * C);
    assert_eq!(eng.origin_size(), 10 * C);
    assert!(
        all(&read(&eng, s, 10 * C + 512, 1024), 9),
        "write past the old end kept"
    );
    assert!(all(&read(&eng, s, 8 * C, 2 * C + 512), 0));
    assert!(all(&read(&eng, t, 9 * C, 512), 5));
    assert!(all(&read(&eng, t, 8 * C, 512), 0), "t's point in time");
    let i = eng.devices();
    assert_eq!(i.iter().find(|d| d.name == "s").unwrap().size, 12 * C);
}

/// Shrink is refused without force; with it, children keep the data of the cut range (the
/// write rule), the device's blocks there are released, and growing again reads zeros, not
/// the old data (also in a short last chunk).
#[test]
fn shrink_keeps_childrens_views_and_regrows_to_zeros() {
    let m = mem_engine(8).origin(vec![7u8; (8 * C) as usize]).build();
    let eng = &m.engine;
    let s = eng.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
    eng.write(s, 4 * C, &[3u8; (4 * C) as usize]).unwrap();
    let child = eng.create_snapshot(s, "child", false).unwrap();
    let err = eng.resize_device(s, 4 * C + 1024, false).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(eng.device_size(s).unwrap(), 8 * C);
    let blocks_before = eng.stats().blocks_used;
    eng.resize_device(s, 4 * C + 1024, true).unwrap();
    assert_eq!(eng.device_size(s).unwrap(), 4 * C + 1024);
    assert!(
        all(&read(eng, child, 4 * C, 4 * C), 3),
        "the child keeps its view"
    );
    assert!(eng.read(s, 5 * C, &mut [0u8; 512]).is_err());
    assert!(eng.stats().blocks_used <= blocks_before, "no copy made");
    eng.delete_snapshot(child).unwrap();
    eng.resize_device(s, 8 * C, false).unwrap();
    assert!(all(&read(eng, s, 4 * C, 1024), 3), "kept below the cut");
    assert!(
        all(&read(eng, s, 4 * C + 1024, 4 * C - 1024), 0),
        "the cut range, short chunk included, reads zeros"
    );
    // The origin: snapshots keep the cut range; the file is cut; grown again it reads zeros.
    let o = eng.create_snapshot(DeviceId::ORIGIN, "o", false).unwrap();
    eng.resize_device(DeviceId::ORIGIN, 2 * C + 512, true)
        .unwrap();
    assert_eq!(m.origin.size(), 2 * C + 512);
    assert!(
        all(&read(eng, o, 0, 8 * C), 7),
        "o keeps the origin's old data"
    );
    eng.resize_device(DeviceId::ORIGIN, 8 * C, false).unwrap();
    assert!(all(&read(eng, DeviceId::ORIGIN, 0, 2 * C + 512), 7));
    assert!(all(
        &read(eng, DeviceId::ORIGIN, 2 * C + 512, 6 * C - 512),
        0
    ));
    assert!(all(&read(eng, o, 0, 8 * C), 7));
    eng.verify_in_memory().unwrap();
    eng.flush().unwrap();
    let eng = reopen(&m.origin, &m.cache);
    assert!(all(&read(&eng, o, 0, 8 * C), 7));
    assert!(all(&read(&eng, s, 4 * C + 1024, 4 * C - 1024), 0));
}

/// Sizes that are not whole sectors, zero or huge are refused, as are unknown devices, and
/// a remote (read-only) origin.
#[test]
fn bad_sizes_and_devices_are_refused() {
    let m = mem_engine(8).build();
    let eng = &m.engine;
    for bad in [0, 1000, MAX_DEVICE_SIZE + 512] {
        assert!(
            matches!(
                eng.resize_device(DeviceId::ORIGIN, bad, true),
                Err(CowError::InvalidOption(_))
            ),
            "{bad}"
        );
    }
    assert!(matches!(
        eng.resize_device(DeviceId(9), 8 * C, false),
        Err(CowError::NoDevice(_))
    ));
    let r = mem_engine(8).build_remote();
    assert!(matches!(
        r.engine.resize_device(DeviceId::ORIGIN, 16 * C, false),
        Err(CowError::Origin(_))
    ));
    let s = r
        .engine
        .create_snapshot(DeviceId::ORIGIN, "s", true)
        .unwrap();
    r.engine.resize_device(s, 16 * C, false).unwrap();
    assert!(all(&read(&r.engine, s, 8 * C, 8 * C), 0));
}

/// `GrowBy` grows from the size the device has when the resize runs; growth past the largest
/// size (or overflowing) is refused like a size past it.
#[test]
fn growth_counts_from_the_size_at_the_time() {
    let m = mem_engine(8).build();
    let eng = &m.engine;
    let s = eng.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
    let done = eng
        .resize_device_to(s, NewSize::GrowBy(2 * C), false)
        .unwrap();
    assert_eq!((done.old, done.new), (8 * C, 10 * C));
    let done = eng.resize_device_to(s, NewSize::GrowBy(C), false).unwrap();
    assert_eq!((done.old, done.new), (10 * C, 11 * C));
    for bad in [u64::MAX - 511, MAX_DEVICE_SIZE, 100] {
        assert!(
            matches!(
                eng.resize_device_to(s, NewSize::GrowBy(bad), false),
                Err(CowError::InvalidOption(_))
            ),
            "{bad}"
        );
    }
    assert_eq!(eng.device_size(s).unwrap(), 11 * C);
}

/// A cache object never resized keeps its format (no flag: older builds open it); the first
/// resize sets the incompatible flag that makes an older build refuse it.
#[test]
fn the_first_resize_sets_the_format_flag() {
    let m = mem_engine(8).build();
    let h = read_header(&*m.cache).unwrap();
    assert_eq!(h.incompat & INCOMPAT_DEVICE_SIZES, 0);
    let s = m
        .engine
        .create_snapshot(DeviceId::ORIGIN, "s", true)
        .unwrap();
    drop(m.engine);
    let eng = reopen(&m.origin, &m.cache);
    assert_eq!(
        eng.device_size(s).unwrap(),
        8 * C,
        "an old cache object opens"
    );
    eng.resize_device(s, 9 * C, false).unwrap();
    let h = read_header(&*m.cache).unwrap();
    assert_ne!(h.incompat & INCOMPAT_DEVICE_SIZES, 0);
    assert_ne!(
        h.incompat & !INCOMPAT_ORIGIN_COPIES,
        0,
        "a build knowing only the older features refuses it"
    );
}

/// Crashed at every I/O event of a snapshot grow and of an origin grow and shrink, the
/// reopened cache object is clean and each device has its old size or its new one, with its
/// data (the origin file longer than recorded is cut back).
#[test]
fn a_resize_is_old_or_new_after_a_crash_at_any_point() {
    for (dev_is_origin, new) in [(false, 11 * C + 512), (true, 11 * C), (true, 3 * C)] {
        for crash_at in 1..200 {
            let ctl = CrashController::new(crash_at, 0);
            let origin = ctl.store(vec![4u8; (8 * C) as usize]);
            let cache = ctl.store(Vec::new());
            let eng = mem_engine(8).on(origin.clone(), cache.clone());
            let s = eng.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
            eng.write(s, 7 * C, &[2u8; 512]).unwrap();
            eng.flush().unwrap();
            let dev = if dev_is_origin { DeviceId::ORIGIN } else { s };
            let before = ctl.events();
            ctl.arm(crash_at);
            let done = eng.resize_device(dev, new, true);
            let finished = !ctl.crashed();
            ctl.crash_now();
            std::mem::forget(eng);
            let image = |s: &crate::testkit::storage::CrashStorage| {
                Arc::new(MemStorage::from_bytes(s.crash_image().unwrap()))
            };
            let (o, c) = (image(&origin), image(&cache));
            let eng = reopen(&o, &c);
            let size = eng.device_size(dev).unwrap();
            assert!(
                size == 8 * C || size == new,
                "crash at {crash_at}: size {size}"
            );
            if finished {
                assert!(done.is_ok());
                assert_eq!(size, new, "a returned resize is durable");
            }
            assert!(all(&read(&eng, s, 0, 7 * C), 4), "crash at {crash_at}");
            assert!(all(&read(&eng, s, 7 * C, 512), 2));
            let ssize = eng.device_size(s).unwrap();
            if ssize > 8 * C {
                assert!(all(&read(&eng, s, 8 * C, ssize - 8 * C), 0));
            }
            let osize = eng.origin_size();
            assert_eq!(o.size(), osize, "the origin file has its recorded size");
            if finished && ctl.events() - before < crash_at {
                break;
            }
        }
    }
}

/// A child that stopped reading through where its parent still does (shrunk, then grown
/// again) keeps reading zeros there when the parent, or the origin, is written: it does not
/// share the parent's view, so it is not given it.
#[test]
fn a_child_regrown_past_its_parents_view_keeps_its_zeros() {
    let m = mem_engine(8).origin(vec![7u8; (8 * C) as usize]).build();
    let eng = &m.engine;
    let p = eng.create_snapshot(DeviceId::ORIGIN, "p", true).unwrap();
    let c = eng.create_snapshot(p, "c", true).unwrap();
    eng.resize_device(c, 4 * C, true).unwrap();
    eng.resize_device(c, 8 * C, false).unwrap();
    assert!(all(&read(eng, c, 4 * C, 4 * C), 0));
    eng.write(p, 6 * C, &[1u8; 512]).unwrap();
    eng.write(DeviceId::ORIGIN, 5 * C, &[2u8; 512]).unwrap();
    assert!(all(&read(eng, c, 4 * C, 4 * C), 0), "c keeps its zeros");
    assert!(
        all(&read(eng, p, 6 * C + 512, C - 512), 7),
        "p reads the origin's old data"
    );
    assert!(all(&read(eng, p, 5 * C, 512), 7));
    assert!(all(&read(eng, c, 0, 4 * C), 7));
    eng.verify_in_memory().unwrap();
    eng.flush().unwrap();
    let eng = reopen(&m.origin, &m.cache);
    assert!(all(&read(&eng, c, 4 * C, 4 * C), 0));
    assert!(all(&read(&eng, p, 6 * C, 512), 1));
}

/// A read-only snapshot grows and shrinks too: the zeroes a resize writes past its end are
/// not a write to it (its short last chunk and the blocks it inherited past its end).
#[test]
fn a_read_only_snapshot_is_resized() {
    let m = mem_engine(8)
        .origin(vec![7u8; (8 * C - 1024) as usize])
        .build();
    let eng = &m.engine;
    let s = eng.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
    eng.write(s, 0, &[5u8; (8 * C - 1024) as usize]).unwrap();
    let r = eng.create_snapshot(s, "r", false).unwrap();
    assert!(matches!(
        eng.write(r, 0, &[1u8; 512]),
        Err(CowError::ReadOnly(_))
    ));
    eng.resize_device(r, 6 * C + 512, true).unwrap();
    eng.resize_device(r, 10 * C, false).unwrap();
    assert!(all(&read(eng, r, 0, 6 * C + 512), 5));
    assert!(all(&read(eng, r, 6 * C + 512, 4 * C - 512), 0));
    assert!(
        all(&read(eng, s, 0, 8 * C - 1024), 5),
        "the parent keeps its data"
    );
    assert!(matches!(
        eng.write(r, 0, &[1u8; 512]),
        Err(CowError::ReadOnly(_))
    ));
    eng.verify_in_memory().unwrap();
}
