//! A real power cut under the real daemon.
//!
//! `snapblk serve` runs with its origin and cache object on a FUSE file system from the test
//! kit ([`PowerCutDisk`]) that keeps, per file, the durable image and the writes since that
//! file's last fsync/fdatasync. Two writers (libblkio clients) write sector tokens to the
//! origin and to a writable snapshot, flush, write zeroes, discard and take read-only
//! snapshots over the control socket (`snapblk snapshot create`), while each remembers, per
//! sector, the tokens that may legally be there after a cut: the value at its last
//! *completed* flush plus everything written since. At a random I/O event (writes, syncs,
//! size changes and hole punches, counted over both files) the power is cut: each file's
//! image freezes as durable bytes plus any subset of the unsynced writes (each kept, lost or
//! torn at 512 bytes), and from then on the file system answers EIO, so the daemon learns of
//! nothing after the cut (an fsync that straddles it fails, so no flush is acknowledged that
//! the image does not hold). The daemon is SIGKILLed, the file system unmounted, and the
//! frozen images written as plain files at the same paths (the cache object records the
//! origin's path). Then: `snapblk check` is clean, the daemon restarts on them, and every
//! sector of every device holds a legal token: no flushed write lost, every snapshot exact
//! (its sectors hold what the device held when it was taken, among the values that device
//! could still lose at that moment; exactly that value when the create followed a flush), no
//! device shows another device's tokens, and no snapshot that was acknowledged is missing.
//!
//! Why direct I/O: the FUSE files are opened with `FOPEN_DIRECT_IO`, so the kernel's page
//! cache is bypassed. Every write the daemon issues reaches the file system, in order, before
//! the syscall returns; no dirty page can be written back after the cut, and no cached page can
//! answer a read from a state the file system no longer has. A write-back cache would let the
//! kernel reorder and delay writes and would make "durable at fsync" a statement about the
//! kernel rather than about the daemon.
//!
//! `SNAPBLK_POWER_CUTS=N` runs N cuts (default 200); a failure names the cut's seed, which
//! `SNAPBLK_POWER_CUT_SEED=S` replays (up to thread timing).

mod support;

use snapblk::testkit::blkio_client::Client;
use snapblk::testkit::fuse_disk::PowerCutDisk;
use snapblk::testkit::storage::CrashController;
use snapblk::testkit::tokens::{sector_token, token_sector, writer_token};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use support::{Daemon, BIN};

const SECTOR: usize = 512;
/// Origin: 4 MiB (8192 sectors); 4 KiB chunks.
const ORIGIN_SECTORS: usize = 8192;
/// Writers: 1 writes the origin, 2 the writable snapshot; 3 made the origin's first content.
const ORIGIN_WRITER: u64 = 1;
const SNAP_WRITER: u64 = 2;
const INITIAL: u64 = 3;

/// What a device may hold after a cut, per sector.
#[derive(Clone, Debug)]
struct Legal {
    /// Values at the last completed flush plus everything written since.
    cands: Vec<Vec<u64>>,
}

impl Legal {
    fn new(init: impl Fn(usize) -> u64) -> Self {
        Legal {
            cands: (0..ORIGIN_SECTORS).map(|s| vec![init(s)]).collect(),
        }
    }
    fn write(&mut self, first: usize, tokens: &[u64]) {
        for (k, &t) in tokens.iter().enumerate() {
            self.cands[first + k].push(t);
        }
    }
    /// A completed flush: only the newest value of each sector remains legal.
    fn flushed(&mut self) {
        for c in &mut self.cands {
            let last = *c.last().expect("a sector always has a value");
            c.clear();
            c.push(last);
        }
    }
}

/// One snapshot a writer asked for: its name, socket, what it may hold, and whether its
/// create was acknowledged (else it may or may not exist after the cut).
#[derive(Clone, Debug)]
struct SnapRecord {
    name: String,
    socket: PathBuf,
    legal: Legal,
    acknowledged: bool,
}

/// Everything one cut needs to know afterwards.
struct Outcome {
    devices: Vec<(String, PathBuf, Legal, bool)>,
}

fn run_cli(args: &[&str]) -> bool {
    Command::new(BIN)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A writer: random token writes, zeroes, discards, flushes and snapshots on one device until
/// the cut (or `ops` operations, after which it cuts the power itself).
#[allow(clippy::too_many_arguments)]
fn writer(
    seed: u64,
    writer_id: u64,
    client: &mut Client,
    device: &str,
    dir: &Path,
    control: &Path,
    ctl: &CrashController,
    legal: &mut Legal,
    snaps: &Mutex<Vec<SnapRecord>>,
    ops: u64,
) {
    let mut rng = fastrand::Rng::with_seed(seed ^ writer_id);
    let mut seq = 0u64;
    let mut nsnap = 0;
    for _ in 0..ops {
        if ctl.crashed() {
            return;
        }
        let first = rng.usize(0..ORIGIN_SECTORS);
        let n = rng.usize(1..=16.min(ORIGIN_SECTORS - first));
        let ok = match rng.u8(0..100) {
            0..=64 => {
                let tokens: Vec<u64> = (0..n)
                    .map(|_| {
                        seq += 1;
                        writer_token(writer_id, seq)
                    })
                    .collect();
                legal.write(first, &tokens);
                let data: Vec<u8> = tokens.iter().flat_map(|&t| token_sector(t)).collect();
                client.write(0, (first * SECTOR) as u64, &data) == 0
            }
            65..=72 => {
                legal.write(first, &vec![0; n]);
                let (off, len) = ((first * SECTOR) as u64, (n * SECTOR) as u64);
                if rng.bool() {
                    client.discard(0, off, len) == 0
                } else {
                    client.write_zeroes(0, off, len, rng.bool()) == 0
                }
            }
            73..=92 => {
                let ok = client.flush(0) == 0;
                if ok {
                    legal.flushed();
                }
                ok
            }
            _ => {
                // A snapshot, half the time right after a flush (then it must be exact).
                if rng.bool() {
                    if client.flush(0) != 0 {
                        return;
                    }
                    legal.flushed();
                }
                nsnap += 1;
                let name = format!("{device}-s{nsnap}");
                let socket = dir.join(format!("{name}.sock"));
                let mut rec = SnapRecord {
                    name: name.clone(),
                    socket: socket.clone(),
                    legal: legal.clone(),
                    acknowledged: false,
                };
                let at = {
                    let mut list = snaps.lock().unwrap();
                    list.push(rec.clone());
                    list.len() - 1
                };
                let ok = run_cli(&[
                    "snapshot",
                    "create",
                    &name,
                    "--of",
                    device,
                    "--socket",
                    socket.to_str().unwrap(),
                    "--control",
                    control.to_str().unwrap(),
                ]);
                if ok {
                    rec.acknowledged = true;
                    snaps.lock().unwrap()[at] = rec;
                }
                ok
            }
        };
        if !ok {
            assert!(
                ctl.crashed(),
                "seed {seed}: a request failed without a power cut"
            );
            return;
        }
    }
    ctl.crash_now();
}

/// Runs one cut; returns the number of violations (0) or panics with the first ones.
fn one_cut(seed: u64, events_max: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let tmp = tempfile::tempdir().expect("temp dir");
    let mnt = tmp.path().join("disk");
    std::fs::create_dir(&mnt).unwrap();
    let ctl = CrashController::new(seed, 0);
    let init: Vec<u8> = (0..ORIGIN_SECTORS as u64)
        .flat_map(|s| token_sector(writer_token(INITIAL, s)))
        .collect();
    let disk = PowerCutDisk::new(ctl.clone(), vec![("origin.img".into(), init)]);
    let session = disk
        .clone()
        .mount(&mnt)
        .unwrap_or_else(|e| panic!("mount FUSE at {mnt:?}: {e}"));
    let origin = mnt.join("origin.img");
    let cache = mnt.join("cache.obj");
    let socket = tmp.path().join("o.sock");
    let control = tmp.path().join("o.control.sock");
    let args: Vec<String> = [
        "--origin",
        origin.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
        "--chunk-size",
        "4K",
        "--num-queues",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    // Without --direct the daemon writes each copy in its copy-out; every other cut stages
    // copies for their commit instead, as it does under --direct.
    let staging = if seed % 2 == 1 { "1" } else { "0" };
    let env = [(snapblk::cow::STAGE_ENV, staging)];
    let mut daemon = Daemon::start_with(None, &env, &argv, &socket);
    let w_socket = tmp.path().join("w.sock");
    assert!(run_cli(&[
        "snapshot",
        "create",
        "w",
        "--writable",
        "--socket",
        w_socket.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
    ]));
    let mut oc = Client::connect(&socket, 1);
    let mut wc = Client::connect(&w_socket, 1);
    let snaps = Mutex::new(Vec::new());
    let mut o_legal = Legal::new(|s| writer_token(INITIAL, s as u64));
    let mut w_legal = o_legal.clone();
    let armed_at = ctl.events();
    ctl.arm(rng.u64(1..=events_max));
    std::thread::scope(|sc| {
        let (ctl, snaps, tmpd) = (&ctl, &snaps, tmp.path());
        let (control, o_legal, w_legal, oc, wc) =
            (&control, &mut o_legal, &mut w_legal, &mut oc, &mut wc);
        sc.spawn(move || {
            writer(
                seed,
                ORIGIN_WRITER,
                oc,
                "origin",
                tmpd,
                control,
                ctl,
                o_legal,
                snaps,
                400,
            )
        });
        sc.spawn(move || {
            writer(
                seed,
                SNAP_WRITER,
                wc,
                "w",
                tmpd,
                control,
                ctl,
                w_legal,
                snaps,
                400,
            )
        });
    });
    // The cut happened; nothing after it reached the daemon. Kill it, unmount, and lay the
    // frozen images down as plain files at the same paths.
    let (_, stderr) = daemon.signal_and_wait(libc::SIGKILL);
    let log = daemon.log_text() + &stderr;
    assert!(
        !log.contains("panicked"),
        "power cut seed {seed}: the daemon panicked around the cut:\n{log}"
    );
    drop((oc, wc));
    let images = disk.crash_images().expect("the power was cut");
    drop(session);
    for (name, img) in images {
        std::fs::write(mnt.join(name), img).unwrap();
    }
    let ctx = format!("power cut seed {seed} (copies staged: {staging})");
    let check = Command::new(BIN)
        .args(["check", cache.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{ctx}: snapblk check after the cut:\n{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let daemon = Daemon::start(&argv, &socket);
    let mut devices = vec![
        ("origin".to_string(), socket.clone(), o_legal, true),
        ("w".to_string(), w_socket.clone(), w_legal, true),
    ];
    for s in snaps.into_inner().unwrap() {
        devices.push((s.name, s.socket, s.legal, s.acknowledged));
    }
    let outcome = Outcome { devices };
    STATS
        .lock()
        .unwrap()
        .push((ctl.events() - armed_at, outcome.devices.len() as u64));
    let violations = verify(&ctx, &outcome, &control);
    let log = if violations.is_empty() {
        String::new()
    } else {
        format!(
            "\n--- log of the daemon before the cut ---\n{}\n--- after the restart ---\n{}",
            log,
            daemon.log_text()
        )
    };
    drop(daemon);
    assert!(
        violations.is_empty(),
        "{ctx}: {} violations:\n{}{log}",
        violations.len(),
        violations.join("\n")
    );
}

/// Reads every device after the restart and lists what breaks the rules.
fn verify(ctx: &str, o: &Outcome, control: &Path) -> Vec<String> {
    let listed = Command::new(BIN)
        .args([
            "snapshot",
            "list",
            "--json",
            "--control",
            control.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&listed.stdout)
        .unwrap_or_else(|e| panic!("{ctx}: snapshot list: {e}"));
    let present: BTreeMap<String, Option<String>> = list["devices"]
        .as_array()
        .expect("a device list")
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap_or_default().to_string(),
                d["socket"].as_str().map(str::to_string),
            )
        })
        .collect();
    let mut bad = Vec::new();
    for name in present.keys() {
        if !o.devices.iter().any(|(n, ..)| n == name) {
            bad.push(format!("device {name} appeared from nowhere"));
        }
    }
    for (name, socket, legal, acknowledged) in &o.devices {
        let Some(served_on) = present.get(name) else {
            if *acknowledged {
                bad.push(format!("snapshot {name} was acknowledged but is gone"));
            }
            continue;
        };
        if served_on.is_none() {
            // Cut between its creation and the record of its socket: serve it now.
            assert!(run_cli(&[
                "snapshot",
                "serve",
                name,
                "--socket",
                socket.to_str().unwrap(),
                "--control",
                control.to_str().unwrap()
            ]));
        }
        let read_only = !(name == "origin" || name == "w");
        let mut c = Client::try_connect(socket, 1, read_only)
            .unwrap_or_else(|e| panic!("{ctx}: connect to {name}: {e:?}"));
        let data = match c.read(0, 0, ORIGIN_SECTORS * SECTOR) {
            Ok(data) => data,
            Err(e) => {
                let entry = list["devices"]
                    .as_array()
                    .and_then(|a| a.iter().find(|d| d["name"] == name.as_str()));
                bad.push(format!(
                    "{name}: read failed after the restart ({e}); listed as {entry:?} \
                     (acknowledged: {acknowledged})"
                ));
                continue;
            }
        };
        for (s, sector) in data.chunks(SECTOR).enumerate() {
            let t = sector_token(sector);
            if !t.is_some_and(|t| legal.cands[s].contains(&t)) {
                let kind = match t.map(|t| t >> 56) {
                    None => "a torn or foreign sector",
                    Some(w)
                        if w != (legal.cands[s][0] >> 56)
                            && legal.cands[s].iter().all(|c| c >> 56 != w) =>
                    {
                        "another device's data"
                    }
                    Some(_) => "a lost flushed write or a stale value",
                };
                bad.push(format!(
                    "{name} sector {s}: {kind}: holds {t:?}, legal {:?}",
                    legal.cands[s]
                ));
                if bad.len() > 20 {
                    return bad;
                }
            }
        }
    }
    bad
}

/// Per cut: I/O events from arming to the cut, and devices checked.
static STATS: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

#[test]
fn power_cuts_under_the_real_daemon_lose_nothing_flushed() {
    let cuts: u64 = std::env::var("SNAPBLK_POWER_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let seeds: Vec<u64> = match std::env::var("SNAPBLK_POWER_CUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => vec![s],
        None => (0..cuts).map(|i| 0x9e37_79b9 ^ (i * 7919)).collect(),
    };
    let next = AtomicU64::new(0);
    let seeds = Arc::new(seeds);
    let started = std::time::Instant::now();
    std::thread::scope(|sc| {
        for _ in 0..3 {
            let (next, seeds) = (&next, seeds.clone());
            sc.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst) as usize;
                let Some(&seed) = seeds.get(i) else { return };
                one_cut(seed, 3000);
            });
        }
    });
    let stats = STATS.lock().unwrap();
    let events: Vec<u64> = stats.iter().map(|s| s.0).collect();
    let devices: u64 = stats.iter().map(|s| s.1).sum();
    eprintln!(
        "power cuts: {} in {:?}, 0 violations; I/O events before the cut: min {:?} max {:?} \
         mean {}; {devices} devices checked",
        seeds.len(),
        started.elapsed(),
        events.iter().min(),
        events.iter().max(),
        events.iter().sum::<u64>() / events.len().max(1) as u64,
    );
}
