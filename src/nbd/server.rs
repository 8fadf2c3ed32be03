//! The NBD server: a unix socket and optionally a TCP port, an accept thread for each, and a
//! thread per connection that negotiates ([`super::handshake`]) and then serves the client's
//! requests ([`super::transmission`]): reading a request, its I/O and its reply all happen on
//! that thread, so connections never wait for each other, for a VM's queues or for the
//! control socket. At most `max_connections` at once; past that, a client is told why
//! (every option it sends gets `NBD_REP_ERR_POLICY` with a message) and let go.

use super::error::NbdError;
use super::handshake::negotiate;
use super::proto::{
    truncated, Greeting, OptionHeader, OptionReply, FLAG_FIXED_NEWSTYLE, OPT_ABORT,
    OPT_EXPORT_NAME, REP_ACK, REP_ERR_POLICY,
};
use super::registry::{Endpoints, Registry};
use super::socket::{read_by, Stream};
use super::transmission::serve;
use crate::sock::{bind_socket, wait_readable};
use log::{debug, info, warn};
use std::fs;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// Connections served at once unless configured otherwise.
pub const MAX_CONNECTIONS: usize = 64;
/// Clients being told "too many connections" at once; more are just closed.
const MAX_REFUSALS: usize = 8;
/// How long a refused client may take to hear why.
const REFUSAL_TIME: Duration = Duration::from_secs(5);
/// Log lines about connections per minute (a client connecting in a loop cannot flood it).
const LOG_PER_MINUTE: u32 = 30;

/// Where and how to listen.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// The unix socket, if any.
    pub unix: Option<PathBuf>,
    /// The TCP address (`HOST:PORT`), if any.
    pub tcp: Option<String>,
    /// Permission bits of the unix socket.
    pub socket_mode: u32,
    pub max_connections: usize,
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
            Listener::Tcp(l) => Stream::Tcp(l.accept()?.0),
        })
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

/// A connection thread and a handle on its stream (to cut it when the server stops).
struct Tracked {
    stream: Stream,
    thread: JoinHandle<()>,
    refusal: bool,
}

/// A budget of log lines per minute.
struct Throttle(Mutex<(Instant, u32)>);

impl Throttle {
    fn allow(&self) -> bool {
        let mut t = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if t.0.elapsed() >= Duration::from_secs(60) {
            *t = (Instant::now(), 0);
        }
        t.1 += 1;
        t.1 <= LOG_PER_MINUTE
    }
}

struct Shared {
    registry: Arc<Registry>,
    max: usize,
    conns: Mutex<Vec<Tracked>>,
    log: Throttle,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, Vec<Tracked>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running NBD server; dropping it ends every connection and stops listening.
pub struct NbdServer {
    shared: Arc<Shared>,
    wake: Arc<EventFd>,
    acceptors: Vec<JoinHandle<()>>,
    unix: Option<PathBuf>,
    tcp: Option<SocketAddr>,
}

impl NbdServer {
    /// Listens where `opts` says and serves the exports of `registry`.
    pub fn start(registry: Arc<Registry>, opts: &NbdOptions) -> Result<NbdServer, NbdError> {
        let listen_err = |addr: String| move |source| NbdError::Listen { addr, source };
        let mut listeners = Vec::new();
        if let Some(path) = &opts.unix {
            listeners.push(Listener::Unix(bind_socket(path, opts.socket_mode)?));
        }
        let mut tcp = None;
        if let Some(addr) = &opts.tcp {
            let l = TcpListener::bind(addr).map_err(listen_err(addr.clone()))?;
            tcp = Some(l.local_addr().map_err(listen_err(addr.clone()))?);
            listeners.push(Listener::Tcp(l));
        }
        let wake = EventFd::new(libc::EFD_CLOEXEC).map_err(listen_err("an eventfd".into()))?;
        let wake = Arc::new(wake);
        let shared = Arc::new(Shared {
            registry: registry.clone(),
            max: opts.max_connections,
            conns: Mutex::new(Vec::new()),
            log: Throttle(Mutex::new((Instant::now(), 0))),
        });
        let mut acceptors = Vec::new();
        for l in listeners {
            let (shared, wake) = (shared.clone(), wake.clone());
            let thread = std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(&l, &wake, &shared))
                .map_err(listen_err("a thread".into()))?;
            acceptors.push(thread);
        }
        let unix = opts.unix.clone();
        registry.set_endpoints(Endpoints {
            unix: unix.as_deref().map(absolute),
            tcp,
        });
        Ok(NbdServer {
            shared,
            wake,
            acceptors,
            unix,
            tcp,
        })
    }

    /// The unix socket it listens on.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_deref()
    }

    /// The TCP address it listens on (with the port the system chose for port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.wake.write(1);
        for t in self.acceptors.drain(..) {
            let _ = t.join();
        }
        if let Some(p) = &self.unix {
            let _ = fs::remove_file(p);
        }
        self.shared.registry.set_endpoints(Endpoints::default());
        // Clients of exports finish their request first; the rest (still negotiating) are cut.
        self.shared.registry.end_all();
        let conns = std::mem::take(&mut *self.shared.conns());
        for c in &conns {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        for c in conns {
            let _ = c.thread.join();
        }
    }
}

fn accept_loop(listener: &Listener, wake: &EventFd, shared: &Arc<Shared>) {
    while wait_readable(listener.fd(), wake) {
        match listener.accept() {
            Ok(stream) => admit(stream, shared),
            Err(e) => {
                if shared.log.allow() {
                    warn!("NBD accept failed: {e}");
                }
                // Out of descriptors, say: do not spin on the same error.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Starts a thread for a new connection, or one that refuses it if the server is full.
fn admit(stream: Stream, shared: &Arc<Shared>) {
    let Ok(handle) = stream.try_clone() else {
        return;
    };
    let mut conns = shared.conns();
    conns.retain(|c| !c.thread.is_finished());
    let serving = conns.iter().filter(|c| !c.refusal).count();
    let refusal = serving >= shared.max;
    if refusal {
        if shared.log.allow() {
            warn!("NBD: refusing a connection, {serving} already (the limit)");
        }
        if conns.len() - serving >= MAX_REFUSALS {
            return;
        }
    }
    let s = shared.clone();
    let spawned =
        std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || match refusal {
                true => refuse(stream, s.max),
                false => connection(stream, &s),
            });
    match spawned {
        Ok(thread) => conns.push(Tracked {
            stream: handle,
            thread,
            refusal,
        }),
        Err(e) => warn!("NBD: cannot start a connection thread: {e}"),
    }
}

/// Whether an error only says the client went away.
fn client_left(e: &NbdError) -> bool {
    use io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    matches!(e, NbdError::Io(e) if matches!(e.kind(), BrokenPipe | ConnectionReset | UnexpectedEof))
}

/// One connection, from greeting to close. The stream is shut down at the end: other handles
/// on it (kept to end it from elsewhere) must not keep it open.
fn connection(stream: Stream, shared: &Shared) {
    let mut stream = stream;
    serve_connection(&mut stream, shared);
    let _ = stream.shutdown(Shutdown::Both);
}

fn serve_connection(stream: &mut Stream, shared: &Shared) {
    let peer = stream.peer();
    if let Err(e) = stream.configure() {
        debug!("NBD {peer}: cannot configure the connection: {e}");
        return;
    }
    let session = match negotiate(stream, &shared.registry) {
        Ok(Some(session)) => session,
        Ok(None) => return debug!("NBD {peer}: left during negotiation"),
        Err(e) if client_left(&e) => return debug!("NBD {peer}: left during negotiation: {e}"),
        Err(e) => {
            if shared.log.allow() {
                info!("NBD {peer}: negotiation failed: {e}");
            }
            return;
        }
    };
    let mode = if session.writable {
        "read-write"
    } else {
        "read-only"
    };
    if shared.log.allow() {
        info!("NBD {peer}: opened export {} ({mode})", session.export.name);
    }
    let result = serve(stream, &session);
    let name = &session.export.name;
    match result {
        Ok(()) => debug!("NBD {peer}: export {name} closed"),
        Err(e) if client_left(&e) => debug!("NBD {peer}: export {name}: client left: {e}"),
        Err(e) if shared.log.allow() => info!("NBD {peer}: export {name}: connection ended: {e}"),
        Err(_) => {}
    }
}

/// Answers a client the server has no room for: each option gets an error saying why.
fn refuse(stream: Stream, max: usize) {
    let mut stream = stream;
    refuse_options(&mut stream, max);
    let _ = stream.shutdown(Shutdown::Both);
}

fn refuse_options(stream: &mut Stream, max: usize) {
    let deadline = Instant::now() + REFUSAL_TIME;
    let message = format!("snapblk: too many NBD connections (the limit is {max}); try later");
    let _ = stream.configure();
    let mut out = Vec::new();
    Greeting {
        flags: FLAG_FIXED_NEWSTYLE,
    }
    .encode(&mut out);
    if stream.write_all(&out).is_err() {
        return;
    }
    let mut flags = [0u8; 4];
    if read_by(stream, &mut flags, deadline).is_err() {
        return;
    }
    for _ in 0..16 {
        let mut header = [0u8; OptionHeader::LEN];
        let Ok(header) = read_by(stream, &mut header, deadline)
            .map_err(NbdError::from)
            .and_then(|()| Ok(OptionHeader::decode(&header)?))
        else {
            return;
        };
        let mut data = vec![0u8; header.len.min(4096) as usize];
        if header.option == OPT_EXPORT_NAME
            || header.len > 4096
            || read_by(stream, &mut data, deadline).is_err()
        {
            return;
        }
        out.clear();
        let reply = match header.option {
            OPT_ABORT => REP_ACK,
            _ => REP_ERR_POLICY,
        };
        let data = if reply == REP_ACK {
            &[][..]
        } else {
            truncated(&message)
        };
        OptionReply::encode_with(header.option, reply, data, &mut out);
        if stream.write_all(&out).is_err() || reply == REP_ACK {
            return;
        }
    }
}
