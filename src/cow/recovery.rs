//! Recovery: the state of a cache object rebuilt from its header, its checkpoint and the
//! journal after it. One sequence of steps shared by the engine's open and by the offline
//! checker, which reports what each step found:
//!
//! 1. [`read_header_slots`]: both header slots; the valid one with the highest generation.
//! 2. [`read_checkpoint`]: the checkpoint chain the header names (every block's CRC, and the
//!    whole's).
//! 3. [`replay`]: the checkpoint decoded, then the journal replayed from the checkpoint's
//!    position, then the journal scanned for damage the replay could not see.
//!
//! [`recover`] runs steps 2 and 3. Reads no data block. Every read is aligned for direct I/O
//! (`metaio.rs`): the header slots whole, checkpoint blocks whole, the journal whole.

use super::error::{corrupt, CowError, Result};
use super::format::{
    decode_ckpt_block, parse_txn_header, txn_len, verify_txn, FormatError, Header, Record,
    HEADER_SLOT_SIZE, INCOMPAT_DEVICE_SIZES, INCOMPAT_ORIGIN_COPIES, JOURNAL_OFFSET, NO_BLOCK,
    TXN_ALIGN, TXN_HEADER, TXN_WRAP,
};
use super::meta::Meta;
use super::metaio::read_journal;
use crate::storage::{AlignedBuf, Storage};

/// What the two header slots hold.
pub(crate) struct HeaderSlots {
    /// The valid header with the highest generation, or why there is none. A slot with
    /// unknown incompatible features or an unknown version is refused, never skipped over,
    /// even if the other slot is valid.
    pub header: Result<Header>,
    /// A note per slot that holds something other than a valid header: normal after a crash
    /// during a header write (the other slot is used).
    pub notes: Vec<String>,
}

/// Reads both header slots.
pub(crate) fn read_header_slots(cache: &dyn Storage) -> HeaderSlots {
    let mut best: Option<Header> = None;
    let mut refused = None;
    let mut first_err = None;
    let mut notes = Vec::new();
    for slot in 0..2 {
        let mut buf = AlignedBuf::zeroed(HEADER_SLOT_SIZE as usize);
        if cache.read_at(&mut buf, slot * HEADER_SLOT_SIZE).is_err() {
            continue;
        }
        match Header::decode(&buf) {
            Ok(h) => {
                if best.as_ref().is_none_or(|b| h.generation > b.generation) {
                    best = Some(h);
                }
            }
            Err(e) => {
                if buf.iter().any(|&b| b != 0) {
                    notes.push(format!(
                        "header slot {slot} is invalid ({e}); the other slot is used"
                    ));
                }
                // Unknown features or versions must be refused, never skipped over.
                if matches!(
                    e,
                    FormatError::IncompatFeatures(_) | FormatError::Version(_)
                ) {
                    refused.get_or_insert(e);
                } else {
                    first_err.get_or_insert(e);
                }
            }
        }
    }
    let header = match (refused, best, first_err) {
        (Some(e), _, _) => Err(e.into()),
        (None, Some(h), _) => Ok(h),
        (None, None, Some(e)) => Err(e.into()),
        (None, None, None) => Err(corrupt("cache object too short for a header")),
    };
    HeaderSlots { header, notes }
}

/// The header in use: [`read_header_slots`] without the notes.
pub(crate) fn read_header(cache: &dyn Storage) -> Result<Header> {
    read_header_slots(cache).header
}

/// The checkpoint chain as read, not yet decoded.
pub(crate) struct Checkpoint {
    bytes: Vec<u8>,
    blocks: Vec<u64>,
}

/// Reads the checkpoint chain named by the header (empty if it names none).
pub(crate) fn read_checkpoint(cache: &dyn Storage, h: &Header) -> Result<Checkpoint> {
    let mut bytes = Vec::new();
    let mut blocks = Vec::new();
    if h.ckpt_block == NO_BLOCK {
        return Ok(Checkpoint { bytes, blocks });
    }
    let max_blocks = (h.max_size - h.data_offset) / h.chunk_size;
    let stored = stored_blocks(cache, h);
    let mut buf = AlignedBuf::zeroed(h.chunk_size as usize);
    let mut b = h.ckpt_block;
    while b != NO_BLOCK {
        if b >= max_blocks || blocks.len() as u64 > max_blocks {
            return Err(corrupt(format!("checkpoint block {b} out of range")));
        }
        if b >= stored {
            return Err(corrupt(format!(
                "checkpoint block {b} lies past the end of the cache object"
            )));
        }
        cache.read_at(&mut buf, h.data_offset + b * h.chunk_size)?;
        let (bh, data) = decode_ckpt_block(&buf)?;
        if bh.index as usize != blocks.len() {
            return Err(corrupt("checkpoint chain out of order"));
        }
        bytes.extend_from_slice(data);
        blocks.push(b);
        b = bh.next;
    }
    if bytes.len() as u64 != h.ckpt_len || crc32c::crc32c(&bytes) != h.ckpt_crc {
        return Err(FormatError::Checksum("checkpoint").into());
    }
    Ok(Checkpoint { bytes, blocks })
}

/// The blocks that lie in the cache object's store (a file's size, a block device's), at most
/// the header's limit. Every block a record or the checkpoint names lies there: its data is
/// written and synced before the record that maps it is committed (the checkpoint's before the
/// header names it). A short last block, the copy of an origin's short last chunk, counts.
fn stored_blocks(cache: &dyn Storage, h: &Header) -> u64 {
    let max_blocks = (h.max_size - h.data_offset) / h.chunk_size;
    let stored = cache
        .size()
        .saturating_sub(h.data_offset)
        .div_ceil(h.chunk_size);
    stored.min(max_blocks)
}

/// State rebuilt from a checkpoint and the journal.
pub(crate) struct Recovered {
    pub meta: Meta,
    /// Blocks holding the checkpoint.
    pub ckpt_blocks: Vec<u64>,
    /// Journal position after the last transaction replayed: where the next one goes.
    pub pos: u64,
    /// Journal bytes since the checkpoint.
    pub used: u64,
    pub next_seq: u64,
    /// Transactions replayed.
    pub txns: u64,
    /// The journal is damaged in the middle: a valid transaction lies beyond the point where
    /// the replay stopped (see [`journal_damage`]). `open` refuses such a cache object.
    pub damage: Option<String>,
    /// The journal area as read (for the block the next transaction begins in).
    pub journal: AlignedBuf,
}

/// Reads the checkpoint, then replays the journal ([`replay`]).
pub(crate) fn recover(cache: &dyn Storage, h: &Header) -> Result<Recovered> {
    replay(cache, h, read_checkpoint(cache, h)?)
}

/// Decodes the checkpoint, then replays journal transactions with consecutive sequence
/// numbers from the checkpoint's journal position, stopping at the first torn or stale one,
/// then looks for damage beyond that point.
pub(crate) fn replay(cache: &dyn Storage, h: &Header, ckpt: Checkpoint) -> Result<Recovered> {
    let nchunks = h.origin_size.div_ceil(h.chunk_size);
    let max_blocks = (h.max_size - h.data_offset) / h.chunk_size;
    let Checkpoint { bytes, blocks } = ckpt;
    let origin_copies = h.incompat & INCOMPAT_ORIGIN_COPIES != 0;
    // The flag is set together with a checkpoint that holds the sizes (`resize.rs`).
    let sized = h.incompat & INCOMPAT_DEVICE_SIZES != 0;
    let mut meta = Meta::new(nchunks, max_blocks);
    meta.origin_copies = origin_copies;
    // Records name blocks in the store only: a lying one is refused before it sizes the
    // reference counts (bounded by the file, not by the limit: 2^40 blocks under a large one).
    meta.stored_blocks = stored_blocks(cache, h);
    if h.ckpt_block != NO_BLOCK {
        meta.sized = sized;
        meta = meta.load_checkpoint(&bytes, h.version)?;
    }
    meta.chunk_size = h.chunk_size;
    if !meta.sized {
        meta.init_sizes(h.origin_size);
    }
    let js = h.journal_size;
    // The file always holds the whole journal (create sizes it to the data offset): a header
    // naming a journal past the end of the file is damaged, and its size must not size a
    // buffer.
    let journal = if JOURNAL_OFFSET
        .checked_add(js)
        .is_some_and(|e| e <= cache.size())
    {
        read_journal(cache, js)?
    } else {
        AlignedBuf::zeroed(0)
    };
    let mut pos = h.journal_start;
    let mut used = 0u64;
    let mut seq = h
        .ckpt_seq
        .checked_add(1)
        .ok_or_else(|| corrupt("checkpoint sequence number out of range"))?;
    let mut txns = 0;
    loop {
        if pos + TXN_ALIGN > js || used >= js {
            break;
        }
        let Some(th) = journal.get(pos as usize..).and_then(parse_txn_header) else {
            break;
        };
        let len = txn_len(th.payload_len);
        // A transaction past the end of the journal was never written.
        if th.seq != seq || pos + len > js {
            break;
        }
        let Some(buf) = journal.get(pos as usize..(pos + len) as usize) else {
            break;
        };
        if !verify_txn(&th, buf) {
            break; // torn last transaction: it was never acknowledged as durable
        }
        let Some(next) = seq.checked_add(1) else {
            break; // no transaction can follow the last sequence number
        };
        seq = next;
        txns += 1;
        if th.flags & TXN_WRAP != 0 {
            used += js - pos;
            pos = 0;
            continue;
        }
        let recs = Record::decode_all(&buf[TXN_HEADER..TXN_HEADER + th.payload_len])?;
        for r in &recs {
            meta.apply(r).map_err(|source| CowError::Journal {
                seq: th.seq,
                source,
            })?;
        }
        pos += len;
        used += len;
    }
    for &b in &blocks {
        if meta.refcount(b) != 0 {
            return Err(corrupt(format!("block {b} is both checkpoint and data")));
        }
    }
    meta.rebuild_allocator(&blocks);
    meta.stored_blocks = u64::MAX;
    Ok(Recovered {
        meta,
        ckpt_blocks: blocks,
        pos,
        used,
        next_seq: seq,
        txns,
        damage: journal_damage(cache, &journal, h, seq, pos),
        journal,
    })
}

/// Replay stops at the first transaction that is missing or fails its checksum; after a crash
/// that is the torn last one. A valid transaction with a later sequence number anywhere in the
/// journal means the replay stopped early: the journal is damaged in the middle.
fn journal_damage(
    cache: &dyn Storage,
    journal: &[u8],
    h: &Header,
    next_seq: u64,
    end: u64,
) -> Option<String> {
    if JOURNAL_OFFSET
        .checked_add(h.journal_size)
        .is_none_or(|e| e > cache.size())
    {
        return Some("journal area extends past the end of the file".into());
    }
    let Some(buf) = journal.get(..h.journal_size as usize) else {
        return Some("journal area unreadable".into());
    };
    let mut pos = 0usize;
    while pos + TXN_HEADER <= buf.len() {
        if let Some(th) = parse_txn_header(&buf[pos..]) {
            let len = txn_len(th.payload_len) as usize;
            // seq == next_seq + 1 is left alone: a crash can keep the transaction that
            // follows a journal wrap and lose the wrap marker written just before it.
            let later =
                th.seq > next_seq.saturating_add(1) || (th.seq == next_seq && pos as u64 != end);
            if later && pos + len <= buf.len() && verify_txn(&th, &buf[pos..pos + len]) {
                return Some(format!(
                    "journal damaged: replay ended before sequence {next_seq} at offset {end}, \
                     but a valid transaction {} sits at offset {pos}",
                    th.seq
                ));
            }
        }
        pos += TXN_ALIGN as usize;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cow::format::{encode_txn, Enc, ENTRY_ZERO, FORMAT_VERSION};
    use crate::cow::meta::MetaError;
    use crate::testkit::storage::MemStorage;
    use std::error::Error;

    /// A valid header of a small cache object: 16 chunks of 4 KiB, a 16 KiB journal, no
    /// checkpoint.
    fn small_header() -> Header {
        Header {
            version: FORMAT_VERSION,
            generation: 1,
            incompat: 0,
            compat: 0,
            chunk_size: 4096,
            origin_size: 16 * 4096,
            origin_tag: String::new(),
            journal_size: 16 << 10,
            data_offset: 24 << 10,
            max_size: 1 << 20,
            ckpt_block: NO_BLOCK,
            ckpt_len: 0,
            ckpt_crc: 0,
            ckpt_seq: 0,
            journal_start: 0,
        }
    }

    /// A record that does not apply fails recovery with the metadata's own error as the
    /// source, and the message names the transaction.
    #[test]
    fn a_record_that_does_not_apply_keeps_its_error_as_the_source() {
        let h = small_header();
        let cache = MemStorage::new(h.data_offset);
        cache
            .write_at(&h.encode(), (h.generation % 2) * HEADER_SLOT_SIZE)
            .unwrap();
        let mut payload = Enc::default();
        Record::SetEntry {
            dev: 7,
            chunk: 0,
            entry: ENTRY_ZERO,
        }
        .encode(&mut payload);
        cache
            .write_at(&encode_txn(1, 0, &payload.0), JOURNAL_OFFSET)
            .unwrap();
        let slots = read_header_slots(&cache);
        assert!(slots.notes.is_empty());
        let h = slots.header.unwrap();
        let err = recover(&cache, &h)
            .err()
            .expect("the record names no device");
        assert_eq!(
            err.to_string(),
            "cache object is corrupt: journal transaction 1: record names unknown device 7"
        );
        let source = err.source().and_then(|s| s.downcast_ref::<MetaError>());
        assert_eq!(source, Some(&MetaError::NoDevice(7)));
    }

    /// Found by tests/fuzz_cache_object.rs: a checksummed header whose checkpoint sequence
    /// number is the last one overflowed the replay's next sequence number (a panic in debug).
    #[test]
    fn a_checkpoint_at_the_last_sequence_number_is_refused_without_overflow() {
        let h = Header {
            ckpt_seq: u64::MAX,
            ..small_header()
        };
        let cache = MemStorage::new(h.data_offset);
        cache
            .write_at(&h.encode(), (h.generation % 2) * HEADER_SLOT_SIZE)
            .unwrap();
        let h = read_header(&cache).unwrap();
        assert!(recover(&cache, &h).is_err());
    }

    /// Found by tests/fuzz_cache_object.rs: a checksummed header naming a journal of 256 GiB
    /// in a small file made recovery allocate the whole journal size (an abort).
    #[test]
    fn a_journal_past_the_end_of_the_file_is_damage_not_an_allocation() {
        let h = Header {
            journal_size: 1 << 38,
            data_offset: (1 << 38) + 8192,
            max_size: 1 << 40,
            ..small_header()
        };
        let cache = MemStorage::new(64 << 10);
        cache
            .write_at(&h.encode(), (h.generation % 2) * HEADER_SLOT_SIZE)
            .unwrap();
        // A transaction header claiming a 4 GiB payload at the start of the journal.
        let mut txn = encode_txn(1, 0, &[]);
        txn[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        cache.write_at(&txn, JOURNAL_OFFSET).unwrap();
        let h = read_header(&cache).unwrap();
        let r = recover(&cache, &h).unwrap();
        assert_eq!(r.txns, 0);
        assert_eq!(
            r.damage.as_deref(),
            Some("journal area extends past the end of the file")
        );
    }
}
