//! The control socket server: one thread accepts, one short-lived thread per client reads
//! request lines and writes reply lines. Commands run through a [`ControlHandler`].

use super::protocol::{ErrorCode, Reply, Request, VERSION};
use crate::sock::{self, bind_socket, wait_readable, Backoff, SocketError};
use log::debug;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;

/// Longest request line accepted; longer lines get an error and the connection is closed.
const MAX_LINE: u64 = 64 * 1024;

/// Executes control commands.
pub trait ControlHandler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> Reply;
}

/// A running control socket.
pub struct ControlServer {
    path: PathBuf,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    clients: Arc<Mutex<Vec<Client>>>,
}

/// A connected control client: its thread, and a handle on its socket to end an idle wait.
struct Client {
    stream: UnixStream,
    thread: JoinHandle<()>,
}

impl ControlServer {
    /// Binds `path` (mode `mode`) and starts answering requests with `handler`.
    pub fn start(
        path: &Path,
        mode: u32,
        handler: Arc<dyn ControlHandler>,
    ) -> Result<Self, SocketError> {
        let listener = bind_socket(path, mode)?;
        let wake =
            Arc::new(
                EventFd::new(libc::EFD_CLOEXEC).map_err(|source| SocketError::Bind {
                    path: path.into(),
                    source,
                })?,
            );
        let clients = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (wake, clients) = (wake.clone(), clients.clone());
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || accept_loop(listener, &wake, handler, &clients))
                .map_err(|source| SocketError::Bind {
                    path: path.into(),
                    source,
                })?
        };
        Ok(ControlServer {
            path: path.into(),
            wake,
            thread: Some(thread),
            clients,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Let a command that is running finish (the daemon shuts down after this), and end
        // idle connections: a client thread reads its next line only after answering.
        let clients = std::mem::take(&mut *lock(&self.clients));
        for c in &clients {
            let _ = c.stream.shutdown(std::net::Shutdown::Read);
        }
        for c in clients {
            let _ = c.thread.join();
        }
        let _ = fs::remove_file(&self.path);
    }
}

fn lock(clients: &Mutex<Vec<Client>>) -> std::sync::MutexGuard<'_, Vec<Client>> {
    clients.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop(
    listener: UnixListener,
    wake: &EventFd,
    handler: Arc<dyn ControlHandler>,
    clients: &Mutex<Vec<Client>>,
) {
    // Out of fds or threads, a client is turned away and the loop backs off instead of
    // spinning on a listener it cannot serve.
    let mut backoff = Backoff::new("control socket");
    while wait_readable(listener.as_raw_fd(), wake) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                sock::drop_pending(listener.as_fd());
                backoff.failed(&e, wake);
                continue;
            }
        };
        let handle = match stream.try_clone() {
            Ok(handle) => handle,
            Err(e) => {
                backoff.failed(&e, wake);
                continue;
            }
        };
        let handler = handler.clone();
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                if let Err(e) = serve_client(stream, &*handler) {
                    debug!("control client: {e}");
                }
            });
        let mut list = lock(clients);
        // Forget clients that are gone, so a long-lived daemon keeps no dead handles.
        list.retain(|c| !c.thread.is_finished());
        match spawned {
            Ok(thread) => {
                list.push(Client {
                    stream: handle,
                    thread,
                });
                backoff.succeeded();
            }
            Err(e) => {
                drop(list);
                backoff.failed(&e, wake);
            }
        }
    }
}

/// Answers one line with one reply; never panics on what a client sends.
pub fn answer_line(line: &str, handler: &dyn ControlHandler) -> Reply {
    let value: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return Reply::err(ErrorCode::BadRequest, format!("not a JSON object: {e}")),
    };
    match value.get("v").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return Reply::err(
                ErrorCode::UnsupportedVersion,
                format!("protocol version {v} is not supported (this daemon speaks {VERSION})"),
            )
        }
        None => return Reply::err(ErrorCode::BadRequest, "missing protocol version \"v\""),
    }
    match serde_json::from_value::<Request>(value) {
        Ok(req) => handler.handle(req),
        Err(e) => Reply::err(ErrorCode::BadRequest, format!("bad request: {e}")),
    }
}

fn serve_client(stream: UnixStream, handler: &dyn ControlHandler) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if n as u64 > MAX_LINE {
            let reply = Reply::err(ErrorCode::BadRequest, "request line too long");
            writeln!(
                writer,
                "{}",
                serde_json::to_string(&reply).unwrap_or_default()
            )?;
            return Ok(());
        }
        // A line that is not UTF-8 is a bad request like any other, not a reason to drop
        // the connection.
        let reply = match std::str::from_utf8(&line) {
            Ok(text) if text.trim().is_empty() => continue,
            Ok(text) => answer_line(text.trim(), handler),
            Err(_) => Reply::err(ErrorCode::BadRequest, "request line is not UTF-8"),
        };
        let text = serde_json::to_string(&reply).map_err(io::Error::other)?;
        writeln!(writer, "{text}")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::client::ControlClient;
    use crate::control::protocol::{Command, DeviceList};

    struct Echo;
    impl ControlHandler for Echo {
        fn handle(&self, request: Request) -> Reply {
            match request.cmd {
                Command::List => Reply::ok(DeviceList { devices: vec![] }),
                other => Reply::err(ErrorCode::Invalid, format!("{other:?}")),
            }
        }
    }

    #[test]
    fn bad_lines_get_error_replies_and_good_ones_are_dispatched() {
        for (line, code) in [
            ("nonsense", ErrorCode::BadRequest),
            ("{}", ErrorCode::BadRequest),
            (r#"{"v":2,"cmd":"list"}"#, ErrorCode::UnsupportedVersion),
            (r#"{"v":1,"cmd":"explode"}"#, ErrorCode::BadRequest),
            (r#"{"v":1,"cmd":"snapshot-create"}"#, ErrorCode::BadRequest),
        ] {
            let r = answer_line(line, &Echo);
            assert!(!r.ok, "{line}");
            assert_eq!(r.error.unwrap().code, code, "{line}");
        }
        assert!(answer_line(r#"{"v":1,"cmd":"list"}"#, &Echo).ok);
    }

    #[test]
    fn socket_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let server = ControlServer::start(&path, 0o600, Arc::new(Echo)).unwrap();
        let mut client = ControlClient::connect(&path).unwrap();
        let reply = client.call(&Request::new(Command::List)).unwrap();
        assert!(reply.ok);
        // The same connection serves several requests.
        let reply = client.call(&Request::new(Command::Stats)).unwrap();
        assert_eq!(reply.error.unwrap().code, ErrorCode::Invalid);
        drop(client);
        drop(server);
        assert!(!path.exists(), "socket removed on drop");
    }

    /// Found by tests/fuzz_control.rs: a line that is not UTF-8 dropped the connection
    /// without a reply.
    #[test]
    fn a_line_that_is_not_utf8_gets_a_bad_request_reply_and_the_connection_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let server = ControlServer::start(&path, 0o600, Arc::new(Echo)).unwrap();
        let mut stream = UnixStream::connect(&path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(b"{\"v\":1,\"cmd\":\"li\x80st\"}\n{\"v\":1,\"cmd\":\"list\"}\n")
            .unwrap();
        let mut reader = BufReader::new(stream);
        let mut replies = Vec::new();
        for _ in 0..2 {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            replies.push(serde_json::from_str::<Reply>(&line).unwrap());
        }
        assert_eq!(
            replies[0].error.as_ref().map(|e| e.code),
            Some(ErrorCode::BadRequest)
        );
        assert!(replies[1].ok, "the connection still answers");
        drop(server);
    }

    struct Slow(std::sync::atomic::AtomicBool);
    impl ControlHandler for Slow {
        fn handle(&self, _request: Request) -> Reply {
            std::thread::sleep(Duration::from_millis(300));
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            Reply::ok(DeviceList { devices: vec![] })
        }
    }

    #[test]
    fn stopping_waits_for_a_running_command_and_ends_idle_clients() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let handler = Arc::new(Slow(std::sync::atomic::AtomicBool::new(false)));
        let server = ControlServer::start(&path, 0o600, handler.clone()).unwrap();
        let _idle = ControlClient::connect(&path).unwrap();
        let p = path.clone();
        let busy = std::thread::spawn(move || {
            let mut c = ControlClient::connect(&p).unwrap();
            c.call(&Request::new(Command::List)).map(|r| r.ok)
        });
        std::thread::sleep(Duration::from_millis(100)); // the command is running now
        let started = std::time::Instant::now();
        drop(server);
        assert!(
            handler.0.load(std::sync::atomic::Ordering::SeqCst),
            "the running command finished first"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "an idle client does not hold up the stop"
        );
        assert!(busy.join().unwrap().unwrap(), "its reply was delivered");
    }
}
