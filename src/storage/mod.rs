//! The storage I/O layer: positional reads and writes on a byte store: files
//! ([`FileStorage`]), a remote image on an NBD server ([`RemoteStorage`], read-only), and
//! an image's content fingerprint ([`Fingerprint`]).
//!
//! Everything above this module (the virtio-blk data path, the copy-on-write engine) does I/O
//! through [`Storage`], so tests can substitute an in-memory or crash-injecting store (`crate::testkit::storage`).

mod file;
pub mod fingerprint;
pub mod lock;
pub mod remote;

pub use file::FileStorage;
pub use fingerprint::Fingerprint;
pub use lock::{LockError, LockKind};
pub use remote::{RemoteError, RemoteOptions, RemoteStorage};

use std::io::{self, IoSlice, IoSliceMut};

/// The sector: the unit every device's offsets and lengths are multiples of, here and in
/// virtio-blk (whose sectors are 512 bytes whatever the logical block size).
pub const SECTOR_SIZE: u64 = 512;

/// A byte-addressed store with positional, thread-safe I/O.
///
/// All methods take `&self`: implementations must allow concurrent calls from many threads
/// (one per queue). Reads past the end return an error, never a short read.
pub trait Storage: Send + Sync {
    /// Current size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` from `offset`; fails if any part lies past the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`, extending the store if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Fills the buffers in order, starting at `offset`.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let mut pos = offset;
        for buf in bufs.iter_mut() {
            self.read_at(buf, pos)?;
            pos += buf.len() as u64;
        }
        Ok(())
    }

    /// Writes the buffers in order, starting at `offset`.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let mut pos = offset;
        for buf in bufs {
            self.write_at(buf, pos)?;
            pos += buf.len() as u64;
        }
        Ok(())
    }

    /// Makes every completed write durable (fdatasync for files).
    fn sync(&self) -> io::Result<()>;

    /// Grows or shrinks the store.
    fn set_size(&self, size: u64) -> io::Result<()>;

    /// Deallocates `[offset, offset+len)`; it reads as zeros afterwards.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Makes `[offset, offset+len)` read as zeros, keeping it allocated.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;

    /// How `[offset, offset+len)` begins: `(hole, n)` says its first `n` bytes (`1..=len`)
    /// are all a hole (unallocated, reading as zeros) or all data. For block-status queries
    /// (`SEEK_HOLE`/`SEEK_DATA` on files). The default, right for any store, says "all data".
    fn allocation(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        let _ = offset;
        Ok((false, len))
    }

    /// Makes sure `[offset, offset+len)` has its space in the file system (fallocate), so
    /// later writes there cannot fail for lack of it. A store without the notion does nothing;
    /// so does a file system that cannot preallocate (the writes then take their space as
    /// they come).
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Space of the file system holding the store, if it lives on one (a regular file).
    fn host_space(&self) -> Option<HostSpace> {
        None
    }

    /// How a store reached over the network is doing (`None` for a local one).
    fn remote_status(&self) -> Option<RemoteStatus> {
        None
    }
}

/// How a store reached over the network (a remote origin) is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteStatus {
    /// Where it is, as the user named it.
    pub uri: String,
    /// Its server does not answer (requests fail, no connection can be made): reads that
    /// need it fail after the timeout until it is back.
    pub degraded: bool,
    /// Connections open now, and the most it uses.
    pub connections: u64,
    pub max_connections: u64,
    /// Connections made after the first, and requests that failed (each retried until its
    /// timeout).
    pub reconnects: u64,
    pub failed_requests: u64,
    /// Read requests answered, and their bytes.
    pub reads: u64,
    pub bytes_read: u64,
    /// The last failure, for the operator.
    pub last_error: Option<String>,
}

/// Space of a file system, as `statvfs` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSpace {
    /// Bytes an unprivileged writer can still allocate.
    pub available: u64,
    /// Size of the file system, bytes.
    pub total: u64,
}
