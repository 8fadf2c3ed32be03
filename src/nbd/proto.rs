//! The NBD wire protocol: constants and the fixed-layout messages of the handshake and the
//! transmission phase, encoded into and decoded from byte slices. Pure and transport-free
//! (no sockets, no I/O), and symmetric: every message decodes what it encodes, so a client
//! can be written on the same codec. Option payloads are in [`super::options`], structured
//! reply payloads in [`super::chunks`].
//!
//! All integers are big-endian (network order). Decoding never panics: short, long or
//! malformed input is a [`ProtoError`].

use thiserror::Error;

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle greeting's second magic, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server): fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flags (server): the 124 zero bytes after `NBD_OPT_EXPORT_NAME` may be left out.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types; errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flags: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// Structured reply chunk types; error chunks have bit 15 set.
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:` status flag.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Error values of replies.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Longest string (export name, context name, message) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// Why bytes are not a valid message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    #[error("message truncated: {need} bytes needed, {got} present")]
    Short { need: usize, got: usize },
    #[error("{0} unexpected bytes after the message")]
    Trailing(usize),
    #[error("wrong magic {found:#x} (expected {expected:#x})")]
    Magic { expected: u64, found: u64 },
    #[error("string of {0} bytes (at most {MAX_STRING} allowed)")]
    StringTooLong(usize),
    #[error("string is not UTF-8 or holds a NUL")]
    BadString,
    #[error("{what} has an invalid length {len}")]
    Length { what: &'static str, len: usize },
}

/// Result of decoding.
pub type Result<T, E = ProtoError> = std::result::Result<T, E>;

/// A reading position in a byte slice: the one place bytes become integers and strings.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, at: 0 }
    }

    /// A cursor over a message of exactly `len` bytes.
    pub fn exact(buf: &'a [u8], len: usize) -> Result<Self> {
        match buf.len() {
            n if n < len => Err(ProtoError::Short { need: len, got: n }),
            n if n > len => Err(ProtoError::Trailing(n - len)),
            _ => Ok(Cursor::new(buf)),
        }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(ProtoError::Short {
                need: self.at.saturating_add(n),
                got: self.buf.len(),
            });
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A protocol string of `n` bytes: at most [`MAX_STRING`], UTF-8, no NUL.
    pub fn string(&mut self, n: usize) -> Result<String> {
        if n > MAX_STRING {
            return Err(ProtoError::StringTooLong(n));
        }
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| ProtoError::BadString)?;
        if s.contains('\0') {
            return Err(ProtoError::BadString);
        }
        Ok(s.to_string())
    }

    /// A string prefixed by its 32-bit length.
    pub fn string32(&mut self) -> Result<String> {
        let n = self.u32()?;
        self.string(usize::try_from(n).map_err(|_| ProtoError::StringTooLong(usize::MAX))?)
    }

    /// Checks that everything was read.
    pub fn finish(&self) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(ProtoError::Trailing(n)),
        }
    }

    fn magic64(&mut self, expected: u64) -> Result<()> {
        match self.u64()? {
            m if m == expected => Ok(()),
            found => Err(ProtoError::Magic { expected, found }),
        }
    }

    fn magic32(&mut self, expected: u32) -> Result<()> {
        match self.u32()? {
            m if m == expected => Ok(()),
            found => Err(ProtoError::Magic {
                expected: expected.into(),
                found: found.into(),
            }),
        }
    }
}

/// `s` as sent: cut to [`MAX_STRING`] bytes at a character boundary.
pub fn truncated(s: &str) -> &[u8] {
    let mut end = s.len().min(MAX_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s.as_bytes()[..end]
}

/// Appends a protocol string prefixed by its 32-bit length.
pub fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    pub flags: u16,
}

impl Greeting {
    pub const LEN: usize = 18;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
    }

    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut c = Cursor::exact(buf, Self::LEN)?;
        c.magic64(NBDMAGIC)?;
        c.magic64(IHAVEOPT)?;
        let flags = c.u16()?;
        c.finish()?;
        Ok(Greeting { flags })
    }
}

/// The header of an option request: `IHAVEOPT`, the option, the length of its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.option.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
    }

    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut c = Cursor::exact(buf, Self::LEN)?;
        c.magic64(IHAVEOPT)?;
        let (option, len) = (c.u32()?, c.u32()?);
        c.finish()?;
        Ok(OptionHeader { option, len })
    }
}

/// The header of an option reply: magic, the option answered, the reply type, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

impl OptionReply {
    pub const LEN: usize = 20;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.option.to_be_bytes());
        out.extend_from_slice(&self.reply.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
    }

    /// Appends a whole reply: this header for `data`, then `data`.
    pub fn encode_with(option: u32, reply: u32, data: &[u8], out: &mut Vec<u8>) {
        let len = data.len() as u32;
        OptionReply { option, reply, len }.encode(out);
        out.extend_from_slice(data);
    }

    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut c = Cursor::exact(buf, Self::LEN)?;
        c.magic64(OPTION_REPLY_MAGIC)?;
        let (option, reply, len) = (c.u32()?, c.u32()?, c.u32()?);
        c.finish()?;
        Ok(OptionReply { option, reply, len })
    }

    /// Whether the reply type is an error.
    pub fn is_error(&self) -> bool {
        self.reply & (1 << 31) != 0
    }
}

/// The server's answer to `NBD_OPT_EXPORT_NAME`: export size and transmission flags,
/// followed by 124 zero bytes unless both sides agreed to leave them out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    pub size: u64,
    pub flags: u16,
}

impl ExportNameReply {
    /// Length without the zeroes.
    pub const LEN: usize = 10;
    pub const ZEROES: usize = 124;

    pub fn encode(&self, zeroes: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        if zeroes {
            out.extend_from_slice(&[0u8; Self::ZEROES]);
        }
    }

    /// Decodes the first [`Self::LEN`] bytes (the zeroes, if any, follow).
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut c = Cursor::exact(buf, Self::LEN)?;
        let (size, flags) = (c.u64()?, c.u16()?);
        c.finish()?;
        Ok(ExportNameReply { size, flags })
    }
}

/// A transmission request; an `NBD_CMD_WRITE` is followed by `len` bytes of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub cmd: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub const LEN: usize = 28;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.cmd.to_be_bytes());
        out.extend_from_slice(&self.handle.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
    }

    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut c = Cursor::exact(buf, Self::LEN)?;
        c.magic32(REQUEST_MAGIC)?;
        let r = Request {
            flags: c.u16()?,
            cmd: c.u16()?,
            handle: c.u64()?,
            offset: c.u64()?,
            len: c.u32()?,
        };
        c.finish()?;
        Ok(r)
    }
}

/// A simple reply; a successful `NBD_CMD_READ` is followed by the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub handle: u64,
}

impl SimpleReply {
    pub const LEN: usize = 16;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.error.to_be_bytes());
        out.extend_from_slice(&self.handle.to_be_bytes());
    }

    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut c = Cursor::exact(buf, Self::LEN)?;
        c.magic32(SIMPLE_REPLY_MAGIC)?;
        let (error, handle) = (c.u32()?, c.u64()?);
        c.finish()?;
        Ok(SimpleReply { error, handle })
    }
}

/// The header of a structured reply chunk; `len` bytes of payload follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub len: u32,
}

impl ChunkHeader {
    pub const LEN: usize = 20;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.kind.to_be_bytes());
        out.extend_from_slice(&self.handle.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
    }

    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut c = Cursor::exact(buf, Self::LEN)?;
        c.magic32(STRUCTURED_REPLY_MAGIC)?;
        let h = ChunkHeader {
            flags: c.u16()?,
            kind: c.u16()?,
            handle: c.u64()?,
            len: c.u32()?,
        };
        c.finish()?;
        Ok(h)
    }

    /// Whether this is the reply's last chunk.
    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut v = Vec::new();
        f(&mut v);
        v
    }

    #[test]
    fn messages_round_trip_with_the_documented_layout() {
        let g = Greeting { flags: 3 };
        let b = bytes(|o| g.encode(o));
        assert_eq!(&b[..8], b"NBDMAGIC");
        assert_eq!(&b[8..16], b"IHAVEOPT");
        assert_eq!(Greeting::decode(&b), Ok(g));

        let h = OptionHeader {
            option: OPT_GO,
            len: 9,
        };
        let b = bytes(|o| h.encode(o));
        assert_eq!(b.len(), OptionHeader::LEN);
        assert_eq!(OptionHeader::decode(&b), Ok(h));

        let b = bytes(|o| OptionReply::encode_with(OPT_LIST, REP_ERR_UNSUP, b"no", o));
        let r = OptionReply::decode(&b[..OptionReply::LEN]).unwrap();
        assert_eq!(
            (r.option, r.reply, r.len, r.is_error()),
            (OPT_LIST, REP_ERR_UNSUP, 2, true)
        );
        assert_eq!(&b[OptionReply::LEN..], b"no");

        let e = ExportNameReply {
            size: 1 << 40,
            flags: FLAG_HAS_FLAGS,
        };
        let b = bytes(|o| e.encode(true, o));
        assert_eq!(b.len(), ExportNameReply::LEN + ExportNameReply::ZEROES);
        assert_eq!(ExportNameReply::decode(&b[..ExportNameReply::LEN]), Ok(e));

        let req = Request {
            flags: CMD_FLAG_FUA,
            cmd: CMD_WRITE,
            handle: 7,
            offset: 4096,
            len: 512,
        };
        let b = bytes(|o| req.encode(o));
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::decode(&b), Ok(req));

        let s = SimpleReply {
            error: EIO,
            handle: u64::MAX,
        };
        assert_eq!(SimpleReply::decode(&bytes(|o| s.encode(o))), Ok(s));

        let c = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_NONE,
            handle: 1,
            len: 0,
        };
        let d = ChunkHeader::decode(&bytes(|o| c.encode(o))).unwrap();
        assert!(d.is_done() && d == c);
    }

    #[test]
    fn malformed_messages_are_errors() {
        let req = Request {
            flags: 0,
            cmd: CMD_READ,
            handle: 1,
            offset: 0,
            len: 512,
        };
        let mut b = bytes(|o| req.encode(o));
        b[0] ^= 1;
        assert!(matches!(Request::decode(&b), Err(ProtoError::Magic { .. })));
        assert_eq!(
            Request::decode(&b[..27]),
            Err(ProtoError::Short { need: 28, got: 27 })
        );
        let good = bytes(|o| req.encode(o));
        assert_eq!(
            Request::decode(&good[..20]),
            Err(ProtoError::Short { need: 28, got: 20 })
        );
        let mut long = good.clone();
        long.push(0);
        assert_eq!(Request::decode(&long), Err(ProtoError::Trailing(1)));
        assert!(OptionHeader::decode(b"IHAVEOPX\0\0\0\x01\0\0\0\0").is_err());
        let mut c = Cursor::new(b"a\0b");
        assert_eq!(c.string(3), Err(ProtoError::BadString));
        let mut c = Cursor::new(&[0xff, 0xfe]);
        assert_eq!(c.string(2), Err(ProtoError::BadString));
        let mut c = Cursor::new(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(c.string32(), Err(ProtoError::StringTooLong(_))));
    }

    #[test]
    fn strings_are_cut_at_the_limit_on_a_character_boundary() {
        let s = "é".repeat(3000);
        let t = truncated(&s);
        assert!(t.len() <= MAX_STRING && std::str::from_utf8(t).is_ok());
    }

    proptest! {
        /// Whatever bytes arrive, the decoders answer; they never panic.
        #[test]
        fn decoders_never_panic_on_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Greeting::decode(&b);
            let _ = OptionHeader::decode(&b);
            let _ = OptionReply::decode(&b);
            let _ = ExportNameReply::decode(&b);
            let _ = Request::decode(&b);
            let _ = SimpleReply::decode(&b);
            let _ = ChunkHeader::decode(&b);
            let mut c = Cursor::new(&b);
            let _ = c.string32();
        }

        #[test]
        fn requests_round_trip(flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) {
            let r = Request { flags, cmd, handle, offset, len };
            prop_assert_eq!(Request::decode(&bytes(|o| r.encode(o))), Ok(r));
        }
    }
}
