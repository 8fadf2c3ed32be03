//! Live migration on one host: a QEMU (TCG) guest streams checksummed records to its snapblk
//! disk while QMP `migrate` moves it to a second QEMU started with `-incoming`; both QEMUs are
//! connected to the same device during the handover (the destination's rings start once the
//! source's are stopped). The guest finishes on the destination and checks every record
//! there (qemu/guest-init.sh `stream`: each record read back through the page cache, whose
//! pages the daemon wrote and the dirty log must have carried over; each slot holds its latest
//! generation, no I/O error in the kernel log). Before its last records the guest waits for
//! the host's word, sent to the destination once the migration completed, so the stream
//! always ends there. The host checks the disk's content and the records announced.
//!
//! Needs what tests/guest.rs needs (qemu/install-host-deps.sh); `SNAPBLK_SKIP_GUEST=1` skips.

mod support;

use serde_json::{json, Value};
use snapblk::testkit::blkio_client::Client;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::guest::{
    fill_pattern, first_difference, start_guest_test, tail, BackgroundGuest, GuestOpts, GuestRun,
    Serve, MIB, NUM_QUEUES,
};

const IMG_MIB: u64 = 16;

/// The guest's `stream` parameters: 96 records of 16 KiB, each in a slot of its own, so that
/// the final check from the page cache covers every record read back while the migration ran.
const BASE: u32 = 9000;
const RECORDS: u64 = 96;
const SLOTS: u64 = 96;
const REC_KIB: u64 = 16;
/// The migration starts after this record, its bandwidth limited so that it copies guest
/// memory for a few seconds while the guest writes and reads back at least [`DURING`] records.
const MIGRATE_AT: u64 = 3;
const DURING: usize = 5;
/// Before this record the guest waits for a line on its console, which the host sends to
/// the destination once the migration completed: the stream cannot end on the source.
const HOLD_AT: u64 = RECORDS - 16;

fn stream_args() -> Vec<String> {
    [
        ("disk", "vda".to_string()),
        ("base", BASE.to_string()),
        ("records", RECORDS.to_string()),
        ("slots", SLOTS.to_string()),
        ("rec_kib", REC_KIB.to_string()),
        ("snap_at", HOLD_AT.to_string()),
        ("snap_wait", "180".into()),
        ("readback", "1".into()),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={v}"))
    .collect()
}

/// `initial` with every record written, in order.
fn streamed(initial: &[u8]) -> Vec<u8> {
    let mut img = initial.to_vec();
    for g in 0..RECORDS {
        let sectors = REC_KIB * 2;
        fill_pattern(&mut img, BASE + g as u32, (g % SLOTS) * sectors, sectors);
    }
    img
}

/// The generations of a console log's `SNAPBLK-REC: gen=G slot=S` lines.
fn records_in(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("SNAPBLK-REC: gen="))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect()
}

/// A QMP monitor connection.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(60);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("QMP {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        Qmp::on(stream).unwrap_or_else(|e| panic!("QMP {}: {e}", path.display()))
    }

    /// A monitor on `stream`, once QEMU greeted and took `qmp_capabilities`.
    fn on(stream: UnixStream) -> io::Result<Qmp> {
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        q.line()?; // the greeting
        q.try_execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> io::Result<Value> {
        let mut l = String::new();
        if self.reader.read_line(&mut l)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "QMP closed"));
        }
        Ok(serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP said {l:?}: {e}")))
    }

    /// Runs a command; returns its `return`, panicking on an `error`. Events are skipped.
    fn execute(&mut self, cmd: &str, args: Value) -> Value {
        self.try_execute(cmd, args)
            .unwrap_or_else(|e| panic!("QMP {cmd}: {e}"))
    }

    /// [`Qmp::execute`], the monitor's end (QEMU gone) an error rather than a panic.
    fn try_execute(&mut self, cmd: &str, args: Value) -> io::Result<Value> {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.writer, "{msg}")?;
        loop {
            let r = self.line()?;
            if let Some(ret) = r.get("return") {
                return Ok(ret.clone());
            }
            assert!(r.get("error").is_none(), "QMP {cmd}: {r}");
        }
    }
}

/// A device served to a source QEMU and a destination QEMU.
struct Env {
    dir: tempfile::TempDir,
    initial: Vec<u8>,
    daemon: Serve,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let initial = support::pattern((IMG_MIB * MIB) as usize, 5);
        let p = |n: &str| dir.path().join(n);
        fs::write(p("golden.img"), &initial).expect("write image");
        let args = support::serve_args(
            support::path_str(&p("golden.img")),
            &p("origin.sock"),
            &p("ctl.sock"),
            NUM_QUEUES,
            &["--no-nbd"],
        );
        let daemon = Serve::start(&args, &dir.path().join("snapblk.log"));
        Env {
            dir,
            initial,
            daemon,
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ok(&self, args: &[&str]) -> String {
        support::cli_ok(&self.p("ctl.sock"), args)
    }

    fn connected(&self, name: &str) -> bool {
        let v: Value = serde_json::from_str(&self.ok(&["snapshot", "list", "--json"])).unwrap();
        v["devices"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["name"] == name))
            .map(|d| d["connected"] == true)
            .unwrap_or_else(|| panic!("no device {name}: {v}"))
    }

    /// Boots the source on `socket`, a destination waiting for it, and migrates the guest
    /// once it has flushed a few records. Returns (source, destination).
    fn migrate(&self, socket: &Path) -> (BackgroundGuest, BackgroundGuest) {
        let opts = |name: &str, incoming: Option<String>| GuestOpts {
            qmp: Some(self.p(&format!("{name}.qmp"))),
            incoming,
            ..GuestOpts::default()
        };
        let mig = format!("unix:{}", self.p("mig.sock").display());
        let args = stream_args();
        let mut src = BackgroundGuest::start(
            &opts("src", None),
            &[socket],
            &self.p("src.log"),
            "stream",
            &args,
        );
        let mut dst = BackgroundGuest::start(
            &opts("dst", Some(mig.clone())),
            &[socket],
            &self.p("dst.log"),
            "stream",
            &args,
        );
        src.wait_for_line(
            &format!("SNAPBLK-REC: gen={MIGRATE_AT} "),
            Duration::from_secs(180),
        );
        let mut qmp = Qmp::connect(&self.p("src.qmp"));
        let params = json!({ "max-bandwidth": 32 * MIB });
        qmp.execute("migrate-set-parameters", params);
        qmp.execute("migrate", json!({ "uri": mig }));
        let (started, mut during) = (records_in(&src.log_text()).len(), 0);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let st = qmp.execute("query-migrate", json!({}));
            match st["status"].as_str() {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => panic!(
                    "migration failed: {st}\n--- snapblk log ---\n{}",
                    self.daemon.log_text()
                ),
                _ if Instant::now() > deadline => panic!("migration never completed: {st}"),
                Some("active") => during = records_in(&src.log_text()).len(),
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        dst.send_line("go");
        assert!(
            during >= started + DURING,
            "the guest wrote records while its memory was copied ({started} before, {during} \
             by the last look while active)"
        );
        assert!(
            fs::read_to_string(self.p("snapblk.log"))
                .unwrap_or_default()
                .contains("another frontend connected"),
            "both QEMUs were connected at once:\n{}",
            self.daemon.log_text()
        );
        (src, dst)
    }

    /// The destination passed, with every record announced exactly once, in order, some by
    /// the source and the rest by the destination.
    fn check_run(&self, dst: GuestRun) {
        assert!(
            dst.passed("stream"),
            "the guest did not finish on the destination:\n{}\n--- snapblk log ---\n{}",
            dst.output,
            self.daemon.log_text()
        );
        assert_eq!(dst.field("written"), RECORDS.to_string());
        assert_eq!(dst.field("verified_slots"), SLOTS.to_string());
        let (src_log, dst_log) = (
            fs::read_to_string(self.p("src.log")).unwrap_or_default(),
            fs::read_to_string(self.p("dst.log")).unwrap_or_default(),
        );
        let (before, after) = (records_in(&src_log), records_in(&dst_log));
        assert!(
            before.len() > DURING && !after.is_empty(),
            "the migration happened mid-stream: {} records on the source, {} on the \
             destination\n{}",
            before.len(),
            after.len(),
            tail(&dst_log, 30)
        );
        let all: Vec<u64> = before.into_iter().chain(after).collect();
        assert_eq!(all, (0..RECORDS).collect::<Vec<_>>(), "every record once");
    }

    /// Waits until no VM is connected to `name`.
    fn wait_disconnected(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.connected(name) {
            assert!(Instant::now() < deadline, "{name} still connected");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn read_device(&self, sock: &Path) -> Vec<u8> {
        let mut c = Client::try_connect(sock, 1, false)
            .unwrap_or_else(|e| panic!("libblkio connect to {}: {e:?}", sock.display()));
        c.read(0, 0, (IMG_MIB * MIB) as usize)
            .unwrap_or_else(|e| panic!("read {}: errno {e}", sock.display()))
    }
}

/// The origin device: the source QEMU quits cleanly after the handover (its connection ends
/// while the destination's runs), and the image holds every record.
#[test]
fn a_guest_streaming_to_its_disk_migrates_to_another_qemu_and_finishes_there() {
    let Some(_one) = start_guest_test("migrate_origin") else {
        return;
    };
    let env = Env::new();
    let (src, dst) = env.migrate(&env.p("origin.sock"));
    // Quit the source, paused since the handover. Should it be gone already (seen once in CI,
    // not reproduced), say how it ended rather than only that its monitor was closed.
    let quit = UnixStream::connect(env.p("src.qmp"))
        .and_then(Qmp::on)
        .and_then(|mut q| q.try_execute("quit", json!({})));
    if let Err(e) = quit {
        panic!(
            "the source QEMU was gone before quit ({e}): {:?}",
            src.wait()
        );
    }
    let src = src.wait();
    assert!(src.verdict.is_empty(), "the source ran no further: {src:?}");
    env.check_run(dst.wait());
    env.wait_disconnected("origin");
    let log = fs::read_to_string(env.p("snapblk.log")).unwrap();
    assert_eq!(
        log.matches("frontend disconnected").count(),
        2,
        "both connections ended cleanly:\n{log}"
    );
    let mut daemon = env.daemon;
    assert!(daemon.signal_and_wait(libc::SIGTERM).success());
    let file = fs::read(env.dir.path().join("golden.img")).unwrap();
    if let Some(d) = first_difference(&file, &streamed(&env.initial)) {
        panic!("the image does not hold every record: {d}");
    }
}

/// A writable snapshot's device, the source QEMU SIGKILLed right after the handover: the
/// destination goes on alone; the snapshot holds every record and the origin none.
#[test]
fn a_guest_on_a_snapshot_migrates_and_the_source_killed_after_the_handover_costs_nothing() {
    let Some(_one) = start_guest_test("migrate_snapshot_kill") else {
        return;
    };
    let env = Env::new();
    let vm = env.p("vm.sock");
    env.ok(&[
        "snapshot",
        "create",
        "vm",
        "--writable",
        "--socket",
        vm.to_str().unwrap(),
    ]);
    let (src, dst) = env.migrate(&vm);
    drop(src); // SIGKILL
    env.check_run(dst.wait());
    env.wait_disconnected("vm");
    if let Some(d) = first_difference(&env.read_device(&vm), &streamed(&env.initial)) {
        panic!("the snapshot does not hold every record: {d}");
    }
    let origin = env.read_device(&env.p("origin.sock"));
    assert!(origin == env.initial, "the origin changed");
}
