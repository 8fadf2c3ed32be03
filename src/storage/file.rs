//! [`Storage`] on a regular file with synchronous positional I/O (pread/pwrite family).
//!
//! Why synchronous rather than io_uring: each queue has its own worker thread, and on a
//! page-cached image a preadv/pwritev is a memory copy the kernel does inline; measured
//! numbers are in docs/benchmarks.md.

use super::lock::{lock_file, LockError, LockKind};
use super::{HostSpace, Storage};
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// A file opened for positional I/O.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    size: AtomicU64,
    /// A regular file (not a block device): it lives on a file system.
    regular: bool,
}

impl FileStorage {
    /// Opens an existing file, read-write unless `read_only`.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Self::from_file(file)
    }

    /// Wraps an open file.
    pub fn from_file(file: File) -> io::Result<Self> {
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a directory",
            ));
        }
        Ok(Self {
            size: AtomicU64::new(meta.len()),
            regular: meta.is_file(),
            file,
        })
    }

    /// Takes a whole-file lock (see [`super::lock`]); `path` names the file in the error. It
    /// is held until this storage is dropped.
    pub fn lock(&self, kind: LockKind, path: &Path) -> Result<(), LockError> {
        lock_file(&self.file, kind, &path.display().to_string())
    }

    /// The raw descriptor, for I/O engines that submit their own requests.
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
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

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(offset).map_err(|_| einval())?;
        let len = libc::off_t::try_from(len).map_err(|_| einval())?;
        // SAFETY: fallocate only reads its scalar arguments; the fd is owned by `self.file`.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
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
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)?;
        self.size
            .fetch_max(offset + buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
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
        let iov = bufs.iter().map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        });
        // SAFETY: every iovec points into a live `&[u8]` borrowed from `bufs` for the duration
        // of the call; pwritev only reads through them.
        unsafe { self.vectored_at(iov, bufs.len(), offset, Direction::Write)? };
        self.size.fetch_max(offset + total, Ordering::Relaxed);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn set_size(&self, size: u64) -> io::Result<()> {
        self.file.set_len(size)?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 || !self.regular {
            return Ok(());
        }
        match self.fallocate(0, offset, len) {
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
        // SAFETY: statvfs is plain old data; all-zero bytes are a valid value of it.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatvfs writes into `st`, which lives for the call; the fd is owned by
        // `self.file`.
        if unsafe { libc::fstatvfs(self.file.as_raw_fd(), &mut st) } != 0 {
            return None;
        }
        let frsize = st.f_frsize as u64;
        Some(HostSpace {
            available: (st.f_bavail as u64).saturating_mul(frsize),
            total: (st.f_blocks as u64).saturating_mul(frsize),
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            // Filesystems without ZERO_RANGE: write zeros by hand.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let zeros = vec![0u8; 1 << 20];
                let mut pos = offset;
                let end = offset + len;
                while pos < end {
                    let n = (end - pos).min(zeros.len() as u64) as usize;
                    self.file.write_all_at(&zeros[..n], pos)?;
                    pos += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e),
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
}
