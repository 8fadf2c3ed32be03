//! snapblk vs qemu-storage-daemon, both driven over vhost-user-blk by the same client
//! (the `blkio` crate, libblkio in pure Rust).
//!
//! Run: `cargo bench --bench vs_qsd [-- OPTIONS]`; see `docs/benchmarks.md` and `--help`.
//!
//! Each cell (workload x queue count) is run in rounds; a round runs every backend once, one
//! after the other, each on a freshly started daemon, so that slow drift on a shared machine
//! hits all backends alike. The first backend is the reference for the ratio columns: a cell's
//! ratio is the median of its rounds' ratios (each between runs seconds apart), so one burst
//! of another process's load on one backend's window does not decide it.

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[path = "vs_qsd/snapshots.rs"]
mod snapshots;

const BLOCK: u64 = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A request that takes longer than this is reported as a hang.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Set by SIGINT/SIGTERM: stop submitting, finish the current cell's cleanup, exit.
static STOP: AtomicBool = AtomicBool::new(false);

/// `--direct`: every backend bypasses the host's page cache (snapblk `--direct`, qsd
/// `cache.direct=on`). Set once in `main`, before any daemon starts.
static DIRECT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

// ---------------------------------------------------------------------------------------
// Configuration

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Snapblk,
    /// Another snapblk build (`SNAPBLK_BASE_BIN`), for an A/B of two versions in one run.
    SnapblkBase,
    QsdFast,
    QsdDefault,
    /// qsd with Linux AIO (`aio=native`, which needs `cache.direct=on`) and an iothread.
    QsdNative,
    /// The `-raw` twins of the three qsd backends: the raw image itself even under
    /// `--snapshot` (where the others serve a qcow2 overlay), so the cost of a snapshot shows.
    QsdFastRaw,
    QsdDefaultRaw,
    QsdNativeRaw,
    /// snapblk serving a writable snapshot of the origin, taken just before each run on a
    /// fresh cache object (its writes are first touches: fill a new block from the origin),
    /// the like-for-like of a qcow2 overlay.
    SnapblkWsnap,
    /// snapblk-wsnap of the `SNAPBLK_BASE_BIN` build (an A/B of snapshot reads and writes).
    SnapblkBaseWsnap,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Snapblk => "snapblk",
            Backend::SnapblkBase => "snapblk-base",
            Backend::QsdFast => "qsd-fast",
            Backend::QsdDefault => "qsd-default",
            Backend::QsdNative => "qsd-native",
            Backend::QsdFastRaw => "qsd-fast-raw",
            Backend::QsdDefaultRaw => "qsd-default-raw",
            Backend::QsdNativeRaw => "qsd-native-raw",
            Backend::SnapblkWsnap => "snapblk-wsnap",
            Backend::SnapblkBaseWsnap => "snapblk-base-wsnap",
        }
    }

    /// A snapblk daemon (any build, origin or writable snapshot).
    fn is_snapblk(self) -> bool {
        matches!(
            self,
            Backend::Snapblk
                | Backend::SnapblkBase
                | Backend::SnapblkWsnap
                | Backend::SnapblkBaseWsnap
        )
    }

    /// The qsd configuration behind a `-raw` twin (itself for the others).
    fn qsd_kind(self) -> Backend {
        match self {
            Backend::QsdFastRaw => Backend::QsdFast,
            Backend::QsdDefaultRaw => Backend::QsdDefault,
            Backend::QsdNativeRaw => Backend::QsdNative,
            other => other,
        }
    }

    /// Whether this qsd backend serves a qcow2 overlay of the image when `snapshot` is asked
    /// (`--snapshot`): qsd-fast, qsd-default and qsd-native, not their `-raw` twins.
    fn qsd_overlay(self, snapshot: bool) -> bool {
        snapshot
            && matches!(
                self,
                Backend::QsdFast | Backend::QsdDefault | Backend::QsdNative
            )
    }

    fn parse(s: &str) -> Result<Backend, String> {
        match s.trim() {
            "snapblk" => Ok(Backend::Snapblk),
            "snapblk-base" => Ok(Backend::SnapblkBase),
            "qsd-fast" => Ok(Backend::QsdFast),
            "qsd-default" => Ok(Backend::QsdDefault),
            "qsd-native" => Ok(Backend::QsdNative),
            "qsd-fast-raw" => Ok(Backend::QsdFastRaw),
            "qsd-default-raw" => Ok(Backend::QsdDefaultRaw),
            "qsd-native-raw" => Ok(Backend::QsdNativeRaw),
            "snapblk-wsnap" => Ok(Backend::SnapblkWsnap),
            "snapblk-base-wsnap" => Ok(Backend::SnapblkBaseWsnap),
            other => Err(format!(
                "unknown backend {other:?} (expected snapblk, snapblk-base, snapblk-wsnap, \
                 snapblk-base-wsnap, \
                 qsd-fast, qsd-default, qsd-native, qsd-fast-raw, qsd-default-raw, \
                 qsd-native-raw)"
            )),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    pattern: Pattern,
    bs: u64,
    qd: usize,
    /// Each queue sends a FLUSH once this many writes completed since its last one (0: never),
    /// as a guest that wants its writes durable does; the flushes are not counted as ops.
    flush_every: u64,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "4k-randread-qd1",
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 1,
        flush_every: 0,
    },
    Workload {
        name: "4k-randread-qd32",
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 32,
        flush_every: 0,
    },
    Workload {
        name: "4k-randwrite-qd32",
        pattern: Pattern::RandWrite,
        bs: 4096,
        qd: 32,
        flush_every: 0,
    },
    Workload {
        name: "4k-randwrite-flush-qd32",
        pattern: Pattern::RandWrite,
        bs: 4096,
        qd: 32,
        flush_every: FLUSH_EVERY,
    },
    Workload {
        name: "1m-seqread-qd8",
        pattern: Pattern::SeqRead,
        bs: 1 << 20,
        qd: 8,
        flush_every: 0,
    },
];

/// Writes per FLUSH (per queue) of `4k-randwrite-flush-qd32`: about 1 MiB of 4 KiB writes, a
/// guest file system committing its journal or a database its log every so often. Every
/// backend then pays for durability inside the cell: a volatile cache (host page cache, held
/// writes) can no longer hold the writes past the end of the run.
const FLUSH_EVERY: u64 = 256;

const QUEUE_COUNTS: &[usize] = &[1, 2];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Suite {
    Backends,
    Snapshots,
}

struct Config {
    secs: f64,
    warmup: f64,
    filters: Vec<String>,
    backends: Vec<Backend>,
    image_mib: u64,
    keep: bool,
    /// Which suite: the backend comparison cells, or `snapshots` (`vs_qsd/snapshots.rs`).
    suite: Suite,
    /// Rounds per cell (both suites).
    rounds: usize,
    /// Direct I/O everywhere (`--direct`).
    direct: bool,
    /// A snapshot of snapblk's origin taken before each run, on a fresh cache object: its
    /// writes are first touches, copying the old data out (`--snapshot`).
    snapshot: bool,
    /// Write cells end with a FLUSH per queue inside the measured time, as fio's
    /// `end_fsync=1` does (`--end-flush`).
    end_flush: bool,
    /// `cargo bench` passes `--bench`; `cargo test --benches`/`--all-targets` does not.
    bench_mode: bool,
}

const HELP: &str = "\
vs_qsd: snapblk vs qemu-storage-daemon over vhost-user-blk (client: blkio crate)

usage: cargo bench --bench vs_qsd -- [OPTIONS] [FILTER]
       target/release/deps/vs_qsd-HASH --bench [OPTIONS] [FILTER]
       (without --bench, as under `cargo test --all-targets`, it does nothing)

  --secs S          measured seconds per cell and backend (default 3; env VS_QSD_SECS)
  --warmup S        unmeasured warm-up seconds before each measurement (default 0.5;
                    env VS_QSD_WARMUP)
  --filter F        run only cells whose name `WORKLOAD/qN` contains F; comma-separated
                    alternatives (env VS_QSD_FILTER); a bare FILTER argument is the same
  --backends LIST   comma-separated, in run order; the first is the ratio reference
                    (default snapblk,qsd-fast,qsd-default; env VS_QSD_BACKENDS)
  --image-mib N     image size in MiB (default 1024; env VS_QSD_IMAGE_MIB)
  --keep            keep the temp dir (image, sockets, daemon logs) on exit (env VS_QSD_KEEP=1)
  --suite S         `backends` (default: the cells below) or `snapshots`: writable snapshot
                    vs qsd qcow2 overlay (first-touch, rewrite, mixed read), and origin writes
                    under 1 vs 100 snapshots; FILTER picks `snapshot-vs-qcow2` or
                    `origin-write` (env VS_QSD_SUITE)
  --rounds N        rounds per cell, backends alternating within each; a cell shows each
                    backend's median round and the median of the rounds' ratios, and the
                    rounds' ratios follow the table (default 3; env VS_QSD_ROUNDS)
  --direct          direct I/O: snapblk --direct; qsd cache.direct=on (qsd-fast: aio=io_uring,
                    qsd-native: aio=native, both with an iothread) (env VS_QSD_DIRECT=1)
  --snapshot        a snapshot present, taken just before each run (writes are first
                    touches): snapblk serves its origin with a fresh read-only snapshot of it
                    (fresh cache object; an origin write copies the old 64 KiB chunk out,
                    syncs it and its mapping, then overwrites the origin); qsd-fast,
                    qsd-native and qsd-default serve a fresh qcow2 overlay of the image
                    (cluster_size 64 KiB, same aio and cache mode for both files; a write
                    copies the cluster from the image into the overlay, metadata written
                    back lazily, synced on FLUSH), the external-snapshot equivalent; the
                    qsd-*-raw backends keep serving the raw image (the cost of a snapshot)
                    (env VS_QSD_SNAPSHOT=1)
  --end-flush       write cells end with a FLUSH per queue, inside the measured time (as fio's
                    end_fsync=1): their IOPS count the time until the writes are durable, so
                    a backend that leaves them in a volatile cache pays for them at the end
                    (env VS_QSD_END_FLUSH=1)

backends: snapblk, snapblk-base (env SNAPBLK_BASE_BIN), snapblk-wsnap (snapblk serving a
  writable snapshot of the origin taken just before each run on a fresh cache object, with or
  without --snapshot: its first writes fill a new block from the origin, the like-for-like of
  a qcow2 overlay), snapblk-base-wsnap (the same with SNAPBLK_BASE_BIN), qsd-fast (aio=io_uring, iothread), qsd-native (aio=native, iothread,
  always cache.direct=on), qsd-default (thread pool AIO, no iothread), and
  qsd-fast-raw, qsd-native-raw, qsd-default-raw (the same on the raw image even under
  --snapshot)

cells: 4k-randread-qd1, 4k-randread-qd32, 4k-randwrite-qd32, 4k-randwrite-flush-qd32 (a FLUSH
  per queue after every 256 writes), 1m-seqread-qd8, each /q1 and /q2
env SNAPBLK_BIN overrides the snapblk binary (default: the one cargo built for this bench);
env SNAPBLK_BASE_BIN names the binary of backend `snapblk-base` (an A/B of two builds:
  --backends snapblk,snapblk-base gives new/old ratios);
env VS_QSD_SNAPBLK_ARGS adds arguments to `snapblk serve` (e.g. --no-cache);
env RUST_LOG is passed to snapblk; daemon logs go to the temp dir and are shown on failure.
";

fn parse_config() -> Result<Config, String> {
    fn env_or(name: &str, default: &str) -> String {
        std::env::var(name).unwrap_or_else(|_| default.to_string())
    }
    fn num(opt: &str, v: &str) -> Result<f64, String> {
        v.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| format!("{opt}: not a non-negative number: {v:?}"))
    }

    let mut secs = env_or("VS_QSD_SECS", "3");
    let mut warmup = env_or("VS_QSD_WARMUP", "0.5");
    let mut filter = env_or("VS_QSD_FILTER", "");
    let mut backends = env_or("VS_QSD_BACKENDS", "snapblk,qsd-fast,qsd-default");
    let mut image_mib = env_or("VS_QSD_IMAGE_MIB", "1024");
    let mut keep = env_or("VS_QSD_KEEP", "") == "1";
    let mut suite = env_or("VS_QSD_SUITE", "backends");
    let mut rounds = env_or("VS_QSD_ROUNDS", "3");
    let mut direct = env_or("VS_QSD_DIRECT", "") == "1";
    let mut snapshot = env_or("VS_QSD_SNAPSHOT", "") == "1";
    let mut end_flush = env_or("VS_QSD_END_FLUSH", "") == "1";

    let mut bench_mode = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |opt: &str| args.next().ok_or_else(|| format!("{opt} needs a value"));
        match arg.as_str() {
            // `cargo bench` passes --bench to harness=false targets.
            "--bench" => bench_mode = true,
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--secs" => secs = value("--secs")?,
            "--warmup" => warmup = value("--warmup")?,
            "--filter" => filter = value("--filter")?,
            "--backends" => backends = value("--backends")?,
            "--image-mib" => image_mib = value("--image-mib")?,
            "--keep" => keep = true,
            "--suite" => suite = value("--suite")?,
            "--rounds" => rounds = value("--rounds")?,
            "--direct" => direct = true,
            "--snapshot" => snapshot = true,
            "--end-flush" => end_flush = true,
            s if s.starts_with('-') => return Err(format!("unknown option {s:?}\n\n{HELP}")),
            s => filter = s.to_string(),
        }
    }

    let backends = backends
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(Backend::parse)
        .collect::<Result<Vec<_>, _>>()?;
    if backends.is_empty() {
        return Err("--backends: empty list".into());
    }
    let image_mib = image_mib
        .parse::<u64>()
        .ok()
        .filter(|&n| n >= 16)
        .ok_or_else(|| format!("--image-mib: need an integer >= 16, got {image_mib:?}"))?;
    let suite = match suite.as_str() {
        "backends" => Suite::Backends,
        "snapshots" => Suite::Snapshots,
        other => {
            return Err(format!(
                "--suite: expected backends or snapshots, got {other:?}"
            ))
        }
    };
    let rounds = rounds
        .parse::<usize>()
        .ok()
        .filter(|&n| n >= 1)
        .ok_or_else(|| format!("--rounds: need an integer >= 1, got {rounds:?}"))?;
    Ok(Config {
        secs: num("--secs", &secs)?.max(0.1),
        warmup: num("--warmup", &warmup)?,
        filters: filter
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        backends,
        image_mib,
        keep,
        suite,
        rounds,
        direct,
        snapshot,
        end_flush,
        bench_mode,
    })
}

// ---------------------------------------------------------------------------------------
// The image

/// Fills `buf` (one 4 KiB block) with the content the image has at block `idx`: the block
/// index, then words derived from it, so a daemon returning zeroes or the wrong block is
/// caught by `verify`.
fn fill_block(buf: &mut [u8], idx: u64) {
    for (i, word) in buf.chunks_exact_mut(8).enumerate() {
        let v = if i == 0 {
            idx
        } else {
            idx.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64)
        };
        word.copy_from_slice(&v.to_le_bytes());
    }
}

fn create_image(path: &Path, size: u64) {
    let mut f = File::create(path).expect("create the benchmark image");
    let mut chunk = vec![0u8; 1 << 20];
    let blocks_per_chunk = chunk.len() as u64 / BLOCK;
    for c in 0..size / chunk.len() as u64 {
        for (b, block) in chunk.chunks_exact_mut(BLOCK as usize).enumerate() {
            fill_block(block, c * blocks_per_chunk + b as u64);
        }
        f.write_all(&chunk).expect("write the benchmark image");
    }
    f.sync_all().expect("fsync the benchmark image");
    drop(f);
    // Read it back once so that it sits in the page cache for every backend alike.
    let mut f = File::open(path).expect("reopen the benchmark image");
    let mut total = 0u64;
    loop {
        let n = f.read(&mut chunk).expect("read the benchmark image");
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert_eq!(total, size, "image read back short");
}

// ---------------------------------------------------------------------------------------
// Daemons

struct Daemon {
    child: Option<Child>,
    pid: i32,
    sock: PathBuf,
    log: PathBuf,
}

fn snapblk_bin() -> PathBuf {
    match std::env::var_os("SNAPBLK_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_snapblk")),
    }
}

/// The other snapblk build of an A/B run.
fn snapblk_base_bin() -> Option<PathBuf> {
    std::env::var_os("SNAPBLK_BASE_BIN").map(PathBuf::from)
}

/// The command that starts `backend` serving `img` (or, for a qsd backend given `overlay`,
/// that qcow2 overlay of `img`) on `sock` with `nq` queues.
fn daemon_command(
    backend: Backend,
    img: &Path,
    sock: &Path,
    nq: usize,
    overlay: Option<&Path>,
) -> Command {
    let direct = DIRECT.load(Ordering::Relaxed);
    if !backend.is_snapblk() {
        return qsd_command(backend.qsd_kind(), img, sock, nq, overlay);
    }
    let bin = match backend {
        Backend::SnapblkBase | Backend::SnapblkBaseWsnap => snapblk_base_bin().unwrap_or_default(),
        _ => snapblk_bin(),
    };
    let mut c = Command::new(bin);
    c.arg("serve")
        .arg("--origin")
        .arg(img)
        .arg("--socket")
        .arg(sock)
        .arg("--num-queues")
        .arg(nq.to_string())
        .arg("--control")
        .arg(sock.with_extension("ctl"));
    if direct {
        c.arg("--direct");
    }
    if let Ok(extra) = std::env::var("VS_QSD_SNAPBLK_ARGS") {
        c.args(extra.split_whitespace());
    }
    c
}

/// qemu-storage-daemon as `kind` (qsd-fast, qsd-native or qsd-default) serving `img`, or a
/// qcow2 `overlay` backed by it (both files opened alike: same AIO engine and cache mode).
fn qsd_command(
    kind: Backend,
    img: &Path,
    sock: &Path,
    nq: usize,
    overlay: Option<&Path>,
) -> Command {
    let direct = DIRECT.load(Ordering::Relaxed);
    let cache_direct = if direct { "on" } else { "off" };
    // qsd 10's vhost-user-blk export takes a single `iothread` (a string in the QMP schema;
    // the `iothread.N=` list syntax is rejected), so all queues share io0.
    let (opts, iothread) = match kind {
        Backend::QsdFast => (format!("aio=io_uring,cache.direct={cache_direct}"), true),
        // Linux AIO needs cache.direct=on.
        Backend::QsdNative => ("aio=native,cache.direct=on".to_string(), true),
        _ => (format!("cache.direct={cache_direct}"), false),
    };
    let mut c = Command::new("qemu-storage-daemon");
    if iothread {
        c.args(["--object", "iothread,id=io0"]);
    }
    let img = img.display();
    match overlay {
        Some(ovl) => {
            c.arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=base-file,filename={img},{opts},read-only=on"
                ))
                .arg("--blockdev")
                .arg("driver=raw,node-name=base,file=base-file,read-only=on")
                .arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=ovl-file,filename={},{opts}",
                    ovl.display()
                ))
                .arg("--blockdev")
                .arg("driver=qcow2,node-name=f0,file=ovl-file,backing=base");
        }
        None => {
            c.arg("--blockdev")
                .arg(format!("driver=file,node-name=f0,filename={img},{opts}"));
        }
    }
    let iothread = if iothread { ",iothread=io0" } else { "" };
    c.arg("--export").arg(format!(
        "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,\
         num-queues={nq}{iothread}",
        sock.display()
    ));
    c
}

/// A fresh qcow2 overlay of `img` at `ovl`, its clusters as large as snapblk's chunks.
fn create_overlay(img: &Path, ovl: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(ovl);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(img)
        .args(["-F", "raw", "-o", "cluster_size=65536"])
        .arg(ovl)
        .output()
        .map_err(|e| format!("qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

/// Starts a daemon with its output in `log`, in its own process group (a terminal ^C reaches
/// only the bench, which then shuts the daemons down itself) and killed if the bench dies.
fn spawn_daemon(mut cmd: Command, sock: PathBuf, log: PathBuf) -> Result<Daemon, String> {
    let _ = std::fs::remove_file(&sock);
    let logf = File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let logf2 = logf.try_clone().map_err(|e| format!("dup log fd: {e}"))?;
    cmd.stdin(Stdio::null()).stdout(logf).stderr(logf2);
    cmd.process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
    // is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("spawn {:?}: {e}", cmd.get_program()))?;
    Ok(Daemon {
        pid: child.id() as i32,
        child: Some(child),
        sock,
        log,
    })
}

impl Daemon {
    fn start(
        backend: Backend,
        img: &Path,
        dir: &Path,
        nq: usize,
        seq: usize,
        overlay: Option<&Path>,
    ) -> Result<Daemon, String> {
        let sock = dir.join(format!("{}-{seq}.sock", backend.name()));
        let log = dir.join(format!("{}-{seq}.log", backend.name()));
        spawn_daemon(daemon_command(backend, img, &sock, nq, overlay), sock, log)
    }

    /// utime + stime of the whole daemon process (all threads), in seconds.
    fn cpu_secs(&self) -> Result<f64, String> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .map_err(|e| format!("read /proc/{}/stat: {e}", self.pid))?;
        // Fields after the ")" that closes comm start at field 3 (state).
        let rest = &stat[stat.rfind(')').ok_or("malformed /proc/PID/stat")? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Result<u64, String> {
            f.get(n - 3)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("/proc/{}/stat: bad field {n}", self.pid))
        };
        let ticks = field(14)? + field(15)?;
        // SAFETY: sysconf has no preconditions; it only reads a system setting.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok(ticks as f64 / hz)
    }

    /// Returns an error mentioning the exit status and log tail if the daemon has died.
    fn check_alive(&mut self) -> Result<(), String> {
        let child = self.child.as_mut().expect("daemon already stopped");
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "daemon exited ({status}); log {}:\n{}",
                self.log.display(),
                tail(&self.log, 30)
            )),
            Err(e) => Err(format!("waitpid: {e}")),
        }
    }

    fn log_tail(&self) -> String {
        format!(
            "daemon log {}:\n{}",
            self.log.display(),
            tail(&self.log, 30)
        )
    }

    /// SIGTERM, then SIGKILL after 3 s; reaps the child and removes the socket.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let status = match child.try_wait() {
            Ok(Some(s)) => Some(s),
            _ => {
                // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
                unsafe { libc::kill(self.pid, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(3);
                loop {
                    match child.try_wait() {
                        Ok(Some(s)) => break Some(s),
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(10))
                        }
                        _ => {
                            let _ = child.kill();
                            break child.wait().ok();
                        }
                    }
                }
            }
        };
        let _ = std::fs::remove_file(&self.sock);
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// The client

struct Client {
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    capacity: u64,
    /// Owns the connection; declared last so that it is dropped after the queues.
    _blkio: Blkio,
}

fn berr(what: &str) -> impl Fn(blkio::Error) -> String + '_ {
    move |e| format!("{what}: {e} (errno {})", e.errno())
}

/// Connects to the daemon's socket (retrying until it listens), starts `nq` queues and maps
/// one buffer region of `region_len` bytes. Read-only workloads connect read-only (this
/// changes nothing in feature negotiation, it only lets a device that offers
/// VIRTIO_BLK_F_RO be benchmarked for reads).
fn connect(
    daemon: &mut Daemon,
    nq: usize,
    region_len: usize,
    read_only: bool,
) -> Result<Client, String> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut blkio = loop {
        daemon.check_alive()?;
        if stopping() {
            return Err("interrupted".into());
        }
        let mut last_err = String::from("socket not created");
        if daemon.sock.exists() {
            let mut b = Blkio::new("virtio-blk-vhost-user").map_err(berr("Blkio::new"))?;
            b.set_str("path", &daemon.sock.to_string_lossy())
                .map_err(berr("set path"))?;
            b.set_bool("read-only", read_only)
                .map_err(berr("set read-only"))?;
            match b.connect() {
                Ok(()) => break b,
                Err(e) => last_err = berr("connect")(e),
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no vhost-user connection after {CONNECT_TIMEOUT:?}: {last_err}\n{}",
                daemon.log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };

    let max_queues = blkio
        .get_i32("max-queues")
        .map_err(berr("get max-queues"))?;
    if (max_queues as usize) < nq {
        return Err(format!("device offers {max_queues} queues, need {nq}"));
    }
    blkio
        .set_i32("num-queues", nq as i32)
        .map_err(berr("set num-queues"))?;
    let capacity = blkio.get_u64("capacity").map_err(berr("get capacity"))?;
    let max_transfer = blkio
        .get_i32("max-transfer")
        .map_err(berr("get max-transfer"))?;
    let queues = blkio.start().map_err(berr("start"))?.queues;
    if queues.len() != nq {
        return Err(format!("start gave {} queues, asked {nq}", queues.len()));
    }
    let align = blkio
        .get_u64("mem-region-alignment")
        .map_err(berr("get mem-region-alignment"))? as usize;
    let len = region_len.div_ceil(align) * align;
    let region = blkio
        .alloc_mem_region(len)
        .map_err(berr("alloc_mem_region"))?;
    blkio
        .map_mem_region(&region)
        .map_err(berr("map_mem_region"))?;
    if max_transfer > 0 && (max_transfer as u64) < (1 << 20) {
        eprintln!("note: device max-transfer is {max_transfer} bytes (< 1 MiB)");
    }
    Ok(Client {
        queues,
        region,
        capacity,
        _blkio: blkio,
    })
}

fn completion_error(c: &Completion) -> String {
    let msg = if c.error_msg.is_null() {
        String::new()
    } else {
        // blkio hands out static C strings here.
        // SAFETY: blkio sets error_msg to a NUL-terminated static C string when it is not null.
        let s = unsafe { std::ffi::CStr::from_ptr(c.error_msg) };
        format!(": {}", s.to_string_lossy())
    };
    format!(
        "request failed: {} (ret {}){msg}",
        std::io::Error::from_raw_os_error(-c.ret),
        c.ret
    )
}

/// Waits for at least one completion; returns how many of `comps` are filled.
fn wait_some(q: &mut Blkioq, comps: &mut [MaybeUninit<Completion>]) -> Result<usize, String> {
    let mut timeout = IO_TIMEOUT;
    q.do_io(comps, 1, Some(&mut timeout), None).map_err(|e| {
        if e.errno() == blkio::Errno::TIME {
            format!("no completion within {IO_TIMEOUT:?} (daemon hung?)")
        } else {
            berr("do_io")(e)
        }
    })
}

/// Reads the first and the last block through queue 0 and checks their content, so a
/// backend that serves zeroes or the wrong offsets cannot post good numbers.
fn verify(client: &mut Client) -> Result<(), String> {
    let buf = client.region.addr as *mut u8;
    let last = client.capacity / BLOCK - 1;
    let mut expect = vec![0u8; BLOCK as usize];
    let mut comps: Vec<MaybeUninit<Completion>> = (0..1).map(|_| MaybeUninit::uninit()).collect();
    for idx in [0, last] {
        let q = &mut client.queues[0];
        // SAFETY: `buf` is the start of the client's mapped region, at least one block long, and no request is in flight.
        unsafe { std::ptr::write_bytes(buf, 0, BLOCK as usize) };
        q.read(idx * BLOCK, buf, BLOCK as usize, 0, ReqFlags::empty());
        let n = wait_some(q, &mut comps)?;
        assert_eq!(n, 1);
        // SAFETY: do_io (in wait_some) initialized the first `n` (= 1) completions.
        let c = unsafe { comps[0].assume_init_read() };
        if c.ret != 0 {
            return Err(format!(
                "verify read of block {idx}: {}",
                completion_error(&c)
            ));
        }
        fill_block(&mut expect, idx);
        // SAFETY: the read into `buf` (mapped, one block long) has completed; nothing writes it meanwhile.
        let got = unsafe { std::slice::from_raw_parts(buf, BLOCK as usize) };
        if got != expect.as_slice() {
            return Err(format!(
                "verify read of block {idx}: wrong data (first bytes {:02x?}, expected {:02x?})",
                &got[..16],
                &expect[..16]
            ));
        }
    }
    Ok(())
}

struct QueueJob {
    q: Blkioq,
    /// Address of this queue's `qd * bs` bytes of buffers.
    buf: usize,
    w: Workload,
    capacity: u64,
    /// Sequential workloads stream through [seq_start, seq_start + seq_len).
    seq_start: u64,
    seq_len: u64,
    seed: u64,
    measure_start: Instant,
    end: Instant,
    /// Send a FLUSH once the writes in flight at `end` are done (`--end-flush`).
    end_flush: bool,
}

#[derive(Default)]
struct QueueResult {
    ops: u64,
    bytes: u64,
    /// When the end FLUSH completed (`--end-flush`).
    durable_at: Option<Instant>,
}

fn run_queue(mut job: QueueJob) -> Result<QueueResult, String> {
    let w = job.w;
    let bs = w.bs as usize;
    let mut rng = job.seed | 1;
    let mut next_rand = move || {
        // xorshift64*
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    // Random I/O avoids the first and last block, which `verify` reads.
    let blocks = job.capacity / w.bs;
    let mut seq_pos = 0u64;
    let mut next_offset = move || match w.pattern {
        Pattern::RandRead | Pattern::RandWrite => (1 + next_rand() % (blocks - 2)) * w.bs,
        Pattern::SeqRead => {
            let off = job.seq_start + seq_pos;
            seq_pos = (seq_pos + w.bs) % job.seq_len;
            off
        }
    };
    // Every 4 KiB block of the image starts with its own index (`fill_block`), and writes
    // keep it so. Reads check that word in every block they return, so a
    // backend completing requests without the right data fails instead of posting numbers.
    let buf_of = |slot: usize| (job.buf + slot * bs) as *mut u8;
    // SAFETY: `slot < qd` and `byte < bs`: the address is inside this job's part of the mapped region; the caller only dereferences it for a slot with no request in flight.
    let word_at = |slot: usize, byte: usize| unsafe { buf_of(slot).add(byte) as *mut u64 };
    let mut slot_off = vec![0u64; w.qd];
    let submit = |q: &mut Blkioq, slot_off: &mut [u64], slot: usize, off: u64| {
        slot_off[slot] = off;
        match w.pattern {
            Pattern::RandRead | Pattern::SeqRead => {
                for b in (0..bs).step_by(BLOCK as usize) {
                    // SAFETY: `slot` has no request in flight (it is being submitted); the word is inside its buffer.
                    unsafe { *word_at(slot, b) = u64::MAX };
                }
                q.read(off, buf_of(slot), bs, slot, ReqFlags::empty())
            }
            Pattern::RandWrite => {
                // SAFETY: as above: the slot is being submitted, the word is inside its buffer.
                unsafe { *word_at(slot, 0) = (off / BLOCK).to_le() };
                q.write(off, buf_of(slot), bs, slot, ReqFlags::empty())
            }
        }
    };
    let check = |slot: usize, off: u64| -> Result<(), String> {
        if w.pattern == Pattern::RandWrite {
            return Ok(());
        }
        for byte in (0..bs).step_by(BLOCK as usize) {
            // SAFETY: the slot's request has completed; the word is inside its buffer.
            let got = u64::from_le(unsafe { *word_at(slot, byte) });
            let want = (off + byte as u64) / BLOCK;
            if got != want {
                return Err(format!(
                    "wrong data: {}-byte read at offset {off}: block at +{byte} starts with \
                     {got:#x}, expected its index {want:#x}",
                    bs
                ));
            }
        }
        Ok(())
    };

    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..w.qd).map(|_| MaybeUninit::uninit()).collect();
    let mut res = QueueResult::default();
    let mut in_flight = 0usize;
    // The slot a FLUSH is in flight in, if any, and the writes completed since the last one.
    let mut flush_slot = None;
    let mut since_flush = 0u64;
    for slot in 0..w.qd {
        submit(&mut job.q, &mut slot_off, slot, next_offset());
        in_flight += 1;
    }
    let mut first_err = None;
    while in_flight > 0 {
        let n = wait_some(&mut job.q, &mut comps)?;
        let now = Instant::now();
        let go_on = now < job.end && !stopping() && first_err.is_none();
        for c in &comps[..n] {
            // SAFETY: wait_some initialized the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            in_flight -= 1;
            let slot = c.user_data;
            let was_flush = flush_slot == Some(slot);
            if was_flush {
                flush_slot = None;
            }
            if c.ret != 0 {
                first_err.get_or_insert_with(|| completion_error(&c));
                continue;
            }
            if !was_flush {
                if let Err(e) = check(slot, slot_off[slot]) {
                    first_err.get_or_insert(e);
                    continue;
                }
                if now >= job.measure_start && now < job.end {
                    res.ops += 1;
                    res.bytes += w.bs;
                }
                since_flush += 1;
            }
            if go_on {
                if w.flush_every > 0 && since_flush >= w.flush_every && flush_slot.is_none() {
                    since_flush = 0;
                    flush_slot = Some(slot);
                    job.q.flush(slot, ReqFlags::empty());
                } else {
                    submit(&mut job.q, &mut slot_off, slot, next_offset());
                }
                in_flight += 1;
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    if job.end_flush && w.pattern == Pattern::RandWrite && !stopping() {
        job.q.flush(0, ReqFlags::empty());
        wait_some(&mut job.q, &mut comps[..1])?;
        // SAFETY: wait_some initialized the first completion.
        let c = unsafe { comps[0].assume_init_read() };
        if c.ret != 0 {
            return Err(format!("end flush: {}", completion_error(&c)));
        }
        res.durable_at = Some(Instant::now());
    }
    Ok(res)
}

// ---------------------------------------------------------------------------------------
// Cells

#[derive(Clone, Copy)]
struct Measured {
    iops: f64,
    mbps: f64,
    cpu: f64,
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// What every run of the benchmark shares.
struct Ctx<'a> {
    cfg: &'a Config,
    img: &'a Path,
    dir: &'a Path,
}

/// Runs workload `w` with `nq` queues on a fresh daemon of `backend`. `seq` numbers the run
/// (socket and log names), `cell` the cell (random offsets are the same for each backend).
fn run_one(
    ctx: &Ctx,
    backend: Backend,
    w: Workload,
    nq: usize,
    seq: usize,
    cell: usize,
) -> Result<Measured, String> {
    let (cfg, img) = (ctx.cfg, ctx.img);
    let wsnap = matches!(backend, Backend::SnapblkWsnap | Backend::SnapblkBaseWsnap);
    let snap = backend.is_snapblk() && (cfg.snapshot || wsnap);
    let cache = {
        let mut name = img.file_name().unwrap_or_default().to_os_string();
        name.push(".cache");
        img.with_file_name(name)
    };
    if backend.is_snapblk() {
        // A fresh cache object each run: every chunk's first write copies it out, and the
        // two builds of an A/B run never share one (a newer build's format flags make an
        // older one refuse it).
        let _ = std::fs::remove_file(&cache);
    }
    // qsd's snapshot: a fresh qcow2 overlay each run (first writes copy clusters from the
    // image), removed after the run.
    let overlay = RemoveOnDrop(
        backend
            .qsd_overlay(cfg.snapshot)
            .then(|| ctx.dir.join(format!("overlay-{seq}.qcow2"))),
    );
    if let Some(ovl) = &overlay.0 {
        create_overlay(img, ovl)?;
    }
    let mut daemon = Daemon::start(backend, img, ctx.dir, nq, seq, overlay.0.as_deref())?;
    let ctl = daemon.sock.with_extension("ctl");
    if snap {
        // snapblk-wsnap drives its writable snapshot; the others their origin.
        let serve = wsnap.then(|| ctx.dir.join(format!("wsnap-{seq}.sock")));
        take_snapshot(&daemon, serve.as_deref())
            .map_err(|e| format!("{e}\n{}", daemon.log_tail()))?;
        if let Some(sock) = serve {
            // Stopping the daemon removes this socket.
            daemon.sock = sock;
        }
    }
    let read_only = w.pattern != Pattern::RandWrite;
    let mut client = connect(&mut daemon, nq, nq * w.qd * w.bs as usize, read_only)?;
    verify(&mut client).map_err(|e| format!("{e}\n{}", daemon.log_tail()))?;
    // Write buffers carry a recognizable pattern; read buffers get overwritten anyway.
    // SAFETY: the region is mapped for the client's life, `len` bytes long, and no request is in flight yet.
    unsafe { std::ptr::write_bytes(client.region.addr as *mut u8, 0x5a, client.region.len) };

    let start = Instant::now();
    let measure_start = start + Duration::from_secs_f64(cfg.warmup);
    let end = measure_start + Duration::from_secs_f64(cfg.secs);
    let capacity = client.capacity;
    let per_queue_span = (capacity / nq as u64) / w.bs * w.bs;
    let jobs: Vec<QueueJob> = client
        .queues
        .drain(..)
        .enumerate()
        .map(|(i, q)| QueueJob {
            q,
            buf: client.region.addr + i * w.qd * w.bs as usize,
            w,
            capacity,
            seq_start: i as u64 * per_queue_span,
            seq_len: per_queue_span,
            // Same offsets for every backend of a cell.
            seed: 0x5eed_0000 + (cell as u64) * 131 + i as u64,
            measure_start,
            end,
            end_flush: cfg.end_flush,
        })
        .collect();

    let (results, cpu) = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|job| s.spawn(move || run_queue(job)))
            .collect();
        sleep_until(measure_start);
        let cpu0 = daemon.cpu_secs();
        sleep_until(end);
        let cpu1 = daemon.cpu_secs();
        let results: Vec<Result<QueueResult, String>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("queue thread panicked".into()))
            })
            .collect();
        (results, cpu0.and_then(|a| cpu1.map(|b| b - a)))
    });
    let mut ops = 0;
    let mut bytes = 0;
    // The measured time, plus how long after its end the last end FLUSH completed.
    let mut secs = cfg.secs;
    for (i, r) in results.into_iter().enumerate() {
        let r = r.map_err(|e| {
            let alive = daemon.check_alive().err().unwrap_or_default();
            format!("queue {i}: {e}\n{alive}\n{}", daemon.log_tail())
        })?;
        ops += r.ops;
        bytes += r.bytes;
        if let Some(t) = r.durable_at {
            secs = secs.max(cfg.secs + t.saturating_duration_since(end).as_secs_f64());
        }
    }
    if stopping() {
        return Err("interrupted".into());
    }
    let cpu = cpu?;
    // Disconnect before the daemon goes away, then check it did not die under us.
    drop(client);
    daemon.check_alive()?;
    if snap && w.pattern == Pattern::RandWrite {
        println!(
            "# run {seq} ({}, {}/q{nq}): {}",
            backend.name(),
            w.name,
            cow_counters(&ctl)
        );
    }
    daemon.stop();
    if w.pattern == Pattern::RandWrite {
        // Flush the dirtied page cache now, outside any measured window, so that writeback
        // does not land on whichever backend runs next.
        File::open(img)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("fsync {}: {e}", img.display()))?;
    }
    Ok(Measured {
        iops: ops as f64 / secs,
        mbps: bytes as f64 / 1e6 / secs,
        cpu,
    })
}

/// A snapblk daemon's copy-on-write counters (warm-up included): how many chunks were copied
/// out or filled, and in how many commits.
fn cow_counters(ctl: &Path) -> String {
    let out = Command::new(snapblk_bin())
        .args(["stats", "--json", "--control"])
        .arg(ctl)
        .output();
    let stats: Option<serde_json::Value> = out
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok());
    match stats {
        Some(st) => {
            let k = &st["cache"];
            format!(
                "copies {} copy_writes {} cow_fills {} commits {} data_syncs_skipped {}",
                k["copies"],
                k["copy_writes"],
                k["cow_fills"],
                k["commits"],
                k["data_syncs_skipped"]
            )
        }
        None => "no stats".to_string(),
    }
}

/// A file removed when this goes (a run's qcow2 overlay).
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Takes snapshot `s` of a snapblk daemon's origin over its control socket: read-only and
/// not served, or writable and served on `serve`.
fn take_snapshot(daemon: &Daemon, serve: Option<&Path>) -> Result<(), String> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        let mut cmd = Command::new(snapblk_bin());
        cmd.args(["snapshot", "create", "s", "--control"])
            .arg(daemon.sock.with_extension("ctl"));
        if let Some(sock) = serve {
            cmd.arg("--writable").arg("--socket").arg(sock);
        }
        let out = cmd
            .output()
            .map_err(|e| format!("snapblk snapshot create: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        // The control socket listens a moment after the vhost-user one.
        if Instant::now() > deadline {
            return Err(format!(
                "snapblk snapshot create: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The median of `xs` (the mean of the middle two for an even count); `None` if empty.
fn median(mut xs: Vec<f64>) -> Option<f64> {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(xs[n / 2]),
        _ => Some((xs[n / 2 - 1] + xs[n / 2]) / 2.0),
    }
}

/// The round with the median IOPS (the lower middle one for an even count), whole, so its
/// MB/s and CPU time belong to the same run.
fn median_round(rounds: impl Iterator<Item = Measured>) -> Option<Measured> {
    let mut all: Vec<Measured> = rounds.collect();
    all.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    all.get(all.len().saturating_sub(1) / 2).copied()
}

/// `a`'s IOPS over `b`'s, if both ran.
fn iops_ratio(a: Option<Measured>, b: Option<Measured>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b.iops > 0.0 => Some(a.iops / b.iops),
        _ => None,
    }
}

/// Whether `path` is on tmpfs (direct I/O there measures memory, or is refused).
fn is_tmpfs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` is valid for writes of a statfs.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    // SAFETY: statfs filled it in when it returned 0.
    rc == 0 && unsafe { st.assume_init() }.f_type == libc::TMPFS_MAGIC
}

fn command_version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| format!("{cmd}: not found"))
}

/// The bench's exit status: 1 if a run failed (each failure's first line is printed), 130
/// if interrupted, else 0.
fn exit_code(errors: &[String]) -> i32 {
    if !errors.is_empty() {
        eprintln!("vs_qsd: {} run(s) failed:", errors.len());
        for e in errors {
            eprintln!("  - {}", e.lines().next().unwrap_or(""));
        }
        1
    } else if stopping() {
        eprintln!("vs_qsd: interrupted");
        130
    } else {
        0
    }
}

fn main() {
    let cfg = match parse_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vs_qsd: {e}");
            std::process::exit(2);
        }
    };
    DIRECT.store(cfg.direct, Ordering::Relaxed);
    if !cfg.bench_mode {
        // Built and run as a test (`cargo test --all-targets`): a 2-minute benchmark has no
        // place there.
        println!("vs_qsd: skipped (run it with `cargo bench --bench vs_qsd`)");
        return;
    }
    // SAFETY: installing a handler that only stores to an atomic is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }

    let uses_snapblk_bin = cfg
        .backends
        .iter()
        .any(|b| matches!(b, Backend::Snapblk | Backend::SnapblkWsnap));
    if uses_snapblk_bin && !snapblk_bin().is_file() {
        eprintln!(
            "vs_qsd: snapblk binary {} not found (cargo bench builds it; or set SNAPBLK_BIN)",
            snapblk_bin().display()
        );
        std::process::exit(2);
    }
    if (cfg.backends.contains(&Backend::SnapblkBase)
        || cfg.backends.contains(&Backend::SnapblkBaseWsnap))
        && !snapblk_base_bin().is_some_and(|b| b.is_file())
    {
        eprintln!("vs_qsd: backend snapblk-base needs SNAPBLK_BASE_BIN, the other snapblk binary");
        std::process::exit(2);
    }
    let uses_qsd = cfg.backends.iter().any(|b| !b.is_snapblk());
    if uses_qsd
        && Command::new("qemu-storage-daemon")
            .arg("--version")
            .output()
            .is_err()
    {
        eprintln!(
            "vs_qsd: qemu-storage-daemon not found on PATH (qemu/install-host-deps.sh installs \
             it; or run only --backends snapblk)"
        );
        std::process::exit(2);
    }

    let cells: Vec<(Workload, usize)> = WORKLOADS
        .iter()
        .flat_map(|w| QUEUE_COUNTS.iter().map(move |&nq| (*w, nq)))
        .filter(|(w, nq)| {
            let name = format!("{}/q{nq}", w.name);
            cfg.filters.is_empty() || cfg.filters.iter().any(|f| name.contains(f.as_str()))
        })
        .collect();
    if cells.is_empty() && cfg.suite == Suite::Backends {
        eprintln!("vs_qsd: no cell matches filter {:?}", cfg.filters);
        std::process::exit(2);
    }

    let dir = tempfile::Builder::new()
        .prefix("vs_qsd.")
        .tempdir()
        .expect("create a temp dir (set TMPDIR to move it)");
    if cfg.direct && is_tmpfs(dir.path()) {
        eprintln!(
            "vs_qsd: --direct needs a disk: {} is on tmpfs (set TMPDIR to a disk file system)",
            dir.path().display()
        );
        std::process::exit(2);
    }
    let img = dir.path().join("disk.raw");
    let size = cfg.image_mib << 20;
    let t = Instant::now();
    create_image(&img, size);

    println!("# vs_qsd: snapblk vs qemu-storage-daemon over vhost-user-blk (client: blkio crate)");
    println!(
        "# image {} MiB raw, fully written and page-cached ({:.1} s); {} s per cell + {} s warm-up",
        cfg.image_mib,
        t.elapsed().as_secs_f64(),
        cfg.secs,
        cfg.warmup
    );
    if uses_snapblk_bin {
        println!("# snapblk: {}", snapblk_bin().display());
    }
    if let (true, Some(base)) = (
        cfg.backends.contains(&Backend::SnapblkBase)
            || cfg.backends.contains(&Backend::SnapblkBaseWsnap),
        snapblk_base_bin(),
    ) {
        println!("# snapblk-base: {}", base.display());
    }
    println!(
        "# qsd: {}",
        command_version("qemu-storage-daemon", "--version")
    );
    println!(
        "# mode: {}{}{}",
        if cfg.direct {
            "direct I/O (snapblk --direct; qsd cache.direct=on, qsd-fast aio=io_uring, \
             qsd-native aio=native)"
        } else {
            "page cache (cache.direct=off)"
        },
        if cfg.snapshot {
            "; snapshot before each run (first-touch writes): snapblk's origin has a fresh \
             read-only snapshot, qsd-fast/-native/-default serve a fresh qcow2 overlay \
             (64 KiB clusters) of the image, qsd-*-raw the raw image"
        } else {
            ""
        },
        if cfg.end_flush {
            "; write cells end with a FLUSH per queue, counted in their time (--end-flush)"
        } else {
            ""
        }
    );
    println!(
        "# host: {} CPUs, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        command_version("uname", "-r")
    );

    if cfg.suite == Suite::Snapshots {
        let ctx = Ctx {
            cfg: &cfg,
            img: &img,
            dir: dir.path(),
        };
        let code = snapshots::run(&ctx);
        if cfg.keep {
            eprintln!("vs_qsd: kept {}", dir.keep().display());
        }
        std::process::exit(code);
    }

    let names: Vec<&str> = cfg.backends.iter().map(|b| b.name()).collect();
    let reference = cfg.backends[0];
    let others = &cfg.backends[1..];
    let mut header = String::from("| workload | queues |");
    let mut rule = String::from("|---|---:|");
    for n in &names {
        let _ = write!(header, " {n} IOPS | {n} MB/s | {n} CPU s |");
        rule.push_str("---:|---:|---:|");
    }
    for o in others {
        let _ = write!(header, " {}/{} |", reference.name(), o.name());
        rule.push_str("---:|");
    }
    println!("{header}\n{rule}");

    let ctx = Ctx {
        cfg: &cfg,
        img: &img,
        dir: dir.path(),
    };
    let mut errors: Vec<String> = Vec::new();
    let mut min_ratio: Vec<Option<(f64, String)>> = vec![None; others.len()];
    let mut seq = 0usize;
    // Per cell and other backend, the ratio of each round, printed after the table.
    let mut round_ratios: Vec<String> = Vec::new();
    for (ci, &(w, nq)) in cells.iter().enumerate() {
        if stopping() {
            break;
        }
        // rounds[r][bi]: backend bi's measurement in round r.
        let mut rounds: Vec<Vec<Option<Measured>>> = Vec::new();
        'rounds: for round in 0..cfg.rounds {
            let mut got: Vec<Option<Measured>> = vec![None; cfg.backends.len()];
            // Rotate the start backend per cell and round so no backend always runs first.
            for k in 0..cfg.backends.len() {
                if stopping() {
                    break 'rounds;
                }
                let bi = (ci + round + k) % cfg.backends.len();
                let backend = cfg.backends[bi];
                seq += 1;
                match run_one(&ctx, backend, w, nq, seq, ci) {
                    Ok(m) => got[bi] = Some(m),
                    Err(_) if stopping() => {}
                    Err(e) => {
                        let msg = format!("{}/q{nq} on {}: {e}", w.name, backend.name());
                        eprintln!("ERROR {msg}");
                        errors.push(msg);
                    }
                }
            }
            rounds.push(got);
        }
        let got: Vec<Option<Measured>> = (0..cfg.backends.len())
            .map(|bi| median_round(rounds.iter().filter_map(|r| r[bi])))
            .collect();
        let mut row = format!("| {} | {nq} |", w.name);
        for (bi, m) in got.iter().enumerate() {
            match m {
                Some(m) => {
                    // A backend that failed in some rounds says in how many it ran.
                    let ran = rounds.iter().filter(|r| r[bi].is_some()).count();
                    let partial = if ran < rounds.len() {
                        format!(" ({ran}/{} rounds)", rounds.len())
                    } else {
                        String::new()
                    };
                    let _ = write!(
                        row,
                        " {:.0}{partial} | {:.1} | {:.2} |",
                        m.iops, m.mbps, m.cpu
                    );
                }
                None => row.push_str(" ERR | ERR | ERR |"),
            }
        }
        for (oi, o) in others.iter().enumerate() {
            let each: Vec<Option<f64>> =
                rounds.iter().map(|r| iops_ratio(r[0], r[oi + 1])).collect();
            let per_round: Vec<f64> = each.iter().flatten().copied().collect();
            if cfg.rounds > 1 {
                let list: Vec<String> = each
                    .iter()
                    .map(|r| r.map_or_else(|| "ERR".to_string(), |r| format!("{r:.2}")))
                    .collect();
                round_ratios.push(format!(
                    "#   {}/q{nq} {}/{}: {}",
                    w.name,
                    reference.name(),
                    o.name(),
                    list.join(" ")
                ));
            }
            let r = median(per_round);
            let s = r.map_or_else(|| "-".to_string(), |r| format!("{r:.2}"));
            let _ = write!(row, " {s} |");
            if let Some(r) = r {
                let cell = format!("{}/q{nq}", w.name);
                match &min_ratio[oi] {
                    Some((m, _)) if *m <= r => {}
                    _ => min_ratio[oi] = Some((r, cell)),
                }
            }
        }
        println!("{row}");
    }

    if !round_ratios.is_empty() {
        println!("# ratio of each round (the table shows their median):");
        for line in &round_ratios {
            println!("{line}");
        }
    }
    let mut summary = String::from("# summary: min ratio");
    let mut overall: Option<(f64, String)> = None;
    for (oi, o) in others.iter().enumerate() {
        match &min_ratio[oi] {
            Some((r, cell)) => {
                let _ = write!(
                    summary,
                    " {}/{} = {r:.2} ({cell});",
                    reference.name(),
                    o.name()
                );
                if overall.as_ref().is_none_or(|(m, _)| r < m) {
                    overall = Some((*r, format!("{}/{} {cell}", reference.name(), o.name())));
                }
            }
            None => {
                let _ = write!(summary, " {}/{} = n/a;", reference.name(), o.name());
            }
        }
    }
    match overall {
        Some((r, what)) => {
            let _ = write!(summary, " overall min = {r:.2} ({what})");
        }
        None => summary.push_str(" overall min = n/a"),
    }
    println!("{summary}");
    let code = exit_code(&errors);
    if cfg.keep {
        eprintln!("vs_qsd: kept {}", dir.keep().display());
    } else {
        drop(dir);
        if code == 1 {
            eprintln!("vs_qsd: daemon logs were removed with the temp dir; rerun with --keep");
        }
    }
    std::process::exit(code);
}
