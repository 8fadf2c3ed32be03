//! Real-guest test helpers shared by `tests/guest.rs` and `tests/guest_snapshots.rs`: the
//! guest's deterministic pattern, preparing the kernel/initramfs, running `qemu/run-guest.sh`
//! (to completion or in the background with a log to watch), and `snapblk serve` with its log
//! in a file.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;
pub const SECTOR: usize = 512;
/// Default num-queues of every guest disk.
pub const NUM_QUEUES: u32 = 2;
/// Default QEMU timeout of one guest run.
pub const GUEST_TIMEOUT_SECS: u32 = 240;

/// The pattern parameters passed to the guest (see `test_pattern` in qemu/guest-init.sh).
#[derive(Clone, Copy, Debug)]
pub struct Pattern {
    pub seed: u32,
    pub span_mib: u64,
    pub full_every: u64,
    pub full_offset: u64,
}

impl Pattern {
    pub fn guest_args(&self) -> Vec<String> {
        vec![
            format!("seed={}", self.seed),
            format!("span_mib={}", self.span_mib),
            format!("full_every={}", self.full_every),
            format!("full_offset={}", self.full_offset),
        ]
    }

    /// The 512 bytes the pattern puts in `sector`: one text line, padded with a fill letter.
    pub fn sector(&self, sector: u64) -> [u8; SECTOR] {
        pattern_sector(self.seed, sector)
    }

    /// `(first_sector, count)` extents the pattern covers, in the guest's order.
    pub fn extents(&self) -> Vec<(u64, u64)> {
        let full = |i: u64| self.full_every > 0 && i % self.full_every == self.full_offset;
        let mut v: Vec<(u64, u64)> = (0..self.span_mib)
            .map(|i| (i * 2048, if full(i) { 2048 } else { 8 }))
            .collect();
        let last = self.span_mib * 2048 - 8;
        if !full(self.span_mib - 1) && last > (self.span_mib - 1) * 2048 {
            v.push((last, 8));
        }
        v
    }

    pub fn covered_sectors(&self) -> u64 {
        self.extents().iter().map(|e| e.1).sum()
    }

    /// Writes the pattern into an image (host-side preparation, or the expected content).
    pub fn write_into(&self, img: &mut [u8]) {
        for (first, count) in self.extents() {
            for s in first..first + count {
                let off = s as usize * SECTOR;
                img[off..off + SECTOR].copy_from_slice(&self.sector(s));
            }
        }
    }

    /// Checks that `img` holds exactly the pattern: covered sectors match, all others are zero.
    pub fn check(&self, img: &[u8]) -> Result<(), String> {
        if !img.len().is_multiple_of(SECTOR) {
            return Err(format!("image size {} is not a multiple of 512", img.len()));
        }
        let sectors = (img.len() / SECTOR) as u64;
        let mut covered = vec![false; sectors as usize];
        let mut errors = Vec::new();
        for (first, count) in self.extents() {
            for s in first..first + count {
                if s >= sectors {
                    return Err(format!(
                        "pattern sector {s} beyond image of {sectors} sectors"
                    ));
                }
                covered[s as usize] = true;
                let got = &img[s as usize * SECTOR..(s as usize + 1) * SECTOR];
                if got != self.sector(s) {
                    errors.push(format!("sector {s}: got {:?}", preview(got)));
                }
            }
        }
        for (s, c) in covered.iter().enumerate() {
            let got = &img[s * SECTOR..(s + 1) * SECTOR];
            if !c && got.iter().any(|&b| b != 0) {
                errors.push(format!(
                    "sector {s} should be untouched (zero): got {:?}",
                    preview(got)
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            let n = errors.len();
            errors.truncate(5);
            Err(format!("{n} bad sectors, first: {}", errors.join("; ")))
        }
    }
}

/// The guest's pattern sector (`pattern_awk` in qemu/guest-init.sh):
/// `"SNAPBLK seed=%010d sector=%012d "` padded to 511 bytes with `'a' + (seed + s) % 26`,
/// then `\n`.
pub fn pattern_sector(seed: u32, sector: u64) -> [u8; SECTOR] {
    let head = format!("SNAPBLK seed={seed:010} sector={sector:012} ");
    let fill = b'a' + ((u64::from(seed) + sector) % 26) as u8;
    let mut out = [fill; SECTOR];
    out[..head.len()].copy_from_slice(head.as_bytes());
    out[SECTOR - 1] = b'\n';
    out
}

/// Fills `count` sectors from `first` of `img` with the pattern of `seed`.
pub fn fill_pattern(img: &mut [u8], seed: u32, first: u64, count: u64) {
    for s in first..first + count {
        let off = s as usize * SECTOR;
        img[off..off + SECTOR].copy_from_slice(&pattern_sector(seed, s));
    }
}

/// Describes the first difference between two equally long buffers (None if equal).
pub fn first_difference(got: &[u8], want: &[u8]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("length {} != {}", got.len(), want.len()));
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let s = i / SECTOR;
    let n = got
        .chunks(SECTOR)
        .zip(want.chunks(SECTOR))
        .filter(|(a, b)| a != b)
        .count();
    Some(format!(
        "{n} sectors differ, first: sector {s} (byte {i}): got {:?}, want {:?}",
        preview(&got[s * SECTOR..]),
        preview(&want[s * SECTOR..])
    ))
}

pub fn preview(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..48.min(b.len())]).into_owned()
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// True (after a loud notice) when the guest tests are explicitly disabled.
pub fn skip_guest(test: &str) -> bool {
    if std::env::var("SNAPBLK_SKIP_GUEST").as_deref() == Ok("1") {
        // Straight to stderr, past libtest's output capture, so the skip is always seen.
        let bar = "!".repeat(78);
        let _ = writeln!(
            std::io::stderr(),
            "\n{bar}\n!!! SKIPPED real-guest test {test}: SNAPBLK_SKIP_GUEST=1 is set\n{bar}\n"
        );
        return true;
    }
    false
}

/// Runs a qemu/ script, returning a descriptive error with its output if it fails.
fn run_script(name: &str) -> Result<(), String> {
    let path = repo().join("qemu").join(name);
    let out = Command::new("bash")
        .arg(&path)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed ({}):\n{}{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Fetches the guest kernel and builds the initramfs once per test binary; panics (fails
/// the test) with a clear message if QEMU or the kernel cannot be had.
pub fn prepare_guest() {
    static PREPARED: OnceLock<Result<(), String>> = OnceLock::new();
    let res = PREPARED.get_or_init(|| {
        let qemu = Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .map_err(|e| format!("qemu-system-x86_64 not runnable ({e})"))?;
        if !qemu.status.success() {
            return Err("qemu-system-x86_64 --version failed".into());
        }
        run_script("fetch-guest.sh")?;
        run_script("build-initramfs.sh")
    });
    if let Err(e) = res {
        panic!(
            "real-guest test cannot run: {e}\n\
             Install the host tools with qemu/install-host-deps.sh, or set SNAPBLK_SKIP_GUEST=1 \
             to skip these tests deliberately."
        );
    }
}

/// One guest test at a time per test binary: the machine has 2 cores and TCG is CPU-bound.
pub fn guest_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts a real-guest test: `None` when guest tests are disabled (after a loud notice);
/// otherwise the guest is prepared and the returned guard keeps other guests off the CPUs.
pub fn start_guest_test(test: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    if skip_guest(test) {
        return None;
    }
    prepare_guest();
    Some(guest_lock())
}

/// What run-guest.sh reported.
#[derive(Debug)]
pub struct GuestRun {
    pub success: bool,
    /// `PASS` or `FAIL` (empty if no result line).
    pub verdict: String,
    /// The result line's test name.
    pub test: String,
    /// The result line's key=value fields.
    pub fields: HashMap<String, String>,
    pub output: String,
}

impl GuestRun {
    pub fn field(&self, k: &str) -> &str {
        self.fields
            .get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("guest result has no field {k}:\n{}", self.output))
    }

    pub fn passed(&self, test: &str) -> bool {
        self.success && self.verdict == "PASS" && self.test == test
    }

    fn parse(success: bool, stdout: &str, output: String) -> GuestRun {
        let mut run = GuestRun {
            success,
            verdict: String::new(),
            test: String::new(),
            fields: HashMap::new(),
            output,
        };
        if let Some(line) = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with("SNAPBLK-RESULT: "))
        {
            let mut words = line["SNAPBLK-RESULT: ".len()..].split(' ');
            run.verdict = words.next().unwrap_or_default().to_string();
            run.test = words.next().unwrap_or_default().to_string();
            for w in words {
                if let Some((k, v)) = w.split_once('=') {
                    run.fields.insert(k.to_string(), v.to_string());
                }
            }
        }
        run
    }
}

/// Options of one run-guest.sh invocation.
#[derive(Clone, Debug)]
pub struct GuestOpts {
    pub timeout_secs: u32,
    pub num_queues: u32,
    /// `--reconnect-ms`: QEMU reconnects to a restarted backend.
    pub reconnect_ms: Option<u32>,
    /// `--qmp`: a QMP monitor on this unix socket.
    pub qmp: Option<PathBuf>,
    /// `--incoming`: a live migration's destination, listening at this URI.
    pub incoming: Option<String>,
}

impl Default for GuestOpts {
    fn default() -> Self {
        GuestOpts {
            timeout_secs: GUEST_TIMEOUT_SECS,
            num_queues: NUM_QUEUES,
            reconnect_ms: None,
            qmp: None,
            incoming: None,
        }
    }
}

fn guest_command(
    opts: &GuestOpts,
    sockets: &[&Path],
    log: &Path,
    test: &str,
    args: &[String],
    use_stdin: bool,
) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("qemu/run-guest.sh"))
        .arg("--no-prepare")
        .args(["--timeout", &opts.timeout_secs.to_string()])
        .args(["--num-queues", &opts.num_queues.to_string()])
        .arg("--log")
        .arg(log);
    if let Some(ms) = opts.reconnect_ms {
        cmd.args(["--reconnect-ms", &ms.to_string()]);
    }
    if use_stdin {
        cmd.arg("--stdin");
    }
    if let Some(qmp) = &opts.qmp {
        cmd.arg("--qmp").arg(qmp);
    }
    if let Some(uri) = &opts.incoming {
        cmd.args(["--incoming", uri]);
    }
    for s in sockets {
        cmd.arg(s);
    }
    cmd.arg("--").arg(test).args(args);
    cmd
}

/// Boots a guest running `test` and waits for its verdict.
pub fn run_guest(sockets: &[&Path], log: &Path, test: &str, args: &[String]) -> GuestRun {
    run_guest_with(&GuestOpts::default(), sockets, log, test, args)
}

pub fn run_guest_with(
    opts: &GuestOpts,
    sockets: &[&Path],
    log: &Path,
    test: &str,
    args: &[String],
) -> GuestRun {
    let started = Instant::now();
    let out = guest_command(opts, sockets, log, test, args, false)
        .output()
        .expect("run qemu/run-guest.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let output = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    eprintln!(
        "guest test {test} took {:.1} s:\n{output}",
        started.elapsed().as_secs_f64()
    );
    GuestRun::parse(out.status.success(), &stdout, output)
}

/// A guest booted in the background (`run-guest.sh --stdin`): its console log can be watched
/// while it runs and a line can be sent to its console. Killed on drop.
pub struct BackgroundGuest {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    pub log: PathBuf,
    test: String,
    started: Instant,
}

impl BackgroundGuest {
    pub fn start(
        opts: &GuestOpts,
        sockets: &[&Path],
        log: &Path,
        test: &str,
        args: &[String],
    ) -> BackgroundGuest {
        let mut child = guest_command(opts, sockets, log, test, args, true)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu/run-guest.sh");
        let stdin = child.stdin.take();
        BackgroundGuest {
            child: Some(child),
            stdin,
            log: log.to_path_buf(),
            test: test.to_string(),
            started: Instant::now(),
        }
    }

    /// The console log so far, without carriage returns.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let mut b = Vec::new();
            let _ = f.read_to_end(&mut b);
            s = String::from_utf8_lossy(&b).replace('\r', "");
        }
        s
    }

    /// Waits until a console line starts with `prefix` (returns it) or `timeout` passes or
    /// the guest ends (panics with the log).
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .log_text()
                .lines()
                .find(|l| l.starts_with(prefix))
                .map(str::to_string)
            {
                return l;
            }
            let ended = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if ended.is_some() || Instant::now() >= deadline {
                panic!(
                    "guest never printed {prefix:?} (guest ended: {ended:?}); console log:\n{}",
                    tail(&self.log_text(), 60)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one line to the guest's console.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("guest stdin");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .expect("write to the guest console");
    }

    /// Waits for run-guest.sh to end and returns the guest's verdict.
    pub fn wait(mut self) -> GuestRun {
        drop(self.stdin.take());
        let child = self.child.take().expect("guest running");
        let out = child.wait_with_output().expect("wait for run-guest.sh");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let output = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        eprintln!(
            "guest test {} took {:.1} s:\n{output}",
            self.test,
            self.started.elapsed().as_secs_f64()
        );
        GuestRun::parse(out.status.success(), &stdout, output)
    }
}

impl Drop for BackgroundGuest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // run-guest.sh is bash running timeout running QEMU; QEMU has the socket and the
            // image's memory, so kill the whole tree: QEMU first (children of `timeout`).
            kill_tree(c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// SIGKILLs the descendants of `pid` (deepest first), not `pid` itself.
pub fn kill_tree(pid: u32) {
    let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .collect::<Vec<_>>();
    for c in children {
        kill_tree(c);
        // SAFETY: kill(2) on a pid read from our own process tree.
        unsafe { libc::kill(c as libc::pid_t, libc::SIGKILL) };
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `snapblk serve ...` with stderr in a log file; killed on drop unless stopped.
pub struct Serve {
    child: Option<Child>,
    pub log: PathBuf,
    args: Vec<String>,
}

impl Serve {
    /// Starts `snapblk serve ARGS` (log appended to `log`) and waits for its "serving" line.
    pub fn start(args: &[String], log: &Path) -> Serve {
        let err = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open daemon log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_snapblk"))
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("spawn snapblk serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok));
            // Keep draining so the daemon never blocks on a full pipe.
            for _ in lines {}
        });
        let mut s = Serve {
            child: Some(child),
            log: log.to_path_buf(),
            args: args.to_vec(),
        };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(line)) if line.contains("serving") => s,
            other => {
                if let Some(mut c) = s.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                panic!(
                    "snapblk serve {args:?} did not start ({other:?}):\n{}",
                    s.log_text()
                );
            }
        }
    }

    /// Starts another daemon with the same arguments and log (after a stop or kill).
    pub fn restart(&self) -> Serve {
        Serve::start(&self.args, &self.log)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    pub fn log_text(&self) -> String {
        tail(&fs::read_to_string(&self.log).unwrap_or_default(), 60)
    }

    /// Sends `sig` without waiting for anything.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({sig}): {}", std::io::Error::last_os_error());
    }

    /// Sends `sig` and waits (up to 30 s) for the exit.
    pub fn signal_and_wait(&mut self, sig: i32) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(st)) => return st,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "snapblk did not exit after signal {sig}:\n{}",
                        self.log_text()
                    );
                }
            }
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
