//! The NBD face with the real daemon and the standard tools (nbdinfo, nbdcopy, qemu-img,
//! qemu-io), libblkio as the vhost-user peer, and a raw client for hostile input.

mod support;

use snapblk::nbd::proto::{
    CMD_FLUSH, CMD_READ, CMD_WRITE, EINVAL, ENOSPC, EPERM, FLAG_CAN_MULTI_CONN, FLAG_READ_ONLY,
    REQUEST_MAGIC,
};
use snapblk::testkit::blkio_client::Client;
use snapblk::testkit::nbd::{extents_where, info, list, map, run, try_run, uri, RawClient};
use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::{cli_ok, make_image, path_str, pattern, serve_args, Daemon, BIN};

const MIB: usize = 1 << 20;
const CHUNK: u64 = 64 << 10;

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn nbd(&self) -> PathBuf {
        self.p("nbd.sock")
    }

    fn uri(&self, export: &str) -> String {
        uri(&self.nbd(), export)
    }

    fn serve(&self, extra: &[&str]) -> Daemon {
        let (img, sock, nbd) = (self.p("origin.img"), self.p("origin.sock"), self.nbd());
        let mut args = serve_args(path_str(&img), &sock, &self.p("ctl.sock"), 1, extra);
        args.extend(["--nbd".to_string(), path_str(&nbd).to_string()]);
        Daemon::start(&args, &sock)
    }

    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        support::cli(&self.p("ctl.sock"), args)
    }

    fn ok(&self, args: &[&str]) -> String {
        cli_ok(&self.p("ctl.sock"), args)
    }

    /// Waits until `name` has `n` NBD clients (a closed connection ends asynchronously).
    fn wait_clients(&self, name: &str, n: u64) {
        for _ in 0..100 {
            if self.device(name)["nbd_clients"] == n {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{name} never had {n} NBD clients");
    }

    fn device(&self, name: &str) -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["snapshot", "list", "--json"])).unwrap();
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no device {name}"))
    }

    /// `nbdcopy` of export `name` into a file; its bytes.
    fn copy(&self, name: &str, file: &str) -> Vec<u8> {
        let dst = self.p(file);
        run(Command::new("nbdcopy").arg(self.uri(name)).arg(&dst));
        fs::read(dst).unwrap()
    }
}

/// A sparse image of `size` bytes holding `data` at each offset given.
fn sparse_image(path: &Path, size: u64, data: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut all = vec![0u8; size as usize];
    for (off, d) in data {
        std::os::unix::fs::FileExt::write_all_at(&f, d, *off).unwrap();
        all[*off as usize..*off as usize + d.len()].copy_from_slice(d);
    }
    all
}

/// The chunk numbers an extent list covers (extents must be chunk-aligned).
fn chunks_of(extents: &[(u64, u64)]) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for &(off, len) in extents {
        assert!(
            off % CHUNK == 0 && len % CHUNK == 0,
            "unaligned extent {off}+{len}"
        );
        set.extend(off / CHUNK..(off + len) / CHUNK);
    }
    set
}

/// The chunks where two byte arrays differ.
fn differing_chunks(a: &[u8], b: &[u8]) -> BTreeSet<u64> {
    let c = CHUNK as usize;
    (0..a.len() / c)
        .filter(|&i| a[i * c..(i + 1) * c] != b[i * c..(i + 1) * c])
        .map(|i| i as u64)
        .collect()
}

#[test]
fn exports_serve_data_to_the_standard_tools() {
    let s = Setup::new();
    let golden = make_image(&s.p("origin.img"), 16 * MIB, 3);
    let _d = s.serve(&[]);

    // The origin is an export, read-only by default, with truthful flags and block sizes.
    let i = info(&s.uri("origin"));
    let e = &i["exports"][0];
    assert_eq!(e["export-size"], 16 * MIB as u64);
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["can_flush"], false);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], CHUNK);
    assert_eq!(e["block_size_maximum"], 32 * MIB as u64);
    assert_eq!(s.copy("origin", "copy.img"), golden, "nbdcopy");
    let qcopy = s.p("qemu.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(s.uri("origin"))
        .arg(&qcopy));
    assert_eq!(fs::read(&qcopy).unwrap(), golden, "qemu-img convert");

    // A read-only export refuses writes: qemu-io cannot open it writable, a raw write gets EPERM.
    let (ok, _, _) = try_run(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 9 0 4k"])
            .arg(s.uri("origin")),
    );
    assert!(!ok, "qemu-io wrote to a read-only export");
    let mut raw = RawClient::connect(&s.nbd(), "origin", false).unwrap();
    assert!(raw.flags & FLAG_READ_ONLY != 0 && raw.flags & FLAG_CAN_MULTI_CONN != 0);
    let r = raw.request(CMD_WRITE, 0, 0, 4096, &[9u8; 4096]).unwrap();
    assert_eq!(r.error, EPERM);
    let r = raw.request(CMD_READ, 0, 0, 4096, &[]).unwrap();
    assert_eq!(
        (r.error, &r.data[..]),
        (0, &golden[..4096]),
        "the connection goes on"
    );

    // A writable snapshot exported writable: qemu-io's writes land, a vhost-user client sees
    // them, and the NBD export sees the vhost-user client's writes.
    let vm = s.p("vm.sock");
    s.ok(&[
        "snapshot",
        "create",
        "vm",
        "--writable",
        "--socket",
        vm.to_str().unwrap(),
    ]);
    let (ok, _, err) = s.cli(&["export", "origin", "--writable"]);
    assert!(ok, "the origin is writable: {err}");
    s.ok(&["export", "origin"]);
    let out = s.ok(&["export", "vm", "--writable"]);
    assert!(out.contains(&s.uri("vm")), "{out}");
    run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 192k",
            "-c",
            "write -z 4M 64k",
            "-c",
            "flush",
        ])
        .arg(s.uri("vm")));
    let mut c = Client::try_connect(&vm, 1, false).unwrap();
    assert!(c
        .read(0, MIB as u64, 192 << 10)
        .unwrap()
        .iter()
        .all(|&b| b == 0x5a));
    assert!(c
        .read(0, 4 * MIB as u64, 64 << 10)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    assert_eq!(c.read(0, 0, MIB).unwrap(), golden[..MIB], "untouched");
    let mine = pattern(256 << 10, 77);
    assert_eq!(c.write(0, 8 * MIB as u64, &mine), 0);
    let via_nbd = s.copy("vm", "vm.img");
    assert_eq!(via_nbd[8 * MIB..8 * MIB + mine.len()], mine[..]);
    assert_eq!(
        s.copy("origin", "copy2.img"),
        golden,
        "the origin is untouched"
    );
    // The vm's I/O counters count NBD and vhost-user I/O alike.
    let io = &s.device("vm")["io"];
    assert!(
        io["writes"].as_u64().unwrap() >= 2 && io["reads"].as_u64().unwrap() >= 3,
        "{io}"
    );
    // Export flags of a writable export; an empty read is answered too.
    let mut raw = RawClient::connect(&s.nbd(), "vm", true).unwrap();
    assert_eq!(raw.flags & FLAG_READ_ONLY, 0);
    assert_eq!(raw.request(CMD_READ, 0, 0, 0, &[]).unwrap().error, 0);
    let mut raw = RawClient::connect(&s.nbd(), "origin", true).unwrap();
    assert_eq!(raw.request(CMD_READ, 0, 512, 0, &[]).unwrap().error, 0);
}

#[test]
fn every_device_is_listed_and_exports_follow_export_and_unexport_across_restarts() {
    let s = Setup::new();
    make_image(&s.p("origin.img"), 8 * MIB, 4);
    let mut d = s.serve(&[]);
    s.ok(&["snapshot", "create", "a"]);
    s.ok(&["snapshot", "create", "b", "--writable"]);
    s.ok(&["snapshot", "create", "c", "--of", "a"]);
    assert_eq!(list(&s.nbd()), ["a", "b", "c", "origin"]);
    assert_eq!(s.device("a")["export"], "read-only");
    assert_eq!(s.device("a")["nbd_uri"], s.uri("a"));

    let (ok, _, err) = s.cli(&["export", "a", "--writable"]);
    assert!(!ok && err.contains("read-only"), "{err}");
    s.ok(&["export", "b", "--writable"]);
    s.ok(&["unexport", "c"]);
    assert_eq!(list(&s.nbd()), ["a", "b", "origin"]);
    assert!(s.device("c")["export"].is_null());
    let human = s.ok(&["snapshot", "list"]);
    assert!(
        human.contains(&s.uri("b")) && !human.contains(&s.uri("c")),
        "{human}"
    );

    // An unexport is refused while a client is connected, unless forced (which ends it).
    let mut raw = RawClient::connect(&s.nbd(), "a", false).unwrap();
    assert_eq!(s.device("a")["nbd_clients"], 1);
    let (ok, _, err) = s.cli(&["unexport", "a"]);
    assert!(!ok && err.contains("NBD client"), "{err}");
    s.ok(&["unexport", "a", "--force"]);
    let mut byte = [0u8; 1];
    raw.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(
        raw.stream.read(&mut byte).unwrap_or(0),
        0,
        "the connection was closed"
    );
    assert!(
        RawClient::connect(&s.nbd(), "a", false).is_err(),
        "unexported"
    );

    // All of it survives a restart; a connected client does not hold up the shutdown.
    let _idle = RawClient::connect(&s.nbd(), "b", true).unwrap();
    let started = std::time::Instant::now();
    let (status, err) = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "an idle NBD client delayed the stop"
    );
    assert!(!s.nbd().exists(), "the NBD socket is removed at shutdown");
    let _d = s.serve(&[]);
    assert_eq!(list(&s.nbd()), ["b", "origin"]);
    assert_eq!(s.device("b")["export"], "writable");
    s.ok(&["export", "a"]);
    assert_eq!(list(&s.nbd()), ["a", "b", "origin"]);
}

#[test]
fn base_allocation_reports_zero_chunks_and_the_origins_holes() {
    let s = Setup::new();
    let size = 16 * MIB as u64;
    sparse_image(
        &s.p("origin.img"),
        size,
        &[
            (2 * MIB as u64, pattern(MIB, 1)),
            (8 * MIB as u64, pattern(CHUNK as usize, 2)),
        ],
    );
    let d = s.serve(&[]);
    let mib = MIB as u64;
    let data = |m: &[(u64, u64, u32)]| extents_where(m, |f| f & 1 == 0);
    assert_eq!(
        data(&map(&s.uri("origin"), "base:allocation")),
        [(2 * mib, mib), (8 * mib, CHUNK)]
    );
    // A snapshot: a discarded chunk is a zero mapping, a write into a hole is data, and where
    // the origin is written after it, it reads its preserved copy (data, though it was a hole).
    s.ok(&[
        "snapshot",
        "create",
        "s",
        "--writable",
        "--socket",
        s.p("s.sock").to_str().unwrap(),
    ]);
    let mut snap = Client::connect(&s.p("s.sock"), 1);
    assert_eq!(snap.discard(0, 2 * mib, CHUNK), 0);
    assert_eq!(snap.write(0, 12 * mib, &pattern(CHUNK as usize, 3)), 0);
    let mut origin = Client::connect(&d.socket, 1);
    assert_eq!(origin.write(0, 14 * mib, &pattern(CHUNK as usize, 4)), 0);
    let m = map(&s.uri("s"), "base:allocation");
    assert_eq!(
        data(&m),
        [
            (2 * mib + CHUNK, mib - CHUNK),
            (8 * mib, CHUNK),
            (12 * mib, CHUNK),
            (14 * mib, CHUNK)
        ]
    );
    let flags_at = |off: u64| {
        m.iter()
            .find(|e| e.0 <= off && off < e.0 + e.1)
            .map(|e| e.2)
    };
    assert_eq!(
        flags_at(2 * mib),
        Some(3),
        "the zero mapping is a hole that reads as zeros"
    );
    assert!(
        m.iter().all(|e| e.2 & 1 == 0 || e.2 == 3),
        "holes read as zeros: {m:?}"
    );
    assert_eq!(
        data(&map(&s.uri("origin"), "base:allocation")),
        [(2 * mib, mib), (8 * mib, CHUNK), (14 * mib, CHUNK)]
    );
    // qemu-img sees the same.
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(s.uri("s")));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let zero_at = |off: u64| {
        v.as_array().unwrap().iter().any(|e| {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            start <= off && off < start + len && e["zero"] == true
        })
    };
    assert!(
        zero_at(2 * mib) && zero_at(0) && !zero_at(12 * mib),
        "{out}"
    );
    // And a structured read of the zero chunk comes back as zeros.
    let mut raw = RawClient::connect(&s.nbd(), "s", true).unwrap();
    let r = raw
        .request(CMD_READ, 0, 2 * mib, 2 * CHUNK as u32, &[])
        .unwrap();
    assert_eq!(r.error, 0);
    let c = CHUNK as usize;
    assert!(r.data[..c].iter().all(|&b| b == 0), "the hole");
    assert_eq!(r.data[c..], pattern(MIB, 1)[c..2 * c], "the data after it");
}

#[test]
fn allocation_depth_names_the_layer_on_a_snapshot_of_a_snapshot() {
    let s = Setup::new();
    make_image(&s.p("origin.img"), 4 * MIB, 5);
    let d = s.serve(&[]);
    let sock = |n: &str| s.p(n).to_str().unwrap().to_string();
    s.ok(&[
        "snapshot",
        "create",
        "s1",
        "--writable",
        "--socket",
        &sock("s1.sock"),
    ]);
    let mut s1 = Client::connect(&s.p("s1.sock"), 1);
    assert_eq!(s1.write(0, 0, &pattern(2 * CHUNK as usize, 6)), 0);
    s.ok(&[
        "snapshot",
        "create",
        "s2",
        "--of",
        "s1",
        "--writable",
        "--socket",
        &sock("s2.sock"),
    ]);
    let mut s2 = Client::connect(&s.p("s2.sock"), 1);
    assert_eq!(s2.write(0, 5 * CHUNK, &pattern(CHUNK as usize, 7)), 0);
    let mut origin = Client::connect(&d.socket, 1);
    assert_eq!(origin.write(0, 8 * CHUNK, &pattern(CHUNK as usize, 8)), 0);
    let depth = |name: &str| -> Vec<(u64, u64, u32)> {
        map(&s.uri(name), "qemu:allocation-depth")
            .into_iter()
            .map(|(o, l, t)| (o / CHUNK, l / CHUNK, t))
            .collect()
    };
    let all = 4 * MIB as u64 / CHUNK;
    // s2: its own chunk 5 (1), s1's chunks 0-1 (2), the origin layer elsewhere (3), chunk 8
    // included: it reads the origin's preserved copy, which is the origin's data.
    assert_eq!(
        depth("s2"),
        [(0, 2, 2), (2, 3, 3), (5, 1, 1), (6, all - 6, 3)]
    );
    assert_eq!(depth("s1"), [(0, 2, 1), (2, all - 2, 2)]);
    assert_eq!(depth("origin"), [(0, all, 1)]);
}

/// Writes `n` chunks (whole or partial) of random places with bytes `next..`: a vhost-user
/// client, or qemu-io over NBD. Returns the writes done.
fn random_writes(
    rng: &mut fastrand::Rng,
    n: usize,
    next: &mut u8,
    size: u64,
) -> Vec<(u64, usize, u8)> {
    (0..n)
        .map(|_| {
            let c = rng.u64(0..size / CHUNK);
            let (off, len) = match rng.u8(0..3) {
                0 => (c * CHUNK, CHUNK as usize),
                1 => (c * CHUNK + rng.u64(0..16) * 4096, 4096),
                _ => (c * CHUNK, (2 * CHUNK).min(size - c * CHUNK) as usize),
            };
            // Every write its own byte: no two writes leave equal data behind.
            *next = next.checked_add(1).expect("at most 255 writes");
            (off, len, *next)
        })
        .collect()
}

fn apply(model: &mut [u8], writes: &[(u64, usize, u8)]) {
    for &(off, len, b) in writes {
        model[off as usize..off as usize + len].fill(b);
    }
}

#[test]
fn dirty_bitmaps_are_exact_and_snapshot_diff_agrees_before_and_after_a_restart() {
    let s = Setup::new();
    let size = 16 * MIB as u64;
    let golden = make_image(&s.p("origin.img"), size as usize, 6);
    let mut d = s.serve(&[]);
    let mut rng = fastrand::Rng::with_seed(11);
    let mut byte = 0u8;
    let mut origin = golden.clone();

    s.ok(&["snapshot", "create", "first"]);
    let first = golden.clone();
    let mut vm = Client::connect(&d.socket, 1);
    let w1 = random_writes(&mut rng, 40, &mut byte, size);
    for &(off, len, b) in &w1 {
        assert_eq!(vm.write(0, off, &vec![b; len]), 0);
    }
    apply(&mut origin, &w1);
    s.ok(&["snapshot", "create", "w", "--writable"]);
    s.ok(&["export", "w", "--writable"]);
    let mut w = origin.clone();
    let w2 = random_writes(&mut rng, 40, &mut byte, size);
    for &(off, len, b) in &w2 {
        assert_eq!(vm.write(0, off, &vec![b; len]), 0);
    }
    apply(&mut origin, &w2);
    let w3 = random_writes(&mut rng, 40, &mut byte, size);
    let mut io = Command::new("qemu-io");
    io.args(["-f", "raw"]);
    for &(off, len, b) in &w3 {
        io.arg("-c").arg(format!("write -P {b} {off} {len}"));
    }
    run(io.arg(s.uri("w")));
    apply(&mut w, &w3);
    drop(vm);
    // The model is what the devices hold.
    assert_eq!(s.copy("first", "first.img"), first);
    assert_eq!(s.copy("w", "w.img"), w);
    assert_eq!(s.copy("origin", "o.img"), origin);

    let dirty = |export: &str, against: &str| {
        let m = map(&s.uri(export), &format!("qemu:dirty-bitmap:{against}"));
        assert_eq!(
            m.iter().map(|e| e.1).sum::<u64>(),
            size,
            "the map covers the export"
        );
        chunks_of(&extents_where(&m, |f| f & 1 == 1))
    };
    let cases = [
        ("w", "first", &w, &first),
        ("origin", "first", &origin, &first),
        ("origin", "w", &origin, &w),
    ];
    let check = || {
        for (export, against, a, b) in cases {
            let want = differing_chunks(a, b);
            assert!(!want.is_empty());
            assert_eq!(
                dirty(export, against),
                want,
                "{export} against {against}: none missed, none extra"
            );
            assert_eq!(dirty(against, export), want, "symmetric");
        }
        assert!(dirty("w", "w").is_empty());
    };
    check();
    let diff = |from: &str, to: &str| -> Vec<(u64, u64)> {
        let v: serde_json::Value =
            serde_json::from_str(&s.ok(&["snapshot", "diff", from, to, "--json"])).unwrap();
        v["extents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect()
    };
    let bitmap = |export: &str, against: &str| {
        extents_where(
            &map(&s.uri(export), &format!("qemu:dirty-bitmap:{against}")),
            |f| f & 1 == 1,
        )
    };
    let before = diff("first", "w");
    assert_eq!(
        before,
        bitmap("w", "first"),
        "snapshot diff is the dirty bitmap"
    );
    let human = s.ok(&["snapshot", "diff", "first", "w"]);
    assert!(
        human.contains(&format!("{} extent(s)", before.len())),
        "{human}"
    );

    // Derived from the tables, so a restart changes nothing.
    let (status, err) = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{err}");
    d = s.serve(&[]);
    assert_eq!(diff("first", "w"), before);
    check();
    drop(d);
}

#[test]
fn many_connections_copy_a_snapshot_while_a_vm_writes_the_origin() {
    let s = Setup::new();
    let golden = make_image(&s.p("origin.img"), 32 * MIB, 8);
    let d = s.serve(&[]);
    s.ok(&["snapshot", "create", "pit"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (sock, stop) = (d.socket.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut vm = Client::connect(&sock, 1);
            let mut rng = fastrand::Rng::with_seed(3);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let off = rng.u64(0..(32 * MIB as u64 - 65536) / 4096) * 4096;
                assert_eq!(vm.write(0, off, &vec![(n % 251) as u8; 65536]), 0);
                n += 1;
            }
            n
        })
    };
    let copies: Vec<_> = (0..8)
        .map(|i| {
            let (src, dst) = (s.uri("pit"), s.p(&format!("copy{i}.img")));
            std::thread::spawn(move || {
                run(Command::new("nbdcopy")
                    .arg("--connections=4")
                    .arg(src)
                    .arg(&dst));
                fs::read(dst).unwrap()
            })
        })
        .collect();
    let reader = {
        let src = s.uri("origin");
        std::thread::spawn(move || {
            run(Command::new("qemu-io")
                .args([
                    "-r",
                    "-f",
                    "raw",
                    "-c",
                    "readv 0 1M 1M 1M",
                    "-c",
                    "read 16M 8M",
                ])
                .arg(src))
        })
    };
    for c in copies {
        assert!(
            c.join().unwrap() == golden,
            "a copy of the snapshot differs from its point in time"
        );
    }
    reader.join().unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(writer.join().unwrap() > 0, "the VM wrote meanwhile");
    assert_eq!(s.device("pit")["nbd_clients"], 0, "every connection ended");
}

/// A connection that sends `bytes` and returns what the server sent back before closing.
fn exchange(socket: &Path, bytes: &[u8]) -> Vec<u8> {
    let mut c = UnixStream::connect(socket).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = c.write_all(bytes);
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    got
}

#[test]
fn hostile_clients_leave_the_daemon_serving_the_others() {
    let s = Setup::new();
    let golden = make_image(&s.p("origin.img"), 8 * MIB, 9);
    let d = s.serve(&["--nbd-max-connections", "4"]);
    s.ok(&["snapshot", "create", "w", "--writable"]);
    s.ok(&["export", "w", "--writable"]);
    let size = 8 * MIB as u64;

    // Garbage instead of a handshake; an option far too large.
    let mut junk = vec![0u8, 0, 0, 1];
    junk.extend((0..200u32).map(|i| (i * 37) as u8));
    let got = exchange(&s.nbd(), &junk);
    assert_eq!(&got[..8], b"NBDMAGIC", "greeted, then dropped");
    let mut big = vec![0, 0, 0, 1];
    big.extend_from_slice(b"IHAVEOPT");
    big.extend_from_slice(&7u32.to_be_bytes());
    big.extend_from_slice(&(1u32 << 30).to_be_bytes());
    let got = exchange(&s.nbd(), &big);
    assert_eq!(
        got.len(),
        18 + 20 + u32::from_be_bytes(got[34..38].try_into().unwrap()) as usize
    );
    assert_eq!(
        u32::from_be_bytes(got[30..34].try_into().unwrap()),
        (1 << 31) + 9,
        "NBD_REP_ERR_TOO_BIG"
    );

    // Requests past the end, unaligned, too large, to read-only: errors, and the connection goes on.
    let mut c = RawClient::connect(&s.nbd(), "w", true).unwrap();
    assert_eq!(
        c.request(CMD_READ, 0, size, 512, &[]).unwrap().error,
        EINVAL
    );
    assert_eq!(c.request(CMD_READ, 0, 100, 512, &[]).unwrap().error, EINVAL);
    assert_eq!(
        c.request(CMD_READ, 0, 0, 64 << 20, &[]).unwrap().error,
        EINVAL
    );
    assert_eq!(
        c.request(CMD_WRITE, 0, size - 512, 1024, &[1u8; 1024])
            .unwrap()
            .error,
        ENOSPC
    );
    assert_eq!(
        c.request(CMD_FLUSH, 0x80, 0, 0, &[]).unwrap().error,
        EINVAL,
        "unknown flag"
    );
    assert_eq!(
        c.request(99, 0, 0, 0, &[]).unwrap().error,
        EINVAL,
        "unknown command"
    );
    let r = c.request(CMD_READ, 0, 4096, 4096, &[]).unwrap();
    assert_eq!((r.error, &r.data[..]), (0, &golden[4096..8192]));
    // A bad magic ends that connection only.
    let mut bad = [0u8; 28];
    bad[..4].copy_from_slice(&(REQUEST_MAGIC ^ 1).to_be_bytes());
    c.stream.write_all(&bad).unwrap();
    let mut rest = Vec::new();
    let _ = c.stream.read_to_end(&mut rest);
    // A write larger than the limit: refused, then the end (its payload cannot be skipped).
    let mut c = RawClient::connect(&s.nbd(), "w", false).unwrap();
    c.send(CMD_WRITE, 0, 0, 64 << 20, &[]).unwrap();
    let mut reply = [0u8; 16];
    c.stream.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), EINVAL);
    // A client vanishing in the middle of a write.
    let mut c = RawClient::connect(&s.nbd(), "w", false).unwrap();
    c.send(CMD_WRITE, 0, 0, 1 << 20, &[7u8; 100 << 10]).unwrap();
    drop(c);

    // The connection limit: past it, a client is told why.
    s.wait_clients("w", 0);
    // (A connection ended a moment ago may still hold its slot for a moment: retry.)
    let connect = || {
        (0..50)
            .find_map(|_| {
                let c = RawClient::connect(&s.nbd(), "origin", false).ok();
                if c.is_none() {
                    std::thread::sleep(Duration::from_millis(50));
                }
                c
            })
            .expect("a connection under the limit")
    };
    let held: Vec<_> = (0..4).map(|_| connect()).collect();
    let (ok, _, err) = try_run(Command::new("qemu-img").arg("info").arg(s.uri("origin")));
    assert!(!ok && err.contains("too many NBD connections"), "{err}");
    drop(held);

    // Everyone else is served, by NBD and vhost-user alike (one connection at a time: the
    // ones just closed may hold their slots a moment longer).
    s.wait_clients("origin", 0);
    let after = s.p("after.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(s.uri("origin"))
        .arg(&after));
    assert_eq!(fs::read(after).unwrap(), golden);
    let mut vm = Client::connect(&d.socket, 1);
    assert_eq!(vm.read(0, 0, 4096).unwrap(), golden[..4096]);
    let log = d.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn delete_and_restore_wait_for_nbd_clients_unless_forced() {
    let s = Setup::new();
    make_image(&s.p("origin.img"), 4 * MIB, 10);
    let _d = s.serve(&[]);
    s.ok(&["snapshot", "create", "s"]);
    let mut c = RawClient::connect(&s.nbd(), "s", false).unwrap();
    let (ok, _, err) = s.cli(&["snapshot", "delete", "s"]);
    assert!(!ok && err.contains("NBD client"), "{err}");
    let o = RawClient::connect(&s.nbd(), "origin", false).unwrap();
    let (ok, _, err) = s.cli(&["snapshot", "restore", "s"]);
    assert!(!ok && err.contains("NBD client"), "{err}");
    drop(o);
    s.wait_clients("origin", 0);
    s.ok(&["snapshot", "restore", "s"]);
    assert_eq!(
        c.request(CMD_READ, 0, 0, 512, &[]).unwrap().error,
        0,
        "still served"
    );
    s.ok(&["snapshot", "delete", "s", "--force"]);
    let mut byte = [0u8; 1];
    assert_eq!(
        c.stream.read(&mut byte).unwrap_or(0),
        0,
        "its connection was ended"
    );
    assert_eq!(list(&s.nbd()), ["origin"]);
}

/// The shell code of README.md's block marked `<!-- recipe:NAME -->`.
fn readme_recipe(name: &str) -> String {
    let readme =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let marker = format!("<!-- recipe:{name} -->");
    let at = readme
        .find(&marker)
        .unwrap_or_else(|| panic!("README.md has no {marker}"));
    let block = &readme[at..];
    let start = block.find("```sh\n").expect("a sh block after the marker") + 6;
    let end = block[start..].find("```").expect("the block's end");
    block[start..start + end].to_string()
}

#[test]
fn the_readme_backup_recipe_works_end_to_end() {
    let s = Setup::new();
    let dir = s.dir.path();
    // The recipe runs where `snapblk serve` runs with its defaults.
    let args = ["--size", "32M", "--num-queues", "1"];
    let d = Daemon::start_in(Some(dir), &args, &dir.join("snapblk-data/origin.sock"));
    let mut vm = Client::connect(&d.socket, 1);
    let mut rng = fastrand::Rng::with_seed(5);
    let mut byte = 0;
    for &(off, len, b) in &random_writes(&mut rng, 30, &mut byte, 32 * MIB as u64) {
        assert_eq!(vm.write(0, off, &vec![b; len]), 0);
    }
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let sh = |name: &str| {
        run(Command::new("bash")
            .args(["-euo", "pipefail", "-c"])
            .arg(readme_recipe(name))
            .current_dir(dir)
            .env("PATH", &path));
    };
    sh("full");
    // The VM goes on writing; then the incremental backup, then the restore.
    for &(off, len, b) in &random_writes(&mut rng, 30, &mut byte, 32 * MIB as u64) {
        assert_eq!(vm.write(0, off, &vec![b; len]), 0);
    }
    sh("incremental");
    let changed = fs::read_to_string(dir.join("backup-2.extents")).unwrap();
    assert!((1..=30).contains(&changed.lines().count()), "{changed}");
    sh("restore");
    // The restored image is the second snapshot's content, as a vhost-user client reads it.
    run(Command::new(BIN)
        .args(["snapshot", "serve", "backup-2", "--socket", "b2.sock"])
        .current_dir(dir));
    let mut b2 = Client::try_connect(&dir.join("b2.sock"), 1, true).unwrap();
    let want = b2.read(0, 0, 32 * MIB).unwrap();
    assert_eq!(fs::read(dir.join("restored.img")).unwrap(), want);
    assert_ne!(
        fs::read(dir.join("backup-1.img")).unwrap(),
        want,
        "the VM changed the disk"
    );
}

#[test]
fn exports_are_served_on_tcp_when_asked() {
    let s = Setup::new();
    let golden = make_image(&s.p("origin.img"), 4 * MIB, 12);
    let img = s.p("origin.img");
    let (sock, ctl) = (s.p("origin.sock"), s.p("ctl.sock"));
    let extra = ["--no-nbd", "--nbd-listen", "127.0.0.1:0"];
    let args = serve_args(path_str(&img), &sock, &ctl, 1, &extra);
    let _d = Daemon::start(&args, &sock);
    assert!(!s.nbd().exists());
    let uri = s.device("origin")["nbd_uri"].as_str().unwrap().to_string();
    assert!(
        uri.starts_with("nbd://127.0.0.1:") && uri.ends_with("/origin"),
        "{uri}"
    );
    let dst = s.p("tcp.img");
    run(Command::new("nbdcopy").arg(&uri).arg(&dst));
    assert_eq!(fs::read(dst).unwrap(), golden);
    assert_eq!(map(&uri, "qemu:allocation-depth"), [(0, 4 * MIB as u64, 1)]);
}
