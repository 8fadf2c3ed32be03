//! Snapshot devices served next to the origin, administered with the real CLI over the control
//! socket, read and written by libblkio clients, across restarts and crashes.

mod support;

use serde_json::Value;
use snapblk::testkit::blkio_client::Client;
use snapblk::testkit::tmpfs::Tmpfs;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::{cli_ok, make_image, path_str, pattern, serve_args, Daemon, BIN};

const MIB: usize = 1 << 20;

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(image_mib: usize) -> (Setup, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let data = make_image(&dir.path().join("golden.img"), image_mib * MIB, 9);
        (Setup { dir }, data)
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn serve(&self, extra: &[&str]) -> Daemon {
        let (img, sock) = (self.p("golden.img"), self.p("origin.sock"));
        let args = serve_args(path_str(&img), &sock, &self.p("ctl.sock"), 1, extra);
        Daemon::start(&args, &sock)
    }

    /// Runs the CLI against this daemon; returns (success, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        support::cli(&self.p("ctl.sock"), args)
    }

    /// Runs the CLI against this daemon with standard output going to `stdout`.
    fn run(&self, args: &[&str], stdout: std::process::Stdio) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .arg("--control")
            .arg(self.p("ctl.sock"))
            .stdout(stdout)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        cli_ok(&self.p("ctl.sock"), args)
    }

    fn list(&self) -> Vec<Value> {
        let out = self.ok(&["snapshot", "list", "--json"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v["devices"].as_array().unwrap().clone()
    }

    fn device(&self, name: &str) -> Value {
        self.list()
            .into_iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("no device {name}"))
    }

    fn stats(&self) -> Value {
        serde_json::from_str(&self.ok(&["stats", "--json"])).unwrap()
    }
}

fn sock(s: &Setup, name: &str) -> String {
    s.p(name).to_str().unwrap().to_string()
}

#[test]
fn snapshots_keep_their_point_in_time_view_while_the_origin_changes() {
    let (s, golden) = Setup::new(16);
    let d = s.serve(&[]);
    let mut origin = Client::connect(&d.socket, 1);

    // A read-only snapshot served at once, then the origin is overwritten.
    s.ok(&[
        "snapshot",
        "create",
        "before",
        "--socket",
        &sock(&s, "before.sock"),
    ]);
    let new = pattern(2 * MIB, 77);
    assert_eq!(origin.write(0, MIB as u64, &new), 0);
    assert_eq!(origin.flush(0), 0);

    // A read-only snapshot refuses a read-write client (VIRTIO_BLK_F_RO).
    assert!(Client::try_connect(&s.p("before.sock"), 1, false).is_err());
    let mut before = Client::try_connect(&s.p("before.sock"), 1, true).unwrap();
    assert_eq!(
        before.read(0, MIB as u64, 2 * MIB).unwrap(),
        golden[MIB..3 * MIB],
        "snapshot keeps old data"
    );
    assert_eq!(
        origin.read(0, MIB as u64, 2 * MIB).unwrap(),
        new,
        "origin has new data"
    );

    // A writable snapshot of the snapshot: its writes touch nobody else.
    s.ok(&[
        "snapshot",
        "create",
        "scratch",
        "--of",
        "before",
        "--writable",
        "--socket",
        &sock(&s, "scratch.sock"),
    ]);
    let mut scratch = Client::connect(&s.p("scratch.sock"), 1);
    assert_eq!(
        scratch.read(0, MIB as u64, 4096).unwrap(),
        golden[MIB..MIB + 4096]
    );
    let mine = pattern(4096, 55);
    assert_eq!(scratch.write(0, 0, &mine), 0);
    assert_eq!(scratch.read(0, 0, 4096).unwrap(), mine);
    assert_eq!(before.read(0, 0, 4096).unwrap(), golden[..4096]);
    assert_eq!(origin.read(0, 0, 4096).unwrap(), golden[..4096]);

    // The list shows the tree, modes and who is connected.
    let list = s.list();
    assert_eq!(list.len(), 3);
    let scratch_v = s.device("scratch");
    assert_eq!(scratch_v["parent"], "before");
    assert_eq!(scratch_v["writable"], true);
    assert_eq!(scratch_v["connected"], true);
    assert_eq!(s.device("before")["writable"], false);
    let human = s.ok(&["snapshot", "list"]);
    assert!(
        human.contains("scratch") && human.contains("connected"),
        "{human}"
    );

    // One copy per origin chunk written (2 MiB / 64 KiB chunks), whatever the snapshot count.
    let copies = s.stats()["cache"]["copies"].as_u64().unwrap();
    assert_eq!(
        copies, 32,
        "copies after writing 2 MiB of the origin under one snapshot"
    );
    // Those copies are what the snapshots taken before the writes keep of the origin.
    assert_eq!(
        s.device("before")["preserved_bytes"].as_u64().unwrap(),
        2 * MIB as u64
    );
    assert_eq!(
        s.device("scratch")["preserved_bytes"].as_u64().unwrap(),
        2 * MIB as u64,
        "a snapshot of a snapshot shares its parent's point in time"
    );
    assert_eq!(s.device("origin")["preserved_bytes"].as_u64().unwrap(), 0);
    // The image file holds the origin's new data.
    assert_eq!(fs::read(s.p("golden.img")).unwrap()[MIB..3 * MIB], new[..]);
}

#[test]
fn delete_is_refused_while_connected_and_frees_space() {
    let (s, _golden) = Setup::new(8);
    let d = s.serve(&[]);
    let mut origin = Client::connect(&d.socket, 1);
    s.ok(&[
        "snapshot",
        "create",
        "vm1",
        "--writable",
        "--socket",
        &sock(&s, "vm1.sock"),
    ]);
    let mut vm1 = Client::connect(&s.p("vm1.sock"), 1);
    assert_eq!(vm1.write(0, 0, &pattern(MIB, 1)), 0);
    assert_eq!(vm1.flush(0), 0);
    assert!(s.device("vm1")["owned_bytes"].as_u64().unwrap() >= MIB as u64);

    let (ok, _, err) = s.cli(&["snapshot", "delete", "vm1"]);
    assert!(!ok && err.contains("connected"), "{err}");
    let (ok, _, err) = s.cli(&["snapshot", "delete", "origin"]);
    assert!(!ok && err.contains("origin"), "{err}");
    let (ok, _, err) = s.cli(&["snapshot", "delete", "nosuch"]);
    assert!(!ok && err.contains("no device"), "{err}");

    let used = s.stats()["cache"]["blocks_used"].as_u64().unwrap();
    s.ok(&["snapshot", "delete", "vm1", "--force"]);
    assert!(!s.p("vm1.sock").exists(), "its socket is gone");
    assert_eq!(s.list().len(), 1);
    let after = s.stats()["cache"]["blocks_used"].as_u64().unwrap();
    assert!(after + 16 <= used, "blocks freed: {used} -> {after}");
    // The origin carries on.
    assert_eq!(origin.write(0, 0, &[1u8; 4096]), 0);
    drop(vm1);
}

#[test]
fn devices_come_back_after_restart_and_crash() {
    let (s, golden) = Setup::new(8);
    let mut d = s.serve(&[]);
    let mut origin = Client::connect(&d.socket, 1);
    s.ok(&[
        "snapshot",
        "create",
        "keep",
        "--socket",
        &sock(&s, "keep.sock"),
        "--serial",
        "KEEP-1",
    ]);
    let first = pattern(MIB, 11);
    assert_eq!(origin.write(0, 0, &first), 0);
    assert_eq!(origin.flush(0), 0);
    drop(origin);
    let (status, err) = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{err}");

    // Clean restart: the snapshot is served again on its socket, with its serial.
    let mut d = s.serve(&[]);
    let keep = s.device("keep");
    assert_eq!(keep["socket"], sock(&s, "keep.sock"));
    assert_eq!(keep["serial"], "KEEP-1");
    let mut c = Client::try_connect(&s.p("keep.sock"), 1, true).unwrap();
    assert_eq!(c.read(0, 0, MIB).unwrap(), golden[..MIB]);
    drop(c);

    // Crash: flushed writes survive SIGKILL, and the snapshot keeps its view.
    let mut origin = Client::connect(&d.socket, 1);
    let second = pattern(MIB, 12);
    assert_eq!(origin.write(0, 2 * MIB as u64, &second), 0);
    assert_eq!(origin.flush(0), 0);
    drop(origin);
    d.signal_and_wait(libc::SIGKILL);
    let d = s.serve(&[]);
    let mut origin = Client::connect(&d.socket, 1);
    assert_eq!(origin.read(0, 0, MIB).unwrap(), first);
    assert_eq!(origin.read(0, 2 * MIB as u64, MIB).unwrap(), second);
    let mut c = Client::try_connect(&s.p("keep.sock"), 1, true).unwrap();
    assert_eq!(c.read(0, 0, 3 * MIB).unwrap(), golden[..3 * MIB]);

    // The cache object checks clean offline after all that.
    drop((c, origin, d));
    let out = Command::new(BIN)
        .args(["check"])
        .arg(s.p("golden.img.cache"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn restore_rolls_the_origin_back() {
    let (s, golden) = Setup::new(8);
    let d = s.serve(&[]);
    s.ok(&["snapshot", "create", "clean"]);
    let mut origin = Client::connect(&d.socket, 1);
    assert_eq!(origin.write(0, 0, &pattern(3 * MIB, 3)), 0);
    let (ok, _, err) = s.cli(&["snapshot", "restore", "clean"]);
    assert!(!ok && err.contains("connected"), "{err}");
    drop(origin);
    std::thread::sleep(std::time::Duration::from_millis(200));
    s.ok(&["snapshot", "restore", "clean"]);
    let mut origin = Client::connect(&d.socket, 1);
    assert_eq!(origin.read(0, 0, 4 * MIB).unwrap(), golden[..4 * MIB]);
    assert_eq!(
        fs::read(s.p("golden.img")).unwrap(),
        golden,
        "image file restored"
    );
}

#[test]
fn a_full_cache_makes_the_snapshot_inoperative_not_the_origin() {
    let (s, _golden) = Setup::new(16);
    // Room for the metadata and only a few 64 KiB blocks.
    let d = s.serve(&["--cache-size", "5M"]);
    s.ok(&[
        "snapshot",
        "create",
        "old",
        "--socket",
        &sock(&s, "old.sock"),
    ]);
    let mut origin = Client::connect(&d.socket, 1);
    let new = pattern(8 * MIB, 5);
    assert_eq!(
        origin.write(0, 0, &new[..4 * MIB]),
        0,
        "the origin never fails for lack of space"
    );
    assert_eq!(origin.write(0, 4 * MIB as u64, &new[4 * MIB..]), 0);
    assert_eq!(origin.flush(0), 0);
    assert_eq!(origin.read(0, 0, 8 * MIB).unwrap(), new);
    let old = s.device("old");
    assert_eq!(old["state"], "inoperative");
    let mut c = Client::try_connect(&s.p("old.sock"), 1, true).unwrap();
    assert!(
        c.read(0, 0, 4096).is_err(),
        "an inoperative snapshot fails its reads"
    );
    assert!(s.stats()["cache"]["inoperative_devices"].as_u64().unwrap() >= 1);
}

#[test]
fn bad_requests_get_clear_errors() {
    let (s, _golden) = Setup::new(4);
    let _d = s.serve(&[]);
    let (ok, _, err) = s.cli(&["snapshot", "create", "x", "--of", "nope"]);
    assert!(!ok && err.contains("no device"), "{err}");
    s.ok(&["snapshot", "create", "x"]);
    let (ok, _, err) = s.cli(&["snapshot", "create", "x"]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = s.cli(&["snapshot", "create", "a/b"]);
    assert!(!ok && err.contains("not a valid"), "{err}");
    // A socket path that is taken leaves no half-made snapshot behind.
    let (ok, _, err) = s.cli(&[
        "snapshot",
        "create",
        "y",
        "--socket",
        &sock(&s, "origin.sock"),
    ]);
    assert!(!ok && err.contains("in use"), "{err}");
    assert!(s.list().iter().all(|d| d["name"] != "y"));
    // No daemon: a clear message.
    let out = Command::new(BIN)
        .args(["snapshot", "list", "--control"])
        .arg(Path::new("/nonexistent/ctl.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the daemon"));
}

#[test]
fn buffers_that_split_sectors_are_served_on_every_device() {
    let (s, golden) = Setup::new(4);
    let d = s.serve(&[]);
    s.ok(&[
        "snapshot",
        "create",
        "w",
        "--writable",
        "--socket",
        &sock(&s, "w.sock"),
    ]);
    for socket in [d.socket.clone(), s.p("w.sock")] {
        let mut c = Client::connect(&socket, 1);
        // One 4 KiB request in buffers of 1000 and 3096 bytes: legal virtio, odd sectors.
        let data = pattern(4096, 42);
        c.buf_slice(0, 4096).copy_from_slice(&data);
        let base = c.buf(0);
        let iov = [
            libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: 1000,
            },
            libc::iovec {
                // SAFETY: `base` is queue 0's buffer (QUEUE_BUF bytes): base + 1000 is inside it.
                iov_base: unsafe { base.add(1000) } as *mut libc::c_void,
                iov_len: 3096,
            },
        ];
        c.queues[0].writev(8192, iov.as_ptr(), 2, 0, blkio::ReqFlags::empty());
        assert_eq!(c.complete(0), 0, "{}", socket.display());
        c.buf_slice(0, 4096).fill(0);
        c.queues[0].readv(8192, iov.as_ptr(), 2, 0, blkio::ReqFlags::empty());
        assert_eq!(c.complete(0), 0);
        assert_eq!(c.buf_slice(0, 4096), &data[..], "{}", socket.display());
        // Neighbours untouched.
        assert_eq!(c.read(0, 4096, 4096).unwrap(), golden[4096..8192]);
    }
}

/// A queue full of first writes to origin chunks under a snapshot: each must make its copy
/// durable before the origin changes (a sync), and the daemon runs them concurrently so those
/// syncs are shared (group commit) instead of paid one per request.
#[test]
fn first_writes_under_a_snapshot_share_their_syncs() {
    const CHUNK: usize = 64 << 10;
    const DEPTH: usize = 32;
    const ROUNDS: usize = 16;
    let (s, golden) = Setup::new(DEPTH * ROUNDS * CHUNK / MIB);
    let d = s.serve(&[]);
    s.ok(&[
        "snapshot",
        "create",
        "kept",
        "--socket",
        &sock(&s, "kept.sock"),
    ]);
    let commits_before = s.stats()["cache"]["commits"].as_u64().unwrap();
    let mut origin = Client::connect(&d.socket, 1);
    let new = pattern(DEPTH * ROUNDS * 4096, 31);
    for round in 0..ROUNDS {
        // DEPTH requests in flight at once, one 4 KiB write into each of DEPTH chunks.
        for k in 0..DEPTH {
            let i = round * DEPTH + k;
            let buf = origin.buf_slice(0, (k + 1) * 4096);
            buf[k * 4096..].copy_from_slice(&new[i * 4096..(i + 1) * 4096]);
            let p = origin.buf(0).wrapping_add(k * 4096);
            origin.queues[0].write((i * CHUNK) as u64, p, 4096, 0, blkio::ReqFlags::empty());
        }
        for _ in 0..DEPTH {
            assert_eq!(origin.complete(0), 0);
        }
    }
    let writes = (DEPTH * ROUNDS) as u64;
    let stats = s.stats();
    assert_eq!(stats["cache"]["copies"].as_u64().unwrap(), writes);
    assert_eq!(
        stats["cache"]["copy_writes"].as_u64().unwrap(),
        0,
        "through the page cache each copy is written by its copy-out, none staged for a commit"
    );
    let commits = stats["cache"]["commits"].as_u64().unwrap() - commits_before;
    assert!(
        commits * 2 <= writes,
        "{commits} commits for {writes} first writes at queue depth {DEPTH}: syncs not shared"
    );
    // The snapshot kept every chunk; the origin has the new data.
    let mut kept = Client::try_connect(&s.p("kept.sock"), 1, true).unwrap();
    for i in 0..DEPTH * ROUNDS {
        let at = i * CHUNK;
        assert_eq!(
            kept.read(0, at as u64, 4096).unwrap(),
            golden[at..at + 4096]
        );
        assert_eq!(
            origin.read(0, at as u64, 4096).unwrap(),
            new[i * 4096..(i + 1) * 4096]
        );
    }
}

/// The cache object's file system fills up (a 24 MiB tmpfs, the limit 1 GiB): every origin
/// write succeeds; the read-only and the writable snapshot it cannot preserve go inoperative,
/// which `list` and `stats` show; the event is logged once; their space goes back to the file
/// system and a snapshot taken afterwards is preserved again; the object checks clean.
#[test]
fn a_full_file_system_fails_the_snapshots_never_the_origin() {
    let Some(fs) = Tmpfs::mount("24m") else {
        return;
    };
    let (s, golden) = Setup::new(64);
    let cache = fs.path().join("cache.obj");
    let mut d = s.serve(&["--cache", cache.to_str().unwrap(), "--cache-size", "1G"]);
    s.ok(&["snapshot", "create", "ro", "--socket", &sock(&s, "ro.sock")]);
    s.ok(&[
        "snapshot",
        "create",
        "rw",
        "--writable",
        "--socket",
        &sock(&s, "rw.sock"),
    ]);
    let mut origin = Client::connect(&d.socket, 1);
    let new = pattern(64 * MIB, 21);
    for i in 0..64 {
        let part = &new[i * MIB..(i + 1) * MIB];
        assert_eq!(
            origin.write(0, (i * MIB) as u64, part),
            0,
            "origin at {i} MiB"
        );
    }
    assert_eq!(origin.flush(0), 0);
    assert_eq!(origin.read(0, 0, 64 * MIB).unwrap(), new);
    for name in ["ro", "rw"] {
        assert_eq!(s.device(name)["state"], "inoperative", "{name}");
    }
    let stats = s.stats();
    assert!(stats["cache"]["cache_write_errors"].as_u64().unwrap() >= 1);
    assert_eq!(stats["cache"]["inoperative_devices"], 2);
    let mut ro = Client::try_connect(&s.p("ro.sock"), 1, true).unwrap();
    assert!(ro.read(0, 0, 4096).is_err());

    // The space came back: a new snapshot is preserved.
    s.ok(&[
        "snapshot",
        "create",
        "later",
        "--socket",
        &sock(&s, "later.sock"),
    ]);
    assert_eq!(origin.write(0, 0, &pattern(MIB, 22)), 0);
    let mut later = Client::try_connect(&s.p("later.sock"), 1, true).unwrap();
    assert_eq!(later.read(0, 0, MIB).unwrap(), new[..MIB]);
    assert_ne!(new[..MIB], golden[..MIB]);
    let log = d.log_text();
    assert_eq!(log.matches("file system is full").count(), 1, "{log}");
    drop((ro, later, origin));
    let (status, err) = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{err}");
    let out = Command::new(BIN).arg("check").arg(&cache).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Snapshot-per-VM with the defaults: 20 writable snapshots of a 32 MiB origin, 4 of them
/// written at every chunk with 4 KiB writes (twice the origin in all: the old default limit
/// would have failed half of them): every write succeeds, with the cache object limited by its
/// file system's free space.
#[test]
fn snapshot_per_vm_fits_the_default_limit() {
    let (s, _golden) = Setup::new(32);
    let _d = s.serve(&[]);
    for i in 0..20 {
        let name = format!("vm{i}");
        let socket = sock(&s, &format!("{name}.sock"));
        s.ok(&[
            "snapshot",
            "create",
            &name,
            "--writable",
            "--socket",
            &socket,
        ]);
    }
    let mut rng = fastrand::Rng::with_seed(7);
    for i in 0..4 {
        let mut c = Client::connect(&s.p(&format!("vm{i}.sock")), 1);
        let mut chunks: Vec<u64> = (0..512).collect();
        rng.shuffle(&mut chunks);
        for chunk in chunks {
            let at = chunk * (64 << 10) + rng.u64(0..16) * 4096;
            assert_eq!(c.write(0, at, &pattern(4096, i as u8)), 0, "vm{i} at {at}");
        }
        assert_eq!(c.flush(0), 0);
    }
    let cache = &s.stats()["cache"];
    assert_eq!(cache["no_space_errors"], 0);
    assert_eq!(cache["limit_auto"], true);
    assert!(cache["used_bytes"].as_u64().unwrap() > 2 * 32 * MIB as u64);
    assert!(cache["limit_bytes"].as_u64().unwrap() > cache["used_bytes"].as_u64().unwrap());
}

/// Submits a 64 KiB write of `byte` at chunk `chunk` and waits up to `wait` for it.
fn write_chunk(c: &mut Client, chunk: u64, byte: u8, wait: Duration) -> Option<i32> {
    c.buf_slice(0, 64 << 10).fill(byte);
    let p = c.buf(0);
    c.queues[0].write(chunk << 16, p, 64 << 10, 0, blkio::ReqFlags::empty());
    c.complete_within(0, wait)
}

/// With the cache full a write to a writable snapshot waits (the default policy) instead of
/// failing: `stats` shows it, `snapblk wait low-space` returns, reads and the control socket
/// go on; deleting another snapshot lets it complete; so does `snapblk cache resize`, which
/// refuses a limit below what is in use and survives a restart.
#[test]
fn a_write_to_a_full_cache_waits_until_space_is_freed() {
    let (s, _golden) = Setup::new(16);
    let mut d = s.serve(&["--cache-size", "6M"]);
    for name in ["hog", "vm"] {
        let socket = sock(&s, &format!("{name}.sock"));
        s.ok(&[
            "snapshot",
            "create",
            name,
            "--writable",
            "--socket",
            &socket,
        ]);
    }
    let mut hog = Client::connect(&s.p("hog.sock"), 1);
    assert_eq!(hog.write(0, 0, &pattern(MIB, 1)), 0);
    drop(hog);
    let mut vm = Client::connect(&s.p("vm.sock"), 1);
    let mut chunk = 0;
    let blocked = loop {
        match write_chunk(&mut vm, chunk, 7, Duration::from_secs(2)) {
            Some(0) => chunk += 1,
            Some(e) => panic!("write {chunk} failed at once: {e}"),
            None => break chunk,
        }
        assert!(chunk < 64, "the cache never filled");
    };
    let st = s.stats();
    assert_eq!(st["cache"]["waiting_requests"], 1);
    assert_eq!(st["cache"]["on_full"], "wait=60");
    let out = s.run(
        &["wait", "low-space", "--timeout", "5"],
        std::process::Stdio::piped(),
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("low on space"));
    assert_eq!(s.list().len(), 3, "the control socket answers");
    let mut origin = Client::connect(&d.socket, 1);
    assert!(origin.read(0, 0, MIB).is_ok());

    s.ok(&["snapshot", "delete", "hog", "--force"]);
    assert_eq!(vm.complete_within(0, Duration::from_secs(8)), Some(0));
    // Full again, then a larger limit lets the write in.
    let mut chunk = blocked + 1;
    loop {
        match write_chunk(&mut vm, chunk, 8, Duration::from_secs(2)) {
            Some(0) => chunk += 1,
            Some(e) => panic!("write {chunk} failed at once: {e}"),
            None => break,
        }
        assert!(chunk < 64, "the cache never filled");
    }
    let (ok, _, err) = s.cli(&["cache", "resize", "5M"]);
    assert!(!ok && err.contains("in use"), "{err}");
    s.ok(&["cache", "resize", "8M"]);
    assert_eq!(vm.complete_within(0, Duration::from_secs(8)), Some(0));
    assert_eq!(vm.read(0, chunk << 16, 4096).unwrap(), vec![8u8; 4096]);
    assert_eq!(s.stats()["cache"]["no_space_errors"], 0);
    drop((vm, origin));
    let (status, err) = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{err}");
    let _d = s.serve(&[]);
    assert_eq!(s.stats()["cache"]["limit_bytes"], 8 * MIB as u64);
}

/// Runs `snapblk serve` on `origin` and `cache` with sockets named after `name`, expecting it
/// to be refused: waits for its end (at most 20 s) and returns its status and standard error.
fn refused_daemon(s: &Setup, origin: &Path, cache: &Path, name: &str) -> (bool, String) {
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--origin")
        .arg(origin)
        .arg("--cache")
        .arg(cache)
        .arg("--socket")
        .arg(s.p(&format!("{name}.sock")))
        .arg("--control")
        .arg(s.p(&format!("{name}.ctl")))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("a second daemon on {} was not refused", origin.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One daemon owns a cache object and a writable origin: a second one, on the same cache
/// object or the same origin, is refused at start with an error naming the file; `check`
/// says the cache object is in use instead of reporting damage, and checks it once the
/// daemon is gone; read-only daemons share an origin, a writable one is refused then.
#[test]
fn a_second_daemon_is_refused_and_check_says_the_cache_is_in_use() {
    let (s, golden) = Setup::new(4);
    let mut d = s.serve(&[]);
    let (img, cache, other) = (s.p("golden.img"), s.p("golden.img.cache"), s.p("other.img"));
    fs::write(&other, &golden).unwrap();
    // Same cache object with another origin; same origin with another cache object.
    for (origin, cache_path, named) in [(&other, &cache, &cache), (&img, &s.p("c2"), &img)] {
        let (ok, err) = refused_daemon(&s, origin, cache_path, "second");
        assert!(!ok, "a second daemon started: {err}");
        let named = named.display().to_string();
        assert!(
            err.contains(&named) && err.contains("another snapblk"),
            "{err}"
        );
    }

    let out = Command::new(BIN).arg("check").arg(&cache).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("in use by a running daemon; stop it or use `snapblk stats`"),
        "{stderr}"
    );
    assert!(!stdout.contains("NOT CLEAN"), "{stdout}");
    let (status, err) = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{err}");
    let out = Command::new(BIN).arg("check").arg(&cache).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Readers share the origin; a writer is refused while they serve it.
    let r1 = s.serve(&["--read-only", "--cache", s.p("r1").to_str().unwrap()]);
    let r2 = Daemon::start(
        &[
            "--origin",
            img.to_str().unwrap(),
            "--read-only",
            "--cache",
            s.p("r2").to_str().unwrap(),
            "--socket",
            s.p("r2.sock").to_str().unwrap(),
            "--control",
            s.p("r2.ctl").to_str().unwrap(),
        ],
        &s.p("r2.sock"),
    );
    let (ok, err) = refused_daemon(&s, &img, &s.p("w"), "w");
    assert!(!ok && err.contains("golden.img"), "{err}");
    drop((r1, r2));
}

/// `snapblk snapshot list | head`: a reader that closes the pipe early ends every command
/// quietly with status 141 (128 + SIGPIPE), never a panic.
#[test]
fn a_closed_pipe_ends_the_cli_quietly() {
    let (s, _golden) = Setup::new(4);
    let _d = s.serve(&[]);
    for i in 0..40 {
        s.ok(&["snapshot", "create", &format!("snapshot-{i}")]);
    }
    for args in [
        &["snapshot", "list"][..],
        &["snapshot", "list", "--json"],
        &["stats"],
        &["stats", "--json"],
        &["snapshot", "create", "one-more"],
        &["--help"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = s.run(args, writer.into());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "snapblk {args:?}: {err}");
        assert_eq!(out.status.code(), Some(141), "snapblk {args:?}: {err}");
        assert!(err.is_empty(), "snapblk {args:?} said: {err}");
    }
}
