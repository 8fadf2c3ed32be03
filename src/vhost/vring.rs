//! A connection's vrings: vhost-user-backend's `VringRwLock`, with the frontend's kick and
//! call fds used so that no frontend can make a queue worker block on them.
//!
//! The library reads a kick with a blocking `read_exact` and signals a call with a blocking
//! `write`, on fds the frontend shares with us (the same open file descriptions): a frontend
//! that saturates its call eventfd, reads its own kick first, or hands us a pipe that is full
//! or half-written would hold the worker thread, and with it the vring lock, the connection's
//! teardown and the daemon's stop. So [`Vring`] (our `VhostUserBackend::Vring`):
//! - sets `O_NONBLOCK` on kick and call fds as they are set, reads a kick until it is empty
//!   (`EAGAIN` is "nothing to read", a closed or unreadable kick stops being watched) and
//!   signals with one non-blocking write (`EAGAIN`: the driver has unread signals already, so
//!   the notification is dropped); it never returns an error that would end the worker;
//! - moves the epoll registration when a running ring gets a new kick fd: the library neither
//!   unregisters the old fd (which stays registered for as long as the frontend holds it, so
//!   its kicks woke the worker on the new fd's behalf) nor registers the new one;
//! - marks every call on a frontend fd ([`VringLink`]), so that a call that blocks anyway (a
//!   frontend can clear `O_NONBLOCK` on the description it shares with us) is interrupted by
//!   a signal: by the connection's watchdog after a second, and at once by teardown, which
//!   first stops any new call. A worker thread is thus never stuck on a frontend.

use super::guest::GuestMem;
use crate::sys::{self, Drained};
use log::warn;
use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};
use vhost_user_backend::{VringRwLock, VringState, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{Error as VirtQueError, QueueT};

/// What the connection needs of one of its vrings: the epoll instance watching its kick,
/// and its calls on frontend fds (to interrupt one that blocks). On cache lines of its own:
/// its worker writes it at every kick and notification, and the next vring's link is
/// another worker's.
#[derive(Debug)]
#[repr(align(128))]
pub(super) struct VringLink {
    /// The epoll fd of the worker thread watching this vring's kick (-1: not linked).
    /// Valid while the library's handler lives, which outlives every `set_kick` call.
    epoll: AtomicI32,
    /// The event data the worker's epoll uses for this vring.
    data: AtomicU64,
    /// Calls started on frontend fds (sequence numbers).
    started: AtomicU64,
    /// The sequence number of the call in progress (0: none).
    in_call: AtomicU64,
    /// The thread making it.
    tid: AtomicI32,
    /// The call in progress at the watchdog's last look.
    seen: AtomicU64,
    /// The connection is being torn down: no more calls.
    closing: AtomicBool,
}

impl Default for VringLink {
    fn default() -> Self {
        VringLink {
            epoll: AtomicI32::new(-1),
            data: AtomicU64::new(0),
            started: AtomicU64::new(0),
            in_call: AtomicU64::new(0),
            tid: AtomicI32::new(0),
            seen: AtomicU64::new(0),
            closing: AtomicBool::new(false),
        }
    }
}

/// How long teardown keeps interrupting a call before it gives up on it.
const CLOSE_PATIENCE: Duration = Duration::from_secs(5);

impl VringLink {
    /// Tells the vring which epoll instance watches its kick, with which event data.
    pub(super) fn link_epoll(&self, epoll: i32, data: u64) {
        self.data.store(data, Ordering::Relaxed);
        self.epoll.store(epoll, Ordering::Release);
    }

    /// Runs `call` (a system call on a frontend fd) marked as such, unless the connection is
    /// closing (then `None`).
    fn call<T>(&self, call: impl FnOnce() -> T) -> Option<T> {
        // Only this vring's worker calls (a race between two callers would only repeat a
        // number, which the watchdog tolerates: it needs one call seen twice a second apart).
        let seq = self.started.load(Ordering::Relaxed).wrapping_add(1).max(1);
        self.started.store(seq, Ordering::Relaxed);
        self.tid.store(sys::current_tid(), Ordering::Relaxed);
        // Announced before `closing` is read (both SeqCst): either `close` sees the call, or
        // the call sees `closing`.
        self.in_call.store(seq, Ordering::SeqCst);
        let result = (!self.closing.load(Ordering::SeqCst)).then(call);
        self.in_call.store(0, Ordering::Release);
        result
    }

    /// Watchdog: interrupts a call that has been in progress since the last look. Call it
    /// periodically (every second or so); returns whether it interrupted one.
    pub(super) fn interrupt_stuck(&self) -> bool {
        let now = self.in_call.load(Ordering::SeqCst);
        let before = self.seen.swap(now, Ordering::SeqCst);
        if now == 0 || now != before {
            return false;
        }
        warn!("a frontend fd blocked a queue worker (its O_NONBLOCK was cleared?); interrupting");
        let _ = sys::interrupt_thread(self.tid.load(Ordering::Relaxed));
        true
    }

    /// Stops every further call on the vring's frontend fds and interrupts the one in
    /// progress, if any, until it has returned. Returns false if it would not (after
    /// [`CLOSE_PATIENCE`]).
    pub(super) fn close(&self) -> bool {
        self.closing.store(true, Ordering::SeqCst);
        let start = Instant::now();
        while self.in_call.load(Ordering::SeqCst) != 0 {
            if start.elapsed() > CLOSE_PATIENCE {
                warn!("a queue worker does not return from a call on a frontend fd");
                return false;
            }
            let _ = sys::interrupt_thread(self.tid.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    fn epoll(&self) -> Option<(i32, u64)> {
        let epoll = self.epoll.load(Ordering::Acquire);
        (epoll >= 0).then(|| (epoll, self.data.load(Ordering::Relaxed)))
    }
}

thread_local! {
    /// Links of the vrings created on this thread while [`collect_created`] runs.
    static CREATED: RefCell<Option<Vec<Arc<VringLink>>>> = const { RefCell::new(None) };
}

/// Runs `f` and returns, with its result, the links of the vrings it created, in creation
/// order. `VhostUserDaemon::new` creates a connection's vrings on the calling thread, one per
/// queue in queue order (vhost-user-backend 0.24, `VhostUserHandler::new`): this is how the
/// connection gets hold of them (the library keeps them private).
pub(super) fn collect_created<T>(f: impl FnOnce() -> T) -> (T, Vec<Arc<VringLink>>) {
    CREATED.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let result = f();
    let links = CREATED.with(|c| c.borrow_mut().take()).unwrap_or_default();
    (result, links)
}

/// One vring of a connection (see the module documentation).
#[derive(Clone)]
pub struct Vring {
    inner: VringRwLock<GuestMem>,
    link: Arc<VringLink>,
}

impl Vring {
    /// Tells the driver about new used entries: one non-blocking signal on the call fd, if
    /// there is one. A signal that cannot be sent is dropped (a saturated eventfd or a full
    /// pipe already holds one the driver has not read); nothing here fails the queue.
    /// `state` is this vring's state, locked by the caller.
    pub(super) fn notify_driver(&self, state: &VringState<GuestMem>) {
        let Some(call) = state.get_call() else {
            return;
        };
        let fd = sys::notifier_fd(call);
        match self.link.call(|| sys::signal_one(fd)) {
            None | Some(Ok(_)) => {}
            Some(Err(e)) if e.raw_os_error() == Some(libc::EAGAIN) => {}
            Some(Err(e)) if e.raw_os_error() == Some(libc::EINTR) => keep_nonblocking(fd),
            Some(Err(e)) => warn!("cannot signal the driver, notification dropped: {e}"),
        }
    }

    /// This vring's link.
    #[cfg(test)]
    pub(super) fn link(&self) -> &Arc<VringLink> {
        &self.link
    }

    /// Stops watching the kick fd `kick` (it will never be readable usefully again).
    fn unwatch(&self, kick: BorrowedFd<'_>, why: &dyn std::fmt::Display) {
        warn!("the frontend's kick fd is unusable ({why}); its queue is no longer kicked");
        if let Some((epoll, _)) = self.link.epoll() {
            let _ = sys::epoll_delete(epoll, kick);
        }
    }
}

/// Sets `O_NONBLOCK` on a frontend fd again (after a call on it blocked: the frontend
/// cleared it).
fn keep_nonblocking(fd: BorrowedFd<'_>) {
    if let Err(e) = sys::set_nonblocking(fd) {
        warn!("cannot make a frontend fd non-blocking: {e}");
    }
}

/// Sets `O_NONBLOCK` on an fd the frontend just gave us.
fn nonblocking(file: Option<File>) -> Option<File> {
    if let Some(f) = &file {
        keep_nonblocking(f.as_fd());
    }
    file
}

impl<'a> VringStateGuard<'a, GuestMem> for Vring {
    type G = RwLockReadGuard<'a, VringState<GuestMem>>;
}

impl<'a> VringStateMutGuard<'a, GuestMem> for Vring {
    type G = RwLockWriteGuard<'a, VringState<GuestMem>>;
}

impl VringT<GuestMem> for Vring {
    fn new(mem: GuestMem, max_queue_size: u16) -> Result<Self, VirtQueError> {
        let vring = Vring {
            inner: VringRwLock::new(mem, max_queue_size)?,
            link: Arc::default(),
        };
        CREATED.with(|c| {
            if let Some(links) = c.borrow_mut().as_mut() {
                links.push(vring.link.clone());
            }
        });
        Ok(vring)
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, GuestMem>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, GuestMem>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.notify_driver(&self.inner.get_ref());
        Ok(())
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled)
    }

    fn set_queue_info(&self, desc: u64, avail: u64, used: u64) -> Result<(), VirtQueError> {
        self.inner.set_queue_info(desc, avail, used)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready)
    }

    /// Sets the kick fd, non-blocking. On a running ring (ready and enabled: the library
    /// registered its kick with the worker's epoll, and will not again) the registration moves
    /// from the old fd, if any, to the new one.
    fn set_kick(&self, file: Option<File>) {
        let file = nonblocking(file);
        let running = {
            let state = self.inner.get_ref();
            let running = state.get_queue().ready() && state.is_enabled();
            if let (true, Some(old), Some((epoll, _))) =
                (running, state.get_kick(), self.link.epoll())
            {
                let _ = sys::epoll_delete(epoll, sys::consumer_fd(old));
            }
            running
        };
        self.inner.set_kick(file);
        if let (true, Some((epoll, data))) = (running, self.link.epoll()) {
            let state = self.inner.get_ref();
            if let Some(new) = state.get_kick() {
                if let Err(e) = sys::epoll_add(epoll, sys::consumer_fd(new), data) {
                    warn!("cannot watch the frontend's new kick fd: {e}");
                }
            }
        }
    }

    /// Empties the kick fd without blocking; whether the vring is enabled.
    fn read_kick(&self) -> io::Result<bool> {
        let state = self.inner.get_ref();
        if let Some(kick) = state.get_kick() {
            let fd = sys::consumer_fd(kick);
            match self.link.call(|| sys::drain(fd)) {
                None | Some(Drained::Empty) => {}
                Some(Drained::Interrupted) => keep_nonblocking(fd),
                Some(Drained::Closed) => self.unwatch(fd, &"closed by the frontend"),
                Some(Drained::Failed(e)) => self.unwatch(fd, &e),
            }
        }
        Ok(state.is_enabled())
    }

    fn set_call(&self, file: Option<File>) {
        self.inner.set_call(nonblocking(file))
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}

#[cfg(test)]
mod tests {
    use super::super::guest::GuestMemTable;
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
    use vm_memory::{GuestAddress, GuestMemoryAtomic};
    use vmm_sys_util::epoll::{Epoll, EpollEvent};
    use vmm_sys_util::eventfd::EventFd;

    fn vring() -> (Vring, Vec<Arc<VringLink>>) {
        let mem = GuestMemoryAtomic::new(
            GuestMemTable::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        );
        let (vring, links) = collect_created(|| Vring::new(mem, 16).unwrap());
        vring.set_queue_size(16);
        vring.set_queue_info(0x1000, 0x2000, 0x3000).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        (vring, links)
    }

    /// A blocking eventfd, and the file handed to the vring for it (same description).
    fn frontend_fd() -> (EventFd, File) {
        let fd = EventFd::new(0).unwrap();
        let dup = fd.try_clone().unwrap();
        // SAFETY: `into_raw_fd` hands over sole ownership of the duplicate.
        let file = unsafe { File::from_raw_fd(dup.into_raw_fd()) };
        (fd, file)
    }

    #[test]
    fn vrings_created_are_collected_in_order() {
        let (v, links) = vring();
        assert_eq!(links.len(), 1);
        assert!(Arc::ptr_eq(&links[0], v.link()));
        let mem = GuestMemoryAtomic::new(GuestMemTable::new());
        let _outside = Vring::new(mem, 16).unwrap();
        assert!(CREATED.with(|c| c.borrow().is_none()));
    }

    #[test]
    fn a_stolen_kick_and_a_saturated_call_cost_a_notification_not_a_thread() {
        let (v, _) = vring();
        let (kick, kick_file) = frontend_fd();
        let (call, call_file) = frontend_fd();
        v.set_kick(Some(kick_file));
        v.set_call(Some(call_file));
        // The frontend read its own kick first: nothing to read, no block.
        assert!(v.read_kick().unwrap());
        kick.write(3).unwrap();
        assert!(v.read_kick().unwrap());
        // Saturated: the signal is dropped.
        call.write(u64::MAX - 1).unwrap();
        v.signal_used_queue().unwrap();
        assert_eq!(call.read().unwrap(), u64::MAX - 1);
        v.signal_used_queue().unwrap();
        assert_eq!(call.read().unwrap(), 1);
    }

    #[test]
    fn a_half_written_or_closed_kick_pipe_never_blocks() {
        let (v, links) = vring();
        let epoll = Epoll::new().unwrap();
        links[0].link_epoll(epoll.as_raw_fd(), 0);
        let (r, w) = std::io::pipe().unwrap();
        // A running ring given a kick: it is watched at once.
        v.set_kick(Some(File::from(std::os::fd::OwnedFd::from(r))));
        std::io::Write::write_all(&mut &w, &[1, 2, 3]).unwrap();
        assert!(v.read_kick().unwrap());
        drop(w);
        // End of file: the kick is no longer watched (else epoll would report it forever).
        assert!(v.read_kick().unwrap());
        let mut events = [EpollEvent::default(); 2];
        assert_eq!(epoll.wait(0, &mut events).unwrap(), 0);
    }

    #[test]
    fn a_new_kick_on_a_running_ring_moves_the_epoll_registration() {
        let (v, links) = vring();
        let epoll = Epoll::new().unwrap();
        links[0].link_epoll(epoll.as_raw_fd(), 5);
        let (old, old_file) = frontend_fd();
        sys::epoll_add(epoll.as_raw_fd(), old_file.as_fd(), 5).unwrap();
        v.set_kick(Some(old_file));
        let (new, new_file) = frontend_fd();
        v.set_kick(Some(new_file));
        // The old fd, still held by the frontend, wakes nobody; the new one is watched.
        old.write(1).unwrap();
        let mut events = [EpollEvent::default(); 2];
        assert_eq!(epoll.wait(0, &mut events).unwrap(), 0);
        new.write(1).unwrap();
        assert_eq!(epoll.wait(0, &mut events).unwrap(), 1);
        assert_eq!(events[0].data(), 5);
        assert!(v.read_kick().unwrap());
        assert_eq!(epoll.wait(0, &mut events).unwrap(), 0, "read until empty");
    }

    #[test]
    fn a_call_that_blocks_anyway_is_interrupted_by_the_watchdog_and_by_close() {
        let (v, links) = vring();
        let (_kick, kick_file) = frontend_fd();
        let shared = kick_file.try_clone().unwrap();
        v.set_kick(Some(kick_file));
        // The frontend clears O_NONBLOCK on the description it shares with us.
        sys::set_blocking(shared.as_fd()).unwrap();
        let reader = {
            let v = v.clone();
            std::thread::spawn(move || v.read_kick())
        };
        // The read blocks; the watchdog's second look at the same call interrupts it.
        let start = Instant::now();
        while !reader.is_finished() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "never interrupted"
            );
            links[0].interrupt_stuck();
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(reader.join().unwrap().unwrap());
        // It made the fd non-blocking again.
        assert!(v.read_kick().unwrap());
        // After close, no call is made at all.
        sys::set_blocking(shared.as_fd()).unwrap();
        assert!(links[0].close());
        assert!(v.read_kick().unwrap(), "returns at once");
    }
}
