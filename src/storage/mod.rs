//! The storage I/O layer: positional reads and writes on a byte store: files
//! ([`FileStorage`]), a remote image on an NBD server ([`RemoteStorage`], read-only), and
//! an image's content fingerprint ([`Fingerprint`]).
//!
//! Everything above this module (the virtio-blk data path, the copy-on-write engine) does I/O
//! through [`Storage`], so tests can substitute an in-memory or crash-injecting store (`crate::testkit::storage`).
//!
//! [`FileStorage`] serves regular files and block devices, buffered or with direct I/O
//! (O_DIRECT, see [`IoAlign`]); `direct.rs` holds what direct I/O needs of callers that do not
//! meet its alignment (bounce buffers, read-modify-write of partial blocks).

mod direct;
mod file;
pub mod fingerprint;
mod geometry;
pub mod lock;
pub mod remote;

pub use crate::sys::aligned::AlignedBuf;
pub use direct::Cursor;
pub use file::{FileStorage, OpenFlags};
pub use fingerprint::Fingerprint;
pub use lock::{LockError, LockKind};
pub use remote::{RemoteError, RemoteOptions, RemoteStorage};

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::RawFd;

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

    /// What direct I/O asks of the memory, offsets and lengths given to this store;
    /// [`IoAlign::NONE`] for a store that takes any (buffered files, memory). A store with a
    /// requirement still serves unaligned calls correctly, through a bounce buffer (and, for
    /// a write that covers part of a block, a read-modify-write of that block: callers must not
    /// write into the same aligned block concurrently, which the engine's stripe and journal
    /// locks ensure). [`Storage::unaligned_ios`] counts them.
    fn io_align(&self) -> IoAlign {
        IoAlign::NONE
    }

    /// The unit of I/O the store is to be served in: a block device's logical block size, a
    /// direct-I/O file's offset alignment, 512 otherwise.
    fn logical_block_size(&self) -> u32 {
        SECTOR_SIZE as u32
    }

    /// The unit the device writes internally (a block device's physical block size), a hint
    /// for the guest's I/O sizes.
    fn physical_block_size(&self) -> u32 {
        self.logical_block_size()
    }

    /// Reads the size again (a block device grown or shrunk by its administrator since it was
    /// opened: `lvextend`, `losetup -c`) and returns it.
    fn refresh_size(&self) -> io::Result<u64> {
        Ok(self.size())
    }

    /// The store's size cannot change (a block device): its size is all the room it has.
    fn fixed_size(&self) -> bool {
        false
    }

    /// Lets the store deallocate `[offset, offset+len)`: what it reads afterwards is
    /// unspecified (zeros or the old data). For space nobody reads before writing it again
    /// (freed cache blocks); [`Storage::punch_hole`] where zeros must be read.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.punch_hole(offset, len)
    }

    /// Makes the store's first `len` bytes read as zeros, the store at least that long (and, if
    /// it can change size, exactly that long): a fresh start for a new cache object.
    fn reset(&self, len: u64) -> io::Result<()> {
        self.set_size(0)?;
        self.set_size(len)
    }

    /// Calls the store served through a bounce buffer since it was opened: memory, offsets or
    /// lengths that did not meet [`Storage::io_align`].
    fn unaligned_ios(&self) -> u64 {
        0
    }

    /// An open file descriptor, for an engine that submits its own I/O (io_uring). It stays
    /// open as long as the store lives. `None` for stores without one. A file is opened a
    /// second time for it, so that a ring registering it holds no lock: the kernel tears a
    /// killed process's rings down after the process, and a restarted daemon must find the
    /// file free at once.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    /// How a store reached over the network is doing (`None` for a local one).
    fn remote_status(&self) -> Option<RemoteStatus> {
        None
    }
}

/// What direct I/O (O_DIRECT) asks of a transfer: its memory aligned to `memory` bytes, its
/// offset and every buffer's length to `offset` bytes (the logical block size). Linux checks
/// both per buffer of a vectored call (`iov_iter_is_aligned`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoAlign {
    /// Alignment of each buffer's address.
    pub memory: usize,
    /// Alignment of the offset and of each buffer's length.
    pub offset: usize,
}

impl IoAlign {
    /// No requirement (buffered I/O, memory).
    pub const NONE: IoAlign = IoAlign {
        memory: 1,
        offset: 1,
    };

    /// Whether there is no requirement.
    pub fn is_none(self) -> bool {
        self == Self::NONE
    }

    /// Both requirements at once.
    pub fn max(self, other: IoAlign) -> IoAlign {
        IoAlign {
            memory: self.memory.max(other.memory),
            offset: self.offset.max(other.offset),
        }
    }

    /// Whether a transfer at `offset` through buffers of these addresses and lengths meets
    /// the requirement.
    pub fn fits(self, offset: u64, bufs: impl IntoIterator<Item = (usize, usize)>) -> bool {
        if self.is_none() {
            return true;
        }
        let (mem, len) = (self.memory - 1, self.offset - 1);
        offset & len as u64 == 0
            && bufs
                .into_iter()
                .all(|(addr, n)| addr & mem == 0 && n & len == 0)
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
