//! One frontend connection: its backend and vhost-user-backend's `VhostUserDaemon`, built so
//! that a failure releases every thread and fd it made, and torn down so that no thread is
//! ever waited for while it could be stuck on the frontend.
//!
//! `VhostUserDaemon::new` spawns one worker thread per queue as it goes: if a later one
//! cannot be made (out of fds or threads) it returns an error and leaves the earlier ones
//! running, each holding an epoll fd, an eventfd and the backend, for good. We stop them
//! through the exit events the backend owns, and wait until they let go of the backend.

use super::backend::{BlkBackend, ServeOptions};
use super::error::ServeError;
use super::guest::{GuestMem, GuestMemTable, MemView, WorkerMem};
use super::handover::Handover;
use super::sched::Scheduler;
use super::vring::collect_created;
use crate::device::BlockDevice;
use log::warn;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;

/// The library's daemon for one connection.
pub(super) type Daemon = VhostUserDaemon<Arc<BlkBackend>>;

/// How long a failed setup waits for the worker threads it started to end.
const RELEASE_PATIENCE: Duration = Duration::from_secs(5);

/// What a server serves, connection after connection.
pub(super) struct Service {
    pub device: Arc<dyn BlockDevice>,
    pub opts: ServeOptions,
    pub sched: Arc<Scheduler>,
    /// Which connection's rings run (shared by the device's connections).
    pub handover: Arc<Handover>,
    /// The socket it is served on.
    pub socket: Option<std::path::PathBuf>,
}

/// One connection: dropping it makes sure no worker is, or will be, blocked on a frontend fd,
/// then drops the daemon, which joins the worker threads.
pub(super) struct Connection {
    backend: Arc<BlkBackend>,
    daemon: Daemon,
}

impl Connection {
    /// Builds a connection's backend and daemon (its worker threads start now, idle until a
    /// frontend sets up its rings). On failure nothing it made is left behind.
    pub(super) fn new(name: &str, service: &Service) -> Result<Self, ServeError> {
        // The workers' view of guest memory, and the library's: a table reaches the
        // workers only once the backend checked it (`vhost/memory.rs`).
        let workers: WorkerMem = GuestMemoryAtomic::new(MemView::empty());
        let frontend: GuestMem = GuestMemoryAtomic::new(GuestMemTable::new());
        let backend = BlkBackend::new(
            service.device.clone(),
            service.opts.clone(),
            workers,
            service.sched.clone(),
            &service.handover,
        );
        let backend = Arc::new(backend.map_err(ServeError::Setup)?);
        if let Some(path) = &service.socket {
            backend.attach_socket(path.clone());
        }
        let (daemon, vrings) =
            collect_created(|| VhostUserDaemon::new(name.to_string(), backend.clone(), frontend));
        let daemon = match daemon {
            Ok(daemon) => daemon,
            Err(e) => {
                release(&backend);
                return Err(e.into());
            }
        };
        // One queue per worker thread (`queues_per_thread`): vring i is watched by handler
        // i's epoll, as its first (event data 0) vring.
        let handlers = daemon.get_epoll_handlers();
        if handlers.len() == vrings.len() {
            for (link, handler) in vrings.iter().zip(&handlers) {
                link.link_epoll(handler.as_raw_fd(), 0);
            }
        } else {
            warn!(
                "{name}: {} vrings for {} worker threads: kick fds replaced on a running ring \
                 will not be re-registered",
                vrings.len(),
                handlers.len()
            );
        }
        backend.attach_vrings(vrings);
        Ok(Connection { backend, daemon })
    }

    /// Waits for a frontend on `listener` and starts serving it.
    pub(super) fn start(&mut self, listener: &mut Listener) -> Result<(), ServeError> {
        self.daemon.start(listener)?;
        if let Some(handle) = self.daemon.shutdown_handle() {
            self.backend.attach_shutdown(handle);
        }
        Ok(())
    }

    pub(super) fn backend(&self) -> &Arc<BlkBackend> {
        &self.backend
    }

    pub(super) fn daemon(&mut self) -> &mut Daemon {
        &mut self.daemon
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if !self.backend.close_frontend_fds() {
            warn!("a queue worker is stuck on a frontend fd: the connection's teardown may hang");
        }
        // Then `daemon` drops: it signals the exit events and joins the worker threads.
    }
}

/// After a failed `VhostUserDaemon::new`: stops the worker threads it started and waits until
/// they are gone (each holds a reference to the backend, its epoll and eventfds).
fn release(backend: &Arc<BlkBackend>) {
    backend.stop_workers();
    let start = Instant::now();
    while Arc::strong_count(backend) > 1 {
        if start.elapsed() > RELEASE_PATIENCE {
            warn!("worker threads of a connection that failed to start are still running");
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::mock::MemDevice;

    fn service(num_queues: u16) -> Service {
        Service {
            device: Arc::new(MemDevice::new(1 << 20)),
            opts: ServeOptions {
                num_queues,
                queue_size: 64,
                serial: "conn".into(),
                logical_block_size: 512,
                read_only: false,
                poll: Duration::ZERO,
            },
            sched: Arc::new(Scheduler::default()),
            handover: Arc::default(),
            socket: None,
        }
    }

    #[test]
    fn a_connection_links_its_vrings_and_drops_cleanly_without_a_frontend() {
        let conn = Connection::new("t", &service(4)).unwrap();
        assert_eq!(conn.backend().vring_count(), 4);
        let backend = conn.backend().clone();
        drop(conn);
        assert_eq!(Arc::strong_count(&backend), 1, "every worker let go");
    }
}
