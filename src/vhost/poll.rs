//! How a queue worker watches its ring after a drain before it sleeps until the next kick:
//! a driver that makes its next request within the window needs no kick, and the worker no
//! wakeup. Spinning serves best on an idle host; on a contended one (`pressure.rs`) a spin
//! at queue depth 1 takes the CPU the driver needs to make that request, so there the worker
//! yields between looks, or does not watch at all (measured per engine).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

/// Watches the ring for at most `budget` until the driver makes a request available, calling
/// `between` before each look: [`std::hint::spin_loop`] to spin, or
/// [`std::thread::yield_now`] for a driver at queue depth 1 on a contended CPU. A spin there
/// takes the time the driver (or another queue's worker) needs to make the next request; not
/// watching at all costs a kick and a wakeup per request, which on a contended CPU wait their
/// turn. Yielding lets the driver run at once and still catches its request without either:
/// with one core kept busy and two queues at QD1, 1.2-1.4 times the requests for the same CPU
/// (docs/benchmarks.md, 2026-12-05).
pub(super) fn poll_ring<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    budget: Duration,
    between: impl Fn(),
) -> Result<bool, virtio_queue::Error> {
    let start = Instant::now();
    loop {
        // The caller has just found the ring empty.
        between();
        let avail = queue.avail_idx(mem, Ordering::Acquire)?;
        if avail.0 != queue.next_avail() {
            return Ok(true);
        }
        if start.elapsed() >= budget {
            return Ok(false);
        }
    }
}

/// How a worker watches its ring after a drain, before it sleeps until the next kick.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PollKind {
    /// [`poll_ring`] spinning, if a poll permit is free.
    Spin,
    /// [`poll_ring`] yielding between looks.
    Yield,
    /// Not at all.
    Sleep,
}

/// The watch for a drain that served a driver at queue depth 1 on a contended CPU
/// (`contended_qd1`, `pressure.rs`) or not, on the io_uring engine (`on_uring`) or the
/// synchronous one. A contended QD1 driver needs the CPU a spin would take; on io_uring, a
/// yielding poll serves it best, while through the page cache yielding lost 10% of QD1 reads
/// against sleeping (docs/benchmarks.md, 2026-12-05).
pub(super) fn poll_kind(contended_qd1: bool, on_uring: bool) -> PollKind {
    match (contended_qd1, on_uring) {
        (false, _) => PollKind::Spin,
        (true, true) => PollKind::Yield,
        (true, false) => PollKind::Sleep,
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_rig::*;
    use super::*;
    use vhost_user_backend::VringT;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn a_contended_qd1_driver_gets_a_yielding_poll_on_io_uring_and_none_through_the_page_cache() {
        assert_eq!(poll_kind(false, false), PollKind::Spin);
        assert_eq!(poll_kind(false, true), PollKind::Spin);
        assert_eq!(poll_kind(true, true), PollKind::Yield);
        assert_eq!(poll_kind(true, false), PollKind::Sleep);
    }

    /// The yielding poll (a worker on io_uring, at QD1, on a contended CPU) sees a request the
    /// driver makes while it polls, and otherwise gives up once its budget is spent.
    #[test]
    fn the_yielding_poll_catches_a_request_made_meanwhile_and_gives_up_after_its_budget() {
        let r = rig(false);
        let (_gm, vring) = ring(&r);
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let budget = Duration::from_millis(20);
        let start = Instant::now();
        assert!(
            !poll_ring(queue, &r.mem, budget, std::thread::yield_now).unwrap(),
            "nothing available"
        );
        assert!(start.elapsed() >= budget, "polled for its whole budget");
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(5));
                // The driver makes a request available: the avail index moves to 1.
                r.mem.write_obj(1u16, GuestAddress(0x2002)).unwrap();
            });
            let start = Instant::now();
            let found = poll_ring(
                queue,
                &r.mem,
                Duration::from_secs(10),
                std::thread::yield_now,
            )
            .unwrap();
            assert!(found, "the request made during the poll");
            assert!(start.elapsed() < Duration::from_secs(5), "found when made");
        });
        assert_eq!(queue.next_avail(), 0, "seen, not popped");
    }
}
