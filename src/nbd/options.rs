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
