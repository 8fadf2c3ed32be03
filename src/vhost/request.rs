//! One request from the ring to its answer: parse it, do its I/O, then complete it in one
//! step (status byte, counters, write-through flush, used length).
//!
//! Data moves between the device and guest memory directly: guest buffers become iovecs for
//! preadv/pwritev ([`GuestIovecs`]), with no bounce buffer. An [`InFlight`] is reused from
//! request to request, so the steady state allocates nothing.

use super::dirty::{mark, mark_buffers};
use super::guest::{GuestIovecs, GuestMemGuard, MemView};
use super::iopool::in_batch;
use crate::device::{BlockDevice, DirectTarget, IoCounters};
use crate::sys::guest_faults;
use crate::virtio_blk::{
    Limits, ParseError, Request, RequestKind, StatusAddr, ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
};
use log::{debug, warn};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, Permissions};

/// What running a request needs from its connection, borrowed for one pass over a queue.
#[derive(Clone, Copy)]
pub(super) struct RequestContext<'a> {
    pub device: &'a dyn BlockDevice,
    /// The limits, with the device's size when the batch began (a resize changes it).
    pub limits: Limits,
    /// The GET_ID answer.
    pub id: &'a [u8; ID_BYTES],
    /// Write-back cache enabled; the driver may turn it off at any time (config space).
    pub writeback: &'a AtomicBool,
    /// The frontend logs the pages we write (it is migrating the VM: `dirty.rs`).
    pub logging: &'a AtomicBool,
    /// Told when guest memory vanished under a request (a contained SIGBUS, see
    /// `sys::guest_faults`).
    pub faults: &'a dyn MemoryFaults,
}

/// Where a request reports guest memory that vanished under it (the connection, which drops
/// itself).
pub(super) trait MemoryFaults: Sync {
    fn memory_fault(&self);
}

impl RequestContext<'_> {
    /// Whether the write-back cache is on: otherwise every write is flushed before it is
    /// answered (write-through).
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }
}

/// One request in flight: its parsed form, its guest buffers and its answer.
#[derive(Default)]
pub(super) struct InFlight {
    head: u16,
    /// Parsed and not yet run.
    ready: bool,
    request: Request,
    buffers: GuestIovecs,
    /// Bytes written into guest memory (data and status), once answered.
    used_len: u32,
    /// How long running it took.
    took: Duration,
}

/// How a request a queue may submit itself begins ([`InFlight::start_direct`]).
pub(super) enum Start {
    /// Submit it: its buffers are translated and aligned, and go to `target`.
    Direct {
        target: DirectTarget,
        write: bool,
        /// Bytes to transfer.
        len: u64,
    },
    /// Run it through the device ([`InFlight::run`]).
    Run,
    /// It is answered already (its buffers could not be translated).
    Answered,
}

/// How a request ended, for [`InFlight::finish`].
enum Outcome {
    /// Done; this many bytes of data were written into guest memory.
    Done(u32),
    /// The I/O failed.
    Failed(io::Error),
    /// The chain is not a valid request.
    Refused(ParseError),
}

impl InFlight {
    /// Parses a chain. A request that cannot be parsed is answered here (through
    /// [`InFlight::finish`]) and not run.
    pub(super) fn prepare(
        &mut self,
        ctx: &RequestContext<'_>,
        chain: DescriptorChain<&MemView>,
        mem: &GuestMemGuard,
    ) {
        self.head = chain.head_index();
        self.took = Duration::ZERO;
        let parsed = self.request.parse(chain, &**mem, &ctx.limits);
        // What the parse read may be garbage: guest memory vanished under it.
        let faulted = guest_faults::take_thread_fault();
        match parsed {
            Ok(()) if !faulted => {
                self.ready = true;
                self.used_len = 0;
            }
            Ok(()) => {
                self.ready = false;
                self.finish(ctx, mem, Outcome::Failed(memory_fault(ctx)));
            }
            Err(e) => {
                if faulted {
                    memory_fault(ctx);
                }
                self.ready = false;
                self.finish(ctx, mem, Outcome::Refused(e));
            }
        }
    }

    /// The parsed request, if it is waiting to run.
    pub(super) fn pending(&self) -> Option<RequestKind> {
        self.ready.then_some(self.request.kind)
    }

    pub(super) fn head(&self) -> u16 {
        self.head
    }

    /// Bytes written into guest memory (data and status), once answered.
    pub(super) fn used_len(&self) -> u32 {
        self.used_len
    }

    /// How long running it took (zero unless it was timed).
    pub(super) fn took(&self) -> Duration {
        self.took
    }

    /// Lets go of the guest memory its buffers pointed into, unless that is still `current`.
    pub(super) fn release_stale_memory(&mut self, current: &GuestMemGuard) {
        self.buffers.release_stale(current);
    }

    /// The buffers of a request [`InFlight::start_direct`] started, as iovecs.
    pub(super) fn iovecs(&self) -> &[libc::iovec] {
        self.buffers.iovecs()
    }

    /// Drops the first `n` bytes of a started request's buffers (a short transfer).
    pub(super) fn consume(&mut self, n: usize) {
        self.buffers.consume(n);
    }

    /// Starts a parsed read or write the queue may submit itself: its guest buffers used in
    /// place when they meet the device's direct-I/O alignment and the device says where they
    /// go ([`BlockDevice::direct_target`]); otherwise it is to be run.
    pub(super) fn start_direct(&mut self, ctx: &RequestContext<'_>, mem: &GuestMemGuard) -> Start {
        let (write, offset) = match self.pending() {
            Some(RequestKind::Read { offset }) => (false, offset),
            Some(RequestKind::Write { offset }) => (true, offset),
            _ => return Start::Run,
        };
        let access = if write {
            Permissions::Read
        } else {
            Permissions::Write
        };
        if let Err(e) = self.buffers.fill(&self.request.segments, mem, access) {
            self.ready = false;
            self.finish(ctx, mem, Outcome::Failed(e));
            return Start::Answered;
        }
        let device = ctx.device;
        let bufs = self.buffers.iovecs().iter();
        if !device
            .io_align()
            .fits(offset, bufs.map(|v| (v.iov_base as usize, v.iov_len)))
        {
            return Start::Run;
        }
        let len = self.request.data_len;
        let Some(target) = device.direct_target(write, offset, len) else {
            return Start::Run;
        };
        IoCounters::add(&device.counters().aligned, 1);
        self.ready = false;
        Start::Direct { target, write, len }
    }

    /// Answers a request [`InFlight::start_direct`] started, once its transfer is over.
    pub(super) fn complete_direct(
        &mut self,
        ctx: &RequestContext<'_>,
        mem: &GuestMemGuard,
        result: io::Result<()>,
    ) {
        let outcome = match (result, self.request.kind) {
            // data_len <= seg_max * size_max fits in u32 for our limits.
            (Ok(()), RequestKind::Read { .. }) => {
                Outcome::Done(u32::try_from(self.request.data_len).unwrap_or(u32::MAX))
            }
            (Ok(()), _) => Outcome::Done(0),
            (Err(e), _) => Outcome::Failed(e),
        };
        self.finish(ctx, mem, outcome);
    }

    /// Runs a prepared request and answers it; with `timed`, records how long it took.
    pub(super) fn run(&mut self, ctx: &RequestContext<'_>, mem: &GuestMemGuard, timed: bool) {
        if !self.ready {
            return;
        }
        self.ready = false;
        let start = timed.then(Instant::now);
        let outcome = match self.execute(ctx, mem) {
            Ok(n) => Outcome::Done(n),
            Err(e) => Outcome::Failed(e),
        };
        self.finish(ctx, mem, outcome);
        if let Some(start) = start {
            self.took = start.elapsed();
        }
    }

    /// Does the I/O of a parsed request, nothing else; returns the bytes of data written into
    /// guest memory.
    fn execute(&mut self, ctx: &RequestContext<'_>, mem: &GuestMemGuard) -> io::Result<u32> {
        let req = &self.request;
        let device = ctx.device;
        match req.kind {
            RequestKind::Read { offset } => {
                self.buffers.fill(&req.segments, mem, Permissions::Write)?;
                if split_in_two(req.data_len) {
                    let right_off = self.buffers.split_in_two(req.data_len);
                    let (left, right) = self.buffers.halves_mut();
                    let (a, b) = rayon::join(
                        || device.read_vectored(left, offset),
                        || device.read_vectored(right, offset + right_off),
                    );
                    a.and(b)?;
                } else {
                    device.read_vectored(self.buffers.io_slices_mut(), offset)?;
                }
                // data_len <= seg_max * size_max fits in u32 for our limits.
                Ok(u32::try_from(req.data_len).unwrap_or(u32::MAX))
            }
            RequestKind::Write { offset } => {
                self.buffers.fill(&req.segments, mem, Permissions::Read)?;
                if split_in_two(req.data_len) {
                    let right_off = self.buffers.split_in_two(req.data_len);
                    let (left, right) = self.buffers.halves();
                    let (a, b) = rayon::join(
                        || device.write_vectored(left, offset),
                        || device.write_vectored(right, offset + right_off),
                    );
                    a.and(b)?;
                } else {
                    device.write_vectored(self.buffers.io_slices(), offset)?;
                }
                Ok(0)
            }
            RequestKind::Flush => device.flush().map(|()| 0),
            RequestKind::GetId => {
                let id = ctx.id;
                let mut done = 0usize;
                for seg in &req.segments {
                    if done == id.len() {
                        break;
                    }
                    let n = (seg.len as usize).min(id.len() - done);
                    mem.write_slice(&id[done..done + n], seg.addr)
                        .map_err(io::Error::other)?;
                    done += n;
                }
                Ok(done as u32)
            }
            RequestKind::Discard => {
                for r in &req.ranges {
                    device.discard(r.offset, r.len)?;
                }
                Ok(0)
            }
            RequestKind::WriteZeroes => {
                for r in &req.ranges {
                    device.write_zeroes(r.offset, r.len, r.unmap)?;
                }
                Ok(0)
            }
        }
    }

    /// Completes a request, however it ended: flushes a change made in write-through mode
    /// (its failure fails the request), counts it, writes its status and sets its used
    /// length.
    fn finish(&mut self, ctx: &RequestContext<'_>, mem: &GuestMemGuard, outcome: Outcome) {
        let device = ctx.device;
        let c = device.counters();
        let kind = self.request.kind;
        let outcome = if guest_faults::take_thread_fault() {
            // The I/O read or wrote guest memory that vanished under it.
            Outcome::Failed(memory_fault(ctx))
        } else {
            outcome
        };
        let outcome = match outcome {
            Outcome::Done(n) if changes_data(kind) && !ctx.writeback() => match device.flush() {
                Ok(()) => Outcome::Done(n),
                Err(e) => Outcome::Failed(e),
            },
            outcome => outcome,
        };
        let ran = !matches!(outcome, Outcome::Refused(_));
        let (status, data_written) = match outcome {
            Outcome::Done(n) => {
                count(c, kind, self.request.data_len);
                (VIRTIO_BLK_S_OK, n)
            }
            Outcome::Failed(e) => {
                IoCounters::add(&c.errors, 1);
                warn!("I/O error on {kind:?}: {e}");
                (VIRTIO_BLK_S_IOERR, 0)
            }
            Outcome::Refused(e) => {
                IoCounters::add(&c.errors, 1);
                if matches!(e, ParseError::NoStatus | ParseError::BadStatusDescriptor) {
                    warn!("dropping request with no usable status descriptor: {e}");
                    self.used_len = 0;
                    return;
                }
                debug!("refusing request: {e}");
                (e.status(), 0)
            }
        };
        self.used_len = data_written.saturating_add(write_status(mem, self.request.status, status));
        if ctx.logging.load(Ordering::Relaxed) {
            self.log_writes(mem, ran);
        }
    }

    /// Marks in the frontend's dirty log what answering this request wrote into guest memory
    /// (the workers' view of it has no log: `view.rs`): the data of a read or GET_ID that ran
    /// (even a failed read may have written some) and the status byte. Called once they are
    /// written, so a page the frontend copies after it saw the mark has them.
    fn log_writes(&self, mem: &GuestMemGuard, ran: bool) {
        if ran
            && matches!(
                self.request.kind,
                RequestKind::Read { .. } | RequestKind::GetId
            )
        {
            mark_buffers(mem.owner(), &self.request.segments);
        }
        mark(mem.owner(), self.request.status.addr, 1);
    }
}

/// Reports a guest memory fault to the connection; the error a request fails with.
fn memory_fault(ctx: &RequestContext<'_>) -> io::Error {
    ctx.faults.memory_fault();
    io::Error::other("guest memory vanished under the request (its file shrank)")
}

/// Whether a request changes the device's data, and so is flushed in write-through mode.
fn changes_data(kind: RequestKind) -> bool {
    matches!(
        kind,
        RequestKind::Write { .. } | RequestKind::Discard | RequestKind::WriteZeroes
    )
}

/// Counts a request that succeeded.
fn count(c: &IoCounters, kind: RequestKind, data_len: u64) {
    match kind {
        RequestKind::Read { .. } => {
            IoCounters::add(&c.reads, 1);
            IoCounters::add(&c.read_bytes, data_len);
        }
        RequestKind::Write { .. } => {
            IoCounters::add(&c.writes, 1);
            IoCounters::add(&c.write_bytes, data_len);
        }
        RequestKind::Flush => IoCounters::add(&c.flushes, 1),
        RequestKind::GetId => {}
        RequestKind::Discard => IoCounters::add(&c.discards, 1),
        RequestKind::WriteZeroes => IoCounters::add(&c.write_zeroes, 1),
    }
}

/// Requests at least this large are split in two halves done in parallel: one large copy per
/// queue at a time would leave the other cores idle (measured in docs/benchmarks.md).
const PARALLEL_MIN: u64 = 256 * 1024;

/// Whether to split a request of `len` bytes: only when it runs inline. On the I/O pool the
/// batch is already parallel, and a pool thread waiting for its other half would run other
/// queues' stolen requests meanwhile, tying this batch's latency to theirs.
fn split_in_two(len: u64) -> bool {
    len >= PARALLEL_MIN && rayon::current_thread_index().is_none() && !in_batch()
}

/// Writes the status byte; returns 1 if it was written, 0 if the address was bad.
fn write_status(mem: &GuestMemGuard, at: StatusAddr, status: u8) -> u32 {
    match mem.write_obj(status, at.addr) {
        Ok(()) => 1,
        Err(e) => {
            warn!("cannot write status at {:#x}: {e}", at.addr.0);
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_rig::*;
    use super::*;
    use crate::virtio_blk::*;
    use std::sync::atomic::Ordering;
    use vhost_user_backend::VhostUserBackend;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use vm_memory::GuestAddress;

    #[test]
    fn read_write_flush_get_id() {
        let mut r = rig(false);
        let st = desc(STATUS, 1, true);
        // Read two sectors split over two buffers.
        let h = r.header(VIRTIO_BLK_T_IN, 2);
        assert_eq!(
            r.run(&[h, desc(DATA, 512, true), desc(DATA + 4096, 512, true), st]),
            (1025, VIRTIO_BLK_S_OK)
        );
        assert_eq!(r.mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 2);
        assert_eq!(r.mem.read_obj::<u8>(GuestAddress(DATA + 4096)).unwrap(), 3);
        // Write one sector and see it in the device.
        r.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        let h = r.header(VIRTIO_BLK_T_OUT, 10);
        assert_eq!(
            r.run(&[h, desc(DATA, 512, false), st]),
            (1, VIRTIO_BLK_S_OK)
        );
        assert!(r.device.data.lock().unwrap()[5120..5632]
            .iter()
            .all(|&b| b == 0xab));
        let h = r.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(r.run(&[h, st]), (1, VIRTIO_BLK_S_OK));
        assert_eq!(r.device.flushes.load(Ordering::Relaxed), 1);
        let h = r.header(VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(r.run(&[h, desc(DATA, 20, true), st]), (21, VIRTIO_BLK_S_OK));
        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..12], b"mock-serial\0");
    }

    #[test]
    fn writethrough_flushes_every_write() {
        let mut r = rig(false);
        r.backend
            .set_config(ConfigSpace::WRITEBACK as u32, &[0])
            .unwrap();
        let h = r.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            r.run(&[h, desc(DATA, 512, false), desc(STATUS, 1, true)]),
            (1, VIRTIO_BLK_S_OK)
        );
        assert_eq!(r.device.flushes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn malformed_requests_get_an_error_status() {
        let mut r = rig(false);
        let st = desc(STATUS, 1, true);
        // (request type, sector, descriptors after the header, expected (used length, status))
        let cases = [
            // Unknown type.
            (77, 0, vec![st], (1, VIRTIO_BLK_S_UNSUPP)),
            // Past the end, and overflowing.
            (
                VIRTIO_BLK_T_IN,
                127,
                vec![desc(DATA, 1024, true), st],
                (1, VIRTIO_BLK_S_IOERR),
            ),
            (
                VIRTIO_BLK_T_OUT,
                u64::MAX - 1,
                vec![desc(DATA, 1024, false), st],
                (1, VIRTIO_BLK_S_IOERR),
            ),
            // Wrong direction: a read into a device-readable buffer.
            (
                VIRTIO_BLK_T_IN,
                0,
                vec![desc(DATA, 512, false), st],
                (1, VIRTIO_BLK_S_IOERR),
            ),
            // Data buffer outside guest memory.
            (
                VIRTIO_BLK_T_IN,
                0,
                vec![desc(MEM_SIZE - 256, 512, true), st],
                (1, VIRTIO_BLK_S_IOERR),
            ),
            // Misaligned length.
            (
                VIRTIO_BLK_T_OUT,
                0,
                vec![desc(DATA, 100, false), st],
                (1, VIRTIO_BLK_S_IOERR),
            ),
            // Discard with a truncated range.
            (
                VIRTIO_BLK_T_DISCARD,
                0,
                vec![desc(DATA, 12, false), st],
                (1, VIRTIO_BLK_S_IOERR),
            ),
        ];
        for (t, sector, rest, want) in cases {
            let mut descs = vec![r.header(t, sector)];
            descs.extend(rest);
            assert_eq!(r.run(&descs), want, "type {t} sector {sector}: {descs:?}");
        }
        // A short header.
        assert_eq!(r.run(&[desc(HDR, 8, false), st]), (1, VIRTIO_BLK_S_IOERR));
        // Nowhere to put a status: the chain is consumed with nothing written, no panic.
        let h = r.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            r.run(&[h, desc(DATA, 512, true), desc(STATUS, 1, false)]).0,
            0
        );
        let h = r.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(r.run(&[h, desc(MEM_SIZE + 4096, 1, true)]).0, 0);
        // The device is untouched by all of it.
        assert_eq!(r.device.data.lock().unwrap()[0], 0);
    }

    #[test]
    fn read_only_and_io_errors() {
        let mut r = rig(true);
        let st = desc(STATUS, 1, true);
        let h = r.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            r.run(&[h, desc(DATA, 512, false), st]),
            (1, VIRTIO_BLK_S_IOERR)
        );
        let h = r.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            r.run(&[h, desc(DATA, 512, true), st]),
            (513, VIRTIO_BLK_S_OK)
        );
        r.device.fail.store(true, Ordering::Relaxed);
        let h = r.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            r.run(&[h, desc(DATA, 512, true), st]),
            (1, VIRTIO_BLK_S_IOERR)
        );
        let h = r.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(r.run(&[h, st]), (1, VIRTIO_BLK_S_IOERR));
    }

    #[test]
    fn large_requests_split_in_parallel_land_in_place() {
        let mut r = rig_sized(false, 2 << 20);
        let len = 1usize << 20;
        assert!(len as u64 >= PARALLEL_MIN);
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        r.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        let st = desc(STATUS, 1, true);
        // Three buffers of uneven sizes, so the cut falls inside one.
        let parts = [
            (0u64, 300 * 1024u32),
            (300 * 1024, 400 * 1024),
            (700 * 1024, 324 * 1024),
        ];
        let h = r.header(VIRTIO_BLK_T_OUT, 8);
        let mut descs = vec![h];
        descs.extend(parts.iter().map(|&(o, n)| desc(DATA + o, n, false)));
        descs.push(st);
        assert_eq!(r.run(&descs), (1, VIRTIO_BLK_S_OK));
        assert_eq!(&r.device.data.lock().unwrap()[4096..4096 + len], &data[..]);

        r.mem
            .write_slice(&vec![0u8; len], GuestAddress(DATA))
            .unwrap();
        let h = r.header(VIRTIO_BLK_T_IN, 8);
        let mut descs = vec![h];
        descs.extend(parts.iter().map(|&(o, n)| desc(DATA + o, n, true)));
        descs.push(st);
        assert_eq!(r.run(&descs), (len as u32 + 1, VIRTIO_BLK_S_OK));
        let mut back = vec![0u8; len];
        r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn indirect_descriptor_tables_are_followed() {
        let mut r = rig(false);
        let table = 0x38_0000u64;
        let h = r.header(VIRTIO_BLK_T_IN, 4);
        let inner = [h, desc(DATA, 512, true), desc(STATUS, 1, true)];
        for (i, d) in inner.iter().enumerate() {
            let d = SplitDescriptor::from(*d);
            let next_flag = if i + 1 < inner.len() { 1u16 } else { 0 };
            let d =
                SplitDescriptor::new(d.addr().0, d.len(), d.flags() | next_flag, (i + 1) as u16);
            r.mem
                .write_obj(d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let outer = RawDescriptor::from(SplitDescriptor::new(
            table,
            48,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        assert_eq!(r.run(&[outer]), (513, VIRTIO_BLK_S_OK));
        assert_eq!(r.mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 4);
    }
}
