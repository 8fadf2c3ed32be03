//! What a queue submitting its own direct I/O (io_uring) needs from the engine: the origin's
//! descriptor and alignment, and leave for an origin write to bypass the engine.
//!
//! An origin read always may: the origin's view is the origin image (`read.rs`). An origin
//! write may only when nothing in the engine would care about it: no snapshot exists (so no
//! copy-out), every record is durable (a delete or an inoperative marking not yet durable
//! could bring a reader of the old data back after a crash), and no snapshot is being created
//! (the gate, `gate.rs`, which creation closes and waits on).

use super::engine::CacheObject;
use super::gate::OriginWriteTicket;
use crate::storage::IoAlign;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

impl CacheObject {
    /// What direct I/O asks of transfers to the origin and the cache object.
    pub fn io_align(&self) -> IoAlign {
        self.origin.io_align().max(self.cache.io_align())
    }

    /// The largest logical and physical block sizes of the origin and the cache object: the
    /// unit the devices are served in.
    pub fn block_sizes(&self) -> (u32, u32) {
        let lbs = self
            .origin
            .logical_block_size()
            .max(self.cache.logical_block_size());
        let pbs = self
            .origin
            .physical_block_size()
            .max(self.cache.physical_block_size());
        (lbs, pbs.max(lbs))
    }

    /// The origin's descriptor, for reads (and bypassing writes) a queue submits itself.
    pub fn origin_fd(&self) -> Option<RawFd> {
        self.origin.raw_fd()
    }

    /// Leave for one origin write to go to the origin image directly, held until it completes;
    /// `None`: it must go through [`CacheObject::write`].
    pub fn origin_write_ticket(&self) -> Option<OriginWriteTicket> {
        if self.has_snapshots() || self.failed.load(Ordering::Relaxed) {
            return None;
        }
        let ticket = self.direct_gate.enter()?;
        // Checked again with the ticket held: a creation that began meanwhile waits for it,
        // one that finished is seen here.
        if self.has_snapshots() {
            return None;
        }
        let pending = self.read_state().epoch;
        (pending <= self.durable_epoch.load(Ordering::Acquire)).then_some(ticket)
    }
}
