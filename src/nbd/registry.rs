//! The NBD exports: every device by name, how it is exported (hidden, read-only, writable),
//! and the connections open on it. The daemon changes it as devices come and go (with the
//! same device adapters its vhost servers use, so I/O counters stay one per device); the
//! server opens exports from it and registers each connection, so that taking an export
//! away (delete, unexport) can refuse while clients are connected, or end their connections
//! cleanly: each finishes the request it is serving, answers it, and is closed.

use super::socket::Stream;
use crate::cow::{CacheObject, DeviceId};
use crate::device::CowDevice;
use log::warn;
use std::collections::{BTreeMap, HashSet};
use std::net::{Shutdown, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long an ended connection may take to finish its request before it is cut.
const END_GRACE: Duration = Duration::from_secs(10);

/// How a device is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Not offered (still usable as a dirty bitmap's reference).
    Hidden,
    ReadOnly,
    Writable,
}

/// An export as its connections use it.
pub struct Export {
    pub name: String,
    pub id: DeviceId,
    /// The device adapter the vhost server uses too (I/O and its counters).
    pub device: Arc<CowDevice>,
    /// The engine, for block-status queries.
    pub engine: Arc<CacheObject>,
    writable: AtomicBool,
}

impl Export {
    /// Whether writes are allowed now (an export made read-only refuses them at once).
    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }
}

/// A connection's handle: a clone of its stream, to end it from another thread.
#[derive(Debug)]
struct Conn {
    serial: u64,
    stream: Stream,
}

struct Slot {
    export: Arc<Export>,
    mode: Mode,
    conns: Vec<Conn>,
}

#[derive(Default)]
struct Table {
    slots: BTreeMap<String, Slot>,
    /// Serials of the connections attached to an export and not ended yet.
    live: HashSet<u64>,
}

/// Where the server listens, for the URIs `list` shows.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    pub unix: Option<PathBuf>,
    pub tcp: Option<SocketAddr>,
}

/// The exports of one daemon.
pub struct Registry {
    engine: Arc<CacheObject>,
    table: Mutex<Table>,
    ended: Condvar,
    next_serial: AtomicU64,
    endpoints: Mutex<Endpoints>,
}

/// An export taken out of service by [`Registry::hide`]: no connection can open it, and the
/// ones it had are listed here to be ended ([`Registry::end`]) or given back
/// ([`Registry::reinstate`]).
#[must_use]
#[derive(Debug)]
pub struct Hidden {
    name: String,
    mode: Mode,
    conns: Vec<Conn>,
}

/// A connection attached to an export; detaches on drop.
pub struct Attached {
    registry: Arc<Registry>,
    name: String,
    serial: u64,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut t = self.registry.lock();
        t.live.remove(&self.serial);
        if let Some(slot) = t.slots.get_mut(&self.name) {
            slot.conns.retain(|c| c.serial != self.serial);
        }
        drop(t);
        self.registry.ended.notify_all();
    }
}

/// Percent-encodes `s` for a URI, keeping unreserved characters and those in `keep`.
fn uri_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Registry {
    pub fn new(engine: Arc<CacheObject>) -> Arc<Self> {
        Arc::new(Registry {
            engine,
            table: Mutex::new(Table::default()),
            ended: Condvar::new(),
            next_serial: AtomicU64::new(1),
            endpoints: Mutex::new(Endpoints::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds device `id` as export `name`, or changes how it is exported.
    pub fn set(&self, name: &str, id: DeviceId, device: Arc<CowDevice>, mode: Mode) {
        let mut t = self.lock();
        if let Some(slot) = t.slots.get_mut(name).filter(|s| s.export.id == id) {
            slot.mode = mode;
            let writable = mode == Mode::Writable;
            slot.export.writable.store(writable, Ordering::Release);
            return;
        }
        let export = Arc::new(Export {
            name: name.to_string(),
            id,
            device,
            engine: self.engine.clone(),
            writable: AtomicBool::new(mode == Mode::Writable),
        });
        let conns = Vec::new();
        t.slots.insert(
            name.to_string(),
            Slot {
                export,
                mode,
                conns,
            },
        );
    }

    /// Forgets export `name` (its device is gone); end its connections first.
    pub fn remove(&self, name: &str) {
        self.lock().slots.remove(name);
    }

    /// How `name` is exported.
    pub fn mode(&self, name: &str) -> Option<Mode> {
        self.lock().slots.get(name).map(|s| s.mode)
    }

    /// Connections open on `name`.
    pub fn clients(&self, name: &str) -> usize {
        self.lock().slots.get(name).map_or(0, |s| s.conns.len())
    }

    /// Connections open on all exports.
    pub fn connections(&self) -> usize {
        self.lock().live.len()
    }

    /// The exports clients may open, in name order.
    pub fn exported(&self) -> Vec<(String, Mode)> {
        let t = self.lock();
        let visible = t.slots.iter().filter(|(_, s)| s.mode != Mode::Hidden);
        visible.map(|(n, s)| (n.clone(), s.mode)).collect()
    }

    /// Every device name (dirty bitmaps may refer to hidden ones too).
    pub fn devices(&self) -> Vec<String> {
        self.lock().slots.keys().cloned().collect()
    }

    /// The device called `name`, exported or not.
    pub fn device_id(&self, name: &str) -> Option<DeviceId> {
        self.lock().slots.get(name).map(|s| s.export.id)
    }

    /// Export `name`, if clients may open it.
    pub fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        let t = self.lock();
        let slot = t.slots.get(name).filter(|s| s.mode != Mode::Hidden)?;
        Some(slot.export.clone())
    }

    /// Opens export `name` for a connection (whose stream `stream` is), if clients may.
    pub fn attach(
        self: &Arc<Self>,
        name: &str,
        stream: &Stream,
    ) -> Option<(Arc<Export>, Attached)> {
        let handle = stream.try_clone().ok()?;
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let mut t = self.lock();
        let slot = t.slots.get_mut(name).filter(|s| s.mode != Mode::Hidden)?;
        slot.conns.push(Conn {
            serial,
            stream: handle,
        });
        let export = slot.export.clone();
        t.live.insert(serial);
        let attached = Attached {
            registry: self.clone(),
            name: name.to_string(),
            serial,
        };
        Some((export, attached))
    }

    /// Takes export `name` out of service: no connection can open it until
    /// [`Registry::reinstate`]. Refused (`Err` with the number of clients) while clients are
    /// connected, unless `force`. `Ok(None)` if there is no such export.
    pub fn hide(&self, name: &str, force: bool) -> Result<Option<Hidden>, usize> {
        let mut t = self.lock();
        let Some(slot) = t.slots.get_mut(name) else {
            return Ok(None);
        };
        if !slot.conns.is_empty() && !force {
            return Err(slot.conns.len());
        }
        let mode = std::mem::replace(&mut slot.mode, Mode::Hidden);
        slot.export.writable.store(false, Ordering::Release);
        let conns = std::mem::take(&mut slot.conns);
        Ok(Some(Hidden {
            name: name.to_string(),
            mode,
            conns,
        }))
    }

    /// Puts a hidden export back as it was, with the connections still open.
    pub fn reinstate(&self, hidden: Hidden) {
        let mut t = self.lock();
        let Table { slots, live } = &mut *t;
        if let Some(slot) = slots.get_mut(&hidden.name) {
            slot.mode = hidden.mode;
            let writable = hidden.mode == Mode::Writable;
            slot.export.writable.store(writable, Ordering::Release);
            let open = hidden
                .conns
                .into_iter()
                .filter(|c| live.contains(&c.serial));
            slot.conns.extend(open);
        }
    }

    /// Ends the connections a hidden export had: each finishes and answers the request it is
    /// serving, then is closed. Waits for them (cutting them after a grace period).
    pub fn end(&self, hidden: &Hidden) {
        self.end_conns(&hidden.conns, &hidden.name);
    }

    /// Ends every connection (the daemon is stopping).
    pub fn end_all(&self) {
        let conns: Vec<Conn> = {
            let mut t = self.lock();
            let slots = t.slots.values_mut();
            slots.flat_map(|s| std::mem::take(&mut s.conns)).collect()
        };
        self.end_conns(&conns, "every export");
    }

    fn end_conns(&self, conns: &[Conn], what: &str) {
        // No more requests are read; the one being served is answered.
        for c in conns {
            let _ = c.stream.shutdown(Shutdown::Read);
        }
        if self.wait_ended(conns, END_GRACE) {
            return;
        }
        warn!("NBD clients of {what} did not finish within {END_GRACE:?}; cutting them off");
        for c in conns {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        if !self.wait_ended(conns, END_GRACE) {
            warn!("NBD connections of {what} are still ending; going on without them");
        }
    }

    /// Waits until none of `conns` is live, at most `limit`; whether they all ended.
    fn wait_ended(&self, conns: &[Conn], limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut t = self.lock();
        loop {
            if conns.iter().all(|c| !t.live.contains(&c.serial)) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            t = self
                .ended
                .wait_timeout(t, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Records where the server listens (for [`Registry::uri`]).
    pub fn set_endpoints(&self, endpoints: Endpoints) {
        *self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = endpoints;
    }

    /// The URI a client opens export `name` with, if the server listens: the unix socket's
    /// (`nbd+unix:///NAME?socket=PATH`) or else the TCP one's (`nbd://HOST:PORT/NAME`).
    pub fn uri(&self, name: &str) -> Option<String> {
        let ep = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let export = uri_encode(name, b"");
        if let Some(path) = ep.unix {
            let path = uri_encode(&path.display().to_string(), b"/");
            return Some(format!("nbd+unix:///{export}?socket={path}"));
        }
        ep.tcp.map(|addr| format!("nbd://{addr}/{export}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_escape_what_a_uri_cannot_hold() {
        assert_eq!(uri_encode("vm 1/x?", b""), "vm%201%2Fx%3F");
        assert_eq!(uri_encode("/run/a b.sock", b"/"), "/run/a%20b.sock");
    }
}
