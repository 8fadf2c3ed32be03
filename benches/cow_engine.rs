//! Micro-benchmarks of the copy-on-write engine on real files in a temp dir.
//! Run: `cargo bench --bench cow_engine` (set COW_BENCH_DIR to choose the file system);
//! `cargo bench --bench cow_engine -- read_depth first_touch` runs only the cases whose names
//! contain one of the given words.

use snapblk::cow::{CacheObject, CreateOptions, DeviceId, OpenOptions};
use snapblk::storage::Storage;
use snapblk::testkit::engine::{file_stores, EngineSpec};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

struct Setup {
    _dir: tempfile::TempDir,
    origin: Arc<dyn Storage>,
    cache: Arc<dyn Storage>,
    eng: Option<CacheObject>,
}

fn files(dir: &Path, origin_size: u64) -> (Arc<dyn Storage>, Arc<dyn Storage>) {
    let stores = file_stores(dir, origin_size);
    // Give the origin real (allocated, cached) data, as a used disk has.
    let buf = vec![0x5au8; MIB as usize];
    for i in 0..origin_size / MIB {
        stores.origin.write_at(&buf, i * MIB).unwrap();
    }
    stores.origin.sync().unwrap();
    (stores.origin, stores.cache)
}

fn setup(origin_size: u64, chunk: u64) -> Setup {
    let dir = match std::env::var("COW_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).unwrap(),
        Err(_) => tempfile::tempdir().unwrap(),
    };
    let (origin, cache) = files(dir.path(), origin_size);
    // The production journal size (not the fixture's small one): commits and checkpoints as
    // in the daemon.
    let eng = EngineSpec::default()
        .chunk_size(chunk)
        .max_size(64 << 30)
        .journal(CreateOptions::default().journal_size)
        .on(origin.clone(), cache.clone());
    Setup {
        _dir: dir,
        origin,
        cache,
        eng: Some(eng),
    }
}

fn per_op(d: Duration, n: u64) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

fn main() {
    println!("# cow_engine micro-benchmarks ({})", chrono_free_date());
    // Cargo passes `--bench` (and libtest-style flags) to harness-less benches: skip flags.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let cases: [(&str, fn()); 7] = [
        ("first_touch", first_touch),
        ("rewrite", rewrite),
        ("read_depth", read_depth),
        ("create_latency", create_latency),
        ("delete_time", delete_time),
        ("recovery", recovery),
        ("chunk_size_and_subblocks", chunk_size_and_subblocks),
    ];
    for (name, run) in cases {
        if filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())) {
            run();
        }
    }
}

fn chrono_free_date() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// First-touch origin writes (whole 64 KiB chunks) with 1..1000 snapshots; median of 5 rounds
/// (each write waits for one commit, so the numbers follow the file system's sync latency).
fn first_touch() {
    const COUNTS: [usize; 5] = [0, 1, 10, 100, 1000];
    const ROUNDS: usize = 5;
    println!("\n## first-touch origin write, 64 KiB chunk, whole-chunk writes, all 1024 chunks of a 64 MiB origin, median of {ROUNDS} rounds (snapshot counts interleaved in each round, so disk drift hits them alike)");
    println!("| snapshots | µs/write (median) | per round | copies per run | metadata memory bytes per preserved chunk: total / per snapshot |");
    println!("|---|---|---|---|---|");
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); COUNTS.len()];
    let mut copies = [0u64; COUNTS.len()];
    let mut mem = [const { String::new() }; COUNTS.len()];
    for _round in 0..ROUNDS {
        for (k, &n) in COUNTS.iter().enumerate() {
            let s = setup(64 * MIB, 64 << 10);
            let eng = s.eng.as_ref().unwrap();
            for i in 0..n {
                eng.create_snapshot(DeviceId::ORIGIN, &format!("s{i}"), false)
                    .unwrap();
            }
            let buf = vec![1u8; 64 << 10];
            let writes = 1024u64;
            let c0 = eng.stats().copies;
            let t = Instant::now();
            for i in 0..writes {
                eng.write(DeviceId::ORIGIN, i * (64 << 10), &buf).unwrap();
            }
            times[k].push(per_op(t.elapsed(), writes));
            let st = eng.stats();
            copies[k] = st.copies - c0;
            mem[k] = if n > 0 {
                format!(
                    "{:.2} / {:.3}",
                    st.table_memory_bytes as f64 / writes as f64,
                    st.table_memory_bytes as f64 / (writes as f64 * n as f64)
                )
            } else {
                "-".into()
            };
        }
    }
    for (k, n) in COUNTS.iter().enumerate() {
        let per_round: Vec<String> = times[k].iter().map(|t| format!("{t:.0}")).collect();
        let mut sorted = times[k].clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        println!(
            "| {n} | {median:.1} | {} | {} | {} |",
            per_round.join(" "),
            copies[k],
            mem[k]
        );
    }
}

/// Rewrites of chunks already copied, vs. an engine with no snapshot.
fn rewrite() {
    println!("\n## rewrite of an already-copied chunk (4 KiB writes, page cache)");
    println!("| snapshots | µs/write |");
    println!("|---|---|");
    for n in [0usize, 1, 1000] {
        let s = setup(64 * MIB, 64 << 10);
        let eng = s.eng.as_ref().unwrap();
        for i in 0..n {
            eng.create_snapshot(DeviceId::ORIGIN, &format!("s{i}"), false)
                .unwrap();
        }
        let chunk = vec![2u8; 64 << 10];
        for c in 0..256u64 {
            eng.write(DeviceId::ORIGIN, c * (64 << 10), &chunk).unwrap();
        }
        let buf = vec![3u8; 4096];
        let mut rng = fastrand::Rng::with_seed(1);
        let writes = 200_000u64;
        let t = Instant::now();
        for _ in 0..writes {
            let off = rng.u64(0..256 * 16) * 4096;
            eng.write(DeviceId::ORIGIN, off, &buf).unwrap();
        }
        println!("| {n} | {:.2} |", per_op(t.elapsed(), writes));
    }
}

/// 4 KiB reads of a snapshot at depth 1 and 20 (all read through to the origin, the longest
/// walk) and of a snapshot at depth 20 whose data is in cache blocks, vs. the origin.
fn read_depth() {
    println!("\n## 4 KiB random reads (page cache)");
    println!("| device | µs/read |");
    println!("|---|---|");
    let s = setup(64 * MIB, 64 << 10);
    let eng = s.eng.as_ref().unwrap();
    let mut chain = vec![DeviceId::ORIGIN];
    for i in 0..20 {
        let p = *chain.last().unwrap();
        chain.push(eng.create_snapshot(p, &format!("d{i}"), true).unwrap());
    }
    // Give every level a few mappings so no level is trivially empty.
    for (i, &d) in chain.iter().enumerate().skip(1) {
        eng.write(d, (900 + i as u64) * (64 << 10), &[7u8; 4096])
            .unwrap();
    }
    let mut buf = vec![0u8; 4096];
    let reads = 300_000u64;
    let mut measure = |dev: DeviceId, label: &str| {
        let mut rng = fastrand::Rng::with_seed(5);
        for _ in 0..20_000 {
            eng.read(dev, rng.u64(0..512 * 16) * 4096, &mut buf)
                .unwrap();
        }
        let t = Instant::now();
        for _ in 0..reads {
            eng.read(dev, rng.u64(0..512 * 16) * 4096, &mut buf)
                .unwrap();
        }
        println!("| {label} | {:.3} |", per_op(t.elapsed(), reads));
    };
    measure(DeviceId::ORIGIN, "origin");
    measure(chain[1], "snapshot depth 1 (reads through)");
    measure(chain[20], "snapshot depth 20 (reads through)");
    // Now make the depth-1 snapshot own the chunks read: reads come from the cache object.
    let chunk = vec![4u8; 64 << 10];
    for c in 0..512u64 {
        eng.write(chain[1], c * (64 << 10), &chunk).unwrap();
    }
    eng.flush().unwrap();
    measure(chain[1], "snapshot depth 1 (own blocks)");
    measure(chain[20], "snapshot depth 20 (blocks of depth 1)");
}

/// Snapshot create latency while two threads write the origin.
fn create_latency() {
    println!("\n## snapshot create latency while 2 threads write the origin (4 KiB random)");
    let s = setup(64 * MIB, 64 << 10);
    let eng = s.eng.as_ref().unwrap();
    let stop = AtomicBool::new(false);
    let mut lat = Vec::new();
    std::thread::scope(|sc| {
        for w in 0..2u64 {
            let (eng, stop) = (eng, &stop);
            sc.spawn(move || {
                let mut rng = fastrand::Rng::with_seed(w);
                let buf = vec![9u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    eng.write(DeviceId::ORIGIN, rng.u64(0..1024 * 16) * 4096, &buf)
                        .unwrap();
                }
            });
        }
        std::thread::sleep(Duration::from_millis(100));
        for i in 0..200 {
            let t = Instant::now();
            eng.create_snapshot(DeviceId::ORIGIN, &format!("c{i}"), false)
                .unwrap();
            lat.push(t.elapsed());
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
    });
    lat.sort();
    println!(
        "creates: {}, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        lat[lat.len() / 2].as_secs_f64() * 1e3,
        lat[lat.len() * 99 / 100].as_secs_f64() * 1e3,
        lat[lat.len() - 1].as_secs_f64() * 1e3
    );
}

/// Delete time against the number of chunks the snapshot owns.
fn delete_time() {
    println!("\n## delete time vs chunks owned (64 KiB chunks)");
    println!("| chunks the snapshot holds | delete ms |");
    println!("|---|---|");
    for owned in [0u64, 1000, 10_000] {
        let s = setup(1024 * MIB, 64 << 10);
        let eng = s.eng.as_ref().unwrap();
        let d = eng
            .create_snapshot(DeviceId::ORIGIN, "victim", true)
            .unwrap();
        let buf = vec![1u8; 64 << 10];
        for c in 0..owned {
            eng.write(d, c * (64 << 10), &buf).unwrap();
        }
        eng.flush().unwrap();
        let t = Instant::now();
        eng.delete_snapshot(d).unwrap();
        println!(
            "| {owned} written by the snapshot | {:.2} |",
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    // Origin copies only this snapshot reads (the origin was written after it was taken),
    // with an older snapshot alive whose copies must stay.
    for preserved in [1000u64, 10_000] {
        let s = setup(1024 * MIB, 64 << 10);
        let eng = s.eng.as_ref().unwrap();
        let buf = vec![1u8; 64 << 10];
        eng.create_snapshot(DeviceId::ORIGIN, "older", false)
            .unwrap();
        for c in 0..preserved {
            eng.write(DeviceId::ORIGIN, c * (64 << 10), &buf).unwrap();
        }
        let d = eng
            .create_snapshot(DeviceId::ORIGIN, "victim", false)
            .unwrap();
        for c in 0..preserved {
            eng.write(DeviceId::ORIGIN, c * (64 << 10), &buf).unwrap();
        }
        eng.flush().unwrap();
        let before = eng.stats().preserved_copies;
        let t = Instant::now();
        eng.delete_snapshot(d).unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let after = eng.stats().preserved_copies;
        assert_eq!(
            before - after,
            preserved,
            "the victim's copies are released"
        );
        println!("| {preserved} origin copies only it reads (of {before}) | {ms:.2} |");
    }
    // A snapshot taken between two generations of copies, none of which it alone reads: the
    // release has nothing to sweep.
    {
        let chunks = 16_000u64;
        let s = setup(1024 * MIB, 64 << 10);
        let eng = s.eng.as_ref().unwrap();
        let buf = vec![1u8; 64 << 10];
        eng.create_snapshot(DeviceId::ORIGIN, "first", false)
            .unwrap();
        for c in 0..chunks {
            eng.write(DeviceId::ORIGIN, c * (64 << 10), &buf).unwrap();
        }
        let middle = eng
            .create_snapshot(DeviceId::ORIGIN, "middle", false)
            .unwrap();
        eng.create_snapshot(DeviceId::ORIGIN, "last", false)
            .unwrap();
        for c in 0..chunks {
            eng.write(DeviceId::ORIGIN, c * (64 << 10), &buf).unwrap();
        }
        eng.flush().unwrap();
        let before = eng.stats().preserved_copies;
        let t = Instant::now();
        eng.delete_snapshot(middle).unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(eng.stats().preserved_copies, before, "nothing to release");
        println!("| nothing of its own, between two generations of {chunks} copies | {ms:.2} |");
    }
}

/// Recovery (open after a crash) with the journal about half full (a checkpoint is taken
/// at half), and with a large checkpoint.
fn recovery() {
    println!("\n## recovery time (open) after a crash");
    println!("| state | journal bytes | ms |");
    println!("|---|---|---|");
    let mut s = setup(1024 * MIB, 64 << 10);
    {
        let eng = s.eng.as_ref().unwrap();
        let d = eng.create_snapshot(DeviceId::ORIGIN, "w", true).unwrap();
        let buf = vec![1u8; 64 << 10];
        // Each flushed whole-chunk write is one small transaction.
        for c in 0..3000u64 {
            eng.write(d, c * (64 << 10), &buf).unwrap();
            eng.flush().unwrap();
        }
    }
    // Simulate a crash: forget the engine without its closing flush.
    std::mem::forget(s.eng.take());
    let t = Instant::now();
    let eng = CacheObject::open(s.origin.clone(), s.cache.clone(), OpenOptions::default()).unwrap();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let rep = snapblk::cow::check_cache(s.cache.as_ref());
    println!(
        "| 3000 chunks mapped, {} txns in journal | {} | {ms:.2} |",
        rep.journal_transactions, rep.journal_bytes
    );
    drop(eng);
}

/// Chunk size: first touch of a 4 KiB write in a writable snapshot (the sub-block question:
/// with 4 KiB valid bits per chunk, the fill of the rest of the chunk would disappear), and
/// sequential first-touch origin throughput.
fn chunk_size_and_subblocks() {
    println!("\n## chunk size: 4 KiB first-touch writes to a writable snapshot, and 1 MiB sequential origin writes with one snapshot");
    println!("| chunk | µs per 4 KiB snapshot first-touch | bytes written per 4 KiB | origin seq MB/s with snapshot | blocks |");
    println!("|---|---|---|---|---|");
    for chunk in [4u64 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20] {
        let s = setup(256 * MIB, chunk);
        let eng = s.eng.as_ref().unwrap();
        let w = eng.create_snapshot(DeviceId::ORIGIN, "w", true).unwrap();
        let buf = vec![1u8; 4096];
        let mut rng = fastrand::Rng::with_seed(3);
        let n = 2000u64;
        let t = Instant::now();
        for _ in 0..n {
            // One 4 KiB write in a chunk not touched before (random chunk of 256 MiB).
            let c = rng.u64(0..256 * MIB / chunk);
            eng.write(w, c * chunk, &buf).unwrap();
        }
        eng.flush().unwrap();
        let d = t.elapsed();
        let fills = eng.stats().cow_fills;
        let st = eng.stats();
        let bytes_per = (st.blocks_used * chunk) as f64 / n as f64;
        let _ = fills;
        // Sequential origin writes of 1 MiB with one read-only snapshot: first touch.
        let _ro = eng.create_snapshot(DeviceId::ORIGIN, "ro", false).unwrap();
        let big = vec![2u8; MIB as usize];
        let t = Instant::now();
        let total = 128 * MIB;
        for i in 0..total / MIB {
            eng.write(DeviceId::ORIGIN, i * MIB, &big).unwrap();
        }
        eng.flush().unwrap();
        let mbs = total as f64 / 1e6 / t.elapsed().as_secs_f64();
        println!(
            "| {} KiB | {:.1} | {:.0} | {:.0} | {} |",
            chunk >> 10,
            per_op(d, n),
            bytes_per,
            mbs,
            eng.stats().blocks_used
        );
    }
}
