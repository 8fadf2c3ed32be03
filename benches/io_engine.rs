//! Which I/O engine should a queue worker use on a page-cached image: synchronous positional
//! I/O (what snapblk does) or io_uring? Same thread, same file, same random 4 KiB offsets.
//!
//! `cargo bench --bench io_engine` (does nothing without `--bench`, e.g. under `cargo test`).
//!
//! - sync:      one pread per request, as a queue worker does for each request of a batch;
//! - uring-qdN: batches of N reads submitted with one io_uring_enter and reaped together, as
//!   an io_uring worker would do for a batch of N requests popped from the ring.
//!
//! A second table shows what a buffered 4 KiB random write costs the kernel, depending on how
//! the file entered the page cache: filled with 1 MiB writes, the cache holds large folios and
//! (on ext4, kernel 6.18 here) each write walks every buffer head of its folio under the inode
//! lock; filled with 4 KiB writes, each folio is one page. Every daemon pays this per write.

use io_uring::{opcode, types, IoUring};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

const IMAGE: usize = 256 << 20;
/// Large enough that the folios' buffer heads do not stay in the CPU caches.
const WRITE_IMAGE: usize = 1 << 30;
const BLOCK: usize = 4096;
const RUN: Duration = Duration::from_secs(2);

fn offsets(n: usize, image: usize) -> Vec<u64> {
    // xorshift: deterministic, no extra dependency.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (image / BLOCK) as u64) * BLOCK as u64
        })
        .collect()
}

/// A file of `size` bytes written `piece` bytes at a time (so cached in folios of that size).
fn filled(path: &std::path::Path, size: usize, piece: usize) -> File {
    let mut f = File::create(path).expect("create image");
    let chunk = vec![0x5au8; piece];
    for _ in 0..size / piece {
        f.write_all(&chunk).expect("fill image");
    }
    f.sync_all().expect("fsync image");
    drop(f);
    File::options()
        .read(true)
        .write(true)
        .open(path)
        .expect("open image")
}

fn sync_writes(file: &File, offs: &[u64]) -> f64 {
    let buf = vec![0xa5u8; BLOCK];
    let start = Instant::now();
    let mut n = 0usize;
    let mut rounds = offs.chunks(1024).cycle();
    while start.elapsed() < RUN {
        let round = rounds.next().expect("offsets to write at");
        for &o in round {
            file.write_all_at(&buf, o).expect("pwrite");
        }
        n += round.len();
    }
    n as f64 / start.elapsed().as_secs_f64()
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
    let file = filled(&path, IMAGE, 1 << 20);
    let offs = offsets(1 << 16, IMAGE);
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
    drop(file);

    println!(
        "\n# 4 KiB random pwrites over a page-cached {} MiB file, one thread, {:?} each, by \
         how the file was filled (and so the size of its page-cache folios)",
        WRITE_IMAGE >> 20,
        RUN
    );
    // Buffer heads are ext4's (and other block-based filesystems'); tmpfs has none.
    let fs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir.path())
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".to_string(), |s| s.trim().to_string())
        // ext4 shares ext2's magic number, which is all `stat -f` sees.
        .replace("ext2/ext3", "ext2/3/4");
    println!("# filesystem of the temp dir: {fs} (set TMPDIR to measure another)");
    println!("| filled with | writes/s | µs per write |");
    println!("|---|---:|---:|");
    let offs = offsets(1 << 16, WRITE_IMAGE);
    for (piece, name) in [(1usize << 20, "1 MiB writes"), (BLOCK, "4 KiB writes")] {
        let path = dir.path().join("write-image.raw");
        let file = filled(&path, WRITE_IMAGE, piece);
        let r = sync_writes(&file, &offs);
        println!("| {name} | {r:.0} | {:.2} |", 1e6 / r);
        drop(file);
        std::fs::remove_file(&path).expect("remove image");
    }
}
