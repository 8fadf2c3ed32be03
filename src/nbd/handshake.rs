//! The handshake of one connection (fixed newstyle): the greeting, the client's flags, then
//! options until the client picks an export (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`) or leaves.
//!
//! Supported: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT`, `SET_META_CONTEXT`; any other option gets `NBD_REP_ERR_UNSUP`
//! (`STARTTLS`: `NBD_REP_ERR_POLICY`, TLS is not offered). Limits against hostile clients:
//! option data at most [`MAX_OPTION_LEN`] bytes (else `NBD_REP_ERR_TOO_BIG` and the end),
//! at most [`MAX_OPTIONS`] options, the whole handshake within [`HANDSHAKE_TIME`].

use super::contexts::{self, Context};
use super::error::NbdError;
use super::export::{transmission_flags, Selected};
use super::options::{Info, InfoRequest, MetaContext, MetaContextRequest, ServerEntry};
use super::proto::{
    truncated, Cursor, ExportNameReply, Greeting, OptionHeader, OptionReply, FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, INFO_DESCRIPTION, INFO_NAME, OPT_ABORT,
    OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT,
    OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, REP_SERVER,
};
use super::registry::{Export, Mode, Registry};
use super::socket::{read_by, Stream};
use super::transmission::Session;
use crate::daemon::ORIGIN_NAME;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest option data accepted (export names and queries are strings of at most 4 KiB).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Most options one handshake may send.
pub const MAX_OPTIONS: usize = 256;
/// Most metadata contexts one connection may select.
pub const MAX_CONTEXTS: usize = 64;
/// Time allowed for the whole handshake.
pub const HANDSHAKE_TIME: Duration = Duration::from_secs(60);

/// The state of the negotiation so far.
struct Handshake<'a> {
    stream: &'a mut Stream,
    registry: &'a Arc<Registry>,
    deadline: Instant,
    no_zeroes: bool,
    structured: bool,
    /// The contexts of the last `NBD_OPT_SET_META_CONTEXT`, and the export it named.
    meta: Option<(String, Vec<Selected>)>,
    out: Vec<u8>,
}

/// Negotiates with a new client. `Ok(None)` when it leaves without picking an export.
pub fn negotiate(
    stream: &mut Stream,
    registry: &Arc<Registry>,
) -> Result<Option<Session>, NbdError> {
    let deadline = Instant::now() + HANDSHAKE_TIME;
    let mut greeting = Vec::with_capacity(Greeting::LEN);
    Greeting {
        flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    }
    .encode(&mut greeting);
    stream.write_all(&greeting)?;
    let mut flags = [0u8; 4];
    read_by(stream, &mut flags, deadline)?;
    let flags = u32::from_be_bytes(flags);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::ClientFlags(flags));
    }
    let mut h = Handshake {
        stream,
        registry,
        deadline,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta: None,
        out: Vec::new(),
    };
    for _ in 0..MAX_OPTIONS {
        let mut header = [0u8; OptionHeader::LEN];
        read_by(h.stream, &mut header, h.deadline)?;
        let header = OptionHeader::decode(&header)?;
        if header.len > MAX_OPTION_LEN {
            if header.option != OPT_EXPORT_NAME {
                let msg = format!("option data is limited to {MAX_OPTION_LEN} bytes");
                h.reply_error(header.option, REP_ERR_TOO_BIG, &msg)?;
            }
            return Err(NbdError::OptionTooBig {
                option: header.option,
                len: header.len,
                max: MAX_OPTION_LEN,
            });
        }
        let mut data = vec![0u8; header.len as usize];
        read_by(h.stream, &mut data, h.deadline)?;
        if let Some(outcome) = h.option(header.option, &data)? {
            return Ok(outcome);
        }
    }
    Err(NbdError::TooManyOptions(MAX_OPTIONS))
}

/// A description of an export for humans.
fn describe(mode: Mode) -> &'static str {
    match mode {
        Mode::Writable => "snapblk device, writable",
        _ => "snapblk device, read-only",
    }
}

impl Handshake<'_> {
    /// Handles one option; `Some` once the handshake is over (`Some(None)`: the client left).
    fn option(&mut self, option: u32, data: &[u8]) -> Result<Option<Option<Session>>, NbdError> {
        match option {
            OPT_EXPORT_NAME => return self.export_name(data).map(|s| Some(Some(s))),
            OPT_ABORT => {
                self.reply(option, REP_ACK, &[])?;
                return Ok(Some(None));
            }
            OPT_LIST => self.list(data)?,
            OPT_INFO | OPT_GO => {
                if let Some(session) = self.info_or_go(option, data)? {
                    return Ok(Some(Some(session)));
                }
            }
            OPT_STRUCTURED_REPLY if data.is_empty() => {
                self.structured = true;
                self.reply(option, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY => {
                self.reply_error(option, REP_ERR_INVALID, "no data expected")?
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data)?,
            OPT_STARTTLS => self.reply_error(option, REP_ERR_POLICY, "TLS is not offered")?,
            _ => self.reply_error(option, REP_ERR_UNSUP, "option not supported")?,
        }
        Ok(None)
    }

    fn reply(&mut self, option: u32, reply: u32, data: &[u8]) -> Result<(), NbdError> {
        self.out.clear();
        OptionReply::encode_with(option, reply, data, &mut self.out);
        self.stream.write_all(&self.out)?;
        Ok(())
    }

    fn reply_error(&mut self, option: u32, reply: u32, message: &str) -> Result<(), NbdError> {
        self.reply(option, reply, truncated(message))
    }

    /// The export a name means: the origin for the empty (default) name.
    fn export(&self, name: &str) -> Option<Arc<Export>> {
        let name = if name.is_empty() { ORIGIN_NAME } else { name };
        self.registry.lookup(name)
    }

    /// Attaches the connection to `name` and makes the session.
    fn attach(&mut self, name: &str) -> Option<Session> {
        let name = if name.is_empty() { ORIGIN_NAME } else { name };
        let (export, attached) = self.registry.attach(name, self.stream)?;
        let contexts = match self.meta.take() {
            Some((n, selected)) if n == name || (n.is_empty() && name == ORIGIN_NAME) => selected,
            _ => Vec::new(),
        };
        Some(Session {
            writable: export.writable(),
            export,
            attached,
            structured: self.structured,
            contexts,
        })
    }

    fn export_name(&mut self, data: &[u8]) -> Result<Session, NbdError> {
        let mut c = Cursor::new(data);
        let name = c.string(data.len())?;
        let Some(session) = self.attach(&name) else {
            return Err(NbdError::NoExport(name));
        };
        let flags = transmission_flags(session.writable, session.structured);
        self.out.clear();
        let size = session.export.size();
        ExportNameReply { size, flags }.encode(!self.no_zeroes, &mut self.out);
        self.stream.write_all(&self.out)?;
        Ok(session)
    }

    fn list(&mut self, data: &[u8]) -> Result<(), NbdError> {
        if !data.is_empty() {
            return self.reply_error(OPT_LIST, REP_ERR_INVALID, "no data expected");
        }
        for (name, mode) in self.registry.exported() {
            let mut entry = Vec::new();
            let description = describe(mode).to_string();
            ServerEntry { name, description }.encode(&mut entry);
            self.reply(OPT_LIST, REP_SERVER, &entry)?;
        }
        self.reply(OPT_LIST, REP_ACK, &[])
    }

    fn info(&mut self, option: u32, info: Info) -> Result<(), NbdError> {
        let mut data = Vec::new();
        info.encode(&mut data);
        self.reply(option, REP_INFO, &data)
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`: `Some` when `GO` succeeded.
    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Option<Session>, NbdError> {
        let req = match InfoRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                self.reply_error(option, REP_ERR_INVALID, &e.to_string())?;
                return Ok(None);
            }
        };
        let Some(export) = self.export(&req.name) else {
            let msg = format!("no export named {:?}", req.name);
            self.reply_error(option, REP_ERR_UNKNOWN, &msg)?;
            return Ok(None);
        };
        let flags = transmission_flags(export.writable(), self.structured);
        let size = export.size();
        self.info(option, Info::Export { size, flags })?;
        if req.requests.contains(&INFO_NAME) {
            self.info(option, Info::Name(export.name.clone()))?;
        }
        if req.requests.contains(&INFO_DESCRIPTION) {
            let mode = if export.writable() {
                Mode::Writable
            } else {
                Mode::ReadOnly
            };
            self.info(option, Info::Description(describe(mode).into()))?;
        }
        // Sent whether asked for or not (the protocol allows it); the minimum is the engine's
        // sector, and unaligned requests get EINVAL.
        let (min, preferred, max) = export.block_sizes();
        self.info(
            option,
            Info::BlockSize {
                min,
                preferred,
                max,
            },
        )?;
        if option == OPT_INFO {
            self.reply(option, REP_ACK, &[])?;
            return Ok(None);
        }
        match self.attach(&req.name) {
            Some(session) => {
                self.reply(option, REP_ACK, &[])?;
                Ok(Some(session))
            }
            None => {
                let msg = format!("export {:?} went away", req.name);
                self.reply_error(option, REP_ERR_UNKNOWN, &msg)?;
                Ok(None)
            }
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        if option == OPT_SET_META_CONTEXT {
            // A SET replaces the selection, failed or not.
            self.meta = None;
        }
        if !self.structured {
            let msg = "negotiate structured replies first";
            return self.reply_error(option, REP_ERR_INVALID, msg);
        }
        let req = match MetaContextRequest::decode(data) {
            Ok(r) if r.queries.iter().all(|q| contexts::well_formed(q)) => r,
            Ok(_) => return self.reply_error(option, REP_ERR_INVALID, "malformed query"),
            Err(e) => return self.reply_error(option, REP_ERR_INVALID, &e.to_string()),
        };
        if self.export(&req.export).is_none() {
            let msg = format!("no export named {:?}", req.export);
            return self.reply_error(option, REP_ERR_UNKNOWN, &msg);
        }
        let devices = self.registry.devices();
        let mut found: Vec<Context> = if option == OPT_LIST_META_CONTEXT {
            match req.queries.is_empty() {
                true => contexts::all(&devices),
                false => req
                    .queries
                    .iter()
                    .flat_map(|q| contexts::list(q, &devices))
                    .collect(),
            }
        } else {
            req.queries
                .iter()
                .filter_map(|q| contexts::select(q, &devices))
                .collect()
        };
        found.sort();
        found.dedup();
        if option == OPT_SET_META_CONTEXT && found.len() > MAX_CONTEXTS {
            let msg = format!("at most {MAX_CONTEXTS} contexts may be selected");
            return self.reply_error(option, REP_ERR_TOO_BIG, &msg);
        }
        let mut selected = Vec::new();
        for (i, context) in found.into_iter().enumerate() {
            let listing = option == OPT_LIST_META_CONTEXT;
            let id = if listing { 0 } else { i as u32 + 1 };
            let mut entry = Vec::new();
            MetaContext {
                id,
                name: context.name(),
            }
            .encode(&mut entry);
            self.reply(option, REP_META_CONTEXT, &entry)?;
            let device = match &context {
                Context::Dirty(name) => self.registry.device_id(name),
                _ => None,
            };
            selected.push(Selected {
                id,
                context,
                device,
            });
        }
        if option == OPT_SET_META_CONTEXT {
            self.meta = Some((req.export, selected));
        }
        self.reply(option, REP_ACK, &[])
    }
}
