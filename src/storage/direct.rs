//! Direct I/O for callers whose memory, offset or lengths do not meet the store's
//! [`IoAlign`]: the transfer goes through an aligned bounce window, and a write that covers
//! only part of a block first reads that block (read-modify-write).
//!
//! The data path avoids this: guest buffers are used in place when they are aligned (and the
//! devices bounce whole requests themselves otherwise), and the engine does its own I/O with
//! aligned buffers at aligned offsets (docs/engine.md, "Direct I/O"). This is the safety net
//! for everything else (NBD clients' 512-byte requests on a 4 KiB device, for one), counted by
//! the store. A read-modify-write is not atomic: callers must not write into the same aligned
//! block concurrently (the engine's stripe locks and journal lock see to it).

use super::{AlignedBuf, IoAlign};
use std::cell::RefCell;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;

/// Bytes moved per bounce, a multiple of any supported alignment (at most 4 KiB).
const WINDOW: usize = 256 << 10;

thread_local! {
    /// Each thread's bounce window, allocated on first use: bouncing happens on queue workers
    /// and pool threads, a handful per daemon.
    static BOUNCE: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's bounce window (a fresh one if it is in use further up).
fn with_window<T>(f: impl FnOnce(&mut AlignedBuf) -> T) -> T {
    BOUNCE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut slot) => f(slot.get_or_insert_with(|| AlignedBuf::zeroed(WINDOW))),
        Err(_) => f(&mut AlignedBuf::zeroed(WINDOW)),
    })
}

/// The end of a transfer of `lens` at `offset`, and the aligned range `[lo, hi)` covering it.
fn span(offset: u64, lens: impl Iterator<Item = usize>, align: IoAlign) -> (u64, u64, u64) {
    let end = offset + lens.map(|n| n as u64).sum::<u64>();
    (
        end,
        align_down(offset, align.offset),
        align_up(end, align.offset),
    )
}

fn align_down(x: u64, a: usize) -> u64 {
    x - x % a as u64
}

fn align_up(x: u64, a: usize) -> u64 {
    x.div_ceil(a as u64) * a as u64
}

/// Fills `buf` from `pos`; bytes past the end of the file read as zeros, as long as the first
/// `need` bytes exist (the end of a file need not be aligned; the caller's range must be in it).
fn read_window(file: &File, buf: &mut [u8], pos: u64, need: usize) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) if done >= need => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end of the file",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads into `bufs` from `offset` through aligned windows.
pub(super) fn read_bounced(
    file: &File,
    align: IoAlign,
    bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> io::Result<()> {
    let (end, lo, hi) = span(offset, bufs.iter().map(|b| b.len()), align);
    with_window(|win| {
        let mut cursor = Cursor::default();
        let mut pos = lo;
        while pos < hi {
            let n = (hi - pos).min(WINDOW as u64) as usize;
            let to = (end.min(pos + n as u64) - pos) as usize;
            read_window(file, &mut win[..n], pos, to)?;
            let from = (offset.max(pos) - pos) as usize;
            cursor.scatter(bufs, &win[from..to]);
            pos += n as u64;
        }
        Ok(())
    })
}

/// Writes `bufs` at `offset` through aligned windows, reading first the blocks it covers only
/// in part.
pub(super) fn write_bounced(
    file: &File,
    align: IoAlign,
    bufs: &[IoSlice<'_>],
    offset: u64,
) -> io::Result<()> {
    let (end, lo, hi) = span(offset, bufs.iter().map(|b| b.len()), align);
    let block = align.offset;
    with_window(|win| {
        let mut cursor = Cursor::default();
        let mut pos = lo;
        while pos < hi {
            let n = (hi - pos).min(WINDOW as u64) as usize;
            let from = (offset.max(pos) - pos) as usize;
            let to = (end.min(pos + n as u64) - pos) as usize;
            if from > 0 {
                read_window(file, &mut win[..block], pos, 0)?;
            }
            if to < n {
                read_window(file, &mut win[n - block..n], pos + (n - block) as u64, 0)?;
            }
            cursor.gather(bufs, &mut win[from..to]);
            file.write_all_at(&win[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    })
}

/// A position in a list of buffers, for copying a window at a time.
#[derive(Default)]
pub struct Cursor {
    buf: usize,
    at: usize,
}

impl Cursor {
    /// Copies `src` into the buffers from the cursor on, advancing it.
    pub fn scatter(&mut self, bufs: &mut [IoSliceMut<'_>], mut src: &[u8]) {
        while !src.is_empty() && self.buf < bufs.len() {
            let dst = &mut bufs[self.buf][self.at..];
            let n = dst.len().min(src.len());
            dst[..n].copy_from_slice(&src[..n]);
            src = &src[n..];
            self.advance(n, bufs[self.buf].len());
        }
    }

    /// Fills `dst` from the buffers from the cursor on, advancing it.
    pub fn gather(&mut self, bufs: &[IoSlice<'_>], mut dst: &mut [u8]) {
        while !dst.is_empty() && self.buf < bufs.len() {
            let src = &bufs[self.buf][self.at..];
            let n = src.len().min(dst.len());
            dst[..n].copy_from_slice(&src[..n]);
            dst = &mut dst[n..];
            self.advance(n, bufs[self.buf].len());
        }
    }

    fn advance(&mut self, n: usize, len: usize) {
        self.at += n;
        if self.at == len {
            self.buf += 1;
            self.at = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_moves_windows_across_odd_buffers() {
        let src: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let (a, b, c) = (
            src[..1000].to_vec(),
            src[1000..4096].to_vec(),
            src[4096..].to_vec(),
        );
        let bufs = [IoSlice::new(&a), IoSlice::new(&b), IoSlice::new(&c)];
        // Gather in windows of 3000 bytes (straddling every boundary), then scatter back.
        let mut cursor = Cursor::default();
        let mut flat = Vec::new();
        let mut window = [0u8; 3000];
        let mut left = src.len();
        while left > 0 {
            let n = left.min(window.len());
            cursor.gather(&bufs, &mut window[..n]);
            flat.extend_from_slice(&window[..n]);
            left -= n;
        }
        assert_eq!(flat, src);
        let (mut x, mut y, mut z) = (vec![0u8; 1000], vec![0u8; 3096], vec![0u8; 5904]);
        let mut out = [
            IoSliceMut::new(&mut x),
            IoSliceMut::new(&mut y),
            IoSliceMut::new(&mut z),
        ];
        let mut cursor = Cursor::default();
        for part in src.chunks(3000) {
            cursor.scatter(&mut out, part);
        }
        assert_eq!([x, y, z].concat(), src);
    }

    /// Unaligned reads and writes through the bounce window, on a plain file (the logic does
    /// not depend on O_DIRECT; `file.rs` tests it under O_DIRECT): partial blocks at both ends
    /// are read, modified and written back, neighbours intact, across several windows.
    #[test]
    fn bounced_transfers_keep_the_bytes_around_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let size = 3 * WINDOW + 8192;
        let orig: Vec<u8> = (0..size).map(|i| (i * 7 % 253) as u8).collect();
        std::fs::write(&path, &orig).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let a = IoAlign {
            memory: 4096,
            offset: 4096,
        };
        let mut model = orig.clone();
        for (off, lens) in [
            (512u64, vec![100usize, 412]),
            (4096 - 512, vec![1024]),
            (1000, vec![WINDOW + 5000, 3, 2 * WINDOW - 9000]),
            (0, vec![4096]),
        ] {
            let data: Vec<Vec<u8>> = lens
                .iter()
                .enumerate()
                .map(|(k, &n)| vec![0x40 + k as u8; n])
                .collect();
            let bufs: Vec<IoSlice<'_>> = data.iter().map(|d| IoSlice::new(d)).collect();
            write_bounced(&file, a, &bufs, off).unwrap();
            let flat = data.concat();
            model[off as usize..off as usize + flat.len()].copy_from_slice(&flat);
            assert_eq!(std::fs::read(&path).unwrap(), model, "write at {off}");
            let mut back: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0u8; n]).collect();
            let mut slices: Vec<IoSliceMut<'_>> =
                back.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            read_bounced(&file, a, &mut slices, off).unwrap();
            assert_eq!(back.concat(), flat, "read at {off}");
        }
        // A file whose end is not aligned: its last bytes read, past them refused.
        file.set_len(size as u64 + 300).unwrap();
        model.resize(size + 300, 0);
        let size = size + 300;
        let mut tail = vec![0u8; 100];
        let at = size as u64 - 100;
        read_bounced(&file, a, &mut [IoSliceMut::new(&mut tail)], at).unwrap();
        assert_eq!(&tail[..], &model[size - 100..]);
        let mut past = vec![0u8; 200];
        assert!(read_bounced(&file, a, &mut [IoSliceMut::new(&mut past)], at).is_err());
    }
}
