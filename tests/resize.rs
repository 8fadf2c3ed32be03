//! `snapblk resize`: devices grown and shrunk at run time through the real CLI, a connected
//! vhost-user frontend told on its backend request channel (the config-change message, then
//! GET_CONFIG with the new capacity), libblkio clients reading and writing the new range,
//! sizes across a restart. The real-guest test is in `tests/guest_resize.rs`.

mod support;

use serde_json::Value;
use snapblk::testkit::blkio_client::Client;
use snapblk::testkit::frontend::RawFrontend;
use snapblk::testkit::loopdev::LoopDevice;
use snapblk::testkit::nbd;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::{make_image, path_str, Daemon};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;

const MIB: u64 = 1 << 20;

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        make_image(&dir.path().join("origin.img"), (4 * MIB) as usize, 3);
        Setup { dir }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn serve(&self) -> Daemon {
        let ctl = self.p("ctl.sock");
        let extra = ["--control", ctl.to_str().unwrap(), "--num-queues", "1"];
        support::serve_origin(self.dir.path(), &extra)
    }

    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        support::cli(&self.p("ctl.sock"), args)
    }

    fn ok(&self, args: &[&str]) -> String {
        support::cli_ok(&self.p("ctl.sock"), args)
    }

    /// Creates the writable snapshot `name` of the origin, served on `NAME.sock`.
    fn writable_snapshot(&self, name: &str) -> PathBuf {
        let sock = self.p(&format!("{name}.sock"));
        self.ok(&[
            "snapshot",
            "create",
            name,
            "--writable",
            "--socket",
            path_str(&sock),
        ]);
        sock
    }

    fn size(&self, name: &str) -> u64 {
        let v: Value = serde_json::from_str(&self.ok(&["snapshot", "list", "--json"])).unwrap();
        let devs = v["devices"].as_array().unwrap();
        let d = devs.iter().find(|d| d["name"] == name).unwrap();
        d["size"].as_u64().unwrap()
    }
}

/// The capacity (sectors) a frontend reads from the config space.
fn capacity(f: &mut RawFrontend) -> u64 {
    let (_, config) =
        f.vu.get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
            .unwrap();
    u64::from_le_bytes(config[..8].try_into().unwrap())
}

/// Reads one message header from the backend request channel, within `timeout`.
fn backend_message(ch: &mut UnixStream, timeout: Duration) -> Option<[u8; 12]> {
    ch.set_read_timeout(Some(timeout)).unwrap();
    let mut hdr = [0u8; 12];
    ch.read_exact(&mut hdr).ok().map(|()| hdr)
}

/// A connected frontend that set up a backend request channel is sent the config-change
/// message after `snapblk resize`, and GET_CONFIG then reports the new capacity; sizes show
/// in `snapshot list`; bad sizes and a shrink without --force are refused with a reason.
#[test]
fn a_connected_frontend_is_told_and_reads_the_new_capacity() {
    let s = Setup::new();
    let _d = s.serve();
    let vm1 = s.writable_snapshot("vm1");
    let mut f =
        RawFrontend::connect_with(&vm1, 1, VhostUserProtocolFeatures::BACKEND_REQ, 0).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    f.vu.set_backend_request_fd(&theirs).unwrap();
    drop(theirs);
    let mut ours = ours;
    assert_eq!(capacity(&mut f), 4 * MIB / 512);
    let out = s.ok(&["resize", "vm1", "+4M"]);
    assert!(out.contains("resized vm1"), "{out}");
    assert!(out.contains("VM was told"), "{out}");
    let hdr = backend_message(&mut ours, Duration::from_secs(10)).expect("a message");
    assert_eq!(
        u32::from_le_bytes(hdr[..4].try_into().unwrap()),
        2,
        "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG"
    );
    assert_eq!(
        capacity(&mut f),
        8 * MIB / 512,
        "GET_CONFIG after the message"
    );
    assert_eq!(s.size("vm1"), 8 * MIB);
    assert_eq!(s.size("origin"), 4 * MIB, "the parent keeps its size");

    let (ok, _, err) = s.cli(&["resize", "vm1", "6M"]);
    assert!(!ok && err.contains("--force"), "{err}");
    let (ok, _, err) = s.cli(&["resize", "vm1", "1000"]);
    assert!(!ok && err.contains("multiple"), "{err}");
    let (ok, _, err) = s.cli(&["resize", "nope", "8M"]);
    assert!(!ok && err.contains("nope"), "{err}");
    let (ok, _, _) = s.cli(&["resize", "vm1", "+"]);
    assert!(!ok);
    assert_eq!(s.size("vm1"), 8 * MIB, "nothing changed");
    assert!(
        backend_message(&mut ours, Duration::from_millis(300)).is_none(),
        "no message for a refused resize"
    );
    s.ok(&["resize", "vm1", "6M", "--force"]);
    assert!(backend_message(&mut ours, Duration::from_secs(10)).is_some());
    assert_eq!(capacity(&mut f), 6 * MIB / 512);
}

/// `+SIZE` grows from the size the device has when the resize runs: growths asked at once
/// all count (none reads a size another is about to change).
#[test]
fn growths_asked_at_once_all_count() {
    let s = Setup::new();
    let _d = s.serve();
    s.writable_snapshot("vm1");
    let s = &s;
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(move || s.ok(&["resize", "vm1", "+1M"]));
        }
    });
    assert_eq!(s.size("vm1"), 12 * MIB, "4 MiB grown by 8 x 1 MiB");
    let (ok, _, err) = s.cli(&["resize", "vm1", "+1000"]);
    assert!(!ok && err.contains("multiple"), "{err}");
    assert_eq!(s.size("vm1"), 12 * MIB);
}

fn client(sock: &Path) -> Client {
    Client::connect(sock, 1)
}

/// The origin's file grows; a snapshot grown past it reads zeros in the new range and takes
/// writes there; a shrink with --force keeps what the snapshots hold; sizes and data survive
/// a restart; a client connected across a shrink gets an error past the new end.
#[test]
fn grown_devices_read_zeros_take_writes_and_keep_their_size_across_a_restart() {
    let s = Setup::new();
    let mut d = s.serve();
    let vm1 = s.writable_snapshot("vm1");
    s.ok(&["resize", "origin", "6M"]);
    assert_eq!(std::fs::metadata(s.p("origin.img")).unwrap().len(), 6 * MIB);
    s.ok(&["resize", "vm1", "12M"]);
    let mut c = client(&vm1);
    assert_eq!(c.capacity(), 12 * MIB);
    let original = c.read(0, 0, MIB as usize).unwrap();
    assert!(c
        .read(0, 4 * MIB, 8 * MIB as usize)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    assert_eq!(c.write(0, 11 * MIB, &[0x5au8; 4096]), 0);
    assert_eq!(c.flush(0), 0);
    drop(c);
    let mut o = client(&s.p("origin.sock"));
    assert_eq!(o.capacity(), 6 * MIB);
    assert!(o
        .read(0, 4 * MIB, 2 * MIB as usize)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    assert_eq!(o.write(0, 5 * MIB, &[0x11u8; 4096]), 0);
    drop(o);
    let before = s.ok(&["snapshot", "create", "before-shrink"]);
    assert!(before.contains("before-shrink"));
    // Shrink the origin while a client is connected to it: requests past the end fail.
    let mut o = client(&s.p("origin.sock"));
    s.ok(&["resize", "origin", "5M", "--force"]);
    assert_eq!(std::fs::metadata(s.p("origin.img")).unwrap().len(), 5 * MIB);
    assert_ne!(o.write(0, 5 * MIB, &[1u8; 4096]), 0, "past the new end");
    drop(o);
    let (status, _) = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success());
    let _d = s.serve();
    assert_eq!(s.size("origin"), 5 * MIB);
    assert_eq!(s.size("vm1"), 12 * MIB);
    assert_eq!(s.size("before-shrink"), 6 * MIB);
    let mut c = client(&vm1);
    assert_eq!(c.read(0, 0, MIB as usize).unwrap(), original);
    assert!(c
        .read(0, 11 * MIB, 4096)
        .unwrap()
        .iter()
        .all(|&b| b == 0x5a));
    assert!(c
        .read(0, 4 * MIB, 7 * MIB as usize)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    s.ok(&[
        "snapshot",
        "serve",
        "before-shrink",
        "--socket",
        s.p("b.sock").to_str().unwrap(),
    ]);
    let mut b = Client::try_connect(&s.p("b.sock"), 1, true).unwrap();
    assert!(
        b.read(0, 5 * MIB, 4096).unwrap().iter().all(|&x| x == 0x11),
        "the snapshot keeps the cut range"
    );
    let list = s.ok(&["snapshot", "list"]);
    assert!(list.contains("SIZE") && list.contains("12.0 MiB"), "{list}");
    // Devices of different sizes compare where both reach.
    let diff: Value =
        serde_json::from_str(&s.ok(&["snapshot", "diff", "origin", "vm1", "--json"])).unwrap();
    assert_eq!(diff["size"].as_u64(), Some(5 * MIB), "{diff}");
    // A new NBD connection sees the new size.
    let uri = nbd::uri(&s.p("origin.nbd.sock"), "vm1");
    let out = nbd::run(Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(out.trim(), (12 * MIB).to_string());
}

/// A block-device origin: the daemon cannot grow it, so a size beyond the device is refused
/// (saying to grow it first); after `losetup -c` the new size is accepted and served.
#[test]
fn a_block_device_origin_grows_only_as_far_as_the_device() {
    let Some(origin) = LoopDevice::attach(4 * MIB, 512) else {
        return;
    };
    let s = Setup::new();
    let (sock, ctl, cache) = (s.p("origin.sock"), s.p("ctl.sock"), s.p("cache.obj"));
    let args = support::serve_args(origin.arg(), &sock, &ctl, 1, &["--cache", path_str(&cache)]);
    let _d = Daemon::start(&args, &sock);
    let (ok, _, err) = s.cli(&["resize", "origin", "8M"]);
    assert!(!ok && err.contains("grow it first"), "{err}");
    std::fs::File::options()
        .write(true)
        .open(origin.backing())
        .and_then(|f| f.set_len(8 * MIB))
        .unwrap();
    let st = Command::new("losetup")
        .arg("-c")
        .arg(origin.path())
        .status()
        .unwrap();
    assert!(st.success(), "losetup -c");
    s.ok(&["resize", "origin", "8M"]);
    assert_eq!(s.size("origin"), 8 * MIB);
    let mut c = client(&sock);
    assert_eq!(c.capacity(), 8 * MIB);
    assert_eq!(c.write(0, 7 * MIB, &[0x33u8; 4096]), 0);
    assert_eq!(c.read(0, 7 * MIB, 4096).unwrap(), vec![0x33u8; 4096]);
    let (ok, _, err) = s.cli(&["resize", "origin", "16M"]);
    assert!(!ok && err.contains("8388608"), "{err}");
}
