//! NBD test helpers: the standard tools (`nbdinfo`, `nbdcopy`, `qemu-img`, `qemu-io`) run
//! and their output parsed, and a small raw client on the crate's own codec for what the
//! tools never send (bad requests, vanishing mid-write, hand-made handshakes).

use crate::nbd::chunks::{ErrorChunk, Hole};
use crate::nbd::options::InfoRequest;
use crate::nbd::proto::{
    ChunkHeader, Greeting, OptionHeader, OptionReply, Request, SimpleReply, FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES, INFO_BLOCK_SIZE, OPT_GO, OPT_STRUCTURED_REPLY, REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE, REP_ACK, REP_INFO,
};
use serde_json::Value;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The URI of export `name` on unix socket `socket`.
pub fn uri(socket: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", socket.display())
}

/// Runs `cmd`, panicking with its output unless it succeeds; returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?} (qemu/install-host-deps.sh installs it): {e}")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` and returns whether it succeeded, with stdout and stderr.
pub fn try_run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("run a tool");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `nbdinfo --json URI`: the export's description.
pub fn info(uri: &str) -> Value {
    let out = run(Command::new("nbdinfo").arg("--json").arg(uri));
    serde_json::from_str(&out).expect("nbdinfo --json output")
}

/// The export names `nbdinfo --list` shows on `socket`.
pub fn list(socket: &Path) -> Vec<String> {
    let out = run(Command::new("nbdinfo")
        .args(["--list", "--json"])
        .arg(uri(socket, "")));
    let v: Value = serde_json::from_str(&out).expect("nbdinfo --list --json output");
    v["exports"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["export-name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// `nbdinfo --map=CONTEXT URI`: `(offset, length, flags)` of every extent, in order.
pub fn map(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    let out = run(Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg("--json")
        .arg(uri));
    let v: Value = serde_json::from_str(&out).expect("nbdinfo --map --json output");
    v.as_array()
        .expect("an array of extents")
        .iter()
        .map(|e| {
            let n = |k: &str| {
                e[k].as_u64()
                    .unwrap_or_else(|| panic!("extent without {k}: {e}"))
            };
            (n("offset"), n("length"), n("type") as u32)
        })
        .collect()
}

/// The extents of a map whose flags satisfy `pred`, neighbours merged: `(offset, length)`.
pub fn extents_where(map: &[(u64, u64, u32)], pred: impl Fn(u32) -> bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(off, len, _) in map.iter().filter(|e| pred(e.2)) {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len)),
        }
    }
    out
}

/// A hand-driven NBD client over a unix socket, on the crate's codec.
pub struct RawClient {
    pub stream: UnixStream,
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    handle: u64,
}

/// A reply: its error (0 = success) and, for reads, the data (holes filled with zeros).
#[derive(Debug)]
pub struct RawReply {
    pub error: u32,
    pub data: Vec<u8>,
}

fn proto_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl RawClient {
    /// Connects to `socket` and opens `export` with `NBD_OPT_GO` (structured replies first
    /// if asked for).
    pub fn connect(socket: &Path, export: &str, structured: bool) -> io::Result<RawClient> {
        let mut stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut g = [0u8; Greeting::LEN];
        stream.read_exact(&mut g)?;
        Greeting::decode(&g).map_err(proto_err)?;
        stream.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
        let mut c = RawClient {
            stream,
            size: 0,
            flags: 0,
            structured: false,
            handle: 1,
        };
        if structured {
            c.option(OPT_STRUCTURED_REPLY, &[])?;
            c.structured = c.option_reply()?.0 == REP_ACK;
        }
        let mut go = Vec::new();
        InfoRequest {
            name: export.to_string(),
            requests: vec![INFO_BLOCK_SIZE],
        }
        .encode(&mut go);
        c.option(OPT_GO, &go)?;
        loop {
            let (reply, data) = c.option_reply()?;
            match reply {
                REP_INFO if data.len() == 12 && data[..2] == [0, 0] => {
                    c.size = u64::from_be_bytes(data[2..10].try_into().map_err(proto_err)?);
                    c.flags = u16::from_be_bytes([data[10], data[11]]);
                }
                REP_INFO => {}
                REP_ACK => return Ok(c),
                other => {
                    let msg = String::from_utf8_lossy(&data);
                    return Err(io::Error::other(format!("GO refused ({other:#x}): {msg}")));
                }
            }
        }
    }

    /// Sends an option.
    pub fn option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let mut out = Vec::new();
        let len = data.len() as u32;
        OptionHeader { option, len }.encode(&mut out);
        out.extend_from_slice(data);
        self.stream.write_all(&out)
    }

    /// Reads one option reply: its type and data.
    pub fn option_reply(&mut self) -> io::Result<(u32, Vec<u8>)> {
        let mut h = [0u8; OptionReply::LEN];
        self.stream.read_exact(&mut h)?;
        let r = OptionReply::decode(&h).map_err(proto_err)?;
        let mut data = vec![0u8; r.len as usize];
        self.stream.read_exact(&mut data)?;
        Ok((r.reply, data))
    }

    /// Sends a request header (and `payload` after it) without waiting for the reply.
    pub fn send(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        self.handle += 1;
        let handle = self.handle;
        let mut out = Vec::new();
        Request {
            flags,
            cmd,
            handle,
            offset,
            len,
        }
        .encode(&mut out);
        out.extend_from_slice(payload);
        self.stream.write_all(&out)?;
        Ok(handle)
    }

    /// Sends a request and reads its reply. A read's data is `len` bytes long.
    pub fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<RawReply> {
        let handle = self.send(cmd, flags, offset, len, payload)?;
        let reads = cmd == crate::nbd::proto::CMD_READ;
        if self.structured {
            return self.structured_reply(handle, offset, len);
        }
        let mut h = [0u8; SimpleReply::LEN];
        self.stream.read_exact(&mut h)?;
        let r = SimpleReply::decode(&h).map_err(proto_err)?;
        let mut data = Vec::new();
        if reads && r.error == 0 {
            data.resize(len as usize, 0);
            self.stream.read_exact(&mut data)?;
        }
        Ok(RawReply {
            error: r.error,
            data,
        })
    }

    fn structured_reply(&mut self, handle: u64, offset: u64, len: u32) -> io::Result<RawReply> {
        let mut data = vec![0u8; len as usize];
        let mut error = 0;
        loop {
            let mut h = [0u8; ChunkHeader::LEN];
            self.stream.read_exact(&mut h)?;
            let c = ChunkHeader::decode(&h).map_err(proto_err)?;
            if c.handle != handle {
                return Err(proto_err("reply for another request"));
            }
            let mut payload = vec![0u8; c.len as usize];
            self.stream.read_exact(&mut payload)?;
            match c.kind {
                REPLY_TYPE_OFFSET_DATA if payload.len() >= 8 => {
                    let at = u64::from_be_bytes(payload[..8].try_into().map_err(proto_err)?);
                    let start = (at - offset) as usize;
                    data[start..start + payload.len() - 8].copy_from_slice(&payload[8..]);
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let hole = Hole::decode(&payload).map_err(proto_err)?;
                    let start = (hole.offset - offset) as usize;
                    data[start..start + hole.len as usize].fill(0);
                }
                k if k & 0x8000 != 0 => {
                    error = ErrorChunk::decode(k, &payload).map_err(proto_err)?.error;
                }
                _ => {}
            }
            if c.is_done() {
                return Ok(RawReply { error, data });
            }
        }
    }
}
