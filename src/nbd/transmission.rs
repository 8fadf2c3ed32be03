//! The transmission phase of one connection: read a request, validate it, do its I/O on the
//! export, answer; until the client disconnects. Everything a request says is checked first
//! (flags, alignment, range, size, read-only) and a bad request gets an error reply, not a
//! dropped connection, except where the protocol cannot go on: a request with a bad magic,
//! or a write whose payload is too large to skip safely.
//!
//! Data moves in windows of [`WINDOW`] bytes, so a connection holds at most one window of
//! memory whatever the request size; a structured read sends zero mappings as holes.

use super::chunks::{encode_data_start, BlockStatus, ErrorChunk, Hole};
use super::error::NbdError;
use super::export::{Failure, Selected, MAX_PAYLOAD, MIN_BLOCK};
use super::proto::{
    ChunkHeader, Request, SimpleReply, CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLAG_DF,
    CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, EINVAL, ENOSPC, EPERM, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_HOLE,
};
use super::registry::{Attached, Export};
use super::socket::{read_message, write_all_vectored, Stream, STALL_TIMEOUT};
use crate::device::{BlockDevice, IoCounters};
use std::io::{self, IoSlice, Write};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Bytes of data read or written at a time.
pub const WINDOW: usize = 2 << 20;

/// What a connection negotiated.
pub struct Session {
    pub export: Arc<Export>,
    /// Keeps the connection registered with its export until the session ends.
    pub attached: Attached,
    pub structured: bool,
    /// Whether the export was offered writable (it may have been made read-only since).
    pub writable: bool,
    pub contexts: Vec<Selected>,
}

/// Whether to go on after a request.
enum Flow {
    Continue,
    Stop,
}

/// A connection in its transmission phase.
struct Conn<'a> {
    stream: &'a mut Stream,
    s: &'a Session,
    /// Reusable data window.
    buf: Vec<u8>,
    /// Reusable reply header bytes.
    out: Vec<u8>,
}

/// Serves requests until the client disconnects (or breaks the protocol).
pub fn serve(stream: &mut Stream, session: &Session) -> Result<(), NbdError> {
    stream.set_read_timeout(Some(STALL_TIMEOUT))?;
    let mut conn = Conn {
        stream,
        s: session,
        buf: Vec::new(),
        out: Vec::with_capacity(64),
    };
    loop {
        let mut header = [0u8; Request::LEN];
        if !read_message(conn.stream, &mut header, true)? {
            return Ok(());
        }
        let req = Request::decode(&header)?;
        if let Flow::Stop = conn.handle(&req)? {
            return Ok(());
        }
    }
}

fn count(counter: &AtomicU64, n: u64) {
    IoCounters::add(counter, n);
}

/// The part of a range a trim may discard: whole sectors only (the protocol allows rounding).
/// The range must be validated (within the export) first.
fn inner_sectors(offset: u64, len: u64) -> (u64, u64) {
    let sector = u64::from(MIN_BLOCK);
    let start = offset.div_ceil(sector) * sector;
    let end = (offset + len) / sector * sector;
    (start, end.saturating_sub(start))
}

impl Conn<'_> {
    fn counters(&self) -> &IoCounters {
        self.s.export.device.counters()
    }

    fn handle(&mut self, req: &Request) -> Result<Flow, NbdError> {
        match req.cmd {
            CMD_DISC => return Ok(Flow::Stop),
            CMD_READ => self.read(req)?,
            CMD_WRITE => return self.write(req),
            CMD_FLUSH => {
                let r = self.check(req, CMD_FLAG_FUA, false, None);
                let r = r.and_then(|()| self.s.export.flush());
                count(&self.counters().flushes, 1);
                self.answer(req, r)?;
            }
            CMD_TRIM => {
                let r = self.check(req, CMD_FLAG_FUA, true, Some(EINVAL));
                let r = r.and_then(|()| match inner_sectors(req.offset, req.len.into()) {
                    (_, 0) => Ok(()),
                    (offset, len) => self.s.export.trim(offset, len),
                });
                count(&self.counters().discards, 1);
                let r = self.fua(req, r);
                self.answer(req, r)?;
            }
            CMD_WRITE_ZEROES => {
                let flags = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE;
                let r = self.check(req, flags, true, Some(ENOSPC));
                let r = r.and_then(|()| self.aligned(req)).and_then(|()| {
                    let keep = req.flags & CMD_FLAG_NO_HOLE != 0;
                    self.s.export.zero(req.offset, req.len.into(), keep)
                });
                count(&self.counters().write_zeroes, 1);
                let r = self.fua(req, r);
                self.answer(req, r)?;
            }
            CMD_CACHE => {
                // Advisory: everything is in the page cache or a read away.
                let r = self.check(req, CMD_FLAG_FUA, false, Some(EINVAL));
                let r = r.and_then(|()| self.small(req));
                self.answer(req, r)?;
            }
            CMD_BLOCK_STATUS => self.block_status(req)?,
            other => {
                let r = Err((EINVAL, format!("unknown command {other}")));
                self.answer(req, r)?;
            }
        }
        Ok(Flow::Continue)
    }

    /// Checks flags (only `allowed`), write permission (`writes`) and, with `range` (the error
    /// for a range past the end), that the range lies within the export.
    fn check(
        &self,
        req: &Request,
        allowed: u16,
        writes: bool,
        range: Option<u32>,
    ) -> Result<(), Failure> {
        if req.flags & !allowed != 0 {
            return Err((EINVAL, format!("flags {:#x} are not valid here", req.flags)));
        }
        if writes && !(self.s.writable && self.s.export.writable()) {
            return Err((EPERM, format!("export {} is read-only", self.s.export.name)));
        }
        if let Some(code) = range {
            let end = req.offset.checked_add(req.len.into());
            if end.is_none_or(|end| end > self.s.export.size()) {
                let size = self.s.export.size();
                return Err((
                    code,
                    format!("range past the end of the export ({size} bytes)"),
                ));
            }
        }
        Ok(())
    }

    /// Checks that the range is whole sectors (the advertised minimum block size).
    fn aligned(&self, req: &Request) -> Result<(), Failure> {
        let b = u64::from(MIN_BLOCK);
        if !req.offset.is_multiple_of(b) || !u64::from(req.len).is_multiple_of(b) {
            return Err((
                EINVAL,
                format!("offset and length must be multiples of {b}"),
            ));
        }
        Ok(())
    }

    /// Checks the length against the largest payload.
    fn small(&self, req: &Request) -> Result<(), Failure> {
        if req.len > MAX_PAYLOAD {
            return Err((
                EINVAL,
                format!("requests are limited to {MAX_PAYLOAD} bytes"),
            ));
        }
        Ok(())
    }

    /// After a successful change with FUA: flush.
    fn fua(&self, req: &Request, r: Result<(), Failure>) -> Result<(), Failure> {
        match r {
            Ok(()) if req.flags & CMD_FLAG_FUA != 0 => self.s.export.flush(),
            r => r,
        }
    }

    /// Sends the reply of a request without payload.
    fn answer(&mut self, req: &Request, r: Result<(), Failure>) -> io::Result<()> {
        match r {
            Ok(()) => {
                self.out.clear();
                SimpleReply {
                    error: 0,
                    handle: req.handle,
                }
                .encode(&mut self.out);
                self.stream.write_all(&self.out)
            }
            Err(f) => self.fail(req, f),
        }
    }

    /// Sends an error reply: an error chunk if structured replies were negotiated.
    fn fail(&mut self, req: &Request, (error, message): Failure) -> io::Result<()> {
        count(&self.counters().errors, 1);
        self.out.clear();
        if self.s.structured {
            let chunk = ErrorChunk {
                error,
                message,
                offset: None,
            };
            self.chunk(req.handle, chunk.kind(), chunk.encoded_len(), true);
            chunk.encode(&mut self.out);
        } else {
            SimpleReply {
                error,
                handle: req.handle,
            }
            .encode(&mut self.out);
        }
        self.stream.write_all(&self.out)
    }

    /// Appends a structured chunk header to `out`.
    fn chunk(&mut self, handle: u64, kind: u16, len: usize, done: bool) {
        ChunkHeader {
            flags: if done { REPLY_FLAG_DONE } else { 0 },
            kind,
            handle,
            len: len as u32,
        }
        .encode(&mut self.out);
    }

    fn read(&mut self, req: &Request) -> io::Result<()> {
        let allowed = CMD_FLAG_FUA | if self.s.structured { CMD_FLAG_DF } else { 0 };
        let r = self.check(req, allowed, false, Some(EINVAL));
        if let Err(f) = r
            .and_then(|()| self.small(req))
            .and_then(|()| self.aligned(req))
        {
            return self.fail(req, f);
        }
        count(&self.counters().reads, 1);
        count(&self.counters().read_bytes, req.len.into());
        if !self.s.structured {
            return self.simple_read(req);
        }
        if req.len == 0 {
            self.out.clear();
            self.chunk(req.handle, REPLY_TYPE_NONE, 0, true);
            return self.stream.write_all(&self.out);
        }
        let runs = if req.flags & CMD_FLAG_DF != 0 {
            Ok(vec![(req.offset, u64::from(req.len), false)])
        } else {
            self.s.export.read_runs(req.offset, req.len.into())
        };
        let runs = match runs {
            Ok(runs) => runs,
            Err(f) => return self.fail(req, f),
        };
        let last = runs.len().saturating_sub(1);
        for (i, &(offset, len, zero)) in runs.iter().enumerate() {
            let done = i == last && (zero || len as usize <= WINDOW);
            if zero {
                self.send_hole(req.handle, offset, len, done)?;
            } else if !self.send_data(req.handle, offset, len, done)? {
                return Ok(());
            }
        }
        let done_sent = runs.last().is_some_and(|r| r.2 || r.1 as usize <= WINDOW);
        if !done_sent {
            self.out.clear();
            self.chunk(req.handle, REPLY_TYPE_NONE, 0, true);
            self.stream.write_all(&self.out)?;
        }
        Ok(())
    }

    fn send_hole(&mut self, handle: u64, offset: u64, len: u64, done: bool) -> io::Result<()> {
        self.out.clear();
        self.chunk(handle, REPLY_TYPE_OFFSET_HOLE, Hole::LEN, done);
        let len = len as u32;
        Hole { offset, len }.encode(&mut self.out);
        self.stream.write_all(&self.out)
    }

    /// Reads window `i` of `[offset, offset+len)` into `buf`: its length, or the failure.
    fn fill(&mut self, offset: u64, len: u64, at: u64) -> Result<usize, Failure> {
        let n = (len - at).min(WINDOW as u64) as usize;
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
        self.s
            .export
            .read(offset + at, &mut self.buf[..n])
            .map(|()| n)
    }

    /// Sends one data chunk, window by window. `Ok(false)` after a read error (reported in an
    /// error chunk that ends the reply, the chunk itself completed with zeros).
    fn send_data(&mut self, handle: u64, offset: u64, len: u64, done: bool) -> io::Result<bool> {
        let mut at = 0u64;
        while at < len {
            let filled = self.fill(offset, len, at);
            let n = match filled {
                Ok(n) => n,
                Err((error, message)) if at > 0 => {
                    // The chunk's header is out: complete it with zeros, then say where it failed.
                    self.pad(len - at)?;
                    let chunk = ErrorChunk {
                        error,
                        message,
                        offset: Some(offset + at),
                    };
                    self.error_chunk(handle, chunk)?;
                    return Ok(false);
                }
                Err((error, message)) => {
                    let offset = Some(offset);
                    self.error_chunk(
                        handle,
                        ErrorChunk {
                            error,
                            message,
                            offset,
                        },
                    )?;
                    return Ok(false);
                }
            };
            self.out.clear();
            if at == 0 {
                encode_data_start(handle, offset, len as u32, done, &mut self.out);
            }
            let mut bufs = [IoSlice::new(&self.out), IoSlice::new(&self.buf[..n])];
            write_all_vectored(self.stream, &mut bufs)?;
            at += n as u64;
        }
        Ok(true)
    }

    /// Sends `left` zero bytes.
    fn pad(&mut self, mut left: u64) -> io::Result<()> {
        let n = left.min(WINDOW as u64) as usize;
        self.buf.clear();
        self.buf.resize(n, 0);
        while left > 0 {
            let n = left.min(n as u64) as usize;
            self.stream.write_all(&self.buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    }

    fn error_chunk(&mut self, handle: u64, chunk: ErrorChunk) -> io::Result<()> {
        count(&self.counters().errors, 1);
        self.out.clear();
        self.chunk(handle, chunk.kind(), chunk.encoded_len(), true);
        chunk.encode(&mut self.out);
        self.stream.write_all(&self.out)
    }

    /// A read without structured replies: the header, then the data. An error once data is
    /// on its way cannot be reported: the connection is dropped, as the protocol requires.
    fn simple_read(&mut self, req: &Request) -> io::Result<()> {
        let len = u64::from(req.len);
        let mut at = 0u64;
        loop {
            let n = match self.fill(req.offset, len, at) {
                Ok(n) => n,
                Err(f) if at == 0 => return self.fail(req, f),
                Err((_, message)) => return Err(io::Error::other(message)),
            };
            self.out.clear();
            if at == 0 {
                let handle = req.handle;
                SimpleReply { error: 0, handle }.encode(&mut self.out);
            }
            let mut bufs = [IoSlice::new(&self.out), IoSlice::new(&self.buf[..n])];
            write_all_vectored(self.stream, &mut bufs)?;
            at += n as u64;
            if at >= len {
                return Ok(());
            }
        }
    }

    /// A write: the payload is read window by window and written as it comes. One too large to
    /// skip safely ends the connection (after an error reply); an invalid one is skipped.
    fn write(&mut self, req: &Request) -> Result<Flow, NbdError> {
        if req.len > MAX_PAYLOAD {
            let msg = format!("writes are limited to {MAX_PAYLOAD} bytes");
            self.fail(req, (EINVAL, msg))?;
            return Err(NbdError::WriteTooBig(req.len));
        }
        let checked = self.check(req, CMD_FLAG_FUA, true, Some(ENOSPC));
        let mut r = checked.and_then(|()| self.aligned(req));
        let valid = r.is_ok();
        let len = u64::from(req.len);
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(WINDOW as u64) as usize;
            if self.buf.len() < n {
                self.buf.resize(n, 0);
            }
            if !read_message(self.stream, &mut self.buf[..n], false)? {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            if valid && r.is_ok() {
                r = self.s.export.write(req.offset + at, &self.buf[..n]);
            }
            at += n as u64;
        }
        if valid {
            count(&self.counters().writes, 1);
            count(&self.counters().write_bytes, len);
        }
        let r = self.fua(req, r);
        self.answer(req, r)?;
        Ok(Flow::Continue)
    }

    fn block_status(&mut self, req: &Request) -> io::Result<()> {
        let r = self.check(req, CMD_FLAG_FUA | CMD_FLAG_REQ_ONE, false, Some(EINVAL));
        let r = r.and_then(|()| self.aligned(req)).and_then(|()| {
            if !self.s.structured || self.s.contexts.is_empty() {
                return Err((EINVAL, "no metadata context was negotiated".into()));
            }
            if req.len == 0 {
                return Err((EINVAL, "empty range".into()));
            }
            let one = req.flags & CMD_FLAG_REQ_ONE != 0;
            let s = self.s;
            s.export
                .block_status(&s.contexts, req.offset, req.len.into(), one)
        });
        match r {
            Ok(replies) => self.send_status(req.handle, &replies),
            Err(f) => self.fail(req, f),
        }
    }

    fn send_status(&mut self, handle: u64, replies: &[BlockStatus]) -> io::Result<()> {
        self.out.clear();
        for (i, status) in replies.iter().enumerate() {
            let done = i + 1 == replies.len();
            self.chunk(handle, REPLY_TYPE_BLOCK_STATUS, status.encoded_len(), done);
            status.encode(&mut self.out);
        }
        self.stream.write_all(&self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cow::DeviceId;
    use crate::device::CowDevice;
    use crate::nbd::proto::CMD_FLAG_FAST_ZERO;
    use crate::nbd::registry::{Mode, Registry};
    use crate::nbd::socket::Stream;
    use crate::testkit::engine::mem_engine;
    use proptest::prelude::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    /// Serves `requests` (header fields and payload bytes, sent as they are, then the end of
    /// the client's sending) on a writable snapshot of a 16-chunk engine.
    fn serve_script(requests: &[(u16, u16, u64, u32, Vec<u8>)], structured: bool) {
        let engine = Arc::new(mem_engine(16).build().engine);
        let snap = engine.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
        let reg = Registry::new(engine.clone());
        let dev = Arc::new(CowDevice::new(engine, snap));
        reg.set("s", snap, dev, Mode::Writable);
        let (mut client, server) = UnixStream::pair().unwrap();
        let mut stream = Stream::Unix(server);
        let (export, attached) = reg.attach("s", &stream).unwrap();
        let session = Session {
            export,
            attached,
            structured,
            writable: true,
            contexts: Vec::new(),
        };
        let mut bytes = Vec::new();
        for (cmd, flags, offset, len, payload) in requests {
            let (cmd, flags, offset, len) = (*cmd, *flags, *offset, *len);
            Request {
                flags,
                cmd,
                handle: 1,
                offset,
                len,
            }
            .encode(&mut bytes);
            bytes.extend_from_slice(payload);
        }
        let feeder = std::thread::spawn(move || {
            let _ = client.write_all(&bytes);
            let _ = client.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink);
        });
        let _ = serve(&mut stream, &session);
        let _ = stream.shutdown(std::net::Shutdown::Both);
        feeder.join().unwrap();
    }

    #[test]
    fn edge_requests_are_answered() {
        let max = u64::MAX;
        serve_script(
            &[
                (CMD_TRIM, 0, max - 10, 100, vec![]),
                (CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512, vec![]),
                (CMD_READ, CMD_FLAG_DF, max, u32::MAX, vec![]),
                (CMD_BLOCK_STATUS, 0, 0, 4096, vec![]),
                (CMD_CACHE, 0, max, 1, vec![]),
                (CMD_WRITE, 0, max - 511, 512, vec![1; 512]),
                (CMD_READ, 0, 0, 0, vec![]),
            ],
            true,
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any sequence of requests, whatever their fields: answered or the connection ends;
        /// the server never panics.
        #[test]
        fn arbitrary_requests_never_panic(
            requests in proptest::collection::vec(
                (0u16..10, any::<u16>(), prop_oneof![0u64..70_000, any::<u64>()],
                 prop_oneof![0u32..70_000, any::<u32>()], proptest::collection::vec(any::<u8>(), 0..600)),
                0..8),
            structured: bool,
        ) {
            serve_script(&requests, structured);
        }
    }

    #[test]
    fn trims_keep_whole_sectors_only() {
        assert_eq!(inner_sectors(0, 4096), (0, 4096));
        assert_eq!(inner_sectors(100, 1000), (512, 512));
        assert_eq!(inner_sectors(100, 200), (512, 0));
    }
}
