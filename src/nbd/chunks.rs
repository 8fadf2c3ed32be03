//! The payloads of structured reply chunks: data and holes of a read, block-status
//! descriptors, errors. Pure, like [`super::proto`] (whose chunk header they follow), and
//! symmetric.

use super::proto::{
    truncated, ChunkHeader, Cursor, ProtoError, Result, REPLY_FLAG_DONE, REPLY_TYPE_ERROR,
    REPLY_TYPE_ERROR_OFFSET, REPLY_TYPE_OFFSET_DATA,
};

/// The start of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk: its header and the data's offset.
/// `data_len` bytes of data follow.
pub fn encode_data_start(handle: u64, offset: u64, data_len: u32, done: bool, out: &mut Vec<u8>) {
    ChunkHeader {
        flags: if done { REPLY_FLAG_DONE } else { 0 },
        kind: REPLY_TYPE_OFFSET_DATA,
        handle,
        len: data_len.saturating_add(8),
    }
    .encode(out);
    out.extend_from_slice(&offset.to_be_bytes());
}

/// The payload of an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hole {
    pub offset: u64,
    pub len: u32,
}

impl Hole {
    pub const LEN: usize = 12;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
    }

    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut c = Cursor::exact(buf, Self::LEN)?;
        let (offset, len) = (c.u64()?, c.u32()?);
        c.finish()?;
        if len == 0 {
            return Err(ProtoError::Length {
                what: "hole",
                len: 0,
            });
        }
        Ok(Hole { offset, len })
    }
}

/// One block-status descriptor: `len` bytes with status `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub len: u32,
    pub flags: u32,
}

/// The payload of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: a context and its descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatus {
    pub context: u32,
    pub descriptors: Vec<Descriptor>,
}

impl BlockStatus {
    pub fn encoded_len(&self) -> usize {
        4 + 8 * self.descriptors.len()
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.context.to_be_bytes());
        for d in &self.descriptors {
            out.extend_from_slice(&d.len.to_be_bytes());
            out.extend_from_slice(&d.flags.to_be_bytes());
        }
    }

    pub fn decode(buf: &[u8]) -> Result<Self> {
        if buf.len() < 12 || !(buf.len() - 4).is_multiple_of(8) {
            let len = buf.len();
            return Err(ProtoError::Length {
                what: "block status",
                len,
            });
        }
        let mut c = Cursor::new(buf);
        let context = c.u32()?;
        let mut descriptors = Vec::with_capacity(c.remaining() / 8);
        while c.remaining() > 0 {
            let d = Descriptor {
                len: c.u32()?,
                flags: c.u32()?,
            };
            if d.len == 0 {
                return Err(ProtoError::Length {
                    what: "block status descriptor",
                    len: 0,
                });
            }
            descriptors.push(d);
        }
        Ok(BlockStatus {
            context,
            descriptors,
        })
    }
}

/// The payload of an error chunk: `NBD_REPLY_TYPE_ERROR`, or `_ERROR_OFFSET` with `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    pub error: u32,
    pub message: String,
    pub offset: Option<u64>,
}

impl ErrorChunk {
    /// Its chunk type.
    pub fn kind(&self) -> u16 {
        match self.offset {
            Some(_) => REPLY_TYPE_ERROR_OFFSET,
            None => REPLY_TYPE_ERROR,
        }
    }

    fn message_bytes(&self) -> &[u8] {
        truncated(&self.message)
    }

    pub fn encoded_len(&self) -> usize {
        6 + self.message_bytes().len() + if self.offset.is_some() { 8 } else { 0 }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let msg = self.message_bytes();
        out.extend_from_slice(&self.error.to_be_bytes());
        out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        out.extend_from_slice(msg);
        if let Some(offset) = self.offset {
            out.extend_from_slice(&offset.to_be_bytes());
        }
    }

    /// Decodes the payload of a chunk of type `kind`.
    pub fn decode(kind: u16, buf: &[u8]) -> Result<Self> {
        let mut c = Cursor::new(buf);
        let error = c.u32()?;
        let n = usize::from(c.u16()?);
        let message = c.string(n)?;
        let offset = match kind {
            REPLY_TYPE_ERROR_OFFSET => Some(c.u64()?),
            _ => None,
        };
        c.finish()?;
        Ok(ErrorChunk {
            error,
            message,
            offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::{EIO, REPLY_TYPE_BLOCK_STATUS};
    use proptest::prelude::*;

    fn bytes(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut v = Vec::new();
        f(&mut v);
        v
    }

    #[test]
    fn payloads_round_trip() {
        let b = bytes(|o| encode_data_start(9, 4096, 512, true, o));
        let h = ChunkHeader::decode(&b[..ChunkHeader::LEN]).unwrap();
        assert_eq!(
            (h.kind, h.len, h.is_done()),
            (REPLY_TYPE_OFFSET_DATA, 520, true)
        );
        assert_eq!(&b[ChunkHeader::LEN..], &4096u64.to_be_bytes());

        let hole = Hole {
            offset: 1 << 20,
            len: 65536,
        };
        assert_eq!(Hole::decode(&bytes(|o| hole.encode(o))), Ok(hole));
        assert!(Hole::decode(&[0; 12]).is_err(), "an empty hole");

        let s = BlockStatus {
            context: 2,
            descriptors: vec![
                Descriptor { len: 512, flags: 3 },
                Descriptor {
                    len: 1024,
                    flags: 0,
                },
            ],
        };
        let b = bytes(|o| s.encode(o));
        assert_eq!(b.len(), s.encoded_len());
        assert_eq!(BlockStatus::decode(&b), Ok(s));
        assert!(BlockStatus::decode(&b[..10]).is_err());
        assert!(
            BlockStatus::decode(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]).is_err(),
            "zero length"
        );

        for offset in [None, Some(77)] {
            let e = ErrorChunk {
                error: EIO,
                message: "bad block".into(),
                offset,
            };
            let b = bytes(|o| e.encode(o));
            assert_eq!(b.len(), e.encoded_len());
            assert_eq!(ErrorChunk::decode(e.kind(), &b), Ok(e));
        }
        assert!(ErrorChunk::decode(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 9, b'x']).is_err());
    }

    proptest! {
        #[test]
        fn chunk_decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Hole::decode(&b);
            let _ = BlockStatus::decode(&b);
            let _ = ErrorChunk::decode(REPLY_TYPE_ERROR_OFFSET, &b);
            let _ = ErrorChunk::decode(REPLY_TYPE_BLOCK_STATUS, &b);
        }
    }
}
