//! Block-device ioctls the crates do not wrap safely: the device's size, discard and zero-out
//! of a byte range. (The logical and physical block sizes come from rustix's safe wrappers.)

use rustix::ioctl::opcode;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: rustix::ioctl::Opcode = opcode::read::<u64>(0x12, 114);
/// `BLKDISCARD`: `_IO(0x12, 119)`, with a pointer to `[start, len]`.
const BLKDISCARD: rustix::ioctl::Opcode = opcode::none(0x12, 119);
/// `BLKZEROOUT`: `_IO(0x12, 127)`, with a pointer to `[start, len]`.
const BLKZEROOUT: rustix::ioctl::Opcode = opcode::none(0x12, 127);

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The size of the block device open on `fd`, in bytes.
pub fn size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut bytes = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to `bytes`, alive
    // and exclusively borrowed for the call; on a descriptor that is not a block device the
    // call fails (ENOTTY) and writes nothing.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64 as _, &mut bytes as *mut u64) };
    check(rc).map(|()| bytes)
}

/// Discards `[offset, offset + len)` (`BLKDISCARD`): the device may deallocate it; what it
/// reads afterwards is up to the device.
pub fn discard(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    range_ioctl(fd, BLKDISCARD, offset, len)
}

/// Zeroes `[offset, offset + len)` (`BLKZEROOUT`): it reads as zeros afterwards, by the
/// device's write-zeroes command or, where it has none, by writing zeros.
pub fn zero_out(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    range_ioctl(fd, BLKZEROOUT, offset, len)
}

fn range_ioctl(
    fd: BorrowedFd<'_>,
    op: rustix::ioctl::Opcode,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: both ioctls only read two u64 (start, length) through the pointer, which points
    // to `range`, alive for the call; a descriptor that is not a block device fails (ENOTTY).
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), op as _, range.as_ptr()) };
    check(rc)
}
