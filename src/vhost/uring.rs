//! A queue worker's io_uring: readv and writev of requests' buffers on the device's files,
//! completed in any order (`pipeline.rs` puts the answers back in pop order).
//!
//! The module holds the engine's `unsafe`, and here is why it is sound. A submission hands
//! the kernel raw pointers: an iovec array and the memory the iovecs name, both to be read or
//! written until the completion arrives, long after the submitting call returned. So the
//! [`Ring`] owns the values those pointers come from (its slots, each an [`IoBuffers`]) and
//! gives no access to a slot while it is in flight: `slot_mut` (and `idle_slots_mut`) skip busy
//! slots, `submit` refuses one, and nothing else reaches them. A slot's memory is therefore
//! neither changed, moved nor freed by us between submission and completion. The ring waits
//! for every submission before it drops (its slots drop after it), and should the kernel no
//! longer answer, it leaks the slots rather than free memory the kernel may still write.
//! Files are registered with the ring (fixed files): the kernel holds them, so a descriptor
//! closed or reused meanwhile cannot redirect a transfer. They are unregistered when the ring
//! drops (the kernel tears a ring down asynchronously; a daemon killed with SIGKILL may hold
//! its origin's lock for a moment after it is gone).

use super::request::InFlight;
use io_uring::{opcode, types, IoUring};
use std::io;
use std::os::fd::RawFd;

/// Values whose buffers a submission may transfer.
///
/// # Safety
/// `iovecs` must return iovecs naming memory valid for reads and writes of their lengths, and
/// both that memory and the iovec array itself must stay valid and in place for as long as the
/// value lives and is not borrowed mutably (moving the value must not move them: they live on
/// the heap or in memory the value keeps mapped).
pub(super) unsafe trait IoBuffers {
    /// The buffers, in order.
    fn iovecs(&self) -> &[libc::iovec];
}

// SAFETY: a request's iovecs (`GuestIovecs`, which the `InFlight` owns) live in a `Vec` on
// the heap, so moving the `InFlight` moves neither them nor what they name: guest memory,
// checked against the memory table when they were made, which the `GuestIovecs` holds (an
// `Arc` of the table keeps every region of it mapped, whatever the frontend does). They
// change only through `&mut` (`fill`, `consume`, `release_stale`), never while in flight.
unsafe impl IoBuffers for InFlight {
    fn iovecs(&self) -> &[libc::iovec] {
        InFlight::iovecs(self)
    }
}

/// One transfer: all of a slot's buffers, from or to `offset` of registered file `file`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Op {
    pub file: u32,
    pub offset: u64,
    pub write: bool,
}

/// An io_uring and the slots whose buffers it transfers.
pub(super) struct Ring<T: IoBuffers> {
    ring: IoUring,
    slots: Vec<T>,
    busy: Vec<bool>,
    in_flight: usize,
    /// A poll for readability of a wake-up descriptor is in the ring ([`Ring::arm_wake`]).
    wake_armed: bool,
    /// Transfers queued since the kernel last took the submission queue.
    unsubmitted: usize,
}

/// The `user_data` of the wake-up poll (slots use their index).
const WAKE: u64 = u64::MAX;

/// Transfers queued before [`Ring::submit`] hands them to the kernel, not waiting for the
/// next [`Ring::wait`]. The kernel takes a batch through the file system under one block
/// plug, and the device sees none of it until the whole batch is through: a guest's 32
/// writes reached the disk together, the disk idled meanwhile (it had either all 32 or none
/// in flight), and they completed together, so the guest sent the next 32 together too.
/// Handed over four at a time, QD32 4 KiB transfers ran 1.25-1.37 times as fast at one queue
/// (docs/benchmarks.md, 2026-12-05), for one more system call per four requests; one or two
/// at a time were no faster for writes and slower for reads.
const SUBMIT_EVERY: usize = 4;

/// Set (to anything but `0`), io_uring counts as unavailable: the fallback, on demand (tests,
/// or a kernel whose io_uring misbehaves).
pub const DISABLE_ENV: &str = "SNAPBLK_NO_IO_URING";

/// Whether io_uring can be used here: a kernel that has it and lets this process use it
/// (`/proc/sys/kernel/io_uring_disabled`, seccomp filters), tried with a no-op.
pub fn probe() -> io::Result<()> {
    if std::env::var_os(DISABLE_ENV).is_some_and(|v| v != "0") {
        return Err(io::Error::other(format!("disabled by {DISABLE_ENV}")));
    }
    let mut ring = IoUring::new(2)?;
    let nop = opcode::Nop::new().build().user_data(7);
    // SAFETY: a no-op names no memory.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| io::Error::other("the submission queue is full"))?;
    ring.submit_and_wait(1)?;
    let done = ring.completion().next();
    match done {
        Some(c) if c.user_data() == 7 && c.result() >= 0 => Ok(()),
        Some(c) => Err(io::Error::from_raw_os_error(-c.result())),
        None => Err(io::Error::other("no completion for a no-op")),
    }
}

impl<T: IoBuffers + Default> Ring<T> {
    /// A ring for up to `slots` transfers at once on `files` (registered).
    pub(super) fn new(slots: usize, files: &[RawFd]) -> io::Result<Self> {
        let entries = u32::try_from(slots.max(1).next_power_of_two()).map_err(io::Error::other)?;
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(2))
            .build(entries)?;
        ring.submitter().register_files(files)?;
        Ok(Ring {
            ring,
            slots: (0..slots).map(|_| T::default()).collect(),
            busy: vec![false; slots],
            in_flight: 0,
            wake_armed: false,
            unsubmitted: 0,
        })
    }
}

impl<T: IoBuffers> Ring<T> {
    /// Number of slots.
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Transfers submitted and not yet reaped.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Slot `i`, unless it is in flight.
    pub(super) fn slot_mut(&mut self, i: usize) -> Option<&mut T> {
        match self.busy.get(i) {
            Some(false) => self.slots.get_mut(i),
            _ => None,
        }
    }

    /// Every slot not in flight, with its index.
    #[cfg(test)]
    pub(super) fn idle_slots_mut(&mut self) -> impl Iterator<Item = (usize, &mut T)> {
        self.slots
            .iter_mut()
            .zip(&self.busy)
            .enumerate()
            .filter(|(_, (_, busy))| !**busy)
            .map(|(i, (slot, _))| (i, slot))
    }

    /// Queues slot `i`'s transfer; the slot is out of reach until its completion is reaped.
    /// Handed to the kernel once [`SUBMIT_EVERY`] transfers are queued (or the submission
    /// queue is full), else by the next [`Ring::wait`].
    pub(super) fn submit(&mut self, i: usize, op: Op) -> io::Result<()> {
        if self.busy.get(i) != Some(&false) {
            return Err(io::Error::other(format!("slot {i} is busy or missing")));
        }
        let iov = self.slots[i].iovecs();
        let len = u32::try_from(iov.len()).map_err(io::Error::other)?;
        let fd = types::Fixed(op.file);
        let entry = if op.write {
            opcode::Writev::new(fd, iov.as_ptr(), len)
                .offset(op.offset)
                .build()
        } else {
            opcode::Readv::new(fd, iov.as_ptr(), len)
                .offset(op.offset)
                .build()
        }
        .user_data(i as u64);
        loop {
            // SAFETY: the entry names slot i's iovec array and the memory its iovecs name,
            // valid and in place while the slot lives and is not borrowed mutably
            // (`IoBuffers`). From here the slot is busy: no method hands it out until its
            // completion is reaped, and the ring outlives every submission (see `Drop`).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                break;
            }
            // The submission queue is full: hand what it holds to the kernel.
            self.enter(0)?;
        }
        self.busy[i] = true;
        self.in_flight += 1;
        self.unsubmitted += 1;
        if self.unsubmitted >= SUBMIT_EVERY {
            self.submit_early();
        }
        Ok(())
    }

    /// Hands the queued entries to the kernel, once, without waiting for any. The entries are
    /// queued and their slots busy whatever happens here (the kernel owns them from now on),
    /// so nothing fails: entries the kernel does not take now (no memory for them, `EAGAIN`;
    /// completions to reap first, `EBUSY`; a signal; anything else) stay queued for the next
    /// [`Ring::wait`], which retries and reports what persists.
    fn submit_early(&mut self) {
        match self.ring.submit() {
            Ok(_) => self.unsubmitted = 0,
            Err(e) => log::debug!("io_uring: early submission left for the next wait: {e}"),
        }
    }

    /// Submits what is queued and waits until at least `min` completions are ready (fewer if
    /// fewer are in flight; the wake-up poll counts as one).
    pub(super) fn wait(&mut self, min: usize) -> io::Result<()> {
        self.enter(min.min(self.in_flight + usize::from(self.wake_armed)))
    }

    /// Has the ring complete (and so [`Ring::wait`] return) once `fd` is readable, unless
    /// such a poll is in the ring already: how work done outside the ring (the I/O pool)
    /// wakes the thread waiting on it. The poll names no memory.
    pub(super) fn arm_wake(&mut self, fd: RawFd) -> io::Result<()> {
        if self.wake_armed {
            return Ok(());
        }
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(WAKE);
        loop {
            // SAFETY: a poll names a descriptor, no memory; a descriptor closed while it is
            // in the ring only cancels it.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                break;
            }
            self.enter(0)?;
        }
        self.wake_armed = true;
        Ok(())
    }

    fn enter(&mut self, min: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(min) {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                // Interrupted (a watchdog's signal), or the completion queue is full (reap
                // first: the caller does, then waits again).
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    std::thread::yield_now();
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes every completion ready: its slot is idle again, and `f` gets the slot's index and
    /// the result (bytes transferred, or a negative errno).
    pub(super) fn reap(&mut self, mut f: impl FnMut(usize, &mut T, i32)) {
        let mut cq = self.ring.completion();
        cq.sync();
        for c in &mut cq {
            if c.user_data() == WAKE {
                self.wake_armed = false;
                continue;
            }
            let i = c.user_data() as usize;
            if self.busy.get(i) == Some(&true) {
                self.busy[i] = false;
                self.in_flight -= 1;
                f(i, &mut self.slots[i], c.result());
            }
        }
    }
}

impl<T: IoBuffers> Drop for Ring<T> {
    /// Waits for every transfer in flight before the slots (and the memory they keep) go.
    fn drop(&mut self) {
        while self.in_flight > 0 {
            if let Err(e) = self.wait(1) {
                log::error!(
                    "io_uring: cannot wait for {} transfers: {e}",
                    self.in_flight
                );
                // The kernel may still write into the slots' memory: never free it.
                std::mem::forget(std::mem::take(&mut self.slots));
                return;
            }
            self.reap(|_, _, _| {});
        }
        // The kernel frees a ring (and lets go of its registered files) asynchronously, after
        // close: unregistered now, the files are closed (their locks released) when their
        // owner closes them, so a restarted daemon finds the origin free.
        if let Err(e) = self.ring.submitter().unregister_files() {
            log::warn!("io_uring: cannot unregister the files: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::AlignedBuf;
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::path::PathBuf;

    /// A test buffer: one aligned allocation and its iovec.
    struct Buf {
        mem: AlignedBuf,
        iov: Vec<libc::iovec>,
    }

    impl Default for Buf {
        fn default() -> Self {
            let mut mem = AlignedBuf::zeroed(4096);
            let iov = vec![libc::iovec {
                iov_base: mem.as_mut_ptr() as *mut libc::c_void,
                iov_len: mem.len(),
            }];
            Buf { mem, iov }
        }
    }

    // SAFETY: the iovec names `mem`, a heap allocation owned by the value (it does not move
    // when the value does), and both live as long as the value.
    unsafe impl IoBuffers for Buf {
        fn iovecs(&self) -> &[libc::iovec] {
            &self.iov
        }
    }

    /// A file of `slots` zeroed 4 KiB blocks and a ring of `slots` slots on it, or `None`
    /// (said) where io_uring is not available. The file's directory and handle come along:
    /// the ring must not outlive them.
    fn ring_on_file(slots: usize) -> Option<(tempfile::TempDir, PathBuf, File, Ring<Buf>)> {
        if let Err(e) = probe() {
            eprintln!("skipped: no io_uring here: {e}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 4096 * slots]).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let ring = Ring::new(slots, &[file.as_raw_fd()]).unwrap();
        Some((dir, path, file, ring))
    }

    #[test]
    fn transfers_complete_and_slots_come_back() {
        let Some((_dir, path, _file, mut ring)) = ring_on_file(4) else {
            return;
        };
        for i in 0..4 {
            ring.slot_mut(i).unwrap().mem.fill(0x30 + i as u8);
            let op = Op {
                file: 0,
                offset: 4096 * i as u64,
                write: true,
            };
            ring.submit(i, op).unwrap();
            assert!(ring.slot_mut(i).is_none(), "busy while in flight");
        }
        assert!(ring
            .submit(
                0,
                Op {
                    file: 0,
                    offset: 0,
                    write: false
                }
            )
            .is_err());
        assert_eq!(ring.idle_slots_mut().count(), 0);
        let mut done = 0;
        while ring.in_flight() > 0 {
            ring.wait(1).unwrap();
            ring.reap(|_, _, res| {
                assert_eq!(res, 4096);
                done += 1;
            });
        }
        assert_eq!(done, 4);
        let back = std::fs::read(&path).unwrap();
        for i in 0..4 {
            assert!(back[4096 * i..4096 * (i + 1)]
                .iter()
                .all(|&b| b == 0x30 + i as u8));
        }
        ring.slot_mut(2).unwrap().mem.fill(0);
        ring.submit(
            2,
            Op {
                file: 0,
                offset: 4096,
                write: false,
            },
        )
        .unwrap();
        drop(ring); // waits for the read in flight
    }

    #[test]
    fn a_few_queued_transfers_reach_the_kernel_without_a_wait() {
        let Some((_dir, path, _file, mut ring)) = ring_on_file(SUBMIT_EVERY + 1) else {
            return;
        };
        let write = |i: usize| Op {
            file: 0,
            offset: 4096 * i as u64,
            write: true,
        };
        // One fewer than SUBMIT_EVERY stays queued: nothing is written.
        for i in 0..SUBMIT_EVERY - 1 {
            ring.slot_mut(i).unwrap().mem.fill(0x41);
            ring.submit(i, write(i)).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
        // The SUBMIT_EVERY-th goes to the kernel with the others, before any wait.
        let last = SUBMIT_EVERY - 1;
        ring.slot_mut(last).unwrap().mem.fill(0x41);
        ring.submit(last, write(last)).unwrap();
        let written = 4096 * SUBMIT_EVERY;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let back = std::fs::read(&path).unwrap();
            if back[..written].iter().all(|&b| b == 0x41) {
                assert!(back[written..].iter().all(|&b| b == 0));
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the writes never reached the file"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        while ring.in_flight() > 0 {
            ring.wait(1).unwrap();
            ring.reap(|_, _, res| assert_eq!(res, 4096));
        }
    }
}
