//! The vhost-user-blk backend for one connection: features, config space, queue workers.
//!
//! One [`BlkBackend`] is built per frontend connection (guest memory, negotiated features and
//! the writeback setting belong to the connection); the [`BlockDevice`] it serves outlives it.
//! Each queue gets its own worker thread (see `queues_per_thread`), and the only state a worker
//! touches besides its own vring is the device and the daemon's [`Scheduler`], so queues run in
//! parallel without a shared lock. The workers see the frontend's memory through
//! [`WorkerMemory`] (checked tables only) and its kick and call fds through [`Vring`] (never
//! blocking on them).

use super::backend_channel::BackendChannel;
use super::dirty::DirtyLog;
use super::guest::{GuestMem, WorkerMem};
use super::handover::{Entry, Handover, Rings};
use super::memory::WorkerMemory;
use super::queue::{QueueContext, QueueWorker};
use super::request::{MemoryFaults, RequestContext};
use super::sched::Scheduler;
use super::vring::{Vring, VringLink};
use crate::device::BlockDevice;
use crate::sys;
use crate::virtio_blk::{self, ConfigSpace, Limits};
use log::{debug, warn};
use std::io;
use std::mem::ManuallyDrop;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VringT};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueT;
use vm_memory::ByteValued;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// What a device is served with; fixed for the life of the socket.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: String,
    pub logical_block_size: u32,
    pub read_only: bool,
    /// How long a queue worker keeps watching its ring for new requests after a batch,
    /// before sleeping until the next kick (0: never poll).
    pub poll: std::time::Duration,
}

/// One connection's backend.
pub struct BlkBackend {
    device: Arc<dyn BlockDevice>,
    opts: ServeOptions,
    limits: Limits,
    id: [u8; virtio_blk::ID_BYTES],
    /// Guest memory as the workers see it.
    memory: WorkerMemory,
    /// Write-back cache enabled (the driver may turn it off through config space).
    writeback: AtomicBool,
    /// The frontend logs our writes into guest memory (LOG_ALL: it is migrating the VM).
    logging: AtomicBool,
    /// The daemon's scheduling policy, shared with every other connection.
    sched: Arc<Scheduler>,
    workers: Vec<Mutex<QueueWorker>>,
    /// Exit events, one per worker thread. We keep the consumer fds: the library takes them
    /// with `into_raw_fd` and never closes them, so we close them when the backend drops.
    exit_events: Vec<(EventConsumer, EventNotifier)>,
    /// A duplicate of each exit notifier, made in advance for the library (which closes it):
    /// duplicating on demand could fail (EMFILE), and a worker given no exit event could
    /// never be stopped.
    exit_notifiers: Mutex<Vec<Option<EventNotifier>>>,
    /// The connection's vrings, once the connection has them (watchdog and teardown).
    vrings: OnceLock<Vec<Arc<VringLink>>>,
    /// Ends the connection (set once it is accepted).
    shutdown: OnceLock<ShutdownHandle>,
    /// Guest memory vanished under a request: the connection is being dropped.
    memory_faulted: AtomicBool,
    /// The connection is about to be closed: workers pop no more requests.
    quiescing: AtomicBool,
    /// Workers inside `handle_event` right now.
    busy: OwnLine,
    /// Which of this connection's rings run; the rings of only one connection of the device
    /// run at a time (`handover.rs`).
    rings: Rings,
    /// The socket the connection came in on (to find its backend request channel).
    socket: OnceLock<PathBuf>,
    /// The backend request channel, once the frontend gave one (`BACKEND_REQ`).
    channel: Mutex<Option<BackendChannel>>,
}

/// A counter on cache lines of its own: every queue's worker writes `busy` at every event, and
/// must not evict what every request reads (the device, limits, writeback flag).
#[repr(align(128))]
#[derive(Default)]
struct OwnLine(AtomicUsize);

/// Leaves `busy` on every path out of `handle_event`.
struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl BlkBackend {
    /// The backend of one connection: `device` served with `opts` in the frontend's guest
    /// memory `mem`, its requests scheduled by the daemon's `sched`, its rings run when the
    /// device's `handover` lets them.
    pub fn new(
        device: Arc<dyn BlockDevice>,
        opts: ServeOptions,
        mem: WorkerMem,
        sched: Arc<Scheduler>,
        handover: &Arc<Handover>,
    ) -> io::Result<Self> {
        let seg_max = u32::from(opts.queue_size).saturating_sub(2).max(1);
        let limits = Limits::new(
            device.capacity(),
            opts.logical_block_size,
            opts.read_only,
            seg_max,
        );
        let exit_events = (0..opts.num_queues)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC))
            .collect::<io::Result<Vec<_>>>()?;
        let exit_notifiers = exit_events
            .iter()
            .map(|(_, notifier)| notifier.try_clone().map(Some))
            .collect::<io::Result<Vec<_>>>()?;
        let workers = (0..opts.num_queues)
            .map(|_| Mutex::new(QueueWorker::default()))
            .collect();
        Ok(BlkBackend {
            rings: handover.rings(usize::from(opts.num_queues)),
            id: virtio_blk::id_bytes(&opts.serial),
            device,
            limits,
            opts,
            memory: WorkerMemory::new(mem),
            writeback: AtomicBool::new(true),
            logging: AtomicBool::new(false),
            sched,
            workers,
            exit_events,
            exit_notifiers: Mutex::new(exit_notifiers),
            vrings: OnceLock::new(),
            shutdown: OnceLock::new(),
            memory_faulted: AtomicBool::new(false),
            quiescing: AtomicBool::new(false),
            busy: OwnLine::default(),
            socket: OnceLock::new(),
            channel: Mutex::new(None),
        })
    }

    /// Gives the backend its connection's vrings (see `vring::collect_created`).
    pub(super) fn attach_vrings(&self, vrings: Vec<Arc<VringLink>>) {
        let _ = self.vrings.set(vrings);
    }

    /// Tells the backend the socket its connection came in on.
    pub(super) fn attach_socket(&self, path: PathBuf) {
        let _ = self.socket.set(path);
    }

    /// The device's size changed: tells the frontend (config-change message on the backend
    /// request channel), which reads the config space again. Whether it could be told.
    pub fn config_changed(&self) -> bool {
        let channel = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        match channel.as_ref().map(BackendChannel::config_changed) {
            Some(Ok(())) => true,
            Some(Err(e)) => {
                warn!("cannot tell the frontend the device changed size: {e}");
                false
            }
            None => false,
        }
    }

    /// The limits with the device's size now (a resize changes it while connected).
    fn live_limits(&self) -> Limits {
        self.limits.with_capacity(self.device.capacity())
    }

    /// Gives the backend the means to end its connection.
    pub(super) fn attach_shutdown(&self, handle: ShutdownHandle) {
        let _ = self.shutdown.set(handle);
    }

    /// Tells every worker thread to stop (a connection that failed to start: the library
    /// would leave the threads it already spawned running).
    pub(super) fn stop_workers(&self) {
        for (_, notifier) in &self.exit_events {
            let _ = notifier.notify();
        }
    }

    /// Every ring of the connection stopped: call once its worker threads are gone (every
    /// request they popped was answered). Dropping the backend does it too.
    pub(super) fn release_rings(&self) {
        self.rings.stop_all();
    }

    /// Ring `q` is about to be served: whether it may, waiting if another connection of the
    /// device runs its rings (a migration's source that has not stopped yet). A connection
    /// that waited in vain is a second VM on the device, and is dropped.
    fn may_run(&self, q: usize, vring: &Vring) -> bool {
        if self.rings.running(q) {
            return true;
        }
        // The ring's lock, shared, keeps it from being stopped (GET_VRING_BASE) meanwhile.
        let state = vring.get_ref();
        if !state.get_queue().ready() {
            return false;
        }
        match self.rings.enter(q, &|| self.quiescing()) {
            Entry::Run => true,
            Entry::GaveUp => false,
            Entry::Refused => {
                warn!(
                    "another frontend still runs this device's rings: this one is a second VM \
                     on it, not a migration's destination; dropping it"
                );
                if let Some(handle) = self.shutdown.get() {
                    handle.shutdown();
                }
                false
            }
        }
    }

    /// Guest memory vanished under a request: ends the connection (said once; the shutdown
    /// is repeated, in case the first came before the connection could be ended).
    fn fail_connection(&self) {
        if !self.memory_faulted.swap(true, Ordering::SeqCst) {
            warn!("guest memory vanished (the frontend shrank its file): dropping the connection");
        }
        if let Some(handle) = self.shutdown.get() {
            handle.shutdown();
        }
    }

    /// The connection's watchdog, called every second or so while it lasts: interrupts a
    /// worker that has been blocked on a frontend fd since the last call, drops the
    /// connection if guest memory faulted under a thread that could not say so, and forgets
    /// fault registrations of memory nothing maps any more.
    pub(super) fn watch(&self) {
        for link in self.vrings.get().into_iter().flatten() {
            link.interrupt_stuck();
        }
        if self.memory.faults() > 0 {
            self.fail_connection();
        }
        self.memory.prune();
    }

    /// Makes sure no worker is, or will be, blocked on a frontend fd (before the worker
    /// threads are joined). Returns false if one would not return.
    pub(super) fn close_frontend_fds(&self) -> bool {
        // Every vring is closed, even after one that would not.
        let closed: Vec<bool> = self
            .vrings
            .get()
            .into_iter()
            .flatten()
            .map(|l| l.close())
            .collect();
        closed.into_iter().all(|c| c)
    }

    /// Stops the workers popping requests and waits (up to `timeout`) until every request
    /// they popped is answered in the used ring. Called before the connection is closed: a
    /// frontend that reconnects resumes from the used index it saw at the disconnect, so an
    /// entry added after it would make it run that request again. Returns false on timeout.
    pub fn quiesce(&self, timeout: Duration) -> bool {
        self.quiescing.store(true, Ordering::SeqCst);
        let start = Instant::now();
        let mut watched = start;
        while self.busy.0.load(Ordering::SeqCst) > 0 {
            if start.elapsed() >= timeout {
                return false;
            }
            // A worker blocked on a frontend fd holds up the quiesce: free it.
            if watched.elapsed() >= WATCH_EVERY {
                watched = Instant::now();
                self.watch();
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    fn quiescing(&self) -> bool {
        self.quiescing.load(Ordering::SeqCst)
    }

    fn config(&self) -> ConfigSpace {
        virtio_blk::config_space(
            &self.live_limits(),
            self.opts.num_queues,
            self.writeback.load(Ordering::Relaxed),
            self.device
                .physical_block_size()
                .max(self.opts.logical_block_size),
        )
    }

    /// What this connection's queue workers work with, borrowed for one event.
    pub(super) fn queue_context(&self) -> QueueContext<'_> {
        QueueContext {
            request: RequestContext {
                device: &*self.device,
                limits: self.live_limits(),
                id: &self.id,
                writeback: &self.writeback,
                logging: &self.logging,
                faults: self,
            },
            sched: &self.sched,
            mem: self.memory.memory(),
            quiescing: &self.quiescing,
            max_poll: self.opts.poll,
        }
    }
}

/// How often a connection's watchdog looks ([`BlkBackend::watch`]).
pub(super) const WATCH_EVERY: Duration = Duration::from_secs(1);

fn bit(n: u32) -> u64 {
    1u64 << n
}

#[cfg(test)]
impl BlkBackend {
    /// How many vrings the connection attached.
    pub(super) fn vring_count(&self) -> usize {
        self.vrings.get().map_or(0, Vec::len)
    }
}

impl MemoryFaults for BlkBackend {
    fn memory_fault(&self) {
        self.fail_connection();
    }
}

/// The config-space offset a GET_CONFIG or SET_CONFIG message means. QEMU counts from the
/// start of the config space; cloud-hypervisor reads it at `VHOST_USER_CONFIG_OFFSET` (0x100),
/// as the vhost crate's own backend example expects. No config space is that long, so an
/// offset from 0x100 on is taken as counted from there.
fn config_offset(offset: u32) -> u32 {
    offset
        .checked_sub(vhost::vhost_user::message::VHOST_USER_CONFIG_OFFSET)
        .unwrap_or(offset)
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = DirtyLog;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.opts.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.opts.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_CONFIG_WCE)
            | bit(VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::LOG_ALL.bits()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.opts.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn acked_features(&self, acked: u64) {
        // A driver that cannot flush must get a write-through device (virtio spec 5.2.5.1).
        if acked & bit(VIRTIO_BLK_F_FLUSH) == 0 {
            self.writeback.store(false, Ordering::Relaxed);
        }
        // LOG_ALL comes and goes with a migration (set when it starts, cleared if it is
        // cancelled): off, a write costs one flag load.
        let logging = acked & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if logging != self.logging.swap(logging, Ordering::SeqCst) {
            debug!("dirty-page logging {}", if logging { "on" } else { "off" });
        }
        self.memory.set_logging(logging);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_backend_req_fd(&self, backend: vhost::vhost_user::Backend) {
        // `backend` keeps the channel's socket open while we look for it; we keep our own
        // duplicate (see `backend_channel.rs`).
        let found = match self.socket.get() {
            Some(path) => BackendChannel::find(path),
            None => Err(io::Error::other("no socket path")),
        };
        drop(backend);
        match found {
            Ok(ch) => {
                debug!("backend request channel set up");
                *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = Some(ch);
            }
            Err(e) => warn!(
                "backend request channel not usable ({e}): the frontend will not be told of a \
                 resize until it reconnects"
            ),
        }
    }

    fn reset_device(&self) {
        self.writeback.store(true, Ordering::Relaxed);
        for w in &self.workers {
            w.lock().unwrap_or_else(|p| p.into_inner()).reset();
        }
        // No worker is in a drain now (each held its lock): nothing popped is unanswered.
        self.rings.stop_all();
    }

    /// GET_VRING_BASE stopped ring `queue_index` (the library marked it not ready under the
    /// ring's lock, which a worker holds for a whole drain: every request it popped was
    /// answered, and it pops nothing more). Another connection's rings may run now.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.rings.stop(queue_index as usize);
        Ok(())
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings track EVENT_IDX themselves (the library sets it on each queue).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The frontend asks for exactly `size` bytes; bytes past our struct read as zero.
        let offset = config_offset(offset);
        let config = self.config();
        let config = config.as_slice();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(config.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(config.len());
        out[..end - start].copy_from_slice(&config[start..end]);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the writeback byte is driver-writable (CONFIG_WCE).
        let offset = config_offset(offset);
        if offset as usize == ConfigSpace::WRITEBACK && buf.len() == 1 {
            let wb = buf[0] != 0;
            debug!("driver set writeback={wb}");
            self.writeback.store(wb, Ordering::Relaxed);
            return Ok(());
        }
        warn!(
            "refused config write of {} bytes at offset {offset}",
            buf.len()
        );
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        // `mem` is the library's table; the workers get it once it passed our checks (a
        // refused one ends the connection: the library fails the message).
        use vm_memory::GuestMemoryBackend;
        let current = self.memory.update(&mem).map_err(io::Error::other)?;
        debug!(
            "guest memory table now has {} regions",
            current.owner().num_regions()
        );
        // Idle queues let go of the old table now, so a removed region is unmapped at once; a
        // queue busy right now does so when it goes idle.
        for worker in &self.workers {
            if let Ok(mut worker) = worker.try_lock() {
                worker.release_stale_memory(&current);
            }
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.opts.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.exit_events.get(thread_index)?;
        let made = self
            .exit_notifiers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(thread_index)
            .and_then(Option::take);
        let notifier = match made {
            Some(n) => n,
            None => notifier.try_clone().ok()?,
        };
        // The library never closes the consumer it is given: hand it an alias of ours.
        let consumer = ManuallyDrop::into_inner(sys::shared_event_consumer(consumer));
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            // A kick fd in error or hung up (the vring stops watching one it cannot read):
            // look at the ring anyway, never end the worker thread over it.
            debug!("kick with event set {evset:?}");
        }
        // One queue per worker thread: the event index is within this thread's vrings.
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("unknown device event {device_event}")))?;
        let worker = self
            .workers
            .get(thread_id)
            .ok_or_else(|| io::Error::other(format!("unknown worker thread {thread_id}")))?;
        // Entering before checking (both SeqCst) means `quiesce` either sees us busy or we see
        // its flag.
        self.busy.0.fetch_add(1, Ordering::SeqCst);
        let _busy = Busy(&self.busy.0);
        if self.quiescing() || !self.may_run(thread_id, vring) {
            return Ok(());
        }
        // Uncontended: only this queue's thread takes this worker's lock.
        let mut worker = worker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        worker.process_queue(&self.queue_context(), vring)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_rig::*;
    use super::*;
    use crate::virtio_blk::*;

    #[test]
    fn features_are_the_spec_bits_for_the_device() {
        let mask = |bits: &[u32]| bits.iter().fold(0u64, |m, b| m | 1 << b);
        // VERSION_1, EVENT_IDX, INDIRECT_DESC, SIZE_MAX, SEG_MAX, BLK_SIZE, TOPOLOGY, FLUSH,
        // CONFIG_WCE, MQ, vhost's LOG_ALL (bit 26: the dirty log of live migration) and
        // vhost-user's PROTOCOL_FEATURES (bit 30); then DISCARD and WRITE_ZEROES, or RO.
        let common = [32, 29, 28, 1, 2, 6, 10, 9, 11, 12, 26, 30];
        assert_eq!(
            rig(false).backend.features(),
            mask(&common) | mask(&[13, 14])
        );
        assert_eq!(rig(true).backend.features(), mask(&common) | mask(&[5]));
    }

    #[test]
    fn config_reads_are_the_size_asked_and_only_writeback_is_writable() {
        let r = rig(false);
        let full = r.backend.get_config(0, 96);
        assert_eq!(full.len(), 96);
        assert_eq!(u64::from_le_bytes(full[..8].try_into().unwrap()), 128);
        assert_eq!(full[ConfigSpace::WRITEBACK], 1);
        // Bytes past the struct read as zero, and the answer is exactly the size asked.
        let tail = r.backend.get_config(90, 16);
        assert_eq!(tail.len(), 16);
        assert_eq!(tail[..6], full[90..]);
        assert!(tail[6..].iter().all(|&b| b == 0));
        assert_eq!(r.backend.get_config(200, 4), vec![0; 4]);
        let wce = ConfigSpace::WRITEBACK as u32;
        r.backend.set_config(wce, &[0]).unwrap();
        assert_eq!(r.backend.get_config(wce, 1), vec![0]);
        assert!(r.backend.set_config(0, &[1]).is_err());
        assert!(r.backend.set_config(wce, &[1, 1]).is_err());
        assert_eq!(r.backend.get_config(wce, 1), vec![0]);
        // cloud-hypervisor counts from VHOST_USER_CONFIG_OFFSET (0x100).
        assert_eq!(r.backend.get_config(0x100, 96), r.backend.get_config(0, 96));
        r.backend.set_config(0x100 + wce, &[1]).unwrap();
        assert_eq!(r.backend.get_config(wce, 1), vec![1]);
    }

    #[test]
    fn quiesce_waits_for_popped_requests_and_then_nothing_more_is_popped() {
        // Two writes that never meet a third: each is held for 1 s.
        let g = gated(2, 3, Duration::from_secs(1), true);
        let (backend, vring) = (g.backend.clone(), g.vring.clone());
        let worker = std::thread::spawn(move || {
            // Through the library's entry point, which counts the worker busy.
            backend.handle_event(0, EventSet::IN, &[vring], 0)
        });
        while g.device.in_flight.lock().unwrap().0 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            !g.backend.quiesce(Duration::from_millis(100)),
            "a write is still running"
        );
        assert!(g.backend.quiesce(Duration::from_secs(5)));
        worker.join().unwrap().unwrap();
        // What was popped is answered; the flush behind the first write was never popped, so
        // the next backend finds it in the ring past the used index.
        assert_eq!(
            g.used_idx(),
            1,
            "only the first request was popped (inline mode)"
        );
        assert_eq!(g.status(0), VIRTIO_BLK_S_OK);
        assert_eq!(
            g.status(1),
            0xff,
            "the second write was left for the next backend"
        );
        // A kick after quiescing pops nothing.
        g.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&g.vring), 0)
            .unwrap();
        assert_eq!(g.used_idx(), 1);
    }

    #[test]
    fn guest_memory_whose_file_shrinks_fails_the_request_and_the_connection_not_the_process() {
        use vm_memory::{FileOffset, GuestAddress, GuestMemoryAtomic, GuestRegionMmap, MmapRegion};
        let mut r = rig(false);
        // The frontend adds a file-backed region; it passes the checks and reaches the workers.
        let file = tempfile::tempfile().unwrap();
        file.set_len(8192).unwrap();
        let region = MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), 0), 8192);
        let region = GuestRegionMmap::<crate::vhost::dirty::DirtyLog>::new(
            region.unwrap(),
            GuestAddress(MEM_SIZE),
        )
        .unwrap();
        let table = r.mem.insert_region(Arc::new(region)).unwrap();
        r.backend
            .update_memory(GuestMemoryAtomic::new(table))
            .unwrap();
        // Then shrinks the file under it, and asks for the serial there (GET_ID writes it
        // in user space: a SIGBUS, contained).
        file.set_len(0).unwrap();
        let h = r.header(VIRTIO_BLK_T_GET_ID, 0);
        let got = r.run(&[h, desc(MEM_SIZE + 4096, 20, true), desc(STATUS, 1, true)]);
        assert_eq!(got, (1, VIRTIO_BLK_S_IOERR));
        assert!(
            r.backend.memory_faulted.load(Ordering::SeqCst),
            "the connection is being dropped"
        );
        // A region whose file is too short from the start is refused.
        let region = MmapRegion::from_file(FileOffset::new(file, 0), 8192).unwrap();
        let region = GuestRegionMmap::<crate::vhost::dirty::DirtyLog>::new(
            region,
            GuestAddress(2 * MEM_SIZE),
        )
        .unwrap();
        let table = r.mem.insert_region(Arc::new(region)).unwrap();
        assert!(r
            .backend
            .update_memory(GuestMemoryAtomic::new(table))
            .is_err());
    }
}
