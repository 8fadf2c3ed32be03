//! The client's side of the NBD handshake (fixed newstyle): structured replies and the
//! `base:allocation` context if the server has them, then the export with `NBD_OPT_GO`
//! (`NBD_OPT_EXPORT_NAME` for servers without it). Every option reply is validated and
//! bounded: a server cannot make the client read more than [`MAX_REPLY_DATA`] bytes per
//! reply or [`MAX_REPLIES`] replies per option.

use super::client_error::ClientError;
use super::client_stream::Timed;
use super::contexts::BASE_ALLOCATION;
use super::options::{Info, InfoRequest, MetaContext, MetaContextRequest};
use super::proto::{
    ExportNameReply, Greeting, OptionHeader, OptionReply, FLAG_CAN_MULTI_CONN,
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, FLAG_READ_ONLY,
    INFO_BLOCK_SIZE, NBDMAGIC, OPT_EXPORT_NAME, OPT_GO, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY,
    REP_ACK, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT,
};
use std::io::{BufReader, Read, Write};

/// Largest option reply data read.
const MAX_REPLY_DATA: u32 = 64 << 10;
/// Most replies one option may get.
const MAX_REPLIES: usize = 1024;
/// The oldstyle greeting's second magic.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Largest request the client makes when the server does not say.
pub const DEFAULT_MAX_REQUEST: u32 = 32 << 20;

/// What the server said about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The id of `base:allocation`, when the server offers it.
    pub allocation_context: Option<u32>,
    /// Block size constraints (512 and [`DEFAULT_MAX_REQUEST`] unless the server says).
    pub min_block: u32,
    pub max_request: u32,
}

impl ExportInfo {
    /// Several connections see the same data (`NBD_FLAG_CAN_MULTI_CONN`).
    pub fn multi_conn(&self) -> bool {
        self.flags & FLAG_CAN_MULTI_CONN != 0
    }

    pub fn read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }
}

type Conn = BufReader<Timed>;

fn send_option(r: &mut Conn, option: u32, data: &[u8]) -> Result<(), ClientError> {
    let mut out = Vec::with_capacity(OptionHeader::LEN + data.len());
    let len = u32::try_from(data.len()).map_err(|_| ClientError::BadReply("option".into()))?;
    OptionHeader { option, len }.encode(&mut out);
    out.extend_from_slice(data);
    r.get_mut().write_all(&out)?;
    Ok(())
}

/// One reply to `option`: its type and data.
fn option_reply(r: &mut Conn, option: u32) -> Result<(u32, Vec<u8>), ClientError> {
    let mut h = [0u8; OptionReply::LEN];
    r.read_exact(&mut h)?;
    let rep = OptionReply::decode(&h)?;
    if rep.option != option {
        return Err(ClientError::BadReply(format!(
            "a reply to option {} while asking {option}",
            rep.option
        )));
    }
    if rep.len > MAX_REPLY_DATA {
        return Err(ClientError::BadReply(format!(
            "an option reply of {} bytes",
            rep.len
        )));
    }
    let mut data = vec![0u8; rep.len as usize];
    r.read_exact(&mut data)?;
    Ok((rep.reply, data))
}

/// The message of an error reply, for the user.
fn message(data: &[u8]) -> String {
    String::from_utf8_lossy(&data[..data.len().min(512)]).into_owned()
}

/// Negotiates export `name` on a fresh connection.
pub fn negotiate(r: &mut Conn, name: &str) -> Result<ExportInfo, ClientError> {
    let mut g = [0u8; Greeting::LEN];
    r.read_exact(&mut g)?;
    if g[..8] == NBDMAGIC.to_be_bytes() && g[8..16] == OLDSTYLE_MAGIC.to_be_bytes() {
        return Err(ClientError::Unsupported("the oldstyle handshake".into()));
    }
    let greeting = Greeting::decode(&g)?;
    if greeting.flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::Unsupported(
            "fixed newstyle negotiation".into(),
        ));
    }
    let no_zeroes = greeting.flags & FLAG_NO_ZEROES != 0;
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= FLAG_C_NO_ZEROES;
    }
    r.get_mut().write_all(&cflags.to_be_bytes())?;
    send_option(r, OPT_STRUCTURED_REPLY, &[])?;
    let structured = acked(r, OPT_STRUCTURED_REPLY)?;
    let allocation_context = if structured {
        allocation_context(r, name)?
    } else {
        None
    };
    let mut go = Vec::new();
    InfoRequest {
        name: name.to_string(),
        requests: vec![INFO_BLOCK_SIZE],
    }
    .encode(&mut go);
    send_option(r, OPT_GO, &go)?;
    let mut info = ExportInfo {
        size: 0,
        flags: 0,
        structured,
        allocation_context,
        min_block: 512,
        max_request: DEFAULT_MAX_REQUEST,
    };
    match go_replies(r, name, &mut info)? {
        true => Ok(info),
        // A server without NBD_OPT_GO: the old way, which ends the negotiation.
        false => export_name(r, name, no_zeroes, info),
    }
}

/// Reads the replies to an option expecting only an acknowledgement: `true` if acked,
/// `false` if refused (any error).
fn acked(r: &mut Conn, option: u32) -> Result<bool, ClientError> {
    let (rep, _) = option_reply(r, option)?;
    match rep {
        REP_ACK => Ok(true),
        e if e & (1 << 31) != 0 => Ok(false),
        other => Err(ClientError::BadReply(format!(
            "reply {other:#x} to option {option}"
        ))),
    }
}

/// Selects `base:allocation` for export `name`: its context id, if the server has it.
fn allocation_context(r: &mut Conn, name: &str) -> Result<Option<u32>, ClientError> {
    let mut data = Vec::new();
    MetaContextRequest {
        export: name.to_string(),
        queries: vec![BASE_ALLOCATION.to_string()],
    }
    .encode(&mut data);
    send_option(r, OPT_SET_META_CONTEXT, &data)?;
    let mut id = None;
    for _ in 0..MAX_REPLIES {
        let (rep, data) = option_reply(r, OPT_SET_META_CONTEXT)?;
        match rep {
            REP_META_CONTEXT => {
                let ctx = MetaContext::decode(&data)?;
                if ctx.name == BASE_ALLOCATION {
                    id = Some(ctx.id);
                }
            }
            REP_ACK => return Ok(id),
            e if e & (1 << 31) != 0 => return Ok(None),
            other => {
                return Err(ClientError::BadReply(format!(
                    "reply {other:#x} to NBD_OPT_SET_META_CONTEXT"
                )))
            }
        }
    }
    Err(ClientError::BadReply("endless meta context replies".into()))
}

/// The replies to `NBD_OPT_GO`: `Ok(true)` once acked with the export's size known,
/// `Ok(false)` if the server does not know the option.
fn go_replies(r: &mut Conn, name: &str, info: &mut ExportInfo) -> Result<bool, ClientError> {
    let mut sized = false;
    for _ in 0..MAX_REPLIES {
        let (rep, data) = option_reply(r, OPT_GO)?;
        match rep {
            REP_INFO => match Info::decode(&data)? {
                Info::Export { size, flags } => {
                    (info.size, info.flags) = (size, flags);
                    sized = true;
                }
                Info::BlockSize { min, max, .. }
                    if min.is_power_of_two() && min <= 64 << 10 && max >= min =>
                {
                    info.min_block = min;
                    info.max_request = max.min(DEFAULT_MAX_REQUEST);
                }
                _ => {}
            },
            REP_ACK if sized => return Ok(true),
            REP_ACK => {
                return Err(ClientError::BadReply(
                    "NBD_OPT_GO acked without a size".into(),
                ))
            }
            REP_ERR_UNSUP => return Ok(false),
            REP_ERR_UNKNOWN => {
                return Err(ClientError::Refused(format!(
                    "no export named {name:?}: {}",
                    message(&data)
                )))
            }
            e if e & (1 << 31) != 0 => {
                return Err(ClientError::Refused(format!(
                    "export {name:?} (error {e:#x}): {}",
                    message(&data)
                )))
            }
            other => {
                return Err(ClientError::BadReply(format!(
                    "reply {other:#x} to NBD_OPT_GO"
                )))
            }
        }
    }
    Err(ClientError::BadReply("endless NBD_OPT_GO replies".into()))
}

/// `NBD_OPT_EXPORT_NAME`: the server answers with the size and flags (or closes).
fn export_name(
    r: &mut Conn,
    name: &str,
    no_zeroes: bool,
    mut info: ExportInfo,
) -> Result<ExportInfo, ClientError> {
    send_option(r, OPT_EXPORT_NAME, name.as_bytes())?;
    let mut b = [0u8; ExportNameReply::LEN];
    r.read_exact(&mut b)?;
    let rep = ExportNameReply::decode(&b)?;
    if !no_zeroes {
        let mut z = [0u8; ExportNameReply::ZEROES];
        r.read_exact(&mut z)?;
    }
    (info.size, info.flags) = (rep.size, rep.flags);
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::client::ClientConn;
    use crate::nbd::proto::{OPT_GO, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_UNKNOWN};
    use crate::nbd::uri::NbdUri;
    use std::os::unix::net::UnixListener;
    use std::time::Duration;

    /// A server that sends `script` as soon as a client connects, then drains what it sends.
    fn connect_to(script: Vec<u8>) -> Result<ClientConn, ClientError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.write_all(&script);
            let _ = std::io::copy(&mut s, &mut std::io::sink());
        });
        let uri = NbdUri::parse(&format!("nbd+unix:///x?socket={}", path.display())).unwrap();
        ClientConn::connect(&uri, Duration::from_secs(5))
    }

    fn greeting() -> Vec<u8> {
        let mut v = Vec::new();
        Greeting {
            flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        }
        .encode(&mut v);
        v
    }

    trait Bytes {
        fn bytes(&self) -> Vec<u8>;
    }

    impl Bytes for OptionReply {
        fn bytes(&self) -> Vec<u8> {
            let mut v = Vec::new();
            self.encode(&mut v);
            v
        }
    }

    fn reply(option: u32, rep: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        OptionReply::encode_with(option, rep, data, &mut v);
        v
    }

    #[test]
    fn hostile_or_refusing_handshakes_are_errors() {
        let old = [
            &NBDMAGIC.to_be_bytes()[..],
            &OLDSTYLE_MAGIC.to_be_bytes(),
            &[0, 0],
        ]
        .concat();
        assert!(matches!(connect_to(old), Err(ClientError::Unsupported(_))));
        let huge = [
            greeting(),
            OptionReply {
                option: OPT_STRUCTURED_REPLY,
                reply: REP_ACK,
                len: 1 << 30,
            }
            .bytes(),
        ]
        .concat();
        assert!(matches!(connect_to(huge), Err(ClientError::BadReply(_))));
        let other = [greeting(), reply(OPT_GO, REP_ACK, &[])].concat();
        assert!(matches!(connect_to(other), Err(ClientError::BadReply(_))));
        let unknown = [
            greeting(),
            reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]),
            reply(OPT_GO, REP_ERR_UNKNOWN, b"nope"),
        ]
        .concat();
        match connect_to(unknown) {
            Err(ClientError::Refused(m)) => assert!(m.contains("no export") && m.contains("nope")),
            other => panic!("{:?}", other.err()),
        }
        let sizeless = [
            greeting(),
            reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]),
            reply(OPT_GO, REP_ACK, &[]),
        ]
        .concat();
        assert!(matches!(
            connect_to(sizeless),
            Err(ClientError::BadReply(_))
        ));
    }
}
