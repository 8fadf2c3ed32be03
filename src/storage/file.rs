//! [`Storage`] on a regular file or a block device, with synchronous positional I/O
//! (pread/pwrite family), buffered or direct (O_DIRECT).
//!
//! Why synchronous rather than io_uring here: each queue has its own worker thread, and on a
//! page-cached image a preadv/pwritev is a memory copy the kernel does inline; measured
//! numbers are in docs/benchmarks.md. With direct I/O the queue workers submit aligned guest
//! requests through io_uring themselves (`vhost/uring.rs`), on the descriptor this store
//! lends them ([`Storage::raw_fd`]); everything else comes through here.
//!
//! A block device has its size, logical and physical block sizes from the kernel
//! (BLKGETSIZE64, BLKSSZGET, BLKPBSZGET); write-zeroes is BLKZEROOUT, a hole that must read as
//! zeros is fallocate(PUNCH_HOLE) (the device's unmapping write-zeroes) or else BLKZEROOUT,
//! and a discard of space nobody reads again is BLKDISCARD. A writable one is opened
//! exclusively (O_EXCL: not while mounted or claimed by another program).

use super::direct::{read_bounced, write_bounced};
use super::geometry::Geometry;
use super::lock::{lock_file, LockError, LockKind};
use super::{AlignedBuf, HostSpace, IoAlign, Storage};
use crate::sys::blockdev;
use rustix::fs::FallocateFlags;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// How to open a [`FileStorage`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenFlags {
    pub read_only: bool,
    /// Direct I/O (O_DIRECT): no host page cache.
    pub direct: bool,
}

/// A file or block device opened for positional I/O.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    size: AtomicU64,
    /// A regular file (not a block device): it lives on a file system.
    regular: bool,
    geometry: Geometry,
    /// Calls served through a bounce buffer (see `direct.rs`).
    unaligned: AtomicU64,
    /// A second open of the same file, without the lock, for io_uring to register (see
    /// [`Storage::raw_fd`]); opened on first use, `None` if that failed.
    ring_file: OnceLock<Option<File>>,
}

impl FileStorage {
    /// Opens an existing file or block device, read-write unless `read_only`, buffered.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        Self::open_with(
            path,
            OpenFlags {
                read_only,
                direct: false,
            },
        )
    }

    /// Opens an existing file or block device as `flags` say. A writable block device is
    /// opened exclusively (O_EXCL), so a mounted one, or one another program claimed, is
    /// refused.
    pub fn open_with(path: &Path, flags: OpenFlags) -> io::Result<Self> {
        let block_device = std::fs::metadata(path)?.file_type().is_block_device();
        let mut custom = 0;
        if flags.direct {
            custom |= libc::O_DIRECT;
        }
        if block_device && !flags.read_only {
            custom |= libc::O_EXCL;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!flags.read_only)
            .custom_flags(custom)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) if block_device => io::Error::new(
                    e.kind(),
                    format!("{e}: the device is mounted or in use by another program"),
                ),
                Some(libc::EINVAL) if flags.direct => io::Error::new(
                    e.kind(),
                    format!("{e}: its file system does not support direct I/O"),
                ),
                _ => e,
            })?;
        Self::from_file(file)
    }

    /// Wraps an open file; it is served with direct I/O if it was opened with O_DIRECT.
    pub fn from_file(file: File) -> io::Result<Self> {
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a directory",
            ));
        }
        let direct = rustix::fs::fcntl_getfl(&file)?.contains(rustix::fs::OFlags::DIRECT);
        let geometry = Geometry::of(&file, &meta, direct)?;
        Ok(Self {
            size: AtomicU64::new(geometry.size),
            regular: meta.is_file(),
            geometry,
            file,
            unaligned: AtomicU64::new(0),
            ring_file: OnceLock::new(),
        })
    }

    /// The file opened again (a new open file description, so without this one's lock), with
    /// the same access mode and direct I/O, and never exclusively.
    fn reopen(&self) -> io::Result<File> {
        let flags = rustix::fs::fcntl_getfl(&self.file)?;
        let mut custom = libc::O_CLOEXEC;
        if flags.contains(rustix::fs::OFlags::DIRECT) {
            custom |= libc::O_DIRECT;
        }
        let writable = flags.contains(rustix::fs::OFlags::RDWR);
        OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(custom)
            .open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// Takes a whole-file lock (see [`super::lock`]); `path` names the file in the error. It
    /// is held until this storage is dropped.
    pub fn lock(&self, kind: LockKind, path: &Path) -> Result<(), LockError> {
        lock_file(&self.file, kind, &path.display().to_string())
    }

    /// Whether it is a block device.
    pub fn is_block_device(&self) -> bool {
        self.geometry.block_device
    }

    /// Whether it was opened for direct I/O.
    pub fn is_direct(&self) -> bool {
        !self.geometry.align.is_none()
    }

    /// preadv/pwritev of all the bytes in `iov` (`count` entries), retrying short transfers.
    ///
    /// # Safety
    /// Every iovec must point into memory valid for the transfer (writable for reads) for the
    /// duration of the call.
    unsafe fn vectored_at(
        &self,
        iov: impl Iterator<Item = libc::iovec>,
        count: usize,
        offset: u64,
        dir: Direction,
    ) -> io::Result<()> {
        if count > MAX_IOV {
            return Err(einval());
        }
        // Small requests keep their iovecs on the stack; we copy them to advance on short I/O.
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut stack = [empty; 32];
        let mut heap;
        let iovs: &mut [libc::iovec] = if count <= stack.len() {
            &mut stack[..count]
        } else {
            heap = vec![empty; count];
            &mut heap
        };
        for (dst, src) in iovs.iter_mut().zip(iov) {
            *dst = src;
        }
        let mut iovs = iovs;
        let mut pos = offset;
        while !iovs.is_empty() {
            let off = libc::off_t::try_from(pos).map_err(|_| einval())?;
            let (fd, ptr, n) = (
                self.file.as_raw_fd(),
                iovs.as_ptr(),
                iovs.len() as libc::c_int,
            );
            // SAFETY: the iovecs are valid per this function's contract, and n <= IOV_MAX.
            let done = unsafe {
                match dir {
                    Direction::Read => libc::preadv(fd, ptr, n, off),
                    Direction::Write => libc::pwritev(fd, ptr, n, off),
                }
            };
            if done < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if done == 0 {
                return Err(match dir {
                    Direction::Read => eof(),
                    Direction::Write => {
                        io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote nothing")
                    }
                });
            }
            pos += done as u64;
            iovs = advance(iovs, done as usize);
        }
        Ok(())
    }

    fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        rustix::fs::fallocate(&self.file, mode, offset, len).map_err(io::Error::from)
    }

    /// Whether a transfer of `bufs` at `offset` can go to the file as it is; otherwise it is
    /// counted and bounced (`direct.rs`).
    fn fits(&self, offset: u64, bufs: impl IntoIterator<Item = (usize, usize)>) -> bool {
        let ok = self.geometry.align.fits(offset, bufs);
        if !ok {
            self.unaligned.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Writes zeros over `[offset, offset + len)` with ordinary writes.
    fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = AlignedBuf::zeroed(1 << 20);
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// A block device can take no more than its size.
    fn within_device(&self, len: u64) -> io::Result<()> {
        if len <= self.size() {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::StorageFull,
            format!("the block device holds {} bytes, not {len}", self.size()),
        ))
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "read past the end of the file",
    )
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS)
    )
}

/// Advances an iovec array by `n` bytes, dropping fully consumed entries.
fn advance(iov: &mut [libc::iovec], mut n: usize) -> &mut [libc::iovec] {
    let mut skip = 0;
    for v in iov.iter_mut() {
        if n >= v.iov_len {
            n -= v.iov_len;
            skip += 1;
        } else {
            // SAFETY: `n < iov_len`, so the new base stays inside the same buffer.
            v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
            v.iov_len -= n;
            break;
        }
    }
    &mut iov[skip..]
}

const MAX_IOV: usize = 1024; // IOV_MAX on Linux

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

impl Storage for FileStorage {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if !self.fits(offset, [(buf.as_ptr() as usize, buf.len())]) {
            let align = self.geometry.align;
            return read_bounced(&self.file, align, &mut [IoSliceMut::new(buf)], offset);
        }
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.fits(offset, [(buf.as_ptr() as usize, buf.len())]) {
            self.file.write_all_at(buf, offset)?;
        } else {
            write_bounced(
                &self.file,
                self.geometry.align,
                &[IoSlice::new(buf)],
                offset,
            )?;
        }
        self.size
            .fetch_max(offset + buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        if !self.fits(offset, bufs.iter().map(|b| (b.as_ptr() as usize, b.len()))) {
            return read_bounced(&self.file, self.geometry.align, bufs, offset);
        }
        let count = bufs.len();
        let iov = bufs.iter_mut().map(|b| libc::iovec {
            iov_base: b.as_mut_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        });
        // SAFETY: every iovec points into a live `&mut [u8]` borrowed from `bufs` for the
        // duration of the call.
        unsafe { self.vectored_at(iov, count, offset, Direction::Read) }
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if !self.fits(offset, bufs.iter().map(|b| (b.as_ptr() as usize, b.len()))) {
            write_bounced(&self.file, self.geometry.align, bufs, offset)?;
        } else {
            let iov = bufs.iter().map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            });
            // SAFETY: every iovec points into a live `&[u8]` borrowed from `bufs` for the
            // duration of the call; pwritev only reads through them.
            unsafe { self.vectored_at(iov, bufs.len(), offset, Direction::Write)? };
        }
        self.size.fetch_max(offset + total, Ordering::Relaxed);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn refresh_size(&self) -> io::Result<u64> {
        if self.geometry.block_device {
            let size = crate::sys::blockdev::size(self.file.as_fd())?;
            self.size.store(size, Ordering::Relaxed);
        }
        Ok(self.size())
    }

    fn set_size(&self, size: u64) -> io::Result<()> {
        if self.geometry.block_device {
            return self.within_device(size);
        }
        self.file.set_len(size)?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    fn reset(&self, len: u64) -> io::Result<()> {
        if !self.geometry.block_device {
            self.set_size(0)?;
            return self.set_size(len);
        }
        self.within_device(len)?;
        self.write_zeroes(0, len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match self.fallocate(mode, offset, len) {
            // A block device without an unmapping write-zeroes: zeros written out.
            Err(e) if self.geometry.block_device && unsupported(&e) => {
                blockdev::zero_out(self.file.as_fd(), offset, len)
            }
            other => other,
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.geometry.block_device {
            return self.punch_hole(offset, len);
        }
        if len == 0 {
            return Ok(());
        }
        match blockdev::discard(self.file.as_fd(), offset, len) {
            // Nothing to deallocate on a device that cannot: the space stays as it is.
            Err(e) if unsupported(&e) => Ok(()),
            other => other,
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 || !self.regular {
            return Ok(());
        }
        match self.fallocate(FallocateFlags::empty(), offset, len) {
            Ok(()) => {
                self.size.fetch_max(offset + len, Ordering::Relaxed);
                Ok(())
            }
            // A file system that cannot preallocate: writes take their space as they come.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn host_space(&self) -> Option<HostSpace> {
        if !self.regular {
            return None;
        }
        let st = rustix::fs::fstatvfs(&self.file).ok()?;
        Some(HostSpace {
            available: st.f_bavail.saturating_mul(st.f_frsize),
            total: st.f_blocks.saturating_mul(st.f_frsize),
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.geometry.block_device {
            return blockdev::zero_out(self.file.as_fd(), offset, len);
        }
        let mode = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
        match self.fallocate(mode, offset, len) {
            // Filesystems without ZERO_RANGE: write zeros by hand.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zero_bytes(offset, len)
            }
            other => other,
        }
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        use rustix::fs::{seek, SeekFrom};
        let end = offset.saturating_add(len).min(self.size());
        if offset >= end {
            return Ok((false, len));
        }
        let run = |to: u64| to.clamp(offset + 1, end) - offset;
        match seek(&self.file, SeekFrom::Data(offset)) {
            // Data from here on: it lasts until the next hole (the end is a virtual hole).
            Ok(at) if at <= offset => match seek(&self.file, SeekFrom::Hole(offset)) {
                Ok(hole) => Ok((false, run(hole))),
                Err(_) => Ok((false, len)),
            },
            Ok(data) => Ok((true, run(data))),
            // No data after `offset`: a hole to the end.
            Err(rustix::io::Errno::NXIO) => Ok((true, end - offset)),
            // A file system (or device) that cannot tell: all data, which is always true.
            Err(_) => Ok((false, len)),
        }
    }

    fn io_align(&self) -> IoAlign {
        self.geometry.align
    }

    fn logical_block_size(&self) -> u32 {
        self.geometry.logical_block
    }

    fn physical_block_size(&self) -> u32 {
        self.geometry.physical_block
    }

    fn fixed_size(&self) -> bool {
        self.geometry.block_device
    }

    fn unaligned_ios(&self) -> u64 {
        self.unaligned.load(Ordering::Relaxed)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        let reopened = self.ring_file.get_or_init(|| {
            self.reopen()
                .map_err(|e| {
                    log::warn!(
                        "cannot open the file again for io_uring (after a SIGKILL its lock may \
                         outlive the process a moment): {e}"
                    )
                })
                .ok()
        });
        Some(reopened.as_ref().unwrap_or(&self.file).as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(len: u64) -> (tempfile::TempDir, FileStorage) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let f = File::create(&path).unwrap();
        f.set_len(len).unwrap();
        (dir, FileStorage::open(&path, false).unwrap())
    }

    #[test]
    fn vectored_round_trip_and_zeroing() {
        let (_d, s) = temp(1 << 20);
        let a = vec![0xaau8; 4096];
        let b = vec![0xbbu8; 512];
        s.write_vectored_at(&[IoSlice::new(&a), IoSlice::new(&b)], 8192)
            .unwrap();
        let mut x = vec![0u8; 4096];
        let mut y = vec![0u8; 512];
        s.read_vectored_at(
            &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)],
            8192,
        )
        .unwrap();
        assert_eq!(x, a);
        assert_eq!(y, b);
        s.punch_hole(8192, 4096).unwrap();
        s.write_zeroes(8192 + 4096, 512).unwrap();
        let mut z = vec![1u8; 4608];
        s.read_at(&mut z, 8192).unwrap();
        assert!(z.iter().all(|&v| v == 0));
        assert_eq!(s.size(), 1 << 20);
    }

    /// `allocate` gives a sparse range its blocks (st_blocks grows), and the file system's
    /// space is reported.
    #[test]
    fn allocate_fills_holes_and_host_space_is_known() {
        use std::os::unix::fs::MetadataExt;
        let (d, s) = temp(1 << 20);
        let blocks = || std::fs::metadata(d.path().join("img")).unwrap().blocks();
        assert_eq!(blocks(), 0, "a sparse file");
        s.allocate(0, 256 << 10).unwrap();
        assert!(blocks() * 512 >= 256 << 10, "{} sectors", blocks());
        assert_eq!(s.size(), 1 << 20);
        let space = s
            .host_space()
            .expect("a regular file lives on a file system");
        assert!(
            space.total > 0 && space.available <= space.total,
            "{space:?}"
        );
    }

    #[test]
    fn allocation_reports_holes_and_data() {
        let (_d, s) = temp(1 << 20);
        s.write_at(&[7u8; 65536], 256 << 10).unwrap();
        s.sync().unwrap();
        let (hole, n) = s.allocation(0, 1 << 20).unwrap();
        // A file system that cannot tell says "data", which is allowed; tmpfs and ext4 can.
        if hole {
            assert_eq!(n, 256 << 10, "the hole before the data");
            assert_eq!(s.allocation(256 << 10, 1 << 20).unwrap(), (false, 65536));
            let (h, n) = s.allocation(320 << 10, 1 << 20).unwrap();
            assert!(
                h && n == (1 << 20) - (320 << 10),
                "the hole to the end: {h} {n}"
            );
            assert_eq!(
                s.allocation(0, 4096).unwrap(),
                (true, 4096),
                "bounded by len"
            );
        }
        assert_eq!(
            s.allocation(1 << 20, 512).unwrap(),
            (false, 512),
            "past the end"
        );
    }

    #[test]
    fn read_past_end_is_an_error() {
        let (_d, s) = temp(4096);
        let mut buf = vec![0u8; 512];
        assert!(s.read_at(&mut buf, 4096 - 256).is_err());
        let mut iov = [IoSliceMut::new(&mut buf)];
        assert!(s.read_vectored_at(&mut iov, 4096 - 256).is_err());
    }

    /// Opens `path` for direct I/O, or `None` if its file system cannot (tmpfs before 6.6).
    fn direct(path: &Path) -> Option<FileStorage> {
        let flags = OpenFlags {
            read_only: false,
            direct: true,
        };
        match FileStorage::open_with(path, flags) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("skipped: no direct I/O on {}: {e}", path.display());
                None
            }
        }
    }

    /// Under O_DIRECT, aligned buffers go to the file as they are and anything else through a
    /// bounce buffer (counted): odd memory, a 512-byte piece of a block, a vectored write
    /// whose buffers split blocks; the bytes around each stay as they were.
    #[test]
    fn direct_io_takes_aligned_buffers_and_bounces_the_rest() {
        let (d, _) = temp(0);
        let path = d.path().join("img");
        let image: Vec<u8> = (0..1usize << 20).map(|i| (i % 241) as u8).collect();
        std::fs::write(&path, &image).unwrap();
        let Some(s) = direct(&path) else { return };
        let a = s.io_align();
        assert!(s.is_direct() && !a.is_none(), "{a:?}");
        assert!(a.offset.is_power_of_two() && a.offset <= 4096);
        assert_eq!(s.logical_block_size() as usize, a.offset.max(512));
        let mut model = image.clone();

        let mut buf = AlignedBuf::zeroed(8192);
        buf.fill(0x11);
        s.write_at(&buf, 8192).unwrap();
        model[8192..16384].fill(0x11);
        s.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..], &model[..8192]);
        assert_eq!(s.unaligned_ios(), 0, "aligned calls are not bounced");

        // A piece smaller than the block, at an odd offset, from memory one byte past an
        // aligned buffer (a `Vec` of its own is 512-aligned now and then, by chance, and on a
        // file system with 512-byte blocks would then fit).
        let mut backing = AlignedBuf::zeroed(4096);
        backing.fill(0x22);
        let piece = &backing[1..513];
        s.write_at(piece, 4096 + 512).unwrap();
        model[4608..5120].fill(0x22);
        // A vectored write whose buffers split the blocks.
        let (x, y) = (vec![0x33u8; 1000], vec![0x44u8; 7192]);
        s.write_vectored_at(&[IoSlice::new(&x), IoSlice::new(&y)], 65536)
            .unwrap();
        model[65536..66536].fill(0x33);
        model[66536..73728].fill(0x44);
        assert!(s.unaligned_ios() >= 2);
        let mut back = vec![0u8; 1 << 20];
        s.read_at(&mut back, 0).unwrap();
        assert!(back == model, "the file as written");
        s.sync().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), model);
        s.write_zeroes(4096, 8192).unwrap();
        model[4096..12288].fill(0);
        s.punch_hole(65536, 4096).unwrap();
        model[65536..69632].fill(0);
        s.read_at(&mut back, 0).unwrap();
        assert!(back == model, "zeroed ranges");
    }

    /// Direct I/O cannot write a file's last block in part: such a file is refused.
    #[test]
    fn direct_io_refuses_a_file_whose_end_is_not_aligned() {
        let (d, _) = temp(0);
        let path = d.path().join("img");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        if direct(&path).is_none() {
            return;
        }
        std::fs::write(&path, vec![0u8; 8192 + 512 + 100]).unwrap();
        let flags = OpenFlags {
            read_only: false,
            direct: true,
        };
        let err = FileStorage::open_with(&path, flags).unwrap_err();
        assert!(err.to_string().contains("multiple of"), "{err}");
    }

    /// A block device: its size and sector size from the kernel, write-zeroes, holes that read
    /// as zeros and discards, a size it cannot change, opened exclusively when writable; with
    /// and without direct I/O, on 512 and 4096-byte sectors.
    #[test]
    fn block_devices_have_their_size_sectors_and_zeroing() {
        for (sector, direct) in [(512u32, false), (4096, false), (4096, true), (512, true)] {
            let Some(dev) = crate::testkit::loopdev::LoopDevice::attach(4 << 20, sector) else {
                return;
            };
            let flags = OpenFlags {
                read_only: false,
                direct,
            };
            let s = FileStorage::open_with(dev.path(), flags).unwrap();
            assert!(s.is_block_device() && s.fixed_size());
            assert_eq!(s.size(), 4 << 20);
            assert_eq!(s.logical_block_size(), sector, "direct {direct}");
            assert!(s.physical_block_size() >= sector);
            assert_eq!(s.is_direct(), direct);
            if direct {
                assert_eq!(s.io_align().offset, sector as usize);
            }
            assert!(s.host_space().is_none(), "no file system");
            let again = FileStorage::open_with(dev.path(), flags).unwrap_err();
            assert!(again.to_string().contains("in use"), "exclusive: {again}");
            FileStorage::open(dev.path(), true).expect("readers may look");

            let data = AlignedBuf::from_slice(&vec![0x5au8; 64 << 10]);
            s.write_at(&data, 0).unwrap();
            s.write_at(&data, 1 << 20).unwrap();
            s.write_zeroes(4096, 8192).unwrap();
            s.punch_hole(1 << 20, 16384).unwrap();
            s.discard(2 << 20, 1 << 20).unwrap();
            let mut back = AlignedBuf::zeroed(64 << 10);
            s.read_at(&mut back, 0).unwrap();
            assert!(back[..4096].iter().all(|&b| b == 0x5a));
            assert!(back[4096..12288].iter().all(|&b| b == 0), "write-zeroes");
            assert!(back[12288..].iter().all(|&b| b == 0x5a));
            s.read_at(&mut back, 1 << 20).unwrap();
            assert!(
                back[..16384].iter().all(|&b| b == 0),
                "a hole reads as zeros"
            );
            assert!(back[16384..].iter().all(|&b| b == 0x5a));

            s.set_size(1 << 20).expect("a smaller size is no change");
            assert_eq!(s.size(), 4 << 20);
            assert!(s.set_size(8 << 20).is_err(), "a device cannot grow");
            assert!(s.reset(8 << 20).is_err());
            s.reset(128 << 10).unwrap();
            s.read_at(&mut back, 0).unwrap();
            assert!(back.iter().all(|&b| b == 0), "reset zeroes the start");
            s.sync().unwrap();
            let mut past = AlignedBuf::zeroed(4096);
            assert!(s.read_at(&mut past, 4 << 20).is_err(), "past the end");
        }
    }
}
