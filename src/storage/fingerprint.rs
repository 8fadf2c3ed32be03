//! The identity of a read-only origin copied on read (a remote image), pinned in the cache
//! object (and checked again when its server comes back after a disconnection): its size
//! and a fingerprint of its content, CRC32C of
//! [`SAMPLES`] blocks of [`SAMPLE_LEN`] bytes at fixed places (the first and last blocks,
//! where partition tables live, and pseudo-random ones chosen by the size alone). The
//! cache object keeps local copies of the image's chunks; an image that changed would be
//! mixed with stale copies, so a difference refuses it, naming what differs.
//!
//! A fingerprint samples: a change that touches none of the sampled blocks goes unseen. It
//! costs [`SAMPLES`] small reads at every start.

use super::Storage;
use std::io;

/// Blocks sampled.
pub const SAMPLES: usize = 16;
/// Bytes per sampled block.
pub const SAMPLE_LEN: u64 = 4096;
/// How a fingerprint starts in the header's origin tag.
const TAG_PREFIX: &str = "read-only origin, crc32c of 4096-byte samples:";

/// The sampled blocks of an image: `(offset, crc32c)`, in offset order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(pub Vec<(u64, u32)>);

/// Where the samples of an image of `size` bytes (a multiple of 512) lie: [`SAMPLES`]
/// distinct blocks (all of them in a smaller image), in order.
fn sample_offsets(size: u64) -> Vec<u64> {
    let blocks = size.div_ceil(SAMPLE_LEN).max(1);
    let mut v = std::collections::BTreeSet::from([0, (blocks - 1) * SAMPLE_LEN]);
    // splitmix64, seeded by the size: the same places for the same size, everywhere.
    let mut x = size ^ 0x5a5a_cafe_f00d_1234;
    while (v.len() as u64) < (SAMPLES as u64).min(blocks) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        v.insert((z % blocks) * SAMPLE_LEN);
    }
    v.into_iter().collect()
}

impl Fingerprint {
    /// Reads the samples of `origin`.
    pub fn of(origin: &dyn Storage) -> io::Result<Self> {
        Self::sample(origin.size(), |buf, off| origin.read_at(buf, off))
    }

    /// Takes the samples of an image of `size` bytes with `read` (fill the buffer from the
    /// offset).
    pub fn sample<E>(
        size: u64,
        mut read: impl FnMut(&mut [u8], u64) -> Result<(), E>,
    ) -> Result<Self, E> {
        let mut buf = vec![0u8; SAMPLE_LEN as usize];
        let mut v = Vec::with_capacity(SAMPLES);
        for off in sample_offsets(size) {
            let n = SAMPLE_LEN.min(size - off) as usize;
            read(&mut buf[..n], off)?;
            v.push((off, crc32c::crc32c(&buf[..n])));
        }
        Ok(Fingerprint(v))
    }

    /// As kept in the header's origin tag.
    pub fn to_tag(&self) -> String {
        let mut s = TAG_PREFIX.to_string();
        for (off, crc) in &self.0 {
            s.push_str(&format!(" {off:x}={crc:08x}"));
        }
        s
    }

    /// Reads a tag written by [`Fingerprint::to_tag`]; `None` if it is not one.
    pub fn from_tag(tag: &str) -> Option<Self> {
        let rest = tag.strip_prefix(TAG_PREFIX)?;
        let mut v = Vec::new();
        for word in rest.split_whitespace() {
            let (off, crc) = word.split_once('=')?;
            v.push((
                u64::from_str_radix(off, 16).ok()?,
                u32::from_str_radix(crc, 16).ok()?,
            ));
        }
        (!v.is_empty()).then_some(Fingerprint(v))
    }

    /// `Ok` if `now` (the image as it is) matches `self` (as recorded), else what differs.
    pub fn compare(&self, now: &Fingerprint) -> Result<(), String> {
        let differ: Vec<(u64, u32, u32)> = self
            .0
            .iter()
            .zip(&now.0)
            .filter(|(a, b)| a != b)
            .map(|(a, b)| (a.0, a.1, b.1))
            .collect();
        if self.0.len() != now.0.len() || self.0.iter().zip(&now.0).any(|(a, b)| a.0 != b.0) {
            return Err("its content fingerprint was sampled at other places".into());
        }
        match differ.first() {
            None => Ok(()),
            Some(&(off, was, is)) => Err(format!(
                "its content changed: {} of {} sampled {SAMPLE_LEN}-byte blocks differ, the \
                 first at byte {off} (crc32c {is:08x} now, {was:08x} when the cache object \
                 was made)",
                differ.len(),
                self.0.len()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::storage::MemStorage;

    #[test]
    fn fingerprints_round_trip_and_name_what_differs() {
        let img = MemStorage::from_bytes((0..1u32 << 20).map(|i| i as u8).collect());
        let fp = Fingerprint::of(&img).unwrap();
        assert_eq!(fp.0.len(), SAMPLES);
        assert_eq!(fp.0[0].0, 0);
        assert_eq!(fp.0.last().unwrap().0, (1 << 20) - SAMPLE_LEN);
        assert_eq!(Fingerprint::from_tag(&fp.to_tag()), Some(fp.clone()));
        assert_eq!(Fingerprint::from_tag("/some/path.img"), None);
        assert_eq!(fp.compare(&Fingerprint::of(&img).unwrap()), Ok(()));
        // A change in a sampled block is named.
        let off = fp.0[5].0;
        img.write_at(&[0xff; 512], off).unwrap();
        let msg = fp.compare(&Fingerprint::of(&img).unwrap()).unwrap_err();
        assert!(msg.contains(&format!("first at byte {off}")), "{msg}");
        assert!(msg.contains("1 of 16"), "{msg}");
        // Tiny images: one block, sampled once.
        let tiny = MemStorage::from_bytes(vec![1; 512]);
        assert_eq!(Fingerprint::of(&tiny).unwrap().0.len(), 1);
    }
}
