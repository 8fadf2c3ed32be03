//! [`RemoteStorage`]: a read-only image on an NBD server as a [`Storage`] (a remote origin),
//! over a pool of client connections (`nbd::client`).
//!
//! - **Connections**: several when the server allows multi-conn (`NBD_FLAG_CAN_MULTI_CONN`),
//!   opened at start up to [`RemoteOptions::connections`] (as many as the server accepts),
//!   else one. A request takes an idle connection, or waits for one.
//! - **Faults**: a connection that fails is dropped and made again, with backoff (50 ms
//!   doubling to 2 s, one attempt at a time); a request is retried until its deadline
//!   ([`RemoteOptions::timeout`]) and then fails with EIO. Meanwhile the store is *degraded*
//!   (`remote_status`), and it recovers by itself when the server answers again. A server
//!   that comes back with another image (size or content fingerprint) is refused.
//! - **Holes**: `allocation` asks `base:allocation` for up to 1 GiB at once and keeps the
//!   answers (the image never changes), so a copy-on-read fetch rarely waits for it.
//!
//! Writes fail with EROFS: the origin is read-only. No lock is held across network I/O but
//! the connection's own (each request owns its connection while it runs).

use super::fingerprint::Fingerprint;
use super::{RemoteStatus, Storage};
use crate::nbd::client::{ClientConn, ClientError};
use crate::nbd::proto::STATE_ZERO;
use crate::nbd::uri::NbdUri;
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Most connections to one server.
pub const MAX_CONNECTIONS: usize = 16;
/// First and longest pause between connection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Patience for the extra connections opened at start (a server may accept fewer).
const EXTRA_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest block-status query, and most runs remembered.
const STATUS_WINDOW: u64 = 1 << 30;
const MAX_RUNS: usize = 1 << 16;

/// How to use the server.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// How long a request may take, retries included, before it fails with EIO.
    pub timeout: Duration,
    /// Most connections (used only if the server allows multi-conn).
    pub connections: usize,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            timeout: Duration::from_secs(30),
            connections: 4,
        }
    }
}

struct Pool {
    idle: Vec<ClientConn>,
    /// Connections open (idle or in use) or being made.
    open: usize,
    /// Most connections.
    cap: usize,
    connecting: bool,
    retry_at: Instant,
    backoff: Duration,
}

/// A read-only image on an NBD server.
pub struct RemoteStorage {
    uri: NbdUri,
    size: u64,
    opts: RemoteOptions,
    max_request: u32,
    min_block: u32,
    has_status: bool,
    /// The image's fingerprint when first connected: a server that returns must match it.
    fingerprint: Fingerprint,
    pool: Mutex<Pool>,
    changed: Condvar,
    /// `base:allocation` answers: run start -> (end, reads as zeros), merged.
    runs: Mutex<BTreeMap<u64, (u64, bool)>>,
    degraded: AtomicBool,
    reconnects: AtomicU64,
    failed: AtomicU64,
    reads: AtomicU64,
    bytes_read: AtomicU64,
    last_error: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn eio(msg: String) -> io::Error {
    io::Error::other(msg)
}

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

/// Why a server's export cannot be a remote origin.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("cannot open {uri}: {source}")]
    Connect {
        uri: String,
        #[source]
        source: ClientError,
    },
    #[error("{uri}: the export's size {size} is not a non-zero multiple of 512 bytes")]
    Size { uri: String, size: u64 },
}

impl RemoteStorage {
    /// Connects to `uri` (the first connection waits at most `opts.timeout`), takes the
    /// image's fingerprint, and opens the other connections the server allows.
    pub fn connect(uri: NbdUri, opts: RemoteOptions) -> Result<Self, RemoteError> {
        let err = |source| RemoteError::Connect {
            uri: uri.to_string(),
            source,
        };
        let mut first = ClientConn::connect(&uri, opts.timeout).map_err(err)?;
        first.set_deadline(Some(Instant::now() + opts.timeout));
        let info = first.info.clone();
        if info.size == 0 || !info.size.is_multiple_of(512) {
            let size = info.size;
            return Err(RemoteError::Size {
                uri: uri.to_string(),
                size,
            });
        }
        let fingerprint = Fingerprint::sample(info.size, |buf, off| first.read(off, buf));
        let fingerprint = fingerprint.map_err(err)?;
        first.set_deadline(None);
        let cap = if info.multi_conn() {
            opts.connections.clamp(1, MAX_CONNECTIONS)
        } else {
            1
        };
        let mut idle = vec![first];
        while idle.len() < cap {
            match ClientConn::connect(&uri, opts.timeout.min(EXTRA_CONNECT_TIMEOUT)) {
                Ok(c) if c.info.size == info.size => idle.push(c),
                _ => break,
            }
        }
        log::info!(
            "remote origin {uri}: {} bytes, {} connection(s){}{}",
            info.size,
            idle.len(),
            if info.structured {
                ", structured replies"
            } else {
                ""
            },
            if info.allocation_context.is_some() {
                ", base:allocation"
            } else {
                ""
            },
        );
        let cap = idle.len();
        Ok(RemoteStorage {
            size: info.size,
            max_request: info.max_request / info.min_block * info.min_block,
            min_block: info.min_block,
            has_status: info.allocation_context.is_some(),
            uri,
            opts,
            fingerprint,
            pool: Mutex::new(Pool {
                open: cap,
                idle,
                cap,
                connecting: false,
                retry_at: Instant::now(),
                backoff: BACKOFF_MIN,
            }),
            changed: Condvar::new(),
            runs: Mutex::new(BTreeMap::new()),
            degraded: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            last_error: Mutex::new(None),
        })
    }

    /// The server's smallest block (requests are aligned to it).
    pub fn min_block(&self) -> u32 {
        self.min_block
    }

    /// The state changed to degraded (logged once per episode) with `why`.
    fn degrade(&self, why: &str) {
        *lock(&self.last_error) = Some(why.to_string());
        if !self.degraded.swap(true, Ordering::Relaxed) {
            log::warn!(
                "remote origin {} is unavailable ({why}): reads of chunks not local fail after \
                 {:?}; retrying in the background",
                self.uri,
                self.opts.timeout
            );
        }
    }

    fn healthy(&self) {
        if self.degraded.load(Ordering::Relaxed) && self.degraded.swap(false, Ordering::Relaxed) {
            log::info!("remote origin {} answers again", self.uri);
        }
    }

    /// A connection made afresh, checked to serve the same image.
    fn reconnect(&self, timeout: Duration) -> Result<ClientConn, ClientError> {
        let mut c = ClientConn::connect(&self.uri, timeout)?;
        c.set_deadline(Some(Instant::now() + timeout));
        let fp = if c.info.size == self.size {
            Fingerprint::sample(self.size, |buf, off| c.read(off, buf))?
        } else {
            Fingerprint(Vec::new())
        };
        c.set_deadline(None);
        if let Err(what) = self.fingerprint.compare(&fp) {
            return Err(ClientError::Refused(format!(
                "the server now serves another image ({} bytes; {what})",
                c.info.size
            )));
        }
        Ok(c)
    }

    /// An idle connection, or a new one, by `deadline`.
    fn take(&self, deadline: Instant) -> Result<ClientConn, String> {
        let mut pool = lock(&self.pool);
        loop {
            if let Some(c) = pool.idle.pop() {
                return Ok(c);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err("no connection to the server within the timeout".into());
            }
            let can_connect = pool.open < pool.cap && !pool.connecting;
            if can_connect && now >= pool.retry_at {
                pool.connecting = true;
                pool.open += 1;
                drop(pool);
                let made = self.reconnect((deadline - now).max(Duration::from_millis(100)));
                pool = lock(&self.pool);
                pool.connecting = false;
                self.changed.notify_all();
                match made {
                    Ok(c) => {
                        pool.backoff = BACKOFF_MIN;
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                        return Ok(c);
                    }
                    Err(e) => {
                        pool.open -= 1;
                        pool.retry_at = Instant::now() + pool.backoff;
                        pool.backoff = (pool.backoff * 2).min(BACKOFF_MAX);
                        self.degrade(&e.to_string());
                        continue;
                    }
                }
            }
            let until = match can_connect {
                true => pool.retry_at.min(deadline),
                false => deadline,
            };
            let wait = until
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            pool = self
                .changed
                .wait_timeout(pool, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Gives a connection back, or drops it (`None`) and frees its slot.
    fn give_back(&self, conn: Option<ClientConn>) {
        let mut pool = lock(&self.pool);
        match conn {
            Some(c) => pool.idle.push(c),
            None => pool.open -= 1,
        }
        drop(pool);
        self.changed.notify_all();
    }

    /// Runs `op` on a connection, retrying (a new connection if the old one broke) until
    /// the timeout; then fails with EIO.
    fn request<T>(
        &self,
        what: &str,
        mut op: impl FnMut(&mut ClientConn) -> Result<T, ClientError>,
    ) -> io::Result<T> {
        let deadline = Instant::now() + self.opts.timeout;
        let mut pause = BACKOFF_MIN;
        loop {
            let mut conn = match self.take(deadline) {
                Ok(c) => c,
                Err(why) => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    self.degrade(&why);
                    return Err(eio(format!("remote origin {}: {what}: {why}", self.uri)));
                }
            };
            // However slowly the server answers, the request ends by its deadline (plus at
            // most one socket timeout).
            conn.set_deadline(Some(deadline));
            let done = op(&mut conn);
            conn.set_deadline(None);
            match done {
                Ok(v) => {
                    self.give_back(Some(conn));
                    self.healthy();
                    return Ok(v);
                }
                Err(e) => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    *lock(&self.last_error) = Some(e.to_string());
                    let keep = !e.breaks_connection();
                    self.give_back(keep.then_some(conn));
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        self.degrade(&e.to_string());
                        return Err(eio(format!("remote origin {}: {what}: {e}", self.uri)));
                    }
                    std::thread::sleep(pause.min(left));
                    pause = (pause * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// The remembered `base:allocation` run holding `offset`, as `(reads as zeros, end)`.
    fn known_run(&self, offset: u64) -> Option<(bool, u64)> {
        let runs = lock(&self.runs);
        let (_, &(end, zero)) = runs.range(..=offset).next_back()?;
        (end > offset).then_some((zero, end))
    }

    /// Remembers runs from `offset` (merging neighbours alike).
    fn remember(&self, offset: u64, status: &[(u32, u32)]) {
        let mut runs = lock(&self.runs);
        if runs.len() > MAX_RUNS {
            runs.clear();
        }
        let mut at = offset;
        for &(len, flags) in status {
            let (mut start, end, zero) = (at, at + u64::from(len), flags & STATE_ZERO != 0);
            if let Some((&s, &(e, z))) = runs.range(..=start).next_back() {
                if e == start && z == zero {
                    start = s;
                }
            }
            runs.insert(start, (end, zero));
            at = end;
        }
    }
}

impl Storage for RemoteStorage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the remote origin",
            ));
        }
        let step = self.max_request.max(self.min_block) as usize;
        for (i, piece) in buf.chunks_mut(step).enumerate() {
            let at = offset + (i * step) as u64;
            self.request("read", |c| c.read(at, piece))?;
            self.reads.fetch_add(1, Ordering::Relaxed);
            self.bytes_read
                .fetch_add(piece.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        // Without the server's answer, "data": the read that follows fetches it (and a
        // chunk that turns out all zeros is kept as zeros all the same).
        let down = self.degraded.load(Ordering::Relaxed);
        if !self.has_status || down || len == 0 || offset >= self.size {
            return Ok((false, len));
        }
        if let Some((zero, end)) = self.known_run(offset) {
            return Ok((zero, (end - offset).min(len)));
        }
        let n = (self.size - offset).min(STATUS_WINDOW) as u32;
        let status = self.request("block status", |c| c.block_status(offset, n))?;
        self.remember(offset, &status);
        let (zero, end) = self
            .known_run(offset)
            .ok_or_else(|| eio("block status answered nothing".into()))?;
        Ok((zero, (end - offset).min(len)))
    }

    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(erofs())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn set_size(&self, _: u64) -> io::Result<()> {
        Err(erofs())
    }
    fn punch_hole(&self, _: u64, _: u64) -> io::Result<()> {
        Err(erofs())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> io::Result<()> {
        Err(erofs())
    }

    fn remote_status(&self) -> Option<RemoteStatus> {
        let pool = lock(&self.pool);
        Some(RemoteStatus {
            uri: self.uri.to_string(),
            degraded: self.degraded.load(Ordering::Relaxed),
            connections: (pool.open - usize::from(pool.connecting)) as u64,
            max_connections: pool.cap as u64,
            reconnects: self.reconnects.load(Ordering::Relaxed),
            failed_requests: self.failed.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            last_error: lock(&self.last_error).clone(),
        })
    }
}

impl Drop for RemoteStorage {
    fn drop(&mut self) {
        for c in lock(&self.pool).idle.drain(..) {
            c.close();
        }
    }
}
