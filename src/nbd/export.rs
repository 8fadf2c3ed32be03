//! What a connection does with its export: what it advertises (transmission flags, block
//! sizes), its data (through the device adapter, so the device's I/O counters see NBD I/O as
//! they see a VM's), the zero runs a structured read sends as holes, and the answers to
//! block-status queries for each metadata context, from the engine's queries.

use super::chunks::{BlockStatus, Descriptor};
use super::contexts::Context;
use super::proto::{
    EINVAL, EIO, ENOSPC, EPERM, FLAG_CAN_MULTI_CONN, FLAG_HAS_FLAGS, FLAG_READ_ONLY,
    FLAG_SEND_CACHE, FLAG_SEND_DF, FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_TRIM,
    FLAG_SEND_WRITE_ZEROES, STATE_DIRTY, STATE_HOLE, STATE_ZERO,
};
use super::registry::Export;
use crate::cow::{CowError, DeviceId, Extent, Source};
use crate::device::BlockDevice;
use std::io::{self, IoSlice, IoSliceMut};

/// Largest READ or WRITE payload (the size every client handles, 2^25).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Smallest addressable unit: the engine's sector.
pub const MIN_BLOCK: u32 = 512;
/// Most descriptors one block-status reply carries per context (the rest is asked again).
pub const MAX_DESCRIPTORS: usize = 1 << 16;

/// An NBD error value and a message for the client.
pub type Failure = (u32, String);

/// A metadata context selected for a connection, with the id it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    pub id: u32,
    pub context: Context,
    /// For a dirty bitmap, the device it compares with.
    pub device: Option<DeviceId>,
}

/// The NBD error for a failed device operation (the adapter maps engine errors to kinds).
pub fn io_failure(e: &io::Error) -> Failure {
    let code = match e.kind() {
        io::ErrorKind::ReadOnlyFilesystem | io::ErrorKind::PermissionDenied => EPERM,
        io::ErrorKind::StorageFull => ENOSPC,
        io::ErrorKind::InvalidInput => EINVAL,
        _ => EIO,
    };
    (code, e.to_string())
}

/// The NBD error for a failed engine query.
fn query_failure(e: CowError) -> Failure {
    let code = match e {
        CowError::OutOfRange { .. } => EINVAL,
        _ => EIO,
    };
    (code, e.to_string())
}

/// Transmission flags of an export. `NBD_FLAG_CAN_MULTI_CONN` is true of every snapblk
/// export: all connections (and the vhost-user queues) share one engine with no
/// per-connection cache, so a completed write is visible to every connection at once, and a
/// FLUSH (or FUA) on any connection commits and syncs everything completed on all of them.
pub fn transmission_flags(writable: bool, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_CACHE | FLAG_CAN_MULTI_CONN;
    if structured {
        flags |= FLAG_SEND_DF;
    }
    if writable {
        flags |= FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    } else {
        flags |= FLAG_READ_ONLY;
    }
    flags
}

impl Export {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.device.capacity()
    }

    /// Block sizes: minimum (the sector), preferred (the copy-on-write chunk: whole-chunk
    /// writes never fill from old data), maximum (the payload limit).
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let chunk = u32::try_from(self.engine.chunk_size()).unwrap_or(MAX_PAYLOAD);
        (MIN_BLOCK, chunk.clamp(4096, MAX_PAYLOAD), MAX_PAYLOAD)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Failure> {
        let mut bufs = [IoSliceMut::new(buf)];
        self.device
            .read_vectored(&mut bufs, offset)
            .map_err(|e| io_failure(&e))
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Failure> {
        self.device
            .write_vectored(&[IoSlice::new(data)], offset)
            .map_err(|e| io_failure(&e))
    }

    /// Makes every completed write durable (on every device: see [`transmission_flags`]).
    pub fn flush(&self) -> Result<(), Failure> {
        self.device.flush().map_err(|e| io_failure(&e))
    }

    /// Discards whole sectors; they read as zeros afterwards.
    pub fn trim(&self, offset: u64, len: u64) -> Result<(), Failure> {
        self.device.discard(offset, len).map_err(|e| io_failure(&e))
    }

    /// Zeroes a range, deallocating it unless `keep` (`NBD_CMD_FLAG_NO_HOLE`).
    pub fn zero(&self, offset: u64, len: u64, keep: bool) -> Result<(), Failure> {
        self.device
            .write_zeroes(offset, len, !keep)
            .map_err(|e| io_failure(&e))
    }

    /// Runs of `[offset, offset + len)` as `(offset, len, zero)`: the zero mappings a
    /// structured read sends as holes, and data to read.
    pub fn read_runs(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>, Failure> {
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let part = self
                .engine
                .zero_runs(self.id, pos, end - pos)
                .map_err(query_failure)?;
            for &(off, n, zero) in &part {
                match runs.last_mut() {
                    Some(last) if last.2 == zero => last.1 += n,
                    _ => runs.push((off, n, zero)),
                }
            }
            pos = part.last().map_or(end, |r| r.0 + r.1);
        }
        Ok(runs)
    }

    /// The block-status reply for `[offset, offset + len)`: one [`BlockStatus`] per selected
    /// context, each describing a prefix of the range (one descriptor with `req_one`).
    pub fn block_status(
        &self,
        selected: &[Selected],
        offset: u64,
        len: u64,
        req_one: bool,
    ) -> Result<Vec<BlockStatus>, Failure> {
        let needs_extents = selected
            .iter()
            .any(|s| matches!(s.context, Context::Allocation | Context::Depth));
        let extents = if needs_extents {
            self.engine
                .extents(self.id, offset, len)
                .map_err(query_failure)?
        } else {
            Vec::new()
        };
        let mut replies = Vec::with_capacity(selected.len());
        for s in selected {
            let runs = match (&s.context, s.device) {
                (Context::Allocation, _) => self.allocation(&extents)?,
                (Context::Depth, _) => extents.iter().map(|e| (e.len, e.depth)).collect(),
                (Context::Dirty(_), Some(other)) => self.dirty(other, offset, len)?,
                (Context::Dirty(name), None) => {
                    return Err((EIO, format!("no device {name:?} to compare with")))
                }
            };
            replies.push(BlockStatus {
                context: s.id,
                descriptors: descriptors(runs, req_one),
            });
        }
        Ok(replies)
    }

    /// `base:allocation` of `extents`: cache blocks are data, zero mappings are holes that
    /// read as zeros, and where the device reads the origin image, the image's holes are.
    fn allocation(&self, extents: &[Extent]) -> Result<Vec<(u64, u32)>, Failure> {
        let mut runs = Vec::new();
        for e in extents {
            match e.source {
                Source::Block => runs.push((e.len, 0)),
                Source::Zero => runs.push((e.len, STATE_HOLE | STATE_ZERO)),
                Source::Origin => {
                    let found = self
                        .engine
                        .origin_holes(self.id, e.offset, e.len)
                        .map_err(query_failure)?;
                    let mut pos = e.offset;
                    for &(h, n) in &found.holes {
                        if h > pos {
                            runs.push((h - pos, 0));
                        }
                        runs.push((n, STATE_HOLE | STATE_ZERO));
                        pos = h + n;
                    }
                    if found.end > pos {
                        runs.push((found.end - pos, 0));
                    }
                    if found.end < e.offset + e.len {
                        // The answer stops here; the client asks again for the rest.
                        break;
                    }
                }
            }
        }
        Ok(runs)
    }

    /// `qemu:dirty-bitmap:` against device `other`: dirty where the views differ.
    fn dirty(&self, other: DeviceId, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, Failure> {
        let runs = self
            .engine
            .changed(self.id, other, offset, len)
            .map_err(query_failure)?;
        Ok(runs
            .iter()
            .map(|r| (r.len, if r.changed { STATE_DIRTY } else { 0 }))
            .collect())
    }
}

/// Descriptors for `(len, flags)` runs: neighbours with equal flags merged, at most
/// [`MAX_DESCRIPTORS`] (one with `req_one`). Runs come from one query of at most a request's
/// length, so each fits the 32-bit length field.
fn descriptors(runs: Vec<(u64, u32)>, req_one: bool) -> Vec<Descriptor> {
    let limit = if req_one { 1 } else { MAX_DESCRIPTORS };
    let mut out: Vec<Descriptor> = Vec::new();
    for (len, flags) in runs {
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        if len == 0 {
            continue;
        }
        let full = out.len() == limit;
        match out.last_mut() {
            Some(d) if d.flags == flags && d.len.checked_add(len).is_some() => d.len += len,
            _ if full => break,
            _ => out.push(Descriptor { len, flags }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_merge_and_respect_the_limits() {
        let runs = vec![(512, 0), (1024, 0), (512, 3), (0, 1), (512, 3), (512, 0)];
        let d = descriptors(runs.clone(), false);
        let got: Vec<(u32, u32)> = d.iter().map(|d| (d.len, d.flags)).collect();
        assert_eq!(got, vec![(1536, 0), (1024, 3), (512, 0)]);
        let one = descriptors(runs, true);
        assert_eq!(one.len(), 1);
        assert_eq!((one[0].len, one[0].flags), (1536, 0));
    }

    #[test]
    fn flags_are_truthful() {
        let ro = transmission_flags(false, true);
        assert!(ro & FLAG_READ_ONLY != 0 && ro & FLAG_SEND_TRIM == 0 && ro & FLAG_SEND_DF != 0);
        let rw = transmission_flags(true, false);
        assert!(rw & FLAG_READ_ONLY == 0 && rw & FLAG_SEND_FUA != 0 && rw & FLAG_SEND_DF == 0);
        assert!(rw & FLAG_CAN_MULTI_CONN != 0 && ro & FLAG_CAN_MULTI_CONN != 0);
    }
}
