//! The vhost-user "backend program conventions" (QEMU's docs/interop/vhost-user.rst) and the
//! systemd service protocols: `--print-capabilities`, a listening socket inherited with
//! `--fd N` or by socket activation (`LISTEN_FDS`), and readiness (`sd_notify`,
//! `Type=notify` units) once every socket accepts.

use super::CliError;
use crate::sock;
use crate::sys::inherit::inherited_listener;
use log::{info, warn};
use std::os::fd::RawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};

/// The capability object of a vhost-user-blk backend program: its device type and the
/// options of that type it accepts (`--blk-file`, `--read-only`).
pub const CAPABILITIES: &str = r#"{
  "type": "block",
  "features": [
    "blk-file",
    "read-only"
  ]
}"#;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// The listening socket the origin is served on, when inherited: `--fd N` (`fd`), else the
/// first of systemd's (`LISTEN_FDS`, for this process: `LISTEN_PID`). Returns its path, which
/// becomes the origin's socket path (`--socket`, which the other sockets' default paths sit
/// beside); the socket is served as it is and never removed. Nothing inherited (`None`):
/// `--socket` is bound as usual.
pub fn adopt_listener(fd: Option<RawFd>) -> Result<Option<PathBuf>, CliError> {
    let (fd, from) = match fd {
        Some(fd) => (fd, "--fd"),
        None => match systemd_fds() {
            Some(n) => {
                if n > 1 {
                    warn!("socket activation passed {n} sockets; serving the origin on the first");
                }
                (LISTEN_FDS_START, "LISTEN_FDS")
            }
            None => return Ok(None),
        },
    };
    let bad = |why: String| CliError::Usage(format!("{from}: descriptor {fd}: {why}"));
    let listener = inherited_listener(fd).map_err(|e| bad(e.to_string()))?;
    let addr = listener.local_addr().map_err(|e| bad(e.to_string()))?;
    let path = addr
        .as_pathname()
        .ok_or_else(|| bad("the socket has no path (abstract or unnamed)".into()))?
        .to_path_buf();
    info!(
        "serving the origin on inherited socket {} ({from})",
        path.display()
    );
    sock::adopt(&path, listener);
    Ok(Some(path))
}

/// How many sockets systemd passed to this process, if any.
fn systemd_fds() -> Option<usize> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    if pid != std::process::id() {
        return None;
    }
    std::env::var("LISTEN_FDS")
        .ok()?
        .parse()
        .ok()
        .filter(|&n| n > 0)
}

/// Tells the service manager the daemon is ready (every socket accepts): `READY=1` to
/// `$NOTIFY_SOCKET`, if set. Failures are logged, never fatal.
pub fn notify_ready() {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let msg = format!("READY=1\nMAINPID={}\n", std::process::id());
    if let Err(e) = notify(Path::new(&target), msg.as_bytes()) {
        warn!(
            "cannot notify readiness to {}: {e}",
            target.to_string_lossy()
        );
    }
}

fn notify(target: &Path, msg: &[u8]) -> std::io::Result<usize> {
    let sock = UnixDatagram::unbound()?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str());
    match bytes.strip_prefix(b"@") {
        // An abstract socket (Linux): `@name`.
        Some(name) => sock.send_to_addr(msg, &SocketAddr::from_abstract_name(name)?),
        None => sock.send_to(msg, target),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capabilities_are_the_json_object_the_conventions_describe() {
        let v: serde_json::Value = serde_json::from_str(CAPABILITIES).unwrap();
        assert_eq!(v["type"], "block");
        assert_eq!(v["features"], serde_json::json!(["blk-file", "read-only"]));
    }

    #[test]
    fn readiness_reaches_a_path_and_an_abstract_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        notify(&path, b"READY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
        let name = format!("snapblk-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        notify(Path::new(&format!("@{name}")), b"READY=1\n").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
    }
}
