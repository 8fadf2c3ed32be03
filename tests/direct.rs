//! Block devices and direct I/O through the real binary: loop devices as the origin and as the
//! cache object, `--direct` with guest buffers in place or bounced (counted in `stats`), the
//! io_uring engine (a guest's queue depth reaching the device) and its synchronous fallback.
//! Loop-device tests need root (CI has it) and skip, saying so, without it.

mod support;

use serde_json::Value;
use snapblk::testkit::blkio_client::{Client, REQUEST_TIMEOUT};
use snapblk::testkit::loopdev::LoopDevice;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use support::{cli_ok, make_image, path_str, pattern, serve_args, Daemon};

const MIB: usize = 1 << 20;

/// A scratch directory on a disk file system (O_DIRECT works there; tmpfs may refuse it).
fn disk_dir() -> tempfile::TempDir {
    let base = if Path::new("/var/tmp").is_dir() {
        "/var/tmp"
    } else {
        "/tmp"
    };
    tempfile::Builder::new()
        .prefix("snapblk-direct")
        .tempdir_in(base)
        .unwrap()
}

struct Paths {
    sock: PathBuf,
    ctl: PathBuf,
}

impl Paths {
    fn in_dir(dir: &Path) -> Paths {
        Paths {
            sock: dir.join("origin.sock"),
            ctl: dir.join("ctl.sock"),
        }
    }

    fn start(&self, origin: &Path, cache: Option<&Path>, extra: &[&str]) -> Daemon {
        Daemon::start(&self.args(origin, cache, extra), &self.sock)
    }

    fn start_with_env(&self, env: (&str, &str), origin: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_with(None, &[env], &self.args(origin, None, extra), &self.sock)
    }

    fn args(&self, origin: &Path, cache: Option<&Path>, extra: &[&str]) -> Vec<String> {
        let mut args = serve_args(path_str(origin), &self.sock, &self.ctl, 1, &[]);
        if let Some(c) = cache {
            args.extend(["--cache".to_string(), path_str(c).to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn ok(&self, args: &[&str]) -> String {
        cli_ok(&self.ctl, args)
    }

    /// The origin's I/O counters from `stats --json`.
    fn origin_io(&self) -> Value {
        let v: Value = serde_json::from_str(&self.ok(&["stats", "--json"])).unwrap();
        v["devices"]["origin"].clone()
    }
}

/// The daemon's log once it holds `needle` (it is read from a pipe, a little behind), or as it
/// is after 5 s.
fn log_with(d: &Daemon, needle: &str) -> String {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let log = d.log_text();
        if log.contains(needle) || std::time::Instant::now() > until {
            return log;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn counter(io: &Value, name: &str) -> u64 {
    io[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {io}"))
}

#[test]
fn loop_devices_serve_as_origin_and_cache_object_with_their_block_size() {
    let Some(origin) = LoopDevice::attach(32 * MIB as u64, 512) else {
        return;
    };
    let Some(cache) = LoopDevice::attach(64 * MIB as u64, 4096) else {
        return;
    };
    let golden = pattern(32 * MIB, 5);
    std::fs::write(origin.backing(), &golden).unwrap();
    let dir = disk_dir();
    let p = Paths::in_dir(dir.path());
    let d = p.start(origin.path(), Some(cache.path()), &[]);
    let log = log_with(&d, "created cache object");
    assert!(
        log.contains("created cache object"),
        "a blank device is made a cache object: {log}"
    );
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.capacity(), 32 * MIB as u64, "BLKGETSIZE64, not 'empty'");
    // The cache device's 4 KiB sectors are the unit the devices are served in.
    assert_eq!(c.blkio.get_i32("request-alignment").unwrap(), 4096);
    assert_eq!(
        c.read(0, 3 * MIB as u64, 8192).unwrap(),
        golden[3 * MIB..3 * MIB + 8192]
    );

    p.ok(&[
        "snapshot",
        "create",
        "before",
        "--socket",
        dir.path().join("s.sock").to_str().unwrap(),
    ]);
    let new = pattern(MIB, 6);
    assert_eq!(c.write(0, 3 * MIB as u64, &new), 0);
    assert_eq!(c.write_zeroes(0, 8 * MIB as u64, MIB as u64, false), 0);
    assert_eq!(c.discard(0, 12 * MIB as u64, MIB as u64), 0);
    assert_eq!(c.flush(0), 0);
    let mut s = Client::try_connect(&dir.path().join("s.sock"), 1, true).unwrap();
    assert_eq!(
        s.read(0, 3 * MIB as u64, MIB).unwrap(),
        golden[3 * MIB..4 * MIB],
        "snapshot keeps the old data"
    );
    assert_eq!(
        s.read(0, 8 * MIB as u64, MIB).unwrap(),
        golden[8 * MIB..9 * MIB]
    );
    assert_eq!(c.read(0, 3 * MIB as u64, MIB).unwrap(), new);
    assert_eq!(
        c.read(0, 8 * MIB as u64, MIB).unwrap(),
        vec![0; MIB],
        "BLKZEROOUT"
    );
    drop((c, s));
    drop(d);

    // Restarted on the same devices, the cache object is found again, the snapshot in it.
    let d = p.start(origin.path(), Some(cache.path()), &[]);
    assert!(
        !d.log_text().contains("created cache object"),
        "{}",
        d.log_text()
    );
    let list = p.ok(&["snapshot", "list", "--json"]);
    assert!(list.contains("\"before\""), "{list}");
    let on_disk = std::fs::read(origin.backing()).unwrap();
    assert_eq!(
        on_disk[3 * MIB..4 * MIB],
        new[..],
        "written to the origin device"
    );
}

#[test]
fn a_block_device_origin_needs_a_cache_path_or_no_cache() {
    let Some(origin) = LoopDevice::attach(8 * MIB as u64, 512) else {
        return;
    };
    let dir = disk_dir();
    let p = Paths::in_dir(dir.path());
    let out = std::process::Command::new(support::BIN)
        .arg("serve")
        .args(p.args(origin.path(), None, &[]))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--cache"), "{err}");
    // Alone, with direct I/O: the raw device as it is.
    let args = [
        "--origin",
        origin.arg(),
        "--socket",
        p.sock.to_str().unwrap(),
        "--no-cache",
        "--direct",
    ];
    let d = Daemon::start(&args, &p.sock);
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.capacity(), 8 * MIB as u64);
    let data = pattern(64 * 1024, 3);
    assert_eq!(c.write(0, 4096, &data), 0);
    assert_eq!(c.read(0, 4096, data.len()).unwrap(), data);
    assert_eq!(c.flush(0), 0);
    assert_eq!(
        std::fs::read(origin.backing()).unwrap()[4096..4096 + data.len()],
        data[..]
    );
}

/// Reads `len` bytes at `offset` into queue 0's buffer space `shift` bytes in.
fn read_at_shift(c: &mut Client, offset: u64, len: usize, shift: usize) -> Vec<u8> {
    let p = c.buf(0).wrapping_add(shift);
    c.queues[0].read(offset, p, len, 0, blkio::ReqFlags::empty());
    assert_eq!(c.complete(0), 0);
    c.buf_slice(0, shift + len)[shift..].to_vec()
}

/// Writes `data` at `offset` from queue 0's buffer space `shift` bytes in.
fn write_at_shift(c: &mut Client, offset: u64, data: &[u8], shift: usize) {
    c.buf_slice(0, shift + data.len())[shift..].copy_from_slice(data);
    let p = c.buf(0).wrapping_add(shift);
    c.queues[0].write(offset, p, data.len(), 0, blkio::ReqFlags::empty());
    assert_eq!(c.complete(0), 0);
}

/// Unaligned guest buffers go through a bounce buffer, aligned ones are used in place; both
/// engines, both counted; the data is right either way, also around a snapshot.
#[test]
fn direct_io_uses_aligned_guest_buffers_in_place_and_bounces_the_rest() {
    for engine in ["io_uring", "sync"] {
        let dir = disk_dir();
        let img = dir.path().join("origin.img");
        let golden = make_image(&img, 16 * MIB, 4);
        let p = Paths::in_dir(dir.path());
        let d = p.start(&img, None, &["--direct", "--io-engine", engine]);
        let mut c = Client::connect(&d.socket, 1);
        let before = p.origin_io();

        // 4 aligned reads and writes, 3 that are not (the memory is off by a few bytes).
        assert_eq!(
            read_at_shift(&mut c, 0, 8192, 0),
            golden[..8192],
            "{engine}"
        );
        assert_eq!(
            read_at_shift(&mut c, MIB as u64, 4096, 1),
            golden[MIB..MIB + 4096],
            "{engine}"
        );
        assert_eq!(
            read_at_shift(&mut c, 2 * MIB as u64, 4096, 2),
            golden[2 * MIB..2 * MIB + 4096]
        );
        let a = pattern(4096, 21);
        let b = pattern(8192, 22);
        write_at_shift(&mut c, 4 * MIB as u64, &a, 0);
        write_at_shift(&mut c, 5 * MIB as u64, &b, 3);
        assert_eq!(
            read_at_shift(&mut c, 4 * MIB as u64, 4096, 0),
            a,
            "{engine}"
        );
        assert_eq!(
            read_at_shift(&mut c, 5 * MIB as u64, 8192, 0),
            b,
            "{engine}"
        );
        let io = p.origin_io();
        let aligned = counter(&io, "aligned") - counter(&before, "aligned");
        let bounced = counter(&io, "bounced") - counter(&before, "bounced");
        assert_eq!((aligned, bounced), (4, 3), "{engine}: {io}");
        if engine == "io_uring" {
            assert!(counter(&io, "peak_in_flight") >= 1, "{engine}: {io}");
        } else {
            assert_eq!(counter(&io, "peak_in_flight"), 0, "{engine}: no ring: {io}");
        }

        // With a snapshot, origin writes copy the old data out first (not through the ring).
        let snap = dir.path().join("s.sock");
        p.ok(&[
            "snapshot",
            "create",
            "s",
            "--socket",
            snap.to_str().unwrap(),
        ]);
        write_at_shift(&mut c, 5 * MIB as u64, &pattern(8192, 23), 0);
        write_at_shift(&mut c, 9 * MIB as u64, &pattern(4096, 24), 1);
        assert_eq!(c.flush(0), 0);
        let mut s = Client::try_connect(&snap, 1, true).unwrap();
        assert_eq!(s.read(0, 5 * MIB as u64, 8192).unwrap(), b, "{engine}");
        assert_eq!(
            s.read(0, 9 * MIB as u64, 4096).unwrap(),
            golden[9 * MIB..9 * MIB + 4096]
        );
        assert_eq!(c.read(0, 9 * MIB as u64, 4096).unwrap(), pattern(4096, 24));
        drop((c, s));
        drop(d);
        let on_disk = std::fs::read(&img).unwrap();
        assert_eq!(
            on_disk[5 * MIB..5 * MIB + 8192],
            pattern(8192, 23)[..],
            "{engine}"
        );
    }
}

/// With `--direct` the daemon says which engine it chose; without io_uring (here: disabled by
/// the environment, as seccomp or `io_uring_disabled` would) it says it falls back, and serves.
#[test]
fn the_engine_is_chosen_at_start_and_the_fallback_is_logged() {
    let dir = disk_dir();
    let img = dir.path().join("origin.img");
    let golden = make_image(&img, 4 * MIB, 8);
    let p = Paths::in_dir(dir.path());
    let probe = snapblk::vhost::probe_io_uring();
    let d = p.start(&img, None, &["--direct"]);
    let log = log_with(&d, "I/O engine");
    match &probe {
        Ok(()) => assert!(log.contains("I/O engine: io_uring"), "{log}"),
        Err(_) => assert!(log.contains("io_uring is not available"), "{log}"),
    }
    drop(d);
    let d = p.start_with_env(("SNAPBLK_NO_IO_URING", "1"), &img, &["--direct"]);
    let log = log_with(&d, "SNAPBLK_NO_IO_URING");
    assert!(
        log.contains("io_uring is not available") && log.contains("SNAPBLK_NO_IO_URING"),
        "{log}"
    );
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(
        c.read(0, MIB as u64, 4096).unwrap(),
        golden[MIB..MIB + 4096]
    );
    assert_eq!(
        counter(&p.origin_io(), "peak_in_flight"),
        0,
        "the synchronous engine"
    );
    drop(c);
    drop(d);
    // Buffered, `auto` keeps the synchronous engine (the page cache's fastest).
    let d = p.start(&img, None, &[]);
    let log = log_with(&d, "I/O engine: sync");
    assert!(log.contains("I/O engine: sync"), "{log}");
}

/// Submits `n` 4 KiB reads at once on queue 0 and waits for all of them.
fn read_burst(c: &mut Client, n: usize, first: u64) {
    let offsets: Vec<u64> = (0..n).map(|i| first + (i * 4096 * 7) as u64).collect();
    read_burst_at(c, &offsets, "a read failed");
}

/// Submits a 4 KiB read at each of `offsets` at once on queue 0, into consecutive 4 KiB of its
/// buffer, and waits for all of them.
fn read_burst_at(c: &mut Client, offsets: &[u64], failed: &str) {
    for (i, &off) in offsets.iter().enumerate() {
        let p = c.buf(0).wrapping_add(i * 4096);
        c.queues[0].read(off, p, 4096, 0, blkio::ReqFlags::empty());
    }
    wait_burst(c, offsets.len(), failed);
}

/// Waits until the `n` requests submitted on queue 0 completed, each successfully.
fn wait_burst(c: &mut Client, n: usize, failed: &str) {
    let mut done: Vec<_> = (0..n)
        .map(|_| MaybeUninit::<blkio::Completion>::uninit())
        .collect();
    let mut got = 0;
    while got < n {
        let mut timeout = REQUEST_TIMEOUT;
        let k = c.queues[0]
            .do_io(&mut done[got..], n - got, Some(&mut timeout), None)
            .expect("do_io");
        assert!(k > 0, "the burst did not complete");
        for slot in &done[got..got + k] {
            // SAFETY: do_io initialized the first k completions from `got` on.
            assert_eq!(unsafe { slot.assume_init_ref() }.ret, 0, "{failed}");
        }
        got += k;
    }
}

/// A guest's queue depth reaches the device: 32 requests made available at once are in the
/// queue's io_uring together (the synchronous engine never has more than its batch).
#[test]
fn thirty_two_requests_are_in_flight_at_once_with_io_uring() {
    if let Err(e) = snapblk::vhost::probe_io_uring() {
        eprintln!("skipped: no io_uring here: {e}");
        return;
    }
    let dir = disk_dir();
    let img = dir.path().join("origin.img");
    make_image(&img, 32 * MIB, 2);
    let p = Paths::in_dir(dir.path());
    let mut d = p.start(&img, None, &["--direct"]);
    let mut c = Client::connect(&d.socket, 1);
    for round in 0..20u64 {
        read_burst(&mut c, 32, round * 4096);
    }
    let peak = counter(&p.origin_io(), "peak_in_flight");
    assert!(peak >= 24, "at most {peak} requests in flight at once");
    // Stopped cleanly, its rings let go of the origin: a new daemon may lock it at once.
    let (status, log) = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{log}");
    drop(c);
    let d = p.start(&img, None, &["--direct", "--io-engine", "sync"]);
    let mut c = Client::connect(&d.socket, 1);
    read_burst(&mut c, 32, 0);
    assert_eq!(counter(&p.origin_io(), "peak_in_flight"), 0);
}

/// A snapshot's reads under `--direct` go to the device from the queue's io_uring too (the
/// guest's queue depth reaches it, `cow/direct.rs`), and each returns the snapshot's view:
/// read through to the origin, its own blocks, and the origin's preserved copies while another
/// client overwrites the origin under it.
#[test]
fn a_snapshots_reads_go_through_io_uring_and_keep_its_view() {
    if let Err(e) = snapblk::vhost::probe_io_uring() {
        eprintln!("skipped: no io_uring here: {e}");
        return;
    }
    let dir = disk_dir();
    let img = dir.path().join("origin.img");
    let size = 16 * MIB;
    let mut want = make_image(&img, size, 2);
    let p = Paths::in_dir(dir.path());
    let d = p.start(&img, None, &["--direct"]);
    let wsock = dir.path().join("w.sock");
    p.ok(&[
        "snapshot",
        "create",
        "w",
        "--writable",
        "--socket",
        path_str(&wsock),
    ]);
    let mut w = Client::connect(&wsock, 1);
    // Blocks of w's own: a whole chunk, and part of one (filled from the origin).
    for (off, len, byte) in [(MIB, 64 << 10, 0xab), (3 * MIB + 4096, 8192, 0xcd)] {
        let data = vec![byte; len];
        assert_eq!(w.write(0, off as u64, &data), 0);
        want[off..off + len].copy_from_slice(&data);
    }
    // Meanwhile the origin is overwritten: its old chunks are preserved for w.
    let osock = d.socket.clone();
    let writer = std::thread::spawn(move || {
        let mut o = Client::connect(&osock, 1);
        for k in 0..(8 * MIB) / (64 << 10) {
            assert_eq!(o.write(0, (k * (64 << 10)) as u64, &[0xee; 64 << 10]), 0);
        }
    });
    let n = 32;
    for round in 0..60usize {
        let offsets: Vec<u64> = (0..n)
            .map(|i| (((round * n + i) * 4096 * 5) % size) as u64)
            .collect();
        read_burst_at(&mut w, &offsets, "a snapshot read failed");
        let got = w.buf_slice(0, n * 4096).to_vec();
        for (i, &off) in offsets.iter().enumerate() {
            let off = off as usize;
            assert!(
                got[i * 4096..(i + 1) * 4096] == want[off..off + 4096],
                "round {round}: w at {off:#x} is not its view"
            );
        }
    }
    writer.join().unwrap();
    let v: Value = serde_json::from_str(&p.ok(&["stats", "--json"])).unwrap();
    let peak = counter(&v["devices"]["w"], "peak_in_flight");
    assert!(peak >= 24, "w: at most {peak} reads in flight at once: {v}");
    assert!(
        w.read(0, 0, 8 * MIB).unwrap() == want[..8 * MIB],
        "w after the origin writes"
    );
}

/// Submits one 4 KiB write per entry of `writes` (offset, data) at once on queue 0 and waits
/// until all of them completed successfully.
fn write_burst(c: &mut Client, writes: &[(u64, Vec<u8>)]) {
    for (i, (off, data)) in writes.iter().enumerate() {
        let p = c.buf(0).wrapping_add(i * 4096);
        // SAFETY: the client's buffer of queue 0 holds QUEUE_BUF (4 MiB) bytes, and no
        // request is in flight on it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        c.queues[0].write(*off, p, data.len(), 0, blkio::ReqFlags::empty());
    }
    wait_burst(c, writes.len(), "a write failed");
}

/// 32 first-touch 4 KiB origin writes, one in each chunk from `first` on, with data of `seed`.
fn first_touches(first: u64, seed: u8) -> Vec<(u64, Vec<u8>)> {
    (0..32u64)
        .map(|k| {
            let c = first + k;
            let off = c * CHUNK + (c % 16) * 4096;
            (off, pattern(4096, seed.wrapping_add(k as u8)))
        })
        .collect()
}

const CHUNK: u64 = 64 * 1024;

/// Asserts that no process holds a lock on any of `files`.
fn assert_unlocked(files: &[&Path]) {
    use snapblk::storage::lock::{lock_file, LockKind};
    for f in files {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(f)
            .unwrap();
        assert!(
            lock_file(&file, LockKind::Exclusive, "").is_ok(),
            "{} is still locked after the daemon was killed",
            f.display()
        );
    }
}

/// The batched first-touch path under `--direct`: 32 origin writes in flight at once (on the
/// I/O pool while the queue goes on), each copying its chunk out for a snapshot, share their
/// commits (group commit), and a SIGKILL
/// right after a second such burst (completed, not flushed) loses nothing it must keep: the
/// snapshot reads its point-in-time data at every chunk, the flushed writes are there, and
/// every unflushed block holds either its old or its new data. The cache object checks clean.
#[test]
fn batched_first_touch_writes_under_direct_io_survive_sigkill() {
    if let Err(e) = snapblk::vhost::probe_io_uring() {
        eprintln!("skipped: no io_uring here: {e}");
        return;
    }
    let dir = disk_dir();
    let img = dir.path().join("origin.img");
    let cache = dir.path().join("origin.cache");
    let old = make_image(&img, 16 * MIB, 3);
    let snap_sock = dir.path().join("s.sock");
    let p = Paths::in_dir(dir.path());
    let mut d = p.start(&img, Some(&cache), &["--direct"]);
    p.ok(&[
        "snapshot",
        "create",
        "s",
        "--socket",
        snap_sock.to_str().unwrap(),
    ]);
    let mut c = Client::connect(&d.socket, 1);
    let flushed = first_touches(0, 0x10);
    write_burst(&mut c, &flushed);
    assert_eq!(c.flush(0), 0);
    let unflushed = first_touches(64, 0x80);
    write_burst(&mut c, &unflushed);
    let st: Value = serde_json::from_str(&p.ok(&["stats", "--json"])).unwrap();
    let (copies, commits) = (
        counter(&st["cache"], "copies"),
        counter(&st["cache"], "commits"),
    );
    assert_eq!(copies, 64, "one copy-out per first touch");
    // Under --direct the copies are staged and their commits write them in runs.
    let copy_writes = counter(&st["cache"], "copy_writes");
    assert!(
        (1..copies / 4).contains(&copy_writes),
        "{copy_writes} writes of staged copies for {copies} copies"
    );
    // Group commit: copy-outs in flight together share a commit (measured: 4 to 7 commits
    // here, the snapshot's creation and the flush included); one per copy-out would be 66.
    assert!(
        commits <= copies / 4,
        "{commits} commits for {copies} copy-outs in two bursts of 32: no group commit"
    );
    let (_, log) = d.signal_and_wait(libc::SIGKILL);
    drop(c);
    // The kernel tears a killed process's rings down after it, asynchronously: the files they
    // registered are second opens without the locks, which went with the process.
    assert_unlocked(&[&img, &cache]);

    let d = p.start(&img, Some(&cache), &["--direct"]);
    let mut c = Client::connect(&d.socket, 1);
    let now = c.read(0, 0, 16 * MIB).expect("read the origin");
    let mut want = old.clone();
    for (off, data) in &flushed {
        let o = *off as usize;
        want[o..o + 4096].copy_from_slice(data);
    }
    for (off, data) in &unflushed {
        let o = *off as usize;
        let got = &now[o..o + 4096];
        assert!(
            got == &data[..] || got == &old[o..o + 4096],
            "block at {off} holds neither its old nor its new data\n{log}"
        );
        want[o..o + 4096].copy_from_slice(got);
    }
    assert!(
        now == want,
        "the origin lost a flushed write or changed elsewhere"
    );
    let mut s = Client::try_connect(&snap_sock, 1, true).expect("connect to the snapshot");
    let snap = s.read(0, 0, 16 * MIB).expect("read the snapshot");
    for (k, (a, b)) in snap
        .chunks(CHUNK as usize)
        .zip(old.chunks(CHUNK as usize))
        .enumerate()
    {
        assert!(
            a == b,
            "the snapshot's chunk {k} lost its point-in-time data"
        );
    }
    drop((c, s, d));
    // Killed again, the snapshot's ring (which registered the cache object too) still alive
    // in the kernel: the checker may open it at once.
    assert_unlocked(&[&img, &cache]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_snapblk"))
        .args(["check", cache.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
