//! The vhost-user "backend program conventions" and systemd: `--print-capabilities`,
//! `--socket-path`, an inherited listening socket (`--fd N`, and socket activation with
//! systemd's own `systemd-socket-activate`), readiness over `NOTIFY_SOCKET`, and the shipped
//! examples (the libvirt domain checked with `virt-xml-validate`).
//!
//! Needs systemd-socket-activate and virt-xml-validate (qemu/install-host-deps.sh).

use snapblk::testkit::blkio_client::Client;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_snapblk");

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0x5au8; 4 << 20]).unwrap();
    img
}

/// A process killed (SIGTERM, then SIGKILL) on drop.
struct Proc(Option<Child>);

impl Proc {
    fn stop(&mut self) -> Output {
        let child = self.0.take().expect("running");
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        child.wait_with_output().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(cmd: &mut Command) -> Proc {
    Proc(Some(
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")),
    ))
}

/// Waits for the service's `READY=1` on `notify`.
fn ready(notify: &UnixDatagram) -> String {
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("no readiness notification");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Reads the device's first 4 KiB through libblkio, retrying while the socket is not up.
fn first_block(socket: &Path) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Client::try_connect(socket, 1, false) {
            Ok(mut c) => return c.read(0, 0, 4096).expect("read"),
            Err(e) if Instant::now() > deadline => panic!("connect {}: {e:?}", socket.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn print_capabilities_prints_the_json_object() {
    for args in [
        &["--print-capabilities"][..],
        &["serve", "--print-capabilities"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["type"], "block", "{args:?}");
        assert_eq!(v["features"], serde_json::json!(["blk-file", "read-only"]));
    }
}

#[test]
fn socket_path_and_blk_file_are_accepted_and_readiness_is_notified_once_it_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let (socket, notify_path) = (dir.path().join("vm.sock"), dir.path().join("notify"));
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let mut daemon = spawn(
        Command::new(BIN)
            .args(["serve", "--blk-file"])
            .arg(&img)
            .arg("--socket-path")
            .arg(&socket)
            .env("NOTIFY_SOCKET", &notify_path),
    );
    let msg = ready(&notify);
    assert!(msg.contains("READY=1\n"), "{msg:?}");
    // Ready means the socket accepts: no retry needed.
    let mut c = Client::try_connect(&socket, 1, false).expect("accepts once ready");
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![0x5au8; 4096]);
    drop(c);
    assert!(daemon.stop().status.success());
    assert!(!socket.exists(), "a socket it bound is removed at exit");
}

#[test]
fn an_inherited_listening_socket_is_served_with_fd_and_left_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let socket = dir.path().join("vm.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    // Inherited across exec: no close-on-exec.
    rustix::io::fcntl_setfd(listener.as_fd(), rustix::io::FdFlags::empty()).unwrap();
    let fd = listener.as_raw_fd().to_string();
    let mut daemon = spawn(
        Command::new(BIN)
            .args(["serve", "--origin"])
            .arg(&img)
            .args(["--fd", &fd]),
    );
    drop(listener);
    assert_eq!(first_block(&socket), vec![0x5au8; 4096]);
    let out = daemon.stop();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("inherited socket"), "{log}");
    assert!(
        socket.exists(),
        "an inherited socket is its owner's: left in place"
    );
    // A descriptor that is not a listening socket is refused.
    let out = Command::new(BIN)
        .args(["serve", "--origin"])
        .arg(&img)
        .args(["--fd", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fd: descriptor 1"));
}

#[test]
fn systemd_socket_activation_starts_the_daemon_on_the_first_connection() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let (socket, notify_path) = (dir.path().join("vm.sock"), dir.path().join("notify"));
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let mut activator = spawn(
        Command::new("systemd-socket-activate")
            .arg("--listen")
            .arg(&socket)
            .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
            .arg("--setenv=RUST_LOG=info")
            .args([BIN, "serve", "--no-cache", "--origin"])
            .arg(&img),
    );
    // systemd-socket-activate execs the daemon in its place on the first connection, which
    // waits in the socket's queue until the daemon accepts it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(first_block(&socket), vec![0x5au8; 4096]);
    assert!(ready(&notify).contains("READY=1"));
    let out = activator.stop();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("inherited socket") && log.contains("LISTEN_FDS"),
        "{log}"
    );
    assert!(out.status.success(), "{log}");
}

#[test]
fn the_libvirt_domain_example_validates() {
    let xml = repo("docs/examples/libvirt-domain.xml");
    let out = Command::new("virt-xml-validate")
        .arg(&xml)
        .arg("domain")
        .output()
        .expect("virt-xml-validate (qemu/install-host-deps.sh installs libvirt-clients)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&xml).unwrap();
    for needle in [
        "type='vhostuser'",
        "<source type='memfd'/>",
        "<reconnect enabled='yes'",
    ] {
        assert!(text.contains(needle), "the example has {needle}");
    }
}

#[test]
fn the_systemd_units_serve_through_socket_activation_and_notify() {
    let service = std::fs::read_to_string(repo("docs/examples/snapblk.service")).unwrap();
    let socket = std::fs::read_to_string(repo("docs/examples/snapblk.socket")).unwrap();
    assert!(service.contains("Type=notify"));
    assert!(service.contains("ExecStart=/usr/local/bin/snapblk serve"));
    assert!(socket.contains("ListenStream="));
    // The unit's command line parses (run with --print-capabilities appended: no side effect).
    let exec = service
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart=/usr/local/bin/snapblk "))
        .unwrap();
    let args: Vec<&str> = exec.split_whitespace().collect();
    let out = Command::new(BIN)
        .args(&args)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
