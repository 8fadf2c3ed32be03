//! A remote origin behind a slow server, read by many VMs: 8 libblkio clients read the same
//! region of 8 snapshots of an origin served by nbdkit with its `delay` filter (1 ms per
//! read and per block-status request), against the same 8 clients on 8 snapshots of the same
//! image as a local origin. It prints, in one run:
//! - bytes fetched from the server over the region (the engine's count, and the server's own
//!   log): 1.0x, never 8x;
//! - the first (fetching) pass's throughput;
//! - later passes (everything local) against the local origin's, alternating, and their ratio.
//!
//! Run: `cargo bench --bench remote_origin [-- --rounds N --passes N --region-mib N
//! --delay-ms N]` (a round times `--passes` passes on each origin, alternating the order)
//! (needs nbdkit; qemu/install-host-deps.sh installs it). Run as a test (without `--bench`)
//! it only says it was skipped.

use serde_json::Value;
use snapblk::testkit::blkio_client::Client;
use snapblk::testkit::remote::{logged_reads, NbdServer};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const CLIENTS: usize = 8;
const REQUEST: usize = MIB as usize;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A `snapblk serve` process with its control socket; SIGTERM on drop.
struct Snapblk {
    child: Child,
    control: PathBuf,
    dir: PathBuf,
}

impl Snapblk {
    fn start(dir: &Path, name: &str, origin: &str, extra: &[&str]) -> Snapblk {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).expect("daemon dir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_snapblk"))
            .arg("serve")
            .args(["--origin", origin, "--num-queues", "2"])
            .arg("--socket")
            .arg(d.join("o.sock"))
            .arg("--cache")
            .arg(d.join("cache.obj"))
            .arg("--control")
            .arg(d.join("ctl.sock"))
            .arg("--no-nbd")
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start snapblk");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        assert!(first.contains("serving"), "snapblk did not start: {first}");
        std::thread::spawn(move || for _ in lines {});
        Snapblk {
            child,
            control: d.join("ctl.sock"),
            dir: d,
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_snapblk"))
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .output()
            .expect("run snapblk");
        assert!(
            out.status.success(),
            "snapblk {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn stats(&self) -> Value {
        let v: Value = serde_json::from_str(&self.cli(&["stats", "--json"])).expect("stats");
        v["cache"].clone()
    }

    /// `CLIENTS` read-only snapshots of the origin, each on its socket.
    fn snapshots(&self) -> Vec<PathBuf> {
        (0..CLIENTS)
            .map(|i| {
                let sock = self.dir.join(format!("s{i}.sock"));
                let name = format!("s{i}");
                self.cli(&[
                    "snapshot",
                    "create",
                    &name,
                    "--socket",
                    sock.to_str().unwrap(),
                ]);
                sock
            })
            .collect()
    }
}

impl Drop for Snapblk {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// `n` passes in a row (a measurement long enough to rise above the noise): the aggregate
/// MB/s.
fn passes(clients: &mut [Client], region: u64, n: usize) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        pass(clients, region);
    }
    (n * clients.len()) as f64 * region as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// One pass: every client reads `region` bytes of its snapshot from 0, in 1 MiB requests,
/// all at once; returns the aggregate MB/s.
fn pass(clients: &mut [Client], region: u64) -> f64 {
    let start = Barrier::new(clients.len());
    let t = Instant::now();
    std::thread::scope(|sc| {
        for c in clients.iter_mut() {
            let start = &start;
            sc.spawn(move || {
                start.wait();
                let mut off = 0;
                while off < region {
                    c.read(0, off, REQUEST).expect("a read");
                    off += REQUEST as u64;
                }
            });
        }
    });
    (clients.len() as u64 * region) as f64 / t.elapsed().as_secs_f64() / 1e6
}

fn connect(socks: &[PathBuf]) -> Vec<Client> {
    socks
        .iter()
        .map(|s| Client::try_connect(s, 1, true).expect("connect a client"))
        .collect()
}

/// An image of `size` bytes of non-zero pseudo-random data (no hole, no zero chunk).
fn create_image(path: &Path, size: u64) {
    let mut f = std::fs::File::create(path).expect("create the image");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..size / MIB {
        for w in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&(x | 1).to_le_bytes());
        }
        f.write_all(&buf).expect("write the image");
    }
    f.sync_all().expect("sync the image");
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("remote_origin: skipped (run it with cargo bench --bench remote_origin)");
        return;
    }
    let rounds = arg("--rounds", 7).max(1) as usize;
    let reps = arg("--passes", 4).max(1) as usize;
    let region = arg("--region-mib", 256).max(8) * MIB;
    let delay = arg("--delay-ms", 1);
    let dir = tempfile::Builder::new()
        .prefix("remote-origin-bench")
        .tempdir()
        .expect("a temp dir (set TMPDIR to move it)");
    let img = dir.path().join("golden.img");
    create_image(&img, region);
    let log = dir.path().join("nbdkit.log");
    let server = NbdServer::nbdkit(
        &img,
        &dir.path().join("k.sock"),
        &["log", "delay"],
        &[
            &format!("logfile={}", log.display()),
            &format!("delay-read={delay}ms"),
            &format!("delay-extents={delay}ms"),
        ],
    );
    let remote = Snapblk::start(dir.path(), "remote", &server.uri(), &[]);
    let local = Snapblk::start(dir.path(), "local", img.to_str().unwrap(), &["--read-only"]);
    let mut rc = connect(&remote.snapshots());
    let mut lc = connect(&local.snapshots());

    let cold = pass(&mut rc, region);
    let st = remote.stats();
    let fetched = st["origin_bytes_fetched"].as_u64().unwrap_or(0);
    let reads = logged_reads(&log);
    let chunk = st["chunk_size"].as_u64().unwrap_or(65536);
    let served: u64 = reads.iter().filter(|r| r.1 == chunk).map(|r| r.1).sum();
    let identity: u64 = reads.iter().filter(|r| r.1 != chunk).map(|r| r.1).sum();
    let warm_local = pass(&mut lc, region);
    // The copies just written are still being written back by the kernel: let that finish
    // before timing reads of them.
    let _ = Command::new("sync").status();
    // One untimed pass on each, so both start the rounds warm.
    pass(&mut rc, region);
    pass(&mut lc, region);

    let (mut l, mut r, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (a, b) = if round % 2 == 0 {
            let a = passes(&mut lc, region, reps);
            (a, passes(&mut rc, region, reps))
        } else {
            let b = passes(&mut rc, region, reps);
            (passes(&mut lc, region, reps), b)
        };
        eprintln!(
            "round {round}: local {a:.0} MB/s, remote (local copies) {b:.0} MB/s, ratio {:.2}",
            b / a
        );
        l.push(a);
        r.push(b);
        ratios.push(b / a);
    }
    let after = remote.stats();
    let refetched = after["origin_bytes_fetched"].as_u64().unwrap_or(0) - fetched;

    println!("# remote origin: {CLIENTS} clients x {} MiB of {CLIENTS} snapshots, nbdkit delay {delay} ms", region >> 20);
    println!("| measurement | result |");
    println!("|---|---|");
    println!(
        "| bytes fetched (engine) / region | {:.3}x ({fetched} B) |",
        fetched as f64 / region as f64
    );
    println!("| bytes the server read in chunks (its log) / region | {:.3}x (+ {identity} B of identity samples) |", served as f64 / region as f64);
    println!("| bytes fetched by the later passes | {refetched} |");
    println!("| first pass, remote (fetching), MB/s | {cold:.0} |");
    println!("| first warm pass, local origin, MB/s | {warm_local:.0} |");
    println!(
        "| later passes ({reps} per round), local origin, MB/s (median; rounds) | {:.0} ({}) |",
        median(&mut l.clone()),
        fmt(&l)
    );
    println!("| later passes ({reps} per round), remote origin from local copies, MB/s (median; rounds) | {:.0} ({}) |", median(&mut r.clone()), fmt(&r));
    println!(
        "| ratio remote / local (median of rounds; rounds) | {:.2} ({}) |",
        median(&mut ratios.clone()),
        fmt2(&ratios)
    );
    drop(rc);
    drop(lc);
    drop(remote);
    drop(local);
    drop(server);
    std::thread::sleep(Duration::from_millis(100));
}

fn fmt(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn fmt2(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}
