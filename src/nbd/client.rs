//! An NBD client connection, on the crate's codec ([`super::proto`], [`super::options`],
//! [`super::chunks`]): connect (unix or TCP), negotiate (`client_handshake.rs`), then reads
//! and `base:allocation` block-status queries, one request in flight at a time.
//!
//! The server is hostile: every reply is validated before it is believed (magic, handle,
//! chunk type, lengths, offsets inside the request, no overlap, the whole range covered),
//! payloads are bounded by what was asked for, and a socket timeout bounds every wait. A
//! reply that breaks the protocol ends the connection ([`ClientError::breaks_connection`]);
//! an error the server reports for one request does not.

use super::chunks::{BlockStatus, ErrorChunk, Hole};
pub use super::client_error::ClientError;
use super::client_handshake::{negotiate, ExportInfo};
use super::client_stream::{open_stream, Timed};
use super::proto::{
    ChunkHeader, Request, SimpleReply, CMD_BLOCK_STATUS, CMD_DISC, CMD_READ, EIO,
    REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use super::uri::NbdUri;
use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

/// Largest error chunk payload read (an error number, a message of at most 64 KiB, an offset).
const MAX_ERROR_PAYLOAD: u32 = 6 + 65535 + 8;
/// Most descriptors one block-status chunk may carry.
const MAX_DESCRIPTORS: u32 = 1 << 16;

fn bad(why: impl Into<String>) -> ClientError {
    ClientError::BadReply(why.into())
}

/// One connection to an NBD server's export, negotiated and ready for requests.
pub struct ClientConn {
    reader: BufReader<Timed>,
    pub info: ExportInfo,
    handle: u64,
}

impl ClientConn {
    /// Connects to `uri` and negotiates its export (structured replies and `base:allocation`
    /// when the server has them). `timeout` bounds each wait for the server.
    pub fn connect(uri: &NbdUri, timeout: Duration) -> Result<Self, ClientError> {
        let stream = Timed::new(open_stream(uri, timeout)?);
        let mut reader = BufReader::with_capacity(64 << 10, stream);
        // The whole handshake within the timeout, however slowly the server trickles it.
        reader.get_mut().deadline = Some(Instant::now() + timeout);
        let info = negotiate(&mut reader, &uri.export)?;
        reader.get_mut().deadline = None;
        Ok(ClientConn {
            reader,
            info,
            handle: 0,
        })
    }

    fn send(&mut self, cmd: u16, offset: u64, len: u32) -> Result<u64, ClientError> {
        self.handle = self.handle.wrapping_add(1);
        let mut out = Vec::with_capacity(Request::LEN);
        Request {
            flags: 0,
            cmd,
            handle: self.handle,
            offset,
            len,
        }
        .encode(&mut out);
        self.reader.get_mut().write_all(&out)?;
        Ok(self.handle)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ClientError> {
        self.reader.read_exact(buf)?;
        Ok(())
    }

    /// Reads and drops `n` bytes.
    fn skip(&mut self, n: u32) -> Result<(), ClientError> {
        let copied = io::copy(&mut (&mut self.reader).take(n.into()), &mut io::sink())?;
        if copied != u64::from(n) {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        Ok(())
    }

    /// The next reply's header for request `handle`: a simple reply's error, or a chunk's
    /// header.
    fn reply_header(&mut self, handle: u64) -> Result<Result<u32, ChunkHeader>, ClientError> {
        let mut magic = [0u8; 4];
        self.read_exact(&mut magic)?;
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut b = [0u8; SimpleReply::LEN];
                b[..4].copy_from_slice(&magic);
                self.read_exact(&mut b[4..])?;
                let r = SimpleReply::decode(&b)?;
                if r.handle != handle {
                    return Err(bad(format!("a reply for handle {:#x}", r.handle)));
                }
                Ok(Ok(r.error))
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut b = [0u8; ChunkHeader::LEN];
                b[..4].copy_from_slice(&magic);
                self.read_exact(&mut b[4..])?;
                let h = ChunkHeader::decode(&b)?;
                if h.handle != handle {
                    return Err(bad(format!("a reply chunk for handle {:#x}", h.handle)));
                }
                Ok(Err(h))
            }
            m => Err(bad(format!("reply magic {m:#x}"))),
        }
    }

    /// An error chunk's payload, as the request's error.
    fn error_chunk(&mut self, h: &ChunkHeader) -> Result<ClientError, ClientError> {
        if h.len > MAX_ERROR_PAYLOAD {
            return Err(bad(format!("an error chunk of {} bytes", h.len)));
        }
        let mut p = vec![0u8; h.len as usize];
        self.read_exact(&mut p)?;
        Ok(match ErrorChunk::decode(h.kind, &p) {
            Ok(e) => ClientError::Server {
                errno: e.error,
                message: e.message,
            },
            Err(_) => ClientError::Server {
                errno: EIO,
                message: "an unreadable error".into(),
            },
        })
    }

    /// Reads `buf.len()` bytes at `offset` (at most the export's largest request).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let len = u32::try_from(buf.len()).map_err(|_| bad("request too large"))?;
        let handle = self.send(CMD_READ, offset, len)?;
        let mut cover = Coverage::new(len);
        let mut failure = None;
        loop {
            let h = match self.reply_header(handle)? {
                Ok(0) => {
                    self.read_exact(buf)?;
                    return Ok(());
                }
                Ok(errno) => {
                    return Err(ClientError::Server {
                        errno,
                        message: "read failed".into(),
                    })
                }
                Err(h) => h,
            };
            cover.chunk()?;
            match h.kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let n = h.len.checked_sub(8).filter(|&n| n > 0);
                    let n = n.ok_or_else(|| bad("an empty data chunk"))?;
                    let mut at = [0u8; 8];
                    self.read_exact(&mut at)?;
                    let start = cover.add(u64::from_be_bytes(at), offset, n)?;
                    self.read_exact(&mut buf[start..start + n as usize])?;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    if h.len as usize != Hole::LEN {
                        return Err(bad("a hole chunk of the wrong size"));
                    }
                    let mut p = [0u8; Hole::LEN];
                    self.read_exact(&mut p)?;
                    let hole = Hole::decode(&p)?;
                    let start = cover.add(hole.offset, offset, hole.len)?;
                    buf[start..start + hole.len as usize].fill(0);
                }
                REPLY_TYPE_NONE if h.len == 0 && h.is_done() => {}
                k if k & 0x8000 != 0 => failure = Some(self.error_chunk(&h)?),
                k => return Err(bad(format!("chunk type {k} in a read's reply"))),
            }
            if h.is_done() {
                return match failure {
                    Some(e) => Err(e),
                    None => cover.complete(),
                };
            }
        }
    }

    /// `base:allocation` of `[offset, offset + len)`: `(length, flags)` runs from `offset`,
    /// covering at least one byte and at most `len`.
    pub fn block_status(&mut self, offset: u64, len: u32) -> Result<Vec<(u32, u32)>, ClientError> {
        let ctx = self
            .info
            .allocation_context
            .ok_or_else(|| ClientError::Unsupported("base:allocation".into()))?;
        let handle = self.send(CMD_BLOCK_STATUS, offset, len)?;
        let mut runs: Vec<(u32, u32)> = Vec::new();
        let mut failure = None;
        let mut chunks = 0u32;
        loop {
            let h = match self.reply_header(handle)? {
                Ok(0) => return Err(bad("block status without a status chunk")),
                Ok(errno) => {
                    let message = "block status failed".into();
                    return Err(ClientError::Server { errno, message });
                }
                Err(h) => h,
            };
            chunks += 1;
            if chunks > 64 {
                return Err(bad("too many chunks in a block-status reply"));
            }
            match h.kind {
                REPLY_TYPE_BLOCK_STATUS => {
                    if h.len > 4 + 8 * MAX_DESCRIPTORS {
                        return Err(bad("a block-status chunk too large"));
                    }
                    let mut p = vec![0u8; h.len as usize];
                    self.read_exact(&mut p)?;
                    let s = BlockStatus::decode(&p)?;
                    if s.context != ctx {
                        return Err(bad(format!("status of context {}", s.context)));
                    }
                    if runs.is_empty() {
                        runs = clamp_runs(&s, len);
                    }
                }
                REPLY_TYPE_NONE if h.len == 0 && h.is_done() => {}
                k if k & 0x8000 != 0 => failure = Some(self.error_chunk(&h)?),
                k => {
                    self.skip(h.len.min(MAX_ERROR_PAYLOAD))?;
                    return Err(bad(format!("chunk type {k} in a block-status reply")));
                }
            }
            if h.is_done() {
                return match (failure, runs.is_empty()) {
                    (Some(e), _) => Err(e),
                    (None, true) => Err(bad("block status answered nothing")),
                    (None, false) => Ok(runs),
                };
            }
        }
    }

    /// Requests from now on fail once `deadline` passes, however slowly the server answers
    /// (`None`: only the socket's timeout per read or write bounds them).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.reader.get_mut().deadline = deadline;
    }

    /// Says goodbye (best effort) and closes.
    pub fn close(mut self) {
        self.reader.get_mut().deadline = None;
        let _ = self.send(CMD_DISC, 0, 0);
        let _ = self.reader.get_ref().stream.shutdown(Shutdown::Both);
    }
}

/// A status reply's descriptors, cut at `len` bytes (a server may describe more).
fn clamp_runs(s: &BlockStatus, len: u32) -> Vec<(u32, u32)> {
    let mut left = len;
    let mut runs = Vec::with_capacity(s.descriptors.len());
    for d in &s.descriptors {
        if left == 0 {
            break;
        }
        let n = d.len.min(left);
        runs.push((n, d.flags));
        left -= n;
    }
    runs
}

/// Which bytes of a read the reply's chunks covered: each inside the request, none twice,
/// all of them by the end; and not more chunks than a sane server sends.
struct Coverage {
    len: u32,
    covered: u64,
    spans: Vec<(u32, u32)>,
    max_chunks: u32,
    chunks: u32,
}

impl Coverage {
    fn new(len: u32) -> Self {
        Coverage {
            len,
            covered: 0,
            spans: Vec::new(),
            max_chunks: len / 512 + 16,
            chunks: 0,
        }
    }

    fn chunk(&mut self) -> Result<(), ClientError> {
        self.chunks += 1;
        if self.chunks > self.max_chunks {
            return Err(bad("too many chunks in a read's reply"));
        }
        Ok(())
    }

    /// A chunk for `n` bytes at `at` of a request at `offset`: where it goes in the buffer.
    fn add(&mut self, at: u64, offset: u64, n: u32) -> Result<usize, ClientError> {
        let start = at
            .checked_sub(offset)
            .filter(|&s| {
                s.checked_add(u64::from(n))
                    .is_some_and(|end| end <= u64::from(self.len))
            })
            .ok_or_else(|| bad(format!("a chunk at {at} outside the request")))?;
        self.covered += u64::from(n);
        if self.covered > u64::from(self.len) {
            return Err(bad("chunks overlap"));
        }
        self.spans.push((start as u32, n));
        Ok(start as usize)
    }

    /// Every byte covered exactly once.
    fn complete(mut self) -> Result<(), ClientError> {
        self.spans.sort_unstable();
        let mut at = 0u32;
        for (s, n) in &self.spans {
            if *s != at {
                return Err(bad("chunks overlap or leave a gap"));
            }
            at += n;
        }
        if at != self.len {
            return Err(bad("the reply did not cover the whole read"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::chunks::{encode_data_start, Descriptor};
    use crate::nbd::options::{Info, MetaContext};
    use crate::nbd::proto::{
        Greeting, OptionHeader, OptionReply, FLAG_CAN_MULTI_CONN, FLAG_FIXED_NEWSTYLE,
        FLAG_HAS_FLAGS, FLAG_NO_ZEROES, FLAG_READ_ONLY, OPT_GO, OPT_SET_META_CONTEXT,
        REPLY_FLAG_DONE, REPLY_TYPE_ERROR, REP_ACK, REP_INFO, REP_META_CONTEXT,
    };
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    const SIZE: u64 = 1 << 20;

    /// Serves one connection: a well-behaved handshake, then `reply` (raw bytes) to the first
    /// request, then closes.
    fn server(reply: Vec<u8>) -> (tempfile::TempDir, PathBuf) {
        server_paced(reply, Duration::ZERO)
    }

    /// [`server`], sending the reply a byte at a time, `pace` apart.
    fn server_paced(reply: Vec<u8>, pace: Duration) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut out = Vec::new();
            let flags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
            Greeting { flags }.encode(&mut out);
            s.write_all(&out).unwrap();
            let mut cflags = [0u8; 4];
            s.read_exact(&mut cflags).unwrap();
            loop {
                let mut h = [0u8; OptionHeader::LEN];
                s.read_exact(&mut h).unwrap();
                let h = OptionHeader::decode(&h).unwrap();
                let mut data = vec![0u8; h.len as usize];
                s.read_exact(&mut data).unwrap();
                let mut out = Vec::new();
                if h.option == OPT_SET_META_CONTEXT {
                    let mut ctx = Vec::new();
                    MetaContext {
                        id: 7,
                        name: "base:allocation".into(),
                    }
                    .encode(&mut ctx);
                    OptionReply::encode_with(h.option, REP_META_CONTEXT, &ctx, &mut out);
                }
                if h.option == OPT_GO {
                    let mut info = Vec::new();
                    let flags = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN;
                    Info::Export { size: SIZE, flags }.encode(&mut info);
                    OptionReply::encode_with(h.option, REP_INFO, &info, &mut out);
                }
                OptionReply::encode_with(h.option, REP_ACK, &[], &mut out);
                s.write_all(&out).unwrap();
                if h.option == OPT_GO {
                    break;
                }
            }
            let mut req = [0u8; Request::LEN];
            if s.read_exact(&mut req).is_ok() {
                if pace.is_zero() {
                    let _ = s.write_all(&reply);
                }
                for b in reply.iter().take_while(|_| !pace.is_zero()) {
                    std::thread::sleep(pace);
                    if s.write_all(&[*b]).is_err() {
                        break;
                    }
                }
            }
        });
        (dir, path)
    }

    fn connect(path: &std::path::Path) -> ClientConn {
        let uri = NbdUri::parse(&format!("nbd+unix:///?socket={}", path.display())).unwrap();
        ClientConn::connect(&uri, Duration::from_secs(5)).unwrap()
    }

    fn chunk(flags: u16, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        let len = payload.len() as u32;
        ChunkHeader {
            flags,
            kind,
            handle,
            len,
        }
        .encode(&mut v);
        v.extend_from_slice(payload);
        v
    }

    fn data(at: u64, bytes: &[u8], done: bool) -> Vec<u8> {
        let mut v = Vec::new();
        encode_data_start(1, at, bytes.len() as u32, done, &mut v);
        v.extend_from_slice(bytes);
        v
    }

    fn hole(at: u64, len: u32, done: bool) -> Vec<u8> {
        let mut p = Vec::new();
        Hole { offset: at, len }.encode(&mut p);
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        chunk(flags, REPLY_TYPE_OFFSET_HOLE, 1, &p)
    }

    /// A 1024-byte read at 4096 answered with `reply`.
    fn read_with(reply: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        let (_dir, path) = server(reply);
        let mut c = connect(&path);
        assert_eq!(c.info.size, SIZE);
        assert!(c.info.structured && c.info.multi_conn() && c.info.read_only());
        assert_eq!(c.info.allocation_context, Some(7));
        let mut buf = vec![0xaau8; 1024];
        c.read(4096, &mut buf).map(|()| buf)
    }

    #[test]
    fn well_formed_replies_are_assembled() {
        let reply = [hole(4096 + 512, 512, false), data(4096, &[3u8; 512], true)].concat();
        let got = read_with(reply).unwrap();
        assert_eq!(&got[..512], &[3u8; 512]);
        assert_eq!(&got[512..], &[0u8; 512]);
    }

    /// Whatever a hostile server answers, the client refuses it with an error and never
    /// panics or reads past what it asked for.
    #[test]
    fn hostile_replies_are_refused() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("another handle", {
                let mut v = Vec::new();
                encode_data_start(2, 4096, 1024, true, &mut v);
                v.extend_from_slice(&[0u8; 1024]);
                v
            }),
            ("outside the request", data(8192, &[1u8; 1024], true)),
            ("before the request", data(0, &[1u8; 1024], true)),
            ("past u64", data(u64::MAX - 10, &[1u8; 512], true)),
            (
                "overlap",
                [data(4096, &[1u8; 1024], false), hole(4096, 512, true)].concat(),
            ),
            ("a gap", data(4096, &[1u8; 512], true)),
            ("an empty data chunk", data(4096, &[], true)),
            (
                "a huge error chunk",
                chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 1, &[])[..16]
                    .iter()
                    .copied()
                    .chain([0xff, 0xff, 0xff, 0xf0])
                    .collect(),
            ),
            (
                "an unknown chunk type",
                chunk(REPLY_FLAG_DONE, 77, 1, &[0u8; 8]),
            ),
            ("a bad magic", vec![0u8; 32]),
            (
                "a short reply",
                data(4096, &[1u8; 100], true)[..60].to_vec(),
            ),
            (
                "a hole of a wrong size",
                chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 1, &[0; 8]),
            ),
        ];
        for (what, reply) in cases {
            let err = read_with(reply).expect_err(what);
            assert!(err.breaks_connection(), "{what}: {err}");
        }
    }

    #[test]
    fn a_server_error_fails_the_request_only() {
        let mut p = Vec::new();
        crate::nbd::chunks::ErrorChunk {
            error: 5,
            message: "bad sector".into(),
            offset: None,
        }
        .encode(&mut p);
        let err = read_with(chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 1, &p)).unwrap_err();
        assert!(!err.breaks_connection());
        assert!(err.to_string().contains("bad sector"), "{err}");
    }

    #[test]
    fn block_status_is_validated_and_clamped() {
        let status = |ctx: u32, descs: &[(u32, u32)]| {
            let s = BlockStatus {
                context: ctx,
                descriptors: descs
                    .iter()
                    .map(|&(len, flags)| Descriptor { len, flags })
                    .collect(),
            };
            let mut p = Vec::new();
            s.encode(&mut p);
            chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 1, &p)
        };
        let run = |reply: Vec<u8>| {
            let (_dir, path) = server(reply);
            connect(&path).block_status(0, 8192)
        };
        let got = run(status(7, &[(4096, 3), (1 << 20, 0)])).unwrap();
        assert_eq!(got, vec![(4096, 3), (4096, 0)], "cut at the length asked");
        assert!(run(status(9, &[(4096, 3)])).is_err(), "another context");
        assert!(run(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, &[])).is_err());
    }

    /// A server that trickles its reply (a byte every 20 ms, each well within the socket's
    /// timeout) cannot hold a request past its deadline.
    #[test]
    fn a_trickling_server_cannot_hold_a_request_past_its_deadline() {
        let reply = data(4096, &[1u8; 1024], true);
        let (_dir, path) = server_paced(reply, Duration::from_millis(20));
        let mut c = connect(&path);
        let t = Instant::now();
        c.set_deadline(Some(t + Duration::from_millis(300)));
        let err = c.read(4096, &mut [0u8; 1024]).unwrap_err();
        assert!(err.breaks_connection(), "{err}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
}
