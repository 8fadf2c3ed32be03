//! A queue worker: pops descriptor chains, parses them, does the I/O, answers with a status.
//!
//! Data moves between the device and guest memory directly: guest buffers become iovecs for
//! preadv/pwritev, with no bounce buffer. The worker keeps its request and iovec vectors
//! across requests, so the steady state allocates nothing.

use super::backend::{BlkBackend, GuestMem};
use crate::device::{BlockDevice, IoCounters};
use crate::virtio_blk::{
    ParseError, Request, RequestKind, StatusSlot, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use log::{debug, warn};
use std::io::{self, IoSlice, IoSliceMut};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemory, Permissions};

/// Per-queue reusable state.
#[derive(Default)]
pub struct QueueWorker {
    request: Request,
    iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovecs are only filled and used within one `process_queue` call on the worker's
// own thread; between calls they hold stale pointers that are never dereferenced.
unsafe impl Send for QueueWorker {}

impl QueueWorker {
    /// Drains the queue, then notifies the driver once for the whole batch if it wants it.
    pub fn process_queue(
        &mut self,
        backend: &BlkBackend,
        vring: &VringRwLock<GuestMem>,
        event_idx: bool,
        mem: &GuestMem,
    ) -> io::Result<()> {
        let mem = mem.memory();
        let mem = &*mem;
        let mut state = vring.get_mut();
        let mut used_any = false;
        loop {
            if event_idx {
                state
                    .get_queue_mut()
                    .disable_notification(mem)
                    .map_err(io::Error::other)?;
            }
            while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let used_len = self.handle_chain(backend, chain, mem);
                state
                    .get_queue_mut()
                    .add_used(mem, head, used_len)
                    .map_err(io::Error::other)?;
                used_any = true;
            }
            // With EVENT_IDX, re-enable notifications and look again: a request that arrived
            // in between would otherwise wait for the next kick.
            if !event_idx
                || !state
                    .get_queue_mut()
                    .enable_notification(mem)
                    .map_err(io::Error::other)?
            {
                break;
            }
        }
        if used_any
            && state
                .get_queue_mut()
                .needs_notification(mem)
                .map_err(io::Error::other)?
        {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    /// Handles one chain and returns the number of bytes written into guest buffers.
    fn handle_chain<M>(
        &mut self,
        backend: &BlkBackend,
        chain: virtio_queue::DescriptorChain<&M>,
        mem: &M,
    ) -> u32
    where
        M: GuestMemory,
    {
        let device = backend.device();
        let counters = device.counters();
        if let Err(e) = self.request.parse(chain.clone(), mem, backend.limits()) {
            IoCounters::add(&counters.errors, 1);
            if matches!(e, ParseError::NoStatus | ParseError::BadStatusDescriptor) {
                warn!("dropping request with no usable status descriptor: {e}");
                return 0;
            }
            debug!("refusing request: {e}");
            return write_status(mem, self.request.status, e.status());
        }
        let (status, data_written) = match self.execute(backend, device, mem) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(e) => {
                IoCounters::add(&counters.errors, 1);
                warn!("I/O error on {:?}: {e}", self.request.kind);
                (VIRTIO_BLK_S_IOERR, 0)
            }
        };
        data_written.saturating_add(write_status(mem, self.request.status, status))
    }

    /// Does the I/O of a parsed request; returns the bytes written into guest memory.
    fn execute<M: GuestMemory>(
        &mut self,
        backend: &BlkBackend,
        device: &dyn BlockDevice,
        mem: &M,
    ) -> io::Result<u32> {
        let req = &self.request;
        let c = device.counters();
        match req.kind {
            RequestKind::Read { offset } => {
                let iov = guest_iovecs(&mut self.iovecs, req, mem, Permissions::Write)?;
                // SAFETY: IoSliceMut is guaranteed ABI-compatible with `struct iovec` on Unix.
                // Each iovec points into a guest memory region kept mapped by `mem` for the
                // whole call, and was bounds-checked by `get_slices`.
                let bufs = unsafe {
                    std::slice::from_raw_parts_mut(
                        iov.as_mut_ptr() as *mut IoSliceMut<'_>,
                        iov.len(),
                    )
                };
                device.read_vectored(bufs, offset)?;
                IoCounters::add(&c.reads, 1);
                IoCounters::add(&c.read_bytes, req.data_len);
                // data_len <= seg_max * size_max fits in u32 for our limits.
                Ok(u32::try_from(req.data_len).unwrap_or(u32::MAX))
            }
            RequestKind::Write { offset } => {
                let iov = guest_iovecs(&mut self.iovecs, req, mem, Permissions::Read)?;
                // SAFETY: as for reads; IoSlice has the same guarantee and is only read from.
                let bufs = unsafe {
                    std::slice::from_raw_parts(iov.as_ptr() as *const IoSlice<'_>, iov.len())
                };
                device.write_vectored(bufs, offset)?;
                if !backend.writeback() {
                    device.flush()?;
                }
                IoCounters::add(&c.writes, 1);
                IoCounters::add(&c.write_bytes, req.data_len);
                Ok(0)
            }
            RequestKind::Flush => {
                device.flush()?;
                IoCounters::add(&c.flushes, 1);
                Ok(0)
            }
            RequestKind::GetId => {
                let id = backend.id();
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
                IoCounters::add(&c.discards, 1);
                Ok(0)
            }
            RequestKind::WriteZeroes => {
                for r in &req.ranges {
                    device.write_zeroes(r.offset, r.len, r.unmap)?;
                }
                IoCounters::add(&c.write_zeroes, 1);
                Ok(0)
            }
        }
    }
}

/// Translates the request's guest buffers into host iovecs, following region boundaries.
fn guest_iovecs<'v, M: GuestMemory>(
    iovecs: &'v mut Vec<libc::iovec>,
    req: &Request,
    mem: &M,
    access: Permissions,
) -> io::Result<&'v mut [libc::iovec]> {
    iovecs.clear();
    for seg in &req.segments {
        let slices = mem
            .get_slices(seg.addr, seg.len as usize, access)
            .map_err(io::Error::other)?;
        for slice in slices {
            let slice = slice.map_err(io::Error::other)?;
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr() as *mut libc::c_void,
                iov_len: slice.len(),
            });
        }
    }
    Ok(iovecs.as_mut_slice())
}

/// Writes the status byte; returns 1 if it was written, 0 if the address was bad.
fn write_status<M: GuestMemory>(mem: &M, slot: StatusSlot, status: u8) -> u32 {
    match mem.write_obj(status, slot.addr) {
        Ok(()) => 1,
        Err(e) => {
            warn!(
                "cannot write status at {:#x}: {e}",
                slot.addr.0
            );
            0
        }
    }
}
