//! Fuzzing the cache object's decoders (`snapblk::cow::format` and the checkpoint codec):
//! journal records, transaction headers and checksums, header slots, checkpoint blocks and
//! whole checkpoints. On arbitrary or corrupted bytes each returns a value or an error, never
//! panics and never sizes an allocation from an unchecked length field (this binary's
//! allocator refuses any single allocation over 256 MiB, naming the case). Where a decoder
//! has an encoder, a round trip gives the value back, and checksummed structures notice any
//! single flipped bit.
//!
//! `SNAPBLK_FUZZ_CASES=N` runs N cases per harness with a random seed; the default run uses
//! a fixed seed (docs/testing.md).

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use snapblk::cow::format::*;
use snapblk::cow::meta::Meta;
use snapblk::cow::{check_cache, CacheObject, DeviceId, OpenOptions};
use snapblk::testkit::engine::mem_engine;
use snapblk::testkit::fuzz::{self, BoundedAlloc};
use snapblk::testkit::storage::MemStorage;
use std::sync::Arc;

#[global_allocator]
static ALLOC: BoundedAlloc = BoundedAlloc::new(256 << 20);

/// u64 values that break careless arithmetic and allocation: around 0, the powers of two,
/// the top of the range.
fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => 0u64..16,
        2 => (0u32..64).prop_map(|k| 1u64 << k),
        1 => (0u32..64).prop_map(|k| (1u64 << k).wrapping_sub(1)),
        1 => (0u64..16).prop_map(|k| u64::MAX - k),
        1 => (40u32..63).prop_map(|k| (1u64 << k) - 4096),
        1 => (0u64..4).prop_map(|k| (u64::MAX << 9) - k * 512),
        2 => any::<u64>(),
    ]
}

fn short_string() -> impl Strategy<Value = String> {
    prop_oneof![".{0,24}", Just(String::new()), Just("x".repeat(600))]
}

fn record() -> impl Strategy<Value = Record> {
    let u = interesting_u64;
    prop_oneof![
        (u(), u(), any::<bool>(), short_string()).prop_map(|(id, parent, writable, name)| {
            Record::CreateDevice {
                id,
                parent,
                writable,
                name,
            }
        }),
        u().prop_map(|id| Record::DeleteDevice { id }),
        (u(), u(), u()).prop_map(|(dev, chunk, entry)| Record::SetEntry { dev, chunk, entry }),
        (u(), u(), u()).prop_map(|(dev, chunk, entry)| Record::ShareDown { dev, chunk, entry }),
        (u(), u(), u()).prop_map(|(chunk, time, entry)| Record::Preserve { chunk, time, entry }),
        u().prop_map(|dev| Record::SetInoperative { dev }),
        (u(), short_string(), prop::option::of(short_string()))
            .prop_map(|(dev, key, value)| Record::SetAttr { dev, key, value }),
    ]
}

/// One edit of a byte string: flip a bit, overwrite a byte, overwrite 4 or 8 bytes with an
/// interesting little-endian value (how a length field becomes 2^60), truncate or extend.
#[derive(Debug, Clone)]
enum Edit {
    Flip(prop::sample::Index, u8),
    Byte(prop::sample::Index, u8),
    U32(prop::sample::Index, u32),
    U64(prop::sample::Index, u64),
    Truncate(prop::sample::Index),
    Extend(Vec<u8>),
}

fn edit() -> impl Strategy<Value = Edit> {
    let i = any::<prop::sample::Index>;
    prop_oneof![
        3 => (i(), 0u8..8).prop_map(|(p, b)| Edit::Flip(p, b)),
        2 => (i(), any::<u8>()).prop_map(|(p, b)| Edit::Byte(p, b)),
        2 => (i(), prop_oneof![any::<u32>(), Just(u32::MAX), Just(1 << 31)]).prop_map(|(p, v)| Edit::U32(p, v)),
        3 => (i(), interesting_u64()).prop_map(|(p, v)| Edit::U64(p, v)),
        1 => i().prop_map(Edit::Truncate),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Edit::Extend),
    ]
}

fn apply(buf: &mut Vec<u8>, edits: &[Edit]) {
    for e in edits {
        if buf.is_empty() && !matches!(e, Edit::Extend(_)) {
            continue;
        }
        let put = |buf: &mut Vec<u8>, at: usize, bytes: &[u8]| {
            let at = at.min(buf.len().saturating_sub(bytes.len()));
            let n = bytes.len().min(buf.len() - at);
            buf[at..at + n].copy_from_slice(&bytes[..n]);
        };
        match e {
            Edit::Flip(p, b) => {
                let at = p.index(buf.len());
                buf[at] ^= 1 << b;
            }
            Edit::Byte(p, v) => {
                let at = p.index(buf.len());
                buf[at] = *v;
            }
            Edit::U32(p, v) => put(buf, p.index(buf.len()), &v.to_le_bytes()),
            Edit::U64(p, v) => put(buf, p.index(buf.len()), &v.to_le_bytes()),
            Edit::Truncate(p) => buf.truncate(p.index(buf.len())),
            Edit::Extend(b) => buf.extend_from_slice(b),
        }
    }
}

fn encode_all(records: &[Record]) -> Vec<u8> {
    let mut e = Enc::default();
    for r in records {
        r.encode(&mut e);
    }
    e.0
}

/// A header as the engine writes one, with fields from `u64s` where given.
fn header(fields: &[Option<u64>; 10], tag: String) -> Header {
    let f = |i: usize, d: u64| fields[i].unwrap_or(d);
    Header {
        version: f(0, 2) as u32,
        generation: f(1, 7),
        incompat: f(2, 0),
        compat: f(3, 0),
        chunk_size: f(4, 4096),
        origin_size: f(5, 64 * 4096),
        origin_tag: tag,
        journal_size: f(6, 16 << 10),
        data_offset: f(7, 24 << 10),
        max_size: f(8, 1 << 30),
        ckpt_block: f(9, NO_BLOCK),
        ckpt_len: 0,
        ckpt_crc: 0,
        ckpt_seq: 0,
        journal_start: 0,
    }
}

/// A real checkpoint: the bytes of the latest checkpoint chain of a cache object the engine
/// fixture made (snapshots of snapshots, writes, attributes, a delete, origin copies), and
/// the geometry to decode it with.
fn real_checkpoint() -> (Vec<u8>, u64, u64) {
    let f = mem_engine(64).journal(16 << 10).build();
    let e = &f.engine;
    let chunk = 4096;
    let s1 = e.create_snapshot(DeviceId::ORIGIN, "s1", true).unwrap();
    let s2 = e.create_snapshot(s1, "s2", false).unwrap();
    let s3 = e.create_snapshot(DeviceId::ORIGIN, "s3", true).unwrap();
    e.set_device_attr(s2, "serial", Some("sn")).unwrap();
    for i in 0..200u64 {
        let dev = [DeviceId::ORIGIN, s1, s3][(i % 3) as usize];
        e.write(dev, (i * 7 % 64) * chunk, &vec![i as u8; 512])
            .unwrap();
        if i % 10 == 0 {
            e.flush().unwrap();
        }
    }
    e.delete_snapshot(s3).unwrap();
    e.flush().unwrap();
    let cache = f.cache.to_bytes();
    let h = Header::decode(&cache[..4096])
        .or_else(|_| Header::decode(&cache[4096..8192]))
        .unwrap();
    let h = [
        Header::decode(&cache[..4096]),
        Header::decode(&cache[4096..8192]),
    ]
    .into_iter()
    .flatten()
    .max_by_key(|h| h.generation)
    .unwrap_or(h);
    assert_ne!(h.ckpt_block, NO_BLOCK, "the fixture took a checkpoint");
    let mut bytes = Vec::new();
    let mut b = h.ckpt_block;
    while b != NO_BLOCK {
        let at = (h.data_offset + b * h.chunk_size) as usize;
        let (bh, data) = decode_ckpt_block(&cache[at..at + h.chunk_size as usize]).unwrap();
        bytes.extend_from_slice(data);
        b = bh.next;
    }
    let max_blocks = (h.max_size - h.data_offset) / h.chunk_size;
    (bytes, h.origin_size.div_ceil(h.chunk_size), max_blocks)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: fuzz::cases(2000),
        failure_persistence: None,
        rng_seed: fuzz::seed().map_or(RngSeed::Random, RngSeed::Fixed),
        ..ProptestConfig::default()
    })]

    /// Records round-trip through their encoding, and decoding edited encodings never
    /// panics; whatever decodes re-encodes to something that decodes the same.
    #[test]
    fn records_round_trip_and_edited_records_decode_safely(
        records in prop::collection::vec(record(), 0..6),
        edits in prop::collection::vec(edit(), 0..4),
    ) {
        fuzz::set_case(format!("records {records:?} edits {edits:?}"));
        let bytes = encode_all(&records);
        prop_assert_eq!(&Record::decode_all(&bytes).unwrap(), &records);
        let mut bad = bytes;
        apply(&mut bad, &edits);
        if let Ok(decoded) = Record::decode_all(&bad) {
            prop_assert_eq!(Record::decode_all(&encode_all(&decoded)).unwrap(), decoded);
        }
    }

    /// Arbitrary bytes as a record payload.
    #[test]
    fn arbitrary_bytes_decode_as_records_safely(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = Record::decode_all(&bytes);
    }

    /// Transactions: an encoded one parses and verifies; any single flipped bit is caught
    /// (its checksum fails, or its header no longer parses); edited ones never panic.
    #[test]
    fn transactions_verify_and_notice_damage(
        seq in interesting_u64(),
        flags in prop_oneof![Just(0u32), Just(TXN_WRAP), any::<u32>()],
        records in prop::collection::vec(record(), 0..4),
        flip in (any::<prop::sample::Index>(), 0u8..8),
        edits in prop::collection::vec(edit(), 0..4),
    ) {
        let payload = encode_all(&records);
        let txn = encode_txn(seq, flags, &payload);
        prop_assert_eq!(txn.len() as u64, txn_len(payload.len()));
        let h = parse_txn_header(&txn).unwrap();
        prop_assert_eq!((h.seq, h.flags, h.payload_len), (seq, flags, payload.len()));
        prop_assert!(verify_txn(&h, &txn));
        let mut one = txn.clone();
        let at = flip.0.index(one.len());
        one[at] ^= 1 << flip.1;
        if let Some(h) = parse_txn_header(&one) {
            let len = txn_len(h.payload_len) as usize;
            prop_assert!(len > one.len() || !verify_txn(&h, &one[..len]), "a flipped bit went unnoticed");
        }
        let mut bad = txn;
        apply(&mut bad, &edits);
        if let Some(h) = parse_txn_header(&bad) {
            let len = txn_len(h.payload_len) as usize;
            if len <= bad.len() && verify_txn(&h, &bad[..len]) {
                let _ = Record::decode_all(&bad[TXN_HEADER..TXN_HEADER + h.payload_len]);
            }
        }
    }

    /// Header slots: any field values, checksummed as the engine writes them, decode to the
    /// same header or an error, and an accepted header's geometry is consistent (the
    /// journal and one data block fit below the limit, without overflow). Edited slots never
    /// panic.
    #[test]
    fn header_slots_decode_safely(
        fields in prop::array::uniform10(prop::option::weighted(0.3, interesting_u64())),
        tag in short_string(),
        edits in prop::collection::vec(edit(), 0..4),
    ) {
        let h = header(&fields, tag);
        fuzz::set_case(format!("header {h:?}"));
        let slot = h.encode();
        if let Ok(back) = Header::decode(&slot) {
            prop_assert_eq!(&back, &h);
            let fits = JOURNAL_OFFSET
                .checked_add(back.journal_size)
                .filter(|&j| j <= back.data_offset)
                .and_then(|_| back.data_offset.checked_add(back.chunk_size))
                .is_some_and(|end| end <= back.max_size);
            prop_assert!(fits, "accepted a header whose geometry overflows: {:?}", back);
        }
        let mut bad = slot;
        apply(&mut bad, &edits);
        let _ = Header::decode(&bad);
    }

    /// Checkpoint blocks: round trip, single bit flips caught in the payload, edited blocks
    /// never panic.
    #[test]
    fn checkpoint_blocks_decode_safely(
        index in any::<u32>(),
        next in interesting_u64(),
        data in prop::collection::vec(any::<u8>(), 0..200),
        flip in (any::<prop::sample::Index>(), 0u8..8),
        edits in prop::collection::vec(edit(), 0..4),
    ) {
        let block = encode_ckpt_block(index, next, &data, 4096);
        let (h, d) = decode_ckpt_block(&block).unwrap();
        prop_assert_eq!((h.index, h.next, d), (index, next, &data[..]));
        if !data.is_empty() {
            let mut one = block.clone();
            let at = CKPT_BLOCK_HEADER + flip.0.index(data.len());
            one[at] ^= 1 << flip.1;
            prop_assert!(decode_ckpt_block(&one).is_err(), "a flipped payload bit went unnoticed");
        }
        let mut bad = block;
        apply(&mut bad, &edits);
        let _ = decode_ckpt_block(&bad);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: fuzz::cases(1000),
        failure_persistence: None,
        rng_seed: fuzz::seed().map_or(RngSeed::Random, RngSeed::Fixed),
        ..ProptestConfig::default()
    })]

    /// Whole checkpoints: a real one (devices, attributes, entries, origin copies) with
    /// edits, decoded as either format version, never panics nor allocates without bound.
    #[test]
    fn edited_checkpoints_decode_safely(
        edits in prop::collection::vec(edit(), 1..5),
        version in prop_oneof![4 => Just(2u32), 1 => Just(1u32)],
        origin_copies in any::<bool>(),
    ) {
        let (bytes, nchunks, max_blocks) = REAL.with(|r| r.clone());
        let mut bad = bytes;
        apply(&mut bad, &edits);
        fuzz::set_case(format!("checkpoint edits {edits:?} version {version}"));
        let _ = Meta::decode_checkpoint(&bad, version, origin_copies, nchunks, max_blocks);
    }

    /// Arbitrary bytes as a checkpoint.
    #[test]
    fn arbitrary_bytes_decode_as_checkpoints_safely(
        next_id in 0u64..64,
        rest in prop::collection::vec(prop_oneof![3 => 0u8..4, 1 => any::<u8>()], 0..400),
        version in 1u32..=2,
        origin_copies in any::<bool>(),
    ) {
        let mut bytes = next_id.to_le_bytes().to_vec();
        bytes.extend_from_slice(&rest);
        fuzz::set_case(format!("checkpoint bytes {bytes:?}"));
        let _ = Meta::decode_checkpoint(&bytes, version, origin_copies, 64, 1 << 18);
    }
}

thread_local! {
    static REAL: (Vec<u8>, u64, u64) = real_checkpoint();
}

/// Found by this harness (docs/testing.md): the device table was a vector indexed by device
/// id, sized from the id a checkpoint named, so a checkpoint naming device 2^40 asked for
/// 2^40 slots (and a journal's id 2^64-1 overflowed `id + 1`). Ids now name a bounded slot
/// (`cow/devids.rs`): such a checkpoint is refused at once, whatever the id.
#[test]
fn a_huge_device_id_is_refused_without_allocating() {
    let (bytes, nchunks, max_blocks) = real_checkpoint();
    // next_id (the first field) and the origin's id (the first device record's first
    // field, after next_id, clock and the device count).
    for (next_id, id) in [(1u64 << 41, 1u64 << 40), (u64::MAX, u64::MAX), (3, 1 << 20)] {
        let mut bad = bytes.clone();
        bad[..8].copy_from_slice(&next_id.to_le_bytes());
        bad[24..32].copy_from_slice(&id.to_le_bytes());
        let r = Meta::decode_checkpoint(&bad, FORMAT_VERSION, false, nchunks, max_blocks);
        assert!(r.is_err(), "device {id} with counter {next_id} accepted");
    }
}

/// The real checkpoint decodes as it is (else the edits above would all start from an error).
#[test]
fn the_real_checkpoint_decodes() {
    let (bytes, nchunks, max_blocks) = real_checkpoint();
    Meta::decode_checkpoint(&bytes, FORMAT_VERSION, false, nchunks, max_blocks).unwrap();
}

/// The most a check or an open of the small objects below may hold at once: the objects are
/// a few hundred KiB, their metadata a few KiB.
const SMALL_PEAK: u64 = 16 << 20;

/// A small cache object made by the engine fixture (a snapshot `snap` of the origin, both
/// written, closed cleanly), the header in use, and where the next journal transaction goes.
struct Object {
    origin: Vec<u8>,
    cache: Vec<u8>,
    header: Header,
    snap: u64,
    next_seq: u64,
    next_pos: u64,
}

impl Object {
    fn new() -> Self {
        let f = mem_engine(64).journal(1 << 20).build();
        let e = &f.engine;
        let snap = e.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
        for i in 0..8u64 {
            e.write(DeviceId::ORIGIN, i * 4096, &[1; 4096]).unwrap();
            e.write(snap, (8 + i) * 4096, &[2; 4096]).unwrap();
            e.flush().unwrap();
        }
        drop(f.engine);
        let cache = f.cache.to_bytes();
        let header = (0..2)
            .filter_map(|s| Header::decode(&cache[s * 4096..(s + 1) * 4096]).ok())
            .max_by_key(|h| h.generation)
            .unwrap();
        let before = check_cache(&MemStorage::from_bytes(cache.clone()));
        assert!(before.is_clean(), "{before}");
        Self {
            origin: f.origin.to_bytes(),
            next_seq: header.ckpt_seq + before.journal_transactions + 1,
            next_pos: header.journal_start + before.journal_bytes,
            cache,
            header,
            snap: snap.0,
        }
    }

    /// Writes `self.header` (with its checksum) over the slot in use.
    fn write_header(&mut self) {
        let at = (self.header.generation % 2) as usize * 4096;
        self.cache[at..at + 4096].copy_from_slice(&self.header.encode());
    }

    /// Appends a well-formed, checksummed transaction of `records` after the last one.
    fn append(&mut self, records: &[Record]) {
        let mut e = Enc::default();
        for r in records {
            r.encode(&mut e);
        }
        let txn = encode_txn(self.next_seq, 0, &e.0);
        let at = (JOURNAL_OFFSET + self.next_pos) as usize;
        self.cache[at..at + txn.len()].copy_from_slice(&txn);
        self.next_seq += 1;
        self.next_pos += txn.len() as u64;
    }

    /// The checker's report and the most it held at once.
    fn check(&self) -> (String, bool, u64) {
        let cache = MemStorage::from_bytes(self.cache.clone());
        let (r, peak) = fuzz::peak_allocation(|| check_cache(&cache));
        (r.to_string(), r.is_clean(), peak)
    }

    /// `CacheObject::open` over the real origin: its error, if any, and the most it held.
    fn open(&self) -> (Option<String>, u64) {
        let origin = Arc::new(MemStorage::from_bytes(self.origin.clone()));
        let cache = Arc::new(MemStorage::from_bytes(self.cache.clone()));
        fuzz::peak_allocation(|| {
            CacheObject::open(origin, cache, OpenOptions::default())
                .err()
                .map(|e| e.to_string())
        })
    }
}

/// Found by tests/fuzz_cache_object.rs (docs/testing.md): reference counts are a vector
/// indexed by block, and a record naming block b sized it to b + 1, bounded only by the size
/// limit. A block's data is written before a record maps it, so a block past the end of the
/// cache object was never written: recovery now refuses such a record (the checker reports
/// it) before anything is sized from it. Under the old code block 2^40 asked for a 4 TiB
/// vector (this binary's allocator aborts) and 2^25 for 128 MiB (over the meter's bound).
#[test]
fn a_block_past_the_end_is_refused_without_allocating() {
    let pristine = Object::new();
    let h = &pristine.header;
    let stored = (pristine.cache.len() as u64 - h.data_offset).div_ceil(h.chunk_size);
    for block in [1 << 25, 1 << 40, (1 << 44) - 300, stored] {
        let mut o = Object::new();
        // A limit of 2^44 blocks: only the file bounds what a record may name.
        o.header.max_size = 1 << 56;
        o.write_header();
        o.append(&[Record::SetEntry {
            dev: o.snap,
            chunk: 20,
            entry: entry_block(block),
        }]);
        let (report, clean, peak) = o.check();
        assert!(!clean && report.contains("past the end"), "{report}");
        assert!(
            peak < SMALL_PEAK,
            "block {block}: the checker held {peak} bytes"
        );
        let (err, peak) = o.open();
        let err = err.unwrap_or_else(|| panic!("block {block}: opened"));
        assert!(err.contains("past the end"), "{err}");
        assert!(peak < SMALL_PEAK, "block {block}: open held {peak} bytes");
    }
}

/// Found by tests/fuzz_cache_object.rs (docs/testing.md): a table's bitmap of its own
/// chunks, its page tree's top level and the origin's history were vectors indexed by chunk
/// (or page), so one record naming a chunk near the end of a 2^56-byte origin (which a
/// checksummed header may claim) sized them for every chunk below it: 2 TiB for the bitmap.
/// Now they hold what the records set (`cow/pagedir.rs`, `cow/table.rs`). The checker, which
/// has no origin, takes the claim and stays small; `open` refuses the claim against the real
/// origin before recovering anything.
#[test]
fn a_huge_origin_size_is_checked_without_allocating() {
    let mut o = Object::new();
    o.header.origin_size = 1 << 56;
    o.write_header();
    let last = (1u64 << 44) - 1;
    o.append(&[
        Record::SetEntry {
            dev: o.snap,
            chunk: last,
            entry: ENTRY_ZERO,
        },
        Record::SetEntry {
            dev: o.snap,
            chunk: 1 << 36,
            entry: ENTRY_ZERO,
        },
        Record::ShareDown {
            dev: 0,
            chunk: last - 1,
            entry: ENTRY_ZERO,
        },
        Record::Preserve {
            chunk: last - 2,
            time: 1,
            entry: entry_block(2),
        },
    ]);
    let (report, _, peak) = o.check();
    assert!(report.contains("origin 72057594037927936 B"), "{report}");
    assert!(peak < SMALL_PEAK, "the checker held {peak} bytes\n{report}");
    let (err, peak) = o.open();
    let err = err.expect("opened against a 256 KiB origin");
    assert!(err.contains("origin is 262144 bytes"), "{err}");
    assert!(peak < SMALL_PEAK, "open held {peak} bytes");
}

/// The same sizes reached without a lie: a snapshot grown to 2^56 bytes and written at its
/// end holds a page there, not a bit for every chunk below it (the old code asked for 2 TiB);
/// it reopens and checks clean, small.
#[test]
fn a_write_at_the_end_of_a_huge_snapshot_costs_a_page() {
    let f = mem_engine(64).build();
    let snap = f
        .engine
        .create_snapshot(DeviceId::ORIGIN, "s", true)
        .unwrap();
    let (_, peak) = fuzz::peak_allocation(|| {
        f.engine.resize_device(snap, 1 << 56, false).unwrap();
        f.engine.write(snap, (1 << 56) - 4096, &[3; 4096]).unwrap();
        let mut back = [0u8; 4096];
        f.engine.read(snap, (1 << 56) - 4096, &mut back).unwrap();
        assert_eq!(back, [3; 4096]);
        f.engine.flush().unwrap();
    });
    assert!(peak < SMALL_PEAK, "the write held {peak} bytes");
    drop(f.engine);
    let (r, peak) = fuzz::peak_allocation(|| check_cache(f.cache.as_ref()));
    assert!(r.is_clean(), "{r}");
    assert!(peak < SMALL_PEAK, "the checker held {peak} bytes");
    let (e, peak) = fuzz::peak_allocation(|| {
        CacheObject::open(f.origin.clone(), f.cache.clone(), OpenOptions::default()).unwrap()
    });
    assert!(peak < SMALL_PEAK, "open held {peak} bytes");
    let mut back = [0u8; 4096];
    e.read(snap, (1 << 56) - 4096, &mut back).unwrap();
    assert_eq!(back, [3; 4096]);
}
