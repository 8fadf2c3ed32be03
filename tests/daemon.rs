//! The real binary, served over a real socket, driven by libblkio (an independent
//! vhost-user-blk client), checked against the image file on disk.

mod support;

use snapblk::testkit::blkio_client::Client;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use support::{make_image, pattern, Daemon, BIN};

const MIB: usize = 1 << 20;

fn serve(dir: &Path, extra: &[&str]) -> Daemon {
    support::serve_origin(dir, extra)
}

#[test]
fn capacity_write_read_and_image_agree() {
    let dir = tempfile::tempdir().unwrap();
    let mut image = make_image(&dir.path().join("origin.img"), 64 * MIB + 3 * 512, 1);
    let d = serve(dir.path(), &["--num-queues", "1"]);
    let mut c = Client::connect(&d.socket, 1);
    // Capacity is the file size rounded down to the logical block size.
    assert_eq!(c.capacity(), (64 * MIB + 3 * 512) as u64);

    // Reads see the image.
    assert_eq!(c.read(0, 0, 8192).unwrap(), image[..8192]);
    assert_eq!(
        c.read(0, 40 * MIB as u64 + 512, 4096).unwrap(),
        image[40 * MIB + 512..40 * MIB + 512 + 4096]
    );

    // Writes of several sizes and alignments land where they should.
    for (i, (off, len)) in [
        (0usize, 512usize),
        (4096, 4096),
        (MIB - 512, 8192),
        (7 * MIB, MIB),
        (64 * MIB, 1536),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(len, 100 + i as u8);
        assert_eq!(c.write(0, off as u64, &data), 0, "write at {off}");
        image[off..off + len].copy_from_slice(&data);
        assert_eq!(
            c.read(0, off as u64, len).unwrap(),
            data,
            "read back at {off}"
        );
    }
    assert_eq!(c.flush(0), 0);
    assert_eq!(
        fs::read(dir.path().join("origin.img")).unwrap(),
        image,
        "image file after flush"
    );
}

#[test]
fn out_of_range_io_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    make_image(&dir.path().join("origin.img"), 4 * MIB, 2);
    let d = serve(dir.path(), &["--num-queues", "1"]);
    let mut c = Client::connect(&d.socket, 1);
    let cap = c.capacity();
    assert!(c.read(0, cap - 512, 4096).is_err(), "read across the end");
    assert!(c.read(0, cap, 512).is_err(), "read at the end");
    assert_ne!(
        c.write(0, cap - 512, &[0u8; 1024]),
        0,
        "write across the end"
    );
    assert_ne!(c.discard(0, cap, 4096), 0, "discard past the end");
    // The device still works afterwards.
    assert!(c.read(0, cap - 512, 512).is_ok());
}

#[test]
fn discard_and_write_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("origin.img");
    make_image(&img, 16 * MIB, 3);
    let d = serve(dir.path(), &["--num-queues", "1"]);
    let mut c = Client::connect(&d.socket, 1);
    let blocks_before = fs::metadata(&img).unwrap().blocks();

    assert_eq!(c.discard(0, 2 * MIB as u64, 2 * MIB as u64), 0);
    assert_eq!(c.read(0, 2 * MIB as u64, MIB).unwrap(), vec![0u8; MIB]);
    assert_eq!(c.write_zeroes(0, 8 * MIB as u64, 65536, false), 0);
    assert_eq!(c.write_zeroes(0, 9 * MIB as u64, MIB as u64, true), 0);
    assert_eq!(c.flush(0), 0);

    let file = fs::read(&img).unwrap();
    let orig = pattern(16 * MIB, 3);
    assert!(
        file[2 * MIB..4 * MIB].iter().all(|&b| b == 0),
        "discarded range reads zero"
    );
    assert!(file[8 * MIB..8 * MIB + 65536].iter().all(|&b| b == 0));
    assert!(file[9 * MIB..10 * MIB].iter().all(|&b| b == 0));
    assert_eq!(
        file[..2 * MIB],
        orig[..2 * MIB],
        "data before the discard kept"
    );
    assert_eq!(
        file[4 * MIB..8 * MIB],
        orig[4 * MIB..8 * MIB],
        "data between kept"
    );
    assert_eq!(file[10 * MIB..], orig[10 * MIB..], "data after kept");
    // Discard and unmapping write-zeroes deallocate: 3 MiB punched is 6144 sectors, less a
    // little the filesystem may keep for its own metadata.
    let blocks_after = fs::metadata(&img).unwrap().blocks();
    assert!(
        blocks_before - blocks_after >= 6000,
        "{blocks_before} -> {blocks_after} blocks"
    );
}

#[test]
fn read_only_device_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("origin.img");
    let orig = make_image(&img, 4 * MIB, 4);
    fs::set_permissions(&img, fs::Permissions::from_mode(0o444)).unwrap();
    let d = serve(dir.path(), &["--read-only", "--num-queues", "1"]);
    // A read-write client is refused: the device advertises VIRTIO_BLK_F_RO.
    assert!(Client::try_connect(&d.socket, 1, false).is_err());
    let mut c = Client::try_connect(&d.socket, 1, true).unwrap();
    assert_eq!(c.read(0, 0, 4096).unwrap(), orig[..4096]);
    assert_ne!(c.write(0, 0, &[0xffu8; 4096]), 0);
    assert_ne!(c.write_zeroes(0, 0, 4096, false), 0);
    assert_ne!(c.discard(0, 0, 4096), 0);
    assert_eq!(c.flush(0), 0);
    assert_eq!(fs::read(&img).unwrap(), orig);
}

#[test]
fn two_queues_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("origin.img");
    make_image(&img, 32 * MIB, 5);
    let d = serve(dir.path(), &["--num-queues", "2"]);
    let mut c = Client::connect(&d.socket, 2);
    assert_eq!(c.queues.len(), 2);
    // Keep 16 writes in flight on each queue at the same time, to different halves.
    let per_req = 64 * 1024;
    let depth = 16;
    for q in 0..2 {
        for i in 0..depth {
            let data = pattern(per_req, (q * depth + i) as u8);
            let off = (q * 16 * MIB + i * per_req) as u64;
            // SAFETY: depth * per_req (1 MiB) fits in queue q's QUEUE_BUF-byte buffer, so each
            // request gets its own disjoint part of it.
            let buf = unsafe { c.buf(q).add(i * per_req) };
            // SAFETY: `buf` has per_req bytes of its own (above), no request uses them yet, and
            // `data` is a separate allocation of per_req bytes.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, per_req) };
            c.queues[q].write(off, buf, per_req, 0, blkio::ReqFlags::empty());
        }
    }
    for q in 0..2 {
        for _ in 0..depth {
            assert_eq!(c.complete(q), 0);
        }
    }
    assert_eq!(c.flush(1), 0);
    let file = fs::read(&img).unwrap();
    for q in 0..2 {
        for i in 0..depth {
            let off = q * 16 * MIB + i * per_req;
            assert_eq!(
                file[off..off + per_req],
                pattern(per_req, (q * depth + i) as u8)[..],
                "q{q} req{i}"
            );
        }
    }
}

#[test]
fn reconnects_keep_fds_and_threads_flat() {
    let dir = tempfile::tempdir().unwrap();
    make_image(&dir.path().join("origin.img"), 4 * MIB, 6);
    let d = serve(dir.path(), &["--num-queues", "2"]);
    let cycle = |i: usize| {
        let mut c = Client::connect(&d.socket, 2);
        let data = pattern(4096, i as u8);
        assert_eq!(
            c.write(i % 2, (i * 4096) as u64 % (4 * MIB as u64), &data),
            0,
            "cycle {i}"
        );
        assert_eq!(
            c.read(i % 2, (i * 4096) as u64 % (4 * MIB as u64), 4096)
                .unwrap(),
            data
        );
    };
    let settle = || std::thread::sleep(std::time::Duration::from_millis(300));
    for i in 0..5 {
        cycle(i);
    }
    settle();
    let (fds, threads) = (d.fd_count(), d.thread_count());
    for i in 5..105 {
        cycle(i);
    }
    settle();
    assert_eq!(d.fd_count(), fds, "fd count after 100 reconnects");
    assert_eq!(
        d.thread_count(),
        threads,
        "thread count after 100 reconnects"
    );
}

#[test]
fn sigterm_shuts_down_cleanly_and_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    make_image(&dir.path().join("origin.img"), 4 * MIB, 7);
    let mut d = serve(dir.path(), &["--num-queues", "1"]);
    // With a frontend connected and idle.
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.write(0, 0, &[0xabu8; 4096]), 0);
    let (status, stderr) = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "exit status {status}: {stderr}");
    assert!(!d.socket.exists(), "socket removed");
    assert_eq!(
        fs::read(dir.path().join("origin.img")).unwrap()[..4096],
        [0xabu8; 4096]
    );
    drop(c);

    // SIGINT while waiting for a frontend.
    let mut d = serve(dir.path(), &[]);
    let (status, stderr) = d.signal_and_wait(libc::SIGINT);
    assert!(status.success(), "exit status {status}: {stderr}");
}

#[test]
fn live_sockets_are_never_stolen_and_stale_ones_are_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("origin.img");
    make_image(&img, 4 * MIB, 8);
    let sock = dir.path().join("origin.sock");
    let d = serve(dir.path(), &[]);
    let out = Command::new(BIN)
        .args([
            "serve",
            "--origin",
            img.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    // The first daemon still serves.
    let mut c = Client::connect(&d.socket, 1);
    assert!(c.read(0, 0, 512).is_ok());
    drop(c);

    // A killed daemon leaves a stale socket; the next one replaces it.
    let mut d = d;
    d.signal_and_wait(libc::SIGKILL);
    assert!(sock.exists());
    let d2 = serve(dir.path(), &[]);
    let mut c = Client::connect(&d2.socket, 1);
    assert!(c.read(0, 0, 512).is_ok());

    // Sockets are private to the owner by default.
    let mode = fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn clear_errors_for_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("serve")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let missing = dir.path().join("nope.img");
    let (ok, err) = run(&["--origin", missing.to_str().unwrap(), "--socket", "s.sock"]);
    assert!(!ok && err.contains("does not exist"), "{err}");
    let (ok, err) = run(&["--queue-size", "100"]);
    assert!(!ok && err.contains("power of two"), "{err}");
    let (ok, err) = run(&["--logical-block-size", "1024"]);
    assert!(!ok && err.contains("512 or 4096"), "{err}");
    let (ok, err) = run(&["--size", "12Q"]);
    assert!(!ok && err.contains("unknown unit"), "{err}");
    // A directory where the socket should go is not replaced.
    fs::create_dir(dir.path().join("d")).unwrap();
    make_image(&dir.path().join("x.img"), MIB, 0);
    let (ok, err) = run(&["--origin", "x.img", "--socket", "d"]);
    assert!(!ok && err.contains("not a socket"), "{err}");
    // An unreadable origin (directory).
    let (ok, err) = run(&["--origin", "d", "--socket", "s2.sock"]);
    assert!(!ok && err.contains("cannot open"), "{err}");
}

#[test]
fn default_origin_is_created_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("snapblk-data/origin.sock");
    let child = Command::new(BIN)
        .args(["serve", "--size", "1G"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut d = Daemon {
        child: Some(child),
        socket: sock.clone(),
        log: Default::default(),
    };
    // (stdout is read at the end for the attach lines, so wait on the socket file here.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "default socket never appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let img = dir.path().join("snapblk-data/origin.img");
    let meta = fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    assert!(meta.blocks() < 64, "image is sparse");
    let c = Client::connect(&sock, 1);
    assert_eq!(c.capacity(), 1 << 30);
    drop(c);
    let child = d.child.take().unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("vhost-user-blk-pci"),
        "prints the QEMU attach line: {stdout}"
    );
    assert!(
        stdout.contains("vhost_user=true"),
        "prints the cloud-hypervisor line: {stdout}"
    );
}

#[test]
fn a_third_frontend_is_refused_while_two_are_connected() {
    let dir = tempfile::tempdir().unwrap();
    make_image(&dir.path().join("origin.img"), 4 * MIB, 10);
    let d = serve(dir.path(), &["--num-queues", "1"]);
    let mut first = Client::connect(&d.socket, 1);
    assert_eq!(first.write(0, 0, &[7u8; 4096]), 0);
    // A second frontend connects (a migration's destination would: its rings start once
    // the first one's stop), but a third is one too many.
    let second = Client::connect(&d.socket, 1);
    let started = std::time::Instant::now();
    assert!(
        Client::try_connect(&d.socket, 1, false).is_err(),
        "third frontend refused"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "refused promptly, not left hanging"
    );
    // The first is unaffected, and once both leave the next one is served.
    assert_eq!(first.read(0, 0, 4096).unwrap(), vec![7u8; 4096]);
    drop(second);
    drop(first);
    let mut next = Client::connect(&d.socket, 1);
    assert_eq!(next.read(0, 0, 4096).unwrap(), vec![7u8; 4096]);
}
