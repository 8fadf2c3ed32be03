//! Snapshot devices served next to the origin, administered with the real CLI over the control
//! socket, read and written by libblkio clients, across restarts and crashes.

mod support;

use serde_json::Value;
use snapblk::testkit::blkio_client::Client;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use support::{make_image, pattern, Daemon, BIN};

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
        let img = self.p("golden.img");
        let sock = self.p("origin.sock");
        let ctl = self.p("ctl.sock");
        let mut args = vec![
            "--origin",
            img.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
            "--control",
            ctl.to_str().unwrap(),
            "--num-queues",
            "1",
        ];
        args.extend_from_slice(extra);
        Daemon::start(&args, &sock)
    }

    /// Runs the CLI against this daemon; returns (success, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .arg("--control")
            .arg(self.p("ctl.sock"))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.cli(args);
        assert!(ok, "snapblk {args:?} failed: {err}");
        out
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
