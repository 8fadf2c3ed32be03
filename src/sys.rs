//! Thin wrappers over system calls and fd tricks the crates we use do not wrap.
//!
//! Each keeps its `unsafe` here, next to the reason it is sound, so that the modules calling
//! them (the vhost server, backend and vrings, the socket helpers) need none. The fault
//! containment for guest memory whose file shrinks lives in [`guest_faults`], the buffers
//! aligned for direct I/O in [`aligned`], the block-device ioctls in [`blockdev`].

pub mod aligned;
pub mod blockdev;
pub mod guest_faults;
pub mod inherit;

use std::cell::Cell;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::sync::Once;
use std::time::Duration;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

/// `poll(2)`: waits until one of `fds` has an event, for at most `timeout` (`None`: no limit).
/// Returns how many entries have events in their `revents` (0 on timeout).
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    // Rounded up: a wait is never cut short.
    let ms = timeout.map_or(-1, |t| {
        libc::c_int::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(libc::c_int::MAX)
    });
    let nfds = libc::nfds_t::try_from(fds.len()).map_err(io::Error::other)?;
    // SAFETY: `fds` is an exclusively borrowed array of `nfds` initialized pollfd for the
    // duration of the call; the kernel only writes their `revents`. Any fd number is valid
    // input (one that is not open is reported as POLLNVAL).
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, ms) };
    usize::try_from(rc).map_err(|_| io::Error::last_os_error())
}

/// A second `EventConsumer` on `owner`'s descriptor, for vhost-user-backend's `exit_event`.
///
/// The library registers the consumer it is given with its epoll through `into_raw_fd` and
/// never closes it: a fresh descriptor would leak one per connection, so the backend keeps the
/// owning consumer (which closes it once) and hands the library this alias. The alias never
/// closes the descriptor by itself (`ManuallyDrop`); take it out only to give it to the
/// library, and keep `owner` alive for as long as the library uses the descriptor.
pub fn shared_event_consumer(owner: &EventConsumer) -> ManuallyDrop<EventConsumer> {
    // SAFETY: the descriptor is open (borrowed from `owner`). The alias does not take over
    // its ownership: wrapped in `ManuallyDrop`, it is never dropped here, and the one taker,
    // vhost-user-backend, unwraps it with `into_raw_fd` and never closes it. `owner` remains
    // the only closer; the backend keeps it until it drops, after its worker threads end (they
    // hold an Arc of it).
    ManuallyDrop::new(unsafe { EventConsumer::from_raw_fd(owner.as_raw_fd()) })
}

/// The descriptor an eventfd consumer owns, borrowed (vmm-sys-util does not implement `AsFd`).
pub fn consumer_fd(consumer: &EventConsumer) -> BorrowedFd<'_> {
    // SAFETY: an `EventConsumer` owns its descriptor (a `File` inside) and keeps it open
    // until it drops, which the borrow of `consumer` outlasts.
    unsafe { BorrowedFd::borrow_raw(consumer.as_raw_fd()) }
}

/// The descriptor an eventfd notifier owns, borrowed (vmm-sys-util does not implement `AsFd`).
pub fn notifier_fd(notifier: &EventNotifier) -> BorrowedFd<'_> {
    // SAFETY: as in `consumer_fd`: an `EventNotifier` owns its descriptor until it drops.
    unsafe { BorrowedFd::borrow_raw(notifier.as_raw_fd()) }
}

/// The listening socket a vhost-user `Listener` owns, borrowed (vhost does not implement
/// `AsFd`).
pub fn listener_fd(listener: &vhost::vhost_user::Listener) -> BorrowedFd<'_> {
    // SAFETY: a vhost `Listener` owns its socket (a `UnixListener` inside) until it drops,
    // which the borrow of `listener` outlasts.
    unsafe { BorrowedFd::borrow_raw(listener.as_raw_fd()) }
}

/// Sets `O_NONBLOCK` on `fd`'s open file description (shared with every process holding it).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL only reads the flags of `fd`, which the caller keeps open (borrowed).
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    // SAFETY: as above; F_SETFL changes only the file status flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Clears `O_NONBLOCK` on `fd`'s open file description (what a hostile frontend may do to
/// a descriptor it shares with us; the tests do it to check we survive it).
pub fn set_blocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: as in `set_nonblocking`.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as in `set_nonblocking`.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What reading a notification fd until it is empty found.
#[derive(Debug)]
pub enum Drained {
    /// It is empty now (it may have held something).
    Empty,
    /// A signal interrupted the read (see [`interrupt_thread`]).
    Interrupted,
    /// End of file (a pipe whose writer is gone): it will never hold anything again.
    Closed,
    /// The read failed: the fd cannot be read at all.
    Failed(io::Error),
}

/// Reads `fd` until it is empty: one read for an eventfd (it returns its whole counter), as
/// many as it takes for a pipe, at most 16 (a pipe a frontend keeps writing into is left to
/// the next wakeup). Never blocks if the fd is non-blocking; a blocking one is only ever left
/// by a signal ([`interrupt_thread`]).
pub fn drain(fd: BorrowedFd<'_>) -> Drained {
    let mut buf = [0u8; 512];
    for _ in 0..16 {
        // SAFETY: `buf` is a writable buffer of `buf.len()` bytes for the duration of the
        // call; `fd` is kept open by the caller (borrowed).
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(0) => return Drained::Closed,
            // Less than asked for: nothing more was there.
            Ok(n) if n < buf.len() => return Drained::Empty,
            Ok(_) => continue,
            Err(_) => {}
        }
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN) => Drained::Empty,
            Some(libc::EINTR) => Drained::Interrupted,
            _ => Drained::Failed(err),
        };
    }
    Drained::Empty
}

/// Writes the 8-byte value 1 to `fd` (an eventfd signal), once. Returns the `write` result:
/// `Ok(8)`, or an error such as `EAGAIN` (a saturated eventfd, a full pipe) or `EINTR`.
pub fn signal_one(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: `one` is a readable buffer of 8 bytes; `fd` is kept open by the caller.
    let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Adds `fd` to the epoll instance `epoll` for input events, with `data` as its event data.
pub fn epoll_add(epoll: RawFd, fd: BorrowedFd<'_>, data: u64) -> io::Result<()> {
    let mut event = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: data,
    };
    // SAFETY: `event` is a valid epoll_event for the call. `fd` is open (borrowed); an
    // `epoll` number that is not an epoll instance is refused with EINVAL/EBADF.
    let rc = unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut event) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes `fd` from the epoll instance `epoll` (ENOENT if it was not there).
pub fn epoll_delete(epoll: RawFd, fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut event = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: as in `epoll_add`; the event argument is ignored by EPOLL_CTL_DEL.
    let rc = unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_DEL, fd.as_raw_fd(), &mut event) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Accepts one connection on the listening socket `listener` and closes it at once: its
/// client sees a disconnect. Returns false if none was pending (EAGAIN).
pub fn accept_and_close(listener: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: null address arguments ask for no peer address; the returned descriptor is
    // new and ours alone, and closed right away.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN) => Ok(false),
            _ => Err(err),
        };
    }
    // SAFETY: `fd` was just returned by accept4 and nothing else refers to it.
    drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
    Ok(true)
}

thread_local! {
    /// This thread's kernel thread id, once asked (0: not yet).
    static TID: Cell<libc::pid_t> = const { Cell::new(0) };
}

/// The calling thread's kernel thread id (cached: one system call per thread).
pub fn current_tid() -> libc::pid_t {
    TID.with(|t| {
        if t.get() == 0 {
            // SAFETY: gettid has no arguments and cannot fail.
            t.set(unsafe { libc::gettid() });
        }
        t.get()
    })
}

/// The signal [`interrupt_thread`] sends. SIGURG is ignored by default (a stray one harms
/// nothing) and we never ask for it otherwise (no socket of ours has an owner for OOB data).
pub const INTERRUPT_SIGNAL: libc::c_int = libc::SIGURG;

extern "C" fn on_interrupt(_: libc::c_int) {}

/// Interrupts whatever blocking system call thread `tid` of this process is in: it returns
/// EINTR. Installs, once, a handler for [`INTERRUPT_SIGNAL`] that does nothing and is not
/// `SA_RESTART`; a thread not in a system call just runs it and carries on.
///
/// Used to free a queue worker that a frontend made block on one of its fds (a hostile
/// frontend can clear `O_NONBLOCK` on a descriptor it shares with us). A stray interrupt of
/// a thread that has moved on costs at most one EINTR, which every caller retries or treats
/// as "nothing to do".
pub fn interrupt_thread(tid: libc::pid_t) -> io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut installed = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; we then set
        // a handler that touches nothing (async-signal-safe by being empty) and install it
        // for one signal, whose previous disposition (ignore) we do not need back.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(INTERRUPT_SIGNAL, &action, std::ptr::null_mut()) < 0 {
                installed = Err(io::Error::last_os_error());
            }
        }
    });
    installed?;
    // SAFETY: tgkill only sends a signal; with our own pid it can reach no other process,
    // and a tid that is no longer ours fails with ESRCH.
    if unsafe { libc::tgkill(libc::getpid(), tid, INTERRUPT_SIGNAL) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::sync::atomic::{AtomicI32, Ordering};
    use std::sync::Arc;
    use vmm_sys_util::eventfd::EventFd;

    fn bfd(fd: &EventFd) -> BorrowedFd<'_> {
        // SAFETY: an `EventFd` owns its descriptor until it drops, after the borrow.
        unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
    }

    #[test]
    fn draining_and_signalling_never_block_on_a_nonblocking_fd() {
        let fd = EventFd::new(0).unwrap();
        let borrowed = || bfd(&fd);
        set_nonblocking(borrowed()).unwrap();
        assert!(matches!(drain(borrowed()), Drained::Empty));
        signal_one(borrowed()).unwrap();
        assert!(matches!(drain(borrowed()), Drained::Empty));
        // A saturated counter refuses the signal instead of blocking.
        fd.write(u64::MAX - 1).unwrap();
        let e = signal_one(borrowed()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EAGAIN));
        // A pipe: a half-written value is read, a closed writer is seen.
        let (r, w) = std::io::pipe().unwrap();
        set_nonblocking(r.as_fd()).unwrap();
        std::io::Write::write_all(&mut &w, &[1, 2, 3, 4]).unwrap();
        assert!(matches!(drain(r.as_fd()), Drained::Empty));
        drop(w);
        assert!(matches!(drain(r.as_fd()), Drained::Closed));
    }

    #[test]
    fn an_interrupt_frees_a_thread_blocked_on_an_fd() {
        let fd = Arc::new(EventFd::new(0).unwrap());
        let tid = Arc::new(AtomicI32::new(0));
        let (f, t) = (fd.clone(), tid.clone());
        let blocked = std::thread::spawn(move || {
            t.store(current_tid(), Ordering::SeqCst);
            drain(bfd(&f))
        });
        while tid.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        // Keep interrupting until the read returns (the first may land before it starts).
        while !blocked.is_finished() {
            interrupt_thread(tid.load(Ordering::SeqCst)).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(matches!(blocked.join().unwrap(), Drained::Interrupted));
    }

    #[test]
    fn epoll_registration_can_be_moved_from_one_fd_to_another() {
        let epoll = vmm_sys_util::epoll::Epoll::new().unwrap();
        let (old, new) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        epoll_add(epoll.as_raw_fd(), bfd(&old), 7).unwrap();
        epoll_delete(epoll.as_raw_fd(), bfd(&old)).unwrap();
        assert!(epoll_delete(epoll.as_raw_fd(), bfd(&old)).is_err());
        epoll_add(epoll.as_raw_fd(), bfd(&new), 7).unwrap();
        old.write(1).unwrap();
        new.write(1).unwrap();
        let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 4];
        let n = epoll.wait(1000, &mut events).unwrap();
        assert_eq!(n, 1, "only the new fd is watched");
        assert_eq!(events[0].data(), 7);
    }
}
