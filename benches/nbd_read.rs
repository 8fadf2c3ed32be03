//! NBD reads: snapblk's NBD server (the origin's export, and a snapshot's export reading
//! through to the origin) against `qemu-nbd` serving the same page-cached raw file, driven by
//! the standard clients. Not a timed test: it prints a table (and the rows for
//! docs/benchmarks.md).
//!
//! Run: `cargo bench --bench nbd_read [-- --rounds N --image-mib N]` (needs qemu-nbd,
//! qemu-img and nbdcopy; `qemu/install-host-deps.sh` installs them). Run as a test (without
//! `--bench`) it only says it was skipped.
//!
//! Workloads, each reading the whole image (or a fixed number of requests):
//! - `nbdcopy`: `nbdcopy URI null:` (4 connections with multi-conn, 64 requests in flight);
//! - `qemu-img convert`: `qemu-img convert -n URI` into a `null-co` target (one connection,
//!   2 MiB requests, 8 in flight);
//! - `qemu-img bench`: 4 KiB reads, 16 in flight, one connection.
//!
//! A round runs every backend once per workload, each on a freshly started server, the order
//! reversed every other round, so drift on a shared machine hits them alike; a cell shows the
//! median of its rounds, and a ratio the median of the rounds' ratios.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    SnapblkOrigin,
    SnapblkSnapshot,
    QemuNbd,
}

const BACKENDS: [Backend; 3] = [
    Backend::QemuNbd,
    Backend::SnapblkOrigin,
    Backend::SnapblkSnapshot,
];

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::SnapblkOrigin => "snapblk origin",
            Backend::SnapblkSnapshot => "snapblk snapshot",
            Backend::QemuNbd => "qemu-nbd",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Nbdcopy,
    Convert,
    Bench4k,
}

const WORKLOADS: [Workload; 3] = [Workload::Nbdcopy, Workload::Convert, Workload::Bench4k];
const BENCH_REQUESTS: u64 = 200_000;

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Nbdcopy => "nbdcopy image -> null: (MB/s)",
            Workload::Convert => "qemu-img convert -> null-co (MB/s)",
            Workload::Bench4k => "qemu-img bench 4K reads qd16 (kIOPS)",
        }
    }

    /// Runs against `uri`; the rate (MB/s or thousands of requests per second).
    fn run(self, uri: &str, size: u64) -> Result<f64, String> {
        let mut cmd = match self {
            Workload::Nbdcopy => {
                let mut c = Command::new("nbdcopy");
                c.arg(uri).arg("null:");
                c
            }
            Workload::Convert => {
                let mut c = Command::new("qemu-img");
                c.args(["convert", "-n", "-f", "raw", uri, "--target-image-opts"])
                    .arg(format!("driver=null-co,size={size}"));
                c
            }
            Workload::Bench4k => {
                let mut c = Command::new("qemu-img");
                c.args(["bench", "-f", "raw", "-d", "16", "-s", "4k"])
                    .arg("-c")
                    .arg(BENCH_REQUESTS.to_string())
                    .arg(uri);
                c
            }
        };
        let start = Instant::now();
        let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        let secs = start.elapsed().as_secs_f64();
        if !out.status.success() {
            return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(match self {
            Workload::Bench4k => BENCH_REQUESTS as f64 / secs / 1e3,
            _ => size as f64 / secs / 1e6,
        })
    }
}

/// A running server: its process and the URI to read.
struct Server {
    child: Child,
    uri: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM: both servers stop cleanly on it.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_socket(path: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("{} never accepted a connection", path.display()))
}

fn snapblk_bin() -> PathBuf {
    std::env::var_os("SNAPBLK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_snapblk")))
}

fn start(backend: Backend, dir: &Path, img: &Path) -> Result<Server, String> {
    for f in [
        "cache.obj",
        "nbd.sock",
        "vhost.sock",
        "ctl.sock",
        "qemu.sock",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let log = File::create(dir.join(format!("{backend:?}.log"))).map_err(|e| e.to_string())?;
    if backend == Backend::QemuNbd {
        let sock = dir.join("qemu.sock");
        let child = Command::new("qemu-nbd")
            .args([
                "-r",
                "-t",
                "-e",
                "64",
                "-f",
                "raw",
                "--cache=writeback",
                "--aio=threads",
                "-k",
            ])
            .arg(&sock)
            .arg(img)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("qemu-nbd: {e}"))?;
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let server = Server { child, uri };
        wait_for_socket(&sock)?;
        return Ok(server);
    }
    let (nbd, ctl) = (dir.join("nbd.sock"), dir.join("ctl.sock"));
    let child = Command::new(snapblk_bin())
        .arg("serve")
        .arg("--origin")
        .arg(img)
        .arg("--cache")
        .arg(dir.join("cache.obj"))
        .arg("--socket")
        .arg(dir.join("vhost.sock"))
        .arg("--control")
        .arg(&ctl)
        .arg("--nbd")
        .arg(&nbd)
        .args(["--num-queues", "1"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("snapblk: {e}"))?;
    let mut server = Server {
        child,
        uri: String::new(),
    };
    wait_for_socket(&nbd)?;
    wait_for_socket(&ctl)?;
    let export = if backend == Backend::SnapblkSnapshot {
        let out = Command::new(snapblk_bin())
            .args(["snapshot", "create", "bench"])
            .arg("--control")
            .arg(&ctl)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        "bench"
    } else {
        "origin"
    };
    server.uri = format!("nbd+unix:///{export}?socket={}", nbd.display());
    Ok(server)
}

/// A 4 KiB block of the image: its index and words derived from it (no holes, no zeros).
fn fill(block: &mut [u8], idx: u64) {
    for (i, w) in block.chunks_exact_mut(8).enumerate() {
        let v = idx.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64 ^ 1;
        w.copy_from_slice(&v.to_le_bytes());
    }
}

fn create_image(path: &Path, size: u64) {
    let mut f = File::create(path).expect("create the image");
    let mut buf = vec![0u8; 1 << 20];
    for c in 0..size >> 20 {
        for (b, block) in buf.chunks_exact_mut(4096).enumerate() {
            fill(block, c * 256 + b as u64);
        }
        f.write_all(&buf).expect("write the image");
    }
    f.sync_all().expect("sync the image");
    let mut f = File::open(path).expect("reopen the image");
    while f.read(&mut buf).expect("read the image back") > 0 {}
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes --bench; run as a test (`cargo test --all-targets`), it does nothing.
    if !std::env::args().any(|a| a == "--bench") {
        println!("nbd_read: skipped (run it with cargo bench --bench nbd_read)");
        return;
    }
    let rounds = arg("--rounds", 3).max(1);
    let size = arg("--image-mib", 1024).max(64) << 20;
    let dir = tempfile::Builder::new()
        .prefix("nbd-read-bench")
        .tempdir()
        .expect("a temp dir (set TMPDIR to move it)");
    let img = dir.path().join("image.raw");
    eprintln!("nbd_read: creating and caching a {} MiB image", size >> 20);
    create_image(&img, size);
    // results[workload][backend] = one rate per round
    let mut results = vec![vec![Vec::new(); BACKENDS.len()]; WORKLOADS.len()];
    let mut failed = false;
    for round in 0..rounds {
        for (wi, w) in WORKLOADS.iter().enumerate() {
            let mut order: Vec<usize> = (0..BACKENDS.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for bi in order {
                let b = BACKENDS[bi];
                let rate = start(b, dir.path(), &img).and_then(|s| w.run(&s.uri, size));
                match rate {
                    Ok(r) => {
                        eprintln!(
                            "round {} {:<38} {:<17} {r:>9.1}",
                            round + 1,
                            w.name(),
                            b.name()
                        );
                        results[wi][bi].push(r);
                    }
                    Err(e) => {
                        eprintln!("round {} {} {}: FAILED: {e}", round + 1, w.name(), b.name());
                        failed = true;
                    }
                }
            }
        }
    }
    print_table(&results, rounds, size);
    if failed {
        std::process::exit(1);
    }
}

fn print_table(results: &[Vec<Vec<f64>>], rounds: u64, size: u64) {
    println!(
        "\nnbd_read: {} MiB page-cached raw image, {rounds} round(s), medians; ratio = snapblk / qemu-nbd (median of the rounds' ratios)\n",
        size >> 20
    );
    println!("| workload | qemu-nbd | snapblk origin | snapblk snapshot | origin / qemu-nbd | snapshot / qemu-nbd |");
    println!("|---|---|---|---|---|---|");
    for (wi, w) in WORKLOADS.iter().enumerate() {
        let r = &results[wi];
        let ratio = |bi: usize| {
            let pairs = r[bi].iter().zip(&r[0]).map(|(a, b)| a / b).collect();
            median(pairs)
        };
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
            w.name(),
            median(r[0].clone()),
            median(r[1].clone()),
            median(r[2].clone()),
            ratio(1),
            ratio(2)
        );
    }
}
