//! The data of NBD options and of their replies: the export a client names, the information
//! it asks for, the metadata contexts it lists or selects, and what the server answers
//! (`NBD_REP_SERVER`, `NBD_REP_INFO`, `NBD_REP_META_CONTEXT`, error messages). Pure, like
//! [`super::proto`], and symmetric (each side encodes what the other decodes).

use super::proto::{
    put_string32, Cursor, ProtoError, Result, INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT,
    INFO_NAME,
};

/// Most information requests one `NBD_OPT_INFO`/`NBD_OPT_GO` may carry (there are four types;
/// a client must not repeat one, so more is malformed).
pub const MAX_INFO_REQUESTS: usize = 64;
/// Most queries one metadata-context option may carry.
pub const MAX_QUERIES: usize = 256;

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: the export and the information wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_string32(out, &self.name);
        out.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            out.extend_from_slice(&r.to_be_bytes());
        }
    }

    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut c = Cursor::new(buf);
        let name = c.string32()?;
        let n = usize::from(c.u16()?);
        if n > MAX_INFO_REQUESTS {
            return Err(ProtoError::Length {
                what: "information request list",
                len: n,
            });
        }
        let requests = (0..n).map(|_| c.u16()).collect::<Result<Vec<_>>>()?;
        c.finish()?;
        Ok(InfoRequest { name, requests })
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_string32(out, &self.export);
        out.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            put_string32(out, q);
        }
    }

    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut c = Cursor::new(buf);
        let export = c.string32()?;
        let n = c.u32()?;
        // Each query takes at least its 4-byte length: a count the data cannot hold is a lie.
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n > MAX_QUERIES || n > c.remaining() / 4 {
            return Err(ProtoError::Length {
                what: "query list",
                len: n,
            });
        }
        let queries = (0..n).map(|_| c.string32()).collect::<Result<Vec<_>>>()?;
        c.finish()?;
        Ok(MetaContextRequest { export, queries })
    }
}

/// The data of an `NBD_REP_SERVER` reply to `NBD_OPT_LIST`: an export's name and, after it,
/// a description for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    pub name: String,
    pub description: String,
}

impl ServerEntry {
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_string32(out, &self.name);
        out.extend_from_slice(self.description.as_bytes());
    }

    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut c = Cursor::new(buf);
        let name = c.string32()?;
        let n = c.remaining();
        let description = c.string(n)?;
        Ok(ServerEntry { name, description })
    }
}

/// The data of an `NBD_REP_INFO` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// Size and transmission flags (mandatory before a successful end).
    Export { size: u64, flags: u16 },
    /// The export's canonical name.
    Name(String),
    /// A description for humans.
    Description(String),
    /// Block size constraints: minimum, preferred, maximum.
    BlockSize { min: u32, preferred: u32, max: u32 },
    /// A type this side does not know (ignored, as the protocol requires).
    Unknown(u16),
}

impl Info {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Info::Export { size, flags } => {
                out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
            }
            Info::Name(s) | Info::Description(s) => {
                let t = if matches!(self, Info::Name(_)) {
                    INFO_NAME
                } else {
                    INFO_DESCRIPTION
                };
                out.extend_from_slice(&t.to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Info::BlockSize {
                min,
                preferred,
                max,
            } => {
                out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                for v in [min, preferred, max] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            Info::Unknown(t) => out.extend_from_slice(&t.to_be_bytes()),
        }
    }

    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut c = Cursor::new(buf);
        let info = match c.u16()? {
            INFO_EXPORT => Info::Export {
                size: c.u64()?,
                flags: c.u16()?,
            },
            INFO_NAME => Info::Name(c.string(c.remaining())?),
            INFO_DESCRIPTION => Info::Description(c.string(c.remaining())?),
            INFO_BLOCK_SIZE => Info::BlockSize {
                min: c.u32()?,
                preferred: c.u32()?,
                max: c.u32()?,
            },
            t => {
                c.take(c.remaining())?;
                Info::Unknown(t)
            }
        };
        c.finish()?;
        Ok(info)
    }
}

/// The data of an `NBD_REP_META_CONTEXT` reply: a context's id and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    pub id: u32,
    pub name: String,
}

impl MetaContext {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
    }

    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut c = Cursor::new(buf);
        let id = c.u32()?;
        let name = c.string(c.remaining())?;
        Ok(MetaContext { id, name })
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
    fn option_data_round_trips() {
        let i = InfoRequest {
            name: "vm1".into(),
            requests: vec![INFO_NAME, INFO_BLOCK_SIZE],
        };
        let b = bytes(|o| i.encode(o));
        assert_eq!(b, [0, 0, 0, 3, b'v', b'm', b'1', 0, 2, 0, 1, 0, 3]);
        assert_eq!(InfoRequest::decode(&b), Ok(i));

        let m = MetaContextRequest {
            export: "".into(),
            queries: vec!["base:allocation".into(), "qemu:".into()],
        };
        assert_eq!(MetaContextRequest::decode(&bytes(|o| m.encode(o))), Ok(m));

        let e = ServerEntry {
            name: "origin".into(),
            description: "snapblk device".into(),
        };
        assert_eq!(ServerEntry::decode(&bytes(|o| e.encode(o))), Ok(e));

        for info in [
            Info::Export {
                size: 1 << 30,
                flags: 0x4d,
            },
            Info::Name("s".into()),
            Info::Description("d".into()),
            Info::BlockSize {
                min: 512,
                preferred: 65536,
                max: 32 << 20,
            },
            Info::Unknown(99),
        ] {
            assert_eq!(Info::decode(&bytes(|o| info.encode(o))), Ok(info));
        }
        let c = MetaContext {
            id: 3,
            name: "qemu:dirty-bitmap:s1".into(),
        };
        assert_eq!(MetaContext::decode(&bytes(|o| c.encode(o))), Ok(c));
    }

    #[test]
    fn lying_lengths_are_errors() {
        // A name length past the data, a query count the data cannot hold, trailing bytes.
        assert!(InfoRequest::decode(&[0, 0, 0, 9, b'a', 0, 0]).is_err());
        assert!(InfoRequest::decode(&[0, 0, 0, 0, 0, 1, 0, 3, 0]).is_err());
        assert!(MetaContextRequest::decode(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(MetaContextRequest::decode(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, b'x']).is_err());
        assert!(Info::decode(&[0, 0, 1]).is_err(), "a short export info");
        assert!(Info::decode(&[0, 3, 0, 0, 2, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0]).is_err());
        let too_many = [&[0u8, 0, 0, 0, 0xff, 0xff][..], &[0u8; 8]].concat();
        assert!(InfoRequest::decode(&too_many).is_err());
    }

    proptest! {
        #[test]
        fn option_decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = InfoRequest::decode(&b);
            let _ = MetaContextRequest::decode(&b);
            let _ = ServerEntry::decode(&b);
            let _ = Info::decode(&b);
            let _ = MetaContext::decode(&b);
        }

        #[test]
        fn meta_requests_round_trip(export in "[a-z0-9 ]{0,20}", queries in proptest::collection::vec("[a-z:-]{1,30}", 0..8)) {
            let m = MetaContextRequest { export, queries };
            prop_assert_eq!(MetaContextRequest::decode(&bytes(|o| m.encode(o))), Ok(m));
        }
    }
}
