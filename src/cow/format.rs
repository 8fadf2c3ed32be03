//! On-disk format of the cache object: header slots, journal transactions, records and
//! checkpoints. Pure encoding and decoding; no I/O. All integers are little-endian.
//!
//! ```text
//! 0      4 KiB  header slot 0   } two slots, written alternately; the valid one with the
//! 4 KiB  4 KiB  header slot 1   } highest generation wins (a torn header write is harmless)
//! 8 KiB  J      journal (circular, 512-byte aligned transactions)
//! D      ...    data blocks, chunk-sized, D = round_up(8 KiB + J, chunk)
//! ```

use thiserror::Error;

/// Magic at the start of a header slot.
pub const HEADER_MAGIC: &[u8; 8] = b"SNAPBLKC";
/// Current format version. Version 2 added the origin's history (the `Preserve` record, and
/// snapshot times and preserved copies in checkpoints); version 1 cache objects are still read
/// and become version 2 at their next checkpoint.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const MIN_FORMAT_VERSION: u32 = 1;
/// Size of one header slot.
pub const HEADER_SLOT_SIZE: u64 = 4096;
/// Offset of the journal.
pub const JOURNAL_OFFSET: u64 = 2 * HEADER_SLOT_SIZE;
/// Incompatible feature: the origin is read-only (a remote image) and the cache object keeps
/// local copies of its chunks (copy-on-read): `OriginLocal` records, and the origin device's
/// own entries in checkpoints. A build that does not know it would read the origin's image
/// where a local copy is meant, and would not know the record: it must refuse the file.
pub const INCOMPAT_ORIGIN_COPIES: u64 = 1;
/// Incompatible feature: devices have sizes of their own (`snapblk resize`). Journals may
/// hold `Resize` records and checkpoints end with every device's size; an older build must
/// refuse such a cache object rather than serve every device at the header's origin size.
pub const INCOMPAT_DEVICE_SIZES: u64 = 2;
/// Incompatible feature: device ids carry a table slot (`devids.rs`: `serial << 32 | slot`,
/// slots reused, ids never). An older build would size its device table from such an id.
pub const INCOMPAT_SLOT_IDS: u64 = 4;
/// Incompatible features this build understands.
pub const KNOWN_INCOMPAT: u64 = INCOMPAT_ORIGIN_COPIES | INCOMPAT_DEVICE_SIZES | INCOMPAT_SLOT_IDS;
/// Compatible feature: the growth limit also follows the host file system's free space (less
/// a reserve); `max_size` only caps it. A build that does not know the flag uses `max_size`
/// alone, which is safe: it only bounds block numbers.
pub const COMPAT_HOST_LIMIT: u64 = 1;
/// Journal transactions are aligned to this.
pub const TXN_ALIGN: u64 = 512;
/// Size of a transaction header.
pub const TXN_HEADER: usize = 32;
const TXN_MAGIC: u32 = 0x4e58_544a; // "JTXN"
/// Transaction flag: the rest of the journal is unused; continue at journal offset 0.
pub const TXN_WRAP: u32 = 1;
const CKPT_BLOCK_MAGIC: u32 = 0x5450_4b43; // "CKPT"
/// Size of the header of a checkpoint block.
pub const CKPT_BLOCK_HEADER: usize = 32;
/// "No block" in block-number fields.
pub const NO_BLOCK: u64 = u64::MAX;

/// Remap-table entry encoding: 0 = unmapped, 1 = zero, `b + 2` = cache block `b`.
pub const ENTRY_UNMAPPED: u64 = 0;
/// The chunk reads as zeros.
pub const ENTRY_ZERO: u64 = 1;

/// Entry for cache block `b`.
pub fn entry_block(b: u64) -> u64 {
    b + 2
}

/// The block an entry points at, if any.
pub fn entry_to_block(e: u64) -> Option<u64> {
    e.checked_sub(2)
}

/// Errors decoding on-disk structures.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("bad magic: not a snapblk cache object")]
    BadMagic,
    #[error("checksum mismatch in {0}")]
    Checksum(&'static str),
    #[error("unsupported format version {0}")]
    Version(u32),
    #[error("unknown incompatible features {0:#x}")]
    IncompatFeatures(u64),
    #[error("truncated or malformed {0}")]
    Malformed(&'static str),
}

/// Little-endian writer.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
    }
}

/// Little-endian reader over untrusted bytes: every read is bounds-checked.
pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }
    pub fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(FormatError::Malformed(self.what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32, FormatError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    pub fn u64(&mut self) -> Result<u64, FormatError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    pub fn str(&mut self) -> Result<String, FormatError> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| FormatError::Malformed(self.what))
    }
}

/// The header: geometry, identity, feature flags and where the latest checkpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Format version of the checkpoint this header names (and of the file).
    pub version: u32,
    /// Incremented on every header write; the slot is `generation % 2`.
    pub generation: u64,
    pub incompat: u64,
    pub compat: u64,
    pub chunk_size: u64,
    pub origin_size: u64,
    /// Identity of the origin chosen by the creator (e.g. its canonical path or a UUID).
    pub origin_tag: String,
    pub journal_size: u64,
    pub data_offset: u64,
    /// Growth limit of the whole file, bytes (with [`COMPAT_HOST_LIMIT`], its upper bound).
    pub max_size: u64,
    /// First block of the latest checkpoint chain, or [`NO_BLOCK`] (empty state).
    pub ckpt_block: u64,
    pub ckpt_len: u64,
    pub ckpt_crc: u32,
    /// Sequence number of the last journal transaction the checkpoint includes.
    pub ckpt_seq: u64,
    /// Journal position (relative) where replay after the checkpoint starts.
    pub journal_start: u64,
}

impl Header {
    /// Encodes into one 4 KiB slot with a trailing CRC32C over the used bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.0.extend_from_slice(HEADER_MAGIC);
        e.u32(self.version);
        e.u64(self.generation);
        e.u64(self.incompat);
        e.u64(self.compat);
        e.u64(self.chunk_size);
        e.u64(self.origin_size);
        e.str(&self.origin_tag);
        e.u64(self.journal_size);
        e.u64(self.data_offset);
        e.u64(self.max_size);
        e.u64(self.ckpt_block);
        e.u64(self.ckpt_len);
        e.u32(self.ckpt_crc);
        e.u64(self.ckpt_seq);
        e.u64(self.journal_start);
        let crc = crc32c::crc32c(&e.0);
        e.u32(crc);
        let mut v = e.0;
        v.resize(HEADER_SLOT_SIZE as usize, 0);
        v
    }

    /// Decodes and validates one slot.
    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        if buf.len() < 8 || &buf[..8] != HEADER_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let mut d = Dec::new(&buf[8..], "header");
        let version = d.u32()?;
        let generation = d.u64()?;
        let incompat = d.u64()?;
        let compat = d.u64()?;
        let chunk_size = d.u64()?;
        let origin_size = d.u64()?;
        let origin_tag = d.str()?;
        let journal_size = d.u64()?;
        let data_offset = d.u64()?;
        let max_size = d.u64()?;
        let ckpt_block = d.u64()?;
        let ckpt_len = d.u64()?;
        let ckpt_crc = d.u32()?;
        let ckpt_seq = d.u64()?;
        let journal_start = d.u64()?;
        let used = 8 + d.pos;
        let crc = d.u32()?;
        if crc32c::crc32c(&buf[..used]) != crc {
            return Err(FormatError::Checksum("header"));
        }
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(FormatError::Version(version));
        }
        if incompat & !KNOWN_INCOMPAT != 0 {
            return Err(FormatError::IncompatFeatures(incompat & !KNOWN_INCOMPAT));
        }
        let h = Self {
            version,
            generation,
            incompat,
            compat,
            chunk_size,
            origin_size,
            origin_tag,
            journal_size,
            data_offset,
            max_size,
            ckpt_block,
            ckpt_len,
            ckpt_crc,
            ckpt_seq,
            journal_start,
        };
        h.validate()?;
        Ok(h)
    }

    fn validate(&self) -> Result<(), FormatError> {
        let ok = self.chunk_size.is_power_of_two()
            && (4096..=1 << 20).contains(&self.chunk_size)
            && self.journal_size >= 4 * TXN_ALIGN
            && self.journal_size.is_multiple_of(TXN_ALIGN)
            && self.journal_start < self.journal_size
            && self.journal_start.is_multiple_of(TXN_ALIGN)
            && JOURNAL_OFFSET
                .checked_add(self.journal_size)
                .is_some_and(|end| self.data_offset >= end)
            && self.data_offset.is_multiple_of(self.chunk_size)
            && self.origin_size.is_multiple_of(512)
            && self.origin_size > 0
            && self.origin_size <= 1 << 56
            && self
                .data_offset
                .checked_add(self.chunk_size)
                .is_some_and(|end| self.max_size >= end);
        if ok {
            Ok(())
        } else {
            Err(FormatError::Malformed("header geometry"))
        }
    }
}

/// One metadata change. Replaying the same records in order on the same state gives the
/// same state, so the live engine applies exactly what it journals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A new, empty snapshot of `parent`.
    CreateDevice {
        id: u64,
        parent: u64,
        writable: bool,
        name: String,
    },
    /// Removes a snapshot: each of its mappings passes to its children unmapped there
    /// (shared, no copy); its children are re-parented to its parent.
    DeleteDevice { id: u64 },
    /// Sets one remap-table entry of `dev`.
    SetEntry { dev: u64, chunk: u64, entry: u64 },
    /// Gives `entry` to every child of `dev` that is unmapped at `chunk`.
    ShareDown { dev: u64, chunk: u64, entry: u64 },
    /// The origin's old data at `chunk` was copied to `entry`, stamped with snapshot time
    /// `time`: what snapshots of times up to `time` (and after the previous copy) read there.
    Preserve { chunk: u64, time: u64, entry: u64 },
    /// Marks `dev` inoperative and releases its mappings.
    SetInoperative { dev: u64 },
    /// A read-only origin's chunk is local (with [`INCOMPAT_ORIGIN_COPIES`]): `entry` is the
    /// cache block holding its data, or zero (the image reads as zeros there). Valid for
    /// every device that reads the image at `chunk`, since the image never changes.
    OriginLocal { chunk: u64, entry: u64 },
    /// The device's size is now `size` bytes (with [`INCOMPAT_DEVICE_SIZES`]).
    Resize { dev: u64, size: u64 },
    /// Sets (or with `None` removes) a persistent per-device attribute.
    SetAttr {
        dev: u64,
        key: String,
        value: Option<String>,
    },
}

impl Record {
    pub fn encode(&self, e: &mut Enc) {
        match self {
            Record::CreateDevice {
                id,
                parent,
                writable,
                name,
            } => {
                e.u8(1);
                e.u64(*id);
                e.u64(*parent);
                e.u8(*writable as u8);
                e.str(name);
            }
            Record::DeleteDevice { id } => {
                e.u8(2);
                e.u64(*id);
            }
            Record::SetEntry { dev, chunk, entry } => {
                e.u8(3);
                e.u64(*dev);
                e.u64(*chunk);
                e.u64(*entry);
            }
            Record::ShareDown { dev, chunk, entry } => {
                e.u8(4);
                e.u64(*dev);
                e.u64(*chunk);
                e.u64(*entry);
            }
            Record::SetInoperative { dev } => {
                e.u8(5);
                e.u64(*dev);
            }
            Record::Preserve { chunk, time, entry } => {
                e.u8(7);
                e.u64(*chunk);
                e.u64(*time);
                e.u64(*entry);
            }
            Record::OriginLocal { chunk, entry } => {
                e.u8(8);
                e.u64(*chunk);
                e.u64(*entry);
            }
            Record::Resize { dev, size } => {
                e.u8(9);
                e.u64(*dev);
                e.u64(*size);
            }
            Record::SetAttr { dev, key, value } => {
                e.u8(6);
                e.u64(*dev);
                e.str(key);
                match value {
                    Some(v) => {
                        e.u8(1);
                        e.str(v);
                    }
                    None => e.u8(0),
                }
            }
        }
    }

    pub fn decode(d: &mut Dec<'_>) -> Result<Self, FormatError> {
        Ok(match d.u8()? {
            1 => Record::CreateDevice {
                id: d.u64()?,
                parent: d.u64()?,
                writable: d.u8()? != 0,
                name: d.str()?,
            },
            2 => Record::DeleteDevice { id: d.u64()? },
            3 => Record::SetEntry {
                dev: d.u64()?,
                chunk: d.u64()?,
                entry: d.u64()?,
            },
            4 => Record::ShareDown {
                dev: d.u64()?,
                chunk: d.u64()?,
                entry: d.u64()?,
            },
            5 => Record::SetInoperative { dev: d.u64()? },
            6 => {
                let dev = d.u64()?;
                let key = d.str()?;
                let value = if d.u8()? != 0 { Some(d.str()?) } else { None };
                Record::SetAttr { dev, key, value }
            }
            7 => Record::Preserve {
                chunk: d.u64()?,
                time: d.u64()?,
                entry: d.u64()?,
            },
            8 => Record::OriginLocal {
                chunk: d.u64()?,
                entry: d.u64()?,
            },
            9 => Record::Resize {
                dev: d.u64()?,
                size: d.u64()?,
            },
            _ => return Err(FormatError::Malformed("journal record")),
        })
    }

    /// Decodes a whole transaction payload.
    pub fn decode_all(payload: &[u8]) -> Result<Vec<Record>, FormatError> {
        let mut d = Dec::new(payload, "journal record");
        let mut v = Vec::new();
        while !d.done() {
            v.push(Record::decode(&mut d)?);
        }
        Ok(v)
    }
}

/// Size of a transaction with `payload_len` bytes, padded to [`TXN_ALIGN`].
pub fn txn_len(payload_len: usize) -> u64 {
    ((TXN_HEADER + payload_len) as u64).div_ceil(TXN_ALIGN) * TXN_ALIGN
}

/// Encodes a transaction: magic, flags, seq, payload length, CRC32C (of all of it with the
/// CRC field zeroed), then the payload, padded with zeros.
pub fn encode_txn(seq: u64, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut e = Enc::default();
    e.u32(TXN_MAGIC);
    e.u32(flags);
    e.u64(seq);
    e.u32(payload.len() as u32);
    e.u32(0); // crc placeholder
    e.u64(0); // reserved
    e.0.extend_from_slice(payload);
    e.0.resize(txn_len(payload.len()) as usize, 0);
    let crc = crc32c::crc32c(&e.0);
    e.0[20..24].copy_from_slice(&crc.to_le_bytes());
    e.0
}

/// A transaction header as read from the journal (not yet checksum-verified).
#[derive(Debug, Clone, Copy)]
pub struct TxnHeader {
    pub flags: u32,
    pub seq: u64,
    pub payload_len: usize,
    pub crc: u32,
}

/// Parses the first [`TXN_HEADER`] bytes; `None` if it is not a transaction.
pub fn parse_txn_header(buf: &[u8]) -> Option<TxnHeader> {
    let mut d = Dec::new(buf.get(..TXN_HEADER)?, "txn");
    if d.u32().ok()? != TXN_MAGIC {
        return None;
    }
    let flags = d.u32().ok()?;
    let seq = d.u64().ok()?;
    let payload_len = d.u32().ok()? as usize;
    let crc = d.u32().ok()?;
    Some(TxnHeader {
        flags,
        seq,
        payload_len,
        crc,
    })
}

/// Verifies a whole transaction (`buf` = exactly `txn_len(payload_len)` bytes).
pub fn verify_txn(h: &TxnHeader, buf: &[u8]) -> bool {
    let mut copy = buf.to_vec();
    copy[20..24].fill(0);
    crc32c::crc32c(&copy) == h.crc
}

/// Header of one block of a checkpoint chain.
#[derive(Debug, Clone, Copy)]
pub struct CkptBlockHeader {
    pub index: u32,
    pub next: u64,
    pub len: u32,
    pub crc: u32,
}

/// Encodes one checkpoint block: header then `data`, padded to `chunk`.
pub fn encode_ckpt_block(index: u32, next: u64, data: &[u8], chunk: usize) -> Vec<u8> {
    let mut e = Enc::default();
    e.u32(CKPT_BLOCK_MAGIC);
    e.u32(index);
    e.u64(next);
    e.u32(data.len() as u32);
    e.u32(crc32c::crc32c(data));
    e.u64(0);
    e.0.extend_from_slice(data);
    e.0.resize(chunk, 0);
    e.0
}

/// Decodes a checkpoint block, returning its header and payload.
pub fn decode_ckpt_block(buf: &[u8]) -> Result<(CkptBlockHeader, &[u8]), FormatError> {
    let mut d = Dec::new(buf, "checkpoint block");
    if d.u32()? != CKPT_BLOCK_MAGIC {
        return Err(FormatError::Malformed("checkpoint block"));
    }
    let index = d.u32()?;
    let next = d.u64()?;
    let len = d.u32()?;
    let crc = d.u32()?;
    let data = buf
        .get(CKPT_BLOCK_HEADER..CKPT_BLOCK_HEADER + len as usize)
        .ok_or(FormatError::Malformed("checkpoint block"))?;
    if crc32c::crc32c(data) != crc {
        return Err(FormatError::Checksum("checkpoint block"));
    }
    Ok((
        CkptBlockHeader {
            index,
            next,
            len,
            crc,
        },
        data,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            version: FORMAT_VERSION,
            generation: 3,
            incompat: 0,
            compat: 0,
            chunk_size: 65536,
            origin_size: 1 << 30,
            origin_tag: "/img".into(),
            journal_size: 1 << 20,
            data_offset: 1 << 21,
            max_size: 1 << 32,
            ckpt_block: NO_BLOCK,
            ckpt_len: 0,
            ckpt_crc: 0,
            ckpt_seq: 0,
            journal_start: 0,
        }
    }

    #[test]
    fn header_round_trip_and_corruption() {
        let h = header();
        let buf = h.encode();
        assert_eq!(Header::decode(&buf).unwrap(), h);
        let mut bad = buf.clone();
        bad[40] ^= 1;
        assert!(Header::decode(&bad).is_err());
        let mut inc = h.clone();
        inc.incompat = INCOMPAT_ORIGIN_COPIES;
        assert_eq!(
            Header::decode(&inc.encode()).unwrap(),
            inc,
            "a known feature"
        );
        inc.incompat = 8;
        assert_eq!(
            Header::decode(&inc.encode()),
            Err(FormatError::IncompatFeatures(8))
        );
    }

    /// Found by tests/fuzz_format.rs: a checksummed header whose journal size or data offset
    /// lies near 2^64 overflowed the geometry check (a panic in debug builds; in release the
    /// sum wrapped and the header was accepted with a journal of nearly 2^64 bytes).
    #[test]
    fn a_header_whose_geometry_overflows_is_refused() {
        let mut h = header();
        h.journal_size = u64::MAX << 9;
        assert_eq!(
            Header::decode(&h.encode()),
            Err(FormatError::Malformed("header geometry"))
        );
        let mut h = header();
        h.data_offset = u64::MAX - 65535;
        h.max_size = u64::MAX;
        assert_eq!(
            Header::decode(&h.encode()),
            Err(FormatError::Malformed("header geometry"))
        );
    }

    #[test]
    fn records_and_txn_round_trip() {
        let recs = vec![
            Record::CreateDevice {
                id: 1,
                parent: 0,
                writable: true,
                name: "a".into(),
            },
            Record::ShareDown {
                dev: 0,
                chunk: 5,
                entry: entry_block(7),
            },
            Record::SetAttr {
                dev: 1,
                key: "serial".into(),
                value: Some("x".into()),
            },
            Record::SetAttr {
                dev: 1,
                key: "k".into(),
                value: None,
            },
            Record::Preserve {
                chunk: 9,
                time: 1 << 40,
                entry: entry_block(3),
            },
            Record::OriginLocal {
                chunk: 4,
                entry: entry_block(8),
            },
            Record::OriginLocal {
                chunk: 5,
                entry: ENTRY_ZERO,
            },
            Record::Resize {
                dev: 1,
                size: 3 << 30,
            },
            Record::DeleteDevice { id: 1 },
        ];
        let mut e = Enc::default();
        for r in &recs {
            r.encode(&mut e);
        }
        let t = encode_txn(9, 0, &e.0);
        let h = parse_txn_header(&t).unwrap();
        assert!(verify_txn(&h, &t));
        let payload = &t[TXN_HEADER..TXN_HEADER + h.payload_len];
        assert_eq!(Record::decode_all(payload).unwrap(), recs);
    }
}
