//! What an opened file is, for [`FileStorage`](super::FileStorage): a regular file or a block
//! device, its size, its logical and physical block sizes, and what direct I/O asks of the
//! transfers to it (`STATX_DIOALIGN`).

use super::{AlignedBuf, IoAlign, SECTOR_SIZE};
use crate::sys::blockdev;
use rustix::fs::{statx, AtFlags, StatxFlags};
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;

/// What [`Geometry::of`] found.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub size: u64,
    pub block_device: bool,
    pub logical_block: u32,
    pub physical_block: u32,
    /// [`IoAlign::NONE`] unless the file was opened with O_DIRECT.
    pub align: IoAlign,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl Geometry {
    /// Looks at `file` (with metadata `meta`), opened with O_DIRECT if `direct`.
    pub(super) fn of(file: &File, meta: &Metadata, direct: bool) -> io::Result<Geometry> {
        let block_device = meta.file_type().is_block_device();
        let (size, logical_block, physical_block) = if block_device {
            let fd = file.as_fd();
            let lbs = rustix::fs::ioctl_blksszget(fd)?;
            let pbs = rustix::fs::ioctl_blkpbszget(fd).unwrap_or(lbs);
            (blockdev::size(fd)?, lbs, pbs.max(lbs))
        } else {
            (meta.len(), SECTOR_SIZE as u32, SECTOR_SIZE as u32)
        };
        let mut g = Geometry {
            size,
            block_device,
            logical_block,
            physical_block,
            align: IoAlign::NONE,
        };
        if direct {
            g.align = dio_align(file).unwrap_or(IoAlign {
                // Without STATX_DIOALIGN (kernels before 6.1, or 6.11 for block devices):
                // the block size, or a page for a file (right on any file system).
                memory: if block_device { 512 } else { 4096 },
                offset: if block_device {
                    logical_block as usize
                } else {
                    4096
                },
            });
            g.check_direct()?;
            if !block_device {
                g.logical_block = g.align.offset.max(SECTOR_SIZE as usize) as u32;
                g.physical_block = g.logical_block;
            }
        }
        if block_device && !logical_block.is_power_of_two() {
            return Err(invalid(format!(
                "logical block size {logical_block} is not a power of two"
            )));
        }
        Ok(g)
    }

    /// Direct I/O is served with buffers aligned to at most [`AlignedBuf::ALIGN`] (the engine's
    /// metadata and its bounce buffers), and a file's tail cannot be written in part.
    fn check_direct(&self) -> io::Result<()> {
        let a = self.align;
        let max = AlignedBuf::ALIGN;
        if !a.memory.is_power_of_two() || !a.offset.is_power_of_two() {
            return Err(invalid(format!("odd direct I/O alignment {a:?}")));
        }
        if a.memory > max || a.offset > max {
            return Err(invalid(format!(
                "direct I/O here needs {}-byte aligned memory and {}-byte aligned offsets; \
                 snapblk supports up to {max}",
                a.memory, a.offset
            )));
        }
        if !self.block_device && !self.size.is_multiple_of(a.offset as u64) {
            return Err(invalid(format!(
                "a file served with direct I/O must be a multiple of {} bytes long (its \
                 direct I/O block), not {}",
                a.offset, self.size
            )));
        }
        Ok(())
    }
}

/// `STATX_DIOALIGN`: the memory and offset alignment direct I/O needs, if the kernel says.
fn dio_align(file: &File) -> Option<IoAlign> {
    let st = statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN).ok()?;
    if st.stx_mask & StatxFlags::DIOALIGN.bits() == 0
        || st.stx_dio_mem_align == 0
        || st.stx_dio_offset_align == 0
    {
        return None;
    }
    Some(IoAlign {
        memory: st.stx_dio_mem_align as usize,
        offset: st.stx_dio_offset_align as usize,
    })
}
