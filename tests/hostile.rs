//! Hostile vhost-user frontends against the real daemon: raw frontends (the test kit's
//! `RawFrontend`, message by message) that abuse their kick and call fds, their memory
//! table and their rings. After each attack, on every kind of device (`--no-cache`,
//! `--read-only`, a cache object's origin, a read-only and a writable snapshot):
//! - a fresh libblkio client is served within a second of the attacker leaving;
//! - the daemon's fd and thread counts are back to what they were before the attack;
//! - with an attacker connected again, SIGTERM stops the daemon.

mod support;

use snapblk::testkit::blkio_client::Client;
use snapblk::testkit::frontend::{self as fe, RawFrontend};
use std::any::Any;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::{cli_ok as cli, make_image, Daemon};
use vmm_sys_util::eventfd::EventFd;

const MIB: usize = 1 << 20;
/// How soon a fresh client must be served once the attacker is gone.
const SERVED_WITHIN: Duration = Duration::from_secs(1);
/// How long an attacker's own requests may take (a loaded machine).
const PATIENCE: Duration = Duration::from_secs(10);
const VIRTIO_BLK_S_OK: u8 = 0;

/// A device under attack.
struct Device {
    socket: PathBuf,
    read_only: bool,
}

/// A daemon and the devices it serves.
struct Setup {
    _dir: tempfile::TempDir,
    daemon: Daemon,
    devices: Vec<Device>,
    control: Option<PathBuf>,
}

/// What an attack leaves behind: the connection and fds it keeps, dropped in two steps (the
/// connection first, then the rest: a frontend may hold its fds after it hangs up).
struct Attack {
    frontend: Option<RawFrontend>,
    kept: Vec<Box<dyn Any>>,
}

impl Attack {
    fn new(frontend: RawFrontend) -> Self {
        Attack {
            frontend: Some(frontend),
            kept: Vec::new(),
        }
    }

    fn keep(mut self, thing: impl Any) -> Self {
        self.kept.push(Box::new(thing));
        self
    }

    /// Hangs up, keeping the frontend's kick, call and memory fds open.
    fn hang_up(&mut self) {
        if let Some(f) = self.frontend.take() {
            let RawFrontend {
                vu,
                kick,
                call,
                file,
                mem,
                ..
            } = f;
            drop(vu);
            self.kept.push(Box::new((kick, call, file, mem)));
        }
    }
}

fn serve(dir: &Path, extra: &[&str]) -> Daemon {
    let mut args = vec!["--num-queues", "2"];
    args.extend_from_slice(extra);
    support::serve_origin(dir, &args)
}

fn no_cache() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    make_image(&dir.path().join("origin.img"), 4 * MIB, 1);
    let daemon = serve(dir.path(), &["--no-cache"]);
    let devices = vec![Device {
        socket: daemon.socket.clone(),
        read_only: false,
    }];
    Setup {
        _dir: dir,
        daemon,
        devices,
        control: None,
    }
}

fn read_only() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    make_image(&dir.path().join("origin.img"), 4 * MIB, 2);
    let ctl = dir.path().join("ctl.sock");
    let daemon = serve(
        dir.path(),
        &["--read-only", "--control", ctl.to_str().unwrap()],
    );
    let devices = vec![Device {
        socket: daemon.socket.clone(),
        read_only: true,
    }];
    Setup {
        _dir: dir,
        daemon,
        devices,
        control: Some(ctl),
    }
}

/// An origin with a cache object, a read-only and a writable snapshot, each on its socket.
fn with_snapshots() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    make_image(&dir.path().join("origin.img"), 4 * MIB, 3);
    let ctl = dir.path().join("ctl.sock");
    let daemon = serve(dir.path(), &["--control", ctl.to_str().unwrap()]);
    let mut devices = vec![Device {
        socket: daemon.socket.clone(),
        read_only: false,
    }];
    for (name, writable) in [("ro", false), ("rw", true)] {
        let socket = dir.path().join(format!("{name}.sock"));
        let mut args = vec![
            "snapshot",
            "create",
            name,
            "--socket",
            socket.to_str().unwrap(),
        ];
        if writable {
            args.push("--writable");
        }
        cli(&ctl, &args);
        devices.push(Device {
            socket,
            read_only: !writable,
        });
    }
    Setup {
        _dir: dir,
        daemon,
        devices,
        control: Some(ctl),
    }
}

/// Connects a libblkio client to `dev` and reads 4 KiB, retrying until `within` has passed
/// (the attacker's connection may still be ending: a second frontend is turned away).
fn served_within(dev: &Device, within: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let attempt = Client::try_connect(&dev.socket, 1, dev.read_only)
            .map_err(|e| e.to_string())
            .and_then(|mut c| c.read(0, 0, 4096).map_err(|e| format!("read: {e}")));
        match attempt {
            Ok(data) if data.len() == 4096 => return Ok(start.elapsed()),
            Ok(_) => return Err("short read".into()),
            Err(e) if start.elapsed() > within => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

impl Setup {
    /// Serves a client on every device once (threads made on first use exist after it);
    /// returns the daemon's fd and thread counts then.
    fn baseline(&self) -> (usize, usize) {
        for dev in &self.devices {
            served_within(dev, PATIENCE).unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        (self.daemon.fd_count(), self.daemon.thread_count())
    }

    /// Runs `attack` on every device and checks what the module promises; then attacks the
    /// first device again and stops the daemon with SIGTERM while the attacker is connected.
    fn survives(mut self, what: &str, attack: impl Fn(&Device, &Daemon) -> Attack) {
        let (fds, threads) = self.baseline();
        for (i, dev) in self.devices.iter().enumerate() {
            let mut a = attack(dev, &self.daemon);
            // Other devices are served while the attacker is connected.
            for other in self.devices.iter().filter(|d| d.socket != dev.socket) {
                served_within(other, PATIENCE)
                    .unwrap_or_else(|e| panic!("{what}: device {i} attacked, another: {e}"));
            }
            a.hang_up();
            let took = served_within(dev, SERVED_WITHIN).unwrap_or_else(|e| {
                panic!(
                    "{what}: device {i} not served within {SERVED_WITHIN:?}: {e}\n{}",
                    self.daemon.log_text()
                )
            });
            let settled = self.daemon.settle_to(fds, threads, Duration::from_secs(5));
            assert_eq!(
                settled,
                (fds, threads),
                "{what}: device {i}: fds and threads after the attack (served in {took:?})\n{}",
                self.daemon.log_text()
            );
            drop(a);
        }
        if let Some(ctl) = &self.control {
            cli(ctl, &["snapshot", "list"]);
        }
        let _attacker = attack(&self.devices[0], &self.daemon);
        let (status, log) = self
            .daemon
            .signal_and_wait_within(libc::SIGTERM, Duration::from_secs(10));
        assert!(status.success(), "{what}: exit status {status}:\n{log}");
    }
}

/// Runs `attack` against every kind of device.
fn on_every_device(what: &str, attack: impl Fn(&Device, &Daemon) -> Attack) {
    for setup in [no_cache as fn() -> Setup, read_only, with_snapshots] {
        setup().survives(what, &attack);
    }
}

fn start(dev: &Device) -> RawFrontend {
    RawFrontend::start(&dev.socket).expect("raw frontend set up")
}

/// A read through the raw frontend is answered OK.
fn read_ok(f: &mut RawFrontend) {
    assert_eq!(f.read(0, 8, PATIENCE), Some(VIRTIO_BLK_S_OK));
}

/// A pipe, both ends as files.
fn pipe() -> (File, File) {
    let (r, w) = std::io::pipe().unwrap();
    (File::from(OwnedFd::from(r)), File::from(OwnedFd::from(w)))
}

/// How much CPU the daemon burns in `period` (a spinning worker burns all of it).
fn cpu_during(d: &Daemon, period: Duration) -> Duration {
    let before = d.cpu_time();
    std::thread::sleep(period);
    d.cpu_time().saturating_sub(before)
}

#[test]
fn a_saturated_call_eventfd_costs_notifications_not_a_thread() {
    on_every_device("saturated call eventfd", |dev, _| {
        let mut f = start(dev);
        read_ok(&mut f);
        // One signal short of the counter's maximum: a blocking write would never return.
        let _ = f.call.read();
        f.call.write(u64::MAX - 1).unwrap();
        for _ in 0..4 {
            read_ok(&mut f);
        }
        Attack::new(f)
    });
}

#[test]
fn a_kick_fd_replaced_on_a_running_ring_leaves_no_stale_wakeups() {
    on_every_device("kick replaced", |dev, d| {
        let mut f = start(dev);
        read_ok(&mut f);
        // A new, blocking, kick eventfd; the frontend then kicks the old one.
        let old = std::mem::replace(&mut f.kick, EventFd::new(0).unwrap());
        f.set_kick_fd(f.kick.as_raw_fd()).unwrap();
        for _ in 0..100 {
            old.write(1).unwrap();
        }
        let burnt = cpu_during(d, Duration::from_millis(500));
        assert!(
            burnt < Duration::from_millis(250),
            "the daemon spins: {burnt:?}"
        );
        // The new kick works.
        read_ok(&mut f);
        Attack::new(f).keep(old)
    });
}

#[test]
fn a_frontend_reading_its_own_kick_first_costs_a_kick_not_a_thread() {
    on_every_device("kick stolen", |dev, _| {
        let mut f = start(dev);
        read_ok(&mut f);
        let stolen = f.kick.try_clone().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thief = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = stolen.read();
                }
            })
        };
        for _ in 0..500 {
            f.kick.write(1).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // A thief blocked in its read (if the daemon got there first) is let go.
        f.kick.write(1).unwrap();
        thief.join().unwrap();
        read_ok(&mut f);
        Attack::new(f)
    });
}

#[test]
fn a_full_or_half_written_call_pipe_costs_notifications_not_a_thread() {
    on_every_device("call pipe", |dev, _| {
        let mut f = start(dev);
        read_ok(&mut f);
        let (r, w) = pipe();
        snapblk::sys::set_nonblocking(w.as_fd()).unwrap();
        // Filled to 4 bytes short of full: no 8-byte signal fits; then blocking again.
        let mut filled = 0usize;
        while (&w).write(&[0u8; 4]).is_ok() {
            filled += 4;
        }
        assert!(filled > 0);
        let mut drain = [0u8; 4];
        std::io::Read::read_exact(&mut &r, &mut drain).unwrap();
        snapblk::sys::set_blocking(w.as_fd()).unwrap();
        f.set_call_fd(w.as_raw_fd()).unwrap();
        for _ in 0..4 {
            read_ok(&mut f);
        }
        Attack::new(f).keep((r, w))
    });
}

#[test]
fn a_full_or_half_written_kick_pipe_never_blocks_a_worker() {
    on_every_device("kick pipe", |dev, _| {
        let mut f = start(dev);
        let (r, w) = pipe();
        f.set_kick_fd(r.as_raw_fd()).unwrap();
        // Half an eventfd value per kick.
        for _ in 0..3 {
            f.offer(virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_IN, 0, 8)
                .unwrap();
            (&w).write_all(&[1, 2, 3, 4]).unwrap();
            assert!(f.wait_used(PATIENCE), "a half-written kick is a kick");
            assert_eq!(f.last_status(), VIRTIO_BLK_S_OK);
        }
        // A full pipe: drained without blocking, the request served.
        snapblk::sys::set_nonblocking(w.as_fd()).unwrap();
        f.offer(virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_IN, 0, 8)
            .unwrap();
        for _ in 0..64 {
            if (&w).write(&[7u8; 4096]).is_err() {
                break;
            }
        }
        assert!(f.wait_used(PATIENCE), "a full kick pipe is a kick");
        Attack::new(f).keep((r, w))
    });
}

#[test]
fn a_frontend_holds_no_more_memory_regions_than_the_slots_advertised() {
    on_every_device("memory slots", |dev, d| {
        let before = d.fd_count();
        let mut f = RawFrontend::connect(&dev.socket, 1).unwrap();
        let mut added = 0u64;
        for i in 0..600u64 {
            let file = fe::memory_file(4096).unwrap();
            // Distinct guest and frontend addresses; the file is the daemon's to keep.
            let user = 0x7000_0000_0000 + i * 4096;
            if f.add_region(i * 4096, 4096, user, &file).is_err() {
                break;
            }
            added += 1;
        }
        assert_eq!(added, 509, "regions accepted");
        assert!(
            fe::closed_within(f.vu.as_raw_fd(), PATIENCE),
            "the connection is dropped"
        );
        let now = d.fd_count();
        assert!(now <= before + 509 + 16, "{before} fds before, {now} after");
        Attack::new(f)
    });
}

#[test]
fn a_worker_blocked_on_a_frontend_fd_anyway_is_freed() {
    on_every_device("O_NONBLOCK cleared", |dev, _| {
        let mut f = start(dev);
        read_ok(&mut f);
        // The frontend clears O_NONBLOCK on the call eventfd it shares with the daemon and
        // saturates it: the next signal blocks the worker, until the watchdog frees it.
        let shared = f.call.try_clone().unwrap();
        let _ = f.call.read();
        // SAFETY: F_SETFL on an fd this test owns.
        unsafe { libc::fcntl(shared.as_raw_fd(), libc::F_SETFL, 0) };
        f.call.write(u64::MAX - 1).unwrap();
        read_ok(&mut f);
        read_ok(&mut f);
        Attack::new(f).keep(shared)
    });
}

/// Issue 13: a ring the daemon cannot read stops its queue once: no spin, no log flood.
fn unreadable_ring(dev: &Device, d: &Daemon, avail: u64) -> Attack {
    let mut f = RawFrontend::connect(&dev.socket, 1).unwrap();
    f.set_memory().unwrap();
    f.setup_queue(fe::DESC, avail, fe::USED).unwrap();
    // The avail index says three requests are there.
    vm_memory::Bytes::write_obj(&f.mem, 3u16, vm_memory::GuestAddress(avail + 2)).unwrap();
    for _ in 0..10 {
        f.kick.write(1).unwrap();
    }
    let burnt = cpu_during(d, Duration::from_millis(500));
    assert!(
        burnt < Duration::from_millis(250),
        "the daemon spins: {burnt:?}"
    );
    let log = d.log_text();
    let lines = log.lines().count();
    assert!(lines < 200, "{lines} lines of log:\n{log}");
    Attack::new(f)
}

#[test]
fn an_avail_ring_at_guest_address_0_stops_its_queue() {
    on_every_device("avail ring at 0", |dev, d| unreadable_ring(dev, d, 0));
}

#[test]
fn an_avail_ring_running_off_its_memory_stops_its_queue() {
    on_every_device("avail ring off the end", |dev, d| {
        unreadable_ring(dev, d, fe::MEM_SIZE - 4)
    });
}

#[test]
fn a_memory_file_shorter_than_its_region_is_refused() {
    on_every_device("short memory file", |dev, _| {
        let mut f = RawFrontend::connect(&dev.socket, 1).unwrap();
        f.file.set_len(fe::MEM_SIZE / 2).unwrap();
        assert!(f.set_memory().is_err(), "SET_MEM_TABLE refused");
        assert!(fe::closed_within(f.vu.as_raw_fd(), PATIENCE));
        // ADD_MEM_REG too, on a new connection.
        let mut f = RawFrontend::connect(&dev.socket, 1).unwrap();
        let short = fe::memory_file(4096).unwrap();
        assert!(f.add_region(0, 8192, 0x7000_0000_0000, &short).is_err());
        assert!(fe::closed_within(f.vu.as_raw_fd(), PATIENCE));
        Attack::new(f)
    });
}

#[test]
fn a_memory_file_shrunk_under_the_daemon_costs_the_connection_not_the_process() {
    on_every_device("memory file shrunk", |dev, _| {
        let mut f = start(dev);
        read_ok(&mut f);
        // The request is laid out first: past the new end the frontend cannot write either.
        f.offer(virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_IN, 0, 8)
            .unwrap();
        f.file.set_len(fe::HDR).unwrap();
        f.kick.write(1).unwrap();
        assert!(
            fe::closed_within(f.vu.as_raw_fd(), PATIENCE),
            "the connection is dropped"
        );
        Attack::new(f)
    });
}

/// Sets the daemon's soft limit on open fds to `n` (its hard limit stays).
fn set_fd_limit(d: &Daemon, n: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let pid = d.pid() as libc::pid_t;
    // SAFETY: prlimit on our own child, reading its limits into `old`.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0);
    let new = libc::rlimit {
        rlim_cur: n.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above, setting the soft limit only.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0);
}

#[test]
fn out_of_fds_a_device_turns_connections_away_and_releases_what_it_made() {
    use std::io::Read;
    let s = with_snapshots();
    let baseline = s.baseline();
    let (origin, snapshot) = (&s.devices[0], &s.devices[2]);
    // A VM on another device, connected before the daemon runs out of fds.
    let mut vm = Client::try_connect(&snapshot.socket, 1, false).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (fds, threads) = (s.daemon.fd_count(), s.daemon.thread_count());
    let (cpu, start) = (s.daemon.cpu_time(), Instant::now());
    // Every margin of fds fails a connection's setup at a different step (the backend's
    // eventfds, the library's epoll and threads, the accept, the connection's own fds).
    for margin in 0..16u64 {
        set_fd_limit(&s.daemon, (fds as u64) + margin);
        for _ in 0..2 {
            let mut c = std::os::unix::net::UnixStream::connect(&origin.socket).unwrap();
            c.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            // Turned away (end of file) or served (no answer to no message): both fine.
            let _ = c.read(&mut [0u8; 1]);
        }
        assert_eq!(
            vm.read(0, 0, 4096).map(|d| d.len()),
            Ok(4096),
            "margin {margin}"
        );
        set_fd_limit(&s.daemon, 1 << 20);
        let settled = s.daemon.settle_to(fds, threads, Duration::from_secs(5));
        assert_eq!(
            settled,
            (fds, threads),
            "margin {margin}: a failed setup left fds or threads behind\n{}",
            s.daemon.log_text()
        );
    }
    let burnt = s.daemon.cpu_time().saturating_sub(cpu);
    assert!(
        burnt < start.elapsed() / 2,
        "the daemon spun: {burnt:?} of CPU in {:?}",
        start.elapsed()
    );
    let log = s.daemon.log_text();
    // Logged once per burst (a margin is one at most), not once per failure.
    let count = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    let (bursts, errors) = (
        count("cannot set up a connection"),
        count("Too many open files"),
    );
    assert!(
        bursts <= 16 && errors < 50,
        "{bursts} bursts, {errors} lines about it:\n{log}"
    );
    // All served again: the device, the control socket.
    served_within(origin, SERVED_WITHIN).unwrap();
    cli(s.control.as_ref().unwrap(), &["snapshot", "list"]);
    drop(vm);
    let settled = s
        .daemon
        .settle_to(baseline.0, baseline.1, Duration::from_secs(5));
    assert_eq!(settled, baseline);
    let mut d = s.daemon;
    let (status, log) = d.signal_and_wait_within(libc::SIGTERM, Duration::from_secs(10));
    assert!(status.success(), "exit status {status}:\n{log}");
}
