//! Which I/O engine should a queue worker use on a page-cached image: synchronous positional
//! I/O (what snapblk does) or io_uring? Same thread, same file, same random 4 KiB offsets.
//!
//! `cargo bench --bench io_engine` (does nothing without `--bench`, e.g. under `cargo test`).
//!
//! - sync:      one pread per request, as a queue worker does for each request of a batch;
//! - uring-qdN: batches of N reads submitted with one io_uring_enter and reaped together, as
//!   an io_uring worker would do for a batch of N requests popped from the ring.

use io_uring::{opcode, types, IoUring};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

const IMAGE: usize = 256 << 20;
const BLOCK: usize = 4096;
const RUN: Duration = Duration::from_secs(2);

fn offsets(n: usize) -> Vec<u64> {
    // xorshift: deterministic, no extra dependency.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (IMAGE / BLOCK) as u64) * BLOCK as u64
        })
        .collect()
}

fn sync_reads(file: &File, offs: &[u64]) -> f64 {
    let mut buf = vec![0u8; BLOCK];
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < RUN {
        for &o in &offs[..1024] {
            file.read_exact_at(&mut buf, o).expect("pread");
        }
        n += 1024;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn uring_reads(file: &File, offs: &[u64], depth: usize) -> f64 {
    let mut ring = IoUring::new(depth.next_power_of_two() as u32).expect("io_uring");
    let mut bufs = vec![vec![0u8; BLOCK]; depth];
    let fd = types::Fd(file.as_raw_fd());
    let start = Instant::now();
    let mut n = 0usize;
    let mut i = 0usize;
    while start.elapsed() < RUN {
        for (k, buf) in bufs.iter_mut().enumerate() {
            let o = offs[(i + k) % offs.len()];
            let e = opcode::Read::new(fd, buf.as_mut_ptr(), BLOCK as u32)
                .offset(o)
                .build()
                .user_data(k as u64);
            // SAFETY: each buffer outlives its request: we wait for all completions below.
            unsafe { ring.submission().push(&e).expect("submission queue full") };
        }
        ring.submit_and_wait(depth).expect("submit");
        for c in ring.completion() {
            assert_eq!(c.result(), BLOCK as i32, "io_uring read failed");
        }
        i += depth;
        n += depth;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("io_engine: skipped (run with cargo bench --bench io_engine)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("image.raw");
    let mut f = File::create(&path).expect("create image");
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..IMAGE / chunk.len() {
        f.write_all(&chunk).expect("fill image");
    }
    drop(f);
    let file = File::open(&path).expect("open image");
    let offs = offsets(1 << 16);
    // Warm the page cache.
    sync_reads(&file, &offs);
    println!(
        "# 4 KiB random reads of a page-cached {} MiB file, one thread, {:?} each",
        IMAGE >> 20,
        RUN
    );
    println!("| engine | reads/s | vs sync |");
    println!("|---|---:|---:|");
    let sync = sync_reads(&file, &offs);
    println!("| sync pread | {sync:.0} | 1.00 |");
    for depth in [1, 8, 32] {
        let r = uring_reads(&file, &offs, depth);
        println!("| io_uring qd{depth} | {r:.0} | {:.2} |", r / sync);
    }
}
