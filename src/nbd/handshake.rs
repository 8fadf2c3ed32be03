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

/// What comes after an option.
enum Next {
    /// More options.
    More,
    /// The client left (`NBD_OPT_ABORT`).
    Leave,
    /// Transmission, with this session.
    Go(Session),
}

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
        match h.option(header.option, &data)? {
            Next::More => {}
            Next::Leave => return Ok(None),
            Next::Go(session) => return Ok(Some(session)),
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
    /// Handles one option.
    fn option(&mut self, option: u32, data: &[u8]) -> Result<Next, NbdError> {
        match option {
            OPT_EXPORT_NAME => return self.export_name(data).map(Next::Go),
            OPT_ABORT => {
                self.reply(option, REP_ACK, &[])?;
                return Ok(Next::Leave);
            }
            OPT_LIST => self.list(data)?,
            OPT_INFO | OPT_GO => {
                if let Some(session) = self.info_or_go(option, data)? {
                    return Ok(Next::Go(session));
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
        Ok(Next::More)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cow::DeviceId;
    use crate::device::CowDevice;
    use crate::nbd::options::Info;
    use crate::nbd::proto::{OptionReply, REP_ERR_UNSUP};
    use crate::testkit::engine::mem_engine;
    use proptest::prelude::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn registry() -> Arc<Registry> {
        let engine = Arc::new(mem_engine(16).build().engine);
        let reg = Registry::new(engine.clone());
        let dev = Arc::new(CowDevice::new(engine, DeviceId::ORIGIN));
        reg.set(ORIGIN_NAME, DeviceId::ORIGIN, dev, Mode::ReadOnly);
        reg
    }

    /// Runs the server's negotiation against a client that sends `input` and then stops
    /// sending; returns the outcome and everything the server sent.
    fn run(reg: &Arc<Registry>, input: Vec<u8>) -> (Result<Option<Session>, NbdError>, Vec<u8>) {
        let (mut client, server) = UnixStream::pair().unwrap();
        let feeder = std::thread::spawn(move || {
            let _ = client.write_all(&input);
            let _ = client.shutdown(std::net::Shutdown::Write);
            let mut got = Vec::new();
            let _ = client.read_to_end(&mut got);
            got
        });
        let mut stream = Stream::Unix(server);
        let outcome = negotiate(&mut stream, reg);
        let _ = stream.shutdown(std::net::Shutdown::Both);
        drop(stream);
        (outcome, feeder.join().unwrap())
    }

    fn option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
        let len = data.len() as u32;
        OptionHeader { option, len }.encode(out);
        out.extend_from_slice(data);
    }

    /// The replies after the greeting, as (option, reply type, data).
    fn replies(mut sent: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        sent = &sent[Greeting::LEN..];
        let mut out = Vec::new();
        while sent.len() >= OptionReply::LEN {
            let r = OptionReply::decode(&sent[..OptionReply::LEN]).unwrap();
            let end = OptionReply::LEN + r.len as usize;
            out.push((r.option, r.reply, sent[OptionReply::LEN..end].to_vec()));
            sent = &sent[end..];
        }
        out
    }

    #[test]
    fn go_with_contexts_opens_the_export() {
        let reg = registry();
        let mut input = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        option(&mut input, 42, b"");
        option(&mut input, OPT_STRUCTURED_REPLY, b"");
        let mut q = Vec::new();
        MetaContextRequest {
            export: String::new(),
            queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:origin".into()],
        }
        .encode(&mut q);
        option(&mut input, OPT_SET_META_CONTEXT, &q);
        let mut go = Vec::new();
        InfoRequest {
            name: "origin".into(),
            requests: vec![INFO_NAME],
        }
        .encode(&mut go);
        option(&mut input, OPT_GO, &go);
        let (outcome, sent) = run(&reg, input);
        let session = outcome.unwrap().expect("a session");
        assert!(session.structured && !session.writable);
        assert_eq!(session.contexts.len(), 2);
        assert_eq!(session.contexts[1].device, Some(DeviceId::ORIGIN));
        let r = replies(&sent);
        assert_eq!((r[0].0, r[0].1), (42, REP_ERR_UNSUP));
        assert_eq!(
            (r[1].1, r[2].1, r[3].1, r[4].1),
            (REP_ACK, REP_META_CONTEXT, REP_META_CONTEXT, REP_ACK)
        );
        let infos: Vec<Info> = r[5..]
            .iter()
            .filter(|x| x.1 == REP_INFO)
            .map(|x| Info::decode(&x.2).unwrap())
            .collect();
        assert!(infos.contains(&Info::Name("origin".into())));
        assert!(infos
            .iter()
            .any(|i| matches!(i, Info::Export { size, .. } if *size == 16 * 4096)));
        assert_eq!(r.last().map(|x| x.1), Some(REP_ACK));
        assert_eq!(reg.clients(ORIGIN_NAME), 1);
        drop(session);
        assert_eq!(
            reg.clients(ORIGIN_NAME),
            0,
            "detached when the session ends"
        );
    }

    #[test]
    fn hostile_handshakes_end_with_an_error_or_an_error_reply() {
        let reg = registry();
        // Unknown client flags.
        assert!(matches!(
            run(&reg, vec![0, 0, 0, 0x80]).0,
            Err(NbdError::ClientFlags(_))
        ));
        // An oversized option: told so, then dropped.
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        OptionHeader {
            option: OPT_GO,
            len: MAX_OPTION_LEN + 1,
        }
        .encode(&mut input);
        let (outcome, sent) = run(&reg, input);
        assert!(matches!(outcome, Err(NbdError::OptionTooBig { .. })));
        assert_eq!(replies(&sent)[0].1, REP_ERR_TOO_BIG);
        // Meta contexts before structured replies, an unknown export, then abort.
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        option(&mut input, OPT_LIST_META_CONTEXT, &[0; 8]);
        let mut go = Vec::new();
        InfoRequest {
            name: "nope".into(),
            requests: vec![],
        }
        .encode(&mut go);
        option(&mut input, OPT_GO, &go);
        option(&mut input, OPT_ABORT, b"");
        let (outcome, sent) = run(&reg, input);
        assert!(matches!(outcome, Ok(None)));
        let kinds: Vec<u32> = replies(&sent).iter().map(|r| r.1).collect();
        assert_eq!(kinds, vec![REP_ERR_INVALID, REP_ERR_UNKNOWN, REP_ACK]);
        // NBD_OPT_EXPORT_NAME of an unknown export cannot be answered: the end.
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        option(&mut input, OPT_EXPORT_NAME, b"nope");
        assert!(matches!(run(&reg, input).0, Err(NbdError::NoExport(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Arbitrary bytes, raw or inside well-formed option headers: the negotiation ends
        /// (with an error, or an error reply and the client's departure), never panics.
        #[test]
        fn arbitrary_client_bytes_never_panic(
            raw in proptest::collection::vec(any::<u8>(), 0..256),
            opts in proptest::collection::vec((0u32..12, proptest::collection::vec(any::<u8>(), 0..48)), 0..6),
        ) {
            let reg = registry();
            let _ = run(&reg, raw);
            let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
            for (o, data) in &opts {
                option(&mut input, *o, data);
            }
            let _ = run(&reg, input);
        }
    }
}
