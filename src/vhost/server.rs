//! Serving one device on a unix socket, connection after connection.
//!
//! A `VhostUserDaemon` serves a single frontend connection, so [`DeviceServer`] keeps the
//! listening socket and builds a fresh daemon (and backend) for each connection: a VM that
//! reboots, or a QEMU that is killed and restarted, is served again on the same path.

use super::backend::{BlkBackend, ServeOptions, WATCH_EVERY};
use super::connection::{Connection, Service};
use super::error::ServeError;
use super::sched::Scheduler;
use crate::device::BlockDevice;
use crate::sock::{self, bind_socket, wait_readable, Backoff, Wait};
use crate::sys;
use log::{info, warn};
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::ShutdownHandle;
use vmm_sys_util::eventfd::EventFd;

/// How long a new connection waits for the current one to end before it is refused.
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

/// Tells a serving thread to stop, whether it is waiting for a frontend or serving one.
struct StopSignal {
    requested: AtomicBool,
    wake: EventFd,
    connection: Mutex<Option<(ShutdownHandle, Arc<BlkBackend>)>>,
}

/// How often a stop waiting for requests in flight says so.
const QUIESCE_WARN_EVERY: Duration = Duration::from_secs(5);

impl StopSignal {
    fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        if let Some((handle, backend)) = self.lock().as_ref() {
            // Answer what was popped before the frontend sees the disconnect (see `quiesce`).
            // No deadline: disconnecting first would let a late answer make the frontend run
            // that request twice, and the stop waits for the workers to end anyway.
            while !backend.quiesce(QUIESCE_WARN_EVERY) {
                warn!("a stop is waiting for requests still running (a stalled file?)");
            }
            handle.shutdown();
        }
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(ShutdownHandle, Arc<BlkBackend>)>> {
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether a frontend is connected.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    pub connected: AtomicBool,
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
        let stop = Arc::new(StopSignal {
            requested: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_CLOEXEC).map_err(ServeError::Setup)?,
            connection: Mutex::new(None),
        });
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

    /// Stops serving: disconnects any frontend after its in-flight requests, joins the worker
    /// threads and removes the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Stops serving if no frontend is connected; otherwise gives the server back, still
    /// serving. A frontend connecting at the same instant either counts as connected or is
    /// turned away before its first request, never disconnected mid-use.
    pub fn stop_unless_connected(mut self) -> Result<(), DeviceServer> {
        {
            let connection = self.stop.lock();
            if self.stats.connected.load(Ordering::SeqCst) {
                drop(connection);
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

    /// Tells the connected frontend, if any, that the device's config space changed (its
    /// size). Whether one was told.
    pub fn config_changed(&self) -> bool {
        let connection = self.stop.lock();
        connection
            .as_ref()
            .is_some_and(|(_, backend)| backend.config_changed())
    }
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

/// Waits until the listener has a connection (true) or a stop was requested (false).
fn wait_for_connection(listener: &Listener, stop: &StopSignal) -> bool {
    !stop.requested() && wait_readable(listener.as_raw_fd(), &stop.wake) && !stop.requested()
}

/// Serves connection after connection until a stop. A connection that cannot be set up
/// (out of fds, memory or threads) is turned away, and the loop backs off (see [`Backoff`]):
/// it never spins on a listener it cannot accept from.
fn serve_loop(
    name: &str,
    mut listener: Listener,
    service: &Service,
    stop: &StopSignal,
    stats: &ConnectionStats,
) {
    let mut backoff = Backoff::new(name);
    while wait_for_connection(&listener, stop) {
        match serve_one(name, &mut listener, service, stop, stats) {
            Ok(()) => info!("{name}: frontend disconnected"),
            Err(e) if e.is_setup() => {
                if e.left_pending() {
                    sock::drop_pending(sys::listener_fd(&listener));
                }
                backoff.failed(&e, &stop.wake);
                continue;
            }
            Err(e) => warn!("{name}: connection ended with an error: {e}"),
        }
        backoff.succeeded();
    }
}

/// Clears the stop signal's handle and the connected flag when dropped.
struct ConnectionOver<'a> {
    stop: &'a StopSignal,
    stats: &'a ConnectionStats,
}

impl Drop for ConnectionOver<'_> {
    fn drop(&mut self) {
        *self.stop.lock() = None;
        self.stats.connected.store(false, Ordering::SeqCst);
    }
}

fn serve_one(
    name: &str,
    listener: &mut Listener,
    service: &Service,
    stop: &StopSignal,
    stats: &ConnectionStats,
) -> Result<(), ServeError> {
    let mut conn = Connection::new(name, service)?;
    let done = Arc::new(EventFd::new(libc::EFD_CLOEXEC).map_err(ServeError::Setup)?);
    conn.start(listener)?;
    let backend = conn.backend().clone();
    {
        // Under the connection lock, so `stop_unless_connected` sees either this frontend
        // connected or its own stop request honoured here, never neither.
        let mut connection = stop.lock();
        if stop.requested() {
            conn.daemon().request_shutdown();
        } else {
            info!("{name}: frontend connected");
            stats.connected.store(true, Ordering::SeqCst);
            *connection = conn
                .daemon()
                .shutdown_handle()
                .map(|h| (h, backend.clone()));
        }
    }
    // Every way out of here, early ones included, ends the connection's bookkeeping; it is
    // dropped after the connection (declared before it is handed back by the waiter).
    let _over = ConnectionOver { stop, stats };
    // Wait for the connection to end on a helper thread, and meanwhile turn away any other
    // frontend: a vhost-user socket serves one, and a second VM would otherwise hang. The
    // connection waits in a slot the thread takes it from, so that if the thread cannot be
    // started it is still here to be waited for (and quiesced) on this one.
    let parked: Parked = Arc::new(Mutex::new(Some(conn)));
    let spawned = if waiter_spawn_fails() {
        Err(io::Error::from_raw_os_error(libc::EAGAIN))
    } else {
        let (done, parked) = (done.clone(), parked.clone());
        std::thread::Builder::new()
            .name(format!("wait-{name}"))
            .spawn(move || {
                let waited = wait_parked(&parked);
                let _ = done.write(1);
                waited
            })
    };
    let waited = match spawned {
        Ok(waiter) => {
            watch_while_connected(name, listener, &backend, &done, stop);
            waiter.join().map_err(|_| ServeError::WatcherPanicked)?
        }
        Err(e) => {
            warn!(
                "{name}: cannot start a thread to watch the connection ({e}); serving it \
                 anyway, and a second frontend waits until it ends"
            );
            #[cfg(test)]
            WAITED_HERE.fetch_add(1, Ordering::SeqCst);
            wait_parked(&parked)
        }
    };
    let Some((conn, result)) = waited else {
        return Err(ServeError::DaemonLost);
    };
    *stop.lock() = None;
    // Dropping the connection frees any worker blocked on a frontend fd, then joins the
    // queue workers, so no request is in flight after this.
    drop(conn);
    stats.connected.store(false, Ordering::SeqCst);
    match result {
        // A frontend that goes away mid-message is an ordinary disconnect.
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// While the connection lasts (until `done` or a stop): turns away any other frontend, and
/// runs the connection's watchdog every [`WATCH_EVERY`].
fn watch_while_connected(
    name: &str,
    listener: &Listener,
    backend: &BlkBackend,
    done: &EventFd,
    stop: &StopSignal,
) {
    while !stop.requested() {
        match sock::wait_readable_until(listener.as_raw_fd(), done, Some(WATCH_EVERY)) {
            Wait::Woken => return,
            Wait::TimedOut => backend.watch(),
            Wait::Readable => {
                // A frontend that just hung up and reconnects can be seen before its old
                // connection is: give the current one a moment to end before calling the
                // newcomer a second VM.
                if wait_for_event(done, RECONNECT_GRACE) {
                    return;
                }
                warn!("{name}: refused a second frontend: the device already has one connected");
                sock::drop_pending(sys::listener_fd(listener));
            }
        }
    }
}

/// A connection, parked for whichever thread waits for it to end.
type Parked = Arc<Mutex<Option<Connection>>>;

/// Takes the parked connection and waits for it to end; returns it and how its wait ended,
/// or `None` if another thread took it (never: a failed spawn never runs its closure, and a
/// running one is the only other taker).
fn wait_parked(parked: &Parked) -> Option<(Connection, Result<(), vhost_user_backend::Error>)> {
    let mut conn = parked.lock().unwrap_or_else(|p| p.into_inner()).take()?;
    let result = conn.daemon().wait();
    Some((conn, result))
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
}
