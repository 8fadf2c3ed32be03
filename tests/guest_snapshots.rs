//! Real guests on snapshots: QEMU (TCG) guests whose vhost-user-blk disks are the origin and
//! writable snapshots served by one `snapblk serve`, administered with the real CLI while the
//! guests run; the results are checked inside the guests (qemu/guest-init.sh tests `overlay`
//! and `stream`) and on the host (image file, libblkio reads of every device, stats).
//!
//! Needs what tests/guest.rs needs (qemu/install-host-deps.sh); `SNAPBLK_SKIP_GUEST=1` skips.

mod support;

use serde_json::Value;
use snapblk::testkit::blkio_client::Client;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::guest::{
    fill_pattern, first_difference, pattern_sector, run_guest, start_guest_test, tail,
    BackgroundGuest, GuestOpts, GuestRun, Pattern, Serve, MIB, NUM_QUEUES, SECTOR,
};

/// Image size of every test here: small, because TCG guests on 2 cores are slow.
const IMG_MIB: u64 = 16;

/// A temp dir with an origin image, the daemon's sockets and logs.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new(content: &[u8]) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("golden.img"), content).expect("write image");
        Env { dir }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn img(&self) -> PathBuf {
        self.p("golden.img")
    }

    fn origin_sock(&self) -> PathBuf {
        self.p("origin.sock")
    }

    fn ctl(&self) -> PathBuf {
        self.p("ctl.sock")
    }

    fn serve(&self) -> Serve {
        let img = self.img();
        let args = support::serve_args(
            support::path_str(&img),
            &self.origin_sock(),
            &self.ctl(),
            NUM_QUEUES,
            &[],
        );
        Serve::start(&args, &self.p("snapblk.log"))
    }

    fn ok(&self, args: &[&str]) -> String {
        support::cli_ok(&self.ctl(), args)
    }

    fn list(&self) -> Vec<Value> {
        let v: Value = serde_json::from_str(&self.ok(&["snapshot", "list", "--json"]))
            .expect("snapshot list --json");
        v["devices"].as_array().expect("devices").clone()
    }

    fn device(&self, name: &str) -> Value {
        self.list()
            .into_iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("no device {name} in the list"))
    }

    fn blocks_used(&self) -> u64 {
        let v: Value = serde_json::from_str(&self.ok(&["stats", "--json"])).expect("stats");
        v["cache"]["blocks_used"]
            .as_u64()
            .unwrap_or_else(|| panic!("no cache.blocks_used in {v}"))
    }

    /// Waits until the daemon no longer counts a VM connected to `name` (QEMU has exited).
    fn wait_disconnected(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.device(name)["connected"] == true {
            assert!(
                Instant::now() < deadline,
                "{name} still connected 15 s after its VM exited"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Reads a whole device over libblkio (a separate vhost-user frontend).
    fn read_device(&self, sock: &Path, read_only: bool) -> Vec<u8> {
        let mut c = Client::try_connect(sock, 1, read_only)
            .unwrap_or_else(|e| panic!("libblkio connect to {}: {e:?}", sock.display()));
        let len = c.capacity();
        assert_eq!(len, IMG_MIB * MIB, "capacity of {}", sock.display());
        c.read(0, 0, len as usize)
            .unwrap_or_else(|e| panic!("read {}: errno {e}", sock.display()))
    }

    fn check_cache(&self) {
        let cache = self.p("golden.img.cache");
        let out = Command::new(env!("CARGO_BIN_EXE_snapblk"))
            .arg("check")
            .arg(&cache)
            .output()
            .expect("snapblk check");
        assert!(
            out.status.success(),
            "snapblk check {}: {}{}",
            cache.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn assert_pass(run: &GuestRun, test: &str, daemon: &Serve) {
    assert!(
        run.passed(test),
        "guest test {test} did not pass:\n{}\n--- snapblk log ---\n{}",
        run.output,
        daemon.log_text()
    );
}

fn args(kv: &[(&str, String)]) -> Vec<String> {
    kv.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

// ------------------------------------------------------------------ snapshot per VM

const GOLDEN: Pattern = Pattern {
    seed: 4242,
    span_mib: IMG_MIB,
    full_every: 8,
    full_offset: 3,
};

/// VM `i`'s own pattern: the first 4 KiB of every MiB, MiBs `i` and `i + 8` in full, the
/// last 4 KiB (see `test_overlay` in qemu/guest-init.sh).
fn vm_pattern(i: u64) -> Pattern {
    Pattern {
        seed: 1000 * (i as u32 + 1) + 7,
        span_mib: IMG_MIB,
        full_every: 8,
        full_offset: i,
    }
}

/// One golden image, three writable snapshots with their own sockets, three guests booted at
/// once, each writing its own data and checking the golden data under it; then the golden
/// file is unchanged, each snapshot holds exactly golden + its own data, and deleting the
/// snapshots frees their blocks.
#[test]
fn three_vms_on_snapshots_of_one_golden_image() {
    let Some(_one) = start_guest_test("three_vms_on_snapshots_of_one_golden_image") else {
        return;
    };
    let mut golden = vec![0u8; (IMG_MIB * MIB) as usize];
    GOLDEN.write_into(&mut golden);
    let env = Env::new(&golden);
    let daemon = env.serve();
    let baseline = env.blocks_used();

    let names = ["vm0", "vm1", "vm2"];
    let socks: Vec<PathBuf> = names.iter().map(|n| env.p(&format!("{n}.sock"))).collect();
    for (n, s) in names.iter().zip(&socks) {
        let out = env.ok(&[
            "snapshot",
            "create",
            n,
            "--writable",
            "--socket",
            s.to_str().unwrap(),
        ]);
        assert!(out.contains(n), "create {n}: {out}");
        assert!(s.exists(), "{n} is served on {}", s.display());
    }
    assert_eq!(env.list().len(), 4, "origin + 3 snapshots");

    // Three guests at once, each on its own snapshot.
    let started = Instant::now();
    let runs: Vec<GuestRun> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3u64)
            .map(|i| {
                let sock = socks[i as usize].clone();
                let log = env.p(&format!("guest-vm{i}.log"));
                scope.spawn(move || {
                    let p = vm_pattern(i);
                    let a = args(&[
                        ("disk", "vda".into()),
                        ("span_mib", IMG_MIB.to_string()),
                        ("base_seed", GOLDEN.seed.to_string()),
                        ("base_every", GOLDEN.full_every.to_string()),
                        ("base_offset", GOLDEN.full_offset.to_string()),
                        ("seed", p.seed.to_string()),
                        ("full_every", p.full_every.to_string()),
                        ("full_offset", p.full_offset.to_string()),
                    ]);
                    run_guest(&[&sock], &log, "overlay", &a)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!(
        "three guests at once took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for (i, run) in runs.iter().enumerate() {
        assert_pass(run, "overlay", &daemon);
        let p = vm_pattern(i as u64);
        assert_eq!(run.field("serial"), names[i], "serial defaults to the name");
        assert_eq!(run.field("ro"), "0");
        assert_eq!(run.field("size_sectors"), (IMG_MIB * MIB / 512).to_string());
        assert_eq!(run.field("seed"), p.seed.to_string());
        assert_eq!(
            run.field("own_sectors"),
            p.covered_sectors().to_string(),
            "sectors vm{i} wrote"
        );
        assert_eq!(
            run.field("golden_sectors"),
            GOLDEN.covered_sectors().to_string()
        );
        // Golden MiB 3 and 11 minus their first 4 KiB (which every VM overwrote).
        assert_eq!(run.field("rest_sectors"), (2 * (2048 - 8)).to_string());
    }

    // Host side: the golden image is untouched, each snapshot is golden + its own data.
    assert!(
        fs::read(env.img()).unwrap() == golden,
        "the golden image file changed"
    );
    for (i, n) in names.iter().enumerate() {
        env.wait_disconnected(n);
        let got = env.read_device(&socks[i], false);
        let mut want = golden.clone();
        vm_pattern(i as u64).write_into(&mut want);
        for j in 0..3u64 {
            if j as usize != i {
                let other = vm_pattern(j);
                let s = j * 2048 + 100;
                let at = s as usize * SECTOR;
                assert!(
                    got[at..at + SECTOR] != other.sector(s),
                    "snapshot {n} holds vm{j}'s data at sector {s}"
                );
            }
        }
        if let Some(d) = first_difference(&got, &want) {
            panic!("snapshot {n} is not golden + its own data: {d}");
        }
    }
    let used = env.blocks_used();
    assert!(
        used > baseline,
        "the snapshots' writes use cache blocks: {baseline} -> {used}"
    );

    // Deleting each snapshot frees its blocks; at the end only the origin is left.
    let mut before = used;
    for (i, n) in names.iter().enumerate() {
        env.wait_disconnected(n);
        env.ok(&["snapshot", "delete", n]);
        let after = env.blocks_used();
        assert!(
            after < before,
            "deleting {n} freed no blocks ({before} -> {after})"
        );
        assert!(!socks[i].exists(), "{n}'s socket is removed");
        before = after;
    }
    assert_eq!(
        before, baseline,
        "blocks_used back to where it was before the snapshots"
    );
    let list = env.list();
    assert_eq!(list.len(), 1, "only the origin is left: {list:?}");
    assert_eq!(list[0]["name"], "origin");

    let mut daemon = daemon;
    let st = daemon.signal_and_wait(libc::SIGTERM);
    assert!(st.success(), "snapblk exit after SIGTERM: {st}");
    assert!(
        fs::read(env.img()).unwrap() == golden,
        "the golden image file changed"
    );
    env.check_cache();
}

// ------------------------------------------------------------------ streams

/// The guest's `stream` test parameters (see `test_stream` in qemu/guest-init.sh).
#[derive(Clone, Copy, Debug)]
struct Stream {
    base: u32,
    records: u64,
    slots: u64,
    rec_kib: u64,
    snap_at: u64,
}

impl Stream {
    fn guest_args(&self) -> Vec<String> {
        args(&[
            ("disk", "vda".into()),
            ("base", self.base.to_string()),
            ("records", self.records.to_string()),
            ("slots", self.slots.to_string()),
            ("rec_kib", self.rec_kib.to_string()),
            ("snap_at", self.snap_at.to_string()),
            ("snap_wait", "120".into()),
        ])
    }

    fn rec_sectors(&self) -> u64 {
        self.rec_kib * 2
    }

    /// Applies generations `0..gens` to `img`, in order.
    fn apply(&self, img: &mut [u8], gens: u64) {
        for g in 0..gens {
            let slot = g % self.slots;
            fill_pattern(
                img,
                self.base + g as u32,
                slot * self.rec_sectors(),
                self.rec_sectors(),
            );
        }
    }
}

/// The `SNAPBLK-REC: gen=G slot=S` lines of a console log, as (gen, slot).
fn records_in(log: &str) -> Vec<(u64, u64)> {
    log.lines()
        .filter_map(|l| l.strip_prefix("SNAPBLK-REC: "))
        .map(|r| {
            let mut g = None;
            let mut s = None;
            for w in r.split_whitespace() {
                match w.split_once('=') {
                    Some(("gen", v)) => g = v.parse().ok(),
                    Some(("slot", v)) => s = v.parse().ok(),
                    _ => {}
                }
            }
            (g.expect("gen"), s.expect("slot"))
        })
        .collect()
}

/// Initial origin content: recognizable everywhere, so that untouched data is checked too.
fn initial_image() -> Vec<u8> {
    support::pattern((IMG_MIB * MIB) as usize, 3)
}

/// A guest streams numbered records to the origin; after 24 of them it stops and the host
/// takes a snapshot with the CLI, then it carries on (40 more, wrapping over every slot). The
/// snapshot holds exactly the data of that instant; the origin holds every later write.
#[test]
fn snapshot_of_a_live_disk_mid_stream() {
    let Some(_one) = start_guest_test("snapshot_of_a_live_disk_mid_stream") else {
        return;
    };
    let initial = initial_image();
    let env = Env::new(&initial);
    let mut daemon = env.serve();
    let st = Stream {
        base: 5000,
        records: 64,
        slots: 32,
        rec_kib: 64,
        snap_at: 24,
    };
    let origin = env.origin_sock();
    let mut guest = BackgroundGuest::start(
        &GuestOpts::default(),
        &[&origin],
        &env.p("guest.log"),
        "stream",
        &st.guest_args(),
    );
    let now = guest.wait_for_line("SNAPBLK-SNAP-NOW: ", Duration::from_secs(180));
    assert_eq!(now, format!("SNAPBLK-SNAP-NOW: gen={}", st.snap_at));
    let seen = records_in(&guest.log_text());
    assert_eq!(
        seen,
        (0..st.snap_at)
            .map(|g| (g, g % st.slots))
            .collect::<Vec<_>>(),
        "records flushed before the snapshot"
    );
    let mid = env.p("mid.sock");
    env.ok(&[
        "snapshot",
        "create",
        "mid",
        "--socket",
        mid.to_str().unwrap(),
    ]);
    // A writable snapshot of the same instant, for good measure (read-only snapshots and
    // writable ones share the copy-on-write path).
    env.ok(&["snapshot", "create", "midw", "--writable"]);
    guest.send_line("go");
    let run = guest.wait();
    assert_pass(&run, "stream", &daemon);
    assert_eq!(run.field("written"), st.records.to_string());
    assert_eq!(run.field("verified_slots"), st.slots.to_string());
    let log = fs::read_to_string(env.p("guest.log")).unwrap();
    assert!(
        log.contains("stream: host said 'go'; continuing"),
        "the guest waited for the host's go:\n{}",
        tail(&log, 40)
    );
    let seen = records_in(&log);
    assert_eq!(
        seen,
        (0..st.records)
            .map(|g| (g, g % st.slots))
            .collect::<Vec<_>>(),
        "every record announced once, in order"
    );

    // Each record was followed by a FLUSH that reached the daemon.
    let stats: Value = serde_json::from_str(&env.ok(&["stats", "--json"])).unwrap();
    let flushes = stats["devices"]["origin"]["flushes"].as_u64().unwrap_or(0);
    assert!(
        flushes >= st.records,
        "the origin saw {flushes} flushes for {} records: {stats}",
        st.records
    );

    // The snapshot: the initial image with exactly generations 0..snap_at.
    let mut at_snap = initial.clone();
    st.apply(&mut at_snap, st.snap_at);
    let snap = env.read_device(&mid, true);
    if let Some(d) = first_difference(&snap, &at_snap) {
        panic!(
            "snapshot 'mid' does not hold the data of the instant it was taken \
             (after gen {}): {d}",
            st.snap_at - 1
        );
    }
    // The origin: every later write too.
    env.wait_disconnected("origin");
    let mut all = initial.clone();
    st.apply(&mut all, st.records);
    let now = env.read_device(&origin, false);
    if let Some(d) = first_difference(&now, &all) {
        panic!("the origin lacks writes made after the snapshot: {d}");
    }
    // Served again, the writable twin shows the same instant.
    let midw = env.p("midw.sock");
    env.ok(&[
        "snapshot",
        "serve",
        "midw",
        "--socket",
        midw.to_str().unwrap(),
    ]);
    let twin = env.read_device(&midw, false);
    if let Some(d) = first_difference(&twin, &at_snap) {
        panic!("snapshot 'midw' does not hold the data of its instant: {d}");
    }

    let status = daemon.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "snapblk exit after SIGTERM: {status}");
    let file = fs::read(env.img()).unwrap();
    if let Some(d) = first_difference(&file, &all) {
        panic!("the image file lacks the guest's writes: {d}");
    }
    env.check_cache();
}

/// A guest streams flushed records to the origin; the host SIGKILLs the daemon mid-stream and
/// restarts it on the same socket; QEMU (reconnect-ms) reconnects, the guest finishes with no
/// I/O error, and every record it saw flushed (in fact every record) is in the image.
#[test]
fn guest_survives_daemon_sigkill_and_restart() {
    let Some(_one) = start_guest_test("guest_survives_daemon_sigkill_and_restart") else {
        return;
    };
    let initial = initial_image();
    let env = Env::new(&initial);
    let mut daemon = env.serve();
    let st = Stream {
        base: 7000,
        records: 48,
        slots: 48,
        rec_kib: 64,
        snap_at: 0,
    };
    let opts = GuestOpts {
        reconnect_ms: Some(500),
        ..GuestOpts::default()
    };
    let origin = env.origin_sock();
    let mut guest = BackgroundGuest::start(
        &opts,
        &[&origin],
        &env.p("guest.log"),
        "stream",
        &st.guest_args(),
    );
    // Three crashes and a clean stop. After record 8: the daemon is stopped (SIGSTOP) first
    // and killed only once the guest has been blocked on its next write for 2 s, so that a
    // request is surely in flight (QEMU must resubmit it after reconnecting); restarted at
    // once. After record 20: killed, restarted after 1.5 s (QEMU retries meanwhile). After
    // record 32: killed, restarted at once. After record 40: SIGTERM, which answers the
    // requests the daemon took before closing the connection, then a restart.
    let mut flushed_before_kill = Vec::new();
    for (after_gen, stop_first, down_ms, sig) in [
        (8u64, true, 0u64, libc::SIGKILL),
        (20, false, 1500, libc::SIGKILL),
        (32, false, 0, libc::SIGKILL),
        (40, false, 0, libc::SIGTERM),
    ] {
        guest.wait_for_line(
            &format!("SNAPBLK-REC: gen={after_gen} "),
            Duration::from_secs(180),
        );
        if stop_first {
            daemon.signal(libc::SIGSTOP);
            // A record completed just before the stop reaches the console log within 1 s.
            std::thread::sleep(Duration::from_secs(1));
            let n = records_in(&guest.log_text()).len();
            std::thread::sleep(Duration::from_secs(2));
            let m = records_in(&guest.log_text()).len();
            // Every record needs the daemon (O_DIRECT write, FLUSH): the guest is blocked
            // with its next request in flight.
            assert_eq!(
                m, n,
                "the guest completed records while the daemon was stopped"
            );
        }
        let status = daemon.signal_and_wait(sig);
        let flushed = records_in(&guest.log_text()).len() as u64;
        if sig == libc::SIGKILL {
            assert!(status.signal() == Some(libc::SIGKILL), "{status}");
        } else {
            assert!(
                status.success(),
                "SIGTERM must stop cleanly: {status}\n{}",
                daemon.log_text()
            );
        }
        eprintln!(
            "snapblk {}{} after {flushed} flushed records; down for {down_ms} ms",
            if sig == libc::SIGKILL {
                "SIGKILLed"
            } else {
                "stopped by SIGTERM"
            },
            if stop_first {
                " (stopped for 2 s first)"
            } else {
                ""
            }
        );
        flushed_before_kill.push(flushed);
        std::thread::sleep(Duration::from_millis(down_ms));
        daemon = daemon.restart();
    }
    let run = guest.wait();
    let log = fs::read_to_string(env.p("guest.log")).unwrap_or_default();
    assert!(
        run.passed("stream"),
        "guest did not survive the daemon restart:\n{}\n--- console tail ---\n{}\n--- snapblk log ---\n{}",
        run.output,
        tail(&log.replace('\r', ""), 60),
        daemon.log_text()
    );
    assert_eq!(run.field("written"), st.records.to_string());
    // What QEMU and the guest said about the crashes (for the test's output).
    let notes: Vec<&str> = log
        .lines()
        .filter(|l| !l.starts_with("SNAPBLK-REC: ") && !l.starts_with("SNAPBLK-INFO: "))
        .collect();
    eprintln!(
        "--- console (records left out) ---\n{}\n--- snapblk log ---\n{}",
        notes.join("\n").replace('\r', ""),
        daemon.log_text()
    );
    let seen = records_in(&log);
    assert_eq!(
        seen,
        (0..st.records).map(|g| (g, g)).collect::<Vec<_>>(),
        "every record announced once, in order"
    );
    assert!(
        flushed_before_kill.iter().all(|&f| f < st.records),
        "the kills happened mid-stream: {flushed_before_kill:?}"
    );
    // QEMU reconnected after every restart (and nothing else connected).
    let daemon_log = fs::read_to_string(&daemon.log).unwrap_or_default();
    assert_eq!(
        daemon_log.matches("origin: frontend connected").count(),
        5,
        "QEMU connects once and reconnects after each of the 4 restarts:\n{daemon_log}"
    );

    let status = daemon.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "snapblk exit after SIGTERM: {status}");
    let file = fs::read(env.img()).unwrap();
    let rs = st.rec_sectors() as usize * SECTOR;
    for g in 0..st.records {
        let at = g as usize * rs;
        let want = pattern_sector(st.base + g as u32, g * st.rec_sectors());
        assert!(
            file[at..at + SECTOR] == want,
            "record gen={g} (flushed before the kills after {flushed_before_kill:?} records) \
             is not in the image: {:?}",
            support::guest::preview(&file[at..])
        );
    }
    let mut all = initial.clone();
    st.apply(&mut all, st.records);
    if let Some(d) = first_difference(&file, &all) {
        panic!("image after the crash and restart: {d}");
    }
    env.check_cache();
}

// ------------------------------------------------------------------ user recipe

/// Runs qemu/boot-snapshot-vms.sh with `extra` options, N VMs running the `info` guest test;
/// returns its stdout + stderr after asserting it succeeded with N PASSes.
fn boot_snapshot_vms(env: &Env, n: usize, extra: &[&str]) -> String {
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(support::guest::repo().join("qemu/boot-snapshot-vms.sh"))
        .args(["--snapblk", env!("CARGO_BIN_EXE_snapblk")])
        .args(["--dir", env.p("recipe").to_str().unwrap()])
        .args(extra)
        .arg(n.to_string())
        .arg(env.img())
        .args(["--", "--no-prepare", "--", "info"])
        .output()
        .expect("run qemu/boot-snapshot-vms.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "boot-snapshot-vms.sh {n} took {:.1} s:\n{text}",
        started.elapsed().as_secs_f64()
    );
    assert!(out.status.success(), "boot-snapshot-vms.sh failed:\n{text}");
    let passes = text
        .lines()
        .filter(|l| l.starts_with("SNAPBLK-RESULT: PASS info disks=vda"))
        .count();
    assert_eq!(passes, n, "{n} VMs booted and passed:\n{text}");
    assert_eq!(
        text.matches("deleted snapshot").count(),
        n,
        "every snapshot deleted:\n{text}"
    );
    text
}

/// qemu/boot-snapshot-vms.sh boots N VMs on N fresh writable snapshots of an image and
/// deletes the snapshots afterwards: once starting its own daemon, once using a running one.
#[test]
fn boot_snapshot_vms_recipe() {
    let Some(_one) = start_guest_test("boot_snapshot_vms_recipe") else {
        return;
    };
    let mut golden = vec![0u8; (IMG_MIB * MIB) as usize];
    GOLDEN.write_into(&mut golden);
    let env = Env::new(&golden);

    // No daemon running: the script starts one on the image and stops it at the end.
    let text = boot_snapshot_vms(&env, 2, &["--control", env.ctl().to_str().unwrap()]);
    assert!(text.contains("starting snapblk"), "{text}");
    assert!(text.contains("stopped snapblk"), "{text}");
    assert!(!env.ctl().exists(), "the script's daemon is gone");

    // Devices persist across restarts: a daemon on the same image shows that the snapshots
    // were deleted. With it running, the script uses it and leaves it running.
    let daemon = env.serve();
    assert_eq!(env.list().len(), 1, "only the origin is left");
    let baseline = env.blocks_used();
    let text = boot_snapshot_vms(&env, 1, &["--control", env.ctl().to_str().unwrap()]);
    assert!(text.contains("using the snapblk daemon"), "{text}");
    let list = env.list();
    assert_eq!(list.len(), 1, "only the origin is left: {list:?}");
    assert_eq!(env.blocks_used(), baseline);
    let mut daemon = daemon;
    let st = daemon.signal_and_wait(libc::SIGTERM);
    assert!(st.success(), "snapblk exit after SIGTERM: {st}");
    assert!(
        fs::read(env.img()).unwrap() == golden,
        "the image file changed"
    );
}
