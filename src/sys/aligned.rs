//! [`AlignedBuf`]: a zeroed heap buffer aligned for direct I/O.
//!
//! O_DIRECT reads and writes need their memory aligned (to the device's DMA alignment, at most
//! a page in practice) as well as their offsets and lengths. A `Vec<u8>` is aligned to 1, and
//! the allocator often hands out large ones 16 bytes past a page boundary, so every buffer the
//! engine does its own I/O with (copies, fills, the journal, checkpoints, headers) and every
//! bounce buffer is one of these.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// A zeroed, heap-allocated byte buffer whose start is aligned to [`AlignedBuf::ALIGN`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively (like a `Box<[u8]>`); nothing in it is
// tied to a thread.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only read the bytes (like `&[u8]`).
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// The alignment of every buffer: a page, which satisfies any device's DMA alignment and
    /// any logical block size up to 4 KiB.
    pub const ALIGN: usize = 4096;

    /// A buffer of `len` zero bytes. Aborts like `Vec` does if memory runs out.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return AlignedBuf {
                // An aligned, dangling pointer: never dereferenced for a length of 0.
                ptr: NonNull::<Page>::dangling().cast(),
                len,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size (len > 0) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    fn layout(len: usize) -> Layout {
        match Layout::from_size_align(len, Self::ALIGN) {
            Ok(l) => l,
            // Only for a length within a page of usize::MAX, which no allocation can have.
            Err(_) => alloc::handle_alloc_error(Layout::new::<Page>()),
        }
    }
}

/// The alignment unit, for a dangling pointer of the right alignment.
#[repr(C, align(4096))]
struct Page([u8; AlignedBuf::ALIGN]);

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: `ptr` came from `alloc_zeroed` with this very layout and is freed once.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialized (zeroed at allocation) bytes owned by
        // `self` (or dangling and aligned with `len == 0`), borrowed as long as `self` is.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and the borrow of `self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_page_aligned_zeroed_and_owned() {
        for len in [0usize, 1, 512, 4096, 65536 + 7, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % AlignedBuf::ALIGN, 0, "len {len}");
            assert!(b.iter().all(|&x| x == 0));
            b.fill(0xa5);
            let c = b.clone();
            assert_eq!(&c[..], &b[..]);
            assert_eq!(c.as_ptr() as usize % AlignedBuf::ALIGN, 0);
        }
        assert_eq!(&AlignedBuf::from_slice(b"abc")[..], b"abc");
    }
}
