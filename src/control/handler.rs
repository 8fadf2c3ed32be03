//! The daemon's answers to control requests: each [`Command`] becomes a [`Daemon`] call, and
//! its result or error becomes a [`Reply`] (with the error code clients act on).

use super::protocol::{
    Command, DeviceList, DeviceView, DiffView, ErrorCode, ExtentView, IoStats, LowSpace, Reply,
    Request, StatsView, MAX_WAIT_MS,
};
use super::server::ControlHandler;
use crate::cow::{CowError, DeviceState, NewSize, SizeLimit};
use crate::daemon::{Daemon, DaemonError, DeviceStatus};
use crate::device::{BlockDevice, IoCounters};
use crate::nbd::Mode;

/// Most extents one `snapshot-diff` reply carries.
const MAX_DIFF_EXTENTS: usize = 1 << 16;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The code a client sees for an engine error.
fn engine_code(e: &CowError) -> ErrorCode {
    match e {
        CowError::NoDevice(_) => ErrorCode::NotFound,
        CowError::NameInUse(_) => ErrorCode::Exists,
        CowError::NoSpace => ErrorCode::NoSpace,
        CowError::Origin(_)
        | CowError::ReadOnly(_)
        | CowError::InvalidOption(_)
        | CowError::LimitInUse { .. }
        | CowError::Inoperative(_) => ErrorCode::Invalid,
        _ => ErrorCode::Internal,
    }
}

/// The code a client sees for a failed daemon call.
fn error_code(e: &DaemonError) -> ErrorCode {
    match e {
        DaemonError::NotFound(_) => ErrorCode::NotFound,
        DaemonError::Invalid(_) | DaemonError::NotServed(_) => ErrorCode::Invalid,
        DaemonError::Busy(_) => ErrorCode::Busy,
        // A socket that cannot be bound is taken (by a live socket or another file).
        DaemonError::AlreadyServed(_) | DaemonError::Serve { .. } => ErrorCode::Exists,
        DaemonError::ServeAgain { .. } => ErrorCode::Internal,
        DaemonError::Engine(e) => engine_code(e),
    }
}

fn reply<T: serde::Serialize>(r: Result<T, DaemonError>) -> Reply {
    match r {
        Ok(v) => Reply::ok(v),
        Err(e) => Reply::err(error_code(&e), e.to_string()),
    }
}

fn done(r: Result<(), DaemonError>) -> Reply {
    reply(r.map(|()| serde_json::json!({})))
}

impl From<&IoCounters> for IoStats {
    fn from(c: &IoCounters) -> Self {
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        IoStats {
            reads: l(&c.reads),
            read_bytes: l(&c.read_bytes),
            writes: l(&c.writes),
            write_bytes: l(&c.write_bytes),
            flushes: l(&c.flushes),
            discards: l(&c.discards),
            write_zeroes: l(&c.write_zeroes),
            errors: l(&c.errors),
            aligned: l(&c.aligned),
            bounced: l(&c.bounced),
            peak_in_flight: l(&c.peak_in_flight),
        }
    }
}

/// A device as `list` shows it; `chunk` converts chunk counts to bytes.
fn view(s: &DeviceStatus, chunk: u64) -> DeviceView {
    let d = &s.info;
    DeviceView {
        id: d.id,
        name: s.name.clone(),
        parent: s.parent.clone(),
        writable: d.writable,
        state: match d.state {
            DeviceState::Active => "active".into(),
            DeviceState::Inoperative => "inoperative".into(),
            DeviceState::Degraded => "degraded".into(),
        },
        size: d.size,
        owned_bytes: d.owned_chunks * chunk,
        shared_bytes: d.mapped_chunks.saturating_sub(d.owned_chunks) * chunk,
        zero_chunks: d.zero_chunks,
        preserved_bytes: d.preserved_chunks * chunk,
        socket: s.socket.clone(),
        serial: d.attrs.get(crate::daemon::ATTR_SERIAL).cloned(),
        connected: s.connected,
        io: s
            .device
            .as_ref()
            .map(|dev| IoStats::from(dev.counters()))
            .unwrap_or_default(),
        export: s.export.map(|m| match m {
            Mode::Writable => "writable".into(),
            _ => "read-only".into(),
        }),
        nbd_uri: s.nbd_uri.clone(),
        nbd_clients: s.nbd_clients as u64,
    }
}

fn diff(daemon: &Daemon, from: String, to: String, offset: u64, max: Option<usize>) -> Reply {
    let max = max.unwrap_or(MAX_DIFF_EXTENTS).clamp(1, MAX_DIFF_EXTENTS);
    let found = daemon.diff(&from, &to, offset, max).map(|d| DiffView {
        size: d.size,
        chunk_size: daemon.engine().chunk_size(),
        extents: d
            .extents
            .into_iter()
            .map(|(offset, length)| ExtentView { offset, length })
            .collect(),
        next_offset: d.next,
        from,
        to,
    });
    reply(found)
}

fn list(daemon: &Daemon) -> DeviceList {
    let chunk = daemon.engine().chunk_size();
    DeviceList {
        devices: daemon.devices().iter().map(|s| view(s, chunk)).collect(),
    }
}

fn stats(daemon: &Daemon) -> StatsView {
    let cache = match serde_json::to_value(daemon.engine().stats()) {
        Ok(serde_json::Value::Object(m)) => m.into_iter().collect(),
        _ => BTreeMap::new(),
    };
    // Devices that were served at some time (the others have done no I/O).
    let devices = daemon
        .devices()
        .into_iter()
        .filter_map(|s| Some((s.name, IoStats::from(s.device?.counters()))))
        .collect();
    StatsView { cache, devices }
}

fn resize(daemon: &Daemon, size: Option<u64>, auto: bool) -> Reply {
    let limit = match (size, auto) {
        (Some(bytes), false) => SizeLimit::Fixed(bytes),
        (None, true) => SizeLimit::Auto,
        _ => return Reply::err(ErrorCode::BadRequest, "give either \"size\" or \"auto\""),
    };
    let engine = daemon.engine();
    match engine.resize(limit) {
        Ok(()) => Reply::ok(engine.stats()),
        Err(e) => Reply::err(engine_code(&e), e.to_string()),
    }
}

/// `resize`: a new size, or the size now plus `grow_by` (taken under the engine's resize
/// lock, so two growths at once both count).
fn resize_device(
    daemon: &Daemon,
    name: &str,
    size: Option<u64>,
    grow_by: Option<u64>,
    force: bool,
) -> Reply {
    let new = match (size, grow_by) {
        (Some(s), None) => NewSize::To(s),
        (None, Some(add)) => NewSize::GrowBy(add),
        _ => return Reply::err(ErrorCode::BadRequest, "give either \"size\" or \"grow_by\""),
    };
    reply(daemon.resize(name, new, force))
}

/// Starts (or stops) hydrating a remote origin; replies with where it is.
fn hydrate(daemon: &Daemon, rate: Option<u64>, stop: bool) -> Reply {
    let engine = daemon.engine();
    let done = match stop {
        true => engine.hydrate_stop(),
        false => engine.hydrate(rate.unwrap_or(0)),
    };
    match done.map(|()| engine.hydration()) {
        Ok(info) => Reply::ok(info),
        Err(e) => Reply::err(engine_code(&e), e.to_string()),
    }
}

/// Blocks this control connection's thread only (each client has its own); the engine's
/// shutdown ends the wait.
fn wait_low_space(daemon: &Daemon, timeout_ms: Option<u64>) -> Reply {
    let ms = timeout_ms.unwrap_or(MAX_WAIT_MS).min(MAX_WAIT_MS);
    let engine = daemon.engine();
    let low_space = engine.wait_low_space(Duration::from_millis(ms));
    let st = engine.stats();
    Reply::ok(LowSpace {
        low_space,
        free_bytes: st.free_bytes,
        low_space_threshold: st.low_space_threshold,
        limit_bytes: st.limit_bytes,
    })
}

impl ControlHandler for Daemon {
    fn handle(&self, request: Request) -> Reply {
        match request.cmd {
            Command::SnapshotCreate {
                name,
                parent,
                writable,
                socket,
                serial,
            } => {
                let chunk = self.engine().chunk_size();
                let created = self.create(
                    &name,
                    &parent,
                    writable,
                    socket.as_deref(),
                    serial.as_deref(),
                );
                reply(created.map(|s| view(&s, chunk)))
            }
            Command::Serve { name, socket } => done(self.serve(&name, &socket)),
            Command::Unserve { name, force } => done(self.unserve(&name, force)),
            Command::List => Reply::ok(list(self)),
            Command::SnapshotDelete { name, force } => done(self.delete(&name, force)),
            Command::Restore { name, force } => done(self.restore(&name, force)),
            Command::Export { name, writable } => done(self.export(&name, writable)),
            Command::Unexport { name, force } => done(self.unexport(&name, force)),
            Command::SnapshotDiff {
                from,
                to,
                offset,
                max_extents,
            } => diff(self, from, to, offset, max_extents),
            Command::Resize {
                name,
                size,
                grow_by,
                force,
            } => resize_device(self, &name, size, grow_by, force),
            Command::Stats => Reply::ok(stats(self)),
            Command::CacheInfo => Reply::ok(self.engine().cache_info()),
            Command::CacheResize { size, auto } => resize(self, size, auto),
            Command::WaitLowSpace { timeout_ms } => wait_low_space(self, timeout_ms),
            Command::OriginHydrate { rate, stop } => hydrate(self, rate, stop),
        }
    }
}
