//! Fuzzing whole cache objects: a valid object made by the engine fixture (snapshots of
//! snapshots, writes, attributes, a delete, a checkpoint and journal transactions after it),
//! damaged at random (bits flipped, bytes and little-endian fields overwritten with
//! interesting values, the file truncated or extended, in the header slots, the journal, the
//! checkpoint blocks and the data), sometimes with the damage re-sealed (header, transaction
//! and checkpoint checksums recomputed, header fields set to extreme values with a geometry
//! kept consistent) so that it reaches the decoders behind the checksums. Then `check_cache`
//! must return a report and `CacheObject::open` a result — never a panic, a hang (a watchdog
//! allows each case 60 s) or an allocation without bound (this binary's allocator refuses any
//! single allocation over 256 MiB, naming the case). An object that opens is read whole on
//! every device, written once and flushed, without panicking.
//!
//! `SNAPBLK_FUZZ_CASES=N` runs N cases with a random seed; the default run uses a fixed seed
//! (docs/testing.md).

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use snapblk::cow::format::*;
use snapblk::cow::{check_cache, CacheObject, DeviceId, OpenOptions};
use snapblk::storage::Storage;
use snapblk::testkit::engine::mem_engine;
use snapblk::testkit::fuzz::{self, BoundedAlloc, Watchdog};
use snapblk::testkit::storage::MemStorage;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

#[global_allocator]
static ALLOC: BoundedAlloc = BoundedAlloc::new(256 << 20);

const CHUNK: u64 = 4096;
const CHUNKS: u64 = 64;

/// The pristine object: origin bytes and cache bytes, with and without a checkpoint.
struct Pristine {
    origin: Vec<u8>,
    with_checkpoint: Vec<u8>,
    journal_only: Vec<u8>,
}

fn make(writes: u64) -> (Vec<u8>, Vec<u8>) {
    let f = mem_engine(CHUNKS).journal(16 << 10).build();
    let e = &f.engine;
    let s1 = e.create_snapshot(DeviceId::ORIGIN, "s1", true).unwrap();
    let s2 = e.create_snapshot(s1, "s2", false).unwrap();
    let s3 = e.create_snapshot(DeviceId::ORIGIN, "s3", true).unwrap();
    e.set_device_attr(s2, "socket", Some("/run/s2.sock"))
        .unwrap();
    for i in 0..writes {
        let dev = [DeviceId::ORIGIN, s1, s3][(i % 3) as usize];
        e.write(
            dev,
            (i * 7 % CHUNKS) * CHUNK + (i % 8) * 512,
            &[i as u8 + 1; 1024],
        )
        .unwrap();
        if i % 9 == 0 {
            e.flush().unwrap();
        }
        if i == writes / 2 {
            e.discard(s3, 5 * CHUNK, CHUNK).unwrap();
        }
    }
    e.delete_snapshot(s3).unwrap();
    e.create_snapshot(s2, "s4", true).unwrap();
    let origin = f.origin.to_bytes();
    let cache = f.cache.to_bytes();
    std::mem::forget(f); // no clean close: the journal keeps its last transactions
    (origin, cache)
}

fn pristine() -> &'static Pristine {
    static P: OnceLock<Pristine> = OnceLock::new();
    P.get_or_init(|| {
        let (origin, with_checkpoint) = make(160);
        let (_, journal_only) = make(6);
        let h = best_header(&with_checkpoint).unwrap();
        assert_ne!(h.ckpt_block, NO_BLOCK, "the fixture took a checkpoint");
        Pristine {
            origin,
            with_checkpoint,
            journal_only,
        }
    })
}

fn best_header(cache: &[u8]) -> Option<Header> {
    (0..2)
        .filter_map(|s| cache.get(s * 4096..(s + 1) * 4096))
        .filter_map(|b| Header::decode(b).ok())
        .max_by_key(|h| h.generation)
}

/// Areas of the file an edit aims at.
#[derive(Debug, Clone, Copy)]
enum Area {
    Header,
    Journal,
    Checkpoint,
    Anywhere,
}

#[derive(Debug, Clone)]
enum Edit {
    Flip(Area, prop::sample::Index, u8),
    Byte(Area, prop::sample::Index, u8),
    U32(Area, prop::sample::Index, u32),
    U64(Area, prop::sample::Index, u64),
    /// Sets header field `n` (of the numeric fields) to a value, keeping the other fields
    /// consistent where `keep_geometry`.
    Field(u8, u64, bool),
    Truncate(prop::sample::Index),
    Extend(u16),
}

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => 0u64..16,
        2 => (0u32..64).prop_map(|k| 1u64 << k),
        1 => (0u64..16).prop_map(|k| u64::MAX - k),
        1 => (0u64..4).prop_map(|k| (u64::MAX << 12) - (k << 12)),
        1 => (20u32..62).prop_map(|k| 1u64 << k),
        1 => any::<u64>(),
    ]
}

fn area() -> impl Strategy<Value = Area> {
    prop_oneof![
        2 => Just(Area::Header),
        3 => Just(Area::Journal),
        3 => Just(Area::Checkpoint),
        1 => Just(Area::Anywhere),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    let i = any::<prop::sample::Index>;
    prop_oneof![
        3 => (area(), i(), 0u8..8).prop_map(|(a, p, b)| Edit::Flip(a, p, b)),
        2 => (area(), i(), any::<u8>()).prop_map(|(a, p, b)| Edit::Byte(a, p, b)),
        2 => (area(), i(), any::<u32>()).prop_map(|(a, p, v)| Edit::U32(a, p, v)),
        3 => (area(), i(), interesting_u64()).prop_map(|(a, p, v)| Edit::U64(a, p, v)),
        3 => (0u8..13, interesting_u64(), any::<bool>()).prop_map(|(f, v, k)| Edit::Field(f, v, k)),
        1 => i().prop_map(Edit::Truncate),
        1 => (0u16..64).prop_map(Edit::Extend),
    ]
}

/// The byte range an area covers in this object.
fn range_of(cache: &[u8], area: Area) -> std::ops::Range<usize> {
    let len = cache.len();
    let h = best_header(cache);
    let r = match (area, &h) {
        (Area::Header, _) => 0..8192,
        (Area::Journal, Some(h)) => 8192..(h.journal_size as usize).saturating_add(8192),
        (Area::Checkpoint, Some(h)) if h.ckpt_block != NO_BLOCK => {
            let at = h
                .ckpt_block
                .saturating_mul(h.chunk_size)
                .saturating_add(h.data_offset) as usize;
            at..at.saturating_add(2 * h.chunk_size as usize)
        }
        _ => 0..len,
    };
    r.start.min(len)..r.end.min(len)
}

fn put(buf: &mut [u8], r: &std::ops::Range<usize>, p: &prop::sample::Index, bytes: &[u8]) {
    if r.len() < bytes.len() {
        return;
    }
    let at = r.start + p.index(r.len() - bytes.len() + 1);
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

fn set_field(h: &mut Header, field: u8, v: u64, keep_geometry: bool) {
    match field {
        0 => h.version = v as u32,
        1 => h.generation = v,
        2 => h.incompat = v,
        3 => h.compat = v,
        4 => h.chunk_size = v,
        5 => h.origin_size = v,
        6 => h.journal_size = v,
        7 => h.data_offset = v,
        8 => h.max_size = v,
        9 => h.ckpt_block = v,
        10 => h.ckpt_len = v,
        11 => h.ckpt_seq = v,
        _ => h.journal_start = v,
    }
    if keep_geometry {
        // Align and order what the header check requires, so a huge value gets through it.
        h.journal_size = (h.journal_size.max(2048) / 512).saturating_mul(512);
        h.journal_start = (h.journal_start % h.journal_size) / 512 * 512;
        let min_data = 8192u64.saturating_add(h.journal_size);
        let chunk = h.chunk_size.clamp(4096, 1 << 20).next_power_of_two();
        h.chunk_size = chunk;
        h.data_offset = h
            .data_offset
            .max(min_data)
            .div_ceil(chunk)
            .saturating_mul(chunk);
        h.max_size = h.max_size.max(h.data_offset.saturating_add(chunk));
    }
}

/// Applies the edits; with `reseal`, recomputes the checksums the edits broke.
fn damage(cache: &mut Vec<u8>, edits: &[Edit], reseal: bool) {
    for e in edits {
        match e {
            Edit::Flip(a, p, b) => {
                let r = range_of(cache, *a);
                if !r.is_empty() {
                    let at = r.start + p.index(r.len());
                    cache[at] ^= 1 << b;
                }
            }
            Edit::Byte(a, p, v) => {
                let r = range_of(cache, *a);
                put(cache, &r, p, &[*v]);
            }
            Edit::U32(a, p, v) => {
                let r = range_of(cache, *a);
                put(cache, &r, p, &v.to_le_bytes());
            }
            Edit::U64(a, p, v) => {
                let r = range_of(cache, *a);
                put(cache, &r, p, &v.to_le_bytes());
            }
            Edit::Field(f, v, keep) => {
                if let Some(mut h) = best_header(cache) {
                    set_field(&mut h, *f, *v, *keep);
                    let slot = (h.generation % 2) as usize * 4096;
                    if cache.len() >= slot + 4096 {
                        cache[slot..slot + 4096].copy_from_slice(&h.encode());
                    }
                }
            }
            Edit::Truncate(p) => {
                let n = p.index(cache.len() + 1);
                cache.truncate(n);
            }
            Edit::Extend(n) => cache.resize(cache.len() + usize::from(*n) * 512, 0),
        }
    }
    if reseal {
        reseal_checksums(cache);
    }
}

/// Recomputes every transaction's and checkpoint block's checksum, the checkpoint's whole
/// length and checksum and both header slots' checksums, over the damaged contents.
fn reseal_checksums(cache: &mut [u8]) {
    let Some(mut h) = best_header(cache).or_else(|| {
        // A header whose checksum broke: decode it again with the checksum fixed.
        let slot = cache.get(..4096)?;
        Header::decode(slot).ok()
    }) else {
        return;
    };
    let js = h.journal_size.min(cache.len().saturating_sub(8192) as u64) as usize;
    let mut pos = 0;
    while pos + 512 <= js {
        let at = 8192 + pos;
        if let Some(t) = parse_txn_header(&cache[at..]) {
            let len = txn_len(t.payload_len) as usize;
            if pos + len <= js {
                let payload = cache[at + TXN_HEADER..at + TXN_HEADER + t.payload_len].to_vec();
                let txn = encode_txn(t.seq, t.flags, &payload);
                cache[at..at + len].copy_from_slice(&txn);
            }
        }
        pos += 512;
    }
    let chunk = h.chunk_size as usize;
    let mut whole = Vec::new();
    let mut b = h.ckpt_block;
    let mut seen = 0;
    while b != NO_BLOCK && seen < 64 {
        seen += 1;
        let Some(at) = b
            .checked_mul(h.chunk_size)
            .and_then(|o| o.checked_add(h.data_offset))
            .map(|o| o as usize)
            .filter(|&o| o.saturating_add(chunk) <= cache.len())
        else {
            break;
        };
        let blk = &cache[at..at + chunk];
        let index = u32::from_le_bytes(blk[4..8].try_into().unwrap());
        let next = u64::from_le_bytes(blk[8..16].try_into().unwrap());
        let len = (u32::from_le_bytes(blk[16..20].try_into().unwrap()) as usize).min(chunk - 32);
        let data = blk[32..32 + len].to_vec();
        whole.extend_from_slice(&data);
        cache[at..at + chunk].copy_from_slice(&encode_ckpt_block(index, next, &data, chunk));
        b = next;
    }
    if h.ckpt_block != NO_BLOCK {
        h.ckpt_len = whole.len() as u64;
        h.ckpt_crc = crc32c::crc32c(&whole);
    }
    let slot = (h.generation % 2) as usize * 4096;
    if cache.len() >= slot + 4096 {
        cache[slot..slot + 4096].copy_from_slice(&h.encode());
    }
}

/// Checks, opens and uses a damaged object; anything but a panic, hang or unbounded
/// allocation is fine.
fn exercise(origin: &[u8], cache: Vec<u8>) {
    EXERCISED.fetch_add(1, Ordering::Relaxed);
    // New blocks go past the data offset: an in-memory store would grow to it (a file
    // would stay sparse), so objects whose data starts far out are not written to.
    let small = best_header(&cache).is_some_and(|h| h.data_offset < 16 << 20);
    let cache = Arc::new(MemStorage::from_bytes(cache));
    let report = check_cache(cache.as_ref());
    let _ = report.to_string();
    let origin = Arc::new(MemStorage::from_bytes(origin.to_vec()));
    let Ok(eng) = CacheObject::open(origin, cache.clone(), OpenOptions::default()) else {
        return;
    };
    OPENED.fetch_add(1, Ordering::Relaxed);
    let _ = eng.verify_in_memory();
    let mut buf = vec![0u8; (CHUNKS * CHUNK) as usize];
    for d in eng.devices() {
        let _ = eng.read(DeviceId(d.id), 0, &mut buf);
    }
    if small {
        let _ = eng.write(DeviceId::ORIGIN, 3 * CHUNK, &[7u8; 4096]);
        let _ = eng.flush();
    } else {
        // Dropping flushes, which may write a checkpoint past the data offset: leak it.
        std::mem::forget(eng);
    }
    let _ = cache.size();
}

/// Cases that reached `exercise`, and those whose object opened.
static EXERCISED: AtomicU64 = AtomicU64::new(0);
static OPENED: AtomicU64 = AtomicU64::new(0);

proptest! {
    #![proptest_config(ProptestConfig {
        cases: fuzz::cases(300),
        failure_persistence: None,
        rng_seed: fuzz::seed().map_or(RngSeed::Random, RngSeed::Fixed),
        ..ProptestConfig::default()
    })]

    #[test]
    fn damaged_cache_objects_are_refused_or_opened_never_crash(
        journal_only in prop_oneof![3 => Just(false), 1 => Just(true)],
        edits in prop::collection::vec(edit(), 1..6),
        reseal in any::<bool>(),
    ) {
        let p = pristine();
        WATCHDOG.with(|w| w.pet());
        let mut cache = if journal_only { p.journal_only.clone() } else { p.with_checkpoint.clone() };
        damage(&mut cache, &edits, reseal);
        fuzz::set_case(format!("journal_only {journal_only} reseal {reseal} edits {edits:?}"));
        exercise(&p.origin, cache);
    }
}

/// Most damaged objects reach the checker and the opener, and some still open: the harness
/// reaches the code behind the checksums.
#[test]
fn damaged_objects_reach_the_decoders() {
    damaged_cache_objects_are_refused_or_opened_never_crash();
    let (ex, op) = (
        EXERCISED.load(Ordering::Relaxed),
        OPENED.load(Ordering::Relaxed),
    );
    eprintln!("damaged objects checked: {ex}, of which opened: {op}");
    assert!(
        ex > u64::from(fuzz::cases(300)) / 2 && op > 0,
        "{ex} checked, {op} opened"
    );
}

thread_local! {
    static WATCHDOG: Watchdog = Watchdog::start(Duration::from_secs(5));
}

/// The pristine objects are clean and open with every device readable (else every case
/// would start from an error and test little).
#[test]
fn the_pristine_objects_are_clean() {
    let p = pristine();
    for cache in [&p.with_checkpoint, &p.journal_only] {
        let c = Arc::new(MemStorage::from_bytes(cache.clone()));
        let report = check_cache(c.as_ref());
        assert!(report.is_clean(), "{report}");
        let origin = Arc::new(MemStorage::from_bytes(p.origin.clone()));
        let eng = CacheObject::open(origin, c, OpenOptions::default()).unwrap();
        assert_eq!(eng.devices().len(), 4);
        eng.verify_in_memory().unwrap();
    }
}
