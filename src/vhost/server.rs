//! Serving one device on a unix socket, connection after connection.
//!
//! A `VhostUserDaemon` serves a single frontend connection, so [`DeviceServer`] keeps the
//! listening socket and builds a fresh daemon (and backend) for each connection: a VM that
//! reboots, or a QEMU that is killed and restarted, is served again on the same path. Up to
//! [`MAX_FRONTENDS`] are connected at once: the VM's and, while the VM migrates to another
//! QEMU process on this host, the destination's, whose rings start only once the source's
//! are stopped (`handover.rs`). Each connection is waited for and torn down on a thread of
//! its own; the serving thread accepts, turns away a frontend too many, and runs the
//! connections' watchdogs.

use super::backend::{BlkBackend, ServeOptions, WATCH_EVERY};
use super::connection::{Connection, Service};
use super::error::ServeError;
use super::handover::Handover;
use super::sched::Scheduler;
use crate::device::BlockDevice;
use crate::sock::{self, bind_socket, Backoff};
use crate::sys;
use log::{info, warn};
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::ShutdownHandle;
use vmm_sys_util::eventfd::EventFd;

/// Frontends connected to one device at once: the VM's, and a migration's destination.
pub const MAX_FRONTENDS: usize = 2;

/// How long a new connection waits for one to end before it is refused as one too many.
const RECONNECT_GRACE: Duration = Duration::from_millis(500);

/// Waits up to `timeout` for `event` to be signalled.
fn wait_for_event(event: &EventFd, timeout: Duration) -> bool {
    let mut fds = [libc::pollfd {
        fd: event.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    matches!(sys::poll(&mut fds, Some(timeout)), Ok(n) if n > 0)
        && fds[0].revents & libc::POLLIN != 0
}

/// A connected frontend, as a stop sees it.
struct Frontend {
    id: u64,
    handle: ShutdownHandle,
    backend: Arc<BlkBackend>,
}

/// Tells a serving thread to stop, whether it is waiting for a frontend or serving some.
struct StopSignal {
    requested: AtomicBool,
    wake: EventFd,
    /// Signalled by each connection's thread when it is over.
    ended: EventFd,
    connections: Mutex<Vec<Frontend>>,
    next_id: AtomicU64,
}

/// How often a stop waiting for requests in flight says so.
const QUIESCE_WARN_EVERY: Duration = Duration::from_secs(5);

impl StopSignal {
    fn new() -> io::Result<Self> {
        Ok(StopSignal {
            requested: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_CLOEXEC)?,
            ended: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?,
            connections: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
        })
    }

    fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        let connections = self.lock();
        // Answer what was popped before any frontend sees the disconnect (see `quiesce`).
        // No deadline: disconnecting first would let a late answer make the frontend run
        // that request twice, and the stop waits for the workers to end anyway.
        for f in connections.iter() {
            while !f.backend.quiesce(QUIESCE_WARN_EVERY) {
                warn!("a stop is waiting for requests still running (a stalled file?)");
            }
        }
        for f in connections.iter() {
            f.handle.shutdown();
        }
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Frontend>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The backends of the frontends connected now.
    fn backends(&self) -> Vec<Arc<BlkBackend>> {
        self.lock().iter().map(|f| f.backend.clone()).collect()
    }
}

/// Whether frontends are connected.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// At least one.
    pub connected: AtomicBool,
    /// How many (at most [`MAX_FRONTENDS`]).
    pub frontends: AtomicUsize,
}

/// A device served on a socket by a background thread.
pub struct DeviceServer {
    path: PathBuf,
    stop: Arc<StopSignal>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<ConnectionStats>,
}

impl DeviceServer {
    /// Binds `path` and starts serving `device` on it, its requests scheduled by `sched`.
    pub fn start(
        name: &str,
        path: &Path,
        socket_mode: u32,
        device: Arc<dyn BlockDevice>,
        opts: ServeOptions,
        sched: Arc<Scheduler>,
    ) -> Result<Self, ServeError> {
        let listener = bind_socket(path, socket_mode)?;
        Self::serve_listener(name, path, listener, device, opts, sched)
    }

    /// Serves `device` on `listener`, a socket already listening at `path` (bound by us, or
    /// inherited: `--fd`, socket activation).
    pub fn serve_listener(
        name: &str,
        path: &Path,
        listener: UnixListener,
        device: Arc<dyn BlockDevice>,
        opts: ServeOptions,
        sched: Arc<Scheduler>,
    ) -> Result<Self, ServeError> {
        let stop = Arc::new(StopSignal::new().map_err(ServeError::Setup)?);
        let stats = Arc::new(ConnectionStats::default());
        let thread = {
            let (stop, stats, name) = (stop.clone(), stats.clone(), name.to_string());
            let socket = path.to_path_buf();
            std::thread::Builder::new()
                .name(format!("serve-{name}"))
                .spawn(move || {
                    let service = Service {
                        device,
                        opts,
                        sched,
                        handover: Arc::new(Handover::default()),
                        socket: Some(socket),
                    };
                    serve_loop(&name, Listener::from(listener), &service, &stop, &stats)
                })
                .map_err(ServeError::Setup)?
        };
        Ok(DeviceServer {
            path: path.into(),
            stop,
            thread: Some(thread),
            stats,
        })
    }

    /// Stops serving: disconnects every frontend after its in-flight requests, joins the
    /// worker threads and removes the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Stops serving if no frontend is connected; otherwise gives the server back, still
    /// serving. A frontend connecting at the same instant either counts as connected or is
    /// turned away before its first request, never disconnected mid-use.
    pub fn stop_unless_connected(mut self) -> Result<(), DeviceServer> {
        {
            let connections = self.stop.lock();
            if self.stats.connected.load(Ordering::SeqCst) {
                drop(connections);
                return Err(self);
            }
            self.stop.requested.store(true, Ordering::SeqCst);
        }
        self.shutdown();
        Ok(())
    }

    fn shutdown(&mut self) {
        self.stop.request();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if !sock::is_adopted(&self.path) {
            let _ = fs::remove_file(&self.path);
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tells the connected frontends, if any (two during a migration's handover), that the
    /// device's config space changed (its size). Whether one was told.
    pub fn config_changed(&self) -> bool {
        let connections = self.stop.lock();
        connections
            .iter()
            .fold(false, |told, f| f.backend.config_changed() | told)
    }
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

/// What the serving thread woke up for.
enum Event {
    Stop,
    /// A connection is over.
    Ended,
    /// A frontend waits in the listen queue.
    Pending,
    TimedOut,
}

/// Waits (up to `timeout`) for a stop, a connection's end or a new frontend, in that order.
fn next_event(listener: &Listener, stop: &StopSignal, timeout: Duration) -> Event {
    let pollfd = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [
        pollfd(stop.wake.as_raw_fd()),
        pollfd(stop.ended.as_raw_fd()),
        pollfd(listener.as_raw_fd()),
    ];
    match sys::poll(&mut fds, Some(timeout)) {
        Ok(0) => return Event::TimedOut,
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Event::TimedOut,
        Err(e) => {
            warn!("poll failed: {e}");
            return Event::Stop;
        }
    }
    if fds[0].revents != 0 || stop.requested() {
        return Event::Stop;
    }
    if fds[1].revents != 0 {
        let _ = stop.ended.read();
        return Event::Ended;
    }
    if fds[2].revents & libc::POLLIN != 0 {
        return Event::Pending;
    }
    // POLLERR/POLLNVAL on the socket: waiting again would spin.
    warn!("poll reported {:#x} on a listening socket", fds[2].revents);
    Event::Stop
}

/// Serves connection after connection, up to [`MAX_FRONTENDS`] at once, until a stop. A
/// connection that cannot be set up (out of fds, memory or threads) is turned away, and the
/// loop backs off (see [`Backoff`]): it never spins on a listener it cannot accept from.
fn serve_loop(
    name: &str,
    mut listener: Listener,
    service: &Service,
    stop: &Arc<StopSignal>,
    stats: &Arc<ConnectionStats>,
) {
    let mut backoff = Backoff::new(name);
    let mut waiters: Vec<JoinHandle<()>> = Vec::new();
    let mut watched = Instant::now();
    loop {
        reap(&mut waiters);
        if stop.requested() {
            break;
        }
        match next_event(&listener, stop, WATCH_EVERY) {
            Event::Stop => break,
            Event::Ended | Event::TimedOut => {}
            Event::Pending if stats.frontends.load(Ordering::SeqCst) >= MAX_FRONTENDS => {
                // A frontend that just hung up and reconnects can be seen before its old
                // connection is over: give one a moment to end before refusing the newcomer.
                if !wait_for_event(&stop.ended, RECONNECT_GRACE) {
                    warn!(
                        "{name}: refused a frontend: {MAX_FRONTENDS} are connected (a VM and \
                         its migration's destination)"
                    );
                    sock::drop_pending(sys::listener_fd(&listener));
                }
            }
            Event::Pending => match start_connection(name, &mut listener, service, stop, stats) {
                Ok(waiter) => {
                    waiters.extend(waiter);
                    backoff.succeeded();
                }
                Err(e) if e.is_setup() => {
                    if e.left_pending() {
                        sock::drop_pending(sys::listener_fd(&listener));
                    }
                    backoff.failed(&e, &stop.wake);
                }
                Err(e) => warn!("{name}: connection ended with an error: {e}"),
            },
        }
        if watched.elapsed() >= WATCH_EVERY {
            watched = Instant::now();
            for backend in stop.backends() {
                backend.watch();
            }
        }
    }
    // The stop quiesced and shut down every connection: wait for them to be torn down.
    for waiter in waiters {
        let _ = waiter.join();
    }
}

/// Joins the connection threads that are done.
fn reap(waiters: &mut Vec<JoinHandle<()>>) {
    let (done, running): (Vec<_>, Vec<_>) = waiters.drain(..).partition(|w| w.is_finished());
    *waiters = running;
    for w in done {
        if w.join().is_err() {
            warn!("{}", ServeError::WatcherPanicked);
        }
    }
}

/// A connection counted in the stop signal and the stats until it is over: dropping it (on
/// every way out of the connection's thread) takes it out and signals the serving thread.
struct Registered {
    id: u64,
    counted: bool,
    stop: Arc<StopSignal>,
    stats: Arc<ConnectionStats>,
}

impl Registered {
    /// The stop no longer needs to reach the connection (it is over).
    fn unlist(&self) {
        self.stop.lock().retain(|f| f.id != self.id);
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut connections = self.stop.lock();
        connections.retain(|f| f.id != self.id);
        if self.counted {
            let left = self.stats.frontends.fetch_sub(1, Ordering::SeqCst) - 1;
            self.stats.connected.store(left > 0, Ordering::SeqCst);
        }
        drop(connections);
        let _ = self.stop.ended.write(1);
    }
}

/// Accepts the pending frontend and serves it on a thread of its own (or, if no thread can
/// be started, on this one until it ends); returns that thread.
fn start_connection(
    name: &str,
    listener: &mut Listener,
    service: &Service,
    stop: &Arc<StopSignal>,
    stats: &Arc<ConnectionStats>,
) -> Result<Option<JoinHandle<()>>, ServeError> {
    let mut conn = Connection::new(name, service)?;
    conn.start(listener)?;
    let id = stop.next_id.fetch_add(1, Ordering::Relaxed);
    let mut registered = Registered {
        id,
        counted: false,
        stop: stop.clone(),
        stats: stats.clone(),
    };
    {
        // Under the connection lock, so `stop_unless_connected` sees either this frontend
        // connected or its own stop request honoured here, never neither.
        let mut connections = stop.lock();
        match conn.daemon().shutdown_handle() {
            Some(handle) if !stop.requested() => {
                if connections.is_empty() {
                    info!("{name}: frontend connected");
                } else {
                    info!(
                        "{name}: another frontend connected (a migration's destination: its \
                         rings start once the first one's are stopped)"
                    );
                }
                connections.push(Frontend {
                    id,
                    handle,
                    backend: conn.backend().clone(),
                });
                stats.frontends.fetch_add(1, Ordering::SeqCst);
                stats.connected.store(true, Ordering::SeqCst);
                registered.counted = true;
            }
            _ => conn.daemon().request_shutdown(),
        }
    }
    // The connection waits in a slot the thread takes it from, so that if the thread cannot
    // be started it is still here (and still counted) to be waited for on this one.
    let parked: Parked = Arc::new(Mutex::new(Some((conn, registered))));
    let spawned = if waiter_spawn_fails() {
        Err(io::Error::from_raw_os_error(libc::EAGAIN))
    } else {
        let (parked, name) = (parked.clone(), name.to_string());
        std::thread::Builder::new()
            .name(format!("wait-{name}"))
            .spawn(move || end_connection(&name, wait_parked(&parked)))
    };
    match spawned {
        Ok(waiter) => Ok(Some(waiter)),
        Err(e) => {
            warn!(
                "{name}: cannot start a thread to watch the connection ({e}); serving it \
                 anyway, and another frontend waits until it ends"
            );
            #[cfg(test)]
            WAITED_HERE.fetch_add(1, Ordering::SeqCst);
            end_connection(name, wait_parked(&parked));
            Ok(None)
        }
    }
}

/// How a connection ended: the connection, its registration and the library's verdict.
type Waited = (
    Connection,
    Registered,
    Result<(), vhost_user_backend::Error>,
);

/// Tears down a connection that is over and says how it ended.
fn end_connection(name: &str, waited: Option<Waited>) {
    let Some((conn, registered, result)) = waited else {
        warn!("{name}: {}", ServeError::DaemonLost);
        return;
    };
    registered.unlist();
    let backend = conn.backend().clone();
    // Dropping the connection frees any worker blocked on a frontend fd, then joins the queue
    // workers, so no request is in flight after this: its rings may be taken over.
    drop(conn);
    backend.release_rings();
    drop(backend);
    drop(registered);
    match result {
        // A frontend that goes away mid-message is an ordinary disconnect.
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => info!("{name}: frontend disconnected"),
        Err(e) => warn!(
            "{name}: connection ended with an error: {}",
            ServeError::from(e)
        ),
    }
}

/// A connection, parked for whichever thread waits for it to end.
type Parked = Arc<Mutex<Option<(Connection, Registered)>>>;

/// Takes the parked connection and waits for it to end, or `None` if another thread took it
/// (never: a failed spawn never runs its closure, and a running one is the only other taker).
fn wait_parked(parked: &Parked) -> Option<Waited> {
    let (mut conn, registered) = parked.lock().unwrap_or_else(|p| p.into_inner()).take()?;
    let result = conn.daemon().wait();
    Some((conn, registered, result))
}

/// Tests: pretend a connection's watcher thread cannot be started.
#[cfg(test)]
static FAIL_WAITER_SPAWN: AtomicBool = AtomicBool::new(false);
/// Tests: connections waited for on the serving thread for want of a watcher.
#[cfg(test)]
static WAITED_HERE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn waiter_spawn_fails() -> bool {
    #[cfg(test)]
    return FAIL_WAITER_SPAWN.load(Ordering::SeqCst);
    #[cfg(not(test))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::mock::MemDevice;
    use crate::testkit::blkio_client::Client;
    use vhost::VhostBackend;
    use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

    /// Writes 4 KiB of `byte` at offset 0 and reads them back.
    fn write_and_read(client: &mut Client, byte: u8) -> Vec<u8> {
        assert_eq!(client.write(0, 0, &[byte; 4096]), 0);
        client.read(0, 0, 4096).expect("read back")
    }

    /// Fails watcher spawns until dropped (also when the test panics), so that no other test
    /// of this binary runs without its watcher.
    struct FailWaiterSpawn;

    impl FailWaiterSpawn {
        fn new() -> Self {
            FAIL_WAITER_SPAWN.store(true, Ordering::SeqCst);
            FailWaiterSpawn
        }
    }

    impl Drop for FailWaiterSpawn {
        fn drop(&mut self) {
            FAIL_WAITER_SPAWN.store(false, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_connection_is_served_and_stopped_when_its_watcher_thread_cannot_start() {
        let _failing = FailWaiterSpawn::new();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("dev.sock");
        let device = Arc::new(MemDevice::new(1 << 20));
        let opts = ServeOptions {
            num_queues: 1,
            queue_size: 256,
            serial: "no-watcher".into(),
            logical_block_size: 512,
            read_only: false,
            poll: Duration::ZERO,
        };
        let sched = Arc::new(Scheduler::default());
        let server = DeviceServer::start("t", &socket, 0o600, device.clone(), opts, sched).unwrap();
        // Served, disconnected, served again.
        for byte in [0x11u8, 0x22] {
            let mut client = Client::connect(&socket, 1);
            assert_eq!(write_and_read(&mut client, byte), vec![byte; 4096]);
        }
        assert!(device.data.lock().unwrap()[..4096]
            .iter()
            .all(|&b| b == 0x22));
        // A stop with a frontend connected ends its connection instead of hanging.
        let mut client = Client::connect(&socket, 1);
        assert_eq!(write_and_read(&mut client, 0x33), vec![0x33; 4096]);
        let stopped = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(server);
            let _ = stopped.0.send(());
        });
        assert!(
            stopped.1.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the server did not stop within 10 s"
        );
        assert!(!socket.exists(), "the socket was removed");
        assert_eq!(
            WAITED_HERE.load(Ordering::SeqCst),
            3,
            "each connection was waited for on the serving thread"
        );
        drop(client);
    }

    /// A device that records the offset of every write and takes `delay` over each.
    struct Recording {
        inner: MemDevice,
        delay: Duration,
        writes: Mutex<Vec<u64>>,
    }

    impl BlockDevice for Recording {
        fn capacity(&self) -> u64 {
            self.inner.capacity()
        }
        fn read_vectored(&self, bufs: &mut [io::IoSliceMut<'_>], offset: u64) -> io::Result<()> {
            std::thread::sleep(self.delay);
            self.inner.read_vectored(bufs, offset)
        }
        fn write_vectored(&self, bufs: &[io::IoSlice<'_>], offset: u64) -> io::Result<()> {
            std::thread::sleep(self.delay);
            self.writes.lock().unwrap().push(offset);
            self.inner.write_vectored(bufs, offset)
        }
        fn flush(&self) -> io::Result<()> {
            self.inner.flush()
        }
        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            self.inner.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
            self.inner.write_zeroes(offset, len, unmap)
        }
        fn counters(&self) -> &crate::device::IoCounters {
            self.inner.counters()
        }
    }

    fn recording_server(delay: Duration) -> (tempfile::TempDir, DeviceServer, Arc<Recording>) {
        let dir = tempfile::tempdir().unwrap();
        let device = Arc::new(Recording {
            inner: MemDevice::new(1 << 20),
            delay,
            writes: Mutex::new(Vec::new()),
        });
        let opts = ServeOptions {
            num_queues: 1,
            queue_size: 256,
            serial: "handover".into(),
            logical_block_size: 512,
            read_only: false,
            poll: Duration::ZERO,
        };
        let sched = Arc::new(Scheduler::default());
        let socket = dir.path().join("dev.sock");
        let server = DeviceServer::start("t", &socket, 0o600, device.clone(), opts, sched);
        (dir, server.unwrap(), device)
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_second_frontends_rings_wait_until_the_first_ones_stop_and_a_third_is_refused() {
        use crate::testkit::frontend::{closed_within, RawFrontend};
        let (dir, server, _device) = recording_server(Duration::ZERO);
        let socket = dir.path().join("dev.sock");
        let mut source = RawFrontend::start(&socket).unwrap();
        assert_eq!(source.read(0, 8, 5 * SECOND), Some(0), "the source runs");
        // The destination connects and starts its ring: its request waits for the source's.
        let mut dest = RawFrontend::start(&socket).unwrap();
        assert_eq!(dest.read(8, 8, Duration::from_millis(500)), None, "waits");
        assert_eq!(server.stats.frontends.load(Ordering::SeqCst), 2);
        // A third frontend is one too many.
        let third = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        use std::os::fd::AsRawFd;
        assert!(closed_within(third.as_raw_fd(), 5 * SECOND), "refused");
        // The source stops its ring: the destination's request is served at once.
        let base = source.vu.get_vring_base(0).unwrap();
        assert_eq!(base, 1);
        assert!(dest.wait_used(5 * SECOND), "served once the source stopped");
        assert_eq!(dest.last_status(), 0);
        // The source's ring pops nothing now, even when kicked.
        source.offer(VIRTIO_BLK_T_IN, 0, 8).unwrap();
        source.kick.write(1).unwrap();
        assert!(!source.wait_used(Duration::from_millis(300)));
        // ... and it can go: the destination goes on alone.
        drop(source);
        assert_eq!(dest.read(16, 8, 5 * SECOND), Some(0));
    }

    #[test]
    fn a_second_vm_whose_rings_wait_in_vain_is_dropped_and_the_first_goes_on() {
        use crate::testkit::frontend::{closed_within, RawFrontend};
        use std::os::fd::AsRawFd;
        let (dir, _server, _device) = recording_server(Duration::ZERO);
        let socket = dir.path().join("dev.sock");
        let mut first = RawFrontend::start(&socket).unwrap();
        assert_eq!(first.read(0, 8, 5 * SECOND), Some(0));
        let mut second = RawFrontend::start(&socket).unwrap();
        second.offer(VIRTIO_BLK_T_IN, 8, 8).unwrap();
        second.kick.write(1).unwrap();
        let fd = second.vu.as_raw_fd();
        assert!(
            !closed_within(fd, super::super::handover::PATIENCE / 2),
            "waits a while: it may be a migration's destination"
        );
        assert!(
            closed_within(fd, 2 * super::super::handover::PATIENCE),
            "then dropped"
        );
        assert!(!second.wait_used(Duration::ZERO), "never served");
        assert_eq!(first.read(16, 8, 5 * SECOND), Some(0), "the first goes on");
    }

    #[test]
    fn a_handover_neither_loses_nor_repeats_a_request() {
        use crate::testkit::frontend::{RawFrontend, AVAIL, DESC, USED};
        // Each write takes 100 ms, so the source has requests in flight when it is stopped.
        let (dir, server, device) = recording_server(Duration::from_millis(100));
        let socket = dir.path().join("dev.sock");
        let mut source = RawFrontend::start(&socket).unwrap();
        // Four at once: the test frontend has room for four chains in flight.
        for i in 0..4u64 {
            source.offer(VIRTIO_BLK_T_OUT, i * 8, 8).unwrap();
        }
        source.kick.write(1).unwrap();
        // The destination connects while they run, its memory that of the source (what the
        // migration copies), its ring not started.
        let mut dest = RawFrontend::connect(&socket, 1).unwrap();
        while device.writes.lock().unwrap().is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
        // GET_VRING_BASE: answered only once every request popped is answered.
        let base = source.vu.get_vring_base(0).unwrap() as u16;
        let used = source.used_idx();
        assert_eq!(
            used, base,
            "every request popped was answered before the reply"
        );
        let done = device.writes.lock().unwrap().len();
        assert_eq!(done, usize::from(base));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            device.writes.lock().unwrap().len(),
            done,
            "nothing popped after"
        );
        // The destination starts where the source stopped and offers two more.
        dest.take_memory_of(&source).unwrap();
        dest.set_memory().unwrap();
        dest.setup_queue_at(DESC, AVAIL, USED, base).unwrap();
        for i in 4..6u64 {
            dest.offer(VIRTIO_BLK_T_OUT, i * 8, 8).unwrap();
        }
        dest.kick.write(1).unwrap();
        assert!(
            dest.wait_used(10 * SECOND),
            "the rest is served by the destination"
        );
        let mut writes = device.writes.lock().unwrap().clone();
        writes.sort_unstable();
        let want: Vec<u64> = (0..6).map(|i| i * 8 * 512).collect();
        assert_eq!(writes, want, "each write exactly once");
        drop(server);
    }
}
