//! The offline checker catches damage.

use snapblk::cow::format::{encode_txn, Enc, Header, Record, JOURNAL_OFFSET};
use snapblk::cow::{check_cache, check_cache_path, CacheObject, CreateOptions, DeviceId};
use snapblk::storage::Storage;
use snapblk::testkit::engine::{file_stores, mem_engine, MemEngine, CHUNK};
use snapblk::testkit::storage::MemStorage;
use std::sync::Arc;

/// Snapshot "a" of [`build`]: the first device created (id counter 1, table slot 1; see
/// `snapblk::cow::devids`).
const A: u64 = 1 << 32 | 1;

fn build(journal_size: u64, writes: u64) -> Arc<MemStorage> {
    let MemEngine {
        cache, engine: eng, ..
    } = mem_engine(64).journal(journal_size).build();
    let a = eng.create_snapshot(DeviceId::ORIGIN, "a", true).unwrap();
    assert_eq!(a, DeviceId(A));
    let _b = eng.create_snapshot(a, "b", false).unwrap();
    for i in 0..writes {
        let c = i % 64;
        eng.write(DeviceId::ORIGIN, c * CHUNK, &vec![i as u8; 1024])
            .unwrap();
        eng.write(a, c * CHUNK + 2048, &vec![i as u8; 512]).unwrap();
        eng.flush().unwrap();
    }
    drop(eng);
    cache
}

fn header(cache: &MemStorage) -> Header {
    let mut best: Option<Header> = None;
    for slot in 0..2 {
        let mut buf = vec![0u8; 4096];
        cache.read_at(&mut buf, slot * 4096).unwrap();
        if let Ok(h) = Header::decode(&buf) {
            if best.as_ref().is_none_or(|b| h.generation > b.generation) {
                best = Some(h);
            }
        }
    }
    best.unwrap()
}

#[test]
fn clean_object_is_clean() {
    let cache = build(16 << 10, 40);
    let r = check_cache(cache.as_ref());
    assert!(r.is_clean(), "{r}");
    let text = r.to_string();
    assert!(text.contains("verdict: clean"), "{text}");
    assert_eq!(r.devices, 3);
}

#[test]
fn corrupt_header_is_caught() {
    let cache = build(16 << 10, 3);
    let mut buf = vec![0u8; 8192];
    cache.read_at(&mut buf, 0).unwrap();
    for slot in 0..2 {
        buf[slot * 4096 + 30] ^= 0x55;
    }
    cache.write_at(&buf, 0).unwrap();
    let r = check_cache(cache.as_ref());
    assert!(!r.is_clean());
    assert!(r.to_string().contains("NOT CLEAN"), "{r}");
}

#[test]
fn corrupt_checkpoint_is_caught() {
    // A small journal forces checkpoints.
    let cache = build(16 << 10, 60);
    let h = header(&cache);
    assert_ne!(h.ckpt_block, u64::MAX, "test needs a checkpoint");
    let at = h.data_offset + h.ckpt_block * h.chunk_size + 40;
    let mut b = [0u8; 1];
    cache.read_at(&mut b, at).unwrap();
    cache.write_at(&[b[0] ^ 0xff], at).unwrap();
    let r = check_cache(cache.as_ref());
    assert!(!r.is_clean(), "{r}");
    assert!(r.to_string().contains("checkpoint"), "{r}");
}

#[test]
fn bad_mapping_in_a_valid_transaction_is_caught() {
    let cache = build(1 << 20, 3);
    let before = check_cache(cache.as_ref());
    assert!(before.is_clean(), "{before}");
    let h = header(&cache);
    // Append a well-formed, correctly checksummed transaction that maps chunk 0 of device A
    // to a block far outside the cache object.
    let mut e = Enc::default();
    Record::SetEntry {
        dev: A,
        chunk: 0,
        entry: 1 << 40,
    }
    .encode(&mut e);
    let seq = h.ckpt_seq + before.journal_transactions + 1;
    let pos = h.journal_start + before.journal_bytes;
    cache
        .write_at(&encode_txn(seq, 0, &e.0), JOURNAL_OFFSET + pos)
        .unwrap();
    let r = check_cache(cache.as_ref());
    assert!(!r.is_clean(), "{r}");
    // Within the limit but never written: also caught.
    let mut e = Enc::default();
    Record::SetEntry {
        dev: A,
        chunk: 0,
        entry: 5000,
    }
    .encode(&mut e);
    cache
        .write_at(&encode_txn(seq, 0, &e.0), JOURNAL_OFFSET + pos)
        .unwrap();
    let r = check_cache(cache.as_ref());
    assert!(!r.is_clean(), "{r}");
    assert!(r.to_string().contains("past the end"), "{r}");
}

#[test]
fn check_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let stores = file_stores(dir.path(), 16 * CHUNK);
    let cpath = stores.cache_path.clone();
    let eng = CacheObject::create(stores.origin, stores.cache, CreateOptions::default()).unwrap();
    eng.create_snapshot(DeviceId::ORIGIN, "s", false).unwrap();
    eng.write(DeviceId::ORIGIN, 0, &[1u8; 4096]).unwrap();
    drop(eng);
    let r = check_cache_path(&cpath).unwrap();
    assert!(r.is_clean(), "{r}");
    assert!(check_cache_path(&dir.path().join("missing")).is_err());
}

#[test]
fn damage_in_the_middle_of_the_journal_is_caught() {
    let cache = build(1 << 20, 6);
    let before = check_cache(cache.as_ref());
    assert!(before.is_clean(), "{before}");
    assert!(before.journal_transactions >= 3);
    // Flip a byte in the payload of the first transaction after the checkpoint.
    let h = header(&cache);
    let at = JOURNAL_OFFSET + h.journal_start + 40;
    let mut b = [0u8; 1];
    cache.read_at(&mut b, at).unwrap();
    cache.write_at(&[b[0] ^ 0x01], at).unwrap();
    let r = check_cache(cache.as_ref());
    assert!(!r.is_clean(), "{r}");
    assert!(r.to_string().contains("journal damaged"), "{r}");
}
