//! Shared pieces of the integration tests: the daemon as a subprocess (the libblkio client and
//! the other fixtures are in `snapblk::testkit`).
#![allow(dead_code)]

pub mod guest;

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_snapblk");

/// A snapblk process, killed on drop so a failing test leaves nothing behind.
pub struct Daemon {
    pub child: Option<Child>,
    pub socket: PathBuf,
    /// Everything the daemon wrote to stderr so far (drained continuously so a chatty daemon
    /// never blocks on a full pipe).
    pub log: Arc<Mutex<String>>,
}

impl Daemon {
    /// Starts `snapblk serve ARGS` and waits for `socket` to accept connections.
    pub fn start<S: AsRef<OsStr>>(args: &[S], socket: &Path) -> Daemon {
        Self::start_in(None, args, socket)
    }

    /// Starts `snapblk serve ARGS` in directory `dir` (where its default paths lie).
    pub fn start_in<S: AsRef<OsStr>>(dir: Option<&Path>, args: &[S], socket: &Path) -> Daemon {
        Self::start_with(dir, &[], args, socket)
    }

    /// [`Daemon::start_in`] with extra environment variables.
    pub fn start_with<S: AsRef<OsStr>>(
        dir: Option<&Path>,
        env: &[(&str, &str)],
        args: &[S],
        socket: &Path,
    ) -> Daemon {
        let mut cmd = Command::new(BIN);
        // What the test asks for, not what the runner's environment happens to hold.
        cmd.env_remove(snapblk::cow::STAGE_ENV);
        cmd.envs(env.iter().copied());
        if let Some(dir) = dir {
            cmd.current_dir(dir);
        }
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("SNAPBLK_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .arg("serve")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn snapblk");
        let mut d = Daemon {
            child: Some(child),
            socket: socket.to_path_buf(),
            log: Default::default(),
        };
        d.drain_stderr();
        d.wait_until_serving();
        d
    }

    fn drain_stderr(&mut self) {
        if let Some(stderr) = self.child.as_mut().and_then(|c| c.stderr.take()) {
            let log = self.log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
    }

    /// What the daemon logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits for the "serving" line the daemon prints once its socket listens (a stale
    /// socket file may exist before that, so the file alone proves nothing).
    fn wait_until_serving(&mut self) {
        let stdout = self
            .child
            .as_mut()
            .unwrap()
            .stdout
            .take()
            .expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok);
            let _ = tx.send(first);
            // Keep draining so the daemon never blocks on a full pipe.
            for _ in lines {}
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Some(line)) if line.contains("serving") => {
                assert!(fs::symlink_metadata(&self.socket)
                    .map(|m| m.file_type().is_socket())
                    .unwrap_or(false));
            }
            other => {
                let _ = self.child.as_mut().unwrap().kill();
                let out = self.child.take().unwrap().wait_with_output().unwrap();
                // Give the drain thread a moment: stderr is usually in the log by now.
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "snapblk did not start serving ({other:?}): {}{}",
                    self.log_text(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends `sig` and waits for the exit; returns the status and stderr.
    pub fn signal_and_wait(&mut self, sig: i32) -> (ExitStatus, String) {
        let child = self.child.take().expect("daemon running");
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        unsafe { libc::kill(child.id() as i32, sig) };
        let out = child.wait_with_output().expect("wait for snapblk");
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Sends `sig` and waits up to `within` for the exit; returns the status and what the
    /// daemon logged. A daemon that does not exit in time is killed and the test fails.
    pub fn signal_and_wait_within(&mut self, sig: i32, within: Duration) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        unsafe { libc::kill(child.id() as i32, sig) };
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait for snapblk") {
                return (status, self.log_text());
            }
            if start.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "snapblk ignored signal {sig} for {within:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// CPU time (user and system) the daemon has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // The fields after the command name (which ends with the last ')').
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat(5), 12 and 13 here.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf only reads a configuration value.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// Waits up to `within` for the fd and thread counts to be `fds` and `threads`; returns
    /// the counts last seen.
    pub fn settle_to(&self, fds: usize, threads: usize, within: Duration) -> (usize, usize) {
        let start = std::time::Instant::now();
        loop {
            let now = (self.fd_count(), self.thread_count());
            if now == (fds, threads) || start.elapsed() > within {
                return now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn fd_count(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    pub fn thread_count(&self) -> usize {
        fs::read_dir(format!("/proc/{}/task", self.pid()))
            .unwrap()
            .count()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            // A failing test shows what the daemon logged.
            if let Ok(out) = c.wait_with_output() {
                if std::thread::panicking() {
                    eprintln!(
                        "--- snapblk stderr ---\n{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
    }
}

/// `snapblk serve` of `dir/origin.img` on `dir/origin.sock`, with `extra` arguments.
pub fn serve_origin(dir: &Path, extra: &[&str]) -> Daemon {
    let img = dir.join("origin.img");
    let sock = dir.join("origin.sock");
    let mut args = vec![
        "--origin",
        img.to_str().unwrap(),
        "--socket",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Daemon::start(&args, &sock)
}

/// The arguments of `snapblk serve` that most tests start from: the origin `origin` (a path or
/// a URI) on the vhost-user socket `sock`, the control socket `ctl`, `queues` queues; then
/// `extra`.
pub fn serve_args(
    origin: &str,
    sock: &Path,
    ctl: &Path,
    queues: u32,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = ["--origin", origin, "--socket", path_str(sock)]
        .into_iter()
        .chain(["--control", path_str(ctl), "--num-queues"])
        .map(str::to_string)
        .collect();
    args.push(queues.to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A test path as an argument (tests make their paths UTF-8).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 test path")
}

/// Runs `snapblk ARGS --control CTL`: (success, stdout, stderr).
pub fn cli(ctl: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--control")
        .arg(ctl)
        .output()
        .expect("run snapblk");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`cli`] that must succeed: its standard output.
pub fn cli_ok(ctl: &Path, args: &[&str]) -> String {
    let (ok, out, err) = cli(ctl, args);
    assert!(ok, "snapblk {args:?} failed: {err}{out}");
    out
}

/// Makes a raw image of `len` bytes filled with a recognizable pattern.
pub fn make_image(path: &Path, len: usize, seed: u8) -> Vec<u8> {
    let data = pattern(len, seed);
    fs::write(path, &data).unwrap();
    data
}

/// Deterministic bytes: every 8 bytes hold their offset xor a seed.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, chunk) in v.chunks_mut(8).enumerate() {
        let word = ((i as u64) * 8) ^ (u64::from(seed) << 56) ^ 0x5a5a_0000_0000;
        let b = word.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    v
}
