//! Thin wrappers over system calls and fd tricks the crates we use do not wrap.
//!
//! Each keeps its `unsafe` here, next to the reason it is sound, so that the modules calling
//! them (the vhost server and backend, the socket helpers) need none.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Duration;
use vmm_sys_util::event::EventConsumer;

/// `poll(2)`: waits until one of `fds` has an event, for at most `timeout` (`None`: no limit).
/// Returns how many entries have events in their `revents` (0 on timeout).
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = timeout.map_or(-1, |t| {
        libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX)
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
