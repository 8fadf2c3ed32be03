//! Remote origins for tests: [`FakeRemote`], an in-memory stand-in for an origin on an NBD
//! server (read-only, counting what is read from it, slow or failing on demand), and
//! [`NbdServer`], a real server process (`qemu-nbd`, `nbdkit` with its filters) serving an
//! image on a unix socket, killed on drop.

use super::storage::MemStorage;
use crate::storage::{RemoteStatus, Storage};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// An origin as a remote server would present it: read-only, holes reported (whole zero
/// sectors, unless `no_holes`), every read counted, optionally slow, and failing while
/// [`FakeRemote::set_failing`] says so (then `remote_status` says degraded).
#[derive(Debug, Default)]
pub struct FakeRemote {
    inner: MemStorage,
    /// Read requests and bytes read so far.
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    /// Block-status queries so far.
    pub allocation_queries: AtomicU64,
    failing: AtomicBool,
    no_holes: AtomicBool,
    delay: Mutex<Duration>,
}

impl FakeRemote {
    /// An origin holding `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self {
            inner: MemStorage::from_bytes(bytes),
            ..Default::default()
        }
    }

    /// Every request fails with EIO while `on` (the server is down).
    pub fn set_failing(&self, on: bool) {
        self.failing.store(on, Ordering::SeqCst);
    }

    /// Each read takes this long (a slow network).
    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap_or_else(|p| p.into_inner()) = d;
    }

    /// The server does not report holes (no `base:allocation`).
    pub fn set_no_holes(&self, on: bool) {
        self.no_holes.store(on, Ordering::SeqCst);
    }

    /// Changes the image behind the cache object's back (tests of its identity).
    pub fn tamper(&self, buf: &[u8], offset: u64) {
        let _ = self.inner.write_at(buf, offset);
    }

    fn check(&self) -> io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

impl Storage for FakeRemote {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = *self.delay.lock().unwrap_or_else(|p| p.into_inner());
        if !d.is_zero() {
            std::thread::sleep(d);
        }
        self.check()?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn set_size(&self, _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
    fn punch_hole(&self, _: u64, _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
    fn write_zeroes(&self, _: u64, _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
    fn allocation(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        self.check()?;
        self.allocation_queries.fetch_add(1, Ordering::Relaxed);
        if self.no_holes.load(Ordering::SeqCst) {
            return Ok((false, len));
        }
        self.inner.allocation(offset, len)
    }
    fn remote_status(&self) -> Option<RemoteStatus> {
        Some(RemoteStatus {
            uri: "fake://origin".into(),
            degraded: self.failing.load(Ordering::SeqCst),
            ..RemoteStatus::default()
        })
    }
}

/// The reads an nbdkit `--filter=log` logfile records, `(offset, count)` in order: what the
/// server was asked for, to check fetch-at-most-once from its side.
pub fn logged_reads(log: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let hex = |line: &str, key: &str| -> Option<u64> {
        let v = line.split(key).nth(1)?.split_whitespace().next()?;
        u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()
    };
    text.lines()
        .filter(|l| l.contains(" Read id=") && !l.contains("...Read"))
        .filter_map(|l| Some((hex(l, "offset=")?, hex(l, "count=")?)))
        .collect()
}

/// An NBD server process serving an image on a unix socket, killed on drop.
pub struct NbdServer {
    child: Option<Child>,
    pub socket: PathBuf,
    /// Its command, to start it again after [`NbdServer::kill`].
    cmd: Vec<String>,
}

impl NbdServer {
    /// `qemu-nbd -r` (read-only, persistent, up to 16 clients) serving `image` on `socket`.
    pub fn qemu_nbd(image: &Path, socket: &Path) -> NbdServer {
        let cmd = [
            "qemu-nbd",
            "-r",
            "-t",
            "-e",
            "16",
            "-f",
            "raw",
            "-k",
            &socket.display().to_string(),
            &image.display().to_string(),
        ];
        Self::start(cmd.iter().map(|s| s.to_string()).collect(), socket)
    }

    /// `nbdkit --exit-with-parent -r -U SOCKET [--filter F]... file IMAGE [ARGS]...`: the file
    /// plugin behind `filters` (e.g. `delay`, `error`, `stats`) with their `args`
    /// (`delay-read=1ms`, `error-rate=50%`, `statsfile=PATH`).
    pub fn nbdkit(image: &Path, socket: &Path, filters: &[&str], args: &[&str]) -> NbdServer {
        let mut cmd: Vec<String> = ["nbdkit", "--exit-with-parent", "-f", "-r", "-U"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        cmd.push(socket.display().to_string());
        for f in filters {
            cmd.push(format!("--filter={f}"));
        }
        cmd.push("file".into());
        cmd.push(image.display().to_string());
        cmd.extend(args.iter().map(|s| s.to_string()));
        Self::start(cmd, socket)
    }

    fn start(cmd: Vec<String>, socket: &Path) -> NbdServer {
        let _ = std::fs::remove_file(socket);
        let mut s = NbdServer {
            child: None,
            socket: socket.to_path_buf(),
            cmd,
        };
        s.restart();
        s
    }

    /// The `nbd+unix://` URI of its (default) export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Starts the server again (after [`NbdServer::kill`]) and waits for its socket.
    pub fn restart(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} (qemu/install-host-deps.sh installs it): {e}",
                    self.cmd[0]
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("{:?} exited at start: {st}", self.cmd);
            }
            assert!(Instant::now() < deadline, "{:?} did not listen", self.cmd);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and waits for it: its clients' connections break.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `sig` (SIGSTOP: the server hangs with its connections open; SIGCONT: it goes
    /// on).
    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
