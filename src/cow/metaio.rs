//! The engine's own I/O made fit for direct I/O (docs/engine.md, "Direct I/O"): every buffer
//! it reads or writes with is an [`AlignedBuf`], and every offset and length is a multiple of
//! the cache's I/O block (its direct-I/O alignment, at least 512 bytes and at most 4 KiB):
//!
//! - header slots are written whole (4 KiB);
//! - the journal is read whole at open, and appended in whole I/O blocks: transactions stay
//!   512-byte aligned on disk (the format is unchanged), and the bytes of the block before a
//!   transaction, already on disk, are kept in memory ([`JournalTail`]) and written again with
//!   it. A block rewritten that way holds only committed transactions before the new one, and
//!   a device writes a logical block whole or not at all, so a torn write loses no committed
//!   transaction;
//! - data blocks (copies, fills, checkpoint blocks) are whole blocks or rounded up to the I/O
//!   block within the chunk (the origin's last chunk may be short).

use super::format::{Header, HEADER_SLOT_SIZE, JOURNAL_OFFSET, TXN_ALIGN};
use crate::storage::{AlignedBuf, Storage};
use std::io;

/// The unit the cache object's metadata is read and written in: its I/O alignment, at least
/// the journal's 512 bytes.
pub(super) fn io_block(cache: &dyn Storage) -> u64 {
    (cache.io_align().offset as u64).max(TXN_ALIGN)
}

/// Writes header `h` into its slot (`generation % 2`), whole.
pub(super) fn write_header(cache: &dyn Storage, h: &Header) -> io::Result<()> {
    let slot = AlignedBuf::from_slice(&h.encode());
    debug_assert_eq!(slot.len() as u64, HEADER_SLOT_SIZE);
    cache.write_at(&slot, (h.generation % 2) * HEADER_SLOT_SIZE)
}

/// Reads the journal area of a cache object with a journal of `journal_size` bytes: as much of
/// it as the store holds, rounded up to a whole 4 KiB (the area is followed by padding up to
/// the data blocks, or by the end of the store).
pub(super) fn read_journal(cache: &dyn Storage, journal_size: u64) -> io::Result<AlignedBuf> {
    let room = cache.size().saturating_sub(JOURNAL_OFFSET);
    let len = journal_size
        .div_ceil(AlignedBuf::ALIGN as u64)
        .saturating_mul(AlignedBuf::ALIGN as u64)
        .min(room);
    let mut buf = AlignedBuf::zeroed(usize::try_from(len).map_err(io::Error::other)?);
    cache.read_at(&mut buf, JOURNAL_OFFSET)?;
    Ok(buf)
}

/// The journal block the next transaction begins in, as far as it is written: appends write
/// whole blocks, so the bytes before the next transaction are written again with it.
pub(crate) struct JournalTail {
    /// The I/O block, bytes.
    block: usize,
    /// The block holding the next position, up to that position (zeros after).
    bytes: AlignedBuf,
}

impl JournalTail {
    /// The tail for appending at journal position `pos`, from the journal as read at open
    /// (`journal`, from [`read_journal`]) and the cache's I/O block.
    pub(super) fn new(cache: &dyn Storage, journal: &[u8], pos: u64) -> JournalTail {
        let block = io_block(cache) as usize;
        let mut bytes = AlignedBuf::zeroed(block);
        let start = pos as usize / block * block;
        let keep = pos as usize - start;
        if let Some(src) = journal.get(start..start + keep) {
            bytes[..keep].copy_from_slice(src);
        }
        JournalTail { block, bytes }
    }

    /// Writes `txn` (a whole transaction, a multiple of 512 bytes) at journal position `pos`,
    /// in whole I/O blocks: the tail's bytes before it, the transaction, zeros after it.
    pub(super) fn append(&mut self, cache: &dyn Storage, pos: u64, txn: &[u8]) -> io::Result<()> {
        let block = self.block;
        let start = pos as usize / block * block;
        let keep = pos as usize - start;
        let end = (keep + txn.len()).div_ceil(block) * block;
        let mut buf = AlignedBuf::zeroed(end);
        buf[..keep].copy_from_slice(&self.bytes[..keep]);
        buf[keep..keep + txn.len()].copy_from_slice(txn);
        cache.write_at(&buf, JOURNAL_OFFSET + start as u64)?;
        // The block the next transaction begins in: the last one written, unless the
        // transaction ended on a block boundary (then a fresh, empty one).
        let next = keep + txn.len();
        self.bytes.fill(0);
        if !next.is_multiple_of(block) {
            let last = next / block * block;
            self.bytes[..next - last].copy_from_slice(&buf[last..next]);
        }
        Ok(())
    }

    /// The journal starts over at position 0 (after a wrap marker): nothing before it.
    pub(super) fn restart(&mut self) {
        self.bytes.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use crate::cow::{check_cache, CacheObject, CreateOptions, DeviceId, OpenOptions};
    use crate::storage::{AlignedBuf, Storage};
    use crate::testkit::aligned::StrictStorage;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    const CHUNK: usize = 64 << 10;
    const BLOCK: usize = 4096;

    fn read(eng: &CacheObject, dev: DeviceId, len: usize) -> Vec<u8> {
        let mut buf = AlignedBuf::zeroed(len);
        eng.read(dev, 0, &mut buf).unwrap();
        buf.to_vec()
    }

    /// The engine's own I/O on stores that refuse anything not aligned to 4 KiB (direct I/O on
    /// a 4 KiB-sector device, with no bounce buffer to fall back on): copies, fills of partial
    /// writes (the origin's short last chunk too), zeroing, journal appends packed several to a
    /// block across wraps and checkpoints, restore, deletes, reopens (recovery) and the
    /// checker. Nothing is refused, and every device reads what a model says: a journal block
    /// written again with a wrong tail would lose committed transactions at the next reopen.
    #[test]
    fn the_engines_own_io_is_aligned_for_direct_io() {
        let size = 40 * CHUNK + 2 * BLOCK;
        let image: Vec<u8> = (0..size).map(|i| (i / BLOCK * 7 % 251) as u8).collect();
        let origin = Arc::new(StrictStorage::new(0));
        origin.write_at(&AlignedBuf::from_slice(&image), 0).unwrap();
        let cache = Arc::new(StrictStorage::new(0));
        let opts = CreateOptions {
            chunk_size: CHUNK as u64,
            journal_size: 16 << 10,
            ..CreateOptions::default()
        };
        let mut eng = CacheObject::create(origin.clone(), cache.clone(), opts).unwrap();
        let mut model: BTreeMap<u64, (Vec<u8>, bool)> = BTreeMap::new();
        model.insert(0, (image, true));
        let mut rng = fastrand::Rng::with_seed(15);
        // Counters of the engines reopened so far.
        let mut seen = (0, 0, 0);
        let mut count = |eng: &CacheObject| {
            let st = eng.stats();
            seen = (
                seen.0 + st.checkpoints,
                seen.1 + st.copies,
                seen.2 + st.cow_fills,
            );
            seen
        };
        for step in 0..600 {
            let ids: Vec<u64> = model.keys().copied().collect();
            let dev = ids[rng.usize(..ids.len())];
            match rng.u32(..100) {
                0..=49 if model[&dev].1 => {
                    let off = rng.usize(..size / BLOCK) * BLOCK;
                    let len = (rng.usize(1..=3 * CHUNK / BLOCK) * BLOCK).min(size - off);
                    let data = AlignedBuf::from_slice(&vec![step as u8; len]);
                    eng.write(DeviceId(dev), off as u64, &data).unwrap();
                    model.get_mut(&dev).unwrap().0[off..off + len].copy_from_slice(&data);
                }
                50..=59 if model[&dev].1 => {
                    let off = rng.usize(..size / BLOCK) * BLOCK;
                    let len = (rng.usize(1..=2 * CHUNK / BLOCK) * BLOCK).min(size - off);
                    if rng.bool() {
                        eng.discard(DeviceId(dev), off as u64, len as u64).unwrap();
                    } else {
                        eng.write_zeroes(DeviceId(dev), off as u64, len as u64)
                            .unwrap();
                    }
                    model.get_mut(&dev).unwrap().0[off..off + len].fill(0);
                }
                60..=71 if model.len() < 7 => {
                    let writable = rng.bool();
                    let name = format!("s{step}");
                    let id = eng.create_snapshot(DeviceId(dev), &name, writable).unwrap();
                    let view = model[&dev].0.clone();
                    model.insert(id.0, (view, writable));
                }
                72..=79 if dev != 0 => {
                    eng.delete_snapshot(DeviceId(dev)).unwrap();
                    model.remove(&dev);
                }
                80..=82 if dev != 0 => {
                    eng.restore(DeviceId(dev)).unwrap();
                    let view = model[&dev].0.clone();
                    model.get_mut(&0).unwrap().0 = view;
                }
                83..=89 => eng.flush().unwrap(),
                90..=92 => {
                    count(&eng);
                    drop(eng);
                    eng = CacheObject::open(origin.clone(), cache.clone(), OpenOptions::default())
                        .unwrap();
                }
                _ => {}
            }
        }
        for (&dev, (view, _)) in &model {
            assert!(read(&eng, DeviceId(dev), size) == *view, "device {dev}");
        }
        let (checkpoints, copies, fills) = count(&eng);
        assert!(
            checkpoints > 0 && copies > 0 && fills > 0,
            "{checkpoints} checkpoints, {copies} copies, {fills} fills"
        );
        drop(eng);
        let report = check_cache(cache.as_ref());
        assert!(report.is_clean(), "{report}");
        assert_eq!(origin.refused(), Vec::<String>::new(), "origin I/O");
        assert_eq!(cache.refused(), Vec::<String>::new(), "cache I/O");
    }
}
