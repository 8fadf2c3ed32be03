//! Device ids and table slots through the engine (`devids.rs`): snapshot churn keeps the
//! table small, ids are never reused (also across a reopen), a stale id never reaches the
//! device that took its slot, and a cache object of an earlier build (counter ids, no flag)
//! opens and is upgraded at its first snapshot.

use crate::cow::devids::{self, MAX_SLOTS};
use crate::cow::engine::lock;
use crate::cow::format::{Record, INCOMPAT_SLOT_IDS};
use crate::cow::{CacheObject, CowError, DeviceId, OpenOptions};
use crate::testkit::engine::{mem_engine, MemEngine, CHUNK};
use std::collections::HashSet;

fn slots(eng: &CacheObject) -> usize {
    eng.read_state().meta.devices.len()
}

fn incompat(eng: &CacheObject) -> u64 {
    lock(&eng.journal).header.incompat
}

/// A CI farm's life: one long-lived snapshot, and a snapshot created, written and deleted per
/// test. The table stays at three slots and the registry with it; every id is new.
#[test]
fn snapshot_churn_reuses_slots_never_ids() {
    let MemEngine {
        origin,
        cache,
        engine: eng,
    } = mem_engine(8).build();
    let golden = eng
        .create_snapshot(DeviceId::ORIGIN, "golden", true)
        .unwrap();
    let mut seen = HashSet::from([0, golden.0]);
    for i in 0..500u64 {
        let vm = eng
            .create_snapshot(golden, &format!("vm{i}"), true)
            .unwrap();
        assert!(seen.insert(vm.0), "id {} issued twice", vm.0);
        eng.write(vm, 0, &[i as u8; 512]).unwrap();
        eng.delete_snapshot(vm).unwrap();
    }
    assert_eq!(slots(&eng), 3, "origin, golden, one at a time");
    assert_eq!(eng.registry.load().len(), 3);
    eng.verify_in_memory().unwrap();
    let last = *seen.iter().max().unwrap();
    drop(eng);
    // The counter is durable: after a reopen the next id is newer still.
    let eng = CacheObject::open(origin, cache, OpenOptions::default()).unwrap();
    let next = eng.create_snapshot(golden, "after", false).unwrap();
    assert!(next.0 > last && !seen.contains(&next.0));
    assert_eq!(devids::slot(next.0), Some(2), "the lowest free slot");
}

/// A deleted device's id fails as "no such device" everywhere, also once a newer device sits
/// in its slot: it never reads or writes the newcomer's data.
#[test]
fn a_stale_id_never_reaches_the_device_in_its_slot() {
    let eng = mem_engine(8).build().engine;
    let old = eng.create_snapshot(DeviceId::ORIGIN, "old", true).unwrap();
    eng.delete_snapshot(old).unwrap();
    let new = eng.create_snapshot(DeviceId::ORIGIN, "new", true).unwrap();
    assert_eq!(devids::slot(old.0), devids::slot(new.0));
    eng.write(new, 0, &[7u8; CHUNK as usize]).unwrap();
    let mut buf = vec![0u8; 512];
    let no_device = |r: crate::cow::Result<()>| matches!(r, Err(CowError::NoDevice(d)) if d == old);
    assert!(no_device(eng.read(old, 0, &mut buf)));
    assert!(no_device(eng.write(old, 0, &buf)));
    assert!(no_device(eng.delete_snapshot(old)));
    assert!(no_device(eng.set_device_attr(old, "k", Some("v"))));
    assert!(eng.device(old).is_none());
    assert!(eng.create_snapshot(old, "child", false).is_err());
    eng.read(new, 0, &mut buf).unwrap();
    assert_eq!(buf, [7u8; 512]);
    eng.verify_in_memory().unwrap();
}

/// Records naming a slot past the bound are refused when applied (replay of a damaged
/// journal), without allocating a table for them.
#[test]
fn a_record_naming_a_slot_past_the_bound_is_refused() {
    let eng = mem_engine(8).build().engine;
    for id in [MAX_SLOTS, 1 << 32 | MAX_SLOTS, u64::MAX] {
        let mut st = eng.write_state();
        let r = st.log(Record::CreateDevice {
            id,
            parent: 0,
            writable: true,
            name: format!("x{id}"),
        });
        assert!(r.is_err(), "id {id} accepted");
        assert!(st.meta.devices.len() < 4);
    }
}

/// A cache object of an earlier build: ids were the counter (device 1, 2, ...) and the header
/// has no `INCOMPAT_SLOT_IDS`. It opens; its device keeps its id; the first snapshot this
/// build creates sets the flag (with a checkpoint) and takes a slotted id past the counter.
#[test]
fn an_earlier_builds_counter_ids_open_and_the_first_create_upgrades() {
    let MemEngine {
        origin,
        cache,
        engine: eng,
    } = mem_engine(8).build();
    // What the earlier build wrote: `CreateDevice` with id 1, in a file without the flag.
    let e = eng
        .write_state()
        .log(Record::CreateDevice {
            id: 1,
            parent: 0,
            writable: true,
            name: "legacy".into(),
        })
        .unwrap();
    eng.commit(e, false).unwrap();
    {
        let mut j = lock(&eng.journal);
        j.header.incompat &= !INCOMPAT_SLOT_IDS;
        let (_, checkpointed) = eng.commit_with(&mut j, true).unwrap();
        assert!(checkpointed);
    }
    eng.write(DeviceId(1), 0, &[3u8; 512]).unwrap();
    drop(eng);
    let eng = CacheObject::open(origin, cache, OpenOptions::default()).unwrap();
    assert_eq!(incompat(&eng) & INCOMPAT_SLOT_IDS, 0);
    let mut buf = vec![0u8; 512];
    eng.read(DeviceId(1), 0, &mut buf).unwrap();
    assert_eq!(buf, [3u8; 512]);
    let s = eng.create_snapshot(DeviceId(1), "new", false).unwrap();
    assert_ne!(incompat(&eng) & INCOMPAT_SLOT_IDS, 0);
    assert_eq!(s.0, devids::compose(2, 2).unwrap());
    eng.read(s, 0, &mut buf).unwrap();
    assert_eq!(buf, [3u8; 512]);
    eng.verify_in_memory().unwrap();
}
